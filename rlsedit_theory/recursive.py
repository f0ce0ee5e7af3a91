"""The Woodbury recursion: the exact minimiser of ``J_t`` updated in ``O(d_k^2 u)`` per batch.

This module is the single home of the recursion. :func:`woodbury_update` and
:func:`woodbury_downdate` are pure functions on ``(C, W)``; :class:`RecursiveLS` keeps that state
for a stream. With ``C_{t-1} = G_{t-1}^{-1}`` and ``W_{t-1}`` the minimiser of ``J_{t-1}``:

    r = V - K W_{t-1}          innovation            (u, d_v)
    F = C_{t-1} K^T                                  (d_k, u)
    S = I + K F                SPD, Cholesky-solved  (u, u)
    L = F S^{-1} = C_t K^T     gain                  (d_k, u)
    C_t = C_{t-1} - L F^T      Woodbury              (d_k, d_k)
    W_t = W_{t-1} + L r                              (d_k, d_v)

The downdate removes a batch that was added before: the same with ``S = I - K F`` and the signs
flipped.

Per-row weights ``omega (u,)`` (``Omega = diag(omega)``, positive) enter by row scaling: the step
runs on ``(Omega^{1/2} K, Omega^{1/2} V)``, which is the Woodbury step for
``G_t = G_{t-1} + K^T Omega K`` and ``B_t = B_{t-1} + K^T Omega V`` (proofs/weights.md). So
``S = I + Omega^{1/2} K C K^T Omega^{1/2}``, the innovation is ``Omega^{1/2} r`` and the gain is
``C_t K^T Omega^{1/2}``; ``W_t = W_{t-1} + gain @ innovation`` as before. A weighted batch is
removed by a downdate with the same weights.

Memory traffic. For large ``d_k`` a step is bound by reading and writing the ``d_k x d_k`` matrix
``C``, so the ``C`` update is written as ``C -/+ G G^T`` with ``G = F R^{-T}`` (``S = R R^T``),
applied by one BLAS ``dgemm`` to a fresh copy of ``C``: no other ``d_k^2`` temporaries and no
transposed (strided) reads. The result is exactly symmetric when ``C`` is: for ``u = 1`` the two
entries ``(i, j)`` and ``(j, i)`` are the same rounded product; for ``u > 1`` the BLAS may round
them differently, so the upper triangle is copied onto the lower one (cache-blocked).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import scipy.linalg
import scipy.linalg.blas
from numpy.typing import ArrayLike

from .errors import NotPositiveDefiniteError, ShapeError
from .problem import Problem, check_row_weights, scale_rows

__all__ = ["StepInfo", "woodbury_update", "woodbury_downdate", "RecursiveLS"]


class StepInfo(NamedTuple):
    """What one step used, for the bounds of T2/T4/T5.

    For a weighted batch all three are in the row-scaled coordinates (``K -> Omega^{1/2} K``):
    innovation ``Omega^{1/2} r``, gain ``C_t K^T Omega^{1/2}``,
    ``S = I +/- Omega^{1/2} K C_{t-1} K^T Omega^{1/2}``.
    """

    innovation: np.ndarray  # r (u, d_v)
    gain: np.ndarray  # L = C_t K^T (d_k, u)
    S: np.ndarray  # I +/- K C_{t-1} K^T (u, u)


def _cholesky(S: np.ndarray, what: str) -> np.ndarray:
    """Lower Cholesky factor ``R`` of the small ``(u, u)`` matrix ``S = R R^T``."""
    try:
        return scipy.linalg.cholesky((S + S.T) / 2, lower=True)
    except np.linalg.LinAlgError as exc:
        raise NotPositiveDefiniteError(what) from exc


def _copy_upper_to_lower(C: np.ndarray, block: int = 128) -> None:
    """Make the square C-contiguous ``C`` exactly symmetric in place from its upper triangle.

    Works on ``block``-wide panels so that the transposed reads stay in cache.
    """
    n = C.shape[0]
    for j in range(0, n, block):
        e = min(j + block, n)
        C[e:, j:e] = C[j:e, e:].T  # below the diagonal block <- right of it, transposed
        D = C[j:e, j:e]
        D[...] = np.triu(D) + np.triu(D, 1).T


def _symmetric_rank_update(C: np.ndarray, G: np.ndarray, sign: float) -> np.ndarray:
    """A new array ``C + sign * G G^T``; ``C (d_k, d_k)`` symmetric, ``G (d_k, u)``.

    ``dgemm`` updates the Fortran-ordered view ``out.T`` of a C-ordered copy in place; as ``C`` is
    symmetric that is the same matrix. Exactly symmetric output (see the module docstring).
    """
    out = np.array(C, dtype=np.float64, order="C")  # the one copy: read + write d_k^2
    res = scipy.linalg.blas.dgemm(sign, G, G, beta=1.0, c=out.T, trans_b=True, overwrite_c=True)
    if not np.shares_memory(res, out):  # the wrapper had to copy: take its result
        out = np.ascontiguousarray(res.T)
    if G.shape[1] > 1:
        _copy_upper_to_lower(out)
    return out


def _step(C: np.ndarray, W: np.ndarray, K: np.ndarray, V: np.ndarray, sign: float, what: str):
    """Shared body of the update (``sign = -1``) and the downdate (``sign = +1``)."""
    r = V - K @ W  # (u, d_v)
    F = C @ K.T  # (d_k, u)       the one read of C besides the update
    S = np.eye(K.shape[0]) - sign * (K @ F)  # (u, u)   I + K F  or  I - K F
    R = _cholesky(S, what)  # S = R R^T, R lower
    L = scipy.linalg.cho_solve((R, True), F.T).T  # F S^{-1}  (d_k, u): the gain
    G = L @ R  # F R^{-T}, so G G^T = F S^{-1} F^T  (d_k, u)
    C_new = _symmetric_rank_update(C, G, sign)  # C -/+ F S^{-1} F^T
    return C_new, W - sign * (L @ r), StepInfo(r, L, S)


def _scaled(K: np.ndarray, V: np.ndarray, weights: ArrayLike | None) -> tuple[np.ndarray, np.ndarray]:
    """The batch row-scaled by validated weights (``None``: the batch itself)."""
    if weights is None:
        return K, V
    return scale_rows(K, V, check_row_weights(weights, np.shape(K)[0]))


def woodbury_update(C: np.ndarray, W: np.ndarray, K: np.ndarray, V: np.ndarray,
                    weights: ArrayLike | None = None):
    """Add the batch ``(K, V)``: return ``(C_t, W_t, StepInfo)``.

    ``C (d_k, d_k)`` symmetric positive definite, ``W (d_k, d_v)``, ``K (u, d_k)``,
    ``V (u, d_v)``, ``weights (u,)`` positive per-row weights or ``None`` (all 1): the step adds
    ``K^T Omega K`` to the information and ``K^T Omega V`` to the right-hand side. Inputs are not
    modified; ``C_t`` is a new, exactly symmetric array (when ``C`` is symmetric). Cost
    ``4 d_k^2 u + O(d_k u^2 + u^3 + d_k d_v u)`` flops and about five passes over a ``d_k^2``
    array (one read for ``F``, a copy, and the in-place rank-``u`` update).

    Raises :class:`ShapeError`, :class:`NonFiniteError` or :class:`HyperparameterError` for bad
    weights (see :func:`~rlsedit_theory.problem.check_row_weights`) before anything is computed.
    """
    K, V = _scaled(K, V, weights)
    return _step(C, W, K, V, -1.0, "I + K C K^T is not SPD: is C corrupted?")


def woodbury_downdate(C: np.ndarray, W: np.ndarray, K: np.ndarray, V: np.ndarray,
                      weights: ArrayLike | None = None):
    """Remove a batch ``(K, V)`` added earlier: return ``(C_prev, W_prev, StepInfo)``.

    Exact inverse of :func:`woodbury_update` on the information ``G`` and right-hand side ``B``
    whatever happened in between; a batch added with ``weights`` is removed with the same
    ``weights`` (smaller ones remove part of its weight: the state is then the one where the
    batch carries the difference). Raises :class:`NotPositiveDefiniteError` when
    ``I - K C K^T`` is not positive definite, i.e. the batch cannot have been part of the data.
    """
    K, V = _scaled(K, V, weights)
    msg = "I - K C K^T is not positive definite: this batch was never added to the state"
    return _step(C, W, K, V, 1.0, msg)


class RecursiveLS:
    """Streaming exact minimiser of the cumulative RLSEdit objective.

    Parameters
    ----------
    problem : Problem
        Pre-trained weights, regularisation weights and anchor.
    track_information : bool, default True
        Also carry ``G_t = A + sum K_i^T K_i`` (``d_k^2`` more memory) to measure the drift
        ``||C_t G_t - I||``.

    Attributes
    ----------
    W_ : ndarray (d_k, d_v)
        Current minimiser ``W*_t``.
    C_ : ndarray (d_k, d_k)
        ``G_t^{-1}``, symmetric positive definite.
    G_ : ndarray (d_k, d_k) or None
        ``G_t`` if tracked.
    n_updates_ : int
        Batches added minus batches removed.
    n_rows_ : int
        Rows (keys) currently in the data.
    last_step_ : StepInfo or None
        Innovation, gain and ``S`` of the latest update.
    """

    def __init__(self, problem: Problem, *, track_information: bool = True):
        if not isinstance(problem, Problem):
            raise TypeError(f"problem must be a Problem; got {type(problem).__name__}")
        self.problem = problem
        self.track_information = track_information
        self.reset()

    def reset(self) -> RecursiveLS:
        """Back to ``t = 0``: ``C_0 = A^{-1}``, ``W*_0 = A^{-1} B_0``."""
        p = self.problem
        # The recursion's state is G^{-1} itself; build it by a Cholesky solve of A.
        C = p.solve_metric(np.eye(p.d_k))
        self.C_ = (C + C.T) / 2
        self.W_ = p.W_star0
        self.G_ = p.metric.copy() if self.track_information else None
        self.n_updates_ = 0
        self.n_rows_ = 0
        self.last_step_ = None
        return self

    def update(self, K: np.ndarray, V: np.ndarray, weights: ArrayLike | None = None) -> np.ndarray:
        """Add the batch ``K (u, d_k)``, ``V (u, d_v)``; return the new ``W_``.

        ``weights (u,)``: positive per-row (per-fact) weights, ``None`` for all 1; the batch's term
        in the objective becomes ``||Omega^{1/2}(K W - V)||_F^2``. Bad weights raise a typed error
        (:func:`~rlsedit_theory.problem.check_row_weights`) and leave the state unchanged.
        """
        K, V = self.problem.weighted_batch(K, V, weights)
        self.C_, self.W_, self.last_step_ = woodbury_update(self.C_, self.W_, K, V)
        if self.G_ is not None:
            self.G_ = self.G_ + K.T @ K
        self.n_updates_ += 1
        self.n_rows_ += K.shape[0]
        return self.W_

    def partial_fit(self, K: np.ndarray, V: np.ndarray, weights: ArrayLike | None = None) -> RecursiveLS:
        """scikit-learn style alias of :meth:`update` that returns ``self``."""
        self.update(K, V, weights)
        return self

    def downdate(self, K: np.ndarray, V: np.ndarray, weights: ArrayLike | None = None) -> np.ndarray:
        """Remove a batch added earlier (exactly); return the new ``W_``.

        A batch added with ``weights`` is removed by passing the same ``weights``. The state is
        unchanged if this raises.
        """
        K, V = self.problem.weighted_batch(K, V, weights)
        if K.shape[0] > self.n_rows_:
            raise ShapeError(f"cannot remove {K.shape[0]} rows: the state holds {self.n_rows_}")
        self.C_, self.W_, _ = woodbury_downdate(self.C_, self.W_, K, V)
        if self.G_ is not None:
            self.G_ = self.G_ - K.T @ K
        self.n_updates_ -= 1
        self.n_rows_ -= K.shape[0]
        self.last_step_ = None
        return self.W_

    def drift(self) -> float:
        """``||C_t G_t - I||_F``: how far the carried inverse is from the carried information."""
        if self.G_ is None:
            raise RuntimeError("construct with track_information=True to measure drift")
        return float(np.linalg.norm(self.C_ @ self.G_ - np.eye(self.problem.d_k)))

    def copy(self) -> RecursiveLS:
        """Deep copy of the state (the problem is shared: it is never modified)."""
        new = object.__new__(RecursiveLS)
        new.__dict__.update(self.__dict__)
        for name in ("C_", "W_", "G_"):
            value = getattr(self, name)
            setattr(new, name, None if value is None else value.copy())
        return new

    def allclose(self, other: RecursiveLS, *, rtol: float = 1e-9, atol: float = 0.0) -> bool:
        """Whether two states hold the same ``W_`` and ``C_`` to tolerance (relative to norms)."""
        def close(a, b):
            return np.linalg.norm(a - b) <= atol + rtol * max(np.linalg.norm(a), np.linalg.norm(b))

        return (
            self.W_.shape == other.W_.shape
            and close(self.W_, other.W_)
            and close(self.C_, other.C_)
        )

    def __repr__(self) -> str:
        return f"RecursiveLS({self.problem!r}, n_updates_={self.n_updates_}, n_rows_={self.n_rows_})"
