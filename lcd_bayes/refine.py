"""Refining the variational posterior by HMC on the same program (``[fit] refine = "nuts"``).

The Gaussian guides find the posterior means but their intervals are too narrow: on 20 genes
(Gaussian likelihood) HMC's sds of the true effects are 1.6-1.75 times the row-block guide's, and
its intervals cover the true edges at the nominal rates where the guide's do not (README,
calibration). The guide misses correlations across rows of ``R`` and the spread of the global
scales, which no Gaussian family we could fit by SVI recovered.

So the guide is used as a preconditioner (NeuTra, Hoffman et al. 2019, with an affine map): with
``m`` and ``L L^T`` the mean and covariance of the guide's draws in the unconstrained space, NUTS
samples ``eps`` with potential ``U(m + L eps)``, where ``U`` is minus the log joint density of the
full data. In those coordinates the posterior is close to a standard normal except along what the
guide got wrong, which is what the chain has to explore.

For the count likelihoods the cell states stay integrated out by the model's importance-weighted
marginal, with the particle noise fixed for the whole chain (common random numbers), so the
potential is a deterministic, smooth function; it is that estimate of the marginal that is
sampled. Each gradient then costs a pass over every cell and particle (~0.1 s at 20 genes and 4,200
cells on 2 CPU cores), which makes NUTS slow for counts on a CPU.
"""
from __future__ import annotations

import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
from numpyro.distributions.transforms import biject_to
from numpyro.handlers import block, seed, substitute, trace
from numpyro.infer import MCMC, NUTS
from numpyro.infer.util import initialize_model

# The whitening needs the dense covariance of the guide's draws (latent_dim^2 floats and a Cholesky
# factorization): ~40 genes with the linear drift.
MAX_LATENT_DIM = 4000


class Refinement(NamedTuple):
    latent: dict[str, np.ndarray]  # (draws, ...) constrained values of every latent site
    divergences: int
    mean_tree_size: float  # leapfrog steps per draw; 2**max_tree_depth - 1 means the depth cap bound
    seconds: float


def check_latent_dimension(model, cells) -> int:
    """The number of unconstrained latent dimensions the chain would sample; refuses, before any
    fitting is spent, a model too large for the dense whitening."""
    sites = trace(seed(model, 0)).get_trace(type(cells)(*(jnp.asarray(a) for a in cells)))
    latent_dim = sum(int(np.size(site["value"])) for site in sites.values()
                     if site["type"] == "sample" and not site["is_observed"])
    if latent_dim > MAX_LATENT_DIM:
        raise ValueError(
            f'[fit] refine = "nuts" whitens with the dense covariance of the guide, which needs at most '
            f"{MAX_LATENT_DIM} latent dimensions (about 40 genes); this model has {latent_dim}. "
            'Use refine = "none" (the guide\'s posterior), or fewer genes (--n-top-genes).'
        )
    return latent_dim


def full_data_potential(model, params: dict, cells, key):
    """``U(z) = -log p(z, y)`` over the flat unconstrained latent vector, with every cell in.

    ``model`` is the SVI program with the minibatch switched off; ``params`` fills its ``param``
    sites (the cell encoder); ``key`` fixes the particle noise of the count likelihoods.
    """
    cells = type(cells)(*(jnp.asarray(a) for a in cells))  # indexed by traced cell indices
    hidden = block(model, hide_fn=lambda site: site.get("type") == "deterministic")
    fixed = seed(substitute(hidden, data={k: jnp.asarray(v) for k, v in params.items()}), key)
    info = initialize_model(key, fixed, model_args=(cells,), dynamic_args=False)
    sites = {name: site for name, site in info.model_trace.items()
             if site["type"] == "sample" and not site["is_observed"]}
    _, unravel = ravel_pytree({name: site["value"] for name, site in sites.items()})
    return (lambda flat: info.potential_fn(unravel(flat))), unravel, sites


def unconstrained(draws: dict, sites: dict) -> jax.Array:
    """Constrained draws ``{site: (draws, ...)}`` as flat unconstrained vectors ``(draws, dim)``."""
    free = {name: biject_to(site["fn"].support).inv(jnp.asarray(draws[name])) for name, site in sites.items()}
    return jax.vmap(lambda one: ravel_pytree(one)[0])(free)


def refine_with_nuts(model, guide, params: dict, cells, *, num_warmup: int, num_samples: int,
                     max_tree_depth: int, seed_value: int, progress: bool = True) -> Refinement:
    """NUTS draws of the posterior of ``model`` (full data), preconditioned by the fitted ``guide``."""
    start = time.perf_counter()
    key_potential, key_guide, key_chain = jax.random.split(jax.random.PRNGKey(seed_value), 3)
    latent_dim = check_latent_dimension(model, cells)  # before anything of size latent_dim^2
    potential, unravel, sites = full_data_potential(model, params, cells, key_potential)
    # Four guide draws per dimension for the sample covariance; at d = 20 nine times as many gave
    # the same chain (253 leapfrog steps per draw): the chain's cost is the posterior's, not the
    # whitening's noise.
    guide_draws = guide.sample_posterior(key_guide, params, sample_shape=(max(2000, 4 * latent_dim),))
    flat = unconstrained(guide_draws, sites)
    mean = flat.mean(0)
    covariance = jnp.cov(flat.T) + 1e-8 * jnp.eye(latent_dim)
    tril = jnp.linalg.cholesky(covariance)

    def whitened_potential(eps):
        return potential(mean + tril @ eps)

    mcmc = MCMC(NUTS(potential_fn=whitened_potential, max_tree_depth=max_tree_depth),
                num_warmup=num_warmup, num_samples=num_samples, progress_bar=progress)
    mcmc.run(key_chain, init_params=jnp.zeros(latent_dim), extra_fields=("diverging", "num_steps"))
    eps = mcmc.get_samples()
    extra = mcmc.get_extra_fields()
    flat_draws = mean + eps @ tril.T

    def constrain(flat_one):
        return {name: biject_to(sites[name]["fn"].support)(value) for name, value in unravel(flat_one).items()}

    latent = jax.lax.map(constrain, flat_draws, batch_size=256)
    latent = {name: np.asarray(value) for name, value in latent.items()}
    return Refinement(latent, int(np.sum(extra["diverging"])), float(np.mean(extra["num_steps"])),
                      time.perf_counter() - start)
