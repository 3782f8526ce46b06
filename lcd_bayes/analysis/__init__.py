"""Analyses of a posterior: CLIPR, prediction, baselines, splits, evaluation, recovery scores, summaries."""
