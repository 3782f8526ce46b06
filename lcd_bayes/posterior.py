"""Posterior draws of the global parameters as an ArviZ ``xarray.DataTree``.

Draws use ArviZ's sample dims ``(chain, draw)`` with one chain of independent variational draws,
so ``az.summary``, ``az.hdi`` and ``arviz_plots`` work as they are; ``az.extract(dt)`` stacks
them on a single ``sample`` dim.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import xarray as xr
from numpyro.handlers import seed, substitute, trace

from . import __version__
from .model import Structure, drift_prior


class Coords(NamedTuple):
    genes: tuple[str, ...]
    conditions: tuple[str, ...]
    perturbations: tuple[str, ...]


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
}
# Sampled sites kept in the posterior as drawn (where the model has them).
_STORED_AS_DRAWN = ("gene_scale", "concentration", "gate", "noise_sd", "interaction_scale", "shift_mean", "shift_sd",
                    "decay_location", "decay_spread", "concentration_location", "concentration_spread")


def draw_globals(guide, params: dict, structure: Structure, model_config, *, num_samples: int,
                 seed_value: int = 0, chunk_size: int = 64) -> dict[str, np.ndarray]:
    """Sample the variational posterior and compute every derived quantity per draw.

    Derived quantities (drift, stationary law) come from replaying ``drift_prior`` on each draw,
    chunked with ``lax.map`` so memory stays bounded for many genes. For the nonlinear drift the
    replay runs its particle simulation (one fixed noise key for all draws) and stores, besides the
    common variables, ``saturation``, ``input_offset``, ``condition_sd`` and diagnostics; nothing
    of size draws x conditions x genes x genes.
    """
    latent = guide.sample_posterior(jax.random.PRNGKey(seed_value), params, sample_shape=(num_samples,))
    return derive_globals(latent, structure, model_config, chunk_size=chunk_size)


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
        return out

    nonlinear = getattr(model_config, "drift", "linear") == "nonlinear"
    if nonlinear:  # each draw holds a particle ensemble per condition while it is replayed
        chunk_size = min(chunk_size, 4)
    draws = jax.lax.map(derived, latent, batch_size=chunk_size)
    return {name: np.asarray(value) for name, value in draws.items()}


def to_datatree(draws: dict[str, np.ndarray], coords: Coords, *, losses: np.ndarray | None = None,
                attrs: dict | None = None, constant_data: dict | None = None,
                guide_draws: dict[str, np.ndarray] | None = None) -> xr.DataTree:
    """Build the DataTree: ``posterior`` (chain, draw, ...), ``constant_data``, ``svi`` and, when
    given, ``guide_posterior``: the guide's own draws beside refined ones (``lcd_bayes.run``)."""
    coord_values = {
        "gene": list(coords.genes), "source": list(coords.genes), "target": list(coords.genes),
        "perturbation": list(coords.perturbations), "condition": list(coords.conditions),
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


# Stored once: ``interaction`` is ``drift`` transposed without its diagonal, and for the linear
# drift ``relative_interaction`` is ``drift`` per unit of the target's self-decay; ``save_datatree``
# leaves them out (three (draws, genes, genes) arrays of 2 GB each at 1,000 genes and 500 draws)
# and ``load_datatree`` derives them again. A nonlinear run stores its R, which is a parameter
# there, not a function of the Jacobian in ``drift``.
DERIVED_ON_READ = ("interaction", "relative_interaction")


def _is_linear(group: xr.Dataset) -> bool:
    return "saturation" not in group


def with_derived_effects(group: xr.Dataset) -> xr.Dataset:
    """A posterior group with ``interaction`` (and, linear drift, ``relative_interaction``)
    derived from ``drift`` where they are missing."""
    if "drift" not in group:
        return group
    drift = group["drift"]  # (chain, draw, target, source): A[k, j] is the effect of j on k
    off_diagonal = xr.DataArray(1.0 - np.eye(drift.sizes["target"], dtype=drift.dtype), dims=("target", "source"))
    derived = {}
    if "interaction" not in group:
        derived["interaction"] = (drift * off_diagonal).transpose("chain", "draw", "source", "target")
    if "relative_interaction" not in group and _is_linear(group):
        decay = -xr.DataArray(np.diagonal(drift.values, axis1=-2, axis2=-1), dims=("chain", "draw", "target"))
        derived["relative_interaction"] = (drift / decay * off_diagonal).transpose("chain", "draw", "source", "target")
    return group.assign({name: value.astype(drift.dtype) for name, value in derived.items()})


def save_datatree(tree: xr.DataTree, path) -> None:
    """Write ``tree`` to netCDF: posterior draws as float32, compressed, each (genes, genes)
    quantity once (``DERIVED_ON_READ``); written to a temporary name and renamed, so that an
    interrupted write never leaves a file that looks finished."""
    path = Path(path)
    groups, encoding = {}, {}
    for node in tree.subtree:
        dataset = node.to_dataset(inherit=False)
        if "drift" in dataset:
            dataset = dataset.drop_vars([name for name in DERIVED_ON_READ
                                         if name in dataset and (name == "interaction" or _is_linear(dataset))])
            dataset = dataset.map(lambda v: v.astype(np.float32) if v.dtype == np.float64 else v, keep_attrs=True)
        groups[node.path] = dataset
        encoding[node.path] = {name: {"zlib": True, "complevel": 4} for name in dataset.data_vars
                               if dataset[name].ndim > 0}
    tmp = path.with_name(path.name + ".partial")
    xr.DataTree.from_dict(groups).to_netcdf(tmp, engine="h5netcdf", encoding=encoding)
    os.replace(tmp, path)


def load_datatree(path) -> xr.DataTree:
    """Read a saved posterior fully into memory (the file is closed afterwards), with the
    quantities ``save_datatree`` left out derived again."""
    with xr.open_datatree(path, engine="h5netcdf") as tree:
        tree = tree.load()
    return xr.DataTree.from_dict({node.path: with_derived_effects(node.to_dataset(inherit=False))
                                  for node in tree.subtree})
