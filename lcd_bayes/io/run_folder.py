"""Run folders: reading and writing what a fit leaves behind, and reading ``.h5ad`` input.

A run folder holds everything needed to inspect or reproduce a fit:

    config.toml      the model and fit settings used (``lcd-bayes fit --config`` reads it back)
    data.json        how the data were read: keys, labels, genes, conditions, targets
    elbo.csv         the ELBO at every step
    posterior.nc     ArviZ DataTree: posterior draws, constant data, the SVI trace (and, after a
                     NUTS refinement, its sample_stats)
    summary.txt      the fit's headline numbers
    ppc.csv, ppc.png the posterior predictive check (``analysis.ppc``; also posterior.nc's ``ppc`` group)
    checkpoint.npz   only while a fit is unfinished: resume by running the same command

Every file is written whole under a temporary name and renamed (``lcd_bayes.files``);
``posterior.nc`` is written last, so a folder without it holds an unfinished fit.

CLIPR adds ``clipr.nc`` and ``edges.csv`` (``analysis.clipr``), the report its figures (``pl``).
"""
from __future__ import annotations

import json
import tomllib
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import xarray as xr

from ..config import RunConfig, load_config
from ..diagnostics import DataError
from ..files import atomic_write, check_writable_folder, partial_name, write_text
from .screen import PerturbationData


def read_h5ad(path: str | Path) -> anndata.AnnData:
    """Read an ``.h5ad`` file, with a plain ``FileNotFoundError`` when there is none and a
    ``DataError`` saying what is expected when the path is not AnnData's HDF5 format."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file: {path}")
    expected = ("expected an .h5ad file, AnnData's HDF5 format as adata.write_h5ad(path) writes it (read other "
                "formats with scanpy, e.g. sc.read_10x_h5 or sc.read_csv, and write them with write_h5ad)")
    if path.is_dir():
        raise DataError(f"{path} is a folder; {expected}.")
    try:
        return anndata.read_h5ad(path)
    # Anything reading fails with: h5py's OSError "file signature not found" (not HDF5) or a truncated
    # file, anndata's KeyError or TypeError on HDF5 that is not AnnData (a 10x .h5, say).
    except Exception as error:
        reason = (str(error).strip().splitlines() or [""])[0]
        raise DataError(f"{path} could not be read ({type(error).__name__}: {reason}); {expected}.") from None


def data_record(data: PerturbationData) -> dict:
    """What ``data.json`` records of how the data were read (keys, labels, genes, conditions,
    targets, library sizes and, when there are batches, ``batch_key``, ``batches`` and
    ``cells_per_batch``; a run folder without them was fitted without batches)."""
    control = data.condition == 0
    record = {
        "perturbation_key": data.perturbation_key, "control": data.control, "sep": data.sep,
        "is_counts": data.is_counts, "genes": list(data.genes), "conditions": list(data.conditions),
        "perturbations": list(data.perturbations),
        "targets": {p: [g for g, t in zip(data.genes, row) if t] for p, row in zip(data.perturbations, data.targets)},
        "cells_per_condition": np.bincount(data.condition, minlength=data.n_conditions).tolist(),
        "mean_size_factor_log_sd": float(np.std(np.log(data.size_factor))) if data.is_counts else 0.0,
        # Predicted cells draw library sizes like the control cells': log-normal with these moments.
        "control_size_factor_log_mean": float(np.mean(np.log(data.size_factor[control]))) if data.is_counts else 0.0,
        "control_size_factor_log_sd": float(np.std(np.log(data.size_factor[control]))) if data.is_counts else 0.0,
    }
    if data.batches is not None:
        record.update(batch_key=data.batch_key, batches=list(data.batches),
                      cells_per_batch=np.bincount(data.batch, minlength=data.n_batches).tolist())
    return record


class IncompleteRunError(FileNotFoundError):
    """A run folder without a finished, readable fit; the message says how to finish or redo it."""


# ``posterior.nc`` is the last file a fit writes (renamed into place whole): a folder holding it
# holds a finished fit, and one without it an unfinished one, whatever else it holds.
FINISHED = "posterior.nc"
CHECKPOINT = "checkpoint.npz"


def check_out_folder(folder: Path) -> None:
    """Refuse, before any compute, an ``--out`` that cannot be written or already holds a finished
    fit (``UnwritableError``, ``FileExistsError``); writes nothing."""
    check_writable_folder(folder)
    if (folder / FINISHED).exists():
        raise FileExistsError(
            f"{folder} already holds a finished fit ({FINISHED}); write to a new --out folder "
            "or delete the old one"
        )


def start_run_folder(folder: Path, config: RunConfig, record: dict) -> None:
    """Create the run folder of a new (or resumed) fit and write ``config.toml`` and ``data.json``
    (``record``, from ``data_record``); refuses a folder that already holds a finished fit. An
    unfinished fit of other data or settings in the folder must have been refused (or discarded,
    ``discard_unfinished``) before: these files describe its checkpoint."""
    check_out_folder(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_text(folder / "config.toml", config.to_toml())
    write_text(folder / "data.json", json.dumps(record, indent=1))


def discard_unfinished(folder: Path) -> None:
    """Remove an unfinished fit's checkpoint and any file cut short by an interruption, so that a
    fit starts afresh in ``folder`` (``--restart``); the other files are rewritten by the fit."""
    for path in [folder / CHECKPOINT, *folder.glob("*.partial.*")]:
        path.unlink(missing_ok=True)


def changed_settings(folder: Path, config: RunConfig) -> list[str]:
    """The settings (``section.key``) in which ``config`` differs from the folder's ``config.toml``
    (every one, if that file is missing or unreadable)."""
    def flat(text: str) -> dict:
        return {f"{section}.{key}": value for section, values in tomllib.loads(text).items()
                for key, value in (values.items() if isinstance(values, dict) else [])}

    new = flat(config.to_toml())
    try:
        old = flat((folder / "config.toml").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return sorted(new)
    return sorted(key for key in new.keys() | old.keys() if new.get(key) != old.get(key))


def write_run(folder: Path, tree: xr.DataTree) -> None:
    """Write a finished fit into its folder, from its posterior ``tree`` alone: ``elbo.csv`` (the
    ``svi`` group's loss), ``summary.txt`` and, last, ``posterior.nc`` (the posterior's
    attributes), whose presence marks the run finished; then remove the checkpoint. Any other
    file of the run (the PPC's) is written before.

    The variational parameters are not kept: the draws in ``posterior.nc`` are the fit's result,
    and drawing more from the guide would need the data's model structure as well (the checkpoint
    keeps them only while a fit is unfinished).
    """
    losses = tree["svi"]["loss"].values if "svi" in tree.children else np.zeros(0)
    with atomic_write(folder / "elbo.csv") as tmp:
        pd.DataFrame({"step": np.arange(losses.size), "elbo": -losses}).to_csv(tmp, index=False)
    attrs = tree["posterior"].attrs
    compile_seconds = f" (compile {attrs['compile_seconds']:.1f})" if "compile_seconds" in attrs else ""
    final = f"{-np.nanmean(losses[-100:]):.6g}" if np.isfinite(losses[-100:]).any() else "n/a"
    write_text(folder / "summary.txt",
               f"steps: {losses.size}\nconverged: {bool(attrs.get('converged', False))}\n"
               f"seconds: {float(attrs.get('fit_seconds', float('nan'))):.1f}{compile_seconds}\n"
               f"final ELBO (mean of last 100 steps): {final}\n")
    save_datatree(tree, folder / FINISHED)
    (folder / CHECKPOINT).unlink(missing_ok=True)  # the fit is complete: posterior.nc supersedes it


def require_finished(folder: str | Path) -> str:
    """Raise ``IncompleteRunError`` (a ``FileNotFoundError``), saying what to do (resume the fit
    with the same command, or refit), unless ``folder`` holds a finished fit; returns that advice
    for a ``posterior.nc`` found unreadable later."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no such run folder: {folder}; create it with `lcd-bayes fit DATA --out {folder}`")
    resume = "resume it by running the same `lcd-bayes fit` command (or `lcd_bayes.fit(..., out=...)`) again"
    if (folder / CHECKPOINT).exists():
        todo = resume
    elif (folder / "config.toml").exists() and not (folder / FINISHED).exists():
        # A fit started here (config.toml is written first) and was stopped before its first checkpoint.
        todo = f"{resume}; it was stopped before its first checkpoint, so it starts afresh"
    else:
        todo = "refit (`lcd-bayes fit DATA --out NEW_FOLDER`, or `lcd_bayes.fit(adata)`)"
    if not (folder / FINISHED).exists():
        state = ("an interrupted write of posterior.nc" if partial_name(folder / FINISHED).exists()
                 else "no posterior.nc")
        raise IncompleteRunError(f"{folder} holds no finished fit ({state}): {todo}")
    missing = [name for name in ("config.toml", "data.json") if not (folder / name).exists()]
    if missing:
        raise IncompleteRunError(f"{folder} lacks {' and '.join(missing)}, written when a fit starts: {todo}")
    return todo


def load_run(folder: str | Path) -> tuple[xr.DataTree, RunConfig, dict]:
    """The posterior, configuration and data record of a finished run folder.

    Raises ``IncompleteRunError`` (a ``FileNotFoundError``) when the folder holds no complete
    ``posterior.nc``, with what to do: resume the fit with the same command, or refit.
    """
    folder = Path(folder)
    todo = require_finished(folder)
    tree = load_datatree(folder / FINISHED, todo=todo)
    if "posterior" not in tree.children:
        raise IncompleteRunError(f"{folder / FINISHED} has no posterior group: {todo}")
    return tree, load_config(folder / "config.toml"), json.loads((folder / "data.json").read_text(encoding="utf-8"))


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
    with atomic_write(path) as tmp:
        xr.DataTree.from_dict(groups).to_netcdf(tmp, engine="h5netcdf", encoding=encoding)


def load_datatree(path, todo: str = "write it again") -> xr.DataTree:
    """Read a saved posterior fully into memory (the file is closed afterwards), with the
    quantities ``save_datatree`` left out derived again. A file cut short or not netCDF (a copy
    cut short, a full disk, a write of an older version killed midway) raises
    ``IncompleteRunError``, saying ``todo``."""
    try:
        with xr.open_datatree(path, engine="h5netcdf") as tree:
            tree = tree.load()
    except FileNotFoundError:
        raise
    # h5py and h5netcdf fail on a truncated file in several ways, an AttributeError among them.
    except (OSError, ValueError, KeyError, AttributeError) as error:
        raise IncompleteRunError(f"{path} is incomplete or unreadable ({type(error).__name__}: {error}): "
                                 f"{todo}") from None
    return xr.DataTree.from_dict({node.path: with_derived_effects(node.to_dataset(inherit=False))
                                  for node in tree.subtree})
