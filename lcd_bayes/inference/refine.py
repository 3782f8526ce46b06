"""Refining the variational posterior after SVI (``[fit] refine``).

The Gaussian guides find the posterior means but their intervals are too narrow: on 20 genes
(Gaussian likelihood) HMC's sds of the true effects are 1.6-1.75 times the row-block guide's, and
its intervals cover the true edges at the nominal rates where the guide's do not
(docs/inference.md, "Why the guide alone is not calibrated"). The guide misses correlations across
rows of ``R`` and the spread of the global scales, which no Gaussian family we could fit by SVI
recovered (a full-rank guide over all ~900 parameters of a 20-gene model ended 2,000 nats worse in
the same steps).

Both refinements work in the coordinates the fitted guide whitens: with ``m`` and ``L L^T`` the
mean and covariance of the guide's draws in the unconstrained space, ``z = m + L eps``, and
``U(z)`` minus the log joint density of the full data.

* ``"nuts"`` (NeuTra, Hoffman et al. 2019, with an affine map): NUTS samples ``eps`` with potential
  ``U(m + L eps)``. In those coordinates the posterior is close to a standard normal except along
  what the guide got wrong, which is what the chain has to explore.
* ``"laplace"``: the Gaussian with the curvature of the posterior at the guide's mean,
  ``eps ~ N(c, H^-1)`` with ``H`` the Hessian of ``U(m + L eps)`` at ``eps = 0`` (one
  Hessian-vector product per latent dimension) and ``c`` a damped Newton step (below). Where the
  guide is too narrow, ``H`` has eigenvalues below 1 and the draws widen along them. The guide's
  mean is not the posterior's mode, and in the horseshoe's funnels (absent edges' local scales against their raw weights) the
  curvature there can be negative: along an eigenvector with eigenvalue ``h`` the draws take sd
  ``1 / sqrt(max(|h|, c))``, the curvature's magnitude (as saddle-free Newton methods do), where
  ``c`` is the larger of the prior's own curvature along that eigenvector and ``floor``: never
  wider than the prior, nor than ``1 / sqrt(floor)`` times the guide. The prior's bound matters:
  where the curvature at the guide's mean is nearly flat the draws go as wide as the bound allows,
  and with the floor's 10x alone one 20-gene NB fit drew a self-decay over a several-hundred-fold
  range and put 11% of its draws at the stability limit; with the prior's bound, none.
  The draws are centred not at the guide's mean itself but a damped Newton step from it along the
  well-curved directions (``centring_step``): the guide's mean is biased (on a 20-gene fit, 0.55 of
  NUTS's sds from the chain's mean on the true edges, while the Laplace sds were 0.93x NUTS's).

For the count likelihoods the cell states stay integrated out by the model's importance-weighted
marginal, with the particle noise fixed (common random numbers), so the potential is a
deterministic, smooth function; it is that estimate of the marginal that is sampled. Each gradient
then costs a pass over every cell and particle (~0.1 s at 20 genes and 4,200 cells on 2 CPU
cores): the Laplace refinement needs ~900 Hessian-vector products at 20 genes, NUTS ~200,000
gradients.
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
from tqdm.auto import tqdm

from ..model.program import as_jax

# The whitening needs the dense covariance of the guide's draws (latent_dim^2 floats and a Cholesky
# factorization), the Laplace refinement a dense Hessian and its eigendecomposition: ~40 genes with
# the linear drift.
MAX_LATENT_DIM = 4000


class Refinement(NamedTuple):
    latent: dict[str, np.ndarray]  # (draws, ...) constrained values of every latent site
    divergences: int
    mean_tree_size: float  # leapfrog steps per draw; 2**max_tree_depth - 1 means the depth cap bound
    seconds: float
    diverging: np.ndarray | None = None  # (draws,) bool: the draw's trajectory diverged
    num_steps: np.ndarray | None = None  # (draws,) leapfrog steps of each draw's trajectory


class LaplaceRefinement(NamedTuple):
    latent: dict[str, np.ndarray]  # (draws, ...) constrained values of every latent site
    eigenvalues: np.ndarray  # of the whitened Hessian, ascending; 1 where the guide had it right
    bound: np.ndarray  # the least curvature each eigenvector is given: the prior's, or the floor
    gradient_norm: float  # |grad U| at the guide's mean, whitened: how far that mean is from a mode
    seconds: float
    step_length: float  # the fraction of the Newton step taken to centre the draws (0: none)
    potential_drop: float  # U(guide's mean) - U(centre) in nats

    @property
    def n_negative(self) -> int:
        return int(np.sum(self.eigenvalues < 0))

    @property
    def n_floored(self) -> int:
        """Eigenvectors whose spread was capped (by the prior's or the floor's curvature)."""
        return int(np.sum(np.abs(self.eigenvalues) < self.bound))

    @property
    def widening(self) -> np.ndarray:
        """Sd along each eigenvector relative to the guide's."""
        return np.asarray(laplace_scales(self.eigenvalues, self.bound))


def latent_dimension(model, cells) -> int:
    """The number of unconstrained latent dimensions of ``model`` on ``cells``, from the shapes of
    its sample sites (traced abstractly: nothing is computed, however many cells)."""
    def latent_values():
        sites = trace(seed(model, 0)).get_trace(as_jax(cells))
        return {name: site["value"] for name, site in sites.items()
                if site["type"] == "sample" and not site["is_observed"]}

    return sum(int(np.prod(value.shape)) for value in jax.eval_shape(latent_values).values())


def check_latent_dimension(model, cells, refine: str = "nuts") -> int:
    """The number of unconstrained latent dimensions the chain would sample; refuses, before any
    fitting is spent, a model too large for the dense whitening."""
    latent_dim = latent_dimension(model, cells)
    if latent_dim > MAX_LATENT_DIM:
        raise ValueError(
            f'[fit] refine = "{refine}" whitens with the dense covariance of the guide, which needs at most '
            f"{MAX_LATENT_DIM} latent dimensions (about 40 genes); this model has {latent_dim}. "
            'Use refine = "none" (the guide\'s posterior), or fewer genes (--n-top-genes).'
        )
    return latent_dim


def resolve_refinement(refine: str, model, cells) -> tuple[str, str | None]:
    """The refinement a fit runs, and why ``"auto"`` fell back to the guide (``None`` if it did not).

    ``"auto"`` (the default) is the Laplace refinement, which calibrated the intervals of both
    likelihoods at 20 genes for a small share of the fit's time, wherever the model fits the dense
    whitening; beyond it, the guide's draws. An explicit ``"laplace"`` or ``"nuts"`` on a model too
    large is refused before anything is fitted.
    """
    if refine == "none":
        return "none", None
    if refine != "auto":
        check_latent_dimension(model, cells, refine)
        return refine, None
    latent_dim = latent_dimension(model, cells)
    if latent_dim <= MAX_LATENT_DIM:
        return "laplace", None
    return "none", (
        f"this model has {latent_dim} latent dimensions, more than the {MAX_LATENT_DIM} (about 40 genes) the "
        "Laplace refinement can whiten, so its credible intervals are the guide's, which are too narrow to be "
        "calibrated (docs/inference.md); fit fewer genes (--n-top-genes) for calibrated ones"
    )


def full_data_potential(model, params: dict, cells, key, prior_only: bool = False):
    """``U(z) = -log p(z, y)`` over the flat unconstrained latent vector, with every cell in.

    ``model`` is the SVI program with the minibatch switched off; ``params`` fills its ``param``
    sites (the cell encoder); ``key`` fixes the particle noise of the count likelihoods. With
    ``prior_only`` the observed and factor sites are hidden: ``-log p(z)`` (with the same Jacobians).
    """
    cells = as_jax(cells)  # indexed by traced cell indices
    hidden = block(model, hide_fn=lambda site: site.get("type") == "deterministic"
                   or (prior_only and site.get("type") == "sample" and site.get("is_observed")))
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


def guide_whitening(guide, params: dict, sites: dict, key, latent_dim: int) -> tuple[jax.Array, jax.Array]:
    """Mean and Cholesky factor of the covariance of the guide's draws, in the unconstrained space."""
    # Four guide draws per dimension for the sample covariance; at d = 20 nine times as many gave
    # the same chain (253 leapfrog steps per draw): the chain's cost is the posterior's, not the
    # whitening's noise.
    guide_draws = guide.sample_posterior(key, params, sample_shape=(max(2000, 4 * latent_dim),))
    flat = unconstrained(guide_draws, sites)
    covariance = jnp.cov(flat.T) + 1e-8 * jnp.eye(latent_dim)
    return flat.mean(0), jnp.linalg.cholesky(covariance)


def constrained_draws(flat_draws: jax.Array, unravel, sites: dict) -> dict[str, np.ndarray]:
    """Flat unconstrained draws ``(draws, dim)`` as constrained values by site."""
    def constrain(flat_one):
        return {name: biject_to(sites[name]["fn"].support)(value) for name, value in unravel(flat_one).items()}

    latent = jax.lax.map(constrain, flat_draws, batch_size=256)
    return {name: np.asarray(value) for name, value in latent.items()}


def refine_with_nuts(model, guide, params: dict, cells, *, num_warmup: int, num_samples: int,
                     max_tree_depth: int, seed_value: int, progress: bool = True) -> Refinement:
    """NUTS draws of the posterior of ``model`` (full data), preconditioned by the fitted ``guide``."""
    start = time.perf_counter()
    key_potential, key_guide, key_chain = jax.random.split(jax.random.PRNGKey(seed_value), 3)
    latent_dim = check_latent_dimension(model, cells, "nuts")  # before anything of size latent_dim^2
    potential, unravel, sites = full_data_potential(model, params, cells, key_potential)
    mean, tril = guide_whitening(guide, params, sites, key_guide, latent_dim)

    def whitened_potential(eps):
        return potential(mean + tril @ eps)

    mcmc = MCMC(NUTS(potential_fn=whitened_potential, max_tree_depth=max_tree_depth),
                num_warmup=num_warmup, num_samples=num_samples, progress_bar=progress)
    mcmc.run(key_chain, init_params=jnp.zeros(latent_dim), extra_fields=("diverging", "num_steps"))
    eps = mcmc.get_samples()
    extra = mcmc.get_extra_fields()
    latent = constrained_draws(mean + eps @ tril.T, unravel, sites)
    return Refinement(latent, int(np.sum(extra["diverging"])), float(np.mean(extra["num_steps"])),
                      time.perf_counter() - start, np.asarray(extra["diverging"]), np.asarray(extra["num_steps"]))


def whitened_hessian(whitened_potential, latent_dim: int, batch_size: int, progress: bool = True) -> jax.Array:
    """The Hessian of ``whitened_potential`` at 0, by Hessian-vector products (forward over
    reverse), ``batch_size`` directions vmapped at a time; symmetrized."""
    gradient = jax.grad(whitened_potential)
    origin = jnp.zeros(latent_dim)
    columns = jax.jit(jax.vmap(lambda direction: jax.jvp(gradient, (origin,), (direction,))[1]))
    eye = jnp.eye(latent_dim)
    blocks = []
    with tqdm(total=latent_dim, desc="Hessian", unit="dir", disable=not progress) as bar:
        for first in range(0, latent_dim, batch_size):  # batches only for the progress bar and memory
            blocks.append(columns(eye[first:first + batch_size]))
            bar.update(blocks[-1].shape[0])
    hessian = jnp.concatenate(blocks)
    return 0.5 * (hessian + hessian.T)


def centring_step(whitened_potential, gradient, eigenvalues, eigenvectors, bound,
                   max_halvings: int = 10, sufficient_decrease: float = 1e-4) -> tuple[jax.Array, float, float]:
    """A damped Newton step from the guide's mean toward the posterior's mode, along the
    eigenvectors whose curvature is positive and above its bound (the data-determined directions;
    along the funnels' flat or wrongly curved ones there is no mode to step to).

    The full step ``-H^-1 g`` there trusts the quadratic model too far (on a 20-gene fit it raised
    ``U`` by 8,000 nats), so it is halved until ``U`` falls by at least ``sufficient_decrease``
    times the model's predicted drop (Armijo backtracking). Returns the step, the fraction of the
    full step taken (0 when no fraction decreases ``U``) and the drop in ``U``.
    """
    whitened_potential = jax.jit(whitened_potential)
    curved = eigenvalues > bound
    if not bool(jnp.any(curved)):
        return jnp.zeros_like(gradient), 0.0, 0.0
    along = eigenvectors.T @ gradient
    newton = eigenvectors @ jnp.where(curved, -along / jnp.where(curved, eigenvalues, 1.0), 0.0)
    slope = float(gradient @ newton)  # < 0: a descent direction
    start = float(whitened_potential(jnp.zeros_like(gradient)))
    fraction = 1.0
    for _ in range(max_halvings + 1):  # a handful of potential evaluations
        drop = start - float(whitened_potential(fraction * newton))
        if drop >= -sufficient_decrease * fraction * slope and np.isfinite(drop):
            return fraction * newton, fraction, drop
        fraction *= 0.5
    return jnp.zeros_like(gradient), 0.0, 0.0


def laplace_scales(eigenvalues: jax.Array, curvature_floor) -> jax.Array:
    """Sd of the Laplace draws along each eigenvector of the whitened Hessian: ``1 / sqrt(|h|)``,
    at most ``1 / sqrt(curvature_floor)`` (a number, or one per eigenvector). The magnitude, since
    at the guide's mean, which is not a mode, the horseshoe's funnels can curve the wrong way."""
    return 1.0 / jnp.sqrt(jnp.maximum(jnp.abs(eigenvalues), curvature_floor))


def refine_with_laplace(model, guide, params: dict, cells, *, num_samples: int, curvature_floor: float,
                        hessian_batch: int, seed_value: int, progress: bool = True) -> LaplaceRefinement:
    """Draws from the Laplace approximation of the posterior of ``model`` (full data) at the fitted
    ``guide``'s mean, in the guide's whitened coordinates."""
    start = time.perf_counter()
    key_potential, key_guide, key_draws = jax.random.split(jax.random.PRNGKey(seed_value), 3)
    latent_dim = check_latent_dimension(model, cells, "laplace")
    potential, unravel, sites = full_data_potential(model, params, cells, key_potential)
    mean, tril = guide_whitening(guide, params, sites, key_guide, latent_dim)

    def whitened_potential(eps):
        return potential(mean + tril @ eps)

    gradient = jax.grad(whitened_potential)(jnp.zeros(latent_dim))
    hessian = whitened_hessian(whitened_potential, latent_dim, hessian_batch, progress)
    if not bool(jnp.all(jnp.isfinite(hessian))):
        raise FloatingPointError("the Hessian of the posterior at the guide's mean is not finite; "
                                 'refit, or use refine = "none" (the guide\'s posterior)')
    eigenvalues, eigenvectors = jnp.linalg.eigh(hessian)
    # The prior's curvature along each eigenvector: the draws are never wider than the prior there.
    prior, _, _ = full_data_potential(model, params, cells, key_potential, prior_only=True)
    prior_hessian = whitened_hessian(lambda eps: prior(mean + tril @ eps), latent_dim, hessian_batch, progress=False)
    prior_curvature = jnp.einsum("ij,ik,kj->j", eigenvectors, prior_hessian, eigenvectors)
    bound = jnp.maximum(prior_curvature, curvature_floor)
    centre, step_length, drop = centring_step(whitened_potential, gradient, eigenvalues, eigenvectors, bound)
    noise = jax.random.normal(key_draws, (num_samples, latent_dim))
    eps = centre + (noise * laplace_scales(eigenvalues, bound)) @ eigenvectors.T
    latent = constrained_draws(mean + eps @ tril.T, unravel, sites)
    return LaplaceRefinement(latent, np.asarray(eigenvalues), np.asarray(bound), float(jnp.linalg.norm(gradient)),
                             time.perf_counter() - start, step_length, drop)
