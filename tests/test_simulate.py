"""Tests of the linear latent causal diffusion simulator."""
import anndata
import numpy as np
import pytest

from lcd_bayes.sim.linear import (
    LinearSystem,
    random_linear_system,
    simulate,
    stationary_moments,
    truth_from_uns,
)


def _condition_rows(adata, label):
    return np.asarray(adata.obs["condition"] == label)


# --- determinism -------------------------------------------------------------


def test_same_seed_same_data_different_seed_different_data():
    kwargs = dict(n_genes=6, n_doubles=2, cells_per_condition=20)
    first, second = simulate(**kwargs, seed=3), simulate(**kwargs, seed=3)
    other = simulate(**kwargs, seed=4)
    np.testing.assert_array_equal(first.X, second.X)
    np.testing.assert_array_equal(first.layers["counts"], second.layers["counts"])
    assert list(first.obs["condition"]) == list(second.obs["condition"])
    np.testing.assert_array_equal(truth_from_uns(first)["drift"], truth_from_uns(second)["drift"])
    assert not np.array_equal(first.X, other.X)
    assert not np.array_equal(truth_from_uns(first)["drift"], truth_from_uns(other)["drift"])


def test_likelihood_does_not_change_the_system():
    # Separate random streams per stage: the graph depends on the seed only.
    nb = truth_from_uns(simulate(6, cells_per_condition=5, likelihood="nb"))
    gauss = truth_from_uns(simulate(6, cells_per_condition=5, likelihood="gaussian", n_doubles=3))
    np.testing.assert_array_equal(nb["drift"], gauss["drift"])


# --- the linear system -------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("margin", [0.5, 1.0, 2.0])
def test_drift_is_stable_with_abscissa_minus_margin(seed, margin):
    system = random_linear_system(8, expected_degree=4.0, margin=margin, rng=seed)
    eigenvalues = np.linalg.eigvals(system.drift)
    assert np.all(eigenvalues.real < 0)
    assert np.max(eigenvalues.real) == pytest.approx(-margin, abs=1e-6)
    assert np.all(np.diag(system.drift) < 0)


def test_empty_graph_is_stable():
    system = random_linear_system(5, expected_degree=0.0, margin=1.5, rng=0)
    np.testing.assert_allclose(system.drift, -1.5 * np.eye(5), atol=1e-12)


def test_effect_orientation_and_weights():
    system = random_linear_system(7, expected_degree=6.0, weight_range=(1.0, 3.0), rng=1)
    d = system.drift.shape[0]
    effect = system.effect
    for j in range(d):
        for k in range(d):
            expected = 0.0 if j == k else system.drift[k, j]
            assert effect[j, k] == expected
    magnitudes = np.abs(effect[effect != 0])
    assert magnitudes.size > 0
    assert np.all((magnitudes >= 1.0) & (magnitudes <= 3.0))


def test_effect_matrix_in_truth():
    truth = truth_from_uns(simulate(5, cells_per_condition=2))
    effect = truth["drift"].T.copy()
    np.fill_diagonal(effect, 0.0)
    np.testing.assert_array_equal(truth["effect"], effect)


def test_edge_density_matches_expected_degree():
    d, expected_degree = 60, 10.0
    degrees = []
    for seed in range(3):
        system = random_linear_system(d, expected_degree=expected_degree, rng=seed)
        n_edges = np.count_nonzero(system.effect)
        degrees.append(2.0 * n_edges / d)  # each edge adds one in- and one out-degree
    assert np.mean(degrees) == pytest.approx(expected_degree, rel=0.25)


def test_basal_drift_centres_control_on_control_mean():
    adata = simulate(5, cells_per_condition=2, likelihood="gaussian")
    truth = truth_from_uns(adata)
    system = LinearSystem(truth["drift"], truth["basal_drift"], truth["sigma"])
    mean, _ = stationary_moments(system, np.zeros(5))
    np.testing.assert_allclose(mean, truth["control_mean"], atol=1e-10)
    np.testing.assert_allclose(truth["drift"] @ truth["control_mean"] + truth["basal_drift"], 0, atol=1e-10)
    assert truth["conditions"][0] == "ctrl"
    np.testing.assert_allclose(truth["condition_mean"][0], truth["control_mean"])


def test_stationary_covariance_solves_lyapunov():
    system = random_linear_system(6, sigma=0.7, rng=0)
    mean, covariance = stationary_moments(system, np.ones(6))
    residual = system.drift @ covariance + covariance @ system.drift.T + 0.49 * np.eye(6)
    np.testing.assert_allclose(residual, 0, atol=1e-9)
    np.testing.assert_allclose(system.drift @ mean + system.basal_drift + 1.0, 0, atol=1e-9)
    np.testing.assert_array_equal(covariance, covariance.T)
    batch_mean, _ = stationary_moments(system, np.stack([np.zeros(6), np.ones(6)]))
    np.testing.assert_allclose(batch_mean[1], mean)


# --- perturbations -----------------------------------------------------------


def test_singles_have_on_target_shifts():
    adata = simulate(8, n_perturbed=0.5, cells_per_condition=2, shift_range=(5.0, 15.0))
    truth = truth_from_uns(adata)
    assert len(truth["perturbations"]) == 4
    for label, shift in zip(truth["perturbations"], truth["shift"]):
        assert truth["targets"][label] == [label]
        gene = list(adata.var_names).index(label)
        assert np.count_nonzero(shift) == 1
        assert 5.0 <= abs(shift[gene]) <= 15.0


@pytest.mark.parametrize("sign, check", [("positive", np.greater), ("negative", np.less)])
def test_shift_sign(sign, check):
    truth = truth_from_uns(simulate(6, cells_per_condition=2, shift_sign=sign))
    on_target = truth["shift"][truth["shift"] != 0]
    assert on_target.size == 6 and np.all(check(on_target, 0))


def test_doubles_mean_is_stationary_mean_of_summed_shift():
    adata = simulate(6, n_doubles=4, cells_per_condition=2)
    truth = truth_from_uns(adata)
    doubles = [label for label in truth["conditions"] if "+" in label]
    assert len(doubles) == len(set(doubles)) == 4
    assert set(adata.obs["condition"]) == set(truth["conditions"])
    for label in doubles:
        first, second = label.split("+")
        assert [first, second] == sorted([first, second])
        shift = truth["shift"][truth["perturbations"].index(first)] + truth["shift"][
            truth["perturbations"].index(second)
        ]
        expected = -np.linalg.solve(truth["drift"], truth["basal_drift"] + shift)
        np.testing.assert_allclose(truth["condition_mean"][truth["conditions"].index(label)], expected)


def test_cells_per_condition():
    adata = simulate(5, n_perturbed=2, n_doubles=1, cells_per_condition=7)
    counts = adata.obs["condition"].value_counts()
    assert len(counts) == 4 and np.all(counts == 7)
    assert adata.n_obs == 28
    assert list(adata.var_names) == [f"G{g}" for g in range(5)]


# --- latent states -----------------------------------------------------------


def test_gaussian_cells_match_stationary_moments():
    n = 4000
    adata = simulate(4, n_perturbed=1, cells_per_condition=n, likelihood="gaussian", noise_sd=0.0, seed=5)
    truth = truth_from_uns(adata)
    covariance = truth["covariance"]
    pooled = []
    for q, label in enumerate(truth["conditions"]):
        cells = np.asarray(adata.X[_condition_rows(adata, label)], dtype=float)
        standard_error = np.sqrt(np.diag(covariance) / n)
        assert np.all(np.abs(cells.mean(0) - truth["condition_mean"][q]) < 5 * standard_error)
        pooled.append(cells - cells.mean(0))
    pooled = np.concatenate(pooled)
    empirical = pooled.T @ pooled / (pooled.shape[0] - len(truth["conditions"]))
    # Standard error of a Gaussian sample covariance entry.
    variance = np.diag(covariance)
    standard_error = np.sqrt((np.outer(variance, variance) + covariance**2) / pooled.shape[0])
    assert np.all(np.abs(empirical - covariance) < 5 * standard_error)


def test_gaussian_has_no_counts():
    adata = simulate(4, cells_per_condition=3, likelihood="gaussian")
    assert "counts" not in adata.layers
    assert "size_factor" not in adata.obs
    assert "gene_scale" not in truth_from_uns(adata)


# --- counts ------------------------------------------------------------------


@pytest.mark.parametrize("likelihood", ["nb", "poisson"])
def test_counts_are_non_negative_integers(likelihood):
    adata = simulate(6, cells_per_condition=30, likelihood=likelihood)
    counts = adata.layers["counts"]
    assert np.issubdtype(counts.dtype, np.integer)
    assert counts.min() >= 0 and counts.sum() > 0
    assert adata.X.dtype == np.float32
    np.testing.assert_array_equal(adata.X, counts.astype(np.float32))
    assert np.all(adata.obs["size_factor"] > 0)
    truth = truth_from_uns(adata)
    assert truth["gene_scale"].shape == (6,)
    assert ("concentration" in truth) == (likelihood == "nb")


def test_nb_is_overdispersed_relative_to_poisson():
    kwargs = dict(n_genes=5, n_perturbed=1, cells_per_condition=300, size_factor_sd=0.0)
    ratios = {}
    for likelihood in ["nb", "poisson"]:
        adata = simulate(**kwargs, likelihood=likelihood)
        ctrl = adata.layers["counts"][_condition_rows(adata, "ctrl")].astype(float)
        ratios[likelihood] = np.mean(ctrl.var(0) / ctrl.mean(0))
    assert ratios["nb"] > ratios["poisson"]


@pytest.mark.parametrize("link", ["softplus", "exp"])
def test_expected_counts_follow_the_link(link):
    """E[y_g] = E[s] u_g E[link(x_g)] with x ~ N(mu, Sigma): the link the data were drawn through."""
    adata = simulate(4, n_perturbed=1, cells_per_condition=20000, likelihood="poisson", link=link,
                     size_factor_sd=0.0, seed=3)
    truth = truth_from_uns(adata)
    mean, sd = truth["control_mean"], np.sqrt(np.diag(truth["covariance"]))
    nodes, weights = np.polynomial.hermite_e.hermegauss(40)
    x = mean[:, None] + sd[:, None] * nodes
    rate = np.exp(x) if link == "exp" else np.logaddexp(0.0, x)
    expected = truth["gene_scale"] * (rate @ weights) / weights.sum()
    observed = adata.layers["counts"][_condition_rows(adata, "ctrl")].mean(axis=0)
    np.testing.assert_allclose(observed, expected, rtol=0.05)
    assert ("link" in adata.uns["lcd_simulation"]) == (link != "softplus")


# --- batches -----------------------------------------------------------------


def test_one_batch_is_the_screen_without_batches():
    kwargs = dict(n_genes=5, n_doubles=2, cells_per_condition=10, seed=2)
    before = simulate(**kwargs)
    one = simulate(**kwargs, n_batches=1, batch_scale_sd=0.7, batch_basal_sd=0.5)
    np.testing.assert_array_equal(one.X, before.X)
    np.testing.assert_array_equal(one.layers["counts"], before.layers["counts"])
    assert list(one.obs.columns) == list(before.obs.columns) and "batch" not in one.obs
    assert one.uns["lcd_simulation"].keys() == before.uns["lcd_simulation"].keys()
    assert truth_from_uns(one).keys() == truth_from_uns(before).keys()


@pytest.mark.parametrize("likelihood", ["nb", "gaussian"])
def test_batches_without_effects_leave_the_cells_unchanged(likelihood):
    # The batches draw from their own stream: only the effects move the cells.
    kwargs = dict(n_genes=5, cells_per_condition=10, likelihood=likelihood, seed=1)
    np.testing.assert_array_equal(simulate(**kwargs, n_batches=3).X, simulate(**kwargs).X)


def test_batches_are_recorded_and_reproducible(tmp_path):
    adata = simulate(5, n_perturbed=2, cells_per_condition=30, n_batches=3, batch_scale_sd=0.3,
                     batch_basal_sd=0.5, seed=4)
    assert list(adata.obs["batch"].cat.categories) == ["batch0", "batch1", "batch2"]
    assert set(adata.obs["batch"]) == {"batch0", "batch1", "batch2"}
    recorded = adata.uns["lcd_simulation"]
    assert (recorded["n_batches"], recorded["batch_scale_sd"], recorded["batch_basal_sd"]) == (3, 0.3, 0.5)
    truth = truth_from_uns(adata)
    assert truth["batches"] == ["batch0", "batch1", "batch2"]
    for key in ("batch_basal_shift", "batch_mean_shift", "batch_log_scale"):
        assert truth[key].shape == (3, 5), key
    np.testing.assert_allclose(truth["drift"] @ truth["batch_mean_shift"].T + truth["batch_basal_shift"].T, 0,
                               atol=1e-10)
    # condition_mean stays the batch-free stationary mean.
    np.testing.assert_allclose(truth["drift"] @ truth["control_mean"] + truth["basal_drift"], 0, atol=1e-10)
    path = tmp_path / "batches.h5ad"
    adata.write_h5ad(path)
    loaded = anndata.read_h5ad(path)
    again = simulate(**loaded.uns["lcd_simulation"])
    np.testing.assert_array_equal(again.X, adata.X)
    assert list(again.obs["batch"]) == list(adata.obs["batch"])
    np.testing.assert_array_equal(truth_from_uns(loaded)["batch_mean_shift"], truth["batch_mean_shift"])
    assert truth_from_uns(loaded)["batches"] == truth["batches"]
    other = simulate(**{**recorded, "seed": 5})
    assert list(other.obs["batch"]) != list(adata.obs["batch"])


def test_basal_shift_is_in_units_of_each_genes_own_response():
    kwargs = dict(n_genes=5, cells_per_condition=2, likelihood="gaussian", n_batches=2, seed=3)
    unit = truth_from_uns(simulate(**kwargs, batch_basal_sd=1.0))
    half = truth_from_uns(simulate(**kwargs, batch_basal_sd=0.5))
    relative = unit["batch_basal_shift"] / unit["decay"]
    np.testing.assert_allclose(half["batch_basal_shift"], 0.5 * unit["batch_basal_shift"])
    assert np.all(np.abs(relative) < 5.0) and np.std(relative) > 0.3


def test_batch_means_are_the_shifted_stationary_means():
    n = 3000
    noise_sd = 0.05
    adata = simulate(4, n_perturbed=1, cells_per_condition=n, likelihood="gaussian", noise_sd=noise_sd,
                     n_batches=3, batch_basal_sd=1.0, batch_scale_sd=0.5, seed=6)
    truth = truth_from_uns(adata)
    assert np.all(np.abs(truth["batch_mean_shift"]) > 0) and np.all(np.abs(truth["batch_log_scale"]) > 0)
    sd = np.sqrt(np.diag(truth["covariance"]) + noise_sd**2)
    for q, label in enumerate(truth["conditions"]):
        for b, batch in enumerate(truth["batches"]):
            rows = _condition_rows(adata, label) & np.asarray(adata.obs["batch"] == batch)
            expected = truth["condition_mean"][q] + truth["batch_mean_shift"][b] + truth["batch_log_scale"][b]
            mean = np.asarray(adata.X[rows], dtype=float).mean(0)
            assert np.all(np.abs(mean - expected) < 5 * sd / np.sqrt(rows.sum())), (label, batch)


@pytest.mark.parametrize("likelihood", ["poisson", "nb"])
def test_batch_scale_multiplies_the_counts(likelihood):
    adata = simulate(4, n_perturbed=1, cells_per_condition=6000, likelihood=likelihood, size_factor_sd=0.0,
                     n_batches=2, batch_scale_sd=0.5, seed=7)
    truth = truth_from_uns(adata)
    counts = adata.layers["counts"].astype(float)
    ctrl = _condition_rows(adata, "ctrl")
    means, variances, sizes = [], [], []
    for batch in truth["batches"]:
        block = counts[ctrl & np.asarray(adata.obs["batch"] == batch)]
        means.append(block.mean(0)), variances.append(block.var(0)), sizes.append(len(block))
    # Delta method: the standard error of the log ratio of two independent means.
    standard_error = np.sqrt(sum(v / (n * m**2) for m, v, n in zip(means, variances, sizes)))
    log_ratio = np.log(means[1] / means[0])
    expected = truth["batch_log_scale"][1] - truth["batch_log_scale"][0]
    assert np.max(np.abs(expected) / standard_error) > 20  # the effect is visible at this size
    assert np.all(np.abs(log_ratio - expected) < 5 * standard_error)


@pytest.mark.parametrize("kwargs", [dict(drift="nonlinear"), dict(times=[0.5])])
def test_batches_need_a_linear_stationary_screen(kwargs):
    with pytest.raises(ValueError, match="not supported"):
        simulate(4, cells_per_condition=2, n_batches=2, **kwargs)


def test_the_independent_screens_batches():
    from independent_screen import independent_screen

    kwargs = dict(n_genes=5, cells_per_condition=4000, seed=1)
    plain = independent_screen(**kwargs)
    same = independent_screen(**kwargs, n_batches=3, batch_sds=0.0, batch_scale_sd=0.0)
    np.testing.assert_array_equal(same.X, plain.X)  # the batches draw from a stream of their own
    assert "batch" not in plain.obs
    adata = independent_screen(**kwargs, n_batches=2)
    truth = adata.uns["independent_truth"]
    ctrl = np.asarray(adata.obs["perturbation"] == "control")
    reference = np.asarray(plain.X[ctrl], dtype=float)
    for b, batch in enumerate(["batch0", "batch1"]):
        rows = ctrl & np.asarray(adata.obs["batch"] == batch)
        assert rows.sum() == 2000  # every condition is dealt evenly over the batches
        # Same cells as the plain screen, moved by the batch's mean shift and offset (Gaussian).
        moved = np.asarray(adata.X[rows], dtype=float).mean(0) - reference[rows[ctrl]].mean(0)
        np.testing.assert_allclose(moved, truth["batch_mean_shift"][b] + truth["batch_log_scale"][b], atol=1e-4)


# --- storage -----------------------------------------------------------------


def test_truth_round_trips_through_h5ad(tmp_path):
    adata = simulate(6, n_perturbed=4, n_doubles=2, cells_per_condition=5)
    path = tmp_path / "sim.h5ad"
    adata.write_h5ad(path)
    loaded = anndata.read_h5ad(path)
    before, after = truth_from_uns(adata), truth_from_uns(loaded)
    assert before.keys() == after.keys()
    for key, value in before.items():
        if isinstance(value, np.ndarray):
            np.testing.assert_array_equal(after[key], value, err_msg=key)
            assert isinstance(after[key], np.ndarray)
        else:
            assert after[key] == value, key
    assert isinstance(after["perturbations"], list) and isinstance(after["targets"], dict)
    assert list(loaded.obs["condition"]) == list(adata.obs["condition"])
    np.testing.assert_array_equal(loaded.layers["counts"], adata.layers["counts"])
    # The recorded arguments reproduce the run, also after the round trip.
    again = simulate(**loaded.uns["lcd_simulation"])
    np.testing.assert_array_equal(again.X, adata.X)


def test_none_seed_is_recorded_and_reproducible():
    adata = simulate(4, cells_per_condition=3, seed=None)
    again = simulate(**adata.uns["lcd_simulation"])
    np.testing.assert_array_equal(again.X, adata.X)


def test_truth_from_uns_without_truth():
    with pytest.raises(ValueError, match="lcd_truth"):
        truth_from_uns(anndata.AnnData(np.zeros((2, 2), dtype=np.float32)))


# --- validation --------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(n_genes=1), "n_genes"),
        (dict(n_genes=2.5), "n_genes"),
        (dict(cells_per_condition=1), "cells_per_condition"),
        (dict(n_genes=4, n_perturbed=3, n_doubles=4), "n_doubles"),
        (dict(n_doubles=-1), "n_doubles"),
        (dict(likelihood="zinb"), "likelihood"),
        (dict(shift_sign="up"), "shift_sign"),
        (dict(link="log"), "link"),
        (dict(n_perturbed=0), "n_perturbed"),
        (dict(n_genes=4, n_perturbed=5), "n_perturbed"),
        (dict(n_perturbed=1.5), "n_perturbed"),
        (dict(weight_range=(3.0, 1.0)), "weight_range"),
        (dict(shift_range=(1.0,)), "shift_range"),
        (dict(margin=0.0), "margin"),
        (dict(noise_sd=-1.0), "noise_sd"),
        (dict(n_batches=0), "n_batches"),
        (dict(n_batches=2.0), "n_batches"),
        (dict(n_batches=2, batch_scale_sd=-0.1), "batch_scale_sd"),
        (dict(n_batches=2, batch_basal_sd=float("nan")), "batch_basal_sd"),
    ],
)
def test_argument_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        simulate(**kwargs)


def test_n_perturbed_forms():
    labels = lambda **kw: truth_from_uns(simulate(10, cells_per_condition=2, **kw))["perturbations"]
    assert len(labels()) == 10
    assert len(labels(n_perturbed=1)) == 1
    assert len(labels(n_perturbed=1.0)) == 10
    assert len(labels(n_perturbed=0.3)) == 3
    assert len(labels(n_perturbed=0.01)) == 1
    assert len(labels(n_perturbed=np.int64(4))) == 4
