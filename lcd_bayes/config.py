"""Model and fit configuration: immutable records read from TOML files; the shipped ones
(``lcd_linear``, ``lcd_nonlinear``) are package data in ``lcd_bayes/configs/``, found by name.

Every user-facing choice lives here so that a run folder's ``config.toml`` reproduces the fit.
"""
from __future__ import annotations

import dataclasses
import math
import operator
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable, NamedTuple

LIKELIHOODS = ("nb", "zip", "poisson", "gaussian")
LINKS = ("softplus", "exp")
# Where each cell's library size comes from (ModelConfig.library).
LIBRARIES = ("auto", "observed", "latent")
# "auto" integrates the library sizes out ("latent") when the size factors are the totals of at
# most this many genes: a small panel's totals move with the perturbations and with each cell's
# own state, and dividing by them cost most of the edge ranking on screens the fit did not draw
# (analyses/RESULTS.md, "Library sizes of a small panel"). Totals over a whole transcriptome, or
# library sizes given in an obs column, are kept as observed.
LATENT_LIBRARY_MAX_GENES = 200
# Schemes of the linear drift's stationary law (lcd_bayes.dynamics.stationary).
SCHEMES = ("euler", "trapezoidal")
GUIDES = ("auto", "row_block", "mean_field", "low_rank")
REFINEMENTS = ("auto", "none", "laplace", "nuts")
INITS = ("data", "prior")  # where SVI starts (lcd_bayes.inference.initialization)
# "auto" takes the row-block guide up to this many genes and the mean-field guide beyond: its
# blocks have ~2d + 5 entries each, so its parameters grow as 2 d^3. A 100-gene NB fit ran its
# 6000 steps finite once the guide's log q and the horseshoe's shrunk scale were made stable in
# float32 (before, it went non-finite at step 133, then 695); larger panels are untested.
ROW_BLOCK_MAX_GENES = 100
# The auto batch takes every cell with the Gaussian likelihood (whose cells cost one triangular
# solve each) up to this many.
GAUSSIAN_FULL_BATCH = 16384
DRIFTS = ("linear", "nonlinear")
# How n_top_genes ranks the genes after the targets (lcd_bayes.io.genes). "response" by default:
# the drift's effects are identified by how genes answer the perturbations, and predictions are
# scored on the genes that respond (top-DE Pearson delta); the most variable genes of a screen
# are often variable in the control cells too (cell cycle, stress, ribosomal genes) without
# answering any perturbation. "variance" and "dispersion" (scanpy's seurat flavour) are the
# highly-variable-gene choices of other perturbation models.
GENE_RANKINGS = ("response", "variance", "dispersion")
DEFAULT_GENE_RANKING = "response"
# Methods of lcd_bayes.analysis.baselines (here, so that the CLI's help lists them without anndata).
BASELINES = ("no_change", "additive", "linear")
NOISE_KINDS = ("gaussian", "rademacher")  # increments of the particle simulation


class Rule(NamedTuple):
    """What one ``[model]`` or ``[fit]`` setting may hold: its type, and the values allowed (a
    test, and the words that say it in the message when the test fails)."""

    kind: type  # bool, int, float or str; a float setting takes an integer too (TOML "1" for 1.0)
    allowed: Callable[[Any], bool]
    says: str


def _choice(options: tuple[str, ...]) -> Rule:
    return Rule(str, options.__contains__, f"one of {options}")


def _integer(minimum: int, says: str | None = None) -> Rule:
    return Rule(int, lambda value: value >= minimum,
                says or ("a positive integer" if minimum == 1 else f"an integer >= {minimum}"))


def _number(low: float, high: float = math.inf, *, low_open: bool = True, high_open: bool = False) -> Rule:
    """A finite number in an interval (``high = inf``: unbounded above)."""
    if high == math.inf:
        says = "a positive number" if (low, low_open) == (0, True) else f"a number >= {low:g}"
    else:
        says = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    return Rule(float, lambda value: math.isfinite(value) and (low < value if low_open else low <= value)
                and (value < high if high_open else value <= high), says)


_FLAG = Rule(bool, lambda value: True, "true or false")
_POSITIVE = _number(0)
_FRACTION = _number(0, 1)

# Every [model] and [fit] setting, checked when a configuration is made (from a TOML file, a dict,
# or ``RunConfig.replace``): a value of the wrong type or out of range is refused before any data
# are read, naming the section and key; where one setting constrains another (the nonlinear
# drift's simulation), ``__post_init__`` checks that after these.
MODEL_RULES: dict[str, Rule] = {
    "likelihood": _choice(LIKELIHOODS), "link": _choice(LINKS), "library": _choice(LIBRARIES),
    "library_sd_scale": _POSITIVE, "dt": _number(0, 1, high_open=True),
    "scheme": _choice(SCHEMES), "n_doublings": _integer(1), "sigma": _POSITIVE,
    "max_spectral_radius": _number(0, 1, high_open=True), "stability_penalty": _number(0, low_open=False),
    "interaction_global_scale": _POSITIVE, "interaction_slab_scale": _POSITIVE, "interaction_slab_df": _POSITIVE,
    "decay_prior_median": _POSITIVE, "decay_prior_log_sd": _POSITIVE,
    "pool_decay": _FLAG, "decay_spread_scale": _POSITIVE, "pool_concentration": _FLAG,
    "concentration_spread_scale": _POSITIVE, "basal_scale": _POSITIVE, "shift_mean_scale": _POSITIVE,
    "shift_sd_scale": _POSITIVE, "off_target": _choice(("untargeted", "all")), "off_target_scale": _POSITIVE,
    "unknown_target_scale": _POSITIVE, "off_target_slab_scale": _POSITIVE, "drift": _choice(DRIFTS),
    "saturation_prior_median": _POSITIVE, "saturation_prior_log_sd": _POSITIVE, "input_offset_scale": _POSITIVE,
    "sim_dt": _POSITIVE, "sim_burn_in": _integer(0), "sim_steps": _integer(1), "sim_thin": _integer(1),
    "sim_particles": _integer(2), "sim_noise": _choice(NOISE_KINDS), "lna_doublings": _integer(1),
    "batch_scale_scale": _POSITIVE, "batch_basal_scale": _POSITIVE,
}
FIT_RULES: dict[str, Rule] = {
    "steps": _integer(0, "an integer >= 0 (0: automatic)"), "learning_rate": _POSITIVE,
    "warmup_steps": _integer(0), "final_lr_fraction": _FRACTION, "clip_norm": _POSITIVE,
    "batch_size": _integer(0, "an integer >= 0 (0: automatic)"), "guide": _choice(GUIDES),
    "guide_rank": _integer(1), "init_scale": _POSITIVE, "init": _choice(INITS), "encoder_hidden": _integer(1),
    "cell_particles": _integer(1), "steps_per_chunk": _integer(1),
    "devices": _integer(0, "0 (all) or a positive number of devices"),
    "convergence_window": _integer(1), "convergence_tol": _POSITIVE, "convergence_lr_fraction": _FRACTION,
    "min_steps": _integer(0), "checkpoint_every": _integer(1),
    # One draw has no spread: every interval and sd of the posterior needs at least two.
    "num_posterior_samples": _integer(2, "an integer >= 2"),
    "log_likelihood": _FLAG, "ppc": _FLAG, "refine": _choice(REFINEMENTS), "refine_warmup": _integer(1),
    "refine_max_tree_depth": _integer(1), "refine_curvature_floor": _FRACTION, "refine_hessian_batch": _integer(1),
    "seed": _integer(0),
}
# Said after a rule's message where the fix is not obvious from the key alone.
_HINTS = {
    ("model", "drift"): " (set [model] drift in the config TOML; the shipped config lcd_nonlinear selects the "
                        "nonlinear drift)",
}


def check_settings(section: str, settings, rules: dict[str, Rule]) -> None:
    """Check every field of the frozen dataclass ``settings`` against ``rules``; store numbers as
    plain Python ``int`` and ``float`` (a numpy integer, or TOML's ``1`` for a float setting), so
    that ``to_toml`` writes them back as TOML."""
    for name, rule in rules.items():
        value = getattr(settings, name)
        if rule.kind is bool:
            ok = isinstance(value, bool)
        elif rule.kind is str:
            ok = isinstance(value, str)
        elif isinstance(value, (bool, str)):  # True is an int to Python, not a number to a user
            ok = False
        else:
            try:  # an int setting refuses 2.0 (operator.index): TOML wrote it as a float on purpose
                value = operator.index(value) if rule.kind is int else float(value)
                ok = True
            except (TypeError, ValueError):
                ok = False
        if not ok or not rule.allowed(value):
            raise ValueError(f"[{section}] {name} must be {rule.says}, got {getattr(settings, name)!r}"
                             + _HINTS.get((section, name), ""))
        object.__setattr__(settings, name, value)


class SimulationSettings(NamedTuple):
    """How long, how fine and how many particles; hashable, so it can be a static argument.

    The settings of ``lcd_bayes.dynamics.particles.simulate_stationary``; kept here, beside the
    configuration that builds them (``ModelConfig.simulation_settings``), so that the
    configuration does not import the numerics.

    Trade-offs (``lambda`` the slowest relaxation rate of the drift, ``tau ~ 1 / lambda``):

    * ``dt`` — bias and stability against cost. Euler–Maruyama's stationary law is that of the
      continuous SDE only up to ``O(dt)`` (for a linear drift
      ``dynamics.stationary.stationary_law`` gives the discrete one exactly), and the chain
      diverges once ``dt`` exceeds ``2 / |eigenvalue|`` of the drift's Jacobian. Cost per
      simulated time unit is ``1 / dt``.
    * ``n_burn_in`` — bias from the start. The distance to stationarity decays like
      ``exp(-lambda dt n_burn_in)`` for the mean and faster for the covariance (from a common
      start the spread grows like ``1 - exp(-2 lambda t)``); ``dt n_burn_in`` should be many
      ``tau`` (10 tau: bias ~ 5e-5 of the initial offset). Starting at a fixed point (``x0``)
      removes most of the mean's transient. Cost is linear and paid by every particle.
    * ``n_sample`` and ``n_particles`` — Monte Carlo noise. The standard error of a mean is about
      ``sd sqrt(2 tau / (dt n_sample)) / sqrt(n_particles)`` (once ``dt n_sample >> tau``), and of
      a covariance entry relative to its scale similarly. Particles are independent chains, so
      more particles cut noise without autocorrelation but each pays the burn-in; a longer window
      amortizes the burn-in but its states are correlated.
    * ``thin`` — records every ``thin``-th state into the moment sums (an ``O(P d^2)``
      outer-product update per record, against ``O(P d^2)`` per step for a dense drift). States
      closer than ~``tau / 2`` apart add little information; thinning more than that discards it.
      It does not change memory. ``n_sample`` must be a multiple of ``thin`` with at least 4
      records (two per half of the window for the stationarity check).
    * ``sigma`` — noise scale of the SDE (a model parameter, not a numerical knob).
    * ``noise`` — ``"gaussian"`` (default) or ``"rademacher"`` (random signs, 32 per random
      word). For a linear drift both give exactly the same stationary mean and covariance (only
      the first two moments of the increment enter); for a nonlinear one the difference is of the
      same weak order ``O(dt)`` as Euler–Maruyama's own bias (simplified weak Euler scheme).
      On CPU Gaussian draws dominate the step cost; signs are several times cheaper.
    * ``checkpoint_segment`` — iterations per ``jax.checkpoint`` segment of the two loops;
      0 (default) means ~``sqrt(n)`` (a divisor of ``n`` near it when there is one), which
      minimizes backward memory. Forward-only runs are
      unaffected.
    """

    dt: float = 0.01
    n_burn_in: int = 2000
    n_sample: int = 2000
    thin: int = 20
    n_particles: int = 256
    sigma: float = 1.0
    noise: str = "gaussian"
    checkpoint_segment: int = 0

    @property
    def n_recorded(self) -> int:
        """Recorded states per particle, ``n_sample / thin``."""
        return self.n_sample // self.thin

    def validate(self) -> "SimulationSettings":
        """Raise ``ValueError`` on settings that cannot run; return ``self``."""
        if not self.dt > 0:
            raise ValueError(f"dt must be positive, got {self.dt}")
        if self.n_burn_in < 0:
            raise ValueError(f"n_burn_in must be >= 0, got {self.n_burn_in}")
        if self.thin < 1 or self.n_sample % self.thin:
            raise ValueError(
                f"n_sample ({self.n_sample}) must be a positive multiple of thin ({self.thin})")
        if self.n_recorded < 4:
            raise ValueError(
                f"need at least 4 recorded states (n_sample / thin), got {self.n_recorded}")
        if self.n_particles < 2:
            raise ValueError(f"need at least 2 particles per condition, got {self.n_particles}")
        if self.noise not in NOISE_KINDS:
            raise ValueError(f"noise must be one of {NOISE_KINDS}, got {self.noise!r}")
        if self.checkpoint_segment < 0:
            raise ValueError(f"checkpoint_segment must be >= 0, got {self.checkpoint_segment}")
        return self



@dataclass(frozen=True)
class ModelConfig:
    """The generative program's choices and prior scales (docs/model.md)."""

    likelihood: str = "nb"
    # Counts are s_i link(x) u_g. "exp": x is log expression, its scale fixed by the data (a latent
    # move of 1 is an e-fold change), which only moves against the gene scale u_g. "softplus" is
    # nearly linear for large x, where x -> k x, u -> u / k leaves the counts unchanged: on real
    # Norman et al. 2019 counts (100 genes) the fit slid along that ridge to self-decays of 0.015
    # and explained the perturbations as noise (top-20 mean-shift correlation of the training
    # singles 0.13, a non-finite ELBO at step 266); with "exp" it reproduced them (0.87).
    link: str = "exp"
    # Each cell's library size s_i. "observed": the size factors as read (an obs column given with
    # size_factor_key / total_counts_key, or the cells' totals over every gene of the matrix).
    # "latent": log s_i ~ Normal(0, library_sd), library_sd ~ HalfNormal(library_sd_scale),
    # integrated out with the cell's state (model.program.lcd_model); the totals only start its
    # proposal. "auto": latent when the size factors are the totals of at most
    # LATENT_LIBRARY_MAX_GENES genes (a small panel), observed otherwise (resolved_library).
    library: str = "auto"
    library_sd_scale: float = 0.5  # real droplet libraries vary by a log-sd of ~0.3-0.7
    dt: float = 0.01  # step of the discretized SDE
    # Linear drift: "trapezoidal" (Crank–Nicolson) chains have the SDE's own stationary law for any
    # dt (dynamics/stationary.py); "euler" (Euler–Maruyama) ones have variances 1 / (1 - dt D / 2)
    # too large, which biased the self-decay by ~1 posterior sd at d = 20 (and by far more for fast
    # genes; D > 2 / dt has no Euler stationary state at all). The nonlinear drift's particle
    # simulation and its LNA stay Euler with sim_dt.
    scheme: str = "trapezoidal"
    n_doublings: int = 16  # Smith doublings: the stationary law after 2**n_doublings steps
    sigma: float = 1.0  # diffusion scale; fixes the time scale of the drift
    max_spectral_radius: float = 0.9999  # of the step matrix F; draws beyond are projected back and penalized
    stability_penalty: float = 10.0
    # Regularized horseshoe on off-diagonal drift entries, relative to the target's self-decay.
    interaction_global_scale: float = 0.1
    interaction_slab_scale: float = 1.0
    interaction_slab_df: float = 4.0
    # Self-decay exp(kappa), kappa ~ Normal(log(decay_prior_median), decay_prior_log_sd).
    decay_prior_median: float = 2.0
    decay_prior_log_sd: float = 1.5
    # Partial pooling of the per-gene self-decays and NB concentrations: kappa_g ~ Normal(m, s) with
    # m ~ Normal(log(decay_prior_median), decay_prior_log_sd) and s ~ HalfNormal(decay_spread_scale)
    # (the same for log concentration around 10 with log-sd 1.5). Under counts, a gene's latent
    # variance (1 / 2D) and its count overdispersion explain the same spread, so each alone is
    # weakly identified; pooled, the NB d = 20 effect slope went 1.24 -> 1.04 (3 seeds,
    # docs/model.md).
    # Off by default: at d = 100 (NB) the pooled self-decays ran off together (median 480, effects
    # 77x the truth, AUROC of prob_edge 0.70), where the importance-weighted bound favours a small
    # latent variance.
    pool_decay: bool = False
    decay_spread_scale: float = 1.0
    pool_concentration: bool = False
    concentration_spread_scale: float = 1.0
    # Basal drift and shifts are also relative to the self-decay, i.e. in units of latent x.
    basal_scale: float = 3.0
    # On-target shifts: hierarchical Normal(shift_mean, shift_sd) so unseen targets get a shift law.
    shift_mean_scale: float = 3.0
    shift_sd_scale: float = 3.0
    # Sparse off-target shifts (horseshoe). "untargeted": only labels with no modelled target get
    # them (their whole effect is unknown); "all": every label. Off-target shifts on every label
    # can explain any mean response without gene-gene effects, so "all" weakens causal recovery.
    off_target: str = "untargeted"
    off_target_scale: float = 0.05  # horseshoe global scale for labels with a modelled target
    unknown_target_scale: float = 1.0  # ... and for labels without one
    off_target_slab_scale: float = 3.0
    # Drift family: "linear" (A x + b + c, exact Gaussian stationary law) or "nonlinear"
    # (D (-x + s tanh(R x / s + h)) + b + c, stationary law by simulation;
    # lcd_bayes.dynamics.nonlinear).
    drift: str = "linear"
    # Nonlinear drift only. Saturation s per gene in latent units, LogNormal(log median, log_sd):
    # regulation moves a gene by at most s; s -> infinity is the linear drift.
    saturation_prior_median: float = 1.0
    saturation_prior_log_sd: float = 1.5
    input_offset_scale: float = 1.0  # h ~ Normal(0, scale): each gene's control point on its tanh
    # Particle simulation of the stationary law (lcd_bayes.dynamics.particles), per SVI step:
    # particles start from each condition's linear-noise approximation (LNA), so a short burn-in
    # suffices.
    sim_dt: float = 0.02  # Euler–Maruyama step of the nonlinear chain (and of its LNA)
    sim_burn_in: int = 50  # steps before recording
    sim_steps: int = 100  # recorded window, a multiple of sim_thin
    sim_thin: int = 10
    sim_particles: int = 16  # per condition
    sim_noise: str = "rademacher"  # gaussian | rademacher increments (same first two moments)
    lna_doublings: int = 12  # Smith doublings of each condition's LNA covariance: 2**12 sim_dt steps
    # Batches ([data] batch_key; linear drift): per batch and gene, a log gene scale (counts; an
    # offset of the values for the gaussian likelihood) ~ Normal(0, s), s ~ HalfNormal(batch_scale_scale),
    # and a shift of the relative basal drift ~ Normal(0, s'), s' ~ HalfNormal(batch_basal_scale).
    # 0.5: lanes and replicates of one screen differ by tens of percent in a gene's expression.
    batch_scale_scale: float = 0.5
    batch_basal_scale: float = 0.5

    def __post_init__(self):
        check_settings("model", self, MODEL_RULES)
        if self.drift == "nonlinear":
            try:  # SimulationSettings.validate raises on settings that cannot run together
                self.simulation_settings()
            except ValueError as error:
                raise ValueError(f"[model] sim_steps and sim_thin (the simulation's n_sample and thin): "
                                 f"{error}") from None

    def resolved_library(self, library_genes: int | None) -> str:
        """``library`` made concrete for size factors that are the totals of ``library_genes``
        genes (None: read from an obs column); "observed" for continuous data, which has none."""
        if self.likelihood == "gaussian":
            return "observed"
        if self.library != "auto":
            return self.library
        small_panel = library_genes is not None and library_genes <= LATENT_LIBRARY_MAX_GENES
        return "latent" if small_panel else "observed"

    def simulation_settings(self, particles: int | None = None):
        """The particle simulation of the nonlinear drift's stationary law, as configured."""
        return SimulationSettings(
            dt=self.sim_dt, n_burn_in=self.sim_burn_in, n_sample=self.sim_steps, thin=self.sim_thin,
            n_particles=particles or self.sim_particles, sigma=self.sigma, noise=self.sim_noise,
        ).validate()


@dataclass(frozen=True)
class FitConfig:
    """SVI settings: optimizer, schedule, minibatches, guide, convergence and checkpoints."""

    # 0 (auto, ``resolved``): with the Gaussian likelihood every cell is in each step (up to
    # GAUSSIAN_FULL_BATCH) and 2000 steps suffice; with counts, minibatches of 1024 cells and 6000
    # steps. Measured on 20-gene screens (3 seeds): Gaussian full-batch 2000 steps covered the true
    # edges 46% / 91% (50% / 90% intervals) as 1024-cell minibatches for 6000 steps did (47% /
    # 91%); NB counts needed the 6000 steps either way (full-batch 2000: 33% / 65%).
    steps: int = 0  # maximum SVI steps
    learning_rate: float = 0.05
    warmup_steps: int = 100
    final_lr_fraction: float = 0.05
    clip_norm: float = 100.0
    batch_size: int = 0  # cells per minibatch; the whole data set when smaller
    # auto | row_block | mean_field | low_rank (see inference.guides.global_variational_family)
    guide: str = "auto"
    guide_rank: int = 10  # for the low-rank guide
    init_scale: float = 0.05
    # "data": the guide starts at the basal drift and on-target shifts the condition means show
    # (lcd_bayes.inference.initialization); "prior": those at their prior median (every shift 0).
    init: str = "data"
    encoder_hidden: int = 64  # width of the cell encoder (the pseudo-observation of conditional_proposal)
    # Importance draws per cell for its marginal likelihood (model.program.lcd_model).
    cell_particles: int = 16
    steps_per_chunk: int = 50  # steps fused into one jitted lax.scan between progress updates
    devices: int = 0  # devices the cells are sharded over in SVI (data parallel); 0: all JAX sees
    # The fit stops before `steps` once the learning rate has annealed to convergence_lr_fraction
    # of its peak and the guide's locations (averaged over a chunk) move, over a window of
    # convergence_window steps, by less than convergence_tol posterior sds (median; 10x that at
    # the 90th percentile), past min_steps (lcd_bayes.inference.svi.Progress).
    convergence_window: int = 250
    convergence_tol: float = 0.05
    convergence_lr_fraction: float = 0.1
    min_steps: int = 1000
    checkpoint_every: int = 500
    num_posterior_samples: int = 500
    # Each cell's log-likelihood under each posterior draw, the DataTree's log_likelihood group
    # (arviz.loo reads it); one full pass over the cells per draw after the fit.
    log_likelihood: bool = True
    # After the fit, predict every training condition from the posterior and compare it with its
    # cells (lcd_bayes.analysis.ppc; warns when the fit does not reproduce them): the run folder's
    # ppc.csv and ppc.png. Seconds at 20 genes; false skips it (the tests' many tiny fits).
    ppc: bool = True
    # After SVI (lcd_bayes.inference.refine), in the coordinates the guide whitens: "laplace"
    # replaces the guide's draws by the Gaussian with the posterior's curvature near the guide's
    # mean (one Hessian-vector product per latent dimension); "nuts" by a NUTS chain (minutes per 20
    # genes, Gaussian; hours for counts on a CPU); "none" keeps the guide's, whose intervals are too
    # narrow. "auto": "laplace" up to refine.MAX_LATENT_DIM latent dimensions (~40 genes), "none"
    # beyond, with a warning.
    refine: str = "auto"
    refine_warmup: int = 300  # NUTS adaptation steps; the chain then keeps num_posterior_samples draws
    refine_max_tree_depth: int = 8
    # Laplace: along an eigen-direction of curvature h (whitened) the draws take sd
    # 1 / sqrt(max(|h|, c)), c the larger of the prior's curvature there and this floor: never wider
    # than the prior, nor than 1 / sqrt(floor) = 10x the guide; their centre is a damped Newton step
    # from the guide's mean along the directions with h > c (lcd_bayes.inference.refine). Then the
    # number of directions per vmapped Hessian batch (memory).
    refine_curvature_floor: float = 0.01
    refine_hessian_batch: int = 16
    seed: int = 0

    def resolved(self, likelihood: str, n_cells: int) -> "FitConfig":
        """``steps`` and ``batch_size`` made concrete for a screen of ``n_cells`` cells where they
        are 0 (auto; see their comment)."""
        full_batch = likelihood == "gaussian" and n_cells <= GAUSSIAN_FULL_BATCH
        batch_size = self.batch_size or (max(n_cells, 1) if full_batch else 1024)
        steps = self.steps or (2000 if likelihood == "gaussian" and batch_size >= n_cells else 6000)
        return dataclasses.replace(self, steps=steps, batch_size=batch_size)

    def resolved_guide(self, n_genes: int) -> str:
        """The guide actually used for ``n_genes`` genes (``auto`` resolved)."""
        if self.guide != "auto":
            return self.guide
        return "row_block" if n_genes <= ROW_BLOCK_MAX_GENES else "mean_field"

    def __post_init__(self):
        check_settings("fit", self, FIT_RULES)


@dataclass(frozen=True)
class DataConfig:
    """How the screen was read from AnnData (``lcd_bayes.io.screen.load_perturbation_data``), so
    that a run's ``config.toml`` repeats the fit from the same file; ``fit``'s arguments override it.

    ``None`` (absent from the TOML, which has no null) means "not given": the reader's default.
    ``genes`` and ``predict_targets`` are stored as tuples and ``targets`` as
    ``((label, (gene, ...)), ...)`` so that the configuration stays hashable; ``target_map()``
    gives the ``{label: [gene, ...]}`` dict. ``gene_ranking`` and ``predict_targets`` shape the
    ``n_top_genes`` panel (``lcd_bayes.io.genes``).
    """

    perturbation_key: str = "condition"
    control: str = "ctrl"
    sep: str = "+"
    layer: str | None = None
    size_factor_key: str | None = None
    total_counts_key: str | None = None
    batch_key: str | None = None  # obs column of each cell's batch (lane, replicate, donor)
    n_top_genes: int | None = None
    gene_ranking: str = DEFAULT_GENE_RANKING
    predict_targets: tuple[str, ...] | None = None  # labels of conditions to predict: their targets first
    genes: tuple[str, ...] | None = None
    targets: tuple[tuple[str, tuple[str, ...]], ...] | None = None

    def __post_init__(self):
        for name in ("perturbation_key", "control", "sep"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"[data] {name} must be a non-empty string, got {getattr(self, name)!r}")
        for name in ("layer", "size_factor_key", "total_counts_key", "batch_key"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise ValueError(f"[data] {name} must be an obs/layer name (a string), got {getattr(self, name)!r}")
        if self.n_top_genes is not None:
            try:  # numpy integers too, but neither floats nor bools
                count = operator.index(self.n_top_genes) if not isinstance(self.n_top_genes, bool) else 0
            except TypeError:
                count = 0
            if count < 1:
                raise ValueError(f"[data] n_top_genes must be a positive integer, got {self.n_top_genes!r}")
            object.__setattr__(self, "n_top_genes", count)
        if self.gene_ranking not in GENE_RANKINGS:
            raise ValueError(f"[data] gene_ranking must be one of {GENE_RANKINGS}, got {self.gene_ranking!r}")
        if self.predict_targets is not None:
            labels = self.predict_targets.split(",") if isinstance(self.predict_targets, str) else self.predict_targets
            if not isinstance(labels, (list, tuple)) or not all(isinstance(label, str) for label in labels):
                raise ValueError('[data] predict_targets must be a list of condition labels, e.g. ["A+B", "C"], '
                                 f"got {self.predict_targets!r}")
            object.__setattr__(self, "predict_targets", tuple(label.strip() for label in labels if label.strip()))
        if self.genes is not None:
            if isinstance(self.genes, str) or not all(isinstance(g, str) for g in self.genes):
                raise ValueError(f'[data] genes must be a list of gene names, e.g. ["GATA1", "KLF1"], got {self.genes!r}')
            object.__setattr__(self, "genes", tuple(self.genes))
        if self.targets is not None:
            pairs = self.targets.items() if isinstance(self.targets, dict) else self.targets
            try:
                normalized = tuple((str(label), (genes,) if isinstance(genes, str) else tuple(genes))
                                   for label, genes in pairs)
            except (TypeError, ValueError):
                raise ValueError('[data] targets must map perturbation labels to lists of target genes, e.g. '
                                 f'{{"sgMYC_1" = ["MYC"]}}, got {self.targets!r}') from None
            if not all(isinstance(g, str) for _, genes in normalized for g in genes):
                raise ValueError(f"[data] targets must name genes by strings, got {self.targets!r}")
            object.__setattr__(self, "targets", normalized)

    def target_map(self) -> dict[str, list[str]] | None:
        """``targets`` as ``{label: [gene, ...]}``, or None when not given."""
        return None if self.targets is None else {label: list(genes) for label, genes in self.targets}

    def to_dict(self) -> dict:
        """The settings given (None left out), lists and dicts as a TOML or JSON file holds them."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        values["genes"] = None if self.genes is None else list(self.genes)
        values["predict_targets"] = None if self.predict_targets is None else list(self.predict_targets)
        values["targets"] = self.target_map()
        return {name: value for name, value in values.items() if value is not None}


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    fit: FitConfig = field(default_factory=FitConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def replace(self, **sections) -> "RunConfig":
        """Override fields: ``cfg.replace(model={"likelihood": "gaussian"}, fit={"steps": 10})``;
        ``None`` values leave a field as it is."""
        new = self
        for name, values in sections.items():
            values = {k: v for k, v in (values or {}).items() if v is not None}
            if values:
                new = dataclasses.replace(new, **{name: dataclasses.replace(getattr(new, name), **values)})
        return new

    def to_dict(self) -> dict:
        return {"model": dataclasses.asdict(self.model), "fit": dataclasses.asdict(self.fit),
                "data": self.data.to_dict()}

    def to_toml(self) -> str:
        lines = []
        for section, values in self.to_dict().items():
            lines.append(f"[{section}]")
            lines += [f"{_toml_key(key)} = {_toml_value(value)}" for key, value in values.items()]
            lines.append("")
        return "\n".join(lines)

    @classmethod
    def from_dict(cls, raw: dict, source: str | None = None) -> "RunConfig":
        """The configuration a TOML document (as a dict) describes; every value is checked here
        (``MODEL_RULES``, ``FIT_RULES``, ``DataConfig``). ``source`` (e.g. ``"config file
        run/config.toml"``) starts every error message, so that it names the file as well as the key."""
        try:
            return cls._from_dict(raw)
        except ValueError as error:
            if source is None:
                raise
            raise ValueError(f"{source}: {error}") from None

    @classmethod
    def _from_dict(cls, raw: dict) -> "RunConfig":
        sections = {"model": ModelConfig, "fit": FitConfig, "data": DataConfig}
        unknown = set(raw) - set(sections)
        if unknown:
            raise ValueError(f"unknown config sections {sorted(unknown)}; expected [model], [fit] and [data]")
        for section, klass in sections.items():
            if not isinstance(raw.get(section, {}), dict):
                raise ValueError(f"{section} must be a table: a [{section}] line followed by key = value lines, "
                                 f"got {section} = {raw[section]!r}")
            names = {f.name for f in dataclasses.fields(klass)}
            bad = set(raw.get(section, {})) - names
            if bad:
                raise ValueError(f"unknown keys in [{section}]: {sorted(bad)}; known: {sorted(names)}")
        return cls(**{section: klass(**raw.get(section, {})) for section, klass in sections.items()})


# TOML basic strings (toml.io, v1.0.0): a backslash, a double quote and the control characters
# other than tab must be escaped; everything else is written as it is (the file is UTF-8).
_TOML_ESCAPES = {ord("\\"): "\\\\", ord('"'): '\\"', ord("\b"): "\\b", ord("\t"): "\\t", ord("\n"): "\\n",
                 ord("\f"): "\\f", ord("\r"): "\\r",
                 **{code: f"\\u{code:04X}" for code in (*range(0x20), 0x7F) if chr(code) not in "\b\t\n\f\r"}}


def _toml_string(text: str) -> str:
    return '"' + text.translate(_TOML_ESCAPES) + '"'


def _toml_key(key: str) -> str:
    """A bare key where TOML allows one (letters, digits, ``_`` and ``-``), else a quoted one."""
    bare = key and all(c.isascii() and (c.isalnum() or c in "_-") for c in key)
    return key if bare else _toml_string(key)


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    if isinstance(value, dict):  # an inline table
        return "{" + ", ".join(f"{_toml_key(str(k))} = {_toml_value(v)}" for k, v in value.items()) + "}"
    return repr(value)


# The shipped configurations: package data, so that an installed wheel has them too.
SHIPPED_CONFIGS = "configs"


def shipped_configs() -> list[str]:
    """Names of the configurations shipped in ``lcd_bayes/configs/`` (``lcd_linear``, ...)."""
    folder = resources.files(__package__) / SHIPPED_CONFIGS
    return sorted(entry.name.removesuffix(".toml") for entry in folder.iterdir() if entry.name.endswith(".toml"))


def load_config(path: str | Path | None) -> RunConfig:
    """Read a model configuration TOML: a file, or a shipped configuration by name (``lcd_nonlinear``
    or ``lcd_nonlinear.toml``, from ``lcd_bayes/configs/``); ``None`` gives the defaults."""
    if path is None:
        return RunConfig()
    path = Path(path)
    if path.is_dir():
        run_config = path / "config.toml"
        raise ValueError(f"config {path} is a folder, not a TOML file"
                         + (f" (a run folder: pass {run_config})" if run_config.is_file() else ""))
    if path.exists():
        return _read_toml(path.read_bytes(), f"config file {path}")
    shipped = resources.files(__package__) / SHIPPED_CONFIGS / f"{path.stem}.toml"
    if not shipped.is_file():
        raise FileNotFoundError(
            f"config file {path} not found, nor a shipped config of that name (shipped: {', '.join(shipped_configs())})"
        )
    return _read_toml(shipped.read_bytes(), f"shipped config {path.stem}")


def _read_toml(content: bytes, source: str) -> RunConfig:
    """The configuration in a TOML document; errors start with ``source``, the file's name."""
    try:
        raw = tomllib.loads(content.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
        raise ValueError(f"{source} is not valid TOML: {error}") from None
    return RunConfig.from_dict(raw, source)


def use_compilation_cache() -> Path | None:
    """Keep JAX's compiled programs on disk (``$LCD_BAYES_CACHE``, default
    ``~/.cache/lcd-bayes/jax``; a few MB per model size, safe to delete), unless the user set a
    cache of their own or ``LCD_BAYES_CACHE=off``. numpyro initializes a guide op by op,
    and each op is compiled once per process: 16 of the 24 s of a short 15-gene fit; with the
    cache a second process took 3.6 s. Returns the folder, or None when off."""
    import os

    import jax

    folder = os.environ.get("LCD_BAYES_CACHE", str(Path.home() / ".cache" / "lcd-bayes" / "jax"))
    if folder.lower() in ("off", "0", "") or jax.config.jax_compilation_cache_dir:
        return None
    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return Path(folder)

