"""T6: limits of the minimiser in the regularisation weights at fixed t (and T2's shrink factor).

- (a) full preservation: ``lambda_min(A) -> inf`` gives ``W*_t -> W*_0`` (a bound: "bounds" test);
- (b) hard-write limit: ``(alpha, beta) = s (a, b)``, ``s -> 0``, error ``O(s)``;
- (c) rigid-preservation (null-space) limit: ``beta -> inf``, error ``O(1/beta)``.

Fixed seeds; float64; ``s >= 1e-4`` and ``beta <= 1e6`` as theory.md recommends.
"""

from __future__ import annotations

import numpy as np
import pytest

from rlsedit_theory import HardWrite, Problem, RecursiveLS, closed_form
from rlsedit_theory import bounds as B
from rlsedit_theory.asymptotics import hard_write_limit, null_space_limit

D_K, D_V = 6, 3


def _anchor(rng, kind: str, n0: int, W0):
    """Keyword arguments of :class:`Problem` for an anchor of the given kind."""
    K0 = rng.standard_normal((n0, D_K))
    if kind == "explicit":
        return {"K0": K0}
    if kind == "explicit_v0":
        return {"K0": K0, "V0": K0 @ W0 + rng.standard_normal((n0, D_V))}
    if kind == "gram":
        return {"gram0": K0.T @ K0}
    return {}


def _assert_linear_rate(distances, factor_per_step: float):
    """``distances`` fall by ``factor_per_step`` (10 per decade) at each step, within 30%."""
    distances = np.asarray(distances)
    assert np.all(distances > 0)
    ratios = distances[:-1] / distances[1:]
    assert np.all(ratios > 0.7 * factor_per_step) and np.all(ratios < 1.3 * factor_per_step), ratios
    scaled = distances * factor_per_step ** np.arange(len(distances))  # roughly constant
    assert scaled.max() / scaled.min() < 1.5, scaled


@pytest.mark.parametrize("anchor", ["none", "gram", "explicit_v0"])
def test_t6a_full_preservation_rate_bounds(anchor):
    rng = np.random.default_rng(10)
    W0 = rng.standard_normal((D_K, D_V))
    kw = _anchor(rng, anchor, 3, W0)
    edits = [(rng.standard_normal((2, D_K)), rng.standard_normal((2, D_V))) for _ in range(4)]
    a, b = 0.7, (0.3 if kw else 0.0)
    deviations = []
    for s in 10.0 ** np.arange(0, 7):
        problem = Problem(W0, s * a, s * b, **kw)
        W_t = closed_form(problem, edits)
        bound = B.t3a_deviation_bound(problem, edits, W_t)  # ||R0|| / (2 sqrt(lambda_min(A)))
        assert bound.holds(1e-12, rtol=1e-9), bound
        deviations.append(bound.lhs)
    # W*_t -> W*_0: the bound decays like s^{-1/2}; the deviation itself like 1/s.
    _assert_linear_rate(deviations[2:], 10.0)


@pytest.mark.parametrize("anchor", ["none", "gram", "explicit_v0"])
@pytest.mark.parametrize("keys", ["full_row_rank", "rank_deficient", "overdetermined"])
def test_t6b_hard_write_limit(anchor, keys):
    rng = np.random.default_rng(20)
    W0 = rng.standard_normal((D_K, D_V))
    kw = _anchor(rng, anchor, 3, W0)
    n = {"full_row_rank": 4, "rank_deficient": 5, "overdetermined": 10}[keys]
    K = rng.standard_normal((n, D_K))
    if keys == "rank_deficient":  # 5 keys in a 2-dimensional subspace: inconsistent demands
        K = rng.standard_normal((n, 2)) @ rng.standard_normal((2, D_K))
    V = rng.standard_normal((n, D_V))
    edits = [(K[:2], V[:2]), (K[2:], V[2:])]
    a, b = 0.7, (0.3 if kw else 0.0)
    direction = Problem(W0, a, b, **kw)  # A_1 = a I + b K0^T K0
    W_hw = hard_write_limit(direction, edits)

    if keys == "full_row_rank":
        # The exact minimum-A_1-change write: K W = V, the same as the HardWrite editor's one
        # write of the stacked batch.
        np.testing.assert_allclose(K @ W_hw, V, atol=1e-10)
        editor = HardWrite(direction)
        editor.update(K, V)
        np.testing.assert_allclose(editor.W_, W_hw, atol=1e-10)
    else:
        # A least-squares solution: the normal equations of the edits hold.
        np.testing.assert_allclose(K.T @ (K @ W_hw - V), 0, atol=1e-9)

    distances = [
        np.linalg.norm(closed_form(Problem(W0, s * a, s * b, **kw), edits) - W_hw)
        for s in 10.0 ** np.arange(-1, -5, -1)  # 1e-1 .. 1e-4
    ]
    _assert_linear_rate(distances, 10.0)  # error O(s)


@pytest.mark.parametrize("anchor", ["explicit", "gram", "explicit_v0"])
@pytest.mark.parametrize("full_column_rank", [False, True])
def test_t6c_null_space_limit(anchor, full_column_rank):
    rng = np.random.default_rng(30)
    W0 = rng.standard_normal((D_K, D_V))
    kw = _anchor(rng, anchor, 9 if full_column_rank else 3, W0)
    edits = [(rng.standard_normal((3, D_K)), rng.standard_normal((3, D_V))) for _ in range(2)]
    alpha = 0.5
    W_lim = null_space_limit(Problem(W0, alpha, 1.0, **kw), edits)

    problem = Problem(W0, alpha, 1.0, **kw)
    K, V = np.vstack([k for k, _ in edits]), np.vstack([v for _, v in edits])
    if anchor == "explicit_v0":
        # The limit minimises the anchor misfit exactly: K0^T (K0 W - V0) = 0.
        np.testing.assert_allclose(problem.K0.T @ (problem.K0 @ W_lim - problem.V0), 0, atol=1e-9)
    elif full_column_rank:
        np.testing.assert_allclose(W_lim, W0, atol=1e-12)  # null(K0) = {0}: no edit at all
    else:
        # The theory's form W0 + Q Y*, Y* = (Q^T K^T K Q + alpha I)^{-1} Q^T K^T R0.
        evals, evecs = np.linalg.eigh(problem.gram0)
        Q = evecs[:, evals <= 1e-10 * evals[-1]]
        assert Q.shape[1] == D_K - 3
        KQ = K @ Q
        Y = np.linalg.solve(KQ.T @ KQ + alpha * np.eye(Q.shape[1]), KQ.T @ (V - K @ W0))
        np.testing.assert_allclose(W_lim, W0 + Q @ Y, atol=1e-10)
        assert np.linalg.norm(W_lim - W0) > 0.1  # the edit does happen, inside null(K0)

    distances = [
        np.linalg.norm(closed_form(Problem(W0, alpha, beta, **kw), edits) - W_lim)
        for beta in 10.0 ** np.arange(3, 7)  # 1e3 .. 1e6
    ]
    _assert_linear_rate(distances, 10.0)  # error O(1/beta)


def test_t2_shrink_factor_vanishes_as_regularisers_vanish():
    """T2: the post-write residual factor ``1/(1 + lambda_min(K C K^T))`` is O(s) when
    ``(alpha, beta) = s (a, b) -> 0`` for keys in fresh directions, at t = 1 and at t = 2."""
    rng = np.random.default_rng(40)
    W0 = rng.standard_normal((D_K, D_V))
    K0 = rng.standard_normal((3, D_K))
    K1, K2 = rng.standard_normal((2, D_K)), rng.standard_normal((3, D_K))  # 2 + 3 <= d_k
    V1, V2 = rng.standard_normal((2, D_V)), rng.standard_normal((3, D_V))
    factors = {1: [], 2: []}
    residuals = []
    for s in 10.0 ** np.arange(0, -5, -1):
        rls = RecursiveLS(Problem(W0, 0.7 * s, 0.3 * s, K0=K0))
        factors[1].append(B.t2_shrink_factor(K1, rls.C_))
        rls.update(K1, V1)
        factors[2].append(B.t2_shrink_factor(K2, rls.C_))
        W_prev = rls.W_.copy()
        rls.update(K2, V2)
        residuals.append(np.linalg.norm(V2 - K2 @ rls.W_) / np.linalg.norm(V2 - K2 @ W_prev))
    for t in (1, 2):
        assert factors[t][-1] < 1e-3
        _assert_linear_rate(factors[t][1:], 10.0)
    assert residuals[-1] < 1e-3  # the write becomes exact: the hard-write limit
    # With the regularisers fixed, keys that repeat are absorbed less and less (C4's direction).
    rls = RecursiveLS(Problem(W0, 0.7, 0.3, K0=K0))
    before = B.t2_shrink_factor(K1, rls.C_)
    for _ in range(20):
        rls.update(K1, V1)
    assert B.t2_shrink_factor(K1, rls.C_) > before
