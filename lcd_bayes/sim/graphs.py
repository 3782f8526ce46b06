"""What the two simulators share: the random signed graph and the effect-matrix layout.

A seed gives the same signed graph in ``sim.linear`` and ``sim.nonlinear``, since both draw it
here with the same calls in the same order.
"""
from __future__ import annotations

import numpy as np


def effect_matrix(matrix: np.ndarray) -> np.ndarray:
    """``(target, source)`` matrix -> ``(source, target)`` effects with a zero diagonal."""
    effect = np.array(matrix, dtype=float).T.copy()
    np.fill_diagonal(effect, 0.0)
    return effect


def random_graph_weights(d: int, expected_degree: float, weight_range: tuple[float, float],
                         rng: np.random.Generator) -> np.ndarray:
    """Erdős–Rényi signed weights, ``weights[k, j]``: effect of gene j on gene k (zero diagonal).

    Full matrices are drawn in a fixed order, so the graph depends only on the generator's state
    (the linear and nonlinear simulators share a graph for a given seed).
    """
    # Each gene has 2 (d - 1) potential in/out edges, hence this probability.
    p_edge = min(1.0, expected_degree / (2.0 * (d - 1)))
    mask = rng.random((d, d)) < p_edge
    np.fill_diagonal(mask, False)
    signs = rng.choice(np.array([-1.0, 1.0]), size=(d, d))
    magnitudes = rng.uniform(weight_range[0], weight_range[1], size=(d, d))
    return np.where(mask, signs * magnitudes, 0.0)
