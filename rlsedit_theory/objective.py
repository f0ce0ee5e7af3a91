"""The cumulative objective, its gradient, and the exact minimiser by the normal equations.

    J_t(W) = sum_{i<=t} ||Omega_i^{1/2} (K_i W - V_i)||_F^2 + alpha ||W - W0||_F^2 + beta ||K0 W - V0||_F^2

Gradient ``2 (G_t W - B_t)`` with ``G_t = A + sum K_i^T Omega_i K_i`` and
``B_t = alpha W0 + beta K0^T V0 + sum K_i^T Omega_i V_i``; the unique minimiser is ``G_t^{-1} B_t``.

``Omega_i = diag(omega_i)`` are optional per-row (per-fact) weights: every function takes
``weights``, a sequence with one entry per batch, each ``None`` (weight 1 on every row), a positive
scalar, or a positive array ``(u_i,)``; ``weights=None`` is the unweighted objective. Weights are
applied by row scaling (``K_i -> Omega_i^{1/2} K_i``, ``V_i -> Omega_i^{1/2} V_i``,
:func:`weighted_edits`), which leaves every formula above unweighted in the scaled rows.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple

import numpy as np
import scipy.linalg
from numpy.typing import ArrayLike

from .errors import NotPositiveDefiniteError, ShapeError
from .problem import Problem, as_matrix

__all__ = [
    "ObjectiveTerms",
    "objective",
    "objective_terms",
    "gradient",
    "information_matrix",
    "normal_rhs",
    "closed_form",
    "stack_edits",
    "weighted_edits",
]


class ObjectiveTerms(NamedTuple):
    """The three terms of ``J_t(W)``."""

    fit: float  # sum_i ||Omega_i^{1/2} (K_i W - V_i)||^2
    proximity: float  # alpha ||W - W0||^2
    anchor: float  # beta ||K0 W - V0||^2

    @property
    def total(self) -> float:
        return self.fit + self.proximity + self.anchor


def weighted_edits(problem: Problem, edits: Iterable,
                   weights: Sequence[ArrayLike | None] | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Validate the batches and their row weights; return the row-scaled batches.

    Batch ``i`` becomes ``(Omega_i^{1/2} K_i, Omega_i^{1/2} V_i)``, so that
    ``||Omega_i^{1/2}(K_i W - V_i)||^2`` is the plain misfit of the scaled batch. ``weights`` is
    ``None`` (no weights: the validated batches themselves) or a sequence with one entry per
    batch, each ``None``, a positive scalar or a positive ``(u_i,)`` array
    (:func:`~rlsedit_theory.problem.check_row_weights`).

    Raises
    ------
    ShapeError
        ``weights`` does not have one entry per batch, or an entry not one weight per row.
    NonFiniteError, HyperparameterError
        A weight is not finite, or not ``> 0``.
    """
    edits = list(edits)
    if weights is None:
        return [problem.check_batch(K, V) for K, V in edits]
    try:
        weights = list(weights)
    except TypeError as exc:  # a bare scalar: ambiguous between batches, so refused
        raise ShapeError(
            f"weights must be a sequence with one entry per batch; got {type(weights).__name__}"
        ) from exc
    if len(weights) != len(edits):
        raise ShapeError(f"weights has {len(weights)} entries but there are {len(edits)} batches; one per batch")
    return [problem.weighted_batch(K, V, w) for (K, V), w in zip(edits, weights, strict=True)]


def _batches(problem: Problem, edits, weights=None) -> list[tuple[np.ndarray, np.ndarray]]:
    return weighted_edits(problem, edits, weights)


def stack_edits(problem: Problem, edits: Iterable, *,
                weights: Sequence[ArrayLike | None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Stack all batches: ``K_{1:t} (n_t, d_k)``, ``V_{1:t} (n_t, d_v)`` (``n_t`` may be 0).

    With ``weights`` the stacked rows are the row-scaled ones, ``Omega^{1/2} K_{1:t}`` and
    ``Omega^{1/2} V_{1:t}`` (see :func:`weighted_edits`).
    """
    batches = _batches(problem, edits, weights)
    if not batches:
        return np.zeros((0, problem.d_k)), np.zeros((0, problem.d_v))
    return np.vstack([K for K, _ in batches]), np.vstack([V for _, V in batches])


def objective_terms(problem: Problem, edits: Iterable, W: np.ndarray, *,
                    weights: Sequence[ArrayLike | None] | None = None) -> ObjectiveTerms:
    """Evaluate the three terms of ``J_t`` at ``W (d_k, d_v)`` (``weights``: per-row weights of
    each batch, see :func:`weighted_edits`)."""
    W = as_matrix(W, "W", shape=(problem.d_k, problem.d_v))
    K, V = stack_edits(problem, edits, weights=weights)
    fit = float(np.sum((K @ W - V) ** 2))
    proximity = problem.alpha * float(np.sum((W - problem.W0) ** 2))
    if problem.K0 is not None:
        anchor_sq = float(np.sum((problem.K0 @ W - problem.V0) ** 2))
    else:  # ||K0 W - V0||^2 = tr(W^T G0 W) - 2 tr(W^T K0^T V0) + ||V0||^2
        anchor_sq = float(
            np.sum(W * (problem.gram0 @ W)) - 2 * np.sum(W * problem.cross0) + problem.v0_sq
        )
        anchor_sq = max(anchor_sq, 0.0)
    return ObjectiveTerms(fit, proximity, problem.beta * anchor_sq)


def objective(problem: Problem, edits: Iterable, W: np.ndarray, *,
              weights: Sequence[ArrayLike | None] | None = None) -> float:
    """``J_t(W)``: see :func:`objective_terms` for its parts."""
    return objective_terms(problem, edits, W, weights=weights).total


def information_matrix(problem: Problem, edits: Iterable, *,
                       weights: Sequence[ArrayLike | None] | None = None) -> np.ndarray:
    """``G_t = A + sum_i K_i^T Omega_i K_i`` (d_k, d_k)."""
    K, _ = stack_edits(problem, edits, weights=weights)
    return problem.metric + K.T @ K


def normal_rhs(problem: Problem, edits: Iterable, *,
               weights: Sequence[ArrayLike | None] | None = None) -> np.ndarray:
    """``B_t = alpha W0 + beta K0^T V0 + sum_i K_i^T Omega_i V_i`` (d_k, d_v)."""
    K, V = stack_edits(problem, edits, weights=weights)
    return problem.rhs0 + K.T @ V


def gradient(problem: Problem, edits: Iterable, W: np.ndarray, *,
             weights: Sequence[ArrayLike | None] | None = None) -> np.ndarray:
    """``grad J_t(W) = 2 (G_t W - B_t)`` (d_k, d_v)."""
    edits = _batches(problem, edits, weights)
    W = as_matrix(W, "W", shape=(problem.d_k, problem.d_v))
    return 2 * (information_matrix(problem, edits) @ W - normal_rhs(problem, edits))


def closed_form(problem: Problem, edits: Iterable, *,
                weights: Sequence[ArrayLike | None] | None = None) -> np.ndarray:
    """The exact minimiser ``W*_t = G_t^{-1} B_t`` by a Cholesky solve (no explicit inverse).

    With ``weights``, ``G_t = A + sum K_i^T Omega_i K_i`` and ``B_t = B_0 + sum K_i^T Omega_i V_i``.
    Cost ``O(n_t d_k^2 + d_k^3 + d_k^2 d_v)``.
    """
    edits = _batches(problem, edits, weights)
    G = information_matrix(problem, edits)
    try:
        factor = scipy.linalg.cho_factor(G, lower=True)
    except np.linalg.LinAlgError as exc:  # only reachable if A is numerically singular
        raise NotPositiveDefiniteError("G_t is not positive definite") from exc
    return scipy.linalg.cho_solve(factor, normal_rhs(problem, edits))
