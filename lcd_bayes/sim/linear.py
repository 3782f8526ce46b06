"""Synthetic perturbation screens from a linear latent causal diffusion.

The latent expression of a cell in condition ``q`` follows the SDE

    dx = (A x + b + c_q) dt + sigma dW,

with drift matrix ``A`` (``A[k, j]`` is the direct effect of gene ``j`` on gene
``k``), basal drift ``b`` and the summed shift interventions ``c_q`` of the
perturbation labels in ``q``. Cells are exact draws from the stationary law
``N(mu_q, Sigma)`` with ``mu_q = -A^{-1} (b + c_q)`` and ``Sigma`` solving the
continuous Lyapunov equation ``A Sigma + Sigma A^T + sigma^2 I = 0``. Counts are
observed through negative-binomial (or Poisson) noise with per-cell size
factors, or the latent states are observed with additive Gaussian noise.

The protocol follows the synthetic linear systems of the Latent Causal
Diffusions paper: an Erdős–Rényi graph, signed weights of magnitude
``U[1, 3]``, a diagonal shift that makes the drift stable, and on-target shift
interventions of magnitude ``U[5, 15]``.

``simulate(..., times=[...])`` runs the linear diffusion forward in time instead: cells start at the
control's stationary law, each condition's shift switches on at ``t = 0``, and cells are drawn at
the given times by the exact Ornstein–Uhlenbeck transition (``ou_transition``; no discretization).

``simulate(..., drift="nonlinear")`` draws the latent states from the contracting nonlinear
diffusion of :mod:`lcd_bayes.sim.nonlinear` instead (saturating regulation, so double
perturbations interact), with the same graph protocol, design and observation models.

``simulate(..., n_batches=B)`` spreads the cells at random over ``B`` batches (10x lanes,
replicates) with a biological and a technical effect each (linear stationary screens only). A
batch ``b`` shifts the basal drift by ``delta_b = D z_b``, ``z_b ~ N(0, batch_basal_sd^2)`` per
gene and ``D`` the genes' decays (``-diag(A)``), as the model writes basal drift and shifts as
``D * relative``: ``batch_basal_sd`` is in latent units of a gene's own response before the graph
propagates it. Its cells' stationary mean is ``mu_q - A^{-1} delta_b`` (the covariance does not
change). Technically, a batch multiplies each gene's count scale by ``exp(N(0, batch_scale_sd^2))``
(count likelihoods), or adds ``N(0, batch_scale_sd^2)`` per gene to the observed values (Gaussian).
"""
from __future__ import annotations

import numbers
from typing import Any, NamedTuple

import anndata
import numpy as np
import pandas as pd
from scipy.linalg import expm, solve_continuous_lyapunov

from . import nonlinear as nl
from .graphs import effect_matrix, random_graph_weights

__all__ = [
    "CONTROL_LABEL",
    "LIBRARY_SIZE_KEY",
    "LIKELIHOODS",
    "SHIFT_SIGNS",
    "DRIFTS",
    "LinearSystem",
    "random_linear_system",
    "stationary_moments",
    "ou_transition",
    "simulate",
    "truth_from_uns",
]

CONTROL_LABEL = "ctrl"
# obs column of each cell's simulated library size factor (count likelihoods). Only the panel's
# genes are simulated, so their totals move with the perturbations: pass this column to
# ``fit(..., size_factor_key=LIBRARY_SIZE_KEY)`` (continuous fits ignore it).
LIBRARY_SIZE_KEY = "size_factor"
LIKELIHOODS = ("nb", "poisson", "gaussian")
LINKS = ("softplus", "exp")  # expression rate of a latent state, per unit size factor and gene scale
SHIFT_SIGNS = ("random", "positive", "negative")
DRIFTS = ("linear", "nonlinear")
# Default on-target shift magnitudes per drift family. The nonlinear family's decay is
# rho(|W|) + margin (about 11 at the default graph, twice the linear protocol's) and each
# edge passes on only ~|W_kj| / decay of a regulator's move, so a target saturates only
# when its regulator moves by several units: shifts U[50, 100] move the perturbed gene by
# about 4.5-9 latent units (their targets by up to ~2) and push common targets of a double
# through their saturation range. Scale it with rho(|W|) + margin for other graphs.
DEFAULT_SHIFT_RANGE = {"linear": (5.0, 15.0), "nonlinear": (50.0, 100.0)}
TRUTH_KEY = "lcd_truth"
SIMULATION_KEY = "lcd_simulation"

# Per-gene observation parameters that the protocol fixes rather than exposes.
_GENE_SCALE_LOG_SD = 0.5
_CONCENTRATION_LOG_MEAN = np.log(5.0)
_CONCENTRATION_LOG_SD = 0.3


class LinearSystem(NamedTuple):
    """A linear latent causal diffusion ``dx = (A x + b) dt + sigma dW``.

    Attributes
    ----------
    drift : numpy.ndarray, shape (genes, genes)
        Drift matrix ``A``; ``A[k, j]`` is the direct effect of gene ``j`` on
        gene ``k``. Stable: all eigenvalues have negative real part.
    basal_drift : numpy.ndarray, shape (genes,)
        Basal drift ``b`` shared by all conditions.
    sigma : float
        Scale of the isotropic Brownian noise.
    """

    drift: np.ndarray
    basal_drift: np.ndarray
    sigma: float

    @property
    def effect(self) -> np.ndarray:
        """Causal effect matrix, shape (source, target): ``A.T`` with zero diagonal."""
        return effect_matrix(self.drift)


# ---------------------------------------------------------------------------
# Argument validation
# ---------------------------------------------------------------------------


def _as_int(name: str, value: Any, minimum: int) -> int:
    """An integer argument ``>= minimum`` (numpy integers accepted, bools not)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value}")
    return int(value)


def _as_float(name: str, value: Any, *, positive: bool = False) -> float:
    """A finite non-negative (or strictly positive) real argument."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number; got {value!r}")
    value = float(value)
    bound_ok = value > 0 if positive else value >= 0
    if not np.isfinite(value) or not bound_ok:
        what = "> 0" if positive else ">= 0"
        raise ValueError(f"{name} must be a finite number {what}; got {value}")
    return value


def _as_range(name: str, value: Any) -> tuple[float, float]:
    """A ``(low, high)`` magnitude range with ``0 <= low <= high``, ``high > 0``."""
    arr = np.asarray(value, dtype=float).reshape(-1)
    if arr.shape != (2,) or not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be a pair (low, high) of finite numbers; got {value!r}")
    low, high = float(arr[0]), float(arr[1])
    if not 0.0 <= low <= high or high <= 0.0:
        raise ValueError(f"{name} must satisfy 0 <= low <= high and high > 0; got ({low}, {high})")
    return low, high


def _resolve_n_perturbed(n_perturbed: Any, n_genes: int) -> int:
    """Number of perturbed genes: None (all), an integer count, or a fraction.

    An integer means a count in ``[1, n_genes]``; a float means a fraction in
    ``(0, 1]`` of the genes (so ``1`` is one gene while ``1.0`` is all genes).
    """
    if n_perturbed is None:
        return n_genes
    if isinstance(n_perturbed, bool):
        raise ValueError(f"n_perturbed must be None, an integer or a fraction; got {n_perturbed!r}")
    if isinstance(n_perturbed, numbers.Integral):
        if not 1 <= n_perturbed <= n_genes:
            raise ValueError(
                f"n_perturbed as an integer must be between 1 and n_genes={n_genes}; "
                f"got {n_perturbed} (pass a float in (0, 1] for a fraction, or None for all)"
            )
        return int(n_perturbed)
    if isinstance(n_perturbed, numbers.Real):
        fraction = float(n_perturbed)
        if not 0.0 < fraction <= 1.0:
            raise ValueError(
                f"n_perturbed as a float is a fraction of genes and must be in (0, 1]; got {fraction}"
            )
        return max(1, int(round(fraction * n_genes)))
    raise ValueError(f"n_perturbed must be None, an integer or a fraction; got {n_perturbed!r}")


# ---------------------------------------------------------------------------
# The linear system
# ---------------------------------------------------------------------------


def random_linear_system(
    n_genes: int,
    *,
    expected_degree: float = 10.0,
    weight_range: tuple[float, float] = (1.0, 3.0),
    margin: float = 1.0,
    control_mean_sd: float = 0.5,
    sigma: float = 1.0,
    rng: np.random.Generator | int,
) -> LinearSystem:
    """Draw a stable random linear system on an Erdős–Rényi graph.

    Parameters
    ----------
    n_genes : int
        Number of genes ``d >= 2``.
    expected_degree : float
        Expected number of edges (in + out) per gene; the edge probability of
        each ordered pair is ``min(1, expected_degree / (2 (d - 1)))``.
    weight_range : (float, float)
        Range of edge weight magnitudes; signs are uniform.
    margin : float
        Stability margin: the spectral abscissa of the drift is ``-margin``.
    control_mean_sd : float
        Standard deviation of the per-gene control mean ``mu_0``.
    sigma : float
        Brownian noise scale.
    rng : numpy.random.Generator or int
        Random generator, or a seed for one.

    Returns
    -------
    LinearSystem
        ``drift`` (d, d), ``basal_drift`` (d,) with ``b = -A mu_0`` so that
        unperturbed cells are centred on ``mu_0``, and ``sigma``.
    """
    d = _as_int("n_genes", n_genes, 2)
    expected_degree = _as_float("expected_degree", expected_degree)
    low, high = _as_range("weight_range", weight_range)
    margin = _as_float("margin", margin, positive=True)
    control_mean_sd = _as_float("control_mean_sd", control_mean_sd)
    sigma = _as_float("sigma", sigma, positive=True)
    rng = np.random.default_rng(rng)

    weights = random_graph_weights(d, expected_degree, (low, high), rng)
    control_mean = rng.normal(0.0, control_mean_sd, size=d)

    # A zero-diagonal W has trace 0, so its largest real eigenvalue part is >= 0
    # and the shift puts the spectral abscissa of A exactly at -margin; the
    # outer max only guards against round-off making the diagonal non-negative.
    max_real = float(np.max(np.linalg.eigvals(weights).real))
    decay = max(max_real + margin, margin)
    drift = weights - decay * np.eye(d)
    basal_drift = -drift @ control_mean
    return LinearSystem(drift=drift, basal_drift=basal_drift, sigma=sigma)


def stationary_moments(system: LinearSystem, shift: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of the stationary law under a shift intervention.

    Parameters
    ----------
    system : LinearSystem
        Stable linear system.
    shift : numpy.ndarray, shape (genes,) or (conditions, genes)
        Shift intervention ``c_q`` added to the basal drift; a 2-D array gives
        one mean per row.

    Returns
    -------
    mean : numpy.ndarray, shape like ``shift``
        ``-A^{-1} (b + c_q)``.
    covariance : numpy.ndarray, shape (genes, genes)
        Solution of ``A Sigma + Sigma A^T + sigma^2 I = 0`` (shift-independent).
    """
    drift = np.asarray(system.drift, dtype=float)
    shift = np.asarray(shift, dtype=float)
    d = drift.shape[0]
    if shift.shape[-1:] != (d,) or shift.ndim > 2:
        raise ValueError(f"shift must have shape ({d},) or (conditions, {d}); got {shift.shape}")
    total = np.asarray(system.basal_drift, dtype=float) + shift
    # Solve rather than invert: A can be ill-conditioned for large d.
    mean = np.linalg.solve(drift, -total.T).T
    covariance = solve_continuous_lyapunov(drift, -(system.sigma**2) * np.eye(d))
    # The solver's output is symmetric only up to round-off; Cholesky wants exact.
    covariance = 0.5 * (covariance + covariance.T)
    return mean, covariance


def ou_transition(system: LinearSystem, shift: np.ndarray, start: np.ndarray, time: float,
                  rng: np.random.Generator) -> np.ndarray:
    """States at ``time`` of cells that were at ``start`` when the shift switched on at ``t = 0``.

    The exact transition of ``dx = (A x + b + c) dt + sigma dW``: with ``P = exp(A t)`` and the
    stationary law ``N(m, Sigma)`` of the shifted drift,

        x(t) = m + P (x(0) - m) + eta,      eta ~ N(0, Sigma - P Sigma P^T)

    (``Sigma - P Sigma P^T = int_0^t exp(A s) sigma^2 exp(A s)^T ds``, the noise gathered on the
    way). ``shift`` (genes,), ``start`` (cells, genes); returns (cells, genes).
    """
    mean, covariance = stationary_moments(system, shift)
    propagator = expm(float(time) * np.asarray(system.drift, dtype=float))
    gathered = covariance - propagator @ covariance @ propagator.T
    noise = rng.standard_normal(start.shape) @ _covariance_factor(0.5 * (gathered + gathered.T)).T
    return mean + (start - mean) @ propagator.T + noise


def _covariance_factor(covariance: np.ndarray) -> np.ndarray:
    """A matrix ``L`` with ``L L^T = covariance`` (Cholesky, eigh as fallback)."""
    try:
        return np.linalg.cholesky(covariance)
    except np.linalg.LinAlgError:
        # Sigma is positive definite in exact arithmetic; round-off on
        # ill-conditioned systems can break Cholesky, so clip tiny eigenvalues.
        values, vectors = np.linalg.eigh(covariance)
        return vectors * np.sqrt(np.clip(values, 0.0, None))


# ---------------------------------------------------------------------------
# Perturbation design
# ---------------------------------------------------------------------------


def _draw_design(
    gene_names: list[str],
    n_perturbed: int,
    n_doubles: int,
    shift_range: tuple[float, float],
    shift_sign: str,
    rng: np.random.Generator,
) -> tuple[list[str], np.ndarray, list[str], np.ndarray]:
    """Draw perturbed genes, their on-target shifts and double perturbations.

    Returns
    -------
    perturbations : list of str, length P
        Single perturbation labels (the target gene names, in gene order).
    shift : numpy.ndarray, shape (P, genes)
        On-target shift vectors ``s e_g``.
    conditions : list of str, length Q
        ``"ctrl"``, then the singles, then the doubles ``"A+B"``.
    condition_shift : numpy.ndarray, shape (Q, genes)
        Summed shift ``c_q`` of each condition.
    """
    d = len(gene_names)
    targets = np.sort(rng.choice(d, size=n_perturbed, replace=False))
    # Always draw signs and magnitudes so shift_sign does not change other draws.
    signs = rng.choice(np.array([-1.0, 1.0]), size=n_perturbed)
    magnitudes = rng.uniform(*shift_range, size=n_perturbed)
    if shift_sign == "positive":
        signs = np.ones(n_perturbed)
    elif shift_sign == "negative":
        signs = -np.ones(n_perturbed)
    perturbations = [gene_names[g] for g in targets]
    shift = np.zeros((n_perturbed, d))
    shift[np.arange(n_perturbed), targets] = signs * magnitudes

    conditions = [CONTROL_LABEL, *perturbations]
    condition_shift = [np.zeros((1, d)), shift]
    if n_doubles > 0:
        first, second = np.triu_indices(n_perturbed, k=1)
        chosen = np.sort(rng.choice(first.size, size=n_doubles, replace=False))
        for i, j in zip(first[chosen], second[chosen]):
            conditions.append("+".join(sorted((perturbations[i], perturbations[j]))))
        # Shifts are additive in the drift, so a double is the sum of its singles.
        condition_shift.append(shift[first[chosen]] + shift[second[chosen]])
    return perturbations, shift, conditions, np.concatenate(condition_shift, axis=0)


# ---------------------------------------------------------------------------
# Observation models
# ---------------------------------------------------------------------------


def _softplus(x: np.ndarray) -> np.ndarray:
    """``log(1 + exp(x))`` without overflow."""
    return np.logaddexp(0.0, x)


def _observe_counts(
    latent: np.ndarray,
    likelihood: str,
    link: str,
    mean_count: float,
    size_factor_sd: float,
    rng: np.random.Generator,
    log_scale_offset: np.ndarray | None = None,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Negative-binomial or Poisson counts of latent states.

    Parameters
    ----------
    latent : numpy.ndarray, shape (cells, genes)
        Latent states ``x``.
    likelihood : {"nb", "poisson"}
    link : {"softplus", "exp"}
    mean_count, size_factor_sd : float
        Median gene scale and log-sd of the size factors.
    rng : numpy.random.Generator
    log_scale_offset : numpy.ndarray, shape (cells, genes), optional
        Added to each cell's log gene scales (its batch's technical effect); None: no offset.

    Returns
    -------
    counts : numpy.ndarray of int, shape (cells, genes)
    params : dict
        ``size_factor`` (cells,), ``gene_scale`` (genes,), ``concentration``
        (genes,; drawn for both likelihoods, used by "nb" only).
    """
    n_cells, d = latent.shape
    # Draw all parameters for both likelihoods so nb and poisson share them.
    size_factor = rng.lognormal(0.0, size_factor_sd, size=n_cells)
    gene_scale = rng.lognormal(np.log(mean_count), _GENE_SCALE_LOG_SD, size=d)
    concentration = rng.lognormal(_CONCENTRATION_LOG_MEAN, _CONCENTRATION_LOG_SD, size=d)
    rate = _softplus(latent) if link == "softplus" else np.exp(latent)
    mean = size_factor[:, None] * rate * gene_scale[None, :]
    if log_scale_offset is not None:
        mean = mean * np.exp(log_scale_offset)
    if likelihood == "nb":
        # Gamma-Poisson mixture: mean m, variance m + m^2 / phi.
        rate = rng.gamma(shape=concentration[None, :], scale=mean / concentration[None, :])
    else:
        rate = mean
    counts = rng.poisson(rate)
    if counts.max(initial=0) < np.iinfo(np.int32).max:
        counts = counts.astype(np.int32)  # halves memory for large screens
    params = {"size_factor": size_factor, "gene_scale": gene_scale, "concentration": concentration}
    return counts, params


# ---------------------------------------------------------------------------
# Simulation
# ---------------------------------------------------------------------------


def _nonlinear_latent(
    n_genes: int,
    perturbations: list[str],
    conditions: list[str],
    saturation: float,
    condition_shift: np.ndarray,
    condition_index: np.ndarray,
    rng_system: np.random.Generator,
    rng_cells: np.random.Generator,
    **system_kwargs: Any,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Latent cells and truth of the nonlinear family (:mod:`lcd_bayes.sim.nonlinear`).

    ``conditions`` and ``condition_shift`` are ctrl, the singles (``perturbations``), then
    the doubles ``"A+B"``, as made by :func:`_draw_design`.
    """
    system_kwargs["expected_degree"] = _as_float("expected_degree", system_kwargs["expected_degree"])
    system_kwargs["weight_range"] = _as_range("weight_range", system_kwargs["weight_range"])
    system_kwargs["margin"] = _as_float("margin", system_kwargs["margin"], positive=True)
    system_kwargs["control_mean_sd"] = _as_float("control_mean_sd", system_kwargs["control_mean_sd"])
    system_kwargs["sigma"] = _as_float("sigma", system_kwargs["sigma"], positive=True)
    system = nl.random_nonlinear_system(
        n_genes, saturation=saturation, rng=rng_system, **system_kwargs
    )
    fixed_points = nl.fixed_point_float64(system, condition_shift)
    latent, info = nl.stationary_cells(
        system, condition_shift, condition_index, rng_cells, fixed_points=fixed_points
    )
    n_conditions = condition_shift.shape[0]
    counts = np.bincount(condition_index, minlength=n_conditions)
    condition_mean = np.zeros((n_conditions, n_genes))
    np.add.at(condition_mean, condition_index, latent)
    condition_mean /= counts[:, None]
    control = latent[condition_index == 0]

    # Linearised effects: the Jacobian at the control fixed point, as a linear LCD sees them.
    jacobian = nl.jacobian(system, fixed_points[0])
    effect = effect_matrix(jacobian)
    # Nonadditivity of each double: x*(AB) - (x*(A) + x*(B) - x*(ctrl)).
    row = {label: q for q, label in enumerate(conditions)}
    response = fixed_points - fixed_points[0]
    doubles = conditions[1 + len(perturbations) :]
    nonadditivity = np.array(
        [response[row[label]] - sum(response[row[part]] for part in label.split("+"))
         for label in doubles]
    ).reshape(len(doubles), n_genes)
    truth: dict[str, Any] = {
        "drift": jacobian,
        "effect": effect,
        "basal_drift": system.basal_drift,
        "decay": system.decay,
        "sigma": float(system.sigma),
        "control_mean": condition_mean[0],
        "covariance": np.cov(control, rowvar=False),
        "condition_mean": condition_mean,
        "drift_family": "nonlinear",
        "weights": system.weights,
        "structural_effect": system.structural_effect,
        "input_offset": system.input_offset,
        "saturation": float(system.saturation),
        "fixed_point": fixed_points,
        "nonadditivity": nonadditivity,
        "euler_dt": info["dt"],
        "euler_steps": int(info["n_steps"]),
    }
    return latent, truth


def _nonlinear_time_course(truth: dict, condition_shift: np.ndarray, times: np.ndarray, n_cells: int,
                           rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Cells of every condition at each time after its shift switched on in stationary control
    cells (a fresh set per time), ordered by condition, then time; the truth gains ``times`` and
    ``trajectory_mean`` (conditions, times, genes), the Monte Carlo means of those cells."""
    system = nl.NonlinearSystem(truth["decay"], truth["weights"], truth["basal_drift"], truth["input_offset"],
                                truth["saturation"], truth["sigma"])
    n_conditions, d = condition_shift.shape
    condition_index = np.repeat(np.arange(n_conditions), times.size * n_cells)
    start, _ = nl.stationary_cells(system, condition_shift[:1], np.zeros(condition_index.size, dtype=int), rng,
                                   fixed_points=truth["fixed_point"][:1], dt=truth["euler_dt"])
    blocks = [(q, t) for q in range(n_conditions) for t in times]
    latent = np.concatenate([
        nl.forward_cells(system, np.broadcast_to(condition_shift[q], (n_cells, d)),
                         start[i * n_cells:(i + 1) * n_cells], t, rng, dt=truth["euler_dt"])
        for i, (q, t) in enumerate(blocks)
    ])
    truth["times"] = times
    truth["trajectory_mean"] = latent.reshape(n_conditions, times.size, n_cells, d).mean(axis=2)
    return latent, condition_index


def simulate(
    n_genes: int = 20,
    *,
    n_perturbed: int | float | None = None,
    n_doubles: int = 0,
    cells_per_condition: int = 200,
    expected_degree: float = 10.0,
    weight_range: tuple[float, float] = (1.0, 3.0),
    shift_range: tuple[float, float] | None = None,
    shift_sign: str = "random",
    margin: float = 1.0,
    likelihood: str = "nb",
    link: str = "softplus",
    noise_sd: float = 0.1,
    mean_count: float = 10.0,
    size_factor_sd: float = 0.3,
    control_mean_sd: float = 0.5,
    sigma: float = 1.0,
    seed: int | None = 0,
    drift: str = "linear",
    saturation: float = 1.0,
    times=None,
    n_batches: int = 1,
    batch_scale_sd: float = 0.0,
    batch_basal_sd: float = 0.0,
) -> anndata.AnnData:
    """Simulate a perturbation screen from a random latent causal diffusion.

    Parameters
    ----------
    n_genes : int
        Number of genes ``d >= 2``, named ``G0 .. G{d-1}``.
    n_perturbed : int, float or None
        Genes given a single perturbation: None for all, an integer count in
        ``[1, d]``, or a float fraction in ``(0, 1]`` (``round(fraction * d)``,
        at least 1).
    n_doubles : int
        Number of distinct random pairs of single perturbations also applied
        together (label ``"A+B"``, names sorted); at most ``P (P - 1) / 2``.
    cells_per_condition : int
        Cells for the control and every single and double condition (>= 2).
    expected_degree, weight_range, margin, control_mean_sd, sigma
        Passed to :func:`random_linear_system` (or, for ``drift="nonlinear"``, to
        :func:`lcd_bayes.sim.nonlinear.random_nonlinear_system`, where ``margin`` is the
        guaranteed contraction rate and ``control_mean_sd`` sets the control fixed point).
    shift_range : (float, float), optional
        Range of on-target shift magnitudes; default ``(5, 15)`` for the linear drift and
        ``(50, 100)`` for the nonlinear one (``DEFAULT_SHIFT_RANGE``, whose comment explains
        the choice). The recorded arguments hold the range used.
    shift_sign : {"random", "positive", "negative"}
        Sign of the on-target shifts.
    likelihood : {"nb", "poisson", "gaussian"}
        Observation model. Count likelihoods store integer counts in
        ``layers["counts"]`` and, as float32, in ``X``; "gaussian" stores
        ``x + N(0, noise_sd^2)`` in ``X``.
    link : {"softplus", "exp"}
        How a latent state sets the expected count (count likelihoods):
        ``size_factor * link(x) * gene_scale``. "softplus" (default) is the Latent Causal
        Diffusions paper's protocol; "exp" makes ``x`` log expression, so that a latent move
        of 1 is an e-fold change (the fitted model's default link).
    noise_sd : float
        Gaussian observation noise (``likelihood="gaussian"`` only).
    mean_count : float
        Median per-gene scale ``u_g`` of count likelihoods.
    size_factor_sd : float
        Log-scale sd of the per-cell size factors of count likelihoods.
    seed : int or None
        Seed of all randomness; None draws one, which is recorded.
    drift : {"linear", "nonlinear"}
        Latent dynamics. "linear" (default): exact stationary draws of the linear diffusion.
        "nonlinear": ``f(x; c) = -decay x + phi(W x + h) + b + c`` with saturating
        regulation ``phi`` (:mod:`lcd_bayes.sim.nonlinear`), a unique stable fixed point
        for every condition, cells by Euler–Maruyama; double perturbations are not additive.
    saturation : float
        Saturation scale of the nonlinear regulation in latent units (``drift="nonlinear"``
        only; default 1): regulation moves a gene by at most this from its midpoint, and
        saturates once its summed input moves by about ``saturation * decay``.
    times : sequence of float, optional
        Time course: ``cells_per_condition`` cells of every condition at each time ``>= 0`` after
        its shift switched on in cells at the control's stationary law, by the exact transition
        (``ou_transition``) for the linear drift, by Euler–Maruyama (``nonlinear.forward_cells``)
        for the nonlinear one; ``obs["time"]`` holds each cell's time. Without it (default) cells
        are at the stationary state.
    n_batches : int
        Batches (10x lanes, replicates) that the cells are spread over uniformly at random
        (default 1: no batches, and the batch sds are ignored). More than one batch needs the
        linear drift at the stationary state (neither ``drift="nonlinear"`` nor ``times``).
    batch_scale_sd : float
        Technical batch effect: each batch multiplies each gene's scale ``u_g`` by
        ``exp(N(0, batch_scale_sd^2))`` (count likelihoods), or adds ``N(0, batch_scale_sd^2)``
        to each gene's observed values (Gaussian); default 0.
    batch_basal_sd : float
        Biological batch effect: each batch shifts the basal drift by ``delta_b = D z_b``,
        ``z_b ~ N(0, batch_basal_sd^2)`` per gene, ``D`` the genes' decays ``-diag(A)`` (the
        model's ``D * relative``), so ``batch_basal_sd`` is in latent units of a gene's own
        response before the graph propagates it. The batch's cells are stationary around
        ``mu_q - A^{-1} delta_b`` with the same covariance; default 0.

    Returns
    -------
    anndata.AnnData, shape (cells, genes)
        ``obs["condition"]`` (categorical, control ``"ctrl"`` first),
        ``obs["size_factor"]`` for count likelihoods, ``uns["lcd_truth"]``
        (read it with :func:`truth_from_uns`) and ``uns["lcd_simulation"]``
        (the arguments; ``simulate(**uns["lcd_simulation"])`` reproduces the run).
        With ``times``: ``obs["time"]``, cells ordered by condition, then time, and the truth's
        ``times`` and ``trajectory_mean`` (conditions, times, genes), the exact mean
        ``m_q + exp(A t) (m_0 - m_q)`` (for the nonlinear drift the simulated cells' means).
        For ``drift="nonlinear"`` the truth's ``drift`` is the Jacobian of the drift at the
        control fixed point and ``effect`` its transpose with zero diagonal (the linearised
        causal effects); see :func:`truth_from_uns` for the extra keys.
        With ``n_batches > 1``: ``obs["batch"]`` (categorical, ``"batch0"``, ``"batch1"``, ...) and
        the truth's ``batches`` (the names), ``batch_basal_shift`` (batches, genes; the
        ``delta_b``, drift units), ``batch_mean_shift`` (batches, genes; ``-A^{-1} delta_b``) and
        ``batch_log_scale`` (batches, genes; the technical log scale factors, for Gaussian the
        additive offsets). ``condition_mean`` stays the batch-free mean; the batch arguments are
        recorded in ``uns["lcd_simulation"]`` only then.

    Raises
    ------
    ValueError
        For an invalid argument, or ``n_batches > 1`` with ``drift="nonlinear"`` or ``times``.
    """
    d = _as_int("n_genes", n_genes, 2)
    n_single = _resolve_n_perturbed(n_perturbed, d)
    n_doubles = _as_int("n_doubles", n_doubles, 0)
    max_doubles = n_single * (n_single - 1) // 2
    if n_doubles > max_doubles:
        raise ValueError(
            f"n_doubles={n_doubles} exceeds the {max_doubles} distinct pairs of the "
            f"{n_single} perturbed genes; pass n_doubles <= {max_doubles} or perturb more genes"
        )
    n_cells = _as_int("cells_per_condition", cells_per_condition, 2)
    if drift not in DRIFTS:
        raise ValueError(f"drift must be one of {DRIFTS}; got {drift!r}")
    if drift == "nonlinear":
        saturation = _as_float("saturation", saturation, positive=True)
    if times is not None:
        times = np.atleast_1d(np.asarray(times, dtype=float))
        if times.ndim != 1 or times.size == 0 or not np.all(np.isfinite(times)) or np.any(times < 0):
            raise ValueError(f"times must be one or more finite numbers >= 0; got {times!r}")
    if shift_range is None:
        shift_range = DEFAULT_SHIFT_RANGE[drift]
    shift_range = _as_range("shift_range", shift_range)
    weight_range = _as_range("weight_range", weight_range)
    if likelihood not in LIKELIHOODS:
        raise ValueError(f"likelihood must be one of {LIKELIHOODS}; got {likelihood!r}")
    if link not in LINKS:
        raise ValueError(f"link must be one of {LINKS}; got {link!r}")
    if shift_sign not in SHIFT_SIGNS:
        raise ValueError(f"shift_sign must be one of {SHIFT_SIGNS}; got {shift_sign!r}")
    noise_sd = _as_float("noise_sd", noise_sd)
    mean_count = _as_float("mean_count", mean_count, positive=True)
    size_factor_sd = _as_float("size_factor_sd", size_factor_sd)
    if seed is None:
        # Record a concrete seed so that the run can still be reproduced.
        seed = int(np.random.default_rng().integers(2**62))
    seed = _as_int("seed", seed, 0)
    n_batches = _as_int("n_batches", n_batches, 1)
    batch_scale_sd = _as_float("batch_scale_sd", batch_scale_sd)
    batch_basal_sd = _as_float("batch_basal_sd", batch_basal_sd)
    if n_batches > 1 and (drift != "linear" or times is not None):
        raise ValueError(
            f"n_batches={n_batches} is not supported with "
            f"{'drift=' + repr(drift) if drift != 'linear' else 'times'}: batches are simulated for "
            "linear stationary screens only (drift='linear', times=None)"
        )

    # Independent streams per stage: changing the design or the likelihood
    # leaves the graph (and, where possible, the latent draws) unchanged. The fifth (batches) is
    # spawned after the other four, which it therefore leaves as they were.
    rng_system, rng_design, rng_cells, rng_obs, rng_batch = np.random.default_rng(seed).spawn(5)
    gene_names = [f"G{g}" for g in range(d)]
    if drift == "nonlinear":
        perturbations, shift, conditions, condition_shift = _draw_design(
            gene_names, n_single, n_doubles, shift_range, shift_sign, rng_design
        )
        condition_index = np.repeat(np.arange(len(conditions)), n_cells)
        latent, truth = _nonlinear_latent(
            d, perturbations, conditions, saturation, condition_shift, condition_index,
            rng_system, rng_cells,
            expected_degree=expected_degree, weight_range=weight_range, margin=margin,
            control_mean_sd=control_mean_sd, sigma=sigma,
        )
        truth.update(
            perturbations=perturbations,
            shift=shift,
            targets={label: [label] for label in perturbations},
            conditions=conditions,
        )
        if times is not None:
            latent, condition_index = _nonlinear_time_course(truth, condition_shift, times, n_cells, rng_cells)
    else:
        system = random_linear_system(
            d,
            expected_degree=expected_degree,
            weight_range=weight_range,
            margin=margin,
            control_mean_sd=control_mean_sd,
            sigma=sigma,
            rng=rng_system,
        )
        perturbations, shift, conditions, condition_shift = _draw_design(
            gene_names, n_single, n_doubles, shift_range, shift_sign, rng_design
        )
        condition_mean, covariance = stationary_moments(system, condition_shift)

        # Exact stationary draws, cells grouped by condition (control first).
        condition_index = np.repeat(np.arange(len(conditions)), n_cells)
        noise = rng_cells.standard_normal((condition_index.size, d))
        latent = condition_mean[condition_index] + noise @ _covariance_factor(covariance).T
        if times is not None:
            # The stationary draws of the control are the start; each condition's cells move from
            # there by the exact transition, a fresh set of cells per time (cells are destroyed by
            # measurement, so no cell is seen twice). Order: condition, then time, then cell.
            condition_index = np.repeat(np.arange(len(conditions)), times.size * n_cells)
            start = condition_mean[0] + rng_cells.standard_normal((condition_index.size, d)) @ _covariance_factor(covariance).T
            blocks = [(q, t) for q in range(len(conditions)) for t in times]
            latent = np.concatenate([
                ou_transition(system, condition_shift[q], start[i * n_cells:(i + 1) * n_cells], t, rng_cells)
                for i, (q, t) in enumerate(blocks)
            ])
        truth = {
            "drift": system.drift,
            "effect": system.effect,
            "basal_drift": system.basal_drift,
            "decay": -np.diag(system.drift),
            "sigma": float(system.sigma),
            "control_mean": condition_mean[0],
            "covariance": covariance,
            "perturbations": perturbations,
            "shift": shift,
            "targets": {label: [label] for label in perturbations},
            "conditions": conditions,
            "condition_mean": condition_mean,
        }
        if times is not None:
            propagators = np.stack([expm(t * system.drift) for t in times])
            truth["times"] = times
            truth["trajectory_mean"] = condition_mean[:, None, :] + np.einsum(
                "tij,qj->qti", propagators, condition_mean[0] - condition_mean)

    batch_index = None
    if n_batches > 1:
        # Everything is drawn whatever the sds, so that an sd changes only its own effect.
        batch_index = rng_batch.integers(n_batches, size=condition_index.size)
        basal_shift = truth["decay"] * (batch_basal_sd * rng_batch.standard_normal((n_batches, d)))
        log_scale = batch_scale_sd * rng_batch.standard_normal((n_batches, d))
        mean_shift = np.linalg.solve(system.drift, -basal_shift.T).T
        latent = latent + mean_shift[batch_index]
        truth.update(
            batches=[f"batch{b}" for b in range(n_batches)],
            batch_basal_shift=basal_shift,
            batch_mean_shift=mean_shift,
            batch_log_scale=log_scale,
        )

    obs = pd.DataFrame(
        {"condition": pd.Categorical.from_codes(condition_index, categories=conditions)},
        index=[f"cell{i}" for i in range(condition_index.size)],
    )
    if times is not None:
        obs["time"] = np.tile(np.repeat(times, n_cells), len(conditions))
    if batch_index is not None:
        obs["batch"] = pd.Categorical.from_codes(batch_index, categories=truth["batches"])
    var = pd.DataFrame(index=gene_names)
    layers = {}
    if likelihood == "gaussian":
        X = latent + noise_sd * rng_obs.standard_normal(latent.shape)
        if batch_index is not None:
            X = X + truth["batch_log_scale"][batch_index]
    else:
        offset = None if batch_index is None else truth["batch_log_scale"][batch_index]
        counts, params = _observe_counts(latent, likelihood, link, mean_count, size_factor_sd, rng_obs,
                                         log_scale_offset=offset)
        X = counts
        layers["counts"] = counts
        obs[LIBRARY_SIZE_KEY] = params["size_factor"]
        truth["gene_scale"] = params["gene_scale"]
        if likelihood == "nb":
            truth["concentration"] = params["concentration"]

    arguments = {
        "n_genes": d,
        "n_perturbed": n_perturbed,
        "n_doubles": n_doubles,
        "cells_per_condition": n_cells,
        "expected_degree": float(expected_degree),
        "weight_range": np.asarray(weight_range, dtype=float),
        "shift_range": np.asarray(shift_range, dtype=float),
        "shift_sign": shift_sign,
        "margin": float(margin),
        "likelihood": likelihood,
        "noise_sd": noise_sd,
        "mean_count": mean_count,
        "size_factor_sd": size_factor_sd,
        "control_mean_sd": float(control_mean_sd),
        "sigma": float(sigma),
        "seed": seed,
    }
    if drift == "nonlinear":
        # Recorded only for the nonlinear family, so linear runs record what they always did.
        arguments.update(drift=drift, saturation=saturation)
    if link != "softplus":
        arguments.update(link=link)  # likewise: softplus runs record what they always did
    if times is not None:
        arguments.update(times=times)
    if n_batches > 1:
        # Likewise: single-batch runs record what they always did.
        arguments.update(n_batches=n_batches, batch_scale_sd=batch_scale_sd, batch_basal_sd=batch_basal_sd)
    # h5ad cannot store None; omitting it makes simulate(**arguments) use the default.
    arguments = {key: value for key, value in arguments.items() if value is not None}

    return anndata.AnnData(
        X=np.asarray(X, dtype=np.float32),
        obs=obs,
        var=var,
        layers=layers,
        uns={TRUTH_KEY: truth, SIMULATION_KEY: arguments},
    )


# ---------------------------------------------------------------------------
# Reading the truth back
# ---------------------------------------------------------------------------

_LABEL_KEYS = ("perturbations", "conditions", "batches")


def _to_python(value: Any) -> Any:
    """Normalise a value read from ``uns`` (possibly after an h5ad round trip)."""
    if isinstance(value, dict):
        return {str(key): _to_python(item) for key, item in value.items()}
    if isinstance(value, str):
        return value
    if isinstance(value, np.generic):
        return value.item()
    array = np.asarray(value)
    if array.dtype.kind in "OUS":
        # h5ad stores lists of str as string arrays; give lists back.
        return [str(item) for item in array.reshape(-1)]
    if array.ndim == 0:
        return array.item()
    return np.array(array)


def truth_from_uns(adata: anndata.AnnData) -> dict[str, Any]:
    """Read the simulation truth of :func:`simulate` back from ``adata.uns``.

    Parameters
    ----------
    adata : anndata.AnnData
        Output of :func:`simulate`, in memory or read from ``.h5ad``.

    Returns
    -------
    dict
        Arrays as numpy arrays (``drift`` (d, d), ``effect`` (d, d; source x
        target), ``basal_drift``, ``decay``, ``control_mean`` (d,),
        ``covariance`` (d, d), ``shift`` (P, d), ``condition_mean`` (Q, d),
        ``gene_scale`` / ``concentration`` (d,) where present), labels as lists
        of str (``perturbations``, ``conditions``), ``targets`` as a dict label
        -> list of gene names, and ``sigma`` as a float.

        Data made with ``drift="nonlinear"`` also have ``drift_family``
        (``"nonlinear"``; absent for linear data), ``weights`` (d, d; the structural
        ``W``, ``W[k, j]`` the effect of ``j`` on ``k``), ``structural_effect`` (d, d;
        ``W.T`` with zero diagonal, source x target), ``input_offset`` (d,),
        ``saturation``, ``fixed_point`` (Q, d; the deterministic fixed point of each
        condition), ``nonadditivity`` (D, d; for the D doubles, in the order of the
        doubles in ``conditions``: ``x*(AB) - x*(A) - x*(B) + x*(ctrl)``), ``euler_dt`` and
        ``euler_steps``. There ``drift`` is the Jacobian of the drift at the control fixed
        point, ``effect`` its transpose with zero diagonal (what a linear LCD fitted to the
        data estimates), ``condition_mean`` / ``control_mean`` / ``covariance`` are
        Monte-Carlo moments of the simulated latent cells.

        Data made with ``n_batches > 1`` also have ``batches`` (the batch names of
        ``obs["batch"]``), ``batch_basal_shift`` (B, d; each batch's basal drift shift
        ``delta_b``), ``batch_mean_shift`` (B, d; ``-A^{-1} delta_b``, added to the stationary
        mean of the batch's cells) and ``batch_log_scale`` (B, d; the technical log gene-scale
        factors, for Gaussian data the additive offsets); ``condition_mean`` is batch-free.

    Raises
    ------
    ValueError
        If ``adata.uns`` has no ``"lcd_truth"`` entry.
    """
    if TRUTH_KEY not in adata.uns:
        raise ValueError(
            f'adata.uns has no "{TRUTH_KEY}" entry: the ground truth exists only for data made by '
            "lcd_bayes.sim.linear.simulate (or `lcd-bayes simulate`)"
        )
    truth = _to_python(dict(adata.uns[TRUTH_KEY]))
    for key in _LABEL_KEYS:
        if key in truth and not isinstance(truth[key], list):
            truth[key] = [str(truth[key])]
    d = np.asarray(truth["drift"]).shape[0] if "drift" in truth else None
    for key in ("shift", "nonadditivity", "fixed_point", "batch_basal_shift", "batch_mean_shift",
                "batch_log_scale"):
        if key in truth and d is not None:
            truth[key] = np.asarray(truth[key], dtype=float).reshape(-1, d)
    return truth
