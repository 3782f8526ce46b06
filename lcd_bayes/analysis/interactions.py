"""Genetic-interaction types of double perturbations, each with its posterior probability.

Norman et al. (2019, *Exploring genetic interaction manifolds constructed from rich single-cell
phenotypes*, Science 365:786) read a double ``A+B`` against its two singles by writing the double's
mean expression shift as a combination of the singles' shifts over the genes:

    delta_AB ~ c_A delta_A + c_B delta_B

Every shift here is a condition's mean minus the control's, divided gene by gene by the control's
sd (z-scores against the control: each gene weighs alike whatever its scale, and a gene's monotone
link to the counts changes its z-scores little), and the genes that ``A`` or ``B`` target are
left out (their shift is the perturbation itself, not a response to it). The coefficients are the
least-squares fit without intercept, and from them:

    magnitude   m = sqrt(c_A^2 + c_B^2)              sqrt(2) for an additive double (c_A = c_B = 1)
    fit         corr(c_A delta_A + c_B delta_B, delta_AB)    how much of the double its singles explain
    balance     min(c_A, c_B) / max(c_A, c_B)        1: equal parts; near 0 or below: one single's effect is gone

Each double (in one posterior draw, or as observed) gets the first type whose rule holds:

    neomorphic   fit < 0.8, or both c <= 0      the double moves genes its singles do not
    epistatic    balance < 0.5                  one single dominates, or suppresses the other ("dominant")
    synergistic  m / sqrt(2) > 1.25             stronger than the singles added up
    buffering    m / sqrt(2) < 0.8              weaker than the singles added up
    additive     otherwise

A type's posterior probability is the fraction of posterior draws of that type. The thresholds are
this package's (Norman et al. ranked doubles by these scores without fixed cut-offs); the scores
themselves are reported with their 90% intervals, so other cut-offs can be applied to the table.

The model's shifts are those of the latent state's stationary means, each divided by the control's
stationary sd of the same draw. With the linear drift a double's latent shift is the sum of its
singles' in every draw (``-A^{-1}(c_A + c_B)``): such a run calls every double additive by
construction, and only the nonlinear drift (``--config lcd_nonlinear``) can find interactions.
"""
from __future__ import annotations

import math

import anndata
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from ..diagnostics import DataError
from ..io.expression import canonical_label, expression, label_parts
from ..io.screen import as_matrix, few
from .predict import condition_offsets, latent_moments, parse_request, posterior_draws

TYPES = ("additive", "synergistic", "buffering", "epistatic", "neomorphic")
MIN_FIT = 0.8
MIN_BALANCE = 0.5
SYNERGY = 1.25  # magnitude over the additive double's sqrt(2)
BUFFERING = 0.8
INTERVAL = 0.9
SCORES = ("c_first", "c_second", "magnitude", "fit")


def decompose(first, second, double, keep) -> dict[str, jax.Array]:
    """Norman et al.'s decomposition of ``double`` on ``first`` and ``second`` over the genes where
    ``keep`` is true. Arrays (..., genes) broadcast together; returns ``c_first``, ``c_second``,
    ``magnitude`` and ``fit`` of shape (...), NaN where the singles do not span two directions."""
    w = jnp.asarray(keep, dtype=jnp.result_type(first, float))
    a, b, y = first * w, second * w, double * w
    aa, bb, ab = (a * a).sum(-1), (b * b).sum(-1), (a * b).sum(-1)
    ay, by = (a * y).sum(-1), (b * y).sum(-1)
    det = aa * bb - ab**2
    # Collinear or vanishing singles leave the coefficients undefined, not infinite, and so do
    # fewer genes than three (two coefficients would fit any two genes exactly).
    enough = (det > 1e-6 * jnp.maximum(aa * bb, 1e-30)) & (w.sum(-1) >= 3)
    det = jnp.where(enough, det, jnp.nan)
    c_first, c_second = (bb * ay - ab * by) / det, (aa * by - ab * ay) / det
    fitted = c_first[..., None] * a + c_second[..., None] * b
    return {"c_first": c_first, "c_second": c_second, "magnitude": jnp.hypot(c_first, c_second),
            "fit": _masked_correlation(fitted, y, w)}


def _masked_correlation(x, y, w) -> jax.Array:
    n = w.sum(-1)
    xc = (x - (x * w).sum(-1, keepdims=True) / n[..., None]) * w
    yc = (y - (y * w).sum(-1, keepdims=True) / n[..., None]) * w
    return (xc * yc).sum(-1) / jnp.sqrt((xc * xc).sum(-1) * (yc * yc).sum(-1))


def classify(scores: dict) -> tuple[np.ndarray, np.ndarray]:
    """The type of each decomposition (index into ``TYPES``, -1 where undefined) and which single
    dominates an epistatic one (0: first, 1: second, -1: none), by the rules of the module doc."""
    c1, c2 = np.asarray(scores["c_first"]), np.asarray(scores["c_second"])
    fit, relative = np.asarray(scores["fit"]), np.asarray(scores["magnitude"]) / math.sqrt(2)
    high, low = np.maximum(c1, c2), np.minimum(c1, c2)
    with np.errstate(invalid="ignore", divide="ignore"):
        balance = np.where(high > 0, low / high, -np.inf)
    kind = np.full(c1.shape, TYPES.index("additive"))
    kind = np.where(relative < BUFFERING, TYPES.index("buffering"), kind)
    kind = np.where(relative > SYNERGY, TYPES.index("synergistic"), kind)
    kind = np.where(balance < MIN_BALANCE, TYPES.index("epistatic"), kind)
    kind = np.where((fit < MIN_FIT) | (high <= 0), TYPES.index("neomorphic"), kind)
    defined = np.isfinite(c1) & np.isfinite(c2) & np.isfinite(fit)
    kind = np.where(defined, kind, -1)
    dominant = np.where(kind == TYPES.index("epistatic"), np.where(c1 >= c2, 0, 1), -1)
    return kind, dominant


def _doubles(doubles, record: dict) -> list[tuple[str, str, str]]:
    """(label, first, second) of each requested double, or of every double in training."""
    control, sep = record["control"], record["sep"]
    if doubles is None:
        labels = [q for q in record["conditions"] if len(label_parts(q, control, sep)) == 2]
        if not labels:
            raise DataError("the run was trained on no doubles; name the doubles to classify (CLI --doubles "
                            f"\"A{sep}B,C{sep}D\", API doubles=[...]): pairs of trained labels or modelled genes")
    else:
        labels = doubles.split(",") if isinstance(doubles, str) else list(doubles)
        labels = [str(label).strip() for label in labels if str(label).strip()]
        if not labels:
            raise DataError(f"no doubles given; pass labels such as \"A{sep}B,C{sep}D\"")
    result, seen = [], set()
    for label in labels:
        parts = label_parts(label, control, sep)
        if len(parts) != 2:
            raise DataError(f"{label!r} is not a double: interaction types compare a pair's response with its "
                            f"two singles; pass labels of two perturbations joined by {sep!r}")
        canonical = canonical_label(label, control, sep)
        if canonical not in seen:
            seen.add(canonical)
            result.append((label, *label_parts(canonical, control, sep)))
    return result


def _kept_genes(pairs, record: dict) -> np.ndarray:
    """(doubles, genes) mask: every gene but those the double's two labels target."""
    genes = list(record["genes"])
    targets = record.get("targets", {})
    keep = np.ones((len(pairs), len(genes)), dtype=bool)
    for row, (_, first, second) in enumerate(pairs):
        for label in (first, second):
            for gene in targets.get(label, [label] if label in genes else []):
                keep[row, genes.index(gene)] = False
    return keep


def interaction_scores(tree, config, record: dict, doubles=None, *, seed: int = 0) -> tuple[list, dict, np.ndarray]:
    """Per posterior draw, the decomposition of each double: (pairs, scores (draws, doubles) per
    score name, keep mask)."""
    pairs = _doubles(doubles, record)
    posterior = tree["posterior"]
    control = record["control"]
    labels = [control] + list(dict.fromkeys(p for _, first, second in pairs for p in (first, second)))
    labels += [label for label, _, _ in pairs]
    request = parse_request(labels, record, has_target_law="shift_mean" in posterior)
    draws = posterior_draws(posterior, config.model)
    key = jax.random.PRNGKey(seed)
    means, sds = latent_moments(draws, condition_offsets(draws, request, key), key, config.model)
    z = (means - means[:, :1]) / sds[:, :1]  # (draws, conditions, genes), z-scores against the control
    row = {canonical_label(q, control, record["sep"]): i for i, q in enumerate(request.conditions)}
    index = np.array([[row[first], row[second], row[canonical_label(label, control, record["sep"])]]
                      for label, first, second in pairs])
    keep = _kept_genes(pairs, record)
    scores = decompose(z[:, index[:, 0]], z[:, index[:, 1]], z[:, index[:, 2]], keep)
    return pairs, {name: np.asarray(value) for name, value in scores.items()}, keep


def observed_scores(adata: anndata.AnnData, record: dict, pairs, keep: np.ndarray, *, layer=None,
                    total_counts_key=None) -> pd.DataFrame:
    """The decomposition of each double whose control, singles and double cells ``adata`` holds
    (library-normalized log1p expression, z-scored against its control cells); NaN otherwise."""
    key, control, sep = record["perturbation_key"], record["control"], record["sep"]
    if key not in adata.obs:
        raise DataError(f"the observed data have no obs column {key!r} (the run's perturbation key; columns: "
                        f"{few(list(adata.obs.columns))})")
    raw = adata.obs[key].astype(str).to_numpy()
    unique, inverse = np.unique(raw, return_inverse=True)
    labels = np.array([canonical_label(u, control, sep) for u in unique], dtype=object)[inverse]
    if not (labels == control).any():
        raise DataError(f"the observed data have no control cells ({key!r} == {control!r}): the shifts are "
                        "measured from them")
    values = _observed_values(adata, record, layer=layer, total_counts_key=total_counts_key)
    # Every label's mean in one pass, z-scored against the control cells.
    present, index, n_cells = np.unique(labels, return_inverse=True, return_counts=True)
    sums = np.zeros((present.size, values.shape[1]))
    np.add.at(sums, index, values)
    means = sums / n_cells[:, None]
    reference = values[labels == control]
    scale = reference.std(0, dtype=np.float64)
    scale = np.where(scale > 0, scale, np.nan)  # a gene constant in the control cells has no z-score
    z = np.vstack([(means - reference.mean(0, dtype=np.float64)) / scale, np.full(values.shape[1], np.nan)])
    row = {label: i for i, label in enumerate(present)}
    missing = present.size  # the all-NaN row: a label without cells here
    wanted = [(first, second, canonical_label(label, control, sep)) for label, first, second in pairs]
    parts = np.array([[row.get(name, missing) for name in names] for names in wanted]).reshape(len(pairs), 3)
    first, second, double = z[parts[:, 0]], z[parts[:, 1]], z[parts[:, 2]]
    usable = keep & np.isfinite(first) & np.isfinite(second) & np.isfinite(double)
    scores = {k: np.asarray(v, dtype=np.float64) for k, v in
              decompose(*(np.nan_to_num(x) for x in (first, second, double)), usable).items()}
    kind, dominant = classify(scores)
    table = pd.DataFrame({
        "n_observed_cells": np.append(n_cells, 0)[parts[:, 2]],
        **{f"observed_{k}": v for k, v in scores.items()},
        "observed_type": [TYPES[k] if k >= 0 else None for k in kind],
        "observed_dominant": [names[d] if d >= 0 else None for names, d in zip(wanted, dominant)],
    })
    return table


def _observed_values(adata: anndata.AnnData, record: dict, *, layer, total_counts_key) -> np.ndarray:
    """Cells x modelled genes on the scale the shifts are read on: library-normalized log1p for
    counts, the values as fitted for a gaussian run."""
    if record.get("is_counts", True):
        return expression(adata, record["genes"], layer=layer, total_counts_key=total_counts_key,
                          where="observed data")
    missing = [g for g in record["genes"] if g not in adata.var_names]
    if missing:
        raise DataError(f"the observed data lack {len(missing)} modelled genes (e.g. {few(missing)})")
    subset = adata[:, list(record["genes"])]
    matrix = as_matrix(subset.layers[layer] if layer is not None else subset.X)
    return np.asarray(matrix.toarray() if hasattr(matrix, "toarray") else matrix, dtype=np.float64)


def interaction_table(pairs, scores: dict, record: dict) -> pd.DataFrame:
    """One row per double: each score's posterior median and 90% interval, each type's posterior
    probability, the most probable type, and for epistatic draws the single that dominates.

    Medians, not means: the coefficients are ratios, and a draw whose singles' shifts are nearly
    collinear gives them any size (one such draw of 200 put a double's mean magnitude at 8.8, its
    90% interval at [0.9, 1.4])."""
    kind, dominant = classify(scores)
    defined = kind >= 0
    n_defined = defined.sum(0)
    trained = {canonical_label(q, record["control"], record["sep"]) for q in record["conditions"]}
    rows = []
    for j, (label, first, second) in enumerate(pairs):
        ok = defined[:, j]
        row = {"double": label, "first": first, "second": second,
               "in_training": canonical_label(label, record["control"], record["sep"]) in trained,
               "n_draws": int(n_defined[j])}
        for name in SCORES:
            values = scores[name][ok, j]
            low, high = (np.quantile(values, [(1 - INTERVAL) / 2, (1 + INTERVAL) / 2]) if values.size
                         else (np.nan, np.nan))
            row.update({name: float(np.median(values)) if values.size else np.nan,
                        f"{name}_low": float(low), f"{name}_high": float(high)})
        probs = {t: float((kind[ok, j] == i).mean()) if ok.any() else np.nan for i, t in enumerate(TYPES)}
        row.update({f"prob_{t}": p for t, p in probs.items()})
        row["type"] = max(TYPES, key=lambda t: probs[t]) if ok.any() else None
        wins = [float((dominant[ok, j] == side).mean()) if ok.any() else 0.0 for side in (0, 1)]
        row["dominant"] = (first, second)[int(np.argmax(wins))] if max(wins) > 0 else None
        row["prob_dominant"] = max(wins)
        rows.append(row)
    return pd.DataFrame(rows)


def interactions(tree, config, record: dict, doubles=None, *, observed: anndata.AnnData | None = None,
                 seed: int = 0) -> pd.DataFrame:
    """The interaction table of ``doubles`` (``"A+B,C+D"``, a list, or None: every double in training)
    from a fit's posterior, with the observed decomposition where ``observed`` holds the double,
    its singles and control cells (read like the training data: the run's layer and total-counts key).
    See the module doc for the definitions."""
    pairs, scores, keep = interaction_scores(tree, config, record, doubles, seed=seed)
    table = interaction_table(pairs, scores, record)
    if observed is not None:
        seen = observed_scores(observed, record, pairs, keep, layer=config.data.layer,
                               total_counts_key=config.data.total_counts_key)
        table = pd.concat([table, seen.reindex(columns=_OBSERVED_COLUMNS)], axis=1)
    table.attrs["drift"] = config.model.drift
    return table


_OBSERVED_COLUMNS = ["n_observed_cells", *(f"observed_{name}" for name in SCORES), "observed_type", "observed_dominant"]


def format_interactions(table: pd.DataFrame) -> str:
    """A short text table: each double's most probable type, its probability, and the magnitude."""
    lines = [f"{'double':<24} {'type':<30} {'prob':>5}  {'magnitude (90%)':<20} observed"]
    for _, row in table.iterrows():
        kind = row["type"] or "undefined"
        prob = row[f"prob_{kind}"] if row["type"] else float("nan")
        if kind == "epistatic" and row["dominant"]:
            kind = f"epistatic ({row['dominant']} dominant)"
        observed = row.get("observed_type") if isinstance(row.get("observed_type"), str) else "-"
        lines.append(f"{row['double']:<24} {kind:<30} {prob:5.2f}  "
                     f"{row['magnitude']:.2f} [{row['magnitude_low']:.2f}, {row['magnitude_high']:.2f}]   {observed}")
    if table.attrs.get("drift") == "linear":
        lines.append("note: with the linear drift every double's latent shift is the sum of its singles', so "
                     "doubles come out additive by construction; fit --config lcd_nonlinear to find interactions")
    return "\n".join(lines)
