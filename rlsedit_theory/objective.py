"""The cumulative objective, its gradient, and the exact minimiser by the normal equations.

    J_t(W) = sum_{i<=t} ||K_i W - V_i||_F^2 + alpha ||W - W0||_F^2 + beta ||K0 W - V0||_F^2

Gradient ``2 (G_t W - B_t)`` with ``G_t = A + sum K_i^T K_i`` and
``B_t = alpha W0 + beta K0^T V0 + sum K_i^T V_i``; the unique minimiser is ``G_t^{-1} B_t``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

import numpy as np
import scipy.linalg

from .errors import NotPositiveDefiniteError
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
]


class ObjectiveTerms(NamedTuple):
    """The three terms of ``J_t(W)``."""

    fit: float  # sum_i ||K_i W - V_i||^2
    proximity: float  # alpha ||W - W0||^2
    anchor: float  # beta ||K0 W - V0||^2

    @property
    def total(self) -> float:
        return self.fit + self.proximity + self.anchor


def _batches(problem: Problem, edits) -> list[tuple[np.ndarray, np.ndarray]]:
    return [problem.check_batch(K, V) for K, V in edits]


def stack_edits(problem: Problem, edits: Iterable) -> tuple[np.ndarray, np.ndarray]:
    """Stack all batches: ``K_{1:t} (n_t, d_k)``, ``V_{1:t} (n_t, d_v)`` (``n_t`` may be 0)."""
    batches = _batches(problem, edits)
    if not batches:
        return np.zeros((0, problem.d_k)), np.zeros((0, problem.d_v))
    return np.vstack([K for K, _ in batches]), np.vstack([V for _, V in batches])


def objective_terms(problem: Problem, edits: Iterable, W: np.ndarray) -> ObjectiveTerms:
    """Evaluate the three terms of ``J_t`` at ``W (d_k, d_v)``."""
    W = as_matrix(W, "W", shape=(problem.d_k, problem.d_v))
    K, V = stack_edits(problem, edits)
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


def objective(problem: Problem, edits: Iterable, W: np.ndarray) -> float:
    """``J_t(W)``: see :func:`objective_terms` for its parts."""
    return objective_terms(problem, edits, W).total


def information_matrix(problem: Problem, edits: Iterable) -> np.ndarray:
    """``G_t = A + sum_i K_i^T K_i`` (d_k, d_k)."""
    K, _ = stack_edits(problem, edits)
    return problem.metric + K.T @ K


def normal_rhs(problem: Problem, edits: Iterable) -> np.ndarray:
    """``B_t = alpha W0 + beta K0^T V0 + sum_i K_i^T V_i`` (d_k, d_v)."""
    K, V = stack_edits(problem, edits)
    return problem.rhs0 + K.T @ V


def gradient(problem: Problem, edits: Iterable, W: np.ndarray) -> np.ndarray:
    """``grad J_t(W) = 2 (G_t W - B_t)`` (d_k, d_v)."""
    edits = list(edits)
    W = as_matrix(W, "W", shape=(problem.d_k, problem.d_v))
    return 2 * (information_matrix(problem, edits) @ W - normal_rhs(problem, edits))


def closed_form(problem: Problem, edits: Iterable) -> np.ndarray:
    """The exact minimiser ``W*_t = G_t^{-1} B_t`` by a Cholesky solve (no explicit inverse).

    Cost ``O(n_t d_k^2 + d_k^3 + d_k^2 d_v)``.
    """
    edits = list(edits)
    G = information_matrix(problem, edits)
    try:
        factor = scipy.linalg.cho_factor(G, lower=True)
    except np.linalg.LinAlgError as exc:  # only reachable if A is numerically singular
        raise NotPositiveDefiniteError("G_t is not positive definite") from exc
    return scipy.linalg.cho_solve(factor, normal_rhs(problem, edits))
