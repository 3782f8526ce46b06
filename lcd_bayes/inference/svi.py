"""Stochastic variational inference for the LCD program: one jitted, scanned SVI step loop with
a schedule, minibatches, a progress bar, a convergence check, non-finite detection and
checkpoints that let an interrupted fit resume exactly where it stopped.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import time
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from numpyro.handlers import block
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from numpyro.infer import SVI, Trace_ELBO
from numpyro.optim import optax_to_numpyro
from tqdm.auto import tqdm

from ..config import RunConfig
from ..diagnostics import FitError
from ..files import atomic_write, pause_point
from ..model.program import CellBatch, Structure, lcd_model
from .guides import global_variational_family
from .initialization import init_at, initial_values


class FitResult(NamedTuple):
    params: dict  # variational parameters (numpy)
    losses: np.ndarray  # (steps,) negative ELBO per step
    converged: bool  # the annealed posterior stopped moving before the step budget was spent
    seconds: float  # wall time of the optimization, initialization and compilation included, over every session
    init_seconds: float  # numpyro's initialization of the guide
    compile_seconds: float  # the first chunk: compilation and its steps
    movements: tuple  # median movement of the guide's locations per convergence window (posterior sds)
    skipped_steps: int = 0  # steps whose loss or gradient was not finite, skipped (their loss is kept as is)


class Inference(NamedTuple):
    """The SVI pieces for one data set: model and guide with the static structure bound."""

    svi: SVI
    model: callable
    guide: object  # over the global (drift, shift and noise) parameters; the cells are integrated out


MAX_CONSECUTIVE_NONFINITE = 20  # skipped steps ending a chunk before the fit is given up
# Above this fraction of skipped (non-finite) steps the fit warns: the guide then reaches
# regions where the program overflows often enough to bias the fit.
MAX_SKIPPED_FRACTION = 0.01
CELL_AXIS = "cells"  # the mesh axis the cells are sharded over in data-parallel SVI
INIT_CELLS = 64  # cells traced by numpyro's initialization of the guide


def program(structure: Structure, config: RunConfig, *, minibatch: bool = True, devices: int = 1):
    """The model with the screen's structure bound: ``program(...)(cells)``. With ``minibatch``
    (SVI) it subsamples ``[fit] batch_size`` cells, split evenly over ``devices``; without (the
    refinements) it sees them all. An automatic (0) ``batch_size`` is resolved for the screen."""
    fit = config.fit.resolved(config.model.likelihood, structure.n_cells)
    batch_size = -(-fit.batch_size // devices) if minibatch and fit.batch_size < structure.n_cells else None
    return functools.partial(lcd_model, structure=structure, config=config.model, batch_size=batch_size,
                             cell_particles=fit.cell_particles, encoder_hidden=fit.encoder_hidden)


class OrderedELBO(Trace_ELBO):
    """``Trace_ELBO`` with the sites' terms summed in the order of their names. numpyro (0.22)
    sums them over a ``set`` of the names, whose order follows Python's per-process string hash:
    two runs with the same seed recorded losses a float32 rounding apart (54 of 200 steps of a
    4-gene fit), though the gradients, and so the parameters, were the same bit for bit."""

    def __init__(self):
        super().__init__(sum_sites=False)

    def loss_with_mutable_state(self, *args, **kwargs):
        result = super().loss_with_mutable_state(*args, **kwargs)
        terms = result["loss"]  # the negative ELBO of each site
        return {**result, "loss": sum((terms[name] for name in sorted(terms)), start=jnp.zeros(()))}


class DataParallelELBO(OrderedELBO):
    """``OrderedELBO`` averaged over the devices of ``axis_name`` inside ``jax.shard_map``: each
    device estimates the whole ELBO from the same draw of the globals and its own minibatch (the
    cells plate scales its shard to every cell; ``model.program.cell_key``), and the mean of these
    is the estimate from all devices' cells. The guide's parameters are replicated, so
    differentiating the mean sums the devices' gradients."""

    def __init__(self, axis_name: str):
        super().__init__()
        self.axis_name = axis_name

    def loss_with_mutable_state(self, *args, **kwargs):
        result = super().loss_with_mutable_state(*args, **kwargs)
        return {**result, "loss": jax.lax.pmean(result["loss"], self.axis_name)}


def cell_mesh(fit) -> Mesh | None:
    """The devices the cells are sharded over (``[fit] devices``; 0: every device of JAX's default
    backend, on every host once ``jax.distributed.initialize()`` has run); None for one device."""
    devices = jax.devices()
    if fit.devices > len(devices):
        raise FitError(f"[fit] devices = {fit.devices}, but JAX sees {len(devices)} ({devices[0].platform}); "
                       "set it to at most that, or 0 for all of them.")
    devices = devices[: fit.devices or len(devices)]
    return Mesh(np.asarray(devices), (CELL_AXIS,)) if len(devices) > 1 else None


def build_inference(structure: Structure, config: RunConfig, start: dict | None = None, *,
                    devices: int = 1) -> Inference:
    """SVI for the program; the guide starts at the values in ``start`` (``initialization``) where given,
    at the prior median elsewhere. With several ``devices`` the ELBO is ``DataParallelELBO``."""
    fit = config.fit
    model = program(structure, config, devices=devices)
    # A Gaussian guide (row-block, mean-field or low-rank; see global_variational_family) over the
    # globals: the per-cell states are integrated out in the model, the summaries are deterministic.
    hidden_summaries = block(model, hide_fn=lambda site: site.get("type") == "deterministic")
    guide = global_variational_family(hidden_summaries, fit.resolved_guide(structure.n_genes), fit,
                                      init_loc_fn=init_at(start or {}))
    # The learning rate is a hyperparameter of the optimizer's state, set before every step
    # (``with_learning_rate``), because when the decay starts is decided during the fit.
    optimizer = optax_to_numpyro(optax.chain(optax.clip_by_global_norm(fit.clip_norm),
                                             optax.inject_hyperparams(optax.adam)(learning_rate=fit.learning_rate)))
    svi = SVI(model, guide, optimizer, DataParallelELBO(CELL_AXIS) if devices > 1 else OrderedELBO())
    return Inference(svi, model, guide)


def learning_rate(fit, step):
    """Warm up from a tenth of ``learning_rate`` over ``warmup_steps``, then a cosine down to
    ``final_lr_fraction`` of it at ``steps``. Works on numbers and traced arrays alike."""
    return optax.warmup_cosine_decay_schedule(
        init_value=fit.learning_rate * 0.1, peak_value=fit.learning_rate,
        warmup_steps=min(fit.warmup_steps, fit.steps - 1), decay_steps=fit.steps,
        end_value=fit.learning_rate * fit.final_lr_fraction,
    )(step)


def with_learning_rate(state, rate):
    """The SVI state with the optimizer's learning rate set to ``rate``."""
    step, optax_state = state.optim_state
    optax_state = optax.tree_utils.tree_set(optax_state, learning_rate=jnp.asarray(rate, jnp.float32))
    return state._replace(optim_state=(step, optax_state))


def guide_locations(raw_params: dict) -> dict:
    """The guide's location parameters (unconstrained, as optimized) by name."""
    return {name: value for name, value in raw_params.items() if name.endswith("_loc")}


def guide_scales(params: dict) -> dict:
    """The guide's marginal sd of every location parameter, by the location's name, from the
    constrained parameters of a mean-field (``*_scale``), row-block (``*_scale_tril``) or
    low-rank (``*_cov_factor`` and ``*_scale``) guide."""
    scales = {}
    for name in guide_locations(params):
        base = name[: -len("_loc")]
        if f"{base}_scale_tril" in params:
            scales[name] = np.sqrt(np.sum(np.square(params[f"{base}_scale_tril"]), axis=-1))
        elif f"{base}_cov_factor" in params:
            scales[name] = np.sqrt(np.sum(np.square(params[f"{base}_cov_factor"]), axis=-1)
                                   + np.square(params[f"{base}_scale"]))
        else:
            scales[name] = np.asarray(params[f"{base}_scale"])
    return scales


def posterior_movement(previous: dict, current: dict, scales: dict) -> np.ndarray:
    """``|current - previous| / sd`` of every location parameter, flattened, in posterior sds."""
    return np.concatenate([np.ravel(np.abs(current[name] - previous[name]) / scales[name]) for name in current])


def has_settled(movement: np.ndarray, fit) -> bool:
    """The posterior means stopped moving over the last window: by less than ``convergence_tol``
    posterior sds at the median and ``10 * convergence_tol`` at the 90th percentile (a few weakly
    determined parameters, such as the local scales of absent edges in the horseshoe's funnels,
    drift on long after the effects have settled)."""
    return bool(np.median(movement) < fit.convergence_tol and np.quantile(movement, 0.9) < 10 * fit.convergence_tol)


class Progress(NamedTuple):
    """What the convergence check has seen so far (kept in checkpoints, so that a resumed fit
    stops exactly where the uninterrupted one would)."""

    window_start: dict | None = None  # the guide's mean locations over the chunk that opened this window
    movements: tuple = ()  # median movement per window, in posterior sds
    settled: bool = False

    def after_chunk(self, fit, step: int, chunk_mean: dict, scales) -> "Progress":
        """At the end of each window of ``convergence_window`` steps, compare the guide's
        locations (averaged over a chunk) with those at the window's start. The fit may stop once
        the learning rate has annealed to ``convergence_lr_fraction`` of its peak, past
        ``min_steps``: at a higher rate Adam's iterates jitter by a good part of a posterior sd
        (measured on 15-gene screens: the window means moved 0.2 sds per 250 steps at the peak,
        0.05 at the end), and stopping before the anneal ends cost calibration (docs/inference.md).
        ``scales()`` gives the guide's current sds."""
        if self.window_start is not None and step % fit.convergence_window >= fit.steps_per_chunk:
            return self
        if self.window_start is None:
            return self._replace(window_start=chunk_mean)
        movement = posterior_movement(self.window_start, chunk_mean, scales())
        annealed = float(learning_rate(fit, step)) <= fit.convergence_lr_fraction * fit.learning_rate
        settled = step >= fit.min_steps and annealed and has_settled(movement, fit)
        return Progress(chunk_mean, self.movements + (float(np.median(movement)),), settled)


class Checkpoint(NamedTuple):
    state: object  # SVIState with numpy leaves
    losses: np.ndarray
    fingerprint: str
    progress: Progress
    seconds: float  # the fit's time before this session


def save_checkpoint(path: Path, state, losses: np.ndarray, fingerprint: str, progress: Progress,
                    seconds: float = 0.0) -> None:
    """Write the fit's state as plain arrays (``numpy.savez``: no pickle, so loading a checkpoint
    runs no code), atomically, so an interruption during the write never corrupts the last one.
    The state's leaves are stored in order; ``load_checkpoint`` puts them back into the structure
    of a freshly initialized state. ``seconds``: the fit's time so far, over every session."""
    arrays = {f"state_{i}": np.asarray(leaf) for i, leaf in enumerate(jax.tree_util.tree_leaves(jax.device_get(state)))}
    arrays |= {f"window_{name}": np.asarray(value) for name, value in (progress.window_start or {}).items()}
    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, losses=np.asarray(losses), fingerprint=np.asarray(fingerprint),
                 movements=np.asarray(progress.movements, dtype=np.float64), settled=np.asarray(progress.settled),
                 has_window=np.asarray(progress.window_start is not None), seconds=np.asarray(seconds), **arrays)


def checkpoint_fingerprint(path: Path) -> str | None:
    """The fingerprint of the checkpoint at ``path`` (None if there is none), read without its state."""
    if not path.exists():
        return None
    with np.load(path, allow_pickle=False) as stored:
        return str(stored["fingerprint"])


def load_checkpoint(path: Path, fingerprint: str, template) -> Checkpoint | None:
    """The checkpoint at ``path``, its state in the structure of ``template`` (the state of the
    same fit, freshly initialized); None if there is none."""
    if not path.exists():
        return None
    with np.load(path, allow_pickle=False) as stored:
        if str(stored["fingerprint"]) != fingerprint:
            raise FitError(
                f"{path} belongs to a fit with other data or settings; resume it with the same command, "
                "start this fit afresh in its place with --restart, or write it to a new --out folder."
            )
        leaves, treedef = jax.tree_util.tree_flatten(template)
        stored_leaves = [stored[f"state_{i}"] for i in range(len(leaves))]
        if any(np.shape(a) != np.shape(b) for a, b in zip(stored_leaves, leaves)):
            raise FitError(f"{path} does not match this fit's parameters; delete it to start afresh")
        window = {name[len("window_"):]: stored[name] for name in stored.files if name.startswith("window_")}
        progress = Progress(window if bool(stored["has_window"]) else None, tuple(stored["movements"].tolist()),
                            bool(stored["settled"]))
        seconds = float(stored["seconds"]) if "seconds" in stored.files else 0.0
        return Checkpoint(jax.tree_util.tree_unflatten(treedef, stored_leaves), stored["losses"], fingerprint,
                          progress, seconds)


def fit_svi(
    cells: CellBatch,
    structure: Structure,
    config: RunConfig,
    *,
    checkpoint_path: str | Path | None = None,
    fingerprint: str = "",
    progress: bool = True,
) -> tuple[FitResult, Inference]:
    """Run SVI for ``config.fit.steps``, or until the annealed posterior stops moving.

    Steps run ``steps_per_chunk`` at a time inside one jitted ``lax.scan``, which also averages
    the guide's locations over the chunk; between chunks the loop updates the progress bar,
    checks convergence (``Progress``) and non-finite losses, and checkpoints.
    """
    config = config.replace(fit=dataclasses.asdict(config.fit.resolved(config.model.likelihood, structure.n_cells)))
    fit = config.fit
    mesh = cell_mesh(fit)
    devices = 1 if mesh is None else mesh.size
    # In random order, so that the model's minibatch windows are random subsets (model.cell_plate);
    # with several devices, a multiple of their number (up to devices - 1 shuffled cells left out).
    order = np.random.default_rng(fit.seed).permutation(structure.n_cells)
    order = order[: structure.n_cells - structure.n_cells % devices]
    if cells.batch is None:  # one array layout for the jitted step, batches or not
        cells = cells._replace(batch=np.zeros(structure.n_cells, np.int32))
    host_cells = CellBatch(*(np.asarray(a)[order] for a in cells))
    structure = structure._replace(n_cells=order.size)
    inference = build_inference(structure, config, initial_values(host_cells, structure, config.model, fit.init),
                                devices=devices)
    svi = inference.svi
    key = jax.random.PRNGKey(fit.seed)

    def locations(state):
        return guide_locations(svi.optim.get_params(state.optim_state))

    def one_step(state, cells, step):
        state = with_learning_rate(state, learning_rate(fit, step))
        # Sharded, the model learns its device's axis at the call (svi.init traces it unsharded).
        new, loss = svi.update(state, cells) if mesh is None else svi.update(state, cells, cell_axis=CELL_AXIS)
        # A step with a non-finite loss or parameters is skipped, the state kept: a rare draw of the
        # globals deep in the guide's tail can overflow float32 somewhere in the stationary law or
        # the cells' bound (one draw in 300 did, 2,450 steps into a 100-gene fit of a real CRISPRi
        # screen), and one such step would end the fit. A select, not a wrapped optimizer
        # (optax.apply_if_finite changed Adam's rounding, hence every trajectory).
        finite = jnp.isfinite(loss) & jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in
                                                          jax.tree_util.tree_leaves(svi.get_params(new))]))
        kept = jax.tree_util.tree_map(lambda updated, old: jnp.where(finite, updated, old), new, state)
        # A skipped step's loss is recorded as non-finite, whichever of the two was: that is how
        # steps are counted as skipped, and a fit whose every step is skipped stops.
        return kept._replace(rng_key=new.rng_key), jnp.where(finite, loss, jnp.nan)  # the next step draws afresh

    def chunk(state, cells, first_step):
        def scanned(carry, step):
            state, location_sum = carry
            state, loss = one_step(state, cells, step)
            return (state, jax.tree_util.tree_map(jnp.add, location_sum, locations(state))), loss

        zeros = jax.tree_util.tree_map(jnp.zeros_like, locations(state))
        steps = first_step + jnp.arange(fit.steps_per_chunk)
        (state, location_sum), losses = jax.lax.scan(scanned, (state, zeros), steps)
        return state, losses, jax.tree_util.tree_map(lambda total: total / fit.steps_per_chunk, location_sum)

    if mesh is None:
        cells = CellBatch(*(jnp.asarray(a) for a in host_cells))
    else:  # cells sharded over the devices, everything else replicated
        sharding = NamedSharding(mesh, P(CELL_AXIS))
        cells = CellBatch(*(jax.make_array_from_callback(a.shape, sharding, lambda index, a=a: a[index])
                            for a in host_cells))
        chunk = jax.shard_map(chunk, mesh=mesh, in_specs=(P(), CellBatch(*(P(CELL_AXIS),) * len(CellBatch._fields)), P()),
                              out_specs=P())
    run_chunk = jax.jit(chunk)

    checkpoint_path = Path(checkpoint_path) if checkpoint_path else None
    start = time.perf_counter()
    # The guide's parameters have the globals' shapes and their start is given (``initial_values``),
    # so a few cells suffice for numpyro's initialization, which runs the model op by op (a minute
    # with every cell at 1,000 genes).
    state = svi.init(key, CellBatch(*(a[:INIT_CELLS] for a in host_cells)))
    init_seconds = time.perf_counter() - start
    losses, progress_record, earlier_seconds = np.zeros(0, dtype=np.float64), Progress(), 0.0
    resumed = load_checkpoint(checkpoint_path, fingerprint, state) if checkpoint_path else None
    if resumed is not None:
        state = jax.tree_util.tree_map(jnp.asarray, resumed.state)
        losses, progress_record, earlier_seconds = resumed.losses, resumed.progress, resumed.seconds

    def checkpoint() -> int:
        save_checkpoint(checkpoint_path, state, losses, fingerprint, progress_record,
                        earlier_seconds + time.perf_counter() - start)
        return losses.size

    saved_steps = -1 if resumed is None else resumed.losses.size

    bar = tqdm(total=fit.steps, initial=losses.size, desc="SVI", unit="step", disable=not progress,
               dynamic_ncols=True)
    compile_seconds = 0.0
    try:
        while losses.size < fit.steps and not progress_record.settled:
            chunk_start = time.perf_counter()
            new_state, chunk_losses, chunk_mean = run_chunk(state, cells, losses.size)
            chunk_losses = np.asarray(chunk_losses, dtype=np.float64)
            if compile_seconds == 0.0:
                compile_seconds = time.perf_counter() - chunk_start
            if not np.any(np.isfinite(chunk_losses[-MAX_CONSECUTIVE_NONFINITE:])):
                bad = losses.size + int(np.argmin(np.isfinite(chunk_losses)))
                if checkpoint_path:
                    checkpoint()
                raise FitError(
                    f"the ELBO became non-finite at step {bad} and stayed so for at least {MAX_CONSECUTIVE_NONFINITE} "
                    "steps. Usual causes: a learning rate too high "
                    f"(now {fit.learning_rate}; set [fit] learning_rate lower in a --config TOML), counts "
                    "on a very different scale than the priors expect, or a gene with no counts. "
                    + (f"With the nonlinear drift also: a smaller [model] sim_dt (now {config.model.sim_dt}) for "
                       "stiff draws, or fewer genes. " if config.model.drift == "nonlinear" else "")
                    + (f"The last finite state is saved in {checkpoint_path}; with other settings, start "
                       "afresh with --restart (`fit(..., restart=True)`)." if checkpoint_path else "")
                )
            state, losses = new_state, np.concatenate([losses, chunk_losses])
            progress_record = progress_record.after_chunk(
                fit, losses.size, jax.device_get(chunk_mean),
                lambda: guide_scales(jax.device_get(svi.get_params(state))))
            bar.update(chunk_losses.size)
            bar.set_postfix(elbo=f"{-np.nanmean(chunk_losses):.4g}")
            if checkpoint_path and losses.size % fit.checkpoint_every < fit.steps_per_chunk:
                saved_steps = checkpoint()
            pause_point(f"svi step {losses.size}")
    except KeyboardInterrupt:
        if checkpoint_path:
            checkpoint()
            bar.write(f"interrupted at step {losses.size}; run the same command again to resume.")
        raise
    finally:
        bar.close()
    if checkpoint_path and saved_steps != losses.size:
        # Whatever follows (a refinement, the posterior's draws and check) starts from here when
        # it is interrupted: the fit itself is never lost.
        checkpoint()
    result = FitResult(jax.device_get(svi.get_params(state)), losses, progress_record.settled,
                       earlier_seconds + time.perf_counter() - start, init_seconds, compile_seconds,
                       progress_record.movements, int(np.sum(~np.isfinite(losses))))
    return result, inference
