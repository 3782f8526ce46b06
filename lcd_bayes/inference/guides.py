"""Variational families over the global parameters of the LCD program.

The per-cell states are integrated out inside the model (``model.program.lcd_model``); these are the
Gaussian guides over the drift, shifts and noise parameters, chosen by ``[fit] guide``.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.distributions import constraints
from numpyro.distributions.transforms import LowerCholeskyAffine, Transform
from numpyro.handlers import block
from numpyro.infer.autoguide import (
    AutoBatchedMultivariateNormal,
    AutoGuideList,
    AutoLowRankMultivariateNormal,
    AutoNormal,
)

from .initialization import init_at

# Gene k's block: row k of the horseshoe's raw weights and local scales of R (gene k's inputs)
# and gene k's own parameters (self-decay, basal drift, observation noise), which trade off
# against its inputs: a larger decay with larger inputs gives the same mean response (and its batch
# effects, which trade off against its scale and basal drift). With them
# the d = 20 true-edge coverage (50%/90%) went 0.23/0.67 -> 0.36/0.77 (Gaussian) and
# 0.25/0.63 -> 0.27/0.65 (NB). Sites a model does not have are skipped.
ROW_BLOCK_SITES = ("interaction_raw", "interaction_local",
                   "log_decay", "basal_relative", "noise_sd", "gene_scale", "concentration", "gate",
                   "batch_basal_relative", "batch_log_scale", "batch_offset")


class RowTransform(Transform):
    """Lays the flat latent vector of stacked sites of shapes ``(rows, columns[s])`` out as one
    block per row, ``(rows, sum(columns))``, row k holding row k of every site. (numpyro's batched
    guides reshape the flat vector as is, which would put rows 2k and 2k+1 of the first site in
    block k.) A permutation: volume-preserving."""

    domain = constraints.independent(constraints.real, 2)
    codomain = constraints.real_vector

    def __init__(self, columns: tuple[int, ...], n_rows: int):
        self.columns, self.n_rows = tuple(columns), n_rows
        self._splits = np.cumsum(self.columns)[:-1].tolist()

    def __call__(self, blocks):
        batch = blocks.shape[:-2]
        parts = jnp.split(blocks, self._splits, axis=-1)
        return jnp.concatenate([part.reshape(batch + (-1,)) for part in parts], axis=-1)

    def _inverse(self, flat):
        batch = flat.shape[:-1]
        parts = jnp.split(flat, [self.n_rows * c for c in self._splits], axis=-1)
        return jnp.concatenate([part.reshape(batch + (self.n_rows, c)) for part, c in zip(parts, self.columns)], axis=-1)

    def log_abs_det_jacobian(self, x, y, intermediates=None):
        return jnp.zeros(x.shape[:-2])

    def forward_shape(self, shape):
        return shape[:-2] + (shape[-2] * shape[-1],)

    def inverse_shape(self, shape):
        return shape[:-1] + (self.n_rows, sum(self.columns))


class AutoRowBlockNormal(AutoBatchedMultivariateNormal):
    """A full-covariance Gaussian per row, jointly over that row of every site in the row plate."""

    def _get_reshape_transform(self):
        n_rows = self._batch_shape[0]
        # The flat latent vector stacks the sites in the order the model samples them.
        columns = [np.size(loc) // n_rows for loc in self._init_locs.values()]
        return RowTransform(tuple(columns), n_rows)

    def _get_batched_posterior(self):
        # As the parent, but the initial location is laid out in row blocks, like the samples.
        init = self._get_reshape_transform()._inverse(self._init_latent)
        loc = numpyro.param(f"{self.prefix}_loc", init)
        size = init.shape[-1]
        scale_tril = numpyro.param(
            f"{self.prefix}_scale_tril", jnp.broadcast_to(self._init_scale * jnp.eye(size), init.shape[:-1] + (size, size)),
            constraint=self.scale_tril_constraint,
        )
        # loc + L eps as a transform of eps, not a MultivariateNormal: the ELBO then scores each
        # draw by the eps it was made from (numpyro passes the sampling intermediates to
        # log_prob) instead of solving L x = z - loc. With strongly correlated blocks (diagonal
        # of L 0.008, off-diagonal 2.3 at d = 100) that float32 triangular solve returned
        # log q = -1e35 for q's own draw, and the fit went non-finite.
        return dist.TransformedDistribution(dist.Normal(jnp.zeros_like(loc), 1.0).to_event(1),
                                            LowerCholeskyAffine(loc, scale_tril))


def global_variational_family(model, guide: str, fit, init_loc_fn=init_at({})):
    """The Gaussian family over the global (drift, shift and noise) parameters.

    ``row_block``: row k of ``R`` is a regression of gene k's mean response on the other genes'
    (and of its covariance with them), so its entries, their horseshoe local scales and gene k's
    own parameters are correlated within the row and only weakly across rows. One full
    covariance per row (``ROW_BLOCK_SITES``) keeps what the mean-field guide drops at about
    ``d (2d)^2 / 2`` parameters instead of the full-rank ``(2 d^2)^2 / 2``; the global scalars
    and the shifts stay mean-field. Measured (docs/inference.md, "Guides over the globals"):
    NUTS-relative sds of the effects 0.63 -> 0.68 (4 genes); d = 20 Gaussian coverage of the true
    edges 0.26/0.73 (mean-field) -> 0.36/0.77 (50%/90%).

    ``init_loc_fn`` places the guide's initial location (``initialization.init_at``: given values,
    the prior median elsewhere).
    """
    if guide == "low_rank":
        return AutoLowRankMultivariateNormal(
            model, rank=fit.guide_rank, init_loc_fn=init_loc_fn, init_scale=fit.init_scale
        )
    if guide == "mean_field":
        return AutoNormal(model, init_loc_fn=init_loc_fn, init_scale=fit.init_scale)
    family = AutoGuideList(model)
    # The row block sees its sites and the plates (so it knows the rows are a plate).
    family.append(AutoRowBlockNormal(
        block(model, hide_fn=lambda site: site.get("type") != "plate" and site.get("name") not in ROW_BLOCK_SITES),
        batch_ndim=1, prefix="row_block", init_loc_fn=init_loc_fn, init_scale=fit.init_scale,
    ))
    family.append(AutoNormal(block(model, hide=list(ROW_BLOCK_SITES)), init_loc_fn=init_loc_fn,
                             init_scale=fit.init_scale))
    return family
