"""The generative model: the NumPyro program of a latent causal diffusion."""
