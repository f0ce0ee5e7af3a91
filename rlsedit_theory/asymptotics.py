"""Limits of the RLSEdit minimiser: many edits (T7, C1-C4) and extreme weights (T6).

Long streams (T7). With normalised statistics ``S_hat_t = (1/t) sum K_i^T K_i``,
``B_hat_t = (1/t) sum K_i^T V_i``, ``s_hat_t = (1/t) sum ||V_i||^2`` (``t`` counts batches)
and weights ``alpha_t / t -> a``, ``beta_t / t -> b``, the minimiser is

    W*_t = H_t^{-1} b~_t,   H_t = S_hat_t + (alpha_t/t) I + (beta_t/t) K0^T K0,
                            b~_t = B_hat_t + (alpha_t/t) W0 + (beta_t/t) K0^T V0,

and converges to ``W_inf = H^{-1} b~`` with ``H = Sigma_KK + a I + b K0^T K0`` and
``b~ = Sigma_KV + a W0 + b K0^T V0`` (assumption A3: ``H`` SPD).

Extreme weights (T6, fixed ``t``). ``(alpha, beta) = s (a, b)`` with ``s -> 0`` gives the
minimum-``A_1``-change least-squares write :func:`hard_write_limit`; ``beta -> inf`` with
``alpha`` fixed gives the ridge fit restricted to ``null(K0)``, :func:`null_space_limit`.

Row keys throughout: ``W (d_k, d_v)``, ``K (u, d_k)``, ``V (u, d_v)``. Everything is float64 and
solved by Cholesky factorisations or SVD-based least squares; no explicit inverse is formed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import scipy.linalg

from .bounds import Bound
from .errors import HyperparameterError, NotPositiveDefiniteError, ShapeError
from .objective import stack_edits
from .problem import Problem, as_matrix, check_batch, check_weight

__all__ = [
    "Moments",
    "empirical_moments",
    "stationary_moments",
    "make_stationary_stream",
    "limit_weights",
    "misfit",
    "preservation",
    "TradeoffPath",
    "tradeoff_path",
    "t7_rate_bound",
    "t7_pointwise_bound",
    "hard_write_limit",
    "null_space_limit",
]


class Moments(NamedTuple):
    """Second moments of an edit stream, per batch.

    ``S_KK (d_k, d_k) = E[K^T K]``, ``S_KV (d_k, d_v) = E[K^T V]``, ``s_VV = E||V||_F^2``.
    """

    S_KK: np.ndarray
    S_KV: np.ndarray
    s_VV: float


# ----------------------------------------------------------------------------------------------
# Anchor handling: (W0, K0^T K0, K0^T V0, ||V0||^2) from a Problem or from arrays


class _Anchor(NamedTuple):
    W0: np.ndarray  # (d_k, d_v)
    gram0: np.ndarray  # (d_k, d_k)  K0^T K0
    cross0: np.ndarray  # (d_k, d_v)  K0^T V0
    v0_sq: float  # ||V0||_F^2


def _anchor(problem_or_W0, gram0=None, K0=None, V0=None) -> _Anchor:
    """The anchor from a :class:`Problem` (its ``alpha``, ``beta`` are ignored) or from arrays.

    With arrays: ``problem_or_W0`` is ``W0 (d_k, d_v)``; the anchor is ``gram0`` (then
    ``V0 = K0 W0``), or ``K0`` with an optional ``V0``, or absent.
    """
    if isinstance(problem_or_W0, Problem):
        if gram0 is not None or K0 is not None or V0 is not None:
            raise ShapeError("give the anchor either through the Problem or as arrays, not both")
        p = problem_or_W0
        return _Anchor(p.W0, p.gram0, p.cross0, p.v0_sq)
    W0 = as_matrix(problem_or_W0, "W0")
    d_k, d_v = W0.shape
    if gram0 is not None and K0 is not None:
        raise ShapeError("give the anchor as gram0 or as K0 (with optional V0), not both")
    if V0 is not None and K0 is None:
        raise ShapeError("V0 needs explicit anchor keys K0")
    if K0 is not None:
        K0 = as_matrix(K0, "K0", shape=(None, d_k))
        V0 = K0 @ W0 if V0 is None else as_matrix(V0, "V0", shape=(K0.shape[0], d_v))
        return _Anchor(W0, K0.T @ K0, K0.T @ V0, float(np.sum(V0**2)))
    if gram0 is not None:
        g = as_matrix(gram0, "gram0", shape=(d_k, d_k))
        g = (g + g.T) / 2
        cross = g @ W0
        return _Anchor(W0, g, cross, float(np.sum(W0 * cross)))
    return _Anchor(W0, np.zeros((d_k, d_k)), np.zeros((d_k, d_v)), 0.0)


def _check_moments(Sigma_KK, Sigma_KV, d_k: int, d_v: int):
    S = as_matrix(Sigma_KK, "Sigma_KK", shape=(d_k, d_k))
    B = as_matrix(Sigma_KV, "Sigma_KV", shape=(d_k, d_v))
    return (S + S.T) / 2, B


def _limit_system(S, B, anchor: _Anchor, a: float, b: float):
    """``H = S + a I + b K0^T K0`` and ``b~ = B + a W0 + b K0^T V0``."""
    H = S + a * np.eye(S.shape[0]) + b * anchor.gram0
    rhs = B + a * anchor.W0 + b * anchor.cross0
    return H, rhs


def _spd_solve(H: np.ndarray, rhs: np.ndarray, what: str) -> np.ndarray:
    try:
        factor = scipy.linalg.cho_factor(H, lower=True)
    except np.linalg.LinAlgError as exc:
        raise NotPositiveDefiniteError(what) from exc
    return scipy.linalg.cho_solve(factor, rhs)


# ----------------------------------------------------------------------------------------------
# Moments and synthetic stationary streams


def empirical_moments(edits: Sequence) -> Moments:
    """Normalised statistics of ``t = len(edits) >= 1`` batches.

    ``S_hat = (1/t) sum K_i^T K_i (d_k, d_k)``, ``B_hat = (1/t) sum K_i^T V_i (d_k, d_v)``,
    ``s_hat = (1/t) sum ||V_i||_F^2``. ``t`` counts batches, not rows.
    """
    edits = list(edits)
    if not edits:
        raise ShapeError("empirical_moments needs at least one batch")
    K1, V1 = edits[0]
    K1 = np.atleast_2d(np.asarray(K1, dtype=np.float64))
    V1 = np.atleast_2d(np.asarray(V1, dtype=np.float64))
    d_k, d_v = K1.shape[1], V1.shape[1]
    S = np.zeros((d_k, d_k))
    B = np.zeros((d_k, d_v))
    s = 0.0
    for K, V in edits:
        K, V = check_batch(K, V, d_k, d_v)
        S += K.T @ K
        B += K.T @ V
        s += float(np.sum(V**2))
    t = len(edits)
    return Moments(S / t, B / t, s / t)


def stationary_moments(W_true: np.ndarray, key_cov: np.ndarray, noise: float, u: int) -> Moments:
    """Population moments of :func:`make_stationary_stream`.

    ``Sigma_KK = u key_cov``, ``Sigma_KV = u key_cov W_true``,
    ``s_VV = u (tr(W_true^T key_cov W_true) + d_v noise^2)``.
    """
    W_true = as_matrix(W_true, "W_true")
    d_k, d_v = W_true.shape
    cov = as_matrix(key_cov, "key_cov", shape=(d_k, d_k))
    if not (isinstance(u, (int, np.integer)) and u >= 1):
        raise ShapeError(f"u must be a positive integer; got {u!r}")
    noise = check_weight(noise, "noise")
    return Moments(
        u * cov,
        u * cov @ W_true,
        u * (float(np.sum(W_true * (cov @ W_true))) + d_v * noise**2),
    )


def make_stationary_stream(
    rng: np.random.Generator, d_k: int, d_v: int, T: int, u: int, W_true: np.ndarray, key_cov: np.ndarray, noise: float
) -> list[tuple[np.ndarray, np.ndarray]]:
    """``T`` i.i.d. batches: keys ``K (u, d_k)`` with rows ``~ N(0, key_cov)`` and values
    ``V = K W_true + noise * N(0, I) (u, d_v)``.

    Its moments are :func:`stationary_moments`; the least-squares limit is ``W_true``.

    Raises
    ------
    ShapeError
        On inconsistent sizes; :class:`NotPositiveDefiniteError` if ``key_cov`` is not SPD.
    """
    W_true = as_matrix(W_true, "W_true", shape=(d_k, d_v))
    cov = as_matrix(key_cov, "key_cov", shape=(d_k, d_k))
    if not (
        isinstance(T, (int, np.integer)) and T >= 0 and isinstance(u, (int, np.integer)) and u >= 1
    ):
        raise ShapeError(f"T must be an integer >= 0 and u >= 1; got T={T!r}, u={u!r}")
    noise = check_weight(noise, "noise")
    try:
        root = scipy.linalg.cholesky((cov + cov.T) / 2, lower=True)  # cov = root root^T
    except np.linalg.LinAlgError as exc:
        raise NotPositiveDefiniteError("key_cov must be symmetric positive definite") from exc
    keys = rng.standard_normal((T, u, d_k)) @ root.T  # (T, u, d_k)
    values = keys @ W_true + noise * rng.standard_normal((T, u, d_v))  # (T, u, d_v)
    return [(keys[i], values[i]) for i in range(T)]


# ----------------------------------------------------------------------------------------------
# T7: the limit minimiser and the trade-off path (C2, C3)


def limit_weights(
    Sigma_KK: np.ndarray, Sigma_KV: np.ndarray, problem_or_W0, a: float, b: float, *,
    gram0: np.ndarray | None = None, K0: np.ndarray | None = None, V0: np.ndarray | None = None
) -> np.ndarray:
    """The limit minimiser ``W_inf = H^{-1}(Sigma_KV + a W0 + b K0^T V0)`` (T7 ii).

    ``H = Sigma_KK + a I + b K0^T K0``. With empirical moments and ``(a, b) =
    (alpha_t/t, beta_t/t)`` this is exactly the finite-``t`` minimiser ``W*_t`` (T7 iii).

    Parameters
    ----------
    Sigma_KK : (d_k, d_k) symmetric PSD
    Sigma_KV : (d_k, d_v)
    problem_or_W0 : Problem or (d_k, d_v) array
        Supplies ``W0`` and the anchor (a Problem's own ``alpha``, ``beta`` are ignored). With an
        array, pass the anchor as ``gram0`` or ``K0`` (and optional ``V0``).
    a, b : float >= 0
        Limit ratios ``alpha_t / t -> a``, ``beta_t / t -> b``.

    Returns
    -------
    W_inf : (d_k, d_v)

    Raises
    ------
    NotPositiveDefiniteError
        If ``H`` is not positive definite (assumption A3 fails).
    """
    anchor = _anchor(problem_or_W0, gram0, K0, V0)
    d_k, d_v = anchor.W0.shape
    S, B = _check_moments(Sigma_KK, Sigma_KV, d_k, d_v)
    H, rhs = _limit_system(S, B, anchor, check_weight(a, "a"), check_weight(b, "b"))
    return _spd_solve(H, rhs, "H = Sigma_KK + a I + b K0^T K0 is not positive definite (A3 fails)")


def misfit(W: np.ndarray, Sigma_KK: np.ndarray, Sigma_KV: np.ndarray, s_VV: float) -> float:
    """Limit misfit ``f(W) = E||K W - V||^2 = tr(W^T S W) - 2 tr(W^T S_KV) + s_VV`` (C3).

    ``W (d_k, d_v)``, ``Sigma_KK (d_k, d_k)``, ``Sigma_KV (d_k, d_v)``.
    """
    W = as_matrix(W, "W")
    S, B = _check_moments(Sigma_KK, Sigma_KV, *W.shape)
    return float(np.sum(W * (S @ W)) - 2 * np.sum(W * B) + s_VV)


def preservation(W: np.ndarray, problem_or_W0, a1: float, b1: float, *, gram0: np.ndarray | None = None,
                 K0: np.ndarray | None = None, V0: np.ndarray | None = None) -> float:
    """Preservation cost ``g(W) = a1 ||W - W0||^2 + b1 ||K0 W - V0||^2`` (C3)."""
    anchor = _anchor(problem_or_W0, gram0, K0, V0)
    W = as_matrix(W, "W", shape=anchor.W0.shape)
    return _preservation_from_anchor(W, anchor, check_weight(a1, "a1"), check_weight(b1, "b1"))


class TradeoffPath(NamedTuple):
    """The C3 trade-off path: for each ``rho``, ``W_inf(rho)`` and its two costs."""

    rho: np.ndarray  # (m,)
    f: np.ndarray  # (m,) misfit E||K W - V||^2
    g: np.ndarray  # (m,) preservation a1||W - W0||^2 + b1||K0 W - V0||^2
    W: np.ndarray  # (m, d_k, d_v)


def tradeoff_path(
    Sigma_KK: np.ndarray,
    Sigma_KV: np.ndarray,
    s_VV: float,
    problem_or_W0,
    a1: float,
    b1: float,
    rhos,
    *,
    gram0: np.ndarray | None = None,
    K0: np.ndarray | None = None,
    V0: np.ndarray | None = None,
) -> TradeoffPath:
    """C3: the limit minimiser along the ray ``(a, b) = rho (a1, b1)`` and its two costs.

    ``f(rho) = misfit(W_inf(rho))`` is non-decreasing and ``g(rho) = preservation(W_inf(rho))``
    non-increasing in ``rho`` (the Pareto path from least squares, ``rho -> 0``, to the
    preservation state ``W*_0``, ``rho -> inf``). With empirical moments (:func:`empirical_moments`)
    this is the finite-``t`` path of the two parts of ``J_t / t`` with ``alpha = t rho a1``,
    ``beta = t rho b1``.

    Parameters
    ----------
    rhos : 1-D array of values >= 0 (``rho = 0`` needs ``Sigma_KK`` SPD).
    """
    anchor = _anchor(problem_or_W0, gram0, K0, V0)
    rhos = np.asarray(rhos, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(rhos)) or np.any(rhos < 0):
        raise HyperparameterError("rhos must be finite and >= 0")
    a1 = check_weight(a1, "a1")
    b1 = check_weight(b1, "b1")
    d_k, d_v = anchor.W0.shape
    S, B = _check_moments(Sigma_KK, Sigma_KV, d_k, d_v)
    Ws, fs, gs = [], [], []
    for rho in rhos:
        H, rhs = _limit_system(S, B, anchor, rho * a1, rho * b1)
        W = _spd_solve(H, rhs, f"H is not positive definite at rho={rho:g}")
        Ws.append(W)
        fs.append(misfit(W, S, B, s_VV))
        gs.append(_preservation_from_anchor(W, anchor, a1, b1))
    return TradeoffPath(rhos, np.array(fs), np.array(gs), np.array(Ws).reshape(len(rhos), d_k, d_v))


def _preservation_from_anchor(W, anchor: _Anchor, a1: float, b1: float) -> float:
    """``a1 ||W - W0||^2 + b1 ||K0 W - V0||^2`` from the Gram terms of the anchor."""
    D = W - anchor.W0  # (d_k, d_v)
    # ||K0 W - V0||^2 = ||K0 D||^2 + 2 <K0 D, K0 W0 - V0> + ||K0 W0 - V0||^2
    off = anchor.gram0 @ anchor.W0 - anchor.cross0  # K0^T (K0 W0 - V0)
    base = float(
        np.sum(anchor.W0 * (anchor.gram0 @ anchor.W0))
        - 2 * np.sum(anchor.W0 * anchor.cross0)
        + anchor.v0_sq
    )
    anchor_sq = float(np.sum(D * (anchor.gram0 @ D)) + 2 * np.sum(D * off)) + max(base, 0.0)
    return a1 * float(np.sum(D**2)) + b1 * max(anchor_sq, 0.0)


# ----------------------------------------------------------------------------------------------
# T7: quantitative statements


def t7_rate_bound(
    S_hat: np.ndarray,
    B_hat: np.ndarray,
    a_t: float,
    b_t: float,
    Sigma_KK: np.ndarray,
    Sigma_KV: np.ndarray,
    problem_or_W0,
    a: float,
    b: float,
    *,
    W_t: np.ndarray | None = None,
    gram0: np.ndarray | None = None,
    K0: np.ndarray | None = None,
    V0: np.ndarray | None = None,
) -> Bound:
    """T7(iii) perturbation bound:

    ``||W*_t - W_inf||_F <= ||H_t^{-1}||_2 ( ||b~_t - b~||_F + ||H_t - H||_2 ||W_inf||_F )``.

    From ``H_t (W*_t - W_inf) = (b~_t - b~) - (H_t - H) W_inf``.

    Parameters
    ----------
    S_hat, B_hat : (d_k, d_k), (d_k, d_v)
        Normalised statistics after ``t`` batches (:func:`empirical_moments`).
    a_t, b_t : float >= 0
        ``alpha_t / t`` and ``beta_t / t``.
    Sigma_KK, Sigma_KV, a, b
        The limit moments and ratios.
    problem_or_W0
        ``W0`` and anchor, as in :func:`limit_weights`.
    W_t : (d_k, d_v), optional
        The minimiser at ``t`` (for example from the recursion); defaults to ``H_t^{-1} b~_t``.
    """
    anchor = _anchor(problem_or_W0, gram0, K0, V0)
    d_k, d_v = anchor.W0.shape
    S_t, B_t = _check_moments(S_hat, B_hat, d_k, d_v)
    S, B = _check_moments(Sigma_KK, Sigma_KV, d_k, d_v)
    H_t, rhs_t = _limit_system(S_t, B_t, anchor, check_weight(a_t, "a_t"), check_weight(b_t, "b_t"))
    H, rhs = _limit_system(S, B, anchor, check_weight(a, "a"), check_weight(b, "b"))
    W_inf = _spd_solve(H, rhs, "H is not positive definite (A3 fails)")
    if W_t is None:
        W_t = _spd_solve(H_t, rhs_t, "H_t is not positive definite")
    else:
        W_t = as_matrix(W_t, "W_t", shape=(d_k, d_v))
    lam = float(np.linalg.eigvalsh(H_t)[0])
    inv_norm = 1.0 / lam if lam > 0 else math.inf
    rhs_bound = inv_norm * (
        float(np.linalg.norm(rhs_t - rhs))
        + float(np.linalg.norm(H_t - H, 2)) * float(np.linalg.norm(W_inf))
    )
    return Bound(
        float(np.linalg.norm(W_t - W_inf)),
        rhs_bound,
        "T7 ||W*_t - W_inf|| <= ||H_t^-1|| (||b~_t - b~|| + ||H_t - H|| ||W_inf||)",
    )


def t7_pointwise_bound(
    W: np.ndarray,
    S_hat: np.ndarray,
    B_hat: np.ndarray,
    s_hat: float,
    a_t: float,
    b_t: float,
    Sigma_KK: np.ndarray,
    Sigma_KV: np.ndarray,
    s_VV: float,
    problem_or_W0,
    a: float,
    b: float,
    *,
    gram0: np.ndarray | None = None,
    K0: np.ndarray | None = None,
    V0: np.ndarray | None = None,
) -> Bound:
    """T7(i) quantitative pointwise convergence at a fixed ``W (d_k, d_v)``:

    ``|Jbar_t(W) - Jbar_inf(W)| <= ||S_hat_t - Sigma_KK||_2 ||W||^2 + 2 ||B_hat_t - Sigma_KV|| ||W||
    + |s_hat_t - s_VV| + |a_t - a| ||W - W0||^2 + |b_t - b| ||K0 W - V0||^2``,

    where ``Jbar_t = J_t / t`` (with ``a_t = alpha_t/t``, ``b_t = beta_t/t``) and ``Jbar_inf`` is
    its limit with ``(Sigma_KK, Sigma_KV, s_VV, a, b)``.
    """
    anchor = _anchor(problem_or_W0, gram0, K0, V0)
    d_k, d_v = anchor.W0.shape
    W = as_matrix(W, "W", shape=(d_k, d_v))
    S_t, B_t = _check_moments(S_hat, B_hat, d_k, d_v)
    S, B = _check_moments(Sigma_KK, Sigma_KV, d_k, d_v)
    prox = float(np.sum((W - anchor.W0) ** 2))
    anch = _preservation_from_anchor(W, anchor, 0.0, 1.0)
    J_t = misfit(W, S_t, B_t, s_hat) + a_t * prox + b_t * anch
    J_inf = misfit(W, S, B, s_VV) + a * prox + b * anch
    w2 = float(np.sum(W**2))
    rhs = (
        float(np.linalg.norm(S_t - S, 2)) * w2
        + 2 * float(np.linalg.norm(B_t - B)) * math.sqrt(w2)
        + abs(s_hat - s_VV)
        + abs(a_t - a) * prox
        + abs(b_t - b) * anch
    )
    return Bound(abs(J_t - J_inf), rhs, "T7i |Jbar_t(W) - Jbar_inf(W)| <= ...")


# ----------------------------------------------------------------------------------------------
# T6: limits in the regularisation weights at fixed t


def hard_write_limit(
    problem: Problem, edits: Sequence, *, rcond: float | None = None
) -> np.ndarray:
    """T6(b): the hard-write limit ``W^HW`` of ``W*_t`` as ``(alpha, beta) = s (a, b)``, ``s -> 0``.

    ``W^HW = argmin { ||W - W*_0||_{A_1} : W in argmin_W sum_i ||K_i W - V_i||^2 }`` with
    ``A_1 = a I + b K0^T K0`` taken from ``problem`` (``a = problem.alpha``, ``b = problem.beta``;
    ``W*_0`` does not depend on ``s``). In the whitened coordinates ``Z = L^T (W - W*_0)``,
    ``A_1 = L L^T``, ``M = K L^{-T}``: ``Z = M^+ R0``. With ``K`` of full row rank this is
    ``W*_0 + A_1^{-1} K^T (K A_1^{-1} K^T)^{-1} R0``. The distance ``||W*_t(s) - W^HW||`` is
    ``O(s)``.

    Parameters
    ----------
    problem : Problem
        Supplies ``W0``, the anchor and the direction ``A_1`` (``problem.metric``).
    edits : sequence of (K_i, V_i)
    rcond : float, optional
        Relative singular-value cut-off of the pseudo-inverse (numpy's default if None).

    Returns
    -------
    W_hw : (d_k, d_v)
    """
    if not isinstance(problem, Problem):
        raise TypeError(f"problem must be a Problem; got {type(problem).__name__}")
    K, V = stack_edits(problem, edits)
    W_star0 = problem.W_star0
    if K.shape[0] == 0:
        return W_star0
    R0 = V - K @ W_star0  # (n, d_v)
    L = scipy.linalg.cholesky(problem.metric, lower=True)  # A_1 = L L^T
    M = scipy.linalg.solve_triangular(L, K.T, lower=True).T  # K L^{-T} (n, d_k)
    Z = np.linalg.lstsq(M, R0, rcond=rcond)[0]  # minimum-norm least squares (d_k, d_v)
    return W_star0 + scipy.linalg.solve_triangular(L, Z, lower=True, trans="T")


def null_space_limit(problem: Problem, edits: Sequence, *, rtol: float = 1e-10) -> np.ndarray:
    """T6(c): the rigid-preservation limit of ``W*_t`` as ``beta -> inf`` with ``alpha`` fixed.

    The penalty limit minimises ``sum_i ||K_i W - V_i||^2 + alpha ||W - W0||^2`` over the
    minimisers of the anchor misfit, ``{W : K0^T K0 W = K0^T V0} = W_p + Q Y`` with
    ``W_p = (K0^T K0)^+ K0^T V0`` and ``Q (d_k, m)`` an orthonormal basis of ``null(K0)``:

        Y = (Q^T K^T K Q + alpha I)^{-1} Q^T (K^T (V - K W_p) + alpha (W0 - W_p)),  W = W_p + Q Y.

    With ``V0 = K0 W0`` (the code's anchor) this equals ``W0 + Q Y*`` with
    ``Y* = (Q^T K^T K Q + alpha I)^{-1} Q^T K^T R0`` (theory T6c). With ``K0`` of full column rank
    (``m = 0``) the limit is ``W_p`` (``= W0``). The distance ``||W*_t(beta) - limit||`` is
    ``O(1/beta)``.

    Parameters
    ----------
    problem : Problem
        ``W0``, ``alpha`` and the anchor (``problem.beta`` is ignored).
    rtol : float
        Eigenvalues of ``K0^T K0`` at most ``rtol`` times the largest count as null directions.

    Raises
    ------
    NotPositiveDefiniteError
        If ``Q^T K^T K Q + alpha I`` is numerically singular. (For a valid :class:`Problem` this
        needs ``alpha = 0``, which requires a full-column-rank anchor, so ``m = 0``: defensive.)
    """
    if not isinstance(problem, Problem):
        raise TypeError(f"problem must be a Problem; got {type(problem).__name__}")
    K, V = stack_edits(problem, edits)
    evals, evecs = np.linalg.eigh(problem.gram0)  # ascending
    top = max(float(evals[-1]), 0.0)
    null = evals <= rtol * top if top > 0 else np.ones_like(evals, dtype=bool)
    Q = evecs[:, null]  # (d_k, m)
    keep = evecs[:, ~null]  # range of K0^T K0
    # W_p = (K0^T K0)^+ K0^T V0 in the eigenbasis of the range.
    W_p = keep @ ((keep.T @ problem.cross0) / evals[~null][:, None])  # (d_k, d_v)
    if Q.shape[1] == 0:
        return W_p
    KQ = K @ Q  # (n, m)
    M = KQ.T @ KQ + problem.alpha * np.eye(Q.shape[1])
    rhs = KQ.T @ (V - K @ W_p) + problem.alpha * (Q.T @ (problem.W0 - W_p))
    Y = _spd_solve((M + M.T) / 2, rhs, "Q^T K^T K Q + alpha I is singular: use alpha > 0")
    return W_p + Q @ Y
