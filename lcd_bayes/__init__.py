"""lcd-bayes: Bayesian latent causal diffusions for single-cell perturbation screens.

``fit`` a screen (AnnData), read its causal ``edges``, ``predict`` unseen conditions, ``load`` a
saved run; ``simulate`` draws a screen with known edges, ``evaluate`` scores predicted cells
against observed ones, and ``pl`` draws the figures. See ``lcd_bayes.api``.
"""
import importlib

__version__ = "0.1.0"
__all__ = ["Run", "fit", "load", "edges", "predict", "simulate", "evaluate", "pl", "__version__"]


def __getattr__(name: str):
    # Loaded on first use, so that `lcd-bayes --help` (which imports this package) needs no JAX.
    if name == "pl":
        return importlib.import_module(".pl", __name__)
    if name in __all__:
        return getattr(importlib.import_module(".api", __name__), name)
    raise AttributeError(f"module 'lcd_bayes' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
