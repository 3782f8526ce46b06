"""A run's config.toml repeats the fit: every reading setting recorded, strings escaped, and the
checkpoint fingerprint covers every array the fit sees."""
import tomllib

import numpy as np
import pytest

from lcd_bayes.config import RunConfig, load_config
from lcd_bayes.api import Run
from lcd_bayes.io.fit_inputs import read_screen
from lcd_bayes.io.run_folder import data_record
from lcd_bayes.io.screen import load_perturbation_data
from lcd_bayes.run import _fingerprint, fit
from lcd_bayes.sim.linear import LIBRARY_SIZE_KEY, simulate

TINY = RunConfig().replace(
    fit={"steps": 60, "steps_per_chunk": 20, "num_posterior_samples": 20, "min_steps": 60, "batch_size": 64,
         "refine": "none", "ppc": False},
    model={"n_doublings": 12},
)


def test_toml_strings_are_escaped_and_read_back():
    odd = 'no "quotes"\\ or\ttabs\nor é'
    config = TINY.replace(data={"perturbation_key": odd, "control": "ctrl\\x", "layer": "raw counts",
                                "targets": {"guide A": ["G1"], 'say "B"': ["G2", "G3"]}, "genes": ["G1", "G2"]})
    raw = tomllib.loads(config.to_toml())
    assert raw["data"]["perturbation_key"] == odd
    assert RunConfig.from_dict(raw) == config
    assert config.data.target_map() == {"guide A": ["G1"], 'say "B"': ["G2", "G3"]}


def test_data_settings_are_checked():
    with pytest.raises(ValueError, match="n_top_genes must be a positive integer"):
        RunConfig().replace(data={"n_top_genes": 2.5})
    with pytest.raises(ValueError, match="genes must be a list of gene names"):
        RunConfig().replace(data={"genes": "G1"})
    with pytest.raises(ValueError, match=r"unknown keys in \[data\]"):
        RunConfig.from_dict({"data": {"size_factors": "x"}})


def test_gene_panel_settings_round_trip_and_repeat_the_panel():
    assert 'gene_ranking = "response"' in RunConfig().to_toml()  # the default is recorded too
    config = TINY.replace(data={"n_top_genes": 6, "gene_ranking": "variance", "predict_targets": "G0+G4, G1"})
    assert config.data.predict_targets == ("G0+G4", "G1")  # the command line's comma-separated form
    raw = tomllib.loads(config.to_toml())
    assert raw["data"]["gene_ranking"] == "variance" and raw["data"]["predict_targets"] == ["G0+G4", "G1"]
    again = RunConfig.from_dict(raw)
    assert again == config
    adata = simulate(8, n_perturbed=3, cells_per_condition=20, likelihood="nb", seed=0)  # G2, G3, G4 perturbed
    panel = read_screen(adata, config).genes
    assert read_screen(adata, again).genes == panel
    # G0 and G1 have no cells but will be predicted; G4 is a target both ways; one place is ranked.
    assert len(panel) == 6 and {"G0", "G1", "G2", "G3", "G4"} <= set(panel)
    with pytest.raises(ValueError, match="gene_ranking must be one of"):
        RunConfig().replace(data={"gene_ranking": "hvg"})
    with pytest.raises(ValueError, match="predict_targets must be a list of condition labels"):
        RunConfig().replace(data={"predict_targets": [1, 2]})


def lanes(n_cells: int) -> np.ndarray:
    """Two lanes of unequal size, in no relation to the conditions."""
    return np.where(np.arange(n_cells) % 3 == 0, "L1", "L2")


def test_batch_key_round_trips_and_reaches_the_reader():
    assert "batch_key" not in tomllib.loads(TINY.to_toml())["data"]  # not given: the reader's default, none
    config = TINY.replace(data={"batch_key": "lane"})
    raw = tomllib.loads(config.to_toml())
    assert raw["data"]["batch_key"] == "lane"
    again = RunConfig.from_dict(raw)
    assert again == config and again.data.batch_key == "lane"
    adata = simulate(4, cells_per_condition=20, likelihood="nb", seed=0)
    adata.obs["lane"] = lanes(adata.n_obs)
    data = read_screen(adata, again)
    assert data.batch_key == "lane" and data.batches == ("L1", "L2")
    np.testing.assert_array_equal(data.batch, (lanes(adata.n_obs) == "L2").astype(np.int32))
    assert read_screen(adata, TINY).batches is None
    with pytest.raises(ValueError, match=r"\[data\] batch_key must be an obs/layer name"):
        RunConfig().replace(data={"batch_key": 3})


def test_data_record_names_the_batches_and_old_records_have_none():
    adata = simulate(4, cells_per_condition=20, likelihood="nb", seed=0)
    adata.obs["lane"] = lanes(adata.n_obs)
    record = data_record(load_perturbation_data(adata, batch_key="lane"))
    n_first = int((lanes(adata.n_obs) == "L1").sum())
    assert (record["batch_key"], record["batches"]) == ("lane", ["L1", "L2"])
    assert record["cells_per_batch"] == [n_first, adata.n_obs - n_first]
    unbatched = data_record(load_perturbation_data(adata))
    assert not {"batch_key", "batches", "cells_per_batch"} & set(unbatched)
    assert Run(None, TINY, record).batches == ["L1", "L2"]
    assert Run(None, TINY, unbatched).batches is None  # as a run folder written before batches were recorded


def test_checkpoint_fingerprint_covers_the_batches():
    adata = simulate(4, cells_per_condition=20, likelihood="nb", seed=0)
    adata.obs["lane"] = lanes(adata.n_obs)
    data = load_perturbation_data(adata, batch_key="lane")
    assert _fingerprint(data, TINY) == _fingerprint(data, TINY)
    assert _fingerprint(data._replace(batch=1 - data.batch), TINY) != _fingerprint(data, TINY)
    assert _fingerprint(data._replace(batch=None, batches=None), TINY) != _fingerprint(data, TINY)


def test_checkpoint_fingerprint_covers_the_size_factors():
    adata = simulate(4, cells_per_condition=20, likelihood="nb", seed=0)
    data = load_perturbation_data(adata)
    other = data._replace(size_factor=data.size_factor * 1.5)
    assert _fingerprint(data, TINY) == _fingerprint(data, TINY)
    assert _fingerprint(other, TINY) != _fingerprint(data, TINY)


@pytest.mark.slow
def test_config_toml_of_a_run_repeats_it_exactly(tmp_path):
    adata = simulate(4, cells_per_condition=30, likelihood="nb", seed=1)
    # Non-default reading settings: other label column and control name, library sizes from obs, batches.
    adata.obs["guide"] = adata.obs["condition"].astype(str).replace({"ctrl": "NT"})
    adata.obs["lane"] = lanes(adata.n_obs)
    del adata.obs["condition"]
    first = fit(adata, tmp_path / "first", config=TINY, perturbation_key="guide", control="NT",
                size_factor_key=LIBRARY_SIZE_KEY, batch_key="lane", progress=False)
    recorded = load_config(tmp_path / "first" / "config.toml")
    assert recorded.data.perturbation_key == "guide" and recorded.data.control == "NT"
    assert recorded.data.size_factor_key == LIBRARY_SIZE_KEY and recorded.data.batch_key == "lane"
    assert first.data.batches == ("L1", "L2")
    again = fit(adata, tmp_path / "again", config=tmp_path / "first" / "config.toml", progress=False)
    np.testing.assert_array_equal(again.fit.losses, first.fit.losses)
    np.testing.assert_array_equal(again.posterior["posterior"]["drift"].values,
                                  first.posterior["posterior"]["drift"].values)
