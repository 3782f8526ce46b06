"""A second simulator of perturbation screens, written for the tests and sharing nothing with
``lcd_bayes.sim``: a different graph generator, different effect and noise scales, no softplus.

Defaults tuned to our own simulator pass on our own simulator's screens; this one checks that a
default fit also runs on screens it did not produce. The process is a linear SDE

    dx = (W x - D x + c + s_p) dt + diag(noise) dW,

W a directed graph grown by preferential attachment (hub regulators, cycles allowed) with normal
weights, D a per-gene decay drawn log-uniformly, per-gene noise scales, and a perturbation p
lowering its target's production c by a multiple of that gene's stationary sd (a CRISPRi-like
knockdown). Cells are drawn from the exact stationary law N(m_p, S), S solving the Lyapunov
equation (no Euler steps), then observed as Gaussian values (the state plus measurement noise,
kept within +-8) or as Poisson-log-normal counts of ``exp(log baseline + x)`` times a per-cell
library size, kept in ``obs["true_library_size"]`` for diagnosis (a fit is not told it unless
given ``size_factor_key``).

With ``n_batches > 1`` every condition's cells are dealt evenly over the batches (``obs["batch"]``),
and each batch raises every gene's production by its own multiple of that gene's stationary sd
(propagated through the system to a shift of the stationary mean) and rescales each gene's
measurements: a per-gene factor on the counts' baseline, an additive offset on Gaussian values.
Batch draws come from a generator of their own, so a screen without batches is what it always was.
"""
from __future__ import annotations

import anndata
import numpy as np
import pandas as pd
from scipy.linalg import solve_continuous_lyapunov


def preferential_attachment_graph(d: int, rng: np.random.Generator, edges_per_gene: int = 2) -> np.ndarray:
    """``weights[target, source]``: each new gene draws ``edges_per_gene`` partners with probability
    growing with their degree, and each edge points either way (so cycles occur)."""
    weights = np.zeros((d, d))
    degree = np.ones(d)
    for new in range(1, d):
        partners = rng.choice(new, size=min(edges_per_gene, new), replace=False, p=degree[:new] / degree[:new].sum())
        for old in partners:
            target, source = (new, old) if rng.random() < 0.5 else (old, new)
            weights[target, source] = rng.normal(0.0, 0.6)
            degree[[new, old]] += 1
    return weights


def independent_screen(n_genes: int, *, cells_per_condition: int = 150, observation: str = "gaussian",
                       knockdown_sds: float = 2.5, seed: int = 0, n_batches: int = 1, batch_sds: float = 0.5,
                       batch_scale_sd: float = 0.3) -> anndata.AnnData:
    """A screen with every gene knocked down once, plus ``control``; ``obs["perturbation"]``
    labels the cells, ``uns["independent_truth"]`` holds the drift ``W - D``.

    ``n_batches > 1`` adds ``obs["batch"]`` (``"batch0"``, ...): batch b adds
    ``batch_sds * N(0, 1)`` stationary sds of production to each gene (the truth's
    ``batch_mean_shift`` (batches, genes) is what that does to the stationary mean) and
    ``N(0, batch_scale_sd^2)`` to each gene's log baseline (counts) or to its values (Gaussian),
    the truth's ``batch_log_scale`` (batches, genes). With one batch both sds are unused."""
    if observation not in ("gaussian", "counts"):
        raise ValueError(f"observation must be 'gaussian' or 'counts', not {observation!r}")
    if int(n_batches) != n_batches or n_batches < 1:
        raise ValueError(f"n_batches must be a whole number >= 1, not {n_batches!r}")
    rng = np.random.default_rng(seed)
    d = n_genes
    weights = preferential_attachment_graph(d, rng)
    decay = np.exp(rng.uniform(np.log(0.5), np.log(3.0), size=d))
    drift = weights - np.diag(decay)
    # Stability with a margin: raise every decay by what the graph's feedback needs.
    abscissa = np.max(np.linalg.eigvals(drift).real)
    if abscissa > -0.3:
        drift -= (abscissa + 0.3) * np.eye(d)
    noise = rng.uniform(0.4, 1.5, size=d)
    covariance = solve_continuous_lyapunov(drift, -np.diag(noise**2))
    control_mean = rng.uniform(-1.0, 1.0, size=d)
    production = -drift @ control_mean
    cholesky = np.linalg.cholesky(covariance + 1e-9 * np.eye(d))
    stationary_sd = np.sqrt(np.diag(covariance))

    labels = ["control", *[f"G{g}" for g in range(d)]]  # a label names its target gene
    blocks = []
    for row, label in enumerate(labels):
        knocked = production.copy()
        if row:
            gene = row - 1
            knocked[gene] -= knockdown_sds * stationary_sd[gene] * decay[gene]
        mean = np.linalg.solve(-drift, knocked)
        blocks.append(mean + rng.standard_normal((cells_per_condition, d)) @ cholesky.T)
    state = np.concatenate(blocks)
    offset = 0.0  # per-cell measurement offsets of the batches
    if n_batches > 1:
        batch_rng = np.random.default_rng([seed, 1])
        # Deal each condition's cells over the batches in turn, in a random order per condition.
        batch = np.concatenate([batch_rng.permutation(np.arange(cells_per_condition) % n_batches)
                                for _ in labels])
        production_shift = batch_sds * batch_rng.standard_normal((n_batches, d)) * stationary_sd * decay
        batch_mean_shift = np.linalg.solve(-drift, production_shift.T).T
        batch_log_scale = batch_rng.normal(0.0, batch_scale_sd, size=(n_batches, d))
        state = state + batch_mean_shift[batch]
        offset = batch_log_scale[batch]
    if observation == "gaussian":
        values = np.clip(state + rng.normal(0.0, 0.3, size=state.shape) + offset, -8.0, 8.0)
    else:
        log_baseline = rng.uniform(np.log(0.3), np.log(30.0), size=d)
        library = np.exp(rng.normal(0.0, 0.35, size=(len(state), 1)))
        values = rng.poisson(library * np.exp(log_baseline + offset + np.clip(state, -6.0, 6.0))).astype(np.float32)
    obs = pd.DataFrame({"perturbation": np.repeat(labels, cells_per_condition)},
                       index=[f"cell{i}" for i in range(len(state))])
    if observation == "counts":
        obs["true_library_size"] = library[:, 0]
    if n_batches > 1:
        obs["batch"] = pd.Categorical.from_codes(batch, categories=[f"batch{b}" for b in range(n_batches)])
    adata = anndata.AnnData(values.astype(np.float32), obs=obs,
                            var=pd.DataFrame(index=[f"G{g}" for g in range(d)]))
    adata.uns["independent_truth"] = {"drift": drift}
    if n_batches > 1:
        adata.uns["independent_truth"].update(batch_mean_shift=batch_mean_shift, batch_log_scale=batch_log_scale)
    return adata
