"""lcd-bayes: Bayesian latent causal diffusions for single-cell perturbation screens."""
__version__ = "0.1.0"
