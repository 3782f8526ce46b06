"""Inference: SVI with its guides and starting point, the Laplace and NUTS refinements, posterior draws."""
