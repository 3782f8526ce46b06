"""Nonlinear latent causal diffusions with genetic interactions.

The latent expression of a cell in condition ``q`` follows the SDE

    dx = f(x; c_q) dt + sigma dW,
    f_k(x; c) = -decay_k x_k + phi_k(sum_j W_kj x_j + h_k) + b_k + c_k,

with decay rates ``decay`` (equal for all genes, like the diagonal of the linear protocol),
a sparse signed weight matrix ``W`` (``W[k, j]`` is the structural effect of gene ``j`` on
gene ``k``; Erdős–Rényi graph, magnitudes ``U[weight_range]``, uniform signs, zero
diagonal), input offsets ``h``, basal drift ``b`` and the summed on-target shifts ``c_q`` of
the perturbations in ``q`` (shifts add in the drift, exactly as in the linear simulator).
Each gene's regulation is a saturating (Hill-like, sign-symmetric) response to its summed
regulatory input ``u_k = (W x + h)_k``:

    phi_k(u) = S_k tanh(u / S_k),    S_k = saturation * decay_k,

with slope ``phi_k' in (0, 1]`` (unit slope at ``u = 0``: for small inputs the drift is the
linear protocol's ``-decay x + W x``). ``saturation`` is in latent units: the regulation term
contributes at most ``S_k / decay_k = saturation`` to gene ``k``'s fixed point, and it
saturates once the input moves by about ``S_k``. The
offsets put each gene at its own point of its sigmoid in control cells, ``u_k = S_k z_k`` with
``z_k ~ N(0, 1)`` (some genes in their linear range, some near their floor or ceiling), and
``b`` puts the control fixed point at ``mu_0 ~ N(0, control_mean_sd^2)``.

Why doubles are not additive
----------------------------
The shifts of a double add in the drift, but a gene's response to its regulators does not:
a common target ``k`` of two perturbed genes ``A`` and ``B`` (or a target of ``A`` that
``B`` also regulates) receives the summed input displacement ``W_kA dx_A + W_kB dx_B``, and
``phi_k(u0 + a + b) - phi_k(u0) != [phi_k(u0 + a) - phi_k(u0)] + [phi_k(u0 + b) - phi_k(u0)]``.
Two inputs pushing a target the same way into its plateau give less than the sum
(buffering); a target held near its floor or ceiling in control cells barely responds to
either single but is moved off it by the two together (synergy); an input that saturates
the target hides the other's effect (suppression / epistasis). The interaction appears at
the first common target, one edge from the perturbed genes. (Saturating each regulator's
*output* instead, ``W phi(x)``, keeps the inputs of every gene additive: its interactions
appear only two edges downstream and, under the stability bound below, were about ten times
weaker.) A linear drift gives exactly additive stationary means.

Stability guarantee
-------------------
``decay = rho(|W| + delta 1 1^T) + margin`` for every gene, with ``rho`` the Perron root, a
tiny ``delta > 0`` and ``v > 0`` the Perron vector. For every state ``x`` the Jacobian
``J(x) = -diag(decay) + diag(phi'(u)) W`` has ``J_kk = -decay_k`` and ``|J_kj| <= |W_kj|``
off the diagonal, so its logarithmic norm in the weighted max-norm ``||x||_v = max_k |x_k| /
v_k`` is at most ``max_k ((-decay I + |W| + delta 1 1^T) v)_k / v_k = -margin``. The drift is
therefore contracting at rate ``margin`` for every shift: the deterministic system has a
unique, globally exponentially stable fixed point ``x*(c)``, and the SDE a unique stationary
law. The same bound makes the Euler map ``x + dt f(x)`` a contraction (factor
``1 - dt margin``) in ``||.||_v`` whenever ``dt * max(decay) <= 1`` (the default step has
``dt * max(decay + Lipschitz(phi(W .))) <= 0.02 * 2``), so Euler–Maruyama is stable
and two chains driven by the same noise merge. This is the sharp condition for contraction in
a weighted max-norm over all slopes ``phi' in [0, 1]``; it damps a random signed graph more than
the linear protocol's ``decay = max Re eig(W) + margin``, so off-target responses are weaker
than in the linear simulator with the same graph.

Stationary cells are drawn by Euler–Maruyama (:func:`stationary_cells`): all cells of all
conditions are one vectorised array of independent particles, started from the Gaussian
(linear-noise) approximation around the condition's fixed point and run for a burn-in of
several relaxation times of the slowest local mode.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
from scipy.linalg import solve_continuous_lyapunov

from .graphs import effect_matrix, random_graph_weights

__all__ = [
    "NonlinearSystem",
    "random_nonlinear_system",
    "regulatory_input",
    "drift",
    "jacobian",
    "fixed_point_float64",
    "relaxation_rate",
    "default_time_step",
    "stationary_cells",
]

# Perturbation of |W| that makes its Perron vector strictly positive (relative to max |W|).
_PERRON_DELTA = 1e-6
# Default Euler step: dt * max(decay). The Euler map contracts for <= 1; the relative bias
# of the stationary variance of a mode with rate lambda is dt * lambda / 2 <= 1 %.
_DT_DECAY = 0.02


class NonlinearSystem(NamedTuple):
    """A nonlinear latent causal diffusion ``dx = (-decay x + phi(W x + h) + b + c) dt + sigma dW``.

    Attributes
    ----------
    decay : numpy.ndarray, shape (genes,)
        Linear decay rates (positive).
    weights : numpy.ndarray, shape (genes, genes)
        Structural weights ``W``; ``W[k, j]`` is the effect of gene ``j`` on gene ``k``'s
        regulatory input. Zero diagonal.
    basal_drift : numpy.ndarray, shape (genes,)
        Basal drift ``b`` shared by all conditions.
    input_offset : numpy.ndarray, shape (genes,)
        Offsets ``h`` of the regulatory inputs ``u = W x + h``.
    saturation : float
        Saturation scale ``s`` in latent units; ``phi_k(u) = S_k tanh(u / S_k)`` with
        ``S_k = s decay_k``.
    sigma : float
        Scale of the isotropic Brownian noise.
    """

    decay: np.ndarray
    weights: np.ndarray
    basal_drift: np.ndarray
    input_offset: np.ndarray
    saturation: float
    sigma: float

    @property
    def structural_effect(self) -> np.ndarray:
        """Structural effects, shape (source, target): ``W.T`` with zero diagonal."""
        return effect_matrix(self.weights)

    @property
    def output_scale(self) -> np.ndarray:
        """``S = saturation * decay``, shape (genes,): the bound of ``|phi_k|``."""
        return self.saturation * np.asarray(self.decay, dtype=float)


def _perron_root(matrix: np.ndarray) -> float:
    """Perron root of a matrix with positive entries."""
    return float(np.max(np.linalg.eigvals(matrix).real))


def random_nonlinear_system(
    n_genes: int,
    *,
    expected_degree: float = 10.0,
    weight_range: tuple[float, float] = (1.0, 3.0),
    margin: float = 1.0,
    saturation: float = 1.0,
    control_mean_sd: float = 0.5,
    sigma: float = 1.0,
    rng: np.random.Generator | int,
) -> NonlinearSystem:
    """Draw a contracting nonlinear system on an Erdős–Rényi graph.

    The graph, weights and control means are drawn exactly like
    :func:`lcd_bayes.sim.linear.random_linear_system` (same calls in the same order), so a seed
    gives the same signed graph in both families; the sigmoid positions are drawn after them.

    Parameters
    ----------
    n_genes : int
        Number of genes ``d >= 2``.
    expected_degree : float
        Expected number of edges (in + out) per gene; each ordered pair is an edge with
        probability ``min(1, expected_degree / (2 (d - 1)))``.
    weight_range : (float, float)
        Range of edge weight magnitudes; signs are uniform.
    margin : float
        Guaranteed contraction rate: ``decay = rho(|W|) + margin`` (module docstring).
    saturation : float
        Saturation scale ``s`` in latent units (> 0).
    control_mean_sd : float
        Standard deviation of the per-gene control fixed point ``mu_0``.
    sigma : float
        Brownian noise scale.
    rng : numpy.random.Generator or int
        Random generator, or a seed for one.

    Returns
    -------
    NonlinearSystem
        With ``h = S z - W mu_0`` (control input ``S z``, ``z ~ N(0, 1)``) and
        ``b = decay mu_0 - phi(S z)``, so that ``mu_0`` is the control fixed point.
    """
    d = int(n_genes)
    low, high = (float(v) for v in weight_range)
    if not saturation > 0:
        raise ValueError(f"saturation must be > 0; got {saturation}")
    rng = np.random.default_rng(rng)

    weights = random_graph_weights(d, expected_degree, (low, high), rng)  # the linear simulator's graph
    control_mean = rng.normal(0.0, control_mean_sd, size=d)
    position = rng.standard_normal(d)  # control input of each gene, in units of S

    scale = max(float(np.abs(weights).max(initial=0.0)), 1.0)
    rho = _perron_root(np.abs(weights) + _PERRON_DELTA * scale)
    decay = np.full(d, rho + float(margin))
    output_scale = float(saturation) * decay
    control_input = output_scale * position
    input_offset = control_input - weights @ control_mean
    basal_drift = decay * control_mean - output_scale * np.tanh(position)
    return NonlinearSystem(
        decay=decay,
        weights=weights,
        basal_drift=basal_drift,
        input_offset=input_offset,
        saturation=float(saturation),
        sigma=float(sigma),
    )


def regulatory_input(system: NonlinearSystem, x: np.ndarray) -> np.ndarray:
    """Regulatory inputs ``u = W x + h``, shape like ``x``."""
    return np.asarray(x, dtype=float) @ system.weights.T + system.input_offset


def drift(system: NonlinearSystem, x: np.ndarray, shift: np.ndarray | float = 0.0) -> np.ndarray:
    """Drift ``f(x; c) = -decay x + phi(W x + h) + b + c``.

    Parameters
    ----------
    system : NonlinearSystem
    x : numpy.ndarray, shape (..., genes)
        States (any leading batch shape).
    shift : numpy.ndarray or float, broadcastable to ``x``
        Shift interventions ``c``.

    Returns
    -------
    numpy.ndarray, shape of ``x`` broadcast with ``shift``
    """
    x = np.asarray(x, dtype=float)
    S = system.output_scale
    regulation = S * np.tanh(regulatory_input(system, x) / S)
    return -system.decay * x + regulation + system.basal_drift + shift


def jacobian(system: NonlinearSystem, x: np.ndarray) -> np.ndarray:
    """Jacobian ``J[k, j] = d f_k / d x_j = -decay_k delta_kj + phi_k'(u_k) W_kj``.

    Parameters
    ----------
    x : numpy.ndarray, shape (..., genes)

    Returns
    -------
    numpy.ndarray, shape (..., genes, genes)
    """
    x = np.asarray(x, dtype=float)
    t = np.tanh(regulatory_input(system, x) / system.output_scale)
    jac = (1.0 - t * t)[..., :, None] * system.weights
    d = x.shape[-1]
    jac[..., np.arange(d), np.arange(d)] -= system.decay
    return jac


def fixed_point_float64(
    system: NonlinearSystem,
    shift: np.ndarray | float = 0.0,
    *,
    start: np.ndarray | None = None,
    tol: float = 1e-12,
    max_iter: int = 100_000,
) -> np.ndarray:
    """The unique fixed point ``x*`` with ``f(x*; c) = 0``, for one shift or a batch, in numpy float64.

    The simulator's own solver, for its truth (``uns["lcd_truth"]["fixed_point"]``, to ``tol``) and
    its cells' starts. The model and CLIPR solve fixed points of any drift function with
    ``lcd_bayes.dynamics.fixed_point.fixed_point`` instead: damped Newton in JAX (jittable,
    vmapped, differentiable), in the model's float32 and to its ``rtol``, from a given start.

    Picard iteration ``x <- (phi(W x + h) + b + c) / decay`` converges from any start: it is
    a contraction in the Perron-weighted max-norm with factor ``rho / (rho + margin)``. Three
    Newton steps (the Jacobian is nonsingular everywhere) then polish the root.

    Parameters
    ----------
    shift : numpy.ndarray or float, shape (genes,) or (conditions, genes)
    start : numpy.ndarray, optional
        Starting point(s), broadcastable to the shift's shape (default ``(b + c) / decay``).

    Returns
    -------
    numpy.ndarray, shape ``(genes,)`` or ``(conditions, genes)``
    """
    d = system.decay.size
    shift = np.asarray(shift, dtype=float)
    shape = np.broadcast_shapes(shift.shape, (d,))
    constant = np.broadcast_to(system.basal_drift + shift, shape)
    S = system.output_scale
    x = constant / system.decay if start is None else np.broadcast_to(start, shape).astype(float)
    for _ in range(max_iter):
        new = (S * np.tanh(regulatory_input(system, x) / S) + constant) / system.decay
        step = float(np.max(np.abs(new - x), initial=0.0))
        x = new
        if step <= tol * max(1.0, float(np.max(np.abs(x), initial=0.0))):
            break
    for _ in range(3):
        residual = drift(system, x, shift)
        x = x - np.linalg.solve(jacobian(system, x), residual[..., None])[..., 0]
    return x


def relaxation_rate(system: NonlinearSystem, points: np.ndarray) -> float:
    """Slowest local relaxation rate ``min_x -max Re eig J(x)`` over the rows of ``points``."""
    points = np.atleast_2d(np.asarray(points, dtype=float))
    return float(-np.max(np.linalg.eigvals(jacobian(system, points)).real))


def default_time_step(system: NonlinearSystem) -> float:
    """``0.02 / max(decay)``: the Euler map contracts and its variance bias is <= 1 %."""
    return _DT_DECAY / float(np.max(system.decay))


def _linear_noise_factors(system: NonlinearSystem, points: np.ndarray) -> np.ndarray:
    """Cholesky-like factors of the linear-noise covariances ``J S + S J^T + sigma^2 I = 0``."""
    d = points.shape[-1]
    factors = np.empty((points.shape[0], d, d))
    for q, jac in enumerate(jacobian(system, points)):
        covariance = solve_continuous_lyapunov(jac, -(system.sigma**2) * np.eye(d))
        values, vectors = np.linalg.eigh(0.5 * (covariance + covariance.T))
        factors[q] = vectors * np.sqrt(np.clip(values, 0.0, None))
    return factors


def _euler_step(system: NonlinearSystem, cell_shift: np.ndarray, dt: float, rng: np.random.Generator, shape):
    """One Euler–Maruyama step of every cell, in place (this loop is the whole cost of a
    simulation): ``x <- (1 - dt decay) x + dt S tanh((W x + h) / S) + dt (b + c) + sigma sqrt(dt) N(0, I)``;
    ``cell_shift`` (cells, genes) the shift ``c`` of each cell's condition."""
    S = system.output_scale
    weights_t = np.ascontiguousarray(system.weights.T / S)  # (W x + h) / S = x (W^T / S) + h / S
    offset = system.input_offset / S
    keep = 1.0 - dt * system.decay
    constant = dt * (system.basal_drift + cell_shift)
    noise_scale = system.sigma * np.sqrt(dt)
    regulation = np.empty(shape)
    noise = np.empty(shape)

    def step(x: np.ndarray) -> None:
        np.matmul(x, weights_t, out=regulation)
        np.add(regulation, offset, out=regulation)
        np.tanh(regulation, out=regulation)
        np.multiply(regulation, dt * S, out=regulation)
        np.multiply(x, keep, out=x)
        np.add(x, regulation, out=x)
        np.add(x, constant, out=x)
        rng.standard_normal(out=noise)
        np.multiply(noise, noise_scale, out=noise)
        np.add(x, noise, out=x)

    return step


def forward_cells(system: NonlinearSystem, cell_shift: np.ndarray, start: np.ndarray, time: float,
                  rng: np.random.Generator, *, dt: float | None = None) -> np.ndarray:
    """Cells that leave ``start`` (cells, genes) when their condition's shift ``cell_shift``
    (cells, genes) switches on, after ``time`` (rounded to a multiple of ``dt``; default
    :func:`default_time_step`) by Euler–Maruyama."""
    dt = default_time_step(system) if dt is None else dt
    x = np.array(start, dtype=float)
    step = _euler_step(system, np.asarray(cell_shift, dtype=float), dt, rng, x.shape)
    for _ in range(int(np.rint(time / dt))):
        step(x)
    return x


def stationary_cells(
    system: NonlinearSystem,
    condition_shift: np.ndarray,
    condition_index: np.ndarray,
    rng: np.random.Generator,
    *,
    dt: float | None = None,
    burn_in: float = 5.0,
    fixed_points: np.ndarray | None = None,
    extra_steps: int = 0,
) -> tuple[np.ndarray, dict]:
    """Stationary cells by Euler–Maruyama, every cell of every condition at once.

    Cell ``i`` starts at ``x*_q + L_q e_i`` (its condition's fixed point plus a draw from the
    linear-noise approximation, which is exact for a linear drift), then follows
    ``x <- x + dt f(x; c_q) + sigma sqrt(dt) N(0, I)`` for ``ceil(burn_in / (rate dt))`` steps,
    with ``rate`` the slowest relaxation rate of the Jacobians at the fixed points. Only the
    loop over time steps is Python; each step updates all cells.

    Parameters
    ----------
    system : NonlinearSystem
    condition_shift : numpy.ndarray, shape (conditions, genes)
        Summed shift ``c_q`` of each condition.
    condition_index : numpy.ndarray of int, shape (cells,)
        Condition of each cell.
    rng : numpy.random.Generator
    dt : float, optional
        Time step; default :func:`default_time_step`. Must satisfy ``dt * max(decay) <= 1``.
    burn_in : float
        Burn-in length in relaxation times ``1 / rate``.
    fixed_points : numpy.ndarray, shape (conditions, genes), optional
        The conditions' fixed points, if already computed.
    extra_steps : int
        Steps to run on after the burn-in; the states they end in are ``info["extra"]``
        (a stationarity check: they must follow the same law as ``cells``).

    Returns
    -------
    cells : numpy.ndarray, shape (cells, genes)
        Each cell's state at the end of the burn-in.
    info : dict
        ``dt``, ``n_steps`` (burn-in steps), ``rate`` and, if ``extra_steps > 0``, ``extra``
        (cells, genes): the states after the extra steps.
    """
    condition_shift = np.atleast_2d(np.asarray(condition_shift, dtype=float))
    condition_index = np.asarray(condition_index)
    if fixed_points is None:
        fixed_points = fixed_point_float64(system, condition_shift)
    if dt is None:
        dt = default_time_step(system)
    if not 0.0 < dt * float(np.max(system.decay)) <= 1.0:
        raise ValueError(f"dt must satisfy 0 < dt * max(decay) <= 1; got dt={dt}")
    if not burn_in > 0:
        raise ValueError(f"burn_in must be > 0; got {burn_in}")
    rate = relaxation_rate(system, fixed_points)
    n_steps = max(1, int(np.ceil(burn_in / (rate * dt))))

    factors = _linear_noise_factors(system, fixed_points)
    start_noise = rng.standard_normal(condition_index.shape + (system.decay.size,))
    x = fixed_points[condition_index]
    for q, factor in enumerate(factors):
        rows = condition_index == q
        x[rows] += start_noise[rows] @ factor.T
    step = _euler_step(system, condition_shift[condition_index], dt, rng, x.shape)
    for _ in range(n_steps):
        step(x)
    cells = x.copy()
    for _ in range(extra_steps):
        step(x)
    info = {"dt": float(dt), "n_steps": n_steps, "rate": rate}
    if extra_steps:
        info["extra"] = x
    return cells, info
