"""The inequalities and exact identities of the RLSEdit analysis (theory T2-T5), as pure functions.

Every inequality is returned as a :class:`Bound` holding its two sides, ``lhs <= rhs``, so that a
test, a benchmark or an LLM-layer certificate can print both numbers next to each other and check
``bound.holds(slack)``. Every exact identity is returned as an :class:`Identity` holding both
sides (scalars or arrays).

Conventions (row keys, as everywhere in :mod:`rlsedit_theory`):

- ``W (d_k, d_v)``; an edit batch is ``K (u, d_k)``, ``V (u, d_v)`` and asks for ``K W ~ V``.
- ``edits`` is a sequence of batches ``(K_i, V_i)``, ``i = 1..t``; the stacked data are
  ``K (n_t, d_k)`` and ``V (n_t, d_v)``. The global bounds (T3, T5b-d) depend on the stream only
  through the stacked data, so a single stacked batch ``[(K, V)]`` may be passed instead.
- ``A = alpha I + beta K0^T K0`` is the preservation metric, ``W*_0 = A^{-1}(alpha W0 +
  beta K0^T V0)`` the preservation state, ``||X||_M^2 = tr(X^T M X)``.
- ``R0 = V - K W*_0 (n_t, d_v)`` is the initial edit demand and ``Delta = W_t - W*_0``.
- ``G_t = A + sum_{i<=t} K_i^T K_i`` and ``C_t = G_t^{-1}`` (the recursion's state).

Per-fact weights. Every function takes optional row weights: ``weights`` (one entry per batch of
``edits``, each ``None``, a positive scalar or a positive ``(u_i,)`` array) for the global bounds,
``weights (u,)`` for the batch of a step (and ``weights_j`` / ``batch_weights`` for a second batch).
The objective is then ``sum ||Omega_i^{1/2}(K_i W - V_i)||^2 + ...`` and, by the row-scaling lemma
(proofs/weights.md), every statement above holds verbatim for the row-scaled data
``K_i -> Omega_i^{1/2} K_i``, ``V_i -> Omega_i^{1/2} V_i``: so the functions compute their two sides
in those coordinates (``R0 -> Omega^{1/2} R0``, ``r_t -> Omega_t^{1/2} r_t``, ``S_t = I +
Omega_t^{1/2} K_t C_{t-1} K_t^T Omega_t^{1/2}``, ``G_t = A + sum K_i^T Omega_i K_i``). The
statements in the original coordinates, what a weight buys for its own fact and what it costs the
others, are the functions of the section "Weighted edits" (``t2_weighted_residual_identity``,
``fact_residual_share``, ``t2_fact_identity``, ``fact_displacement_identity``,
``t3_fact_cost_bounds``, ``t4_saturation_bounds``, ``t5_protection_bounds``,
``t5_fact_interference_bound``, ``t5_fact_retention_bound``). A fact is named by ``batch``
(1-based, as ``j`` in T5) and ``row`` (0-based row of that batch).

Preconditions: the bounds are theorems about the *exact* minimiser ``W*_t`` of ``J_t`` (and the
exact recursion state). The functions accept any ``W`` so that they can certify a computed
solution: a violation beyond round-off means the weights are not the minimiser of the stated
problem. All computations are float64; no explicit inverse is formed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import scipy.linalg
from numpy.typing import ArrayLike

from .errors import HyperparameterError, NotPositiveDefiniteError, ShapeError
from .objective import closed_form, information_matrix, normal_rhs, stack_edits, weighted_edits
from .problem import Problem, as_matrix, check_batch, check_row_weights, scale_rows

__all__ = [
    "Bound",
    "Identity",
    "initial_demand",
    # T2
    "t2_residual_identity",
    "t2_adherence_bound",
    "t2_shrink_factor",
    # T3
    "t3_energy_identity",
    "t3_metric_bound",
    "t3a_deviation_bound",
    "t3b_anchor_bound",
    "t3c_w0_bound",
    "t3c_anchor_misfit_bound",
    "t3d_sqrt_t_bound",
    "t3d_crude_bounds",
    # T4
    "t4_energy_identity",
    "t4a_metric_bound",
    "t4b_step_bound",
    "t4c_crude_step_bound",
    "information_floor_bound",
    "c4_plasticity_bound",
    # T5
    "t5a_interference_identity",
    "t5a_interference_bounds",
    "t5b_drift_bound",
    "t5c_retention_bound",
    "t5d_regret_bound",
    # weighted edits: statements in the original coordinates
    "t2_weighted_residual_identity",
    "fact_residual_share",
    "t2_fact_identity",
    "fact_displacement_identity",
    "t3_fact_cost_bounds",
    "t4_saturation_bounds",
    "t5_protection_bounds",
    "t5_fact_interference_bound",
    "t5_fact_retention_bound",
    # certificates
    "deviation_certificate",
    "step_certificate",
]


# ----------------------------------------------------------------------------------------------
# Result types


class Bound(NamedTuple):
    """The two sides of an inequality ``lhs <= rhs`` named ``name``."""

    lhs: float
    rhs: float
    name: str

    @property
    def gap(self) -> float:
        """``rhs - lhs`` (non-negative when the bound holds)."""
        return self.rhs - self.lhs

    @property
    def ratio(self) -> float:
        """``lhs / rhs`` in ``[0, 1]`` when the bound holds (``0`` when both sides are ``0``)."""
        if self.rhs == 0:
            return 0.0 if self.lhs == 0 else math.inf
        return self.lhs / self.rhs

    def holds(self, slack: float = 0.0, rtol: float = 0.0) -> bool:
        """Whether ``lhs <= rhs + slack + rtol * |rhs|`` (``slack``, ``rtol`` absorb round-off)."""
        return bool(self.lhs <= self.rhs + slack + rtol * abs(self.rhs))


class Identity(NamedTuple):
    """The two sides of an exact identity ``lhs == rhs`` (scalars or arrays of one shape)."""

    lhs: np.ndarray | float
    rhs: np.ndarray | float
    name: str

    @property
    def error(self) -> float:
        """``||lhs - rhs||_F``."""
        return float(np.linalg.norm(np.asarray(self.lhs) - np.asarray(self.rhs)))

    @property
    def scale(self) -> float:
        """``max(||lhs||_F, ||rhs||_F)``, the size the error is relative to."""
        return float(
            max(np.linalg.norm(np.asarray(self.lhs)), np.linalg.norm(np.asarray(self.rhs)))
        )

    @property
    def relative_error(self) -> float:
        """``error / scale`` (``0`` when both sides vanish)."""
        return 0.0 if self.scale == 0 else self.error / self.scale

    def holds(self, rtol: float, atol: float = 0.0) -> bool:
        """Whether ``error <= atol + rtol * scale``."""
        return bool(self.error <= atol + rtol * self.scale)


# ----------------------------------------------------------------------------------------------
# Small helpers (validation and norms)


def _check_problem(problem) -> Problem:
    if not isinstance(problem, Problem):
        raise TypeError(f"problem must be a rlsedit_theory.Problem; got {type(problem).__name__}")
    return problem


def _weights(problem: Problem, W, name: str) -> np.ndarray:
    return as_matrix(W, name, shape=(problem.d_k, problem.d_v))


def _fro(X) -> float:
    return float(np.linalg.norm(X))


def _spectral(X) -> float:
    return float(np.linalg.norm(X, 2)) if np.size(X) else 0.0


def _lambda_min(M: np.ndarray) -> float:
    """Smallest eigenvalue of a symmetric matrix, clipped at 0 (it is PSD by construction)."""
    return max(float(np.linalg.eigvalsh(M)[0]), 0.0)


def _sqrt_ratio(numerator: float, denominator: float) -> float:
    """``numerator / sqrt(denominator)`` with ``+inf`` for a vanishing denominator."""
    return numerator / math.sqrt(denominator) if denominator > 0 else math.inf


def _metric_sq(problem: Problem, X: np.ndarray) -> float:
    """``||X||_A^2 = alpha ||X||_F^2 + beta ||K0 X||_F^2`` (d_k, d_v) -> float."""
    return problem.alpha * _fro(X) ** 2 + problem.beta * _anchor_sq(problem, X)


def _anchor_sq(problem: Problem, X: np.ndarray) -> float:
    """``||K0 X||_F^2 = tr(X^T K0^T K0 X)``, computed from ``K0`` itself when it is explicit."""
    if problem.K0 is not None:
        return _fro(problem.K0 @ X) ** 2
    return max(float(np.sum(X * (problem.gram0 @ X))), 0.0)


def _anchor_misfit(problem: Problem, W: np.ndarray) -> float:
    """``||K0 W - V0||_F`` (with a Gram-only anchor ``V0 = K0 W0``, so it is ``||K0(W - W0)||``)."""
    if problem.K0 is not None:
        return _fro(problem.K0 @ W - problem.V0)
    return math.sqrt(_anchor_sq(problem, W - problem.W0))


def _check_step(K, V, W_prev, W_new, C_prev, weights=None):
    """Validate one recursion step: ``W_prev, W_new (d_k, d_v)``, ``C_prev (d_k, d_k)``.

    With ``weights (u,)`` the batch is returned row-scaled, ``(Omega^{1/2} K, Omega^{1/2} V)``.
    """
    W_prev = as_matrix(W_prev, "W_prev")
    d_k, d_v = W_prev.shape
    W_new = as_matrix(W_new, "W_new", shape=(d_k, d_v))
    C_prev = as_matrix(C_prev, "C_prev", shape=(d_k, d_k))
    K, V = check_batch(K, V, d_k, d_v)
    if weights is not None:
        K, V = scale_rows(K, V, check_row_weights(weights, K.shape[0]))
    return K, V, W_prev, W_new, (C_prev + C_prev.T) / 2


def _scaled_keys(K, d_k: int, weights, name: str = "K") -> np.ndarray:
    """Validate keys ``K (u, d_k)`` (a 1-D ``K`` is one row) and scale its rows by ``sqrt(weights)``."""
    K = np.atleast_2d(np.asarray(K, dtype=np.float64)) if np.ndim(K) == 1 else K
    K = as_matrix(K, name, shape=(None, d_k))
    if weights is None:
        return K
    return scale_rows(K, np.zeros((K.shape[0], 0)), check_row_weights(weights, K.shape[0], f"weights of {name}"))[0]


def _gain_terms(K: np.ndarray, C_prev: np.ndarray):
    """``F = C K^T (d_k, u)``, ``S = I + K F (u, u)`` and its Cholesky factor."""
    F = C_prev @ K.T
    S = np.eye(K.shape[0]) + K @ F
    S = (S + S.T) / 2
    try:
        factor = scipy.linalg.cho_factor(S, lower=True)
    except np.linalg.LinAlgError as exc:
        raise NotPositiveDefiniteError("I + K C_prev K^T is not SPD: C_prev must be SPD") from exc
    return F, S, factor


def _prior_norm_sq(Delta: np.ndarray, C_prev: np.ndarray, G_prev) -> float:
    """``||Delta||_{G_prev}^2`` with ``G_prev = C_prev^{-1}`` (a solve, or ``G_prev`` if given)."""
    if G_prev is not None:
        return max(float(np.sum(Delta * (G_prev @ Delta))), 0.0)
    try:
        factor = scipy.linalg.cho_factor(C_prev, lower=True)
    except np.linalg.LinAlgError as exc:
        raise NotPositiveDefiniteError("C_prev must be symmetric positive definite") from exc
    return max(float(np.sum(Delta * scipy.linalg.cho_solve(factor, Delta))), 0.0)


def _prior_lambda_min(C_prev: np.ndarray, G_prev) -> float:
    """``lambda_min(G_prev) = 1 / lambda_max(C_prev)``."""
    if G_prev is not None:
        return _lambda_min(G_prev)
    top = float(np.linalg.eigvalsh(C_prev)[-1])
    if top <= 0:
        raise NotPositiveDefiniteError("C_prev must be symmetric positive definite")
    return 1.0 / top


def _check_G_prev(G_prev, d_k: int):
    if G_prev is None:
        return None
    G_prev = as_matrix(G_prev, "G_prev", shape=(d_k, d_k))
    return (G_prev + G_prev.T) / 2


def initial_demand(problem: Problem, edits: Sequence, *,
                   weights: Sequence[ArrayLike | None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Stacked keys and the initial edit demand ``R0 = V - K W*_0``.

    Parameters
    ----------
    problem : Problem
    edits : sequence of (K_i (u_i, d_k), V_i (u_i, d_v))
    weights : one entry per batch, optional
        Row weights; then ``K`` and ``R0`` are the row-scaled ``Omega^{1/2} K``, ``Omega^{1/2} R0``.

    Returns
    -------
    K : ndarray (n_t, d_k)
    R0 : ndarray (n_t, d_v)
        The residuals the edits ask for at the preservation state.
    """
    problem = _check_problem(problem)
    edits = weighted_edits(problem, edits, weights)
    K, V = stack_edits(problem, edits)
    return K, V - K @ problem.W_star0


# ----------------------------------------------------------------------------------------------
# T2: soft adherence (post-write residual of the current batch)


def t2_residual_identity(K: np.ndarray, V: np.ndarray, W_prev: np.ndarray, W_new: np.ndarray,
                         C_prev: np.ndarray, *, weights: ArrayLike | None = None) -> Identity:
    """T2 identity: ``V_t - K_t W_t = S_t^{-1} r_t``.

    With ``r_t = V_t - K_t W_{t-1}`` and ``S_t = I + K_t C_{t-1} K_t^T``.

    Parameters
    ----------
    K : (u, d_k), V : (u, d_v)
        The batch of step ``t``.
    W_prev, W_new : (d_k, d_v)
        ``W*_{t-1}`` and ``W*_t``.
    C_prev : (d_k, d_k) SPD
        ``C_{t-1} = G_{t-1}^{-1}``.
    weights : (u,), optional
        Row weights of the batch. Both sides are then in row-scaled coordinates (weighted T2):
        ``Omega^{1/2}(V - K W_new) = S^{-1} Omega^{1/2} r`` with
        ``S = I + Omega^{1/2} K C_prev K^T Omega^{1/2}``; for the original coordinates see
        :func:`t2_weighted_residual_identity`.

    Returns
    -------
    Identity with ``lhs = V - K W_new`` and ``rhs = S^{-1} r`` (both (u, d_v)).
    """
    K, V, W_prev, W_new, C_prev = _check_step(K, V, W_prev, W_new, C_prev, weights)
    r = V - K @ W_prev  # (u, d_v)
    _, _, factor = _gain_terms(K, C_prev)
    return Identity(
        V - K @ W_new, scipy.linalg.cho_solve(factor, r), "T2 V_t - K_t W_t = S_t^-1 r_t"
    )


def t2_shrink_factor(K: np.ndarray, C_prev: np.ndarray, *, weights: ArrayLike | None = None) -> float:
    """T2 shrink factor ``1 / (1 + lambda_min(K C_prev K^T))`` in ``(0, 1]``.

    The post-write residual of a batch is at most this fraction of its innovation. It tends to 0
    in the hard-write limit (``C_prev`` large on the row space of ``K``) and to 1 when the
    information has grown in those directions (plasticity decay, C4).

    ``K (u, d_k)``, ``C_prev (d_k, d_k)`` SPD. With ``weights (u,)`` the keys are row-scaled:
    ``1 / (1 + lambda_min(Omega^{1/2} K C_prev K^T Omega^{1/2}))`` (weighted T2), which is smaller
    (more is absorbed) the larger the weights.
    """
    C_prev = as_matrix(C_prev, "C_prev")
    d_k = C_prev.shape[0]
    K = _scaled_keys(K, d_k, weights)
    if C_prev.shape != (d_k, d_k):
        raise ShapeError(f"C_prev must be square; got shape {C_prev.shape}")
    M = K @ ((C_prev + C_prev.T) / 2) @ K.T  # (u, u) PSD
    return 1.0 / (1.0 + _lambda_min((M + M.T) / 2))


def t2_adherence_bound(K: np.ndarray, V: np.ndarray, W_prev: np.ndarray, W_new: np.ndarray,
                       C_prev: np.ndarray, *, weights: ArrayLike | None = None) -> Bound:
    """T2 inequality: ``||V_t - K_t W_t||_F <= ||r_t||_F / (1 + lambda_min(K_t C_{t-1} K_t^T))``.

    The right-hand side is itself ``<= ||r_t||_F``; with ``u = 1`` the bound is an equality.
    Arguments as in :func:`t2_residual_identity`.
    """
    K, V, W_prev, W_new, C_prev = _check_step(K, V, W_prev, W_new, C_prev, weights)
    r = V - K @ W_prev
    return Bound(
        _fro(V - K @ W_new),
        _fro(r) * t2_shrink_factor(K, C_prev),
        "T2 ||V_t - K_t W_t|| <= ||r_t|| / (1 + lambda_min(K_t C_{t-1} K_t^T))",
    )


# ----------------------------------------------------------------------------------------------
# T3: global deviation from the preservation state


def t3_energy_identity(problem: Problem, edits: Sequence, W_t: np.ndarray, *,
                       weights: Sequence[ArrayLike | None] | None = None) -> Identity:
    """T3 energy identity: ``||R0||^2 = ||K W_t - V||^2 + ||K Delta||^2 + 2 ||Delta||_A^2``.

    Exact for the minimiser ``W_t = W*_t`` of ``J_t``; ``Delta = W_t - W*_0``.

    Parameters
    ----------
    problem : Problem
    edits : sequence of (K_i, V_i)
    W_t : (d_k, d_v)
    weights : one entry per batch, optional
        Row weights (weighted T3): ``R0 -> Omega^{1/2} R0``, ``K -> Omega^{1/2} K``, so that
        ``||Omega^{1/2} R0||^2 = ||Omega^{1/2}(K W_t - V)||^2 + ||Omega^{1/2} K Delta||^2 +
        2 ||Delta||_A^2`` and ``||Delta||_A^2 <= sum_i omega_i ||R0_i||^2 / 4``. The same keyword
        has the same meaning in every T3/T5 function below.

    Returns
    -------
    Identity of two floats.
    """
    problem = _check_problem(problem)
    edits = weighted_edits(problem, edits, weights)
    W_t = _weights(problem, W_t, "W_t")
    K, V = stack_edits(problem, edits)
    Delta = W_t - problem.W_star0
    R0 = V - K @ problem.W_star0
    rhs = _fro(K @ W_t - V) ** 2 + _fro(K @ Delta) ** 2 + 2 * _metric_sq(problem, Delta)
    return Identity(
        _fro(R0) ** 2, rhs, "T3 ||R0||^2 = ||K W_t - V||^2 + ||K Delta||^2 + 2||Delta||_A^2"
    )


def t3_metric_bound(problem: Problem, edits: Sequence, W_t: np.ndarray, *,
                    weights: Sequence[ArrayLike | None] | None = None) -> Bound:
    """T3 consequence: ``||Delta||_A^2 = alpha||Delta||^2 + beta||K0 Delta||^2 <= ||R0||^2 / 4``.

    Attained when ``||K Delta||_F = ||R0||_F / 2`` (scalar example ``A = a``, ``K = k``,
    ``k^2 = a``). Arguments as in :func:`t3_energy_identity`.
    """
    problem = _check_problem(problem)
    edits = weighted_edits(problem, edits, weights)
    W_t = _weights(problem, W_t, "W_t")
    _, R0 = initial_demand(problem, edits)
    return Bound(
        _metric_sq(problem, W_t - problem.W_star0),
        _fro(R0) ** 2 / 4,
        "T3 ||W_t - W*_0||_A^2 <= ||R0||^2 / 4",
    )


def t3a_deviation_bound(problem: Problem, edits: Sequence, W_t: np.ndarray, *,
                        weights: Sequence[ArrayLike | None] | None = None) -> Bound:
    """T3(a): ``||W_t - W*_0||_F <= ||R0||_F / (2 sqrt(lambda_min(A)))``.

    With ``V0 = K0 W0`` (always the case for a Gram-only anchor) ``W*_0 = W0``: this is the
    deviation from the pre-trained weights. Since ``lambda_min(A) >= alpha`` it implies
    ``||W_t - W*_0|| <= ||R0|| / (2 sqrt(alpha))``.
    """
    problem = _check_problem(problem)
    edits = weighted_edits(problem, edits, weights)
    W_t = _weights(problem, W_t, "W_t")
    _, R0 = initial_demand(problem, edits)
    return Bound(
        _fro(W_t - problem.W_star0),
        _sqrt_ratio(_fro(R0) / 2, _lambda_min(problem.metric)),
        "T3a ||W_t - W*_0|| <= ||R0|| / (2 sqrt(lambda_min(A)))",
    )


def t3b_anchor_bound(problem: Problem, edits: Sequence, W_t: np.ndarray, *,
                     weights: Sequence[ArrayLike | None] | None = None) -> Bound:
    """T3(b): ``||K0 (W_t - W*_0)||_F <= ||R0||_F / (2 sqrt(beta))``.

    With ``V0 = K0 W0`` this is the drift of the anchor outputs, ``||K0 W_t - V0||``. For a Gram
    anchor ``K0^T K0 = N E[k k^T]`` it says ``E_k ||Delta^T k||^2 <= ||R0||^2 / (4 beta N)``.

    Raises
    ------
    HyperparameterError
        If ``beta == 0`` (the anchor is not penalised; there is no such bound).
    """
    problem = _check_problem(problem)
    edits = weighted_edits(problem, edits, weights)
    if problem.beta <= 0:
        raise HyperparameterError("T3(b) needs beta > 0: the anchor term is not penalised")
    W_t = _weights(problem, W_t, "W_t")
    _, R0 = initial_demand(problem, edits)
    return Bound(
        math.sqrt(_anchor_sq(problem, W_t - problem.W_star0)),
        _fro(R0) / (2 * math.sqrt(problem.beta)),
        "T3b ||K0 (W_t - W*_0)|| <= ||R0|| / (2 sqrt(beta))",
    )


def t3c_w0_bound(problem: Problem, edits: Sequence, W_t: np.ndarray, *,
                 weights: Sequence[ArrayLike | None] | None = None) -> Bound:
    """T3(c), deviation from the pre-trained weights for a general ``V0``:

    ``||W_t - W0||_F <= ||R0||_F / (2 sqrt(lambda_min(A))) + ||W*_0 - W0||_F``.

    The second term vanishes when ``V0 = K0 W0``.
    """
    problem = _check_problem(problem)
    edits = weighted_edits(problem, edits, weights)
    W_t = _weights(problem, W_t, "W_t")
    a = t3a_deviation_bound(problem, edits, W_t)
    return Bound(
        _fro(W_t - problem.W0),
        a.rhs + _fro(problem.W_star0 - problem.W0),
        "T3c ||W_t - W0|| <= ||R0|| / (2 sqrt(lambda_min(A))) + ||W*_0 - W0||",
    )


def t3c_anchor_misfit_bound(problem: Problem, edits: Sequence, W_t: np.ndarray, *,
                            weights: Sequence[ArrayLike | None] | None = None) -> Bound:
    """T3(c), misfit of the anchor mapping for a general ``V0``:

    ``||K0 W_t - V0||_F <= ||R0||_F / (2 sqrt(beta)) + ||K0 W*_0 - V0||_F``.

    Raises :class:`HyperparameterError` if ``beta == 0``.
    """
    problem = _check_problem(problem)
    edits = weighted_edits(problem, edits, weights)
    W_t = _weights(problem, W_t, "W_t")
    b = t3b_anchor_bound(problem, edits, W_t)
    return Bound(
        _anchor_misfit(problem, W_t),
        b.rhs + _anchor_misfit(problem, problem.W_star0),
        "T3c ||K0 W_t - V0|| <= ||R0|| / (2 sqrt(beta)) + ||K0 W*_0 - V0||",
    )


def t3d_sqrt_t_bound(problem: Problem, edits: Sequence, W_t: np.ndarray, rho: float | None = None, *,
                     weights: Sequence[ArrayLike | None] | None = None) -> Bound:
    """T3(d): ``||W_t - W*_0||_F <= rho sqrt(t) / (2 sqrt(lambda_min(A)))``.

    Valid whenever ``||V_i - K_i W*_0||_F <= rho`` for every batch ``i <= t`` (then
    ``||R0||^2 <= t rho^2``); ``t = len(edits)`` counts batches.

    Parameters
    ----------
    rho : float, optional
        A per-batch demand bound; defaults to the smallest valid one, ``max_i ||V_i - K_i W*_0||``.

    Raises
    ------
    HyperparameterError
        If ``rho`` is given and smaller than some batch's demand.
    """
    problem = _check_problem(problem)
    edits = weighted_edits(problem, edits, weights)
    W_t = _weights(problem, W_t, "W_t")
    demands = [_fro(V - K @ problem.W_star0) for K, V in edits]
    largest = max(demands, default=0.0)
    if rho is None:
        rho = largest
    elif not rho >= largest * (1 - 1e-12):
        raise HyperparameterError(
            f"rho={rho:g} is below the largest batch demand {largest:g}; pass rho=None"
        )
    return Bound(
        _fro(W_t - problem.W_star0),
        _sqrt_ratio(rho * math.sqrt(len(edits)) / 2, _lambda_min(problem.metric)),
        "T3d ||W_t - W*_0|| <= rho sqrt(t) / (2 sqrt(lambda_min(A)))",
    )


def t3d_crude_bounds(problem: Problem, edits: Sequence, W_t: np.ndarray, *,
                     weights: Sequence[ArrayLike | None] | None = None) -> tuple[Bound, Bound]:
    """The cruder closed-form versions of T3(d), kept to compare against the sharp T3(a):

    ``||W_t - W*_0||_F <= ||G_t^{-1}||_2 ||K^T R0||_F``  (first Bound)
    ``                <= sum_i ||K_i||_2 ||R0_i||_F / lambda_min(A)``  (second Bound; its lhs is
    the first bound's rhs). With ``alpha = lambda^2`` the last form grows like ``t / lambda^2``.
    """
    problem = _check_problem(problem)
    edits = weighted_edits(problem, edits, weights)
    W_t = _weights(problem, W_t, "W_t")
    K, R0 = initial_demand(problem, edits)
    G = information_matrix(problem, edits)
    middle = _fro(K.T @ R0) / _lambda_min(G) if _lambda_min(G) > 0 else math.inf
    lam_A = _lambda_min(problem.metric)
    summed = sum(_spectral(Ki) * _fro(Vi - Ki @ problem.W_star0) for Ki, Vi in edits)
    summed = summed / lam_A if lam_A > 0 else math.inf
    return (
        Bound(_fro(W_t - problem.W_star0), middle, "T3d' ||W_t - W*_0|| <= ||G_t^-1|| ||K^T R0||"),
        Bound(
            middle, summed, "T3d' ||G_t^-1|| ||K^T R0|| <= sum_i ||K_i|| ||R0_i|| / lambda_min(A)"
        ),
    )


# ----------------------------------------------------------------------------------------------
# T4: the per-step change Delta_t = W_t - W_{t-1}


def t4_energy_identity(K: np.ndarray, V: np.ndarray, W_prev: np.ndarray, W_new: np.ndarray, C_prev: np.ndarray, *,
                       G_prev: np.ndarray | None = None, weights: ArrayLike | None = None) -> Identity:
    """T4(a) identity, with ``Delta_t = W_t - W_{t-1}``:

    ``||r_t||^2 = ||V_t - K_t W_t||^2 + ||K_t Delta_t||^2 + 2 ||Delta_t||_{G_{t-1}}^2``.

    T3 applied to the one-step problem whose prior metric is ``G_{t-1} = C_{t-1}^{-1}``.

    Parameters
    ----------
    K : (u, d_k), V : (u, d_v)
    W_prev, W_new : (d_k, d_v)
        ``W*_{t-1}`` and ``W*_t``.
    C_prev : (d_k, d_k) SPD
        ``C_{t-1}``.
    G_prev : (d_k, d_k), optional
        ``G_{t-1}`` if tracked (avoids a solve with ``C_prev``).
    weights : (u,), optional
        Row weights of the batch (weighted T4): ``r_t -> Omega_t^{1/2} r_t`` and
        ``K_t -> Omega_t^{1/2} K_t``; ``G_{t-1}`` is the weighted information. The same keyword has
        the same meaning in :func:`t4a_metric_bound`, :func:`t4b_step_bound`,
        :func:`t4c_crude_step_bound` and :func:`step_certificate`.
    """
    K, V, W_prev, W_new, C_prev = _check_step(K, V, W_prev, W_new, C_prev, weights)
    G_prev = _check_G_prev(G_prev, C_prev.shape[0])
    r = V - K @ W_prev
    Delta = W_new - W_prev
    rhs = (
        _fro(V - K @ W_new) ** 2 + _fro(K @ Delta) ** 2 + 2 * _prior_norm_sq(Delta, C_prev, G_prev)
    )
    return Identity(
        _fro(r) ** 2, rhs, "T4a ||r_t||^2 = ||V_t - K_t W_t||^2 + ||K_t D_t||^2 + 2||D_t||_G^2"
    )


def t4a_metric_bound(K: np.ndarray, V: np.ndarray, W_prev: np.ndarray, W_new: np.ndarray, C_prev: np.ndarray, *,
                     G_prev: np.ndarray | None = None, weights: ArrayLike | None = None) -> Bound:
    """T4(a): ``||Delta_t||_{G_{t-1}} <= ||r_t||_F / 2``.

    Arguments as in :func:`t4_energy_identity`.
    """
    K, V, W_prev, W_new, C_prev = _check_step(K, V, W_prev, W_new, C_prev, weights)
    G_prev = _check_G_prev(G_prev, C_prev.shape[0])
    Delta = W_new - W_prev
    return Bound(
        math.sqrt(_prior_norm_sq(Delta, C_prev, G_prev)),
        _fro(V - K @ W_prev) / 2,
        "T4a ||W_t - W_{t-1}||_{G_{t-1}} <= ||r_t|| / 2",
    )


def t4b_step_bound(K: np.ndarray, V: np.ndarray, W_prev: np.ndarray, W_new: np.ndarray, C_prev: np.ndarray, *,
                   G_prev: np.ndarray | None = None, weights: ArrayLike | None = None) -> Bound:
    """T4(b): ``||Delta_t||_F <= ||r_t||_F / (2 sqrt(lambda_min(G_{t-1})))``.

    ``lambda_min(G_{t-1}) = 1 / lambda_max(C_{t-1})``; see :func:`information_floor_bound` for
    its growth. Arguments as in :func:`t4_energy_identity`.
    """
    K, V, W_prev, W_new, C_prev = _check_step(K, V, W_prev, W_new, C_prev, weights)
    G_prev = _check_G_prev(G_prev, C_prev.shape[0])
    return Bound(
        _fro(W_new - W_prev),
        _sqrt_ratio(_fro(V - K @ W_prev) / 2, _prior_lambda_min(C_prev, G_prev)),
        "T4b ||W_t - W_{t-1}|| <= ||r_t|| / (2 sqrt(lambda_min(G_{t-1})))",
    )


def t4c_crude_step_bound(K: np.ndarray, V: np.ndarray, W_prev: np.ndarray, W_new: np.ndarray,
                         C_prev: np.ndarray, *, weights: ArrayLike | None = None) -> Bound:
    """T4(c): ``||Delta_t||_F <= ||C_{t-1} K_t^T||_2 ||r_t||_F`` (as ``||S_t^{-1}||_2 <= 1``)."""
    K, V, W_prev, W_new, C_prev = _check_step(K, V, W_prev, W_new, C_prev, weights)
    return Bound(
        _fro(W_new - W_prev),
        _spectral(C_prev @ K.T) * _fro(V - K @ W_prev),
        "T4c ||W_t - W_{t-1}|| <= ||C_{t-1} K_t^T|| ||r_t||",
    )


def information_floor_bound(problem: Problem, edits: Sequence, *,
                            weights: Sequence[ArrayLike | None] | None = None) -> Bound:
    """Weyl's floor on the information (T4b, C4):

    ``lambda_min(A) + t lambda_min(S_hat_t) <= lambda_min(G_t)``, where
    ``t S_hat_t = sum_{i<=t} K_i^T K_i``. An equality when ``A = alpha I`` (no anchor).
    With ``edits`` the first ``t - 1`` batches this bounds the ``lambda_min(G_{t-1})`` of T4(b).
    """
    problem = _check_problem(problem)
    edits = weighted_edits(problem, edits, weights)
    K, _ = stack_edits(problem, edits)
    X = K.T @ K  # (d_k, d_k)
    return Bound(
        _lambda_min(problem.metric) + _lambda_min(X),
        _lambda_min(problem.metric + X),
        "C4 lambda_min(A) + t lambda_min(S_hat_t) <= lambda_min(G_t)",
    )


def c4_plasticity_bound(problem: Problem, edits: Sequence, K: np.ndarray, C_prev: np.ndarray, *,
                        weights: Sequence[ArrayLike | None] | None = None,
                        batch_weights: ArrayLike | None = None) -> Bound:
    """C4 read through T2: the information floor limits how much of a new write is absorbed.

    For the batch ``K_t (u, d_k)`` written after the ``t - 1`` batches ``edits`` (whose state is
    ``C_{t-1} = G_{t-1}^{-1}``):

    ``1 / (1 + lambda_min(K_t K_t^T) / f_{t-1})  <=  1 / (1 + lambda_min(K_t C_{t-1} K_t^T))``,

    where ``f_{t-1} = lambda_min(A) + lambda_min(sum_{i<t} K_i^T K_i)`` is the floor of
    :func:`information_floor_bound`. The right side is T2's shrink factor
    (:func:`t2_shrink_factor`, the fraction of the innovation that the write may leave), measured
    on the state; the left side is predicted from the keys alone. As the floor grows like ``t``
    (C4) the left side tends to 1: late writes are absorbed less (plasticity decay).

    *Proof.* ``C_{t-1} <= lambda_max(C_{t-1}) I`` gives ``K C_{t-1} K^T <= lambda_max(C_{t-1})
    K K^T`` (Loewner order), so ``lambda_min(K C_{t-1} K^T) <= lambda_min(K K^T) /
    lambda_min(G_{t-1}) <= lambda_min(K K^T) / f_{t-1}`` (Weyl); ``x -> 1/(1+x)`` is decreasing.
    An equality when ``d_k = 1`` and ``A = alpha`` (then ``f_{t-1} = G_{t-1}``).

    Parameters
    ----------
    problem : Problem
    edits : sequence of the t - 1 earlier batches (K_i, V_i); may be empty (t = 1)
    K : (u, d_k)
        Keys of batch ``t``.
    C_prev : (d_k, d_k) SPD
        ``C_{t-1}``, the state after ``edits``.
    weights : one entry per earlier batch, optional
        Their row weights (the floor then uses ``sum K_i^T Omega_i K_i``).
    batch_weights : (u,), optional
        Row weights of batch ``t`` (its keys enter as ``Omega_t^{1/2} K_t``).
    """
    problem = _check_problem(problem)
    edits = weighted_edits(problem, edits, weights)
    K = _scaled_keys(K, problem.d_k, batch_weights)
    C_prev = as_matrix(C_prev, "C_prev", shape=(problem.d_k, problem.d_k))
    stacked, _ = stack_edits(problem, edits)
    floor = _lambda_min(problem.metric) + _lambda_min(stacked.T @ stacked)
    keys = K @ K.T  # (u, u)
    return Bound(
        1.0 / (1.0 + _lambda_min((keys + keys.T) / 2) / floor) if floor > 0 else 0.0,
        t2_shrink_factor(K, C_prev),
        "C4 1/(1 + lambda_min(K_t K_t^T)/f_{t-1}) <= 1/(1 + lambda_min(K_t C_{t-1} K_t^T))",
    )


# ----------------------------------------------------------------------------------------------
# T5: interference with and forgetting of earlier edits


def t5a_interference_identity(K_j: np.ndarray, K: np.ndarray, V: np.ndarray, W_prev: np.ndarray, W_new: np.ndarray,
                              C_prev: np.ndarray, *, weights: ArrayLike | None = None,
                              weights_j: ArrayLike | None = None) -> Identity:
    """T5(a) identity: ``K_j Delta_t = K_j C_{t-1} K_t^T S_t^{-1} r_t`` for an earlier batch ``j``.

    Parameters
    ----------
    K_j : (u_j, d_k)
        Keys of an earlier batch ``j < t``.
    K, V, W_prev, W_new, C_prev
        Step ``t`` as in :func:`t2_residual_identity`.
    weights, weights_j : (u,), (u_j,), optional
        Row weights of batch ``t`` and of batch ``j`` (both sides in row-scaled coordinates:
        ``Omega_j^{1/2} K_j Delta_t = Omega_j^{1/2} K_j C_{t-1} K_t^T Omega_t^{1/2} S_t^{-1}
        Omega_t^{1/2} r_t`` with the weighted ``S_t``).

    Returns
    -------
    Identity of two (u_j, d_v) arrays.
    """
    K, V, W_prev, W_new, C_prev = _check_step(K, V, W_prev, W_new, C_prev, weights)
    K_j = _scaled_keys(K_j, K.shape[1], weights_j, "K_j")
    F, _, factor = _gain_terms(K, C_prev)
    r = V - K @ W_prev
    return Identity(
        K_j @ (W_new - W_prev),
        (K_j @ F) @ scipy.linalg.cho_solve(factor, r),
        "T5a K_j D_t = K_j C_{t-1} K_t^T S_t^-1 r_t",
    )


def t5a_interference_bounds(K_j: np.ndarray, K: np.ndarray, V: np.ndarray, W_prev: np.ndarray, W_new: np.ndarray,
                            C_prev: np.ndarray, *, weights: ArrayLike | None = None,
                            weights_j: ArrayLike | None = None) -> tuple[Bound, Bound, Bound]:
    """T5(a): the one-step interference ``||K_j Delta_t||_F`` of step ``t`` on earlier batch ``j``.

    Returns three Bounds:

    1. ``||K_j Delta_t|| <= ||K_j C_{t-1} K_t^T||_2 ||r_t||`` (as stated in the spec);
    2. ``||K_j Delta_t|| <= ||K_j C_t K_t^T||_2 ||r_t||`` (sharper: ``C_t K_t^T =
       C_{t-1} K_t^T S_t^{-1}`` and ``||S_t^{-1}|| <= 1``);
    3. ``||K_j C_t K_t^T||_2 <= 1``, by Cauchy-Schwarz with ``||K_j C_t K_j^T||_2 < 1`` and
       ``||K_t C_t K_t^T||_2 < 1``. **Precondition:** batch ``j`` is part of the data of
       ``C_{t-1}`` (``j < t``). So the interference is always below ``||r_t||``.

    Note: ``||K_j C_{t-1} K_t^T||_2`` itself can exceed 1 (a large new key ``K_t``), so the
    "always below ``||r_t||``" reading needs the sharper form 2.

    With ``weights`` (batch ``t``) and ``weights_j`` (batch ``j``, with which it was added) all
    three hold in row-scaled coordinates (``K -> Omega^{1/2} K``, ``r_t -> Omega_t^{1/2} r_t``);
    for the unscaled interference see :func:`t5_protection_bounds`.
    """
    K, V, W_prev, W_new, C_prev = _check_step(K, V, W_prev, W_new, C_prev, weights)
    K_j = _scaled_keys(K_j, K.shape[1], weights_j, "K_j")
    F, _, factor = _gain_terms(K, C_prev)  # F = C_{t-1} K^T (d_k, u)
    gain = scipy.linalg.cho_solve(factor, F.T).T  # C_t K^T = F S^{-1} (d_k, u)
    lhs = _fro(K_j @ (W_new - W_prev))
    r_norm = _fro(V - K @ W_prev)
    coupling = _spectral(K_j @ gain)
    return (
        Bound(lhs, _spectral(K_j @ F) * r_norm, "T5a ||K_j D_t|| <= ||K_j C_{t-1} K_t^T|| ||r_t||"),
        Bound(lhs, coupling * r_norm, "T5a ||K_j D_t|| <= ||K_j C_t K_t^T|| ||r_t||"),
        Bound(coupling, 1.0, "T5a ||K_j C_t K_t^T|| <= 1 (j < t)"),
    )


def t5b_drift_bound(problem: Problem, edits: Sequence, j: int, W_t: np.ndarray, *, W_j: np.ndarray | None = None,
                    C_j: np.ndarray | None = None, weights: Sequence[ArrayLike | None] | None = None) -> Bound:
    """T5(b): cumulative drift of an early edit ``j`` between steps ``j`` and ``t = len(edits)``:

    ``||K_j (W_t - W*_j)||_F <= (1/2) ||K_j C_j K_j^T||_2^{1/2} ||R^(j)||_F``,

    where ``R^(j)`` stacks ``V_s - K_s W*_j`` for ``j < s <= t``, and ``||K_j C_j K_j^T||_2 < 1``.

    Parameters
    ----------
    problem : Problem
    edits : sequence of t batches (K_i, V_i)
    j : int
        1-based index of the early batch, ``1 <= j <= t``.
    W_t : (d_k, d_v)
        ``W*_t``.
    W_j : (d_k, d_v), optional
        ``W*_j``; computed by the closed form if omitted.
    C_j : (d_k, d_k), optional
        ``C_j = G_j^{-1}``; if omitted ``G_j`` is built and factorised instead.
    weights : one entry per batch, optional
        Row weights (weighted T5(b), row-scaled: ``K_j -> Omega_j^{1/2} K_j`` on the left,
        ``R^(j) -> Omega^{1/2} R^(j)`` on the right); for the original coordinates see
        :func:`t5_protection_bounds`.

    Raises
    ------
    HyperparameterError
        If ``j`` is not in ``1..t``.
    """
    problem = _check_problem(problem)
    edits = weighted_edits(problem, edits, weights)
    t = len(edits)
    if not (isinstance(j, (int, np.integer)) and 1 <= j <= t):
        raise HyperparameterError(
            f"j must be an integer in 1..{t} (1-based batch index); got {j!r}"
        )
    W_t = _weights(problem, W_t, "W_t")
    W_j = closed_form(problem, edits[:j]) if W_j is None else _weights(problem, W_j, "W_j")
    K_j = edits[j - 1][0]  # (u_j, d_k)
    if C_j is None:  # K_j C_j K_j^T = K_j G_j^{-1} K_j^T by a Cholesky solve with G_j
        try:
            factor = scipy.linalg.cho_factor(information_matrix(problem, edits[:j]), lower=True)
        except np.linalg.LinAlgError as exc:
            raise NotPositiveDefiniteError("G_j is not positive definite") from exc
        M = K_j @ scipy.linalg.cho_solve(factor, K_j.T)  # (u_j, u_j)
        sensitivity = _spectral((M + M.T) / 2)
    else:
        C_j = as_matrix(C_j, "C_j", shape=(problem.d_k, problem.d_k))
        sensitivity = _spectral(K_j @ ((C_j + C_j.T) / 2) @ K_j.T)
    later = edits[j:]
    demand = math.sqrt(sum(_fro(Vs - Ks @ W_j) ** 2 for Ks, Vs in later))
    return Bound(
        _fro(K_j @ (W_t - W_j)),
        0.5 * math.sqrt(sensitivity) * demand,
        "T5b ||K_j (W_t - W*_j)|| <= ||K_j C_j K_j^T||^(1/2) ||R^(j)|| / 2",
    )


def _fit_and_metric(problem: Problem, K: np.ndarray, V: np.ndarray, W: np.ndarray) -> float:
    """``||K W - V||_F^2 + ||W - W*_0||_A^2`` = ``J_t(W) - c_0``."""
    return _fro(K @ W - V) ** 2 + _metric_sq(problem, W - problem.W_star0)


def t5c_retention_bound(
    problem: Problem, edits: Sequence, W_t: np.ndarray, W_dagger: np.ndarray, *, batch: int = 1,
    weights: Sequence[ArrayLike | None] | None = None,
) -> Bound:
    """T5(c): retention of a batch, uniform in ``t``.

    ``||K_b W_t - V_b||_F <= ( ||W_dagger - W*_0||_A^2 + sum_i ||K_i W_dagger - V_i||_F^2 )^{1/2}``.

    When ``W_dagger`` realises every edit (``K_i W_dagger = V_i``) the second term vanishes and
    the budget ``||W_dagger - W*_0||_A`` does not depend on ``t``: the earliest edits cannot be
    forgotten beyond it. For any other ``W_dagger`` the inequality still holds (it follows from
    the regret form T5(d)), so no realisability check is needed.

    Parameters
    ----------
    batch : int
        1-based index of the batch whose residual is bounded (default the earliest).
    """
    problem = _check_problem(problem)
    edits = weighted_edits(problem, edits, weights)
    if not (isinstance(batch, (int, np.integer)) and 1 <= batch <= len(edits)):
        raise HyperparameterError(f"batch must be an integer in 1..{len(edits)}; got {batch!r}")
    W_t = _weights(problem, W_t, "W_t")
    W_dagger = _weights(problem, W_dagger, "W_dagger")
    K, V = stack_edits(problem, edits)
    K_b, V_b = edits[batch - 1]
    return Bound(
        _fro(K_b @ W_t - V_b),
        math.sqrt(_fit_and_metric(problem, K, V, W_dagger)),
        "T5c ||K_b W_t - V_b|| <= ||W_dag - W*_0||_A (W_dag realisable)",
    )


def t5d_regret_bound(problem: Problem, edits: Sequence, W_t: np.ndarray, W: np.ndarray, *,
                     weights: Sequence[ArrayLike | None] | None = None) -> Bound:
    """T5(d), regret form: for every ``W``,

    ``sum_i ||K_i W_t - V_i||^2 + ||W_t - W*_0||_A^2``
    ``    <= sum_i ||K_i W - V_i||^2 + ||W - W*_0||_A^2``.

    Equivalent to ``J_t(W*_t) <= J_t(W)`` (both sides differ from ``J_t`` by the same constant
    ``c_0``; this form avoids cancelling it). Use it with another editor's output ``W``.
    """
    problem = _check_problem(problem)
    edits = weighted_edits(problem, edits, weights)
    W_t = _weights(problem, W_t, "W_t")
    W = _weights(problem, W, "W")
    K, V = stack_edits(problem, edits)
    return Bound(
        _fit_and_metric(problem, K, V, W_t),
        _fit_and_metric(problem, K, V, W),
        "T5d J_t(W*_t) - c0 <= J_t(W) - c0",
    )


# ----------------------------------------------------------------------------------------------
# Weighted edits: the statements in the original (unscaled) coordinates
#
# Notation: fact i is the row (k, v) = (k_i (1, d_k), v_i (1, d_v)) of weight omega_i;
# W_{-i}, G_{-i} are the minimiser and the information of the same stream without fact i, and
# e_i^0 = v - k W_{-i} is its leave-out residual, m_i = k G_{-i}^{-1} k^T. Adding fact i with
# weight omega_i is one Sherman-Morrison step from (G_{-i}^{-1}, W_{-i}) with key sqrt(omega_i) k:
#
#     W_t = W_{-i} + phi_i G_{-i}^{-1} k^T e_i^0,   phi_i = omega_i / (1 + omega_i m_i),
#     v - k W_t = e_i^0 / (1 + omega_i m_i).


class _WeightedStream(NamedTuple):
    """A validated stream: the batches as given, their row weights, and the row-scaled batches."""

    batches: list  # [(K_i (u_i, d_k), V_i (u_i, d_v))]
    omegas: list  # [omega_i (u_i,)]
    scaled: list  # [(Omega_i^{1/2} K_i, Omega_i^{1/2} V_i)]


def _weighted_stream(problem: Problem, edits: Sequence, weights) -> _WeightedStream:
    batches = [problem.check_batch(K, V) for K, V in edits]
    if weights is None:
        weights = [None] * len(batches)
    try:
        weights = list(weights)
    except TypeError as exc:
        raise ShapeError("weights must be a sequence with one entry per batch") from exc
    if len(weights) != len(batches):
        raise ShapeError(f"weights has {len(weights)} entries but there are {len(batches)} batches; one per batch")
    omegas = [check_row_weights(w, K.shape[0]) for (K, _), w in zip(batches, weights, strict=True)]
    scaled = [scale_rows(K, V, om) for (K, V), om in zip(batches, omegas, strict=True)]
    return _WeightedStream(batches, omegas, scaled)


def _check_index(value, low: int, high: int, name: str) -> int:
    if not (isinstance(value, (int, np.integer)) and low <= value <= high):
        raise HyperparameterError(f"{name} must be an integer in {low}..{high}; got {value!r}")
    return int(value)


class _LeaveOut(NamedTuple):
    """Fact ``i`` and the weighted stream without it (see the section comment)."""

    k: np.ndarray  # (1, d_k)
    v: np.ndarray  # (1, d_v)
    omega: float  # omega_i
    stream: _WeightedStream  # with fact i
    W: np.ndarray  # W_{-i} (d_k, d_v)
    G: np.ndarray  # G_{-i} (d_k, d_k)
    direction: np.ndarray  # G_{-i}^{-1} k^T (d_k, 1)
    m: float  # k G_{-i}^{-1} k^T >= 0
    e: np.ndarray  # e_i^0 = v - k W_{-i} (1, d_v)

    @property
    def phi(self) -> float:
        """``omega m / (1 + omega m) / m = omega / (1 + omega m)``, increasing in omega, ``< 1/m``."""
        return self.omega / (1.0 + self.omega * self.m)

    @property
    def displacement_norm_cap(self) -> float:
        """``min(sqrt(omega)/2, 1/sqrt(m)) ||e_i^0||_F``, a bound on ``||W_t - W_{-i}||_{G_{-i}}``."""
        e = _fro(self.e)
        quarter = 0.5 * math.sqrt(self.omega) * e
        return min(quarter, _sqrt_ratio(e, self.m)) if e > 0 else 0.0


def _leave_out(problem: Problem, edits: Sequence, weights, batch, row) -> _LeaveOut:
    stream = _weighted_stream(problem, edits, weights)
    b = _check_index(batch, 1, len(stream.batches), "batch (1-based)")
    K_b, V_b = stream.batches[b - 1]
    i = _check_index(row, 0, K_b.shape[0] - 1, f"row (0-based, batch {b} has {K_b.shape[0]} rows)")
    omega_b = stream.omegas[b - 1]
    keep = np.arange(K_b.shape[0]) != i
    others = list(stream.scaled)
    if keep.any():
        others[b - 1] = scale_rows(K_b[keep], V_b[keep], omega_b[keep])
    else:
        del others[b - 1]
    G = information_matrix(problem, others)
    try:
        factor = scipy.linalg.cho_factor(G, lower=True)
    except np.linalg.LinAlgError as exc:
        raise NotPositiveDefiniteError("G_{-i} is not positive definite") from exc
    W = scipy.linalg.cho_solve(factor, normal_rhs(problem, others))
    k, v = K_b[i : i + 1], V_b[i : i + 1]
    direction = scipy.linalg.cho_solve(factor, k.T)  # (d_k, 1)
    m = max(float((k @ direction)[0, 0]), 0.0)
    return _LeaveOut(k, v, float(omega_b[i]), stream, W, G, direction, m, v - k @ W)


def t2_weighted_residual_identity(K: np.ndarray, V: np.ndarray, W_prev: np.ndarray, W_new: np.ndarray,
                                  C_prev: np.ndarray, *, weights: ArrayLike | None = None) -> Identity:
    """Weighted T2 in the original coordinates:

    ``V_t - K_t W_t = (I + K_t C_{t-1} K_t^T Omega_t)^{-1} r_t = Omega_t^{-1/2} S_t^{-1} Omega_t^{1/2} r_t``

    with ``S_t = I + Omega_t^{1/2} K_t C_{t-1} K_t^T Omega_t^{1/2}`` (the absorption factor in
    row-scaled coordinates, :func:`t2_residual_identity` with ``weights``). For a single key
    ``u = 1``: ``r_after = r_t / (1 + omega k C_{t-1} k^T)``, so a larger weight leaves a smaller
    share of the fact's innovation. ``weights=None`` is the unweighted T2.

    Arguments as in :func:`t2_residual_identity`; ``weights (u,)`` are the batch's row weights.
    """
    K, V, W_prev, W_new, C_prev = _check_step(K, V, W_prev, W_new, C_prev)
    omega = check_row_weights(weights, K.shape[0])
    root = np.sqrt(omega)[:, None]  # (u, 1)
    _, _, factor = _gain_terms(scale_rows(K, V, omega)[0], C_prev)  # S_t in scaled coordinates
    r = V - K @ W_prev  # (u, d_v)
    return Identity(
        V - K @ W_new,
        scipy.linalg.cho_solve(factor, root * r) / root,
        "T2w V_t - K_t W_t = (I + K_t C_{t-1} K_t^T Omega_t)^-1 r_t",
    )


def fact_residual_share(k: np.ndarray, C_t: np.ndarray, omega: float = 1.0) -> float:
    """The share of its leave-out residual that fact ``(k, omega)`` keeps: ``1 - omega k C_t k^T``.

    ``C_t (d_k, d_k)`` is the state *with* the fact (``G_t = G_{-i} + omega k^T k``) and
    ``k (d_k,)`` or ``(1, d_k)``. By Sherman-Morrison ``1 - omega k C_t k^T = 1 / (1 + omega k
    G_{-i}^{-1} k^T)`` in ``(0, 1]`` (weighted T2 for one fact, :func:`t2_fact_identity`): it is
    strictly decreasing in ``omega`` when ``k != 0`` and tends to 0 like ``1/omega``. (Computed
    from ``C_t``, it loses relative accuracy where it is tiny.)
    """
    C_t = as_matrix(C_t, "C_t")
    d_k = C_t.shape[0]
    if C_t.shape != (d_k, d_k):
        raise ShapeError(f"C_t must be square; got shape {C_t.shape}")
    k = _scaled_keys(k, d_k, None, "k")
    if k.shape[0] != 1:
        raise ShapeError(f"k must be a single key (1, {d_k}); got shape {k.shape}")
    w = float(check_row_weights(omega, 1, "omega")[0])
    return 1.0 - w * float((k @ ((C_t + C_t.T) / 2) @ k.T)[0, 0])


def t2_fact_identity(problem: Problem, edits: Sequence, W_t: np.ndarray, *, batch: int, row: int,
                     weights: Sequence[ArrayLike | None] | None = None) -> Identity:
    """Weighted T2 for one fact of any batch: ``v_i - k_i W_t = e_i^0 / (1 + omega_i m_i)``.

    ``e_i^0 = v_i - k_i W_{-i}`` is the residual of fact ``i`` at the minimiser of the same
    weighted stream without it and ``m_i = k_i G_{-i}^{-1} k_i^T``. So the fact's residual keeps
    its direction, and its size is strictly decreasing in its own weight (when ``e_i^0 != 0`` and
    ``k_i != 0``), tending to 0 like ``1/omega_i``; for the latest fact of a step ``W_{-i} =
    W_{t-1}`` and this is ``r_after = r_t / (1 + omega k C_{t-1} k^T)``. The factor also equals
    :func:`fact_residual_share` on ``C_t``.

    Parameters
    ----------
    problem : Problem
    edits : sequence of t batches (K_i, V_i)
    W_t : (d_k, d_v)
        The weighted minimiser ``W*_t``.
    batch : int
        1-based batch of the fact; ``row`` its 0-based row.
    weights : one entry per batch, optional

    Returns
    -------
    Identity of two (1, d_v) arrays.
    """
    problem = _check_problem(problem)
    W_t = _weights(problem, W_t, "W_t")
    out = _leave_out(problem, edits, weights, batch, row)
    return Identity(
        out.v - out.k @ W_t,
        out.e / (1.0 + out.omega * out.m),
        "T2w v_i - k_i W_t = e_i^0 / (1 + omega_i k_i G_-i^-1 k_i^T)",
    )


def fact_displacement_identity(problem: Problem, edits: Sequence, W_t: np.ndarray, *, batch: int, row: int,
                               weights: Sequence[ArrayLike | None] | None = None) -> Identity:
    """What fact ``i`` moves the minimiser by: ``W_t - W_{-i} = phi_i G_{-i}^{-1} k_i^T e_i^0``.

    ``phi_i = omega_i / (1 + omega_i m_i)`` (notation of :func:`t2_fact_identity`). The direction
    does not depend on ``omega_i`` and ``phi_i`` increases strictly from 0 to ``1/m_i``: raising a
    fact's weight moves the weights further along one fixed direction, never beyond the exact
    (hard) write of that fact. Multiplying by other keys ``K_j`` gives the interference the fact
    causes (weighted T5); taking norms gives its cost (weighted T3, T4).

    Returns an Identity of two (d_k, d_v) arrays; arguments as in :func:`t2_fact_identity`.
    """
    problem = _check_problem(problem)
    W_t = _weights(problem, W_t, "W_t")
    out = _leave_out(problem, edits, weights, batch, row)
    return Identity(
        W_t - out.W,
        out.phi * (out.direction @ out.e),
        "T3w W_t - W_-i = omega_i / (1 + omega_i m_i) G_-i^-1 k_i^T e_i^0",
    )


def t3_fact_cost_bounds(problem: Problem, edits: Sequence, W_t: np.ndarray, *, batch: int, row: int,
                        weights: Sequence[ArrayLike | None] | None = None) -> tuple[Bound, Bound, Bound]:
    """Weighted T3, the cost of one fact's weight: three Bounds.

    1. ``||W_t - W_{-i}||_{G_{-i}} <= sqrt(omega_i) ||e_i^0||_F / 2`` (T3's quarter bound for the
       one-fact problem: the budget grows like ``sqrt(omega_i)``);
    2. ``||W_t - W_{-i}||_{G_{-i}} <= ||e_i^0||_F / sqrt(m_i)`` (uniformly in ``omega_i``: the
       displacement saturates at the exact write of the fact);
    3. ``||W_t - W*_0||_A <= ||W_{-i} - W*_0||_A + min(sqrt(omega_i)/2, 1/sqrt(m_i)) ||e_i^0||_F``:
       the deviation from the preservation state (so from ``W0`` and the anchor, as in T3a-c)
       stays bounded however large the weight.

    Exactly ``||W_t - W_{-i}||_{G_{-i}} = phi_i sqrt(m_i) ||e_i^0||``, strictly increasing in
    ``omega_i`` (see :func:`fact_displacement_identity`). Notation and arguments as in
    :func:`t2_fact_identity`.
    """
    problem = _check_problem(problem)
    W_t = _weights(problem, W_t, "W_t")
    out = _leave_out(problem, edits, weights, batch, row)
    D = W_t - out.W  # (d_k, d_v)
    moved = math.sqrt(max(float(np.sum(D * (out.G @ D))), 0.0))
    e = _fro(out.e)
    return (
        Bound(moved, 0.5 * math.sqrt(out.omega) * e, "T3w ||W_t - W_-i||_{G_-i} <= sqrt(omega_i) ||e_i^0|| / 2"),
        Bound(moved, _sqrt_ratio(e, out.m) if e > 0 else 0.0,
              "T3w ||W_t - W_-i||_{G_-i} <= ||e_i^0|| / sqrt(m_i) (exact-write cap)"),
        Bound(
            math.sqrt(_metric_sq(problem, W_t - problem.W_star0)),
            math.sqrt(_metric_sq(problem, out.W - problem.W_star0)) + out.displacement_norm_cap,
            "T3w ||W_t - W*_0||_A <= ||W_-i - W*_0||_A + min(sqrt(omega_i)/2, 1/sqrt(m_i)) ||e_i^0||",
        ),
    )


def t4_saturation_bounds(K: np.ndarray, V: np.ndarray, W_prev: np.ndarray, W_new: np.ndarray, C_prev: np.ndarray, *,
                         weights: ArrayLike | None = None,
                         G_prev: np.ndarray | None = None) -> tuple[Bound, Bound]:
    """Weighted T4, the cost side: a weighted step never exceeds the exact write of its batch.

    With ``M_t = K_t C_{t-1} K_t^T`` and ``Delta_t = W_t - W_{t-1} = C_{t-1} K_t^T (Omega_t^{-1} +
    M_t)^{-1} r_t``:

    1. ``||Delta_t||_{G_{t-1}}^2 <= <r_t, (Omega_t^{-1} + M_t)^{-1} r_t>`` (the minimum of the
       one-step objective; non-decreasing in ``Omega_t``, and ``<= ||Omega_t^{1/2} r_t||^2``);
    2. ``<r_t, (Omega_t^{-1} + M_t)^{-1} r_t> <= <r_t, M_t^{-1} r_t>``, the ``G_{t-1}``-cost of the
       exact write of the batch, for every ``Omega_t`` (``+inf`` when ``M_t`` is singular, i.e.
       ``K_t`` is not of full row rank and an exact write need not exist).

    The quarter bound T4(a) with weights, ``||Delta_t||_{G_{t-1}} <= ||Omega_t^{1/2} r_t|| / 2``, is
    :func:`t4a_metric_bound` with ``weights``; it grows like ``sqrt(omega)``, these do not.
    Arguments as in :func:`t4_energy_identity`.
    """
    K, V, W_prev, W_new, C_prev = _check_step(K, V, W_prev, W_new, C_prev)
    G_prev = _check_G_prev(G_prev, C_prev.shape[0])
    omega = check_row_weights(weights, K.shape[0])
    root = np.sqrt(omega)[:, None]  # (u, 1)
    r = V - K @ W_prev  # (u, d_v)
    _, _, factor = _gain_terms(scale_rows(K, V, omega)[0], C_prev)  # S_t in scaled coordinates
    scaled_r = root * r
    value = max(float(np.sum(scaled_r * scipy.linalg.cho_solve(factor, scaled_r))), 0.0)
    M = K @ C_prev @ K.T  # (u, u)
    try:
        hard = max(float(np.sum(r * scipy.linalg.cho_solve(scipy.linalg.cho_factor((M + M.T) / 2), r))), 0.0)
    except np.linalg.LinAlgError:
        hard = math.inf
    return (
        Bound(
            math.sqrt(_prior_norm_sq(W_new - W_prev, C_prev, G_prev)),
            math.sqrt(value),
            "T4w ||D_t||_{G_{t-1}} <= <r_t, (Omega_t^-1 + K_t C_{t-1} K_t^T)^-1 r_t>^(1/2)",
        ),
        Bound(
            math.sqrt(value),
            math.sqrt(hard),
            "T4w <r_t, (Omega_t^-1 + M_t)^-1 r_t> <= <r_t, M_t^-1 r_t> (exact-write cost)",
        ),
    )


def t5_protection_bounds(K_j: np.ndarray, K: np.ndarray, V: np.ndarray, W_prev: np.ndarray, W_new: np.ndarray,
                         C_prev: np.ndarray, *, weights: ArrayLike | None = None,
                         weights_j: ArrayLike | None = None) -> tuple[Bound, Bound]:
    """Weighted T5(a) in the original coordinates: heavy earlier facts are moved less.

    For an earlier batch ``j`` in the data of ``C_{t-1}`` with row weights ``omega_j`` and step
    ``t`` with row weights ``omega_t``:

    1. ``||K_j Delta_t||_F <= ||K_j C_{t-1} K_j^T||_2^{1/2} ||Omega_t^{1/2} r_t||_F / 2``;
    2. ``||K_j C_{t-1} K_j^T||_2 <= 1 / min(omega_j)`` (strict), because
       ``G_{t-1} - K_j^T Omega_j K_j = A + ... > 0``.

    Together: ``||K_j Delta_t|| < ||Omega_t^{1/2} r_t|| / (2 sqrt(min omega_j))``; per fact,
    ``||k_l Delta_t|| < ||Omega_t^{1/2} r_t|| / (2 sqrt(omega_l))``. The cost side: the new batch's
    weights enter through ``||Omega_t^{1/2} r_t||``.

    Arguments as in :func:`t5a_interference_bounds` (``K_j`` unscaled; ``weights_j`` the weights
    batch ``j`` was added with).
    """
    K, V, W_prev, W_new, C_prev = _check_step(K, V, W_prev, W_new, C_prev, weights)
    K_j = _scaled_keys(K_j, K.shape[1], None, "K_j")
    omega_j = check_row_weights(weights_j, K_j.shape[0], "weights_j")
    sensitivity = _spectral(K_j @ C_prev @ K_j.T)
    return (
        Bound(
            _fro(K_j @ (W_new - W_prev)),
            0.5 * math.sqrt(sensitivity) * _fro(V - K @ W_prev),
            "T5w ||K_j D_t|| <= ||K_j C_{t-1} K_j^T||^(1/2) ||Omega_t^(1/2) r_t|| / 2",
        ),
        Bound(sensitivity, 1.0 / float(omega_j.min()), "T5w ||K_j C_{t-1} K_j^T|| <= 1 / min(omega_j) (j < t)"),
    )


def t5_fact_interference_bound(problem: Problem, edits: Sequence, W_t: np.ndarray, K_other: np.ndarray, *,
                               batch: int, row: int,
                               weights: Sequence[ArrayLike | None] | None = None) -> Bound:
    """Weighted T5, the cost side: the interference fact ``i`` causes on other keys.

    ``||K_o (W_t - W_{-i})||_F <= ||K_o G_{-i}^{-1} K_o^T||_2^{1/2} min(sqrt(omega_i)/2,
    1/sqrt(m_i)) ||e_i^0||_F`` for any keys ``K_o (n_o, d_k)`` (for instance those of earlier
    facts). Exactly, ``K_o (W_t - W_{-i}) = phi_i K_o G_{-i}^{-1} k_i^T e_i^0``
    (:func:`fact_displacement_identity`): it grows with ``omega_i`` along a fixed direction, and
    saturates at the interference of the exact write of fact ``i``.

    Notation and arguments as in :func:`t2_fact_identity`.
    """
    problem = _check_problem(problem)
    W_t = _weights(problem, W_t, "W_t")
    K_other = _scaled_keys(K_other, problem.d_k, None, "K_other")
    out = _leave_out(problem, edits, weights, batch, row)
    try:
        solved = scipy.linalg.cho_solve(scipy.linalg.cho_factor(out.G, lower=True), K_other.T)
    except np.linalg.LinAlgError as exc:  # pragma: no cover - _leave_out factorised it already
        raise NotPositiveDefiniteError("G_{-i} is not positive definite") from exc
    M = K_other @ solved  # (n_o, n_o)
    return Bound(
        _fro(K_other @ (W_t - out.W)),
        math.sqrt(_spectral((M + M.T) / 2)) * out.displacement_norm_cap,
        "T5w ||K_o (W_t - W_-i)|| <= ||K_o G_-i^-1 K_o^T||^(1/2) min(sqrt(omega_i)/2, 1/sqrt(m_i)) ||e_i^0||",
    )


def t5_fact_retention_bound(problem: Problem, edits: Sequence, W_t: np.ndarray, W_dagger: np.ndarray, *,
                            batch: int, row: int | None = None,
                            weights: Sequence[ArrayLike | None] | None = None) -> Bound:
    """Weighted T5(c) in the original coordinates: a weight divides a fact's forgetting budget.

    ``||k_i W_t - v_i||_F <= ( budget / omega_i )^{1/2}``, with ``budget = ||W_dagger - W*_0||_A^2
    + sum_s ||Omega_s^{1/2}(K_s W_dagger - V_s)||_F^2`` (just ``||W_dagger - W*_0||_A^2`` when
    ``W_dagger`` realises every edit, and then uniform in ``t``). With ``row=None`` the whole batch:
    ``||K_b W_t - V_b||_F <= (budget / min omega_b)^{1/2}``.

    *Proof.* The weighted regret form T5(d) (:func:`t5d_regret_bound` with ``weights``) gives
    ``omega_i ||k_i W_t - v_i||^2 <= sum_s ||Omega_s^{1/2}(K_s W_t - V_s)||^2 + ||W_t - W*_0||_A^2
    <= budget``.
    """
    problem = _check_problem(problem)
    W_t = _weights(problem, W_t, "W_t")
    W_dagger = _weights(problem, W_dagger, "W_dagger")
    stream = _weighted_stream(problem, edits, weights)
    b = _check_index(batch, 1, len(stream.batches), "batch (1-based)")
    K_b, V_b = stream.batches[b - 1]
    omega_b = stream.omegas[b - 1]
    if row is not None:
        i = _check_index(row, 0, K_b.shape[0] - 1, f"row (0-based, batch {b} has {K_b.shape[0]} rows)")
        K_b, V_b, omega_b = K_b[i : i + 1], V_b[i : i + 1], omega_b[i : i + 1]
    K, V = stack_edits(problem, stream.scaled)
    budget = _fit_and_metric(problem, K, V, W_dagger)
    return Bound(
        _fro(K_b @ W_t - V_b),
        math.sqrt(budget / float(omega_b.min())),
        "T5w ||k_i W_t - v_i|| <= (||W_dag - W*_0||_A^2 + weighted misfit of W_dag)^(1/2) / sqrt(omega_i)",
    )


# ----------------------------------------------------------------------------------------------
# Certificates: the bounds an edited layer reports next to its measured deviations


def deviation_certificate(problem: Problem, edits: Sequence, W_t: np.ndarray, *,
                          weights: Sequence[ArrayLike | None] | None = None) -> dict[str, Bound]:
    """The global deviation bounds of T3 for weights ``W_t`` after the edits ``edits``.

    Keys: ``"metric"`` (T3), ``"from_preservation_state"`` (T3a), ``"from_W0"`` (T3c) and, when
    ``beta > 0``, ``"anchor_drift"`` (T3b) and ``"anchor_misfit"`` (T3c). Each value is a
    :class:`Bound` whose ``lhs`` is the measured quantity and ``rhs`` the guarantee.
    """
    problem = _check_problem(problem)
    edits = weighted_edits(problem, edits, weights)
    W_t = _weights(problem, W_t, "W_t")
    out = {
        "metric": t3_metric_bound(problem, edits, W_t),
        "from_preservation_state": t3a_deviation_bound(problem, edits, W_t),
        "from_W0": t3c_w0_bound(problem, edits, W_t),
    }
    if problem.beta > 0:
        out["anchor_drift"] = t3b_anchor_bound(problem, edits, W_t)
        out["anchor_misfit"] = t3c_anchor_misfit_bound(problem, edits, W_t)
    return out


def step_certificate(K: np.ndarray, V: np.ndarray, W_prev: np.ndarray, W_new: np.ndarray, C_prev: np.ndarray, *,
                     G_prev: np.ndarray | None = None, weights: ArrayLike | None = None) -> dict[str, Bound]:
    """The per-step bounds of T2 and T4 for one recursion step.

    Keys: ``"adherence"`` (T2), ``"step_metric"`` (T4a), ``"step"`` (T4b), ``"step_crude"``
    (T4c). Arguments as in :func:`t4_energy_identity`.
    """
    return {
        "adherence": t2_adherence_bound(K, V, W_prev, W_new, C_prev, weights=weights),
        "step_metric": t4a_metric_bound(K, V, W_prev, W_new, C_prev, G_prev=G_prev, weights=weights),
        "step": t4b_step_bound(K, V, W_prev, W_new, C_prev, G_prev=G_prev, weights=weights),
        "step_crude": t4c_crude_step_bound(K, V, W_prev, W_new, C_prev, weights=weights),
    }
