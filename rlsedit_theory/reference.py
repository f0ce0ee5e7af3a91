"""Reference editors run on the same streams, to compare RLSEdit against.

Each has the interface of :class:`~rlsedit_theory.recursive.RecursiveLS`: ``update(K, V)``
returns the new weights, and ``W_`` holds them.

- :class:`HardWrite`: exact minimum-``A``-norm change that makes ``K W = V`` (least squares
  where that is impossible). The ``s -> 0`` limit of one soft step.
- :class:`PerBatchReset`: MEMIT-like; each batch solves its own soft problem around the current
  weights with the prior metric ``A`` (the recursion with ``C`` reset to ``A^{-1}`` every batch).
- :class:`NullSpaceProjection`: AlphaEdit-like; updates restricted to the span of the anchor
  Gram's small eigenvalues, with cumulative past keys and a ridge.
- :class:`DenseCumulative`: MEMIT-seq-like; the cumulative normal equations re-solved densely
  every batch (``O(d_k^3)`` per batch). Equals RLSEdit exactly.

Every ``update`` takes optional per-row weights ``weights (u,)``: the editor then works on the
row-scaled batch ``(Omega^{1/2} K, Omega^{1/2} V)``, i.e. its least-squares terms for that batch
are weighted by ``Omega`` (for :class:`HardWrite` the weights only matter where the batch cannot
be written exactly).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import scipy.linalg
from numpy.typing import ArrayLike

from .errors import HyperparameterError, ShapeError
from .problem import Problem
from .recursive import woodbury_update

__all__ = ["HardWrite", "PerBatchReset", "NullSpaceProjection", "DenseCumulative", "run_stream"]


class _Editor:
    def __init__(self, problem: Problem):
        self.problem = problem
        self.W_ = problem.W_star0
        self.n_updates_ = 0

    def update(self, K: np.ndarray, V: np.ndarray, weights: ArrayLike | None = None) -> np.ndarray:
        """Apply the batch ``K (u, d_k)``, ``V (u, d_v)`` with optional positive row weights
        ``(u,)``; return the new ``W_``. Bad input raises a typed error and changes nothing."""
        K, V = self.problem.weighted_batch(K, V, weights)
        self.W_ = self.W_ + self._delta(K, V - K @ self.W_)
        self.n_updates_ += 1
        return self.W_

    def _delta(self, K, r):  # (u, d_k), (u, d_v) -> (d_k, d_v)
        raise NotImplementedError


class HardWrite(_Editor):
    """``W <- W + A^{-1} K^T (K A^{-1} K^T)^+ r``: the minimum-``A``-norm exact write."""

    def _delta(self, K, r):
        AK = self.problem.solve_metric(K.T)  # (d_k, u)
        M = K @ AK  # (u, u) symmetric PSD
        y = scipy.linalg.lstsq(M, r, cond=1e-12)[0]  # minimum-norm solution, = M^+ r
        return AK @ y


class PerBatchReset(_Editor):
    """Each batch: ``min ||K W - V||^2 + ||W - W_prev||_A^2`` (memory of past edits dropped)."""

    def __init__(self, problem: Problem):
        super().__init__(problem)
        self._C0 = problem.solve_metric(np.eye(problem.d_k))

    def _delta(self, K, r):
        # One recursion step from W = 0 with target r returns exactly the change L r.
        _, step, _ = woodbury_update(self._C0, np.zeros((self.problem.d_k, r.shape[1])), K, r)
        return step


class NullSpaceProjection(_Editor):
    """AlphaEdit-like: ``Delta = (P X_t + ridge I)^{-1} P K^T r`` with ``X_t = sum_{i<=t} K_i^T K_i``.

    ``P`` projects onto the eigenvectors of ``K0^T K0`` that ``threshold_rule`` keeps:
    ``"relative"`` (default) those whose eigenvalue is at most ``threshold`` times the largest
    (all of them when there is no anchor); ``"absolute"`` (AlphaEdit's released rule) those whose
    eigenvalue divided by ``scale`` is below ``threshold`` (``K0^T K0 = scale E[k k^T]``: the cut is
    on the per-token second moment). The anchor keys' outputs are preserved exactly on the
    complement. ``Delta`` lies in the range of ``P``.
    """

    def __init__(self, problem: Problem, *, threshold: float = 1e-2, ridge: float = 1.0,
                 threshold_rule: str = "relative", scale: float = 1.0):
        super().__init__(problem)
        if not threshold >= 0 or not ridge > 0 or not scale > 0:
            raise HyperparameterError("threshold must be >= 0, ridge > 0 and scale > 0")
        if threshold_rule not in ("relative", "absolute"):
            raise HyperparameterError(f"threshold_rule must be 'relative' or 'absolute'; got {threshold_rule!r}")
        evals, evecs = np.linalg.eigh(problem.gram0)
        if threshold_rule == "relative":
            keep = evals <= threshold * max(evals.max(), 0.0)
        else:
            keep = evals / scale < threshold
        Q = evecs[:, keep]  # (d_k, m) orthonormal basis of the kept space
        self.projector_ = Q @ Q.T
        self.ridge = ridge
        self._X = np.zeros((problem.d_k, problem.d_k))

    def _delta(self, K, r):
        self._X = self._X + K.T @ K
        P = self.projector_
        M = P @ self._X + self.ridge * np.eye(self.problem.d_k)
        return scipy.linalg.solve(M, P @ (K.T @ r))


class DenseCumulative(_Editor):
    """MEMIT-seq-like: ``Delta = G_t^{-1} K^T r`` with ``G_t`` kept and factorised every batch."""

    def __init__(self, problem: Problem):
        super().__init__(problem)
        self._G = problem.metric.copy()

    def _delta(self, K, r):
        self._G = self._G + K.T @ K
        return scipy.linalg.cho_solve(scipy.linalg.cho_factor(self._G, lower=True), K.T @ r)


def run_stream(editor, edits: Iterable, weights: Sequence[ArrayLike | None] | None = None) -> list[np.ndarray]:
    """Feed ``edits`` (pairs ``(K_i, V_i)``) to ``editor``; return ``W`` after each batch.

    ``weights``: one entry per batch (``None``, a positive scalar or ``(u_i,)`` array), passed to
    ``editor.update``; ``None`` feeds the batches unweighted.
    """
    if weights is None:
        return [editor.update(K, V).copy() for K, V in edits]
    edits = list(edits)
    try:
        weights = list(weights)
    except TypeError as exc:
        raise ShapeError("weights must be a sequence with one entry per batch") from exc
    if len(weights) != len(edits):
        raise ShapeError(f"weights has {len(weights)} entries but there are {len(edits)} batches; one per batch")
    return [editor.update(K, V, w).copy() for (K, V), w in zip(edits, weights, strict=True)]
