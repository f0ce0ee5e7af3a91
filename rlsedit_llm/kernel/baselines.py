"""Baseline layer solvers with the interface of :class:`~rlsedit_llm.solver.LayerRLS`.

They share the editor's key and value code, so only the solver differs (the NumPy references of
the same rules are in :mod:`rlsedit_theory.reference`):

- ``memit``: per-batch write with the prior metric ``A`` and no memory of earlier edits
  (the recursion with ``C`` reset to ``A^{-1}`` after every batch);
- ``memit_seq``: the cumulative normal equations re-solved densely every batch (a Cholesky
  factorisation of ``G_t``, ``O(d_k^3)``); mathematically RLSEdit with the same ``alpha, beta``;
- ``alphaedit``: updates restricted to the null space of the anchor statistics (eigenvectors of
  ``E[k k^T]`` with eigenvalue below ``threshold`` times the largest), with cumulative past keys
  and a ridge.
"""

from __future__ import annotations

import torch

from rlsedit_llm.errors import HyperparameterError, NotPositiveDefiniteError
from rlsedit_llm.kernel.rls import LayerRLS, Pending

__all__ = ["PerBatchLayer", "DenseCumulativeLayer", "NullSpaceLayer", "make_layer_solver", "METHODS"]


class PerBatchLayer(LayerRLS):
    """MEMIT: every batch is solved against the prior metric only; ``C`` stays ``A^{-1}``."""

    def commit(self, pending: Pending) -> None:
        # Adopt the weights only: the state matrix is never updated.
        super().commit(pending._replace(C=self.C_))

    def downdate(self, K, V):
        raise NotImplementedError("per-batch MEMIT keeps no memory of past edits to remove")


class DenseCumulativeLayer(LayerRLS):
    """MEMIT-seq: ``Delta = G_t^{-1} K^T R`` with ``G_t = A + sum K_i^T K_i`` kept and factorised."""

    def __init__(self, W0, alpha, beta, gram0=None, *, dtype=torch.float64, track_information=False):
        super().__init__(W0, alpha, beta, gram0, dtype=dtype, track_information=False)
        d_k = self.C_.shape[0]
        eye = torch.eye(d_k, dtype=dtype, device=self.C_.device)
        self.G_ = alpha * eye + (beta * gram0.to(eye) if gram0 is not None else 0)
        self.G_ = (self.G_ + self.G_.mT) / 2

    def step(self, K, R, *, sign: int = 1) -> Pending:
        if sign != 1:
            raise NotImplementedError("the dense baseline does not implement removal")
        K, R = self._check(K, R, "R")
        G = self.G_ + K.mT @ K
        L, info = torch.linalg.cholesky_ex(G)
        if int(info) != 0:
            raise NotPositiveDefiniteError("G_t is not positive definite")
        delta = torch.cholesky_solve(K.mT @ R, L)  # (d_k, d_v)
        return Pending(self.C_, self.W_ + delta, K, 1)  # C unused by this baseline

    def drift(self) -> float:
        return 0.0


class NullSpaceLayer(LayerRLS):
    """AlphaEdit: ``Delta = (P X_t + ridge I)^{-1} P K^T R`` with ``X_t = sum_{i<=t} K_i^T K_i``."""

    def __init__(self, W0, alpha, beta, gram0=None, *, dtype=torch.float64, track_information=False,
                 threshold: float = 1e-2, ridge: float = 1.0):
        # The prior metric only matters through P; alpha = ridge keeps the base class valid.
        super().__init__(W0, max(alpha, 1.0), 0.0, None, dtype=dtype)
        if gram0 is None or not threshold >= 0 or not ridge > 0:
            raise HyperparameterError("alphaedit needs anchor statistics, threshold >= 0, ridge > 0")
        evals, evecs = torch.linalg.eigh(gram0.to(dtype=dtype, device=self.C_.device))
        keep = evals <= threshold * evals.max().clamp(min=0)
        Q = evecs[:, keep]  # (d_k, m)
        self.P_ = Q @ Q.mT  # projector onto the kept (small-eigenvalue) directions
        self.ridge = ridge
        self.X_ = torch.zeros_like(self.P_)

    def step(self, K, R, *, sign: int = 1) -> Pending:
        if sign != 1:
            raise NotImplementedError("the null-space baseline does not implement removal")
        K, R = self._check(K, R, "R")
        X = self.X_ + K.mT @ K
        M = self.P_ @ X + self.ridge * torch.eye(X.shape[0], dtype=X.dtype, device=X.device)
        delta = torch.linalg.solve(M, self.P_ @ (K.mT @ R))
        return Pending(X, self.W_ + delta, K, 1)  # carries X_t in the C slot

    def commit(self, pending: Pending) -> None:
        self.X_, self.W_ = pending.C, pending.W
        self.n_updates_ += 1
        self.n_rows_ += pending.K.shape[0]


METHODS = {
    "rlsedit": LayerRLS,
    "memit": PerBatchLayer,
    "memit_seq": DenseCumulativeLayer,
    "alphaedit": NullSpaceLayer,
}


def make_layer_solver(method: str, W0, alpha, beta, gram0, *, dtype, track_information=False):
    """Build the layer solver of ``method`` (one of :data:`METHODS`)."""
    try:
        cls = METHODS[method]
    except KeyError:
        raise HyperparameterError(f"unknown method {method!r}; choose one of {sorted(METHODS)}") from None
    return cls(W0, alpha, beta, gram0, dtype=dtype, track_information=track_information)
