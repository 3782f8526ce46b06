"""Time courses: cells after a perturbation switches on in control cells, from the simulator run forward
in time (exact Ornstein-Uhlenbeck transition) and from a run's posterior (the mean relaxing as exp(A t))."""
import anndata
import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

import lcd_bayes as lb
from lcd_bayes.analysis.predict import parse_times, predict_posterior, trajectory_table
from lcd_bayes.cli import main
from lcd_bayes.config import RunConfig
from lcd_bayes.inference.posterior import Coords, to_datatree
from lcd_bayes.io.run_folder import data_record
from lcd_bayes.io.screen import DataError, load_perturbation_data
from lcd_bayes.sim.linear import LIBRARY_SIZE_KEY, simulate, truth_from_uns

TIMES = [0.0, 0.1, 0.3, 1.0, 3.0]
LATE = 60.0  # many relaxation times (the slowest rate is the simulator's margin, 1)


def truth_posterior(adata, data, n_draws: int = 4):
    """A posterior whose every draw is the simulation's truth (as tests/test_ppc.py builds it)."""
    truth = truth_from_uns(adata)
    shift = truth["shift"][[truth["perturbations"].index(p) for p in data.perturbations]]
    draws = {"drift": truth["drift"], "basal_drift": truth["basal_drift"], "self_decay": truth["decay"],
             "shift": shift, "stationary_sd": np.sqrt(np.diag(truth["covariance"]))}
    if "gene_scale" in truth:
        draws.update(gene_scale=truth["gene_scale"], concentration=truth["concentration"])
    else:
        draws.update(noise_sd=np.full(len(data.genes), 0.1))
    draws = {name: np.repeat(np.asarray(value, np.float32)[None], n_draws, axis=0) for name, value in draws.items()}
    return to_datatree(draws, Coords(data.genes, data.conditions, data.perturbations))


def test_simulator_forward_in_time_follows_the_exact_transition():
    """Cells drawn by the exact transition have the closed-form mean at every time, the stationary
    covariance throughout, the control's law at t = 0 and the condition's stationary law late."""
    sim = simulate(4, n_perturbed=2, cells_per_condition=3000, likelihood="gaussian", noise_sd=0.0, seed=1,
                   times=[0.0, 0.3, LATE])
    truth = truth_from_uns(sim)
    assert list(sim.obs.columns) == ["condition", "time"] and sim.n_obs == 3 * 3 * 3000
    expected = truth["trajectory_mean"]  # (conditions, times, genes)
    np.testing.assert_allclose(expected[:, 0], np.broadcast_to(truth["control_mean"], expected[:, 0].shape))
    np.testing.assert_allclose(expected[:, -1], truth["condition_mean"], atol=1e-9)
    for q, condition in enumerate(truth["conditions"]):
        for t, time in enumerate(truth["times"]):
            cells = np.asarray(sim.X[(sim.obs["condition"] == condition).to_numpy() & (sim.obs["time"] == time).to_numpy()],
                               float)
            standard_error = np.sqrt(np.diag(truth["covariance"]) / len(cells))
            assert np.all(np.abs(cells.mean(axis=0) - expected[q, t]) < 4.5 * standard_error), (condition, time)
            np.testing.assert_allclose(np.cov(cells, rowvar=False), truth["covariance"], atol=0.1 * truth["covariance"].max())
    # The truth of the stationary screen is the same system: times change only how cells are drawn.
    stationary = truth_from_uns(simulate(4, n_perturbed=2, cells_per_condition=5, likelihood="gaussian", seed=1))
    np.testing.assert_array_equal(stationary["drift"], truth["drift"])
    with pytest.raises(ValueError, match="finite numbers >= 0"):
        simulate(4, times=[-1.0])


@pytest.fixture(scope="module")
def gaussian_truth():
    adata = simulate(5, n_perturbed=3, n_doubles=1, cells_per_condition=50, likelihood="gaussian", seed=0)
    data = load_perturbation_data(adata, continuous=True)
    return adata, truth_posterior(adata, data), RunConfig().replace(model={"likelihood": "gaussian"}), data_record(data)


def test_closed_form_trajectory_is_the_simulators_mean(gaussian_truth):
    """From the true posterior the predicted median trajectory is the exact mean of the simulator run
    forward in time (the same system), the control's mean at t = 0 and the stationary prediction late;
    predicted cells at a time scatter around it with the stationary covariance."""
    adata, tree, config, record = gaussian_truth
    truth = truth_from_uns(adata)
    conditions = [c for c in truth["conditions"] if c != "ctrl"] + ["ctrl"]
    pred = predict_posterior(tree, config, record, conditions, n_cells=200, n_draws=4, times=TIMES + [LATE], seed=0)
    table = trajectory_table(pred)
    assert list(table.columns) == ["condition", "time", "gene", "mean", "q05", "q50", "q95"]
    assert len(table) == len(conditions) * (len(TIMES) + 1) * 5 and "varm" not in pred.uns
    assert pred.obs["time"].tolist() == list(np.tile(np.repeat(TIMES + [LATE], 200), len(conditions)))
    forward = truth_from_uns(simulate(5, n_perturbed=3, n_doubles=1, cells_per_condition=2, likelihood="gaussian",
                                      seed=0, times=TIMES + [LATE]))
    for condition in conditions:
        rows = table[table["condition"] == condition]
        exact = forward["trajectory_mean"][forward["conditions"].index(condition)].reshape(-1)
        np.testing.assert_allclose(rows["q50"], exact, atol=2e-4 * (1 + np.abs(exact).max()))
        at_zero = rows[rows["time"] == 0.0]["q50"].to_numpy()
        np.testing.assert_allclose(at_zero, truth["control_mean"], atol=1e-4)
    stationary = predict_posterior(tree, config, record, conditions, n_cells=2, n_draws=2)
    late = table[table["time"] == LATE]["q50"].to_numpy().reshape(len(conditions), -1)
    np.testing.assert_allclose(late, stationary.varm["expected_mean"].T, rtol=1e-4, atol=1e-4)
    cells = pred[(pred.obs["condition"] == conditions[0]).to_numpy() & (pred.obs["time"] == 0.3).to_numpy()]
    exact = forward["trajectory_mean"][forward["conditions"].index(conditions[0]), TIMES.index(0.3)]
    spread = np.sqrt(np.diag(truth["covariance"]) + 0.1**2)
    assert np.all(np.abs(np.asarray(cells.X).mean(axis=0) - exact) < 4.5 * spread / np.sqrt(cells.n_obs))


def test_count_trajectories_end_at_the_stationary_prediction():
    """Through the count link (NB, exp): at t = 0 every condition's expected counts are the control's,
    late they are the stationary prediction's."""
    adata = simulate(4, n_perturbed=2, cells_per_condition=40, likelihood="nb", link="exp", seed=2)
    data = load_perturbation_data(adata, size_factor_key=LIBRARY_SIZE_KEY)
    tree, config, record = truth_posterior(adata, data), RunConfig(), data_record(data)
    conditions = list(data.perturbations) + ["ctrl"]
    pred = predict_posterior(tree, config, record, conditions, n_cells=4, n_draws=2, times=[0.0, LATE])
    table = trajectory_table(pred)
    stationary = predict_posterior(tree, config, record, conditions, n_cells=2, n_draws=2).varm["expected_mean"].T
    for q, condition in enumerate(conditions):
        rows = table[table["condition"] == condition]
        np.testing.assert_allclose(rows[rows["time"] == 0.0]["q50"], stationary[-1], rtol=1e-4)  # the control's
        np.testing.assert_allclose(rows[rows["time"] == LATE]["q50"], stationary[q], rtol=1e-4)
    counts = np.asarray(pred.X)
    assert (counts >= 0).all() and np.array_equal(counts, np.round(counts))


def test_times_must_be_numbers_from_the_switch_on():
    assert parse_times("0.1, 0.5,1,5,1").tolist() == pytest.approx([0.1, 0.5, 1.0, 5.0])
    assert parse_times([0, 2]).tolist() == [0.0, 2.0]
    with pytest.raises(DataError, match="'-1' must be a finite number >= 0"):
        parse_times("0.1,-1")
    with pytest.raises(DataError, match="'soon' is not a number"):
        parse_times("0.1,soon")
    with pytest.raises(DataError, match="no times given"):
        parse_times(" , ")
    with pytest.raises(DataError, match="finite"):
        parse_times([float("nan")])


def test_cli_times_writes_cells_table_and_figure(tiny_run, tmp_path, capsys):
    out = tmp_path / "course.h5ad"
    assert main(["predict", str(tiny_run), "--perturbations", "G0,G1+G2", "--cells", "6", "--draws", "5",
                 "--times", "0,0.5,2", "--out", str(out)]) == 0
    assert "course_trajectories.csv" in capsys.readouterr().out
    cells = lb.load(tiny_run).predict("G0", n_cells=6, n_draws=5, times="0,0.5,2")
    table = pd.read_csv(tmp_path / "course_trajectories.csv")
    assert len(table) == 2 * 3 * 4 and set(table["time"]) == {0.0, 0.5, 2.0}
    assert (table["q05"] <= table["q50"]).all() and (table["q50"] <= table["q95"]).all()
    assert (tmp_path / "course_trajectories.png").stat().st_size > 0
    saved = trajectory_table(anndata.read_h5ad(out))  # the table travels with the cells too
    pd.testing.assert_frame_equal(saved.reset_index(drop=True), table, check_dtype=False)
    assert cells.obs["time"].nunique() == 3
    for bad, message in (("0,-2", "must be a finite number >= 0"), ("0,x", "is not a number")):
        assert main(["predict", str(tiny_run), "--perturbations", "G0", "--times", bad,
                     "--out", str(tmp_path / "bad.h5ad")]) == 2
        assert message in capsys.readouterr().err


def test_trajectories_figure_draws_one_line_per_gene(gaussian_truth):
    adata, tree, config, record = gaussian_truth
    pred = predict_posterior(tree, config, record, "G1,G2", n_cells=2, n_draws=2, times=TIMES)
    ax = Figure().subplots()
    assert lb.pl.trajectories(pred, condition="G2", genes=["G0", "G2"], ax=ax) is ax
    assert [line.get_label() for line in ax.get_lines()] == ["G0", "G2"]
    assert len(lb.pl.trajectories(trajectory_table(pred), ax=Figure().subplots()).get_lines()) == 5
    with pytest.raises(ValueError, match="not in the trajectory table"):
        lb.pl.trajectories(pred, condition="G4", ax=Figure().subplots())


@pytest.mark.slow
def test_fitted_trajectory_intervals_hold_the_simulated_time_course(tmp_path):
    """The issue's criterion: fitted to stationary cells only, the 90% bands of the mean trajectory hold
    the simulator's means (4,000 cells per condition and time, run forward from the same system) at
    >= 80% of (gene, time) points for every perturbation (measured: 0.96-1.00 per perturbation)."""
    times = [0.05, 0.2, 0.5, 1.0, 3.0]
    run = lb.fit(simulate(5, cells_per_condition=200, likelihood="gaussian", seed=1), likelihood="gaussian", seed=0,
                 progress=False)
    perturbations = list(run.record["perturbations"])
    table = trajectory_table(run.predict(perturbations, n_cells=2, n_draws=2, times=times))
    forward = simulate(5, cells_per_condition=4000, likelihood="gaussian", seed=1, times=times)
    for condition in perturbations:
        rows = table[table["condition"] == condition]
        simulated = np.concatenate([
            np.asarray(forward.X[(forward.obs["condition"] == condition).to_numpy() & (forward.obs["time"] == t).to_numpy()]
                       ).mean(axis=0) for t in times])
        inside = (rows["q05"].to_numpy() <= simulated) & (simulated <= rows["q95"].to_numpy())
        assert inside.mean() >= 0.8, (condition, inside.mean())


def test_particles_run_forward_follow_the_closed_form_for_a_linear_drift():
    """Particles from the control's law under a linear drift: their mean relaxes as exp(A t) and
    their covariance stays the stationary one (up to Monte Carlo and O(dt) error)."""
    import jax
    import jax.numpy as jnp

    from lcd_bayes.dynamics.stationary import stationary_law
    from lcd_bayes.dynamics.transient import relaxing_means, relaxing_particles

    rng = np.random.default_rng(0)
    drift = jnp.asarray(-np.eye(3) + 0.3 * rng.normal(size=(3, 3)) * (1 - np.eye(3)), jnp.float32)
    basal = jnp.asarray([0.5, -0.2, 0.1], jnp.float32)
    shifts = jnp.asarray([[1.0, 0.0, 0.0], [0.0, -1.5, 0.5]], jnp.float32)
    dt, n = 0.005, 4000
    covariance = stationary_law(drift, dt=dt, sigma=1.0, n_doublings=16, scheme="euler").covariance
    start_mean = -jnp.linalg.solve(drift, basal)
    start = start_mean + jax.random.normal(jax.random.PRNGKey(0), (n, 3)) @ jnp.linalg.cholesky(covariance).T
    times = np.array([0.5, 0.0, 2.0])  # any order
    means, covariances = relaxing_particles(lambda p, x, c: p @ x + basal + c, drift, start, shifts, times,
                                            jax.random.PRNGKey(1), dt=dt, sigma=1.0)
    assert means.shape == (2, 3, 3) and covariances.shape == (2, 3, 3, 3)
    targets = -jnp.linalg.solve(drift, (basal + shifts).T).T
    expected = np.swapaxes(np.asarray(relaxing_means(drift, start.mean(0), targets, jnp.asarray(times))), 0, 1)
    sd = np.sqrt(np.diag(np.asarray(covariance)))
    np.testing.assert_allclose(means[:, 1], np.broadcast_to(start.mean(0), (2, 3)), atol=1e-5)  # t = 0: the start
    assert np.all(np.abs(np.asarray(means) - expected) < 0.1 * sd)
    np.testing.assert_allclose(np.asarray(covariances[:, 2]), np.broadcast_to(covariance, (2, 3, 3)), atol=0.15 * sd.max() ** 2)


@pytest.mark.slow
def test_nonlinear_time_course_is_the_simulators_run_forward():
    """A posterior whose every draw is the nonlinear simulator's system predicts the mean
    trajectory of that simulator run forward from stationary control cells (Monte Carlo on both
    sides: the simulator's 2,000 cells per time, the model's particles per draw)."""
    times = [0.0, 0.3, 1.0, 4.0]
    adata = simulate(4, n_perturbed=2, cells_per_condition=2000, likelihood="gaussian", drift="nonlinear", seed=1,
                     times=times)
    truth = truth_from_uns(adata)
    stationary = simulate(4, n_perturbed=2, cells_per_condition=50, likelihood="gaussian", drift="nonlinear", seed=1)
    data = load_perturbation_data(stationary, continuous=True)
    decay, saturation = np.asarray(truth["decay"]), float(truth["saturation"])
    n_draws, d = 8, 4
    shift = np.asarray(truth["shift"])[[truth["perturbations"].index(p) for p in data.perturbations]]
    draws = {"drift": truth["drift"], "basal_drift": truth["basal_drift"], "self_decay": decay, "shift": shift,
             "stationary_sd": np.sqrt(np.diag(truth["covariance"])), "noise_sd": np.full(d, 0.1),
             "relative_interaction": (np.asarray(truth["weights"]) / decay[:, None]).T,  # stored (source, target)
             "saturation": np.full(d, saturation), "input_offset": np.asarray(truth["input_offset"]) / (decay * saturation)}
    draws = {name: np.repeat(np.asarray(value, np.float32)[None], n_draws, axis=0) for name, value in draws.items()}
    tree = to_datatree(draws, Coords(data.genes, data.conditions, data.perturbations))
    config = RunConfig().replace(model={"drift": "nonlinear", "likelihood": "gaussian"})
    conditions = list(data.perturbations)
    pred = predict_posterior(tree, config, data_record(data), conditions, n_cells=4, n_draws=2, times=times, seed=0)
    table = trajectory_table(pred)
    sd = np.sqrt(np.diag(truth["covariance"]))
    for condition in conditions:
        rows = table[table["condition"] == condition]
        simulated = truth["trajectory_mean"][truth["conditions"].index(condition)].reshape(-1)
        # Monte Carlo, plus Euler's O(dt) lag on fast moves: the model steps by its sim_dt (0.02),
        # the simulator finer; a target gene that moves 6 units by t = 0.3 lags 2% behind.
        displacement = np.abs(simulated - np.tile(truth["control_mean"], len(times)))
        assert np.all(np.abs(rows["mean"].to_numpy() - simulated) < 0.12 * np.tile(sd, len(times)) + 0.03 * displacement)
        moved = np.abs(simulated.reshape(len(times), d)[-1] - simulated.reshape(len(times), d)[0])
        assert moved.max() > 0.5 * sd.max()  # the shift moves the cells, so the comparison means something
