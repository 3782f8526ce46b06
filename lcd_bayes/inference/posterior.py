"""Posterior draws of the global parameters as an ArviZ ``xarray.DataTree``.

Draws use ArviZ's sample dims ``(chain, draw)`` with one chain of independent variational draws,
so ``az.summary``, ``az.hdi`` and ``arviz_plots`` work as they are; ``az.extract(dt)`` stacks
them on a single ``sample`` dim. Writing and reading the tree (``posterior.nc``) is
``lcd_bayes.io.run_folder``'s.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import xarray as xr
from numpyro.handlers import seed, substitute, trace
from numpyro.infer import log_likelihood

from .. import __version__
from ..model.program import Structure, as_jax, drift_prior


class Coords(NamedTuple):
    genes: tuple[str, ...]
    conditions: tuple[str, ...]
    perturbations: tuple[str, ...]
    batches: tuple[str, ...] | None = None


# Posterior variables and their dims after (chain, draw).
VARIABLE_DIMS = {
    "interaction": ("source", "target"),  # direct effect of source on target: A[target, source]
    "relative_interaction": ("source", "target"),  # the same, per unit of the target's self-decay
    "drift": ("target", "source"),  # the drift matrix A itself
    "self_decay": ("gene",),
    "basal_drift": ("gene",),
    "shift": ("perturbation", "gene"),
    "stationary_mean": ("condition", "gene"),
    "stationary_sd": ("gene",),  # nonlinear drift: of the control condition
    "log_spectral_radius": (),  # nonlinear drift: worst condition's linearization at its fixed point
    # Nonlinear drift only (``drift = "nonlinear"``); there ``drift`` is the Jacobian at the
    # unperturbed fixed point and ``interaction`` its transpose without diagonal.
    "saturation": ("gene",),
    "input_offset": ("gene",),
    "condition_sd": ("condition", "gene"),  # sd of each condition's moment-matched law
    "fixed_point_residual": (),
    "n_diverged": (),
    "interaction_scale": (),
    # Partial pooling ([model] pool_decay / pool_concentration): the shared location and spread of
    # the per-gene log self-decays and log NB concentrations.
    "decay_location": (),
    "decay_spread": (),
    "concentration_location": (),
    "concentration_spread": (),
    "shift_mean": (),
    "shift_sd": (),
    "gene_scale": ("gene",),
    "concentration": ("gene",),
    "gate": ("gene",),
    "noise_sd": ("gene",),
    "library_sd": (),  # [model] library = "latent": spread of the cells' log library sizes
    # Batches ([data] batch_key): each batch's shift of the basal drift, the mean shift it causes
    # (-A^{-1} times it), its technical log gene scale (counts) or value offset (gaussian), and the
    # spreads they are drawn from.
    "batch_basal_drift": ("batch", "gene"),
    "batch_mean_shift": ("batch", "gene"),
    "batch_log_scale": ("batch", "gene"),
    "batch_offset": ("batch", "gene"),
    "batch_basal_sd": (),
    "batch_scale_sd": (),
}
# Sampled sites kept in the posterior as drawn (where the model has them).
_STORED_AS_DRAWN = ("gene_scale", "concentration", "gate", "noise_sd", "interaction_scale", "shift_mean", "shift_sd",
                    "decay_location", "decay_spread", "concentration_location", "concentration_spread", "library_sd",
                    "batch_basal_sd", "batch_scale_sd")
# Sampled gene by gene, (genes, batches); stored as (batch, gene).
_BATCH_TECHNICAL = ("batch_log_scale", "batch_offset")


def draw_globals(guide, params: dict, structure: Structure, model_config, *, num_samples: int,
                 seed_value: int = 0, chunk_size: int = 64) -> dict[str, np.ndarray]:
    """Sample the variational posterior and compute every derived quantity per draw.

    Derived quantities (drift, stationary law) come from replaying ``drift_prior`` on each draw,
    chunked with ``lax.map`` so memory stays bounded for many genes. For the nonlinear drift the
    replay runs its particle simulation (one fixed noise key for all draws) and stores, besides the
    common variables, ``saturation``, ``input_offset``, ``condition_sd`` and diagnostics; nothing
    of size draws x conditions x genes x genes.
    """
    latent = sample_guide(guide, params, num_samples=num_samples, seed_value=seed_value)
    return derive_globals(latent, structure, model_config, chunk_size=chunk_size)


def sample_guide(guide, params: dict, *, num_samples: int, seed_value: int = 0) -> dict:
    """``num_samples`` draws of the latent sites from the fitted guide, ``(draws, ...)`` each."""
    return guide.sample_posterior(jax.random.PRNGKey(seed_value), params, sample_shape=(num_samples,))


def derive_globals(latent: dict, structure: Structure, model_config, *, chunk_size: int = 64) -> dict[str, np.ndarray]:
    """``draw_globals`` for given draws of the latent sites (the guide's, or a refining chain's)."""
    latent = {name: jnp.asarray(value) for name, value in latent.items()}
    off_diagonal = 1.0 - jnp.eye(structure.n_genes)

    def derived(draw):
        model = substitute(seed(drift_prior, 0), data=draw)
        sites = trace(model).get_trace(structure, model_config)
        drift = sites["drift"]["value"]
        out = {
            "drift": drift,
            "interaction": drift.T * off_diagonal,
            "relative_interaction": sites["relative_interaction"]["value"].T,
            "self_decay": -jnp.diag(drift),
            "basal_drift": sites["basal_drift"]["value"],
            "shift": sites["shift"]["value"],
            "stationary_mean": sites["stationary_mean"]["value"],
            "stationary_sd": jnp.sqrt(jnp.diagonal(sites["stationary_covariance"]["value"], axis1=-2, axis2=-1)),
            "log_spectral_radius": sites["log_spectral_radius"]["value"],
        }
        if nonlinear:
            covariances = sites["stationary_covariance"]["value"]  # (conditions, genes, genes)
            condition_sd = jnp.sqrt(jnp.diagonal(covariances, axis1=-2, axis2=-1))
            out.update(saturation=draw["saturation"], input_offset=draw["input_offset"], condition_sd=condition_sd,
                       stationary_sd=condition_sd[0],  # condition 0 is the control
                       fixed_point_residual=sites["fixed_point_residual"]["value"],
                       n_diverged=sites["n_diverged"]["value"])
        out.update({name: draw[name] for name in _STORED_AS_DRAWN if name in draw})
        out.update({name: draw[name].T for name in _BATCH_TECHNICAL if name in draw})
        if "batch_mean_shift" in sites:
            out.update(batch_basal_drift=sites["batch_basal_drift"]["value"],
                       batch_mean_shift=sites["batch_mean_shift"]["value"])
        return out

    nonlinear = getattr(model_config, "drift", "linear") == "nonlinear"
    if nonlinear:  # each draw holds a particle ensemble per condition while it is replayed
        chunk_size = min(chunk_size, 4)
    draws = jax.lax.map(derived, latent, batch_size=chunk_size)
    return {name: np.asarray(value) for name, value in draws.items()}


def pointwise_log_likelihood(model, params: dict, latent: dict, cells) -> np.ndarray:
    """``log p(y_i | globals_s)`` of every cell ``i`` under every draw ``s``: (draws, cells).

    ``model`` is the full-data program (no minibatches), ``params`` the fit's (the cell
    encoder's), ``latent`` the draws of the latent sites. The cells' states are integrated out as
    in training: in closed form for Gaussian data, by the importance-weighted estimate over
    ``cell_particles`` proposals for counts (a slight underestimate, consistent as they grow).
    Draws are evaluated one at a time, so memory is one draw's cells x particles x genes.
    """
    conditioned = substitute(model, data=jax.tree_util.tree_map(jnp.asarray, params))
    cells = as_jax(cells)
    return np.asarray(log_likelihood(conditioned, latent, cells)["y"])


def to_datatree(draws: dict[str, np.ndarray], coords: Coords, *, losses: np.ndarray | None = None,
                attrs: dict | None = None, constant_data: dict | None = None,
                guide_draws: dict[str, np.ndarray] | None = None,
                cell_log_likelihood: np.ndarray | None = None) -> xr.DataTree:
    """Build the DataTree: ``posterior`` (chain, draw, ...), ``constant_data``, ``svi`` and, when
    given, ``guide_posterior``: the guide's own draws beside refined ones (``lcd_bayes.run``),
    and ``log_likelihood``: ``y`` (chain, draw, cell), each cell's log-likelihood under each
    posterior draw (``pointwise_log_likelihood``), which ``arviz.loo`` reads."""
    coord_values = {
        "gene": list(coords.genes), "source": list(coords.genes), "target": list(coords.genes),
        "perturbation": list(coords.perturbations), "condition": list(coords.conditions),
        "batch": list(coords.batches or ()),
    }
    posterior = _draws_dataset(draws, coord_values, {"inference_library": "numpyro", "inference": "SVI",
                                                     "lcd_bayes_version": __version__, **(attrs or {})})
    groups = {"posterior": posterior}
    if guide_draws is not None:
        groups["guide_posterior"] = _draws_dataset(guide_draws, coord_values, {"inference": "SVI"})
    if constant_data:
        groups["constant_data"] = xr.Dataset(
            {k: (dims, np.asarray(v)) for k, (dims, v) in constant_data.items()},
            coords={d: coord_values[d] for d in ("gene", "perturbation", "condition")},
        )
    if cell_log_likelihood is not None:
        values = np.asarray(cell_log_likelihood)[None]
        groups["log_likelihood"] = xr.Dataset(
            {"y": (("chain", "draw", "cell"), values)},
            coords={"chain": [0], "draw": np.arange(values.shape[1]), "cell": np.arange(values.shape[2])})
    if losses is not None:
        groups["svi"] = xr.Dataset({"loss": (("step",), np.asarray(losses))},
                                   coords={"step": np.arange(len(losses))})
    return xr.DataTree.from_dict(groups)


def _draws_dataset(draws: dict[str, np.ndarray], coord_values: dict, attrs: dict) -> xr.Dataset:
    """Draws ``(draw, ...)`` of one chain as a Dataset with dims ``(chain, draw, ...)``."""
    variables = {name: (("chain", "draw") + VARIABLE_DIMS[name], np.asarray(value)[None])
                 for name, value in draws.items()}
    used_dims = {d for name in draws for d in VARIABLE_DIMS[name]}
    n_draws = next(iter(draws.values())).shape[0]
    return xr.Dataset(variables, attrs=attrs,
                      coords={"chain": [0], "draw": np.arange(n_draws), **{d: coord_values[d] for d in used_dims}})


def stacked_draws(array: xr.DataArray) -> np.ndarray:
    """Posterior draws ``(chain, draw, ...)`` stacked to ``(chain * draw, ...)``, float32, for the
    vmapped computations on draws (CLIPR, prediction)."""
    array = array.transpose("chain", "draw", ...)
    return np.asarray(array.values, np.float32).reshape(-1, *array.shape[2:])
