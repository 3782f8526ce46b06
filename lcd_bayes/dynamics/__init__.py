"""The latent dynamics' numerics: stationary laws, fixed points, the nonlinear drift and its particles."""
