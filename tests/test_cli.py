"""The command line (README.md, "Command line"): flag names, outputs, errors, help with examples."""
import anndata
import numpy as np
import pytest
import xarray as xr

from lcd_bayes.cli import build_parser, main


def test_every_command_has_help_with_an_example(capsys):
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert {"simulate", "fit", "clipr", "report", "demo"} <= set(commands)
    for name, sub in commands.items():
        assert "example" in sub.format_help(), name


def test_fit_flags_match_the_contract():
    fit_help = build_parser().parse_args(["fit", "x.h5ad", "--out", "r"])
    for flag in ("out", "config", "perturbation_key", "control", "sep", "targets", "likelihood", "layer",
                 "steps", "seed"):
        assert hasattr(fit_help, flag), flag


def test_gene_panel_options_reach_the_fit(monkeypatch, tmp_path):
    import lcd_bayes.api
    import lcd_bayes.cli
    import lcd_bayes.io.fit_inputs

    parser = build_parser()
    args = parser.parse_args(["fit", "x.h5ad", "--out", "r", "--n-top-genes", "50", "--gene-ranking", "variance",
                              "--predict-targets", "A+B,C"])
    assert (args.n_top_genes, args.gene_ranking, args.predict_targets) == (50, "variance", "A+B,C")
    assert parser.parse_args(["fit", "x.h5ad", "--out", "r"]).gene_ranking is None  # the config's ("response")
    with pytest.raises(SystemExit):
        parser.parse_args(["fit", "x.h5ad", "--out", "r", "--gene-ranking", "hvg"])
    seen = {}
    monkeypatch.setattr(lcd_bayes.io.fit_inputs, "fit_inputs", lambda data, out, **settings: seen.update(settings))
    monkeypatch.setattr(lcd_bayes.api, "fit", lambda inputs, **settings: None)
    monkeypatch.setattr(lcd_bayes.cli, "_print_fit", lambda run: None)
    assert main(["fit", "x.h5ad", "--out", str(tmp_path / "r"), "--n-top-genes", "50", "--gene-ranking",
                 "dispersion", "--predict-targets", "A+B,C"]) == 0
    assert (seen["n_top_genes"], seen["gene_ranking"], seen["predict_targets"]) == (50, "dispersion", "A+B,C")


def test_batch_key_reaches_the_fit(monkeypatch, tmp_path):
    import lcd_bayes.api
    import lcd_bayes.cli
    import lcd_bayes.io.fit_inputs

    parser = build_parser()
    assert "--batch-key COLUMN" in parser._subparsers._group_actions[0].choices["fit"].format_help()
    assert parser.parse_args(["fit", "x.h5ad", "--out", "r", "--batch-key", "lane"]).batch_key == "lane"
    assert parser.parse_args(["fit", "x.h5ad", "--out", "r"]).batch_key is None  # the config's (none)
    seen = {}
    monkeypatch.setattr(lcd_bayes.io.fit_inputs, "fit_inputs", lambda data, out, **settings: seen.update(settings))
    monkeypatch.setattr(lcd_bayes.api, "fit", lambda inputs, **settings: None)
    monkeypatch.setattr(lcd_bayes.cli, "_print_fit", lambda run: None)
    assert main(["fit", "x.h5ad", "--out", str(tmp_path / "r"), "--batch-key", "lane"]) == 0
    assert seen["batch_key"] == "lane"


def test_refine_is_a_fit_and_demo_choice():
    parser = build_parser()
    assert parser.parse_args(["fit", "x.h5ad", "--out", "r", "--refine", "laplace"]).refine == "laplace"
    assert parser.parse_args(["fit", "x.h5ad", "--out", "r"]).refine is None  # the config's ("auto")
    assert parser.parse_args(["demo"]).refine is None  # the config's: the demo shows calibrated intervals
    assert parser.parse_args(["fit", "x.h5ad", "--out", "r", "--refine", "auto"]).refine == "auto"


def test_simulate_then_fit_writes_a_run(tmp_path, capsys):
    data = tmp_path / "sim.h5ad"
    assert main(["simulate", "--genes", "4", "--perturbations", "4", "--cells-per-perturbation", "20",
                 "--seed", "0", "--out", str(data)]) == 0
    adata = anndata.read_h5ad(data)
    assert adata.shape == (100, 4) and "lcd_truth" in adata.uns

    config = tmp_path / "tiny.toml"
    config.write_text("[model]\nn_doublings = 12\n[fit]\nsteps_per_chunk = 20\nnum_posterior_samples = 20\n")
    run = tmp_path / "run"
    code = main(["fit", str(data), "--out", str(run), "--config", str(config), "--steps", "40", "--seed", "1",
                 "--likelihood", "gaussian", "--perturbation-key", "condition", "--control", "ctrl",
                 "--sep", "+", "--no-progress"])
    assert code == 0
    out = capsys.readouterr().out
    # With no --refine, the default refines the guide's draws by the Laplace approximation.
    assert "Strongest direct effects" in out and "Laplace refinement:" in out
    assert "posterior predictive check: predicted vs observed" in out and (run / "ppc.csv").exists()
    tree = xr.open_datatree(run / "posterior.nc", engine="h5netcdf")
    assert tree["posterior"].sizes["draw"] == 20
    tree.close()
    assert 'likelihood = "gaussian"' in (run / "config.toml").read_text()
    assert "seed = 1" in (run / "config.toml").read_text()
    assert 'refine = "laplace"' in (run / "config.toml").read_text()


def test_guide_only_hint_names_the_refinement_that_calibrates_the_likelihood():
    from lcd_bayes.cli import _calibrating_refinement
    from lcd_bayes.config import RunConfig

    assert _calibrating_refinement(RunConfig().replace(model={"likelihood": "nb"})) == "`--refine laplace` (the default)"
    assert "`--refine nuts`" in _calibrating_refinement(RunConfig().replace(model={"likelihood": "gaussian"}))


def test_bad_input_exits_with_a_message_not_a_traceback(tmp_path, capsys):
    data = tmp_path / "sim.h5ad"
    main(["simulate", "--genes", "3", "--cells-per-perturbation", "10", "--out", str(data)])
    code = main(["fit", str(data), "--out", str(tmp_path / "run"), "--perturbation-key", "guide"])
    assert code == 2
    err = capsys.readouterr().err
    assert "guide" in err and "condition" in err  # names the missing key and what exists
    assert main(["fit", str(tmp_path / "missing.h5ad"), "--out", str(tmp_path / "r2")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_bad_input_is_refused_before_the_model_loads(tmp_path):
    """A refusal answers in about a second: settings, --out, the data and a run folder are checked
    before JAX (seconds of imports) loads."""
    import subprocess
    import sys

    anndata.AnnData(np.ones((20, 3), dtype=np.float32)).write_h5ad(tmp_path / "no_labels.h5ad")
    (tmp_path / "bad.toml").write_text("[fit]\nlearning_rate = -0.1\n")
    (tmp_path / "not_a_run").mkdir()
    cases = [
        ["fit", str(tmp_path / "no_labels.h5ad"), "--out", str(tmp_path / "run")],
        ["fit", str(tmp_path / "no_labels.h5ad"), "--out", str(tmp_path / "run"), "--config", str(tmp_path / "bad.toml")],
        ["fit", str(tmp_path / "missing.h5ad"), "--out", str(tmp_path / "run")],
        ["predict", str(tmp_path / "not_a_run"), "--perturbations", "A"],
        ["clipr", str(tmp_path / "not_a_run")],
    ]
    for arguments in cases:
        script = (f"import sys; from lcd_bayes.cli import main; code = main({arguments!r}); "
                  "print(code, 'jax' in sys.modules)")
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
        assert done.stdout.split() == ["2", "False"], (arguments, done.stdout, done.stderr)
        assert "error:" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "run").exists()


def test_unknown_config_key_is_reported(tmp_path, capsys):
    data = tmp_path / "sim.h5ad"
    main(["simulate", "--genes", "3", "--cells-per-perturbation", "10", "--out", str(data)])
    config = tmp_path / "bad.toml"
    config.write_text("[fit]\nstepz = 3\n")
    assert main(["fit", str(data), "--out", str(tmp_path / "run"), "--config", str(config)]) == 2
    assert "stepz" in capsys.readouterr().err


def test_command_line_keeps_compiled_programs_in_its_cache(tmp_path):
    import os
    import subprocess
    import sys

    script = ("import jax, jax.numpy as jnp; from lcd_bayes.config import use_compilation_cache; "
              "print(use_compilation_cache()); jax.jit(lambda x: jnp.sin(x) * 2)(jnp.ones(3)).block_until_ready()")
    for setting, expected in ((str(tmp_path / "cache"), str(tmp_path / "cache")), ("off", "None")):
        env = {**os.environ, "LCD_BAYES_CACHE": setting, "JAX_PLATFORMS": "cpu"}
        done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip().splitlines()[-1] == expected
    assert any((tmp_path / "cache").iterdir())  # the compiled program is on disk
