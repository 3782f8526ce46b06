"""Tests of the nonlinear latent causal diffusion simulator (genetic interactions)."""
import anndata
import numpy as np
import pytest

from lcd_bayes.sim import nonlinear as nl
from lcd_bayes.sim.linear import _draw_design, simulate, stationary_moments, truth_from_uns

SMALL = dict(n_genes=8, n_doubles=10, cells_per_condition=100)


def _system_and_design(seed=0, d=8, n_doubles=6, shift_range=(50.0, 100.0), sigma=1.0, **kwargs):
    system = nl.random_nonlinear_system(d, sigma=sigma, rng=seed, **kwargs)
    names = [f"G{g}" for g in range(d)]
    perturbations, _, conditions, condition_shift = _draw_design(
        names, d, n_doubles, shift_range, "random", np.random.default_rng(seed + 100)
    )
    return system, perturbations, conditions, condition_shift


def _double_z(adata):
    """(double - A - B + ctrl) of the observed condition means, in standard errors."""
    truth = truth_from_uns(adata)
    y = np.asarray(adata.X, dtype=float)
    labels = adata.obs["condition"].to_numpy()
    mean = {c: y[labels == c].mean(0) for c in truth["conditions"]}
    var = {c: y[labels == c].var(0, ddof=1) / np.sum(labels == c) for c in truth["conditions"]}
    z = []
    for label in truth["conditions"][1 + len(truth["perturbations"]):]:
        a, b = label.split("+")
        parts = (label, a, b, "ctrl")
        z.append((mean[label] - mean[a] - mean[b] + mean["ctrl"]) / np.sqrt(sum(var[p] for p in parts)))
    return np.array(z)


# --- 1. determinism; the linear path is unchanged -----------------------------


def test_nonlinear_reproducible_by_seed_and_from_recorded_arguments():
    first = simulate(**SMALL, drift="nonlinear", seed=3)
    second = simulate(**SMALL, drift="nonlinear", seed=3)
    other = simulate(**SMALL, drift="nonlinear", seed=4)
    np.testing.assert_array_equal(first.X, second.X)
    assert not np.array_equal(first.X, other.X)
    recorded = first.uns["lcd_simulation"]
    assert recorded["drift"] == "nonlinear" and recorded["saturation"] == 1.0
    np.testing.assert_array_equal(recorded["shift_range"], [50.0, 100.0])
    np.testing.assert_array_equal(simulate(**recorded).X, first.X)


def test_linear_path_unchanged():
    kwargs = dict(n_genes=5, n_doubles=2, cells_per_condition=3, seed=0)
    default, explicit = simulate(**kwargs), simulate(**kwargs, drift="linear")
    np.testing.assert_array_equal(default.X, explicit.X)
    # Fingerprints of the linear simulator before the nonlinear option existed.
    counts = default.layers["counts"]
    assert int(counts.sum()) == 3106
    np.testing.assert_array_equal(counts[:2], [[4, 2, 0, 0, 7], [10, 3, 2, 1, 38]])
    gaussian = simulate(**kwargs, likelihood="gaussian")
    np.testing.assert_allclose(
        gaussian.X[0], [0.15319806, -0.88079220, -0.13550441, 0.05058488, -0.69668603], rtol=1e-6
    )
    # Linear runs record exactly the arguments they always did (no drift / saturation).
    assert "drift" not in default.uns["lcd_simulation"]
    assert "saturation" not in default.uns["lcd_simulation"]
    np.testing.assert_array_equal(default.uns["lcd_simulation"]["shift_range"], [5.0, 15.0])
    assert "drift_family" not in default.uns["lcd_truth"]


def test_same_graph_in_both_families():
    linear = truth_from_uns(simulate(6, cells_per_condition=2, seed=5))
    nonlinear = truth_from_uns(simulate(6, cells_per_condition=2, seed=5, drift="nonlinear"))
    off_diagonal = ~np.eye(6, dtype=bool)
    np.testing.assert_array_equal(linear["drift"][off_diagonal], nonlinear["weights"][off_diagonal])


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(drift="quadratic"), "drift"), (dict(drift="nonlinear", saturation=0.0), "saturation")],
)
def test_argument_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        simulate(4, cells_per_condition=2, **kwargs)


# --- 2. the fixed point ------------------------------------------------------


def test_fixed_point_is_the_unique_root():
    system, _, _, condition_shift = _system_and_design(seed=1)
    fixed = nl.fixed_point_float64(system, condition_shift)
    assert np.max(np.abs(nl.drift(system, fixed, condition_shift))) < 1e-9
    # Far-away starts converge to the same point.
    rng = np.random.default_rng(0)
    for scale in (10.0, 100.0):
        start = fixed + scale * rng.standard_normal(fixed.shape)
        np.testing.assert_allclose(nl.fixed_point_float64(system, condition_shift, start=start), fixed, atol=1e-9)
    # Single shift -> 1-D fixed point.
    assert nl.fixed_point_float64(system, condition_shift[1]).shape == (8,)
    np.testing.assert_allclose(nl.fixed_point_float64(system, condition_shift[1]), fixed[1], atol=1e-9)


def test_contraction_guarantee():
    """Every Jacobian has weighted max-norm log-norm <= -margin (Perron weights of |W|)."""
    margin = 0.7
    system = nl.random_nonlinear_system(10, expected_degree=5.0, margin=margin, rng=2)
    values, vectors = np.linalg.eig(np.abs(system.weights) + 1e-6 * np.abs(system.weights).max())
    v = np.abs(vectors[:, np.argmax(values.real)].real)
    states = 5.0 * np.random.default_rng(1).standard_normal((200, 10))
    for jac in nl.jacobian(system, states):
        majorant = np.abs(jac)
        np.fill_diagonal(majorant, np.diag(jac))
        assert np.max(majorant @ v / v) <= -margin + 1e-6
        assert np.max(np.linalg.eigvals(jac).real) < -margin + 1e-6


# --- 3. Euler-Maruyama stationary cells --------------------------------------


def test_cells_centre_on_fixed_point_for_small_noise():
    sigma = 0.05
    system, _, _, condition_shift = _system_and_design(seed=2, sigma=sigma)
    fixed = nl.fixed_point_float64(system, condition_shift)
    index = np.repeat(np.arange(condition_shift.shape[0]), 100)
    cells, info = nl.stationary_cells(system, condition_shift, index, np.random.default_rng(0))
    assert info["dt"] * np.max(system.decay) <= 0.02 + 1e-12
    assert info["n_steps"] * info["dt"] * info["rate"] >= 5.0
    for q in range(condition_shift.shape[0]):
        rows = cells[index == q]
        se = rows.std(0, ddof=1) / np.sqrt(rows.shape[0])
        # Monte-Carlo error plus an O(sigma^2) nonlinear bias of the mean.
        assert np.all(np.abs(rows.mean(0) - fixed[q]) < 5 * se + sigma**2), q


def test_burn_in_reached_stationarity():
    system, _, _, condition_shift = _system_and_design(seed=3, sigma=1.0)
    index = np.repeat(np.arange(condition_shift.shape[0]), 200)
    cells, info = nl.stationary_cells(
        system, condition_shift, index, np.random.default_rng(1), extra_steps=0
    )
    # Run on for as long again: the law must not drift (first vs second half of the run).
    _, more = nl.stationary_cells(
        system, condition_shift, index, np.random.default_rng(1), extra_steps=info["n_steps"]
    )
    later = more["extra"]
    assert later.shape == cells.shape
    spread = []
    for q in range(condition_shift.shape[0]):
        a, b = cells[index == q], later[index == q]
        se = np.sqrt((a.var(0, ddof=1) + b.var(0, ddof=1)) / a.shape[0])
        assert np.all(np.abs(a.mean(0) - b.mean(0)) < 5 * se), q
        spread.append((a - a.mean(0), b - b.mean(0)))
    # Per-gene variances pooled over conditions (3,000 cells: ~3 % Monte-Carlo error).
    first = np.concatenate([a for a, _ in spread]).var(0)
    second = np.concatenate([b for _, b in spread]).var(0)
    np.testing.assert_allclose(first, second, rtol=0.12)


def test_linear_limit_matches_exact_stationary_law():
    """With a huge saturation scale phi is the identity: EM must reproduce the linear law."""
    from lcd_bayes.sim.linear import LinearSystem

    drawn, _, _, condition_shift = _system_and_design(seed=4, d=6, n_doubles=3)
    # Inputs near 0 and S = 1e6 decay: phi(u) = u to ~1e-12.
    system = drawn._replace(input_offset=np.zeros(6), saturation=1e6)
    linear = LinearSystem(
        drift=system.weights - np.diag(system.decay), basal_drift=system.basal_drift, sigma=1.0
    )
    mean, covariance = stationary_moments(linear, condition_shift)
    np.testing.assert_allclose(nl.fixed_point_float64(system, condition_shift), mean, atol=1e-6)
    index = np.zeros(4000, dtype=int)
    cells, _ = nl.stationary_cells(system, condition_shift[:1], index, np.random.default_rng(2))
    np.testing.assert_allclose(np.cov(cells, rowvar=False), covariance, atol=0.05 * covariance.max())


# --- 4. genetic interactions -------------------------------------------------


def test_doubles_are_not_additive_but_linear_doubles_are():
    kwargs = dict(**SMALL, likelihood="gaussian", seed=0)
    nonlinear = simulate(**kwargs, drift="nonlinear")
    z = _double_z(nonlinear)
    assert np.abs(z).max() > 10
    assert np.sum(np.abs(z).max(axis=1) > 5) >= 3  # several doubles, not one
    assert np.abs(truth_from_uns(nonlinear)["nonadditivity"]).max() > 0.5

    linear = simulate(**kwargs)
    assert np.abs(_double_z(linear)).max() < 5
    truth = truth_from_uns(linear)
    mean, p = truth["condition_mean"], len(truth["perturbations"])
    row = {label: q for q, label in enumerate(truth["conditions"])}
    for label in truth["conditions"][1 + p:]:
        a, b = label.split("+")
        additive = mean[row[a]] + mean[row[b]] - mean[0]
        np.testing.assert_allclose(mean[row[label]], additive, atol=1e-9)


def test_nonadditivity_matches_fixed_points():
    truth = truth_from_uns(simulate(**SMALL, drift="nonlinear", seed=1))
    fixed, p = truth["fixed_point"], len(truth["perturbations"])
    row = {label: q for q, label in enumerate(truth["conditions"])}
    doubles = truth["conditions"][1 + p:]
    assert truth["nonadditivity"].shape == (len(doubles), 8)
    for i, label in enumerate(doubles):
        a, b = label.split("+")
        expected = fixed[row[label]] - fixed[row[a]] - fixed[row[b]] + fixed[0]
        np.testing.assert_allclose(truth["nonadditivity"][i], expected, atol=1e-10)


# --- 5. truth ------------------------------------------------------------------


def test_truth_keys_and_effect_is_the_jacobian(tmp_path):
    adata = simulate(**SMALL, drift="nonlinear", seed=2)
    truth = truth_from_uns(adata)
    d = 8
    for key in ("weights", "structural_effect", "input_offset", "fixed_point", "nonadditivity",
                "saturation", "euler_dt", "euler_steps", "condition_mean", "effect", "drift"):
        assert key in truth, key
    assert truth["drift_family"] == "nonlinear"
    effect = truth["effect"]
    assert effect.shape == (d, d) and np.all(np.diag(effect) == 0)
    structural = truth["weights"].T.copy()
    np.fill_diagonal(structural, 0.0)
    np.testing.assert_array_equal(truth["structural_effect"], structural)

    system = nl.NonlinearSystem(
        decay=truth["decay"], weights=truth["weights"], basal_drift=truth["basal_drift"],
        input_offset=truth["input_offset"], saturation=truth["saturation"], sigma=truth["sigma"],
    )
    control = truth["fixed_point"][0]
    step = 1e-6
    numerical = np.empty((d, d))  # numerical[j, k] = d f_k / d x_j
    for j in range(d):
        e = np.zeros(d)
        e[j] = step
        numerical[j] = (nl.drift(system, control + e) - nl.drift(system, control - e)) / (2 * step)
    np.fill_diagonal(numerical, 0.0)
    np.testing.assert_allclose(effect, numerical, atol=1e-6)
    # Saturated targets weaken the effective edges, never strengthen them.
    assert np.all(np.abs(effect) <= np.abs(structural) + 1e-12)

    # Monte-Carlo condition means sit near the fixed points; everything survives h5ad.
    assert truth["condition_mean"].shape == truth["fixed_point"].shape
    assert np.median(np.abs(truth["condition_mean"] - truth["fixed_point"])) < 0.05
    path = tmp_path / "nonlinear.h5ad"
    adata.write_h5ad(path)
    loaded = anndata.read_h5ad(path)
    np.testing.assert_array_equal(simulate(**loaded.uns["lcd_simulation"]).X, adata.X)
    again = truth_from_uns(loaded)
    assert again.keys() == truth.keys()
    for key, value in truth.items():
        if isinstance(value, np.ndarray):
            np.testing.assert_array_equal(again[key], value, err_msg=key)
        else:
            assert again[key] == value, key


def test_no_doubles_round_trip(tmp_path):
    adata = simulate(5, cells_per_condition=3, drift="nonlinear", seed=0)
    assert truth_from_uns(adata)["nonadditivity"].shape == (0, 5)
    path = tmp_path / "singles.h5ad"
    adata.write_h5ad(path)
    assert truth_from_uns(anndata.read_h5ad(path))["nonadditivity"].shape == (0, 5)
