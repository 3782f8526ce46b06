"""Bad input is refused up front with a one-line message naming the file, key, gene or cell and the
fix (issue 23)."""
import dataclasses

import numpy as np
import pytest

from lcd_bayes.cli import main
from lcd_bayes.config import FIT_RULES, MODEL_RULES, FitConfig, ModelConfig, RunConfig, load_config


# --------------------------------------------------------------------------- configuration


def test_every_model_and_fit_setting_has_a_rule():
    assert set(MODEL_RULES) == {f.name for f in dataclasses.fields(ModelConfig)}
    assert set(FIT_RULES) == {f.name for f in dataclasses.fields(FitConfig)}


@pytest.mark.parametrize("line, message", [
    ("[fit]\nlearning_rate = -0.1", r"\[fit\] learning_rate must be a positive number, got -0.1"),
    ("[fit]\nnum_posterior_samples = 0", r"\[fit\] num_posterior_samples must be an integer >= 2, got 0"),
    ("[fit]\ncheckpoint_every = 0", r"\[fit\] checkpoint_every must be a positive integer, got 0"),
    ("[fit]\nbatch_size = -1", r"\[fit\] batch_size must be an integer >= 0 \(0: automatic\), got -1"),
    ("[fit]\nsteps = 100.5", r"\[fit\] steps must be an integer"),
    ('[model]\nsigma = "1"', r"\[model\] sigma must be a positive number, got '1'"),
    ("[model]\npool_decay = 1", r"\[model\] pool_decay must be true or false, got 1"),
    ("[model]\ndt = 1.5", r"\[model\] dt must be in \(0, 1\), got 1.5"),
    ("fit = 3", r"fit must be a table"),
    ("[fit]\nlearning_rate = ", r"is not valid TOML"),
])
def test_config_values_are_checked_when_the_file_is_read(tmp_path, line, message):
    path = tmp_path / "bad.toml"
    path.write_text(line + "\n")
    with pytest.raises(ValueError, match=message) as error:
        load_config(path)
    assert str(error.value).startswith(f"config file {path}: ") or f"config file {path} is not valid TOML" in str(
        error.value)


def test_numbers_are_stored_as_toml_writes_them():
    config = RunConfig.from_dict({"fit": {"learning_rate": 1, "seed": np.int64(3)}})
    assert config.fit.learning_rate == 1.0 and isinstance(config.fit.learning_rate, float)
    assert "seed = 3\n" in config.to_toml() and RunConfig.from_dict({"fit": {"learning_rate": 1.0, "seed": 3}}) == config
    with pytest.raises(ValueError, match=r"\[fit\] steps must be an integer >= 0 \(0: automatic\), got -5"):
        RunConfig().replace(fit={"steps": -5})  # the API's settings go through the same rules


def test_fit_refuses_a_bad_config_before_reading_any_data(tmp_path, capsys):
    config = tmp_path / "bad.toml"
    config.write_text("[fit]\nnum_posterior_samples = 0\n")
    run = tmp_path / "run"
    assert main(["fit", str(tmp_path / "never_read.h5ad"), "--out", str(run), "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert str(config) in err and "[fit] num_posterior_samples" in err and len(err.strip().splitlines()) == 1
    assert not run.exists()
