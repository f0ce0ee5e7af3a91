"""Shared random instances for the theory tests: Hypothesis strategies and seeded generators.

Import from test modules in this package with ``from .conftest import ...``.

- :func:`problems_and_streams` draws ``(problem, edits)`` over the ranges of theory.md §2
  ("Test recipes"): ``d_k in [2, 16]``, ``d_v in [1, 6]``, ``u_t in [1, 5]`` (so ``u_t > d_k``
  happens for small ``d_k``; some batches are rank-deficient), ``T in [1, 60]``,
  ``alpha in [0, 10]`` (``alpha = 0`` only with a full-column-rank anchor), ``beta in [0, 10]``,
  key scales ``1e-2 .. 1e2``; anchors absent, Gram-only, explicit with ``V0 = K0 W0``, or explicit
  with ``V0 != K0 W0``. The condition number of every ``G_t`` is capped near ``1e8``.
- :func:`realisable_problems_and_streams` adds a ``W_true`` with ``V_i = K_i W_true``.
- :func:`random_problem` / :func:`random_stream` do the same from a ``numpy`` Generator for
  fixed-seed tests.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from rlsedit_theory import Problem

__all__ = [
    "ANCHORS",
    "COND_CAP",
    "THEORY_SETTINGS",
    "problems_and_streams",
    "realisable_problems_and_streams",
    "random_problem",
    "random_stream",
    "bound_slack",
    "condition_bound",
    "exact_steps",
]

ANCHORS = ("none", "gram", "explicit", "explicit_v0")
COND_CAP = 1e8

# Deterministic, fast property tests: no deadline (timings vary on shared CI machines), a fixed
# example sequence, and no example database written to the working directory.
THEORY_SETTINGS = settings(
    deadline=None,
    max_examples=60,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def bound_slack(R0_norm_sq: float) -> float:
    """Round-off slack for the bounds: ``1e-9 (||R0||^2 + 1)`` (theory.md test recipes)."""
    return 1e-9 * (R0_norm_sq + 1.0)


def condition_bound(problem: Problem, edits) -> float:
    """``lambda_max(G_T) / lambda_min(A)``: an upper bound on ``cond(G_t)`` for every ``t <= T``
    (the generators below cap it at :data:`COND_CAP`)."""
    K = np.vstack([K for K, _ in edits]) if edits else np.zeros((0, problem.d_k))
    G = problem.metric + K.T @ K
    return float(np.linalg.eigvalsh(G)[-1] / np.linalg.eigvalsh(problem.metric)[0])


def exact_steps(problem: Problem, edits):
    """The exact minimisers and states step by step, independently of the recursion.

    Yields ``(t, K_t, V_t, W_prev, W_new, C_prev, G_prev)`` with ``W = G^{-1} B`` and
    ``C = G^{-1}`` by Cholesky solves of the cumulative normal equations (``O(d_k^3)`` a step).
    """
    G = problem.metric.copy()
    Bm = problem.rhs0.copy()
    W, C = problem.W_star0, problem.solve_metric(np.eye(problem.d_k))
    for t, (K, V) in enumerate(edits, start=1):
        G_prev, C_prev, W_prev = G, C, W
        G = G + K.T @ K
        Bm = Bm + K.T @ V
        factor = scipy.linalg.cho_factor(G, lower=True)
        W = scipy.linalg.cho_solve(factor, Bm)
        C = scipy.linalg.cho_solve(factor, np.eye(problem.d_k))
        C = (C + C.T) / 2
        yield t, K, V, W_prev, W, C_prev, G_prev


# ----------------------------------------------------------------------------------------------
# Seeded generators


def _log_uniform(rng: np.random.Generator, low: float, high: float) -> float:
    return float(10 ** rng.uniform(np.log10(low), np.log10(high)))


def random_problem(
    rng: np.random.Generator,
    d_k: int,
    d_v: int,
    *,
    alpha: float,
    beta: float,
    anchor: str = "none",
    full_rank_anchor: bool = False,
    anchor_scale: float = 1.0,
) -> Problem:
    """A :class:`Problem` with ``W0 ~ N(0, 1)`` and the requested anchor kind.

    ``anchor`` is one of :data:`ANCHORS`. A full-rank anchor has ``n0 >= d_k + 2`` Gaussian rows
    (well conditioned), otherwise ``n0 in [1, d_k - 1]`` (a proper null space).
    """
    W0 = rng.standard_normal((d_k, d_v))
    if anchor == "none":
        return Problem(W0, alpha, beta)
    n0 = int(rng.integers(d_k + 2, 2 * d_k + 3)) if full_rank_anchor else int(rng.integers(1, d_k))
    K0 = anchor_scale * rng.standard_normal((n0, d_k))
    if anchor == "gram":
        return Problem(W0, alpha, beta, gram0=K0.T @ K0)
    if anchor == "explicit":
        return Problem(W0, alpha, beta, K0=K0)
    if anchor == "explicit_v0":
        V0 = K0 @ W0 + rng.standard_normal((n0, d_v)) * anchor_scale
        return Problem(W0, alpha, beta, K0=K0, V0=V0)
    raise ValueError(f"unknown anchor kind {anchor!r}")


def random_stream(
    rng: np.random.Generator,
    d_k: int,
    d_v: int,
    T: int,
    *,
    u_max: int = 5,
    key_scale: float = 1.0,
    value_scale: float = 1.0,
    rank_deficient: float = 0.25,
    subspace_dim: int | None = None,
    W_true: np.ndarray | None = None,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """``T`` batches with ``u_t`` uniform in ``[1, u_max]`` and Gaussian keys of size ``key_scale``
    (each batch jittered by a factor in ``[0.5, 2]``). With probability ``rank_deficient`` a batch
    with ``min(u_t, d_k) >= 2`` has rank ``< min(u_t, d_k)``. Values are ``value_scale * N(0, 1)``,
    or ``K_t W_true`` when ``W_true`` is given (a realisable stream). With ``subspace_dim`` all
    keys lie in one random subspace of that dimension (so ``G_t`` keeps ``lambda_min(A)`` as its
    smallest eigenvalue and its condition number is large).
    """
    basis = None
    if subspace_dim is not None:
        basis = np.linalg.qr(rng.standard_normal((d_k, subspace_dim)))[
            0
        ].T  # (r, d_k) orthonormal rows
    edits = []
    for _ in range(T):
        u = int(rng.integers(1, u_max + 1))
        scale = key_scale * 10 ** rng.uniform(-0.3, 0.3)
        full = min(u, d_k)
        if full >= 2 and rng.random() < rank_deficient:
            rank = int(rng.integers(1, full))
            K = rng.standard_normal((u, rank)) @ rng.standard_normal((rank, d_k)) / np.sqrt(rank)
        else:
            K = rng.standard_normal((u, d_k))
        if basis is not None:
            K = K[:, : basis.shape[0]] @ basis * np.sqrt(d_k / basis.shape[0])
        K = scale * K
        V = K @ W_true if W_true is not None else value_scale * rng.standard_normal((u, d_v))
        edits.append((K, V))
    return edits


def _cap_condition(problem: Problem, edits, cap: float = COND_CAP) -> Problem:
    """Raise ``alpha`` so that ``lambda_max(G_T) / lambda_min(A) <= cap``, bounding cond(G_t)."""
    K = np.vstack([K for K, _ in edits]) if edits else np.zeros((0, problem.d_k))
    top = np.linalg.eigvalsh(problem.metric)[-1] + (np.linalg.norm(K, 2) ** 2 if K.size else 0.0)
    floor = np.linalg.eigvalsh(problem.metric)[0]
    if top <= cap * floor:
        return problem
    alpha = problem.alpha + top / cap
    if problem.K0 is not None:
        return Problem(problem.W0, alpha, problem.beta, K0=problem.K0, V0=problem.V0)
    if problem.gram0.any():
        return Problem(problem.W0, alpha, problem.beta, gram0=problem.gram0)
    return Problem(problem.W0, alpha, problem.beta)


# ----------------------------------------------------------------------------------------------
# Hypothesis strategies


@st.composite
def _instance(draw, *, min_T: int, max_T: int, d_k_range, d_v_range, max_u: int, realisable: bool):
    # Structure is drawn by Hypothesis (so failures shrink to small sizes and simple anchors);
    # continuous scales come from a seeded Generator, log-uniform over their whole ranges
    # (Hypothesis floats would pile up on the interval ends).
    low, high = d_k_range
    small = (low, min(high, max(low, max_u - 1)))  # sizes where u_t > d_k is possible
    d_k = draw(st.one_of(st.integers(*small), st.integers(low, high)), label="d_k")
    d_v = draw(st.integers(*d_v_range), label="d_v")
    T = draw(st.integers(min_T, max_T), label="T")
    anchor = draw(st.sampled_from(ANCHORS), label="anchor")
    full_rank = anchor != "none" and draw(st.booleans(), label="full_rank_anchor")
    beta_zero = anchor != "none" and draw(
        st.booleans().map(lambda b: b and not full_rank), label="beta_zero"
    )
    alpha_zero = full_rank and draw(st.booleans(), label="alpha_zero")
    stress = draw(st.booleans(), label="extreme_scales")
    subspace = draw(st.booleans(), label="keys_in_subspace")
    seed = draw(st.integers(0, 2**32 - 1), label="seed")

    rng = np.random.default_rng(seed)
    beta = 0.0 if anchor == "none" or beta_zero else _log_uniform(rng, 1e-3, 10)
    alpha = 0.0 if alpha_zero else _log_uniform(rng, 1e-3, 1e-2 if stress else 10)
    key_scale = (10.0 ** rng.choice([-2, 2])) if stress else _log_uniform(rng, 1e-2, 1e2)
    value_scale = _log_uniform(rng, 1e-2, 1e2)
    anchor_scale = _log_uniform(rng, 1e-1, 1e1)
    problem = random_problem(
        rng,
        d_k,
        d_v,
        alpha=alpha,
        beta=beta,
        anchor=anchor,
        full_rank_anchor=full_rank,
        anchor_scale=anchor_scale,
    )
    W_true = value_scale * rng.standard_normal((d_k, d_v)) if realisable else None
    r = int(rng.integers(1, d_k)) if subspace else None
    edits = random_stream(
        rng,
        d_k,
        d_v,
        T,
        u_max=max_u,
        key_scale=key_scale,
        value_scale=value_scale * key_scale,
        subspace_dim=r,
        W_true=W_true,
    )
    problem = _cap_condition(problem, edits)
    return (problem, edits, W_true) if realisable else (problem, edits)


def problems_and_streams(
    *, min_T: int = 1, max_T: int = 60, d_k=(2, 16), d_v=(1, 6), max_u: int = 5
):
    """Strategy of ``(problem, edits)``; see the module docstring for the ranges."""
    return _instance(
        min_T=min_T, max_T=max_T, d_k_range=d_k, d_v_range=d_v, max_u=max_u, realisable=False
    )


def realisable_problems_and_streams(
    *, min_T: int = 1, max_T: int = 60, d_k=(2, 16), d_v=(1, 6), max_u: int = 5
):
    """Strategy of ``(problem, edits, W_true)`` with ``V_i = K_i W_true`` for every batch."""
    return _instance(
        min_T=min_T, max_T=max_T, d_k_range=d_k, d_v_range=d_v, max_u=max_u, realisable=True
    )
