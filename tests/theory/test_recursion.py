"""T1: the Woodbury recursion reproduces the closed-form minimiser of ``J_t`` for every ``t``.

Property tests over random float64 instances, including batches with more rows than ``d_k``,
rank-deficient batches, ``alpha = 0`` with a full-column-rank anchor, explicit anchors with
``V0 != K0 W0``, and Gram-only anchors. Tolerances are relative and scale with the conditioning
of the steps (``cond_bound``; the error analysis is in proofs/T1_recursion.md, "numerical
behaviour"); the constant ``1e-10`` leaves a margin of about 1e6 over ``eps``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import pytest
import scipy.linalg
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from rlsedit_theory import (
    DenseCumulative,
    NotPositiveDefiniteError,
    PerBatchReset,
    Problem,
    RecursiveLS,
    ShapeError,
    closed_form,
    gradient,
    information_matrix,
    normal_rhs,
    objective,
    woodbury_downdate,
    woodbury_update,
)

SETTINGS = settings(
    deadline=None,
    max_examples=60,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
COND_CAP = 1e8
REL = 1e-10  # tolerance constant in front of cond(.)

ANCHORS = ("none", "gram", "explicit_consistent", "explicit_general")


@dataclass
class Case:
    problem: Problem
    batches: list  # [(K_i (u_i, d_k), V_i (u_i, d_v))]
    label: str


def _batch_keys(rng, u: int, d_k: int, scale: float, rank_deficient: bool) -> np.ndarray:
    if rank_deficient:
        r = max(1, min(u, d_k) - 1 - int(rng.integers(0, 2)))  # rank < min(u, d_k) when possible
        return scale * rng.standard_normal((u, r)) @ rng.standard_normal((r, d_k)) / np.sqrt(r)
    return scale * rng.standard_normal((u, d_k))


@st.composite
def cases(draw, *, max_T: int = 10, min_T: int = 1):
    """Problem + stream. Dimensions and switches are drawn by Hypothesis, the entries by a
    seeded NumPy generator."""
    d_k = draw(st.integers(2, 10))
    d_v = draw(st.integers(1, 5))
    T = draw(st.integers(min_T, max_T))
    sizes = draw(st.lists(st.integers(1, d_k + 3), min_size=T, max_size=T))  # u > d_k allowed
    deficient = draw(st.lists(st.booleans(), min_size=T, max_size=T))
    anchor = draw(st.sampled_from(ANCHORS))
    alpha_zero = anchor != "none" and draw(st.booleans())
    log_alpha = draw(st.floats(-2, 1))
    log_beta = draw(st.floats(-2, 1))
    log_key = draw(st.floats(-2, 2))  # key scale 1e-2 .. 1e2
    seed = draw(st.integers(0, 2**32 - 1))

    rng = np.random.default_rng(seed)
    W0 = rng.standard_normal((d_k, d_v))
    alpha = 0.0 if alpha_zero else 10.0**log_alpha
    beta = 10.0**log_beta if anchor != "none" else draw(st.sampled_from([0.0, 1.0]))
    n0 = d_k + int(rng.integers(1, 4)) if alpha_zero else int(rng.integers(1, 2 * d_k + 1))
    K0 = rng.standard_normal((n0, d_k))
    if anchor == "none":
        problem = Problem(W0, alpha, beta)
    elif anchor == "gram":
        problem = Problem(W0, alpha, beta, gram0=K0.T @ K0)
    elif anchor == "explicit_consistent":
        problem = Problem(W0, alpha, beta, K0=K0)
    else:
        problem = Problem(W0, alpha, beta, K0=K0, V0=rng.standard_normal((n0, d_v)))

    key_scale = 10.0**log_key
    batches = []
    for u, low_rank in zip(sizes, deficient, strict=True):
        scale = key_scale * 10.0 ** rng.uniform(-0.5, 0.5)
        K = _batch_keys(rng, u, d_k, scale, low_rank)
        V = rng.standard_normal((u, d_v)) * max(1.0, scale)
        batches.append((K, V))
    G = information_matrix(problem, batches)
    assume(np.linalg.cond(G) < COND_CAP and np.linalg.cond(problem.metric) < COND_CAP)
    label = f"d_k={d_k} d_v={d_v} T={T} anchor={anchor} alpha={alpha:.3g} beta={beta:.3g}"
    return Case(problem, batches, label)


def rel_err(a, b) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def cond_bound(problem: Problem, batches) -> float:
    """The conditioning that governs the recursion's round-off (proofs/T1_recursion.md):
    ``max_i ||C_{i-1}|| ||G_i|| = lambda_max(G_i) / lambda_min(G_{i-1})`` over the steps, with
    ``G_0 = A``. It is at least ``cond(G_i)`` for every ``i``; it is larger when one batch raises
    the information by a large factor, because ``C_i = C_{i-1} - F S^{-1} F^T`` then cancels."""
    G_prev = problem.metric
    worst = np.linalg.cond(G_prev)
    for i in range(len(batches)):
        G = information_matrix(problem, batches[: i + 1])
        worst = max(worst, np.linalg.eigvalsh(G)[-1] / np.linalg.eigvalsh(G_prev)[0])
        G_prev = G
    return float(worst)


def downdate_condition(C: np.ndarray, K: np.ndarray) -> float:
    """How many digits removing ``K`` from the state ``C`` can lose: ``I - K C K^T`` is formed
    with absolute error ~ ``eps ||K||^2 ||C||`` and then inverted (proofs/T1_recursion.md)."""
    S_minus = np.eye(K.shape[0]) - K @ C @ K.T
    return float(np.linalg.norm(K, 2) ** 2 * np.linalg.norm(C, 2) / np.linalg.eigvalsh(S_minus)[0])


def run(problem, batches) -> RecursiveLS:
    rls = RecursiveLS(problem)
    for K, V in batches:
        rls.update(K, V)
    return rls


# ---------------------------------------------------------------------------------------------
# The recursion equals the closed form, at every step.
# ---------------------------------------------------------------------------------------------


@SETTINGS
@given(cases())
def test_recursion_equals_closed_form_at_every_step(case):
    rls = RecursiveLS(case.problem)
    assert rel_err(rls.W_, closed_form(case.problem, [])) < 1e-12
    for t, (K, V) in enumerate(case.batches, start=1):
        W_rec = rls.update(K, V)
        prefix = case.batches[:t]
        W_cf = closed_form(case.problem, prefix)
        tol = REL * cond_bound(case.problem, prefix)
        assert rel_err(W_rec, W_cf) <= tol, (case.label, t)
    assert rls.n_updates_ == len(case.batches)
    assert rls.n_rows_ == sum(K.shape[0] for K, _ in case.batches)


@SETTINGS
@given(cases())
def test_carried_inverse_matches_information(case):
    rls = run(case.problem, case.batches)
    G = information_matrix(case.problem, case.batches)
    cond = cond_bound(case.problem, case.batches)
    d_k = case.problem.d_k
    # ||C_t G_t - I|| against the information rebuilt from scratch (not the carried G_)
    assert np.linalg.norm(rls.C_ @ G - np.eye(d_k)) <= REL * cond * np.sqrt(d_k), case.label
    # and against a solve: C_t vs G_t^{-1} e_j, relative
    assert rel_err(rls.C_, scipy.linalg.solve(G, np.eye(d_k), assume_a="pos")) <= REL * cond
    assert rls.drift() <= REL * cond * np.sqrt(d_k)


@SETTINGS
@given(cases())
def test_carried_inverse_is_symmetric_positive_definite(case):
    rls = run(case.problem, case.batches)
    assert np.array_equal(rls.C_, rls.C_.T)
    np.linalg.cholesky(rls.C_)  # raises LinAlgError if not positive definite
    assert np.all(np.linalg.eigvalsh(rls.C_) > 0)


@SETTINGS
@given(cases())
def test_gradient_vanishes_at_recursive_solution(case):
    rls = run(case.problem, case.batches)
    G = information_matrix(case.problem, case.batches)
    B = normal_rhs(case.problem, case.batches)
    grad = gradient(case.problem, case.batches, rls.W_)
    scale = np.linalg.norm(G, 2) * np.linalg.norm(rls.W_) + np.linalg.norm(B)
    assert np.linalg.norm(grad) <= 2 * REL * cond_bound(case.problem, case.batches) * scale


@SETTINGS
@given(cases(), st.integers(0, 2**32 - 1), st.floats(-3, 1))
def test_recursive_solution_minimises_objective(case, seed, log_size):
    """``J(W* + E) - J(W*) = ||E||_{G}^2 >= 0``: the first-order term vanishes."""
    rls = run(case.problem, case.batches)
    G = information_matrix(case.problem, case.batches)
    rng = np.random.default_rng(seed)
    E = rng.standard_normal(rls.W_.shape)
    E *= 10.0**log_size * np.linalg.norm(rls.W_) / np.linalg.norm(E)
    J_star = objective(case.problem, case.batches, rls.W_)
    J_pert = objective(case.problem, case.batches, rls.W_ + E)
    curvature = float(np.sum(E * (G @ E)))  # ||E||_G^2 > 0
    assert J_pert >= J_star
    slack = 1e-8 * (abs(J_star) + curvature) + REL * cond_bound(case.problem, case.batches) * abs(J_star)
    assert abs((J_pert - J_star) - curvature) <= slack


# ---------------------------------------------------------------------------------------------
# Batch boundaries, downdates, state handling.
# ---------------------------------------------------------------------------------------------


@SETTINGS
@given(cases(), st.integers(0, 2**32 - 1))
def test_result_does_not_depend_on_batch_boundaries(case, seed):
    K_all = np.vstack([K for K, _ in case.batches])
    V_all = np.vstack([V for _, V in case.batches])
    n = K_all.shape[0]
    rng = np.random.default_rng(seed)
    cuts = np.sort(rng.choice(np.arange(1, n), size=rng.integers(0, n), replace=False)) if n > 1 else []
    rechunked = [(K_all[a:b], V_all[a:b]) for a, b in itertools.pairwise([0, *cuts, n])]
    assert sum(K.shape[0] for K, _ in rechunked) == n
    a = run(case.problem, case.batches)
    b = run(case.problem, rechunked)
    tol = REL * max(cond_bound(case.problem, case.batches), cond_bound(case.problem, rechunked))
    assert rel_err(b.W_, a.W_) <= tol
    assert rel_err(b.C_, a.C_) <= tol
    assert b.n_rows_ == a.n_rows_ == n


@SETTINGS
@given(cases(min_T=2), st.integers(0, 2**32 - 1))
def test_downdate_removes_an_earlier_batch_exactly(case, seed):
    j = int(np.random.default_rng(seed).integers(0, len(case.batches)))
    rls = run(case.problem, case.batches)
    K, V = case.batches[j]
    kappa = downdate_condition(rls.C_, K)
    rls.downdate(K, V)
    rest = case.batches[:j] + case.batches[j + 1 :]
    tol = REL * max(cond_bound(case.problem, case.batches), cond_bound(case.problem, rest), kappa)
    assert rel_err(rls.W_, closed_form(case.problem, rest)) <= tol
    G_rest = information_matrix(case.problem, rest)
    assert np.linalg.norm(rls.C_ @ G_rest - np.eye(case.problem.d_k)) <= tol * np.sqrt(case.problem.d_k)
    assert rls.n_updates_ == len(case.batches) - 1
    assert rls.n_rows_ == sum(Kb.shape[0] for Kb, _ in rest)


@SETTINGS
@given(cases())
def test_downdate_then_update_round_trip(case):
    """Removing the last batch returns the previous state; adding it back restores the state."""
    rls = run(case.problem, case.batches)
    before = rls.copy()
    K, V = case.batches[-1]
    tol = REL * max(cond_bound(case.problem, case.batches), downdate_condition(rls.C_, K))
    rls.downdate(K, V)
    assert rel_err(rls.W_, closed_form(case.problem, case.batches[:-1])) <= tol
    rls.update(K, V)
    assert rls.allclose(before, rtol=tol)


@SETTINGS
@given(cases(), st.integers(0, 2**32 - 1))
def test_downdate_of_never_added_batch_raises_and_leaves_state(case, seed):
    rls = run(case.problem, case.batches)
    snapshot = rls.copy()
    counts = (rls.n_updates_, rls.n_rows_)
    G_before = rls.G_.copy()
    rng = np.random.default_rng(seed)
    k = rng.standard_normal(case.problem.d_k)
    k *= 2.0 / np.sqrt(k @ rls.C_ @ k)  # k C k^T = 4 > 1: I - k C k^T < 0, impossible for data
    with pytest.raises(NotPositiveDefiniteError, match="never added"):
        rls.downdate(k[None, :], rng.standard_normal((1, case.problem.d_v)))
    assert np.array_equal(rls.W_, snapshot.W_) and np.array_equal(rls.C_, snapshot.C_)
    assert np.array_equal(rls.G_, G_before) and (rls.n_updates_, rls.n_rows_) == counts


def test_downdate_more_rows_than_held_raises_shape_error():
    problem = Problem(np.ones((3, 2)), 1.0, 0.0)
    rls = RecursiveLS(problem)
    rls.update(np.eye(3)[:1], np.zeros((1, 2)))
    C, W = rls.C_.copy(), rls.W_.copy()
    with pytest.raises(ShapeError, match="holds 1"):
        rls.downdate(np.eye(3)[:2], np.zeros((2, 2)))
    assert np.array_equal(rls.C_, C) and np.array_equal(rls.W_, W) and rls.n_rows_ == 1


@SETTINGS
@given(cases())
def test_pure_functions_do_not_modify_inputs_and_match_the_estimator(case):
    p = case.problem
    C = p.solve_metric(np.eye(p.d_k))
    C = (C + C.T) / 2
    W = p.W_star0
    rls = RecursiveLS(p)
    for K, V in case.batches:
        C_in, W_in, K_in, V_in = C.copy(), W.copy(), K.copy(), V.copy()
        C_new, W_new, info = woodbury_update(C, W, K, V)
        assert np.array_equal(C, C_in) and np.array_equal(W, W_in)
        assert np.array_equal(K, K_in) and np.array_equal(V, V_in)
        rls.update(K, V)
        np.testing.assert_array_equal(W_new, rls.W_)
        np.testing.assert_array_equal(C_new, rls.C_)
        # the step info: innovation at the old weights, gain = C_t K^T
        np.testing.assert_allclose(info.innovation, V - K @ W, rtol=0, atol=1e-12 * max(1, np.abs(V).max()))
        tol = REL * cond_bound(p, case.batches)
        assert rel_err(info.gain, C_new @ K.T) <= tol
        # the pure downdate undoes the pure update (to the downdate's own conditioning)
        C_back, W_back, _ = woodbury_downdate(C_new, W_new, K, V)
        tol_back = REL * max(cond_bound(p, case.batches), downdate_condition(C_new, K))
        assert rel_err(C_back, C) <= tol_back and rel_err(W_back, W) <= tol_back
        C, W = C_new, W_new


@SETTINGS
@given(cases())
def test_partial_fit_copy_and_allclose(case):
    a = RecursiveLS(case.problem)
    b = RecursiveLS(case.problem)
    for K, V in case.batches:
        assert a.partial_fit(K, V) is a
        b.update(K, V)
    np.testing.assert_array_equal(a.W_, b.W_)
    assert a.allclose(b, rtol=0.0)
    c = a.copy()
    assert c is not a and c.allclose(a, rtol=0.0)
    assert c.n_updates_ == a.n_updates_ and c.n_rows_ == a.n_rows_
    # the copy is deep: changing it leaves the original alone
    K, V = case.batches[0]
    W_before = a.W_.copy()
    c.update(10 * K, V + 1.0)
    np.testing.assert_array_equal(a.W_, W_before)
    assert not c.allclose(a)
    assert a.n_updates_ == len(case.batches)


def test_allclose_detects_a_difference_in_C_alone():
    problem = Problem(np.zeros((2, 1)), 1.0, 0.0)
    a, b = RecursiveLS(problem), RecursiveLS(problem)
    # a key whose value equals its prediction changes C but not W
    a.update(np.array([[1.0, 0.0]]), np.zeros((1, 1)))
    np.testing.assert_array_equal(a.W_, b.W_)
    assert not a.allclose(b)


def test_reset_returns_to_the_start():
    rng = np.random.default_rng(0)
    problem = Problem(rng.standard_normal((4, 2)), 0.5, 2.0, K0=rng.standard_normal((6, 4)))
    rls = RecursiveLS(problem)
    fresh = RecursiveLS(problem)
    rls.update(rng.standard_normal((3, 4)), rng.standard_normal((3, 2)))
    rls.reset()
    assert rls.allclose(fresh, rtol=0.0) and rls.n_updates_ == 0 and rls.n_rows_ == 0
    np.testing.assert_allclose(rls.C_ @ problem.metric, np.eye(4), atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Reference editors that must agree with RLSEdit.
# ---------------------------------------------------------------------------------------------


@SETTINGS
@given(cases())
def test_dense_cumulative_equals_recursion_at_every_step(case):
    dense = DenseCumulative(case.problem)
    rls = RecursiveLS(case.problem)
    for t, (K, V) in enumerate(case.batches, start=1):
        tol = REL * cond_bound(case.problem, case.batches[:t])
        assert rel_err(dense.update(K, V), rls.update(K, V)) <= tol


@SETTINGS
@given(cases(max_T=1))
def test_per_batch_reset_equals_recursion_for_one_batch(case):
    (K, V), = case.batches
    tol = REL * cond_bound(case.problem, case.batches)
    assert rel_err(PerBatchReset(case.problem).update(K, V), RecursiveLS(case.problem).update(K, V)) <= tol


def test_per_batch_reset_differs_from_recursion_when_batches_overlap():
    """Control: with two batches on the same key, the reset editor forgets the first one."""
    problem = Problem(np.zeros((2, 1)), 1.0, 0.0)
    k = np.array([[1.0, 0.0]])
    reset, rls = PerBatchReset(problem), RecursiveLS(problem)
    for editor in (reset, rls):
        editor.update(k, np.array([[1.0]]))
        editor.update(k, np.array([[-1.0]]))
    # closed form: (1 + 2) w = 1 - 1 -> 0; reset: w = 0.5 then 0.5 + (-1.5)/2 = -0.25
    np.testing.assert_allclose(rls.W_, [[0.0], [0.0]], atol=1e-15)
    np.testing.assert_allclose(reset.W_, [[-0.25], [0.0]], atol=1e-15)


def test_sherman_morrison_scalar_example():
    """u = 1, d_k = d_v = 1 by hand: G = a + k^2, W = (a w0 + k v) / (a + k^2)."""
    a, k, v, w0 = 2.0, 3.0, 5.0, 7.0
    rls = RecursiveLS(Problem(np.array([[w0]]), a, 0.0))
    rls.update(np.array([[k]]), np.array([[v]]))
    assert rls.W_[0, 0] == pytest.approx((a * w0 + k * v) / (a + k**2), rel=1e-15)
    assert rls.C_[0, 0] == pytest.approx(1 / (a + k**2), rel=1e-15)


@pytest.mark.parametrize("d_k", [64, 255, 300])
@pytest.mark.parametrize("u", [1, 3, 17])
def test_update_and_downdate_keep_C_exactly_symmetric_at_larger_sizes(d_k, u):
    """The rank-u update goes through BLAS, which may round (i, j) and (j, i) differently for
    u > 1 at these sizes; the implementation must still return an exactly symmetric C."""
    rng = np.random.default_rng(d_k * 100 + u)
    X = rng.standard_normal((d_k, d_k))
    C = np.linalg.inv(X @ X.T / d_k + np.eye(d_k))
    C = (C + C.T) / 2
    W = rng.standard_normal((d_k, 3))
    K, V = rng.standard_normal((u, d_k)), rng.standard_normal((u, 3))
    C_new, W_new, info = woodbury_update(C, W, K, V)
    assert np.array_equal(C_new, C_new.T)
    G_new = np.linalg.inv(C) + K.T @ K
    assert np.linalg.norm(C_new @ G_new - np.eye(d_k)) < 1e-10
    C_back, W_back, _ = woodbury_downdate(C_new, W_new, K, V)
    assert np.array_equal(C_back, C_back.T)
    assert rel_err(C_back, C) < 1e-10 and rel_err(W_back, W) < 1e-10
