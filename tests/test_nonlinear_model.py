"""The nonlinear drift family: its law reproduces the exact linear solver in the linear limit,
it is the simulator's family, unstable draws are flagged, and fit -> CLIPR -> predict work on a
nonlinear run folder."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import xarray as xr

from lcd_bayes.analysis.clipr import clipr_run, posterior_effects
from lcd_bayes.analysis.predict import _nonlinear_law, _nonlinear_params, predict
from lcd_bayes.config import ModelConfig, RunConfig, SimulationSettings, load_config
from lcd_bayes.dynamics.fixed_point import fixed_point
from lcd_bayes.dynamics.nonlinear import (
    PARAM_NAMES, drift_jacobian, nonlinear_drift, posterior_drift, stationary_law_nonlinear,
)
from lcd_bayes.dynamics.stationary import stationary_law, stationary_means
from lcd_bayes.inference.posterior import stacked_draws
from lcd_bayes.io.run_folder import load_run
from lcd_bayes.run import fit
from lcd_bayes.sim import nonlinear as nl
from lcd_bayes.sim.linear import simulate

D = 6


def relative_system(seed=0, saturation=1e4, offset_sd=0.0):
    rng = np.random.default_rng(seed)
    relative = rng.normal(0.0, 0.3, (D, D)) * (rng.random((D, D)) < 0.5)
    np.fill_diagonal(relative, 0.0)
    decay = np.exp(rng.normal(np.log(2.0), 0.3, D))
    params = {"self_decay": decay, "relative_interaction": relative, "saturation": np.full(D, saturation),
              "input_offset": offset_sd * rng.standard_normal(D), "basal_drift": decay * rng.normal(0, 1, D)}
    shifts = np.zeros((4, D))
    shifts[1, 0], shifts[2, 1] = 3 * decay[0], -3 * decay[1]
    shifts[3] = shifts[1] + shifts[2]
    as_f32 = lambda tree: jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), tree)
    return as_f32(params), jnp.asarray(shifts, jnp.float32)


def test_linear_limit_reproduces_the_exact_linear_stationary_law():
    params, shifts = relative_system()
    settings = SimulationSettings(dt=0.02, n_burn_in=50, n_sample=200, thin=10, n_particles=64, noise="rademacher")
    law = jax.jit(lambda p, k: stationary_law_nonlinear(p, shifts, k, settings))(params, jax.random.PRNGKey(3))

    drift = params["self_decay"][:, None] * (params["relative_interaction"] - jnp.eye(D))
    exact = stationary_law(drift, dt=settings.dt)
    exact_means = stationary_means(drift, params["basal_drift"] + shifts)
    # Means: the particle average is within Monte Carlo error of -A^{-1}(b + c_q) ...
    z = np.abs(np.asarray(law.means - exact_means) / np.asarray(law.mean_se))
    assert z.max() < 5.0, z.max()
    # ... the fixed points and LNA are the exact linear solution, and the shrunk covariance is
    # within a few percent of the exact discrete Lyapunov solution in every condition.
    np.testing.assert_allclose(law.fixed_points, exact_means, atol=1e-4)
    np.testing.assert_allclose(law.lna_covariances, np.broadcast_to(exact.covariance, law.covariances.shape), atol=1e-5)
    scale = float(jnp.abs(exact.covariance).max())
    assert float(jnp.abs(law.covariances - exact.covariance).max()) < 0.05 * scale
    assert np.all(np.asarray(law.n_diverged) == 0) and np.all(np.asarray(law.projection) == 1.0)
    np.testing.assert_allclose(law.control_jacobian, drift, atol=1e-5)


def test_it_is_the_simulators_family_and_its_jacobian():
    system = nl.random_nonlinear_system(D, expected_degree=3.0, rng=1)
    decay = system.decay
    params = {"self_decay": decay, "relative_interaction": system.weights / decay[:, None],
              "saturation": np.full(D, system.saturation),
              "input_offset": system.input_offset / (decay * system.saturation), "basal_drift": system.basal_drift}
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), params)
    x = np.random.default_rng(0).normal(0, 1, D)
    shift = np.eye(D)[2] * 40.0
    np.testing.assert_allclose(nonlinear_drift(params, jnp.asarray(x, jnp.float32), jnp.asarray(shift, jnp.float32)),
                               nl.drift(system, x, shift), rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(drift_jacobian(params, jnp.asarray(x, jnp.float32)), nl.jacobian(system, x), rtol=1e-4, atol=1e-4)
    stored = {**params, "relative_interaction": params["relative_interaction"].T}
    np.testing.assert_allclose(posterior_drift(stored, jnp.asarray(x, jnp.float32), jnp.zeros(D)),
                               nonlinear_drift(params, jnp.asarray(x, jnp.float32), jnp.zeros(D)), rtol=1e-6)


def test_an_unstable_fixed_point_is_projected_and_reported():
    params, shifts = relative_system(saturation=1e4)
    # A strong positive loop G0 <-> G1 with R beyond 1: the linearization at the fixed point grows.
    params["relative_interaction"] = params["relative_interaction"].at[0, 1].set(2.0).at[1, 0].set(2.0)
    settings = SimulationSettings(dt=0.02, n_burn_in=10, n_sample=40, thin=10, n_particles=4)
    law = stationary_law_nonlinear(params, shifts, jax.random.PRNGKey(0), settings)
    assert np.all(np.asarray(law.projection) < 1.0)
    assert np.all(np.asarray(law.log_spectral_radius) > np.log(0.9999))
    assert np.all(np.isfinite(np.asarray(law.covariances)))


def test_config_selects_and_validates_the_drift():
    assert RunConfig().model.drift == "linear" and load_config("lcd_linear.toml").model.drift == "linear"
    shipped = load_config("lcd_nonlinear").model
    assert shipped.drift == "nonlinear" and shipped.simulation_settings().n_recorded == 10
    with pytest.raises(ValueError, match=r"drift must be one of \('linear', 'nonlinear'\), got 'mlp'"):
        ModelConfig(drift="mlp")
    with pytest.raises(ValueError, match="multiple of thin"):
        ModelConfig(drift="nonlinear", sim_steps=55, sim_thin=10)


@pytest.fixture(scope="module")
def nonlinear_run(tmp_path_factory):
    """A short fit of the nonlinear drift (~25 s): the tests that use it are in the slow tier."""
    config = load_config("lcd_nonlinear").replace(
        model={"likelihood": "gaussian", "sim_particles": 8},
        fit={"steps": 60, "steps_per_chunk": 20, "min_steps": 60, "checkpoint_every": 60,
             "num_posterior_samples": 12, "batch_size": 256},
    )
    adata = simulate(5, cells_per_condition=30, likelihood="gaussian", drift="nonlinear", seed=2)
    folder = tmp_path_factory.mktemp("nonlinear") / "run"
    fit(adata, folder, config=config, progress=False)
    return folder


@pytest.mark.slow
def test_fit_gives_a_finite_posterior_with_the_expected_shapes(nonlinear_run):
    tree, config, record = load_run(nonlinear_run)
    posterior = tree["posterior"]
    assert config.model.drift == "nonlinear"
    shapes = {"drift": (5, 5), "interaction": (5, 5), "relative_interaction": (5, 5), "saturation": (5,),
              "input_offset": (5,), "self_decay": (5,), "stationary_mean": (6, 5), "condition_sd": (6, 5),
              "stationary_sd": (5,), "shift": (5, 5), "log_spectral_radius": (), "n_diverged": ()}
    for name, shape in shapes.items():
        values = posterior[name].values
        assert values.shape == (1, 12, *shape), name
        assert np.all(np.isfinite(values)), name
    assert np.all(posterior["n_diverged"].values == 0)
    assert np.all(posterior["log_spectral_radius"].values < np.log(config.model.max_spectral_radius))
    # Self-decay is -diag of the Jacobian, and the Jacobian is that of the drift at the control
    # fixed point (checked against forward-mode differentiation of the stored draw).
    params = {name: stacked_draws(posterior[name])[0] for name in PARAM_NAMES}
    control = fixed_point(posterior_drift, params, jnp.zeros(5, jnp.float32))
    numeric = jax.jacfwd(lambda x: posterior_drift(params, x, jnp.zeros(5)))(control.x)
    np.testing.assert_allclose(posterior["drift"].values[0, 0], numeric, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(posterior["self_decay"].values[0, 0], params["self_decay"], rtol=1e-5)


@pytest.mark.slow
def test_clipr_on_the_nonlinear_run(nonlinear_run):
    effects, table = clipr_run(nonlinear_run)
    assert table.shape[0] == 20 and np.all(np.isfinite(table["mean"]))
    assert effects["posterior"]["effect"].shape == (1, 12, 5, 5)
    # In the linear limit (huge saturation, no offset) CLIPR of the same draws is A^T = (D (R - I))^T.
    tree, _, _ = load_run(nonlinear_run)
    post = tree["posterior"].to_dataset()
    post["saturation"] = post["saturation"] * 0 + 1e4
    post["input_offset"] = post["input_offset"] * 0
    linearized = xr.DataTree.from_dict({"posterior": post, "constant_data": tree["constant_data"].to_dataset()})
    limit = posterior_effects(linearized, drift_fn=posterior_drift, param_names=PARAM_NAMES)
    relative = post["relative_interaction"].values  # (chain, draw, source, target)
    decay = post["self_decay"].values[..., None, :]  # the target's decay
    expected = relative * decay * (1 - np.eye(5))
    np.testing.assert_allclose(limit["effect"].values, expected, rtol=2e-2, atol=2e-2)


@pytest.mark.slow
def test_predict_on_the_nonlinear_run(nonlinear_run):
    adata = predict(nonlinear_run, "ctrl,G0,G0+G1", n_cells=20, n_draws=5, seed=1)
    assert adata.shape == (60, 5) and np.all(np.isfinite(adata.X))
    assert sorted(set(adata.obs["condition"].astype(str))) == ["G0", "G0+G1", "ctrl"]
    for key in ("expected_mean", "expected_low", "expected_high"):
        assert adata.varm[key].shape == (5, 3) and np.all(np.isfinite(adata.varm[key]))
    again = predict(nonlinear_run, "ctrl,G0,G0+G1", n_cells=20, n_draws=5, seed=1)
    np.testing.assert_array_equal(adata.X, again.X)
    # Each condition has its own covariance (one draw, solved as predict solves it).
    tree, config, _ = load_run(nonlinear_run)
    draws = {name: jnp.asarray(stacked_draws(tree["posterior"][name]))[:1] for name in PARAM_NAMES}
    params = jax.tree_util.tree_map(lambda a: a[0], _nonlinear_params(draws))
    shift = stacked_draws(tree["posterior"]["shift"])[0]
    offsets = draws["basal_drift"][0] + jnp.stack([jnp.zeros(5), shift[0], shift[0] + shift[1]])
    law = _nonlinear_law(params, offsets, jax.random.PRNGKey(0), config.model)
    covariances = np.asarray(law.covariances)
    assert np.abs(covariances[1] - covariances[0]).max() > 1e-3
    assert np.abs(covariances[2] - covariances[1]).max() > 1e-3


@pytest.mark.slow
def test_the_fit_checks_that_its_chain_reached_stationarity(nonlinear_run):
    tree, config, record = load_run(nonlinear_run)
    assert tree["posterior"].attrs["stationarity"].startswith("stationary")
    # A step too large for the fitted decay (dt D > 2): the chain diverges and the check says so.
    posterior = tree["posterior"]
    draws = {name: stacked_draws(posterior[name]) for name in (*PARAM_NAMES, "shift")}
    draws["self_decay"] = np.full_like(draws["self_decay"], 20.0)
    design = tree["constant_data"]["design"].transpose("condition", "perturbation").values
    from lcd_bayes.dynamics.nonlinear import check_fitted_stationarity
    stiff = ModelConfig(drift="nonlinear", sim_dt=0.2, sim_burn_in=20, sim_steps=40, sim_thin=10)
    report = check_fitted_stationarity(draws, design, stiff)
    assert not report and "diverged" in report.message and "decrease dt" in report.message


@pytest.mark.slow
def test_interaction_types_of_the_nonlinear_run(nonlinear_run):
    """Each draw's double is decomposed on its singles from the draw's own simulated laws (z-scored
    on the control's sd): the nonlinear drift's doubles are not additive by construction."""
    from lcd_bayes.analysis.interactions import TYPES, decompose, interaction_scores, interaction_table
    from lcd_bayes.analysis.predict import _law_keys

    tree, config, record = load_run(nonlinear_run)
    pairs, scores, keep = interaction_scores(tree, config, record, "G0+G1,G2+G3", seed=3)
    table = interaction_table(pairs, scores, record)
    assert list(table["n_draws"]) == [12, 12]
    np.testing.assert_allclose(table[[f"prob_{t}" for t in TYPES]].sum(axis=1), 1.0)
    assert np.all(table["magnitude_high"] > table["magnitude_low"])  # the draws disagree: not the linear identity
    # Draw 0 by hand: its laws of ctrl, the four singles and the two doubles, in the order requested.
    draws = {name: jnp.asarray(stacked_draws(tree["posterior"][name]))[:1] for name in PARAM_NAMES}
    params = jax.tree_util.tree_map(lambda a: a[0], _nonlinear_params(draws))
    shift = stacked_draws(tree["posterior"]["shift"])[0]
    offsets = draws["basal_drift"][0] + jnp.stack([jnp.zeros(5), shift[0], shift[1], shift[2], shift[3],
                                                    shift[0] + shift[1], shift[2] + shift[3]])
    key = _law_keys(jax.random.PRNGKey(3), 12)[0]
    law = _nonlinear_law(params, offsets, key, config.model)
    sd = jnp.sqrt(jnp.diagonal(law.covariances[0]))
    z = (law.means - law.means[0]) / sd
    by_hand = decompose(z[jnp.array([1, 3])], z[jnp.array([2, 4])], z[jnp.array([5, 6])], keep)
    np.testing.assert_allclose(scores["magnitude"][0], by_hand["magnitude"], rtol=1e-3)
    np.testing.assert_allclose(scores["fit"][0], by_hand["fit"], rtol=1e-3)


@pytest.mark.slow
def test_time_courses_of_the_nonlinear_run(nonlinear_run):
    """Particles from the control's law, run forward under the shift: the trajectory starts at the
    control's stationary law and ends at the condition's (each draw's own laws), cells at every time."""
    from lcd_bayes.analysis.predict import (_expected_trajectories, batch_effects, condition_offsets, latent_moments,
                                            parse_request, posterior_draws)

    adata = predict(nonlinear_run, "G0+G1", n_cells=10, n_draws=4, seed=2, times=[0.0, 20.0])
    assert adata.shape == (20, 5) and np.all(np.isfinite(adata.X))
    assert sorted(set(adata.obs["time"])) == [0.0, 20.0]
    assert set(adata.uns["lcd_bayes"]["trajectories"]["time"]) == {0.0, 20.0}

    tree, config, record = load_run(nonlinear_run)
    draws = posterior_draws(tree["posterior"], config.model)
    request = parse_request(["ctrl", "G0+G1"], record, has_target_law=False)
    key = jax.random.PRNGKey(2)
    # Gaussian run: the expected expression is the latent mean. Rows: ctrl at 0 and 20, G0+G1 at 0 and 20.
    course = np.asarray(_expected_trajectories(draws, request, key, np.array([0.0, 20.0]), config.model, (0.0, 0.0),
                                               batch_effects(tree["posterior"], record, None, config.model)))
    means, sds = latent_moments(draws, condition_offsets(draws, request, key), key, config.model)
    stationary, tolerance = np.asarray(means).mean(0), 0.15 * float(np.asarray(sds).max())
    for row, law in ((0, 0), (1, 0), (2, 0), (3, 1)):
        np.testing.assert_allclose(course[:, row].mean(0), stationary[law], atol=tolerance)
    assert np.abs(stationary[1] - stationary[0]).max() > 4 * tolerance  # the double moves the cells
