"""Combination-prediction splits: folds, training fractions, errors, and the real Norman split."""
import anndata
import numpy as np
import pandas as pd
import pytest

from lcd_bayes.analysis.splits import Split, combination_splits, split_anndata
from lcd_bayes.io.screen import DataError

# Six eligible combinations over singles A..E, plus one (A+Z) whose single Z was never seen.
LABELS = ["ctrl", "A", "B", "C", "D", "E+ctrl", "B+A", "A+C", "C+D", "D+E", "A+E", "B+C", "A+Z"]
ELIGIBLE = {"A+B", "A+C", "C+D", "D+E", "A+E", "B+C"}
SINGLES = {"A", "B", "C", "D", "E"}


def parts(label):
    return set(label.split("+"))


def test_single_fold_tests_every_eligible_combination():
    (split,) = combination_splits(LABELS)
    assert isinstance(split, Split) and split.fold == 0
    assert set(split.test) == ELIGIBLE
    assert split.train[0] == "ctrl"
    assert set(split.train) == {"ctrl", *SINGLES, "A+Z"}  # "E+ctrl" is the single "E"


def test_folds_partition_eligible_and_train_holds_their_singles():
    splits = combination_splits(LABELS * 3, n_folds=4, train_double_fraction=1.0, seed=1)
    tests = [set(s.test) for s in splits]
    assert [s.fold for s in splits] == [0, 1, 2, 3]
    assert set().union(*tests) == ELIGIBLE and sum(map(len, tests)) == len(ELIGIBLE)
    assert sorted(map(len, tests)) == [1, 1, 2, 2]
    for split in splits:
        assert not set(split.test) & set(split.train)
        assert all(parts(combo) <= set(split.train) for combo in split.test)
        # Fraction 1: every combination not tested trains.
        assert set(split.train) == {"ctrl", *SINGLES, "A+Z", *(ELIGIBLE - set(split.test))}


def test_determinism_by_seed():
    first = combination_splits(LABELS, n_folds=3, train_double_fraction=0.5, seed=7)
    assert first == combination_splits(LABELS, n_folds=3, train_double_fraction=0.5, seed=7)
    orders = {tuple(s.test for s in combination_splits(LABELS, n_folds=3, seed=seed)) for seed in range(6)}
    assert len(orders) > 1


def test_training_fraction():
    none = combination_splits(LABELS, n_folds=2, train_double_fraction=0.0)
    assert all(set(s.train) == {"ctrl", *SINGLES} for s in none)
    half = combination_splits(LABELS, n_folds=2, train_double_fraction=0.5, seed=3)
    full = combination_splits(LABELS, n_folds=2, train_double_fraction=1.0, seed=3)
    for h, f in zip(half, full):
        combos = set(h.train) - {"ctrl", *SINGLES}
        assert len(combos) == round(0.5 * 4)  # 3 other eligible + A+Z
        assert combos <= set(f.train) and h.test == f.test


def test_errors():
    with pytest.raises(DataError, match="no control"):
        combination_splits(["A", "B", "A+B"])
    with pytest.raises(DataError, match="singles without cells.*'B'"):
        combination_splits(["ctrl", "A", "A+B"])
    with pytest.raises(DataError, match="no combination"):
        combination_splits(["ctrl", "A", "B"])
    with pytest.raises(DataError, match="n_folds=7 exceeds the 6"):
        combination_splits(LABELS, n_folds=7)
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="train_double_fraction"):
            combination_splits(LABELS, train_double_fraction=bad)
    with pytest.raises(ValueError, match="n_folds"):
        combination_splits(LABELS, n_folds=0)


def test_split_anndata_copies_and_keeps_control_in_test():
    labels = np.repeat(["ctrl", "A", "B+ctrl", "B+A", "A+Z"], 3)
    adata = anndata.AnnData(np.ones((labels.size, 2), np.float32),
                            obs=pd.DataFrame({"condition": labels}, index=[f"c{i}" for i in range(labels.size)]))
    (split,) = combination_splits(adata.obs["condition"])
    train, test = split_anndata(adata, split)
    assert set(train.obs["condition"]) == {"ctrl", "A", "B+ctrl", "A+Z"}
    assert set(test.obs["condition"]) == {"ctrl", "B+A"}
    assert not train.is_view and not test.is_view
    with pytest.raises(DataError, match="no cells"):
        split_anndata(adata, Split(train=("ctrl", "A"), test=("A+Q",)))


def test_norman_split(perturbench_path):
    adata = anndata.read_h5ad(perturbench_path, backed="r")
    labels = adata.obs.loc[adata.obs["dataset"] == "norman19", "condition"]
    (split,) = combination_splits(labels, control="control")
    assert set(split.test) == {"KLF1+MAP2K6", "KLF1+TGFBR2", "MAP2K3+MAP2K6", "MAP2K3+SLC38A2", "MAPK1+TGFBR2"}
    assert "SET+KLF1" not in split.test and "KLF1+SET" in split.train
