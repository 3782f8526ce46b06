"""Simulated perturbation screens with known effects (linear and nonlinear latent diffusions)."""
