"""Data-parallel SVI: cells sharded over devices give the fit one device gives.

JAX fixes its device count when it starts, so each check runs in a fresh interpreter with two
forced CPU devices (``--xla_force_host_platform_device_count=2``).
"""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    from lcd_bayes.config import RunConfig
    from lcd_bayes.run import fit
    from lcd_bayes.sim.linear import simulate

    likelihood, steps, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    adata = simulate(5, cells_per_condition=60, likelihood=likelihood, seed=3)
    config = RunConfig().replace(model={"n_doublings": 12},
                                 fit={"steps": steps, "batch_size": batch, "refine": "none",
                                      "num_posterior_samples": 100, "steps_per_chunk": 20})
    out = {"devices": len(jax.devices())}
    for devices in (1, 2):
        run = fit(adata, config=config.replace(fit={"devices": devices}), likelihood=likelihood,
                  size_factor_key="size_factor", progress=False)
        interaction = run.posterior["posterior"]["interaction"]
        out[devices] = {"losses": run.fit.losses.tolist(), "n_cells": int(run.data.n_cells),
                        "mean": interaction.mean(("chain", "draw")).values.tolist(),
                        "sd": interaction.std(("chain", "draw")).values.tolist()}
    print(json.dumps(out))
""")


def two_device_fits(likelihood: str, steps: int, batch: int) -> dict:
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-c", SCRIPT, likelihood, str(steps), str(batch)], env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # a subprocess that compiles the fit for one device and for two: ~45 s
def test_two_devices_compute_the_same_elbo_as_one():
    # Gaussian data, every cell in each step: the one randomness left is the guide's draw of the
    # globals, which all devices share, so two devices must follow one device's fit step by step
    # (up to float rounding, which the optimizer amplifies only after ~100 steps).
    fits = two_device_fits("gaussian", steps=40, batch=100_000)
    assert fits["devices"] == 2
    np.testing.assert_allclose(fits["2"]["losses"], fits["1"]["losses"], rtol=2e-5)


@pytest.mark.slow
def test_two_devices_give_the_posterior_of_one_on_counts():
    # NB counts in minibatches: the devices draw other cells and importance noise than one device
    # does, so the fits agree in law, not step by step.
    fits = two_device_fits("nb", steps=1500, batch=128)
    one, two = (np.asarray(fits[k]["mean"]) for k in ("1", "2"))
    sd = np.asarray(fits["1"]["sd"])
    off = ~np.eye(one.shape[0], dtype=bool)
    assert fits["2"]["n_cells"] == fits["1"]["n_cells"]
    assert np.corrcoef(one[off], two[off])[0, 1] > 0.95
    assert np.median(np.abs(one - two)[off] / sd[off]) < 1.0
    final = [np.mean(fits[k]["losses"][-100:]) for k in ("1", "2")]
    assert abs(final[1] - final[0]) < 0.01 * abs(final[0])

