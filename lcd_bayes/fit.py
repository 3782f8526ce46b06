"""Stochastic variational inference for the LCD program: one jitted, scanned SVI step loop with
a schedule, minibatches, a progress bar, a convergence check, non-finite detection and
checkpoints that let an interrupted fit resume exactly where it stopped.
"""
from __future__ import annotations

import functools
import os
import pickle
import time
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from numpyro.handlers import block
from numpyro.infer import SVI, Trace_ELBO
from numpyro.optim import optax_to_numpyro
from tqdm.auto import tqdm

from .config import RunConfig
from .guides import global_variational_family
from .initialization import init_at, initial_values
from .model import CellBatch, Structure, lcd_model


class FitError(RuntimeError):
    """The fit cannot go on; the message says why and what to change."""


class FitResult(NamedTuple):
    params: dict  # variational parameters (numpy)
    losses: np.ndarray  # (steps,) negative ELBO per step
    converged: bool
    seconds: float  # wall time of the optimization, compilation included
    compile_seconds: float


class Inference(NamedTuple):
    """The SVI pieces for one data set: model and guide with the static structure bound."""

    svi: SVI
    model: callable
    guide: object  # over the global (drift, shift and noise) parameters; the cells are integrated out


def program(structure: Structure, config: RunConfig, *, minibatch: bool = True):
    """The model with the screen's structure bound: ``program(...)(cells)``. With ``minibatch``
    (SVI) it subsamples ``[fit] batch_size`` cells; without (the refining chain) it sees them all."""
    fit = config.fit
    batch_size = fit.batch_size if minibatch and fit.batch_size < structure.n_cells else None
    return functools.partial(lcd_model, structure=structure, config=config.model, batch_size=batch_size,
                             cell_particles=fit.cell_particles, encoder_hidden=fit.encoder_hidden)


def build_inference(structure: Structure, config: RunConfig, start: dict | None = None) -> Inference:
    """SVI for the program; the guide starts at the values in ``start`` (``initialization``) where given,
    at the prior median elsewhere."""
    fit = config.fit
    model = program(structure, config)
    # A Gaussian guide (row-block, mean-field or low-rank; see global_variational_family) over the
    # globals: the per-cell states are integrated out in the model, the summaries are deterministic.
    hidden_summaries = block(model, hide_fn=lambda site: site.get("type") == "deterministic")
    guide = global_variational_family(hidden_summaries, fit.resolved_guide(structure.n_genes), fit,
                                      init_loc_fn=init_at(start or {}))
    schedule = learning_rate_schedule(fit)
    optimizer = optax_to_numpyro(optax.chain(optax.clip_by_global_norm(fit.clip_norm), optax.adam(schedule)))
    svi = SVI(model, guide, optimizer, Trace_ELBO())
    return Inference(svi, model, guide)


def learning_rate_schedule(fit):
    """Warm up to ``learning_rate``, then cosine decay to ``final_lr_fraction`` of it at ``steps``."""
    return optax.warmup_cosine_decay_schedule(
        init_value=fit.learning_rate * 0.1, peak_value=fit.learning_rate,
        warmup_steps=min(fit.warmup_steps, fit.steps - 1), decay_steps=fit.steps,
        end_value=fit.learning_rate * fit.final_lr_fraction,
    )


def has_converged(losses: np.ndarray, window: int, tol: float) -> bool:
    """The ELBO has stopped improving: the median loss of the last ``window`` steps is lower than
    that of the window before by less than ``tol`` relative to its size. Medians, because a few
    stray draws can make single steps' losses jump by orders of magnitude."""
    if losses.size < 2 * window:
        return False
    previous, current = np.median(losses[-2 * window:-window]), np.median(losses[-window:])
    return bool(previous - current < tol * abs(current))


def stays_converged(losses: np.ndarray, fit) -> bool:
    """``has_converged`` held at each of the last chunk ends spanning a whole window: a single
    noisy pair of windows must not end the fit. Computed from the losses alone, so a resumed
    fit stops exactly where the uninterrupted one would."""
    patience = max(1, fit.convergence_window // fit.steps_per_chunk)
    ends = losses.size - fit.steps_per_chunk * np.arange(patience)
    return all(has_converged(losses[:end], fit.convergence_window, fit.convergence_tol) for end in ends)


def may_stop_early(losses: np.ndarray, fit) -> bool:
    """The fit may end before ``steps``: past ``min_steps``, the learning rate already annealed to
    ``convergence_lr_fraction`` of its peak, and the ELBO flat (``stays_converged``). A flat ELBO
    at a high learning rate is not enough: the guide's parameters still move by more than the
    posterior sds of well-determined effects. (A 20-gene Gaussian fit given 24000 steps stopped at
    step 9450, its loss 1140 nats above a 12000-step fit run to the end, effect |z| 1.49 vs 0.97.)"""
    if losses.size < fit.min_steps:
        return False
    annealed = float(learning_rate_schedule(fit)(losses.size)) <= fit.convergence_lr_fraction * fit.learning_rate
    return annealed and stays_converged(losses, fit)


class Checkpoint(NamedTuple):
    state: object  # SVIState with numpy leaves
    losses: np.ndarray
    fingerprint: str


def save_checkpoint(path: Path, state, losses: np.ndarray, fingerprint: str) -> None:
    """Write atomically, so an interruption during the write never corrupts the last checkpoint."""
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        pickle.dump(Checkpoint(jax.device_get(state), np.asarray(losses), fingerprint), f)
    os.replace(tmp, path)


def load_checkpoint(path: Path, fingerprint: str) -> Checkpoint | None:
    if not path.exists():
        return None
    with open(path, "rb") as f:
        checkpoint = pickle.load(f)
    if checkpoint.fingerprint != fingerprint:
        raise FitError(
            f"{path} belongs to a fit with other data or settings; resume it with the same command, "
            "or write this fit to a new --out folder (or delete the checkpoint)."
        )
    return checkpoint


def fit_svi(
    cells: CellBatch,
    structure: Structure,
    config: RunConfig,
    *,
    checkpoint_path: str | Path | None = None,
    fingerprint: str = "",
    progress: bool = True,
) -> tuple[FitResult, Inference]:
    """Run SVI until ``config.fit.steps`` or convergence.

    Steps run ``steps_per_chunk`` at a time inside one jitted ``lax.scan``; between chunks the
    loop updates the progress bar, checks convergence and non-finite losses, and checkpoints.
    """
    fit = config.fit
    # In random order, so that the model's minibatch windows are random subsets (model.cell_plate).
    order = np.random.default_rng(fit.seed).permutation(structure.n_cells)
    cells = CellBatch(*(jnp.asarray(np.asarray(a)[order]) for a in cells))
    inference = build_inference(structure, config, initial_values(cells, structure, config.model, fit.init))
    svi = inference.svi
    key = jax.random.PRNGKey(fit.seed)

    @jax.jit
    def run_chunk(state, cells):
        return jax.lax.scan(lambda s, _: svi.update(s, cells), state, None, length=fit.steps_per_chunk)

    checkpoint_path = Path(checkpoint_path) if checkpoint_path else None
    start = time.perf_counter()
    state = svi.init(key, cells)
    losses = np.zeros(0, dtype=np.float64)
    resumed = load_checkpoint(checkpoint_path, fingerprint) if checkpoint_path else None
    if resumed is not None:
        state = jax.tree_util.tree_map(jnp.asarray, resumed.state)
        losses = resumed.losses
    converged = False

    bar = tqdm(total=fit.steps, initial=losses.size, desc="SVI", unit="step", disable=not progress,
               dynamic_ncols=True)
    compile_seconds = 0.0
    try:
        while losses.size < fit.steps and not converged:
            chunk_start = time.perf_counter()
            new_state, chunk_losses = run_chunk(state, cells)
            chunk_losses = np.asarray(chunk_losses, dtype=np.float64)
            if compile_seconds == 0.0:
                compile_seconds = time.perf_counter() - chunk_start
            if not np.all(np.isfinite(chunk_losses)):
                bad = losses.size + int(np.argmin(np.isfinite(chunk_losses)))
                if checkpoint_path:
                    save_checkpoint(checkpoint_path, state, losses, fingerprint)
                raise FitError(
                    f"the ELBO became non-finite at step {bad}. Usual causes: a learning rate too high "
                    f"(now {fit.learning_rate}; set [fit] learning_rate lower in a --config TOML), counts "
                    "on a very different scale than the priors expect, or a gene with no counts. "
                    + (f"With the nonlinear drift also: a smaller [model] sim_dt (now {config.model.sim_dt}) for "
                       "stiff draws, or fewer genes. " if config.model.drift == "nonlinear" else "")
                    + (f"The last finite state is saved in {checkpoint_path}." if checkpoint_path else "")
                )
            state, losses = new_state, np.concatenate([losses, chunk_losses])
            bar.update(chunk_losses.size)
            bar.set_postfix(elbo=f"{-chunk_losses.mean():.4g}")
            if checkpoint_path and losses.size % fit.checkpoint_every < fit.steps_per_chunk:
                save_checkpoint(checkpoint_path, state, losses, fingerprint)
            converged = may_stop_early(losses, fit)
    except KeyboardInterrupt:
        if checkpoint_path:
            save_checkpoint(checkpoint_path, state, losses, fingerprint)
            bar.write(f"interrupted at step {losses.size}; run the same command again to resume.")
        raise
    finally:
        bar.close()
    params = jax.device_get(svi.get_params(state))
    result = FitResult(params, losses, converged, time.perf_counter() - start, compile_seconds)
    return result, inference
