"""Lost or corrupted work: interruptions at any point of a fit, partial files, unusable --out
folders, restarts, and a loss record that repeats exactly (README.md, "Run folder")."""
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import lcd_bayes.api
import lcd_bayes.io.fit_inputs
import lcd_bayes.run
from lcd_bayes.cli import main
from lcd_bayes.config import RunConfig
from lcd_bayes.files import PAUSE_ENV, UnwritableError, partial_name
from lcd_bayes.inference.svi import FitError
from lcd_bayes.io.run_folder import IncompleteRunError, load_run
from lcd_bayes.run import fit
from lcd_bayes.sim.linear import simulate

REPO = Path(__file__).resolve().parents[1]
# No periodic checkpoint: what survives an interruption after SVI is the one saved at its end.
TOML = ('[model]\nn_doublings = 12\n[fit]\nsteps = 40\nsteps_per_chunk = 20\ncheckpoint_every = 1000\n'
        'min_steps = 40\nbatch_size = 64\nnum_posterior_samples = 20\nrefine = "laplace"\nppc = false\n'
        'log_likelihood = false\n')
CONFIG = RunConfig().replace(
    fit={"steps": 40, "steps_per_chunk": 20, "checkpoint_every": 1000, "min_steps": 40, "batch_size": 64,
         "num_posterior_samples": 20, "refine": "laplace", "ppc": False, "log_likelihood": False},
    model={"n_doublings": 12},
)


@pytest.fixture(scope="module")
def screen():
    return simulate(3, cells_per_condition=20, likelihood="gaussian", seed=0)


@pytest.fixture(scope="module")
def reference(screen):
    """The uninterrupted fit."""
    return fit(screen, config=CONFIG, likelihood="gaussian", progress=False)


def _python(code_or_args, env=None, **popen):
    """A Python subprocess on this checkout's package."""
    environment = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu", **(env or {})}
    return subprocess.Popen([sys.executable, *code_or_args], env=environment, cwd=REPO, text=True, **popen)


def _kill_when_paused(process) -> None:
    """Wait until the process reports that it paused (``files.pause_point``), then SIGKILL it."""
    seen = []
    for line in process.stderr:
        seen.append(line)
        if line.startswith("paused at"):
            process.kill()
            process.wait()
            return
    process.wait()
    raise AssertionError("the process ended without pausing:\n" + "".join(seen[-20:]))


def test_a_write_killed_midway_leaves_no_file_under_the_final_name(tmp_path):
    target = tmp_path / "summary.txt"
    target.write_text("old and whole\n")
    writer = _python(["-c", f"from lcd_bayes.files import write_text; write_text({str(target)!r}, 'new ' * 10**6)"],
                     env={PAUSE_ENV: "write summary.txt"}, stderr=subprocess.PIPE)
    _kill_when_paused(writer)
    assert target.read_text() == "old and whole\n"  # the old file, never a part of the new one
    assert partial_name(target).exists()


def _unfinished(tiny_run, tmp_path, posterior: bytes | None) -> Path:
    """A copy of a finished run folder as a kill would leave it: posterior.nc not (or partly) written."""
    folder = Path(shutil.copytree(tiny_run, tmp_path / "unfinished"))
    whole = (folder / "posterior.nc").read_bytes()
    (folder / "posterior.nc").unlink()
    (folder / "checkpoint.npz").write_bytes(b"")
    if posterior is not None:
        (folder / "posterior.nc").write_bytes(posterior)
    else:
        partial_name(folder / "posterior.nc").write_bytes(whole[: len(whole) // 3])
    return folder


@pytest.mark.parametrize("truncated", [False, True], ids=["partial-write", "truncated-posterior"])
def test_no_reader_takes_an_unfinished_run_for_a_finished_one(tiny_run, tmp_path, capsys, truncated):
    # A posterior.nc cut short (an older version's non-atomic write, a copy cut short) and the
    # partial file of an interrupted write are both refused, with what to do.
    whole = (tiny_run / "posterior.nc").read_bytes()
    folder = _unfinished(tiny_run, tmp_path, whole[:20_000] if truncated else None)
    with pytest.raises(IncompleteRunError, match="resume it by running the same"):
        load_run(folder)
    with pytest.raises(IncompleteRunError, match="resume it"):
        lcd_bayes.api.load(folder)
    for command in (["clipr", str(folder)], ["report", str(folder)],
                    ["predict", str(folder), "--perturbations", "G0", "--cells", "2"]):
        assert main(command) == 2, command
        err = capsys.readouterr().err
        assert "resume it by running the same `lcd-bayes fit` command" in err and "Traceback" not in err, command


def test_sigterm_is_handled_like_ctrl_c(monkeypatch, tmp_path, capsys):
    def terminated_fit(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # what a scheduler sends at the end of a job's time
        raise AssertionError("SIGTERM did not interrupt the fit")

    monkeypatch.setattr(lcd_bayes.io.fit_inputs, "fit_inputs", terminated_fit)
    before = signal.getsignal(signal.SIGTERM)
    assert main(["fit", "x.h5ad", "--out", str(tmp_path / "run")]) == 128 + signal.SIGTERM
    assert "terminated" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is before  # restored after the command


@pytest.fixture
def no_compute(monkeypatch):
    """Fail the test if a fit or prediction reads its input: the refusals must come first."""
    def read(*args, **kwargs):
        raise AssertionError("the data were read before --out was checked")

    monkeypatch.setattr(lcd_bayes.io.fit_inputs, "read_h5ad", read)
    monkeypatch.setattr(lcd_bayes.api, "load", read)


def test_an_unusable_out_is_refused_before_any_compute(tmp_path, capsys, no_compute):
    a_file = tmp_path / "file"
    a_file.write_text("")
    for out, says in [(a_file, "is a file"), (a_file / "run", f"is under {a_file}, which is a file"),
                      (Path("/proc/lcd-bayes-run"), "cannot be written")]:
        assert main(["fit", "data.h5ad", "--out", str(out)]) == 2, out
        err = capsys.readouterr().err
        assert says in err and "Errno" not in err and "Traceback" not in err, err
    with pytest.raises(UnwritableError, match="is a file"):
        lcd_bayes.api.fit("data.h5ad", out=a_file)


def test_predict_out_under_a_file_is_refused_before_any_compute(tiny_run, tmp_path, capsys, no_compute):
    a_file = tmp_path / "file"
    a_file.write_text("")
    assert main(["predict", str(tiny_run), "--perturbations", "G0", "--out", str(a_file / "pred.h5ad")]) == 2
    assert f"its folder {a_file} is a file" in capsys.readouterr().err
    assert main(["predict", str(tiny_run), "--perturbations", "G0", "--out", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err


def _interrupt_at_refinement(monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(lcd_bayes.run, "refine_with_laplace", interrupted)


def test_ctrl_c_in_the_refinement_keeps_the_fit_and_resumes_to_the_same_result(screen, reference, tmp_path,
                                                                               monkeypatch, capsys):
    folder = tmp_path / "run"
    _interrupt_at_refinement(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        fit(screen, folder, config=CONFIG, likelihood="gaussian", progress=False)
    monkeypatch.undo()
    assert "run the same command again to resume" in capsys.readouterr().err
    with np.load(folder / "checkpoint.npz", allow_pickle=False) as stored:  # saved at the end of SVI
        assert stored["losses"].size == CONFIG.fit.steps
        earlier = float(stored["seconds"])
    # A first session of an hour, so that the summary's total cannot be this session's alone.
    with np.load(folder / "checkpoint.npz", allow_pickle=False) as stored:
        arrays = {name: stored[name] for name in stored.files}
    np.savez(folder / "checkpoint.npz", **{**arrays, "seconds": np.asarray(3600.0 + earlier)})
    with pytest.raises(IncompleteRunError):
        load_run(folder)

    resumed = fit(screen, folder, config=CONFIG, likelihood="gaussian", progress=False)
    np.testing.assert_array_equal(resumed.fit.losses, reference.fit.losses)
    np.testing.assert_array_equal(resumed.posterior["posterior"]["drift"].values,
                                  reference.posterior["posterior"]["drift"].values)
    assert "Laplace" in resumed.posterior["posterior"].attrs["inference"]
    seconds = float((folder / "summary.txt").read_text().split("seconds: ")[1].split()[0])
    assert seconds >= 3600  # every session's time, not the last one's
    load_run(folder)


def test_a_different_unfinished_fit_is_refused_before_anything_is_written(screen, tmp_path, monkeypatch):
    config = CONFIG.replace(fit={"refine": "none"})
    folder = tmp_path / "run"

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(lcd_bayes.run, "sample_guide", interrupted)  # after SVI, whose checkpoint is kept
    with pytest.raises(KeyboardInterrupt):
        fit(screen, folder, config=config, likelihood="gaussian", progress=False)
    monkeypatch.undo()
    before = {name: (folder / name).read_bytes() for name in ("config.toml", "data.json", "checkpoint.npz")}

    def no_svi(*args, **kwargs):
        raise AssertionError("SVI started before the folder was checked")

    monkeypatch.setattr(lcd_bayes.run, "fit_svi", no_svi)
    # As after a non-finite ELBO: the same data with a lower learning rate.
    slower = config.replace(fit={"learning_rate": config.fit.learning_rate / 10})
    with pytest.raises(FitError, match="differs in fit.learning_rate") as refusal:
        fit(screen, folder, config=slower, likelihood="gaussian", progress=False)
    assert "--restart" in str(refusal.value)
    assert {name: (folder / name).read_bytes() for name in before} == before
    monkeypatch.undo()

    restarted = fit(screen, folder, config=slower, likelihood="gaussian", restart=True, progress=False)
    fresh = fit(screen, config=slower, likelihood="gaussian", progress=False)
    np.testing.assert_array_equal(restarted.fit.losses, fresh.fit.losses)
    assert load_run(folder)[1].fit.learning_rate == slower.fit.learning_rate


def test_the_loss_record_does_not_depend_on_pythons_hash_seed():
    # numpyro sums the ELBO's site terms over a set, whose order follows the hash seed of each
    # process: the recorded loss then differed by float32 roundings between two runs of one seed.
    script = """
import jax, jax.numpy as jnp, numpyro, numpyro.distributions as dist
from lcd_bayes.inference.svi import OrderedELBO

def model():
    for i in range(12):
        numpyro.sample(f"site{i}", dist.Normal(0.0, 10.0 ** (i % 4 - 2)), obs=jnp.float32(1.0 + i / 7))

print(repr(float(OrderedELBO().loss(jax.random.PRNGKey(0), {}, model, lambda: None))))
"""
    losses = set()
    for hash_seed in range(4):
        process = _python(["-c", script], env={"PYTHONHASHSEED": str(hash_seed)}, stdout=subprocess.PIPE)
        out, _ = process.communicate()
        assert process.returncode == 0
        losses.add(out.strip())
    assert len(losses) == 1, losses


@pytest.mark.slow
@pytest.mark.parametrize("point", ["svi step 20", "refinement", "write posterior.nc"])
def test_a_kill_anywhere_resumes_to_the_same_result(tmp_path, capsys, point):
    """SIGKILL (nothing runs on the way out) during SVI, the refinement or the final write: the
    folder is refused by every reader, and the same command finishes it bit for bit."""
    data, config = tmp_path / "screen.h5ad", tmp_path / "tiny.toml"
    simulate(3, cells_per_condition=20, likelihood="gaussian", seed=0).write_h5ad(data)
    config.write_text(TOML)
    command = ["fit", str(data), "--config", str(config), "--likelihood", "gaussian", "--no-progress", "--out"]
    assert main([*command, str(tmp_path / "reference")]) == 0

    killed = _python(["-m", "lcd_bayes.cli", *command, str(tmp_path / "run")], env={PAUSE_ENV: point},
                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _kill_when_paused(killed)
    assert not (tmp_path / "run" / "posterior.nc").exists()
    assert main(["clipr", str(tmp_path / "run")]) == 2
    assert "resume it by running the same" in capsys.readouterr().err

    assert main([*command, str(tmp_path / "run")]) == 0
    for name in ("elbo.csv", "config.toml", "data.json"):
        assert (tmp_path / "run" / name).read_bytes() == (tmp_path / "reference" / name).read_bytes(), name
    resumed, reference = load_run(tmp_path / "run")[0], load_run(tmp_path / "reference")[0]
    np.testing.assert_array_equal(resumed["posterior"]["drift"].values, reference["posterior"]["drift"].values)
    assert not (tmp_path / "run" / "checkpoint.npz").exists()
