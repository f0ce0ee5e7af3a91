"""The inequalities of theory T2-T5 on random instances, and cases where they are attained.

Every test here checks an inequality (``pytest -k bounds`` selects this whole module). Exact
identities that the bounds rest on are checked alongside, to a relative tolerance
``1e-9 * cond``, where ``cond`` is an upper bound on the condition number of every ``G_t``.

The states are the exact minimisers (:func:`conftest.exact_steps`, Cholesky solves of the normal
equations); the T2 test also runs the bounds on the recursion's own states, as the LLM layer's
certificates do.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given

from rlsedit_theory import (
    HardWrite,
    NullSpaceProjection,
    PerBatchReset,
    Problem,
    RecursiveLS,
    closed_form,
    objective,
)
from rlsedit_theory import bounds as B

from .conftest import (
    THEORY_SETTINGS,
    bound_slack,
    condition_bound,
    exact_steps,
    problems_and_streams,
    realisable_problems_and_streams,
)

# ----------------------------------------------------------------------------------------------
# Helpers


def identity_rtol(cond: float) -> float:
    """Relative tolerance for the identities, given ``cond`` from :func:`condition_bound`."""
    return 1e-9 * max(cond, 1.0)


def demand_sq(problem: Problem, edits) -> float:
    _, R0 = B.initial_demand(problem, edits)
    return float(np.sum(R0**2))


def recursion_steps(problem: Problem, edits):
    """Run the recursion; yield ``(t, K, V, W_prev, W_new, C_prev, G_prev)`` for every step."""
    rls = RecursiveLS(problem)
    for t, (K, V) in enumerate(edits, start=1):
        W_prev, C_prev, G_prev = rls.W_.copy(), rls.C_.copy(), rls.G_.copy()
        rls.update(K, V)
        yield t, K, V, W_prev, rls.W_.copy(), C_prev, G_prev


def checkpoints(T: int) -> set[int]:
    """A few steps to run the O(t) global checks at: the first three, three spread out, the last."""
    return {1, 2, 3, T // 3, (2 * T) // 3, T} & set(range(1, T + 1))


def eigen_rtol(cond: float) -> float:
    """Relative tolerance for a bound with an eigenvalue of ``G`` on one side: ``eigvalsh`` errs by
    ``~eps ||G||`` absolutely, i.e. ``~eps cond(G)`` relatively, which matters where it is attained."""
    return 1e-12 * cond + 1e-9


def assert_holds(bound: B.Bound, slack: float, rtol: float = 1e-9):
    """``lhs <= rhs`` up to the absolute slack and a relative ``rtol`` (equality cases)."""
    assert bound.holds(slack, rtol=rtol), (
        f"{bound.name}: lhs={bound.lhs:.6g} > rhs={bound.rhs:.6g} (+{slack:.2g})"
    )


# ----------------------------------------------------------------------------------------------
# T2


@THEORY_SETTINGS
@given(problems_and_streams())
def test_t2_adherence_bounds(instance):
    problem, edits = instance
    rtol = identity_rtol(condition_bound(problem, edits))
    base = demand_sq(problem, edits)
    for _, K, V, W_prev, W_new, C_prev, _ in exact_steps(problem, edits):
        r_norm = np.linalg.norm(V - K @ W_prev)
        identity = B.t2_residual_identity(K, V, W_prev, W_new, C_prev)
        assert identity.holds(rtol, atol=1e-12 * r_norm), identity.relative_error

        slack = bound_slack(base + r_norm**2)
        bound = B.t2_adherence_bound(K, V, W_prev, W_new, C_prev)
        assert_holds(bound, slack)
        # Second link of the chain: the shrink factor is in (0, 1], so rhs <= ||r_t||.
        factor = B.t2_shrink_factor(K, C_prev)
        assert 0 < factor <= 1
        assert bound.rhs <= r_norm * (1 + 1e-12)
        if K.shape[0] == 1:  # u = 1: S_t is a scalar and the bound is attained
            assert math.isclose(bound.lhs, bound.rhs, rel_tol=rtol, abs_tol=slack)


def test_step_certificates_on_recursion_states_bounds():
    """The per-step bounds on the recursion's own states (C_{t-1}, W_{t-1} from RecursiveLS), as
    the LLM layer's certificates use them; mixed batch sizes, a Gram anchor, u > d_k."""
    rng = np.random.default_rng(3)
    d_k, d_v = 4, 3
    K0 = rng.standard_normal((2, d_k))
    problem = Problem(rng.standard_normal((d_k, d_v)), 0.05, 2.0, gram0=K0.T @ K0)
    edits = [
        (rng.standard_normal((u, d_k)) * 10.0 ** rng.uniform(-1, 1), rng.standard_normal((u, d_v)))
        for u in (1, 2, 5, 1, 3, 6, 2, 1, 4, 2)
    ]
    rtol = identity_rtol(condition_bound(problem, edits))
    base = demand_sq(problem, edits)
    for t, K, V, W_prev, W_new, C_prev, G_prev in recursion_steps(problem, edits):
        slack = bound_slack(base + np.sum((V - K @ W_prev) ** 2))
        assert B.t2_residual_identity(K, V, W_prev, W_new, C_prev).holds(rtol, atol=slack)
        assert B.t4_energy_identity(K, V, W_prev, W_new, C_prev).holds(rtol, atol=slack)
        for bound in B.step_certificate(K, V, W_prev, W_new, C_prev, G_prev=G_prev).values():
            assert_holds(bound, slack)
        certificate = B.deviation_certificate(problem, edits[:t], W_new)
        assert set(certificate) == {
            "metric",
            "from_preservation_state",
            "from_W0",
            "anchor_drift",
            "anchor_misfit",
        }
        for bound in certificate.values():
            assert_holds(bound, bound_slack(demand_sq(problem, edits[:t])))


# ----------------------------------------------------------------------------------------------
# T3


def _t3_checks(problem, edits, W_t, cond, slack):
    identity = B.t3_energy_identity(problem, edits, W_t)
    assert identity.holds(identity_rtol(cond), atol=slack), identity.relative_error
    checks = [
        B.t3_metric_bound(problem, edits, W_t),
        B.t3a_deviation_bound(problem, edits, W_t),
        B.t3c_w0_bound(problem, edits, W_t),
        B.t3d_sqrt_t_bound(problem, edits, W_t),
        *B.t3d_crude_bounds(problem, edits, W_t),
    ]
    if problem.alpha > 0:  # the alpha form of (a): lambda_min(A) >= alpha
        _, R0 = B.initial_demand(problem, edits)
        dev = np.linalg.norm(W_t - problem.W_star0)
        assert dev <= np.linalg.norm(R0) / (2 * math.sqrt(problem.alpha)) + slack
    if problem.beta > 0:
        checks += [
            B.t3b_anchor_bound(problem, edits, W_t),
            B.t3c_anchor_misfit_bound(problem, edits, W_t),
        ]
    # T3d' divides by lambda_min(G_t), which equals lambda_min(A) when the keys leave a direction
    # unseen: attained, and only as exact as the eigenvalue.
    for bound in checks:
        assert_holds(bound, slack, eigen_rtol(cond))
    certificate = B.deviation_certificate(problem, edits, W_t)
    assert all(b.holds(slack, rtol=eigen_rtol(cond)) for b in certificate.values())
    assert ("anchor_drift" in certificate) == (problem.beta > 0)


@THEORY_SETTINGS
@given(problems_and_streams())
def test_t3_energy_identity_and_deviation_bounds(instance):
    problem, edits = instance
    cond = condition_bound(problem, edits)
    for t, _, _, _, W_t, _, _ in exact_steps(problem, edits):
        if t not in checkpoints(len(edits)):
            continue
        prefix = edits[:t]
        slack = bound_slack(demand_sq(problem, prefix))
        for W in (W_t, closed_form(problem, prefix)):
            _t3_checks(problem, prefix, W, cond, slack)
    # T3(d): the per-batch demand rho gives ||R0||^2 <= t rho^2; a larger rho is also valid.
    W_T = closed_form(problem, edits)
    tight = B.t3d_sqrt_t_bound(problem, edits, W_T)
    loose = B.t3d_sqrt_t_bound(
        problem, edits, W_T, rho=2 * max(np.linalg.norm(V - K @ problem.W_star0) for K, V in edits)
    )
    assert loose.rhs >= tight.rhs and loose.holds()
    assert B.t3a_deviation_bound(problem, edits, W_T).rhs <= tight.rhs * (1 + 1e-12)


def test_t3d_crude_bound_attained_when_keys_leave_a_direction_unseen_bounds():
    # Modelled on the instance hypothesis found (d_k = 16, alpha ~ 3e-3, no anchor, keys of norm
    # ~200): with a
    # single key per batch along one unit direction and equal demands, lambda_min(G_t) = alpha =
    # lambda_min(A) and the second T3d' bound is an equality up to the eigenvalue's round-off.
    rng = np.random.default_rng(0)
    d_k, d_v, alpha = 16, 4, 0.00284877
    problem = Problem(rng.standard_normal((d_k, d_v)), alpha=alpha, beta=0.0)
    direction = rng.standard_normal((1, d_k))
    direction /= np.linalg.norm(direction)  # off the axes, so eigvalsh rounds (~4e-9 relative)
    demand = rng.standard_normal((1, d_v))
    K = 200.0 * direction
    edits = [(K, K @ problem.W_star0 + demand) for _ in range(3)]
    cond = condition_bound(problem, edits)
    assert cond > 1e7
    W_T = closed_form(problem, edits)
    _, crude = B.t3d_crude_bounds(problem, edits, W_T)
    assert crude.rhs * (1 - eigen_rtol(cond)) <= crude.lhs  # attained ...
    assert_holds(crude, bound_slack(demand_sq(problem, edits)), eigen_rtol(cond))  # ... and held
    _t3_checks(problem, edits, W_T, cond, bound_slack(demand_sq(problem, edits)))


# ----------------------------------------------------------------------------------------------
# T4


@THEORY_SETTINGS
@given(problems_and_streams())
def test_t4_step_bounds(instance):
    problem, edits = instance
    cond = condition_bound(problem, edits)
    rtol = identity_rtol(cond)
    eig_rtol = eigen_rtol(cond)  # T4(b) divides by lambda_min(G_{t-1})
    base = demand_sq(problem, edits)
    for t, K, V, W_prev, W_new, C_prev, G_prev in exact_steps(problem, edits):
        r_norm = np.linalg.norm(V - K @ W_prev)
        slack = bound_slack(base + r_norm**2)
        for G in (None, G_prev):  # through a solve with C_{t-1}, or with the tracked G_{t-1}
            identity = B.t4_energy_identity(K, V, W_prev, W_new, C_prev, G_prev=G)
            assert identity.holds(rtol, atol=slack), identity.relative_error
            assert_holds(B.t4a_metric_bound(K, V, W_prev, W_new, C_prev, G_prev=G), slack)
            assert_holds(B.t4b_step_bound(K, V, W_prev, W_new, C_prev, G_prev=G), slack, eig_rtol)
        assert_holds(B.t4c_crude_step_bound(K, V, W_prev, W_new, C_prev), slack, eig_rtol)
        certificate = B.step_certificate(K, V, W_prev, W_new, C_prev, G_prev=G_prev)
        assert all(b.holds(slack, rtol=eig_rtol) for b in certificate.values())
        # lambda_min(G_{t-1}) >= lambda_min(A) + lambda_min(sum_{i<t} K_i^T K_i) (Weyl).
        # Eigenvalues carry absolute errors ~ eps ||G||: the slack scales with ||G_{t-1}||.
        if t in checkpoints(len(edits)):
            eig_slack = 1e-11 * np.linalg.norm(G_prev, 2)
            floor = B.information_floor_bound(problem, edits[: t - 1])
            assert_holds(floor, eig_slack)
            # ... so T4(b) also holds with the floor in place of lambda_min(G_{t-1}).
            step = B.t4b_step_bound(K, V, W_prev, W_new, C_prev)
            weaker = np.linalg.norm(V - K @ W_prev) / (
                2 * np.sqrt(max(floor.lhs - eig_slack, 1e-300))
            )
            assert step.rhs <= weaker * (1 + 1e-9)


@THEORY_SETTINGS
@given(problems_and_streams())
def test_c4_plasticity_bounds(instance):
    # T2's shrink factor of every write is at least the one predicted from the keys and the
    # information floor, on the exact states and on the recursion's own.
    problem, edits = instance
    for steps in (exact_steps(problem, edits), recursion_steps(problem, edits)):
        for t, K, _V, _W_prev, _W_new, C_prev, G_prev in steps:
            bound = B.c4_plasticity_bound(problem, edits[: t - 1], K, C_prev)
            assert 0.0 <= bound.lhs <= 1.0 and 0.0 < bound.rhs <= 1.0
            assert bound.rhs == B.t2_shrink_factor(K, C_prev)
            # Eigenvalues of G_{t-1} round to ~eps cond(G_{t-1}) relatively (eigen_rtol).
            cond = np.linalg.norm(G_prev, 2) * np.linalg.norm(C_prev, 2)
            assert bound.holds(1e-12, rtol=eigen_rtol(cond)), (t, bound)


def test_c4_plasticity_bound_is_attained_in_one_dimension_bounds():
    # d_k = 1, A = alpha: f_{t-1} = G_{t-1}, so both sides are 1 / (1 + k^2 / G_{t-1}).
    rng = np.random.default_rng(3)
    problem = Problem(np.array([[0.2]]), 0.7, 0.0)
    rls = RecursiveLS(problem)
    edits = []
    for _ in range(6):
        K, V = rng.standard_normal((1, 1)), rng.standard_normal((1, 1))
        bound = B.c4_plasticity_bound(problem, edits, K, rls.C_)
        assert math.isclose(bound.lhs, bound.rhs, rel_tol=1e-12), bound
        rls.update(K, V)
        edits.append((K, V))
    # More rows than key dimensions: lambda_min(K K^T) = 0, nothing is predicted to be absorbed.
    K = rng.standard_normal((3, 2))
    problem = Problem(rng.standard_normal((2, 1)), 1.0, 0.0)
    assert B.c4_plasticity_bound(problem, [], K, np.eye(2)).lhs == 1.0


# ----------------------------------------------------------------------------------------------
# T5


@THEORY_SETTINGS
@given(problems_and_streams(min_T=2))
def test_t5_interference_bounds(instance):
    problem, edits = instance
    rtol = identity_rtol(condition_bound(problem, edits))
    base = demand_sq(problem, edits)
    rng = np.random.default_rng(len(edits))
    Ws, Cs = {}, {}
    for t, K, V, W_prev, W_new, C_prev, _ in exact_steps(problem, edits):
        Ws[t], Cs[t - 1] = W_new, C_prev  # C_{t-1} = G_{t-1}^{-1} is the state after batch t-1
        r_norm = np.linalg.norm(V - K @ W_prev)
        slack = bound_slack(base + r_norm**2)
        # (a) interference of step t on up to three earlier batches j < t.
        earlier = rng.choice(np.arange(1, t), size=min(3, t - 1), replace=False) if t > 1 else []
        for j in earlier:
            K_j = edits[j - 1][0]
            identity = B.t5a_interference_identity(K_j, K, V, W_prev, W_new, C_prev)
            assert identity.holds(rtol, atol=slack), identity.relative_error
            spec, sharp, coupling = B.t5a_interference_bounds(K_j, K, V, W_prev, W_new, C_prev)
            assert_holds(spec, slack)
            assert_holds(sharp, slack)
            assert_holds(coupling, 1e-9)
            assert sharp.rhs <= spec.rhs * (1 + 1e-9) + slack  # ||S_t^{-1}|| <= 1
            assert sharp.lhs <= r_norm + slack  # interference is always below ||r_t||
    # (b) cumulative drift of early batches, from the saved states and from scratch.
    T = len(edits)
    W_T = Ws[T]
    for j in sorted({1, max(1, T // 2), T}):
        slack = bound_slack(base)
        given_state = B.t5b_drift_bound(problem, edits, j, W_T, W_j=Ws[j], C_j=Cs.get(j))
        scratch = B.t5b_drift_bound(problem, edits, j, W_T)
        assert_holds(given_state, slack)
        assert_holds(scratch, slack)
        assert math.isclose(given_state.rhs, scratch.rhs, rel_tol=rtol, abs_tol=slack)
        if j == T:  # no later batches: no drift at all
            assert scratch.rhs == 0.0 and scratch.lhs <= slack


@THEORY_SETTINGS
@given(realisable_problems_and_streams(), problems_and_streams(max_T=8))
def test_t5_retention_and_regret_bounds(realisable, general):
    # (c) realisable edits: the residual of every batch, in particular the earliest, stays within
    # the budget ||W_true - W*_0||_A for every t.
    problem, edits, W_true = realisable
    budget = math.sqrt(B._metric_sq(problem, W_true - problem.W_star0))
    for t, _, _, _, W_t, _, _ in exact_steps(problem, edits):
        if t not in checkpoints(len(edits)):
            continue
        prefix = edits[:t]
        slack = bound_slack(demand_sq(problem, prefix))
        first = B.t5c_retention_bound(problem, prefix, W_t, W_true)
        assert_holds(first, slack)
        assert math.isclose(first.rhs, budget, rel_tol=1e-6, abs_tol=1e-6 * (budget + 1))
        last = B.t5c_retention_bound(problem, prefix, W_t, W_true, batch=t)
        assert_holds(last, slack)
        # The full form of (c): all residuals plus the deviation fit in the same budget.
        full = B.t5d_regret_bound(problem, prefix, W_t, W_true)
        assert_holds(full, slack)

    # (d) regret: RLSEdit beats every reference editor (and perturbations of itself) on J_t.
    problem, edits = general
    editors = {
        "hard write": HardWrite(problem),
        "per-batch reset": PerBatchReset(problem),
        "null-space projection": NullSpaceProjection(problem),
    }
    rng = np.random.default_rng(len(edits))
    for t, K, V, _, W_t, _, _ in exact_steps(problem, edits):
        for editor in editors.values():
            editor.update(K, V)
        if t not in checkpoints(len(edits)):
            continue
        prefix = edits[:t]
        slack = bound_slack(demand_sq(problem, prefix))
        J_rls = objective(problem, prefix, W_t)
        for name, editor in editors.items():
            assert_holds(B.t5d_regret_bound(problem, prefix, W_t, editor.W_), slack)
            J_alt = objective(problem, prefix, editor.W_)
            assert J_rls <= J_alt + slack + 1e-9 * abs(J_alt), name
        E = rng.standard_normal(W_t.shape) * (np.linalg.norm(W_t) + 1) * 1e-3
        assert_holds(B.t5d_regret_bound(problem, prefix, W_t, W_t + E), slack)


def test_late_edit_overlapping_early_key_is_forgotten_by_reset_not_by_rls_bounds():
    """A later key overlaps batch 1's key: a per-batch-reset (MEMIT-like) editor and a hard-write
    editor overwrite batch 1's output; RLSEdit keeps it within the T5(c) budget."""
    rng = np.random.default_rng(0)
    d_k, d_v, T = 8, 2, 10
    W0 = rng.standard_normal((d_k, d_v))
    problem = Problem(W0, 1e-2, 0.0)
    W_true = W0 + rng.standard_normal((d_k, d_v))  # realises every edit below
    k1 = rng.standard_normal((1, d_k))
    edits = [(k1, k1 @ W_true)]
    for _ in range(T):
        k = k1 + 0.5 * rng.standard_normal((1, d_k))  # overlaps the early key
        edits.append((k, k @ W_true))

    def batch1_residuals(editor):
        return [np.linalg.norm(k1 @ editor.update(K, V) - edits[0][1]) for K, V in edits]

    rls = batch1_residuals(RecursiveLS(problem))
    reset = batch1_residuals(PerBatchReset(problem))
    hard = batch1_residuals(HardWrite(problem))
    # All three write batch 1 (nearly) exactly at t = 1 ...
    assert max(rls[0], reset[0], hard[0]) < 0.01
    # ... later edits make the reset and hard-write editors forget it; RLSEdit does not.
    assert max(reset[1:]) > 0.5 and max(hard[1:]) > 0.5
    assert max(rls) < max(reset[1:]) / 10
    budget = math.sqrt(B._metric_sq(problem, W_true - problem.W_star0))
    assert max(rls) <= budget
    W_T = closed_form(problem, edits)
    assert B.t5c_retention_bound(problem, edits, W_T, W_true).holds(1e-12)


# ----------------------------------------------------------------------------------------------
# Tightness: cases where the bounds are attained


def test_bounds_tightness():
    # T3, scalar: A = a, K = k with k^2 = a gives ||K Delta|| = ||R0|| / 2 and equality.
    a, k, w0, v = 4.0, 2.0, 0.3, 1.7
    problem = Problem(np.array([[w0]]), a, 0.0)
    edits = [(np.array([[k]]), np.array([[v]]))]
    W_t = closed_form(problem, edits)
    for bound in (
        B.t3_metric_bound(problem, edits, W_t),
        B.t3a_deviation_bound(problem, edits, W_t),
    ):
        assert math.isclose(bound.lhs, bound.rhs, rel_tol=1e-12), bound
    # ... and a scalar k^2 != a is strictly inside.
    loose = [(np.array([[3 * k]]), np.array([[v]]))]
    assert B.t3_metric_bound(problem, loose, closed_form(problem, loose)).ratio < 0.9

    # T3, matrix: A = a I and K = sqrt(a) U with U orthogonal (so K^T K = a I) attain the bound
    # for any demand; T3(a) too. The same instance attains the C4 floor (A = alpha I).
    rng = np.random.default_rng(1)
    d_k, d_v = 5, 3
    U = np.linalg.qr(rng.standard_normal((d_k, d_k)))[0]
    problem = Problem(rng.standard_normal((d_k, d_v)), a, 0.0)
    edits = [
        (math.sqrt(a) * U[:2], rng.standard_normal((2, d_v))),
        (math.sqrt(a) * U[2:], rng.standard_normal((3, d_v))),
    ]
    W_t = closed_form(problem, edits)
    for bound in (
        B.t3_metric_bound(problem, edits, W_t),
        B.t3a_deviation_bound(problem, edits, W_t),
        B.information_floor_bound(problem, edits),
    ):
        assert math.isclose(bound.lhs, bound.rhs, rel_tol=1e-10), bound

    # T3(b): alpha = 0, K0 = k0 (d_k = 1), k^2 = beta k0^2.
    beta, k0 = 2.0, 1.5
    problem = Problem(np.array([[w0]]), 0.0, beta, K0=np.array([[k0]]))
    kk = math.sqrt(beta) * k0
    edits = [(np.array([[kk]]), np.array([[v]]))]
    bound = B.t3b_anchor_bound(problem, edits, closed_form(problem, edits))
    assert math.isclose(bound.lhs, bound.rhs, rel_tol=1e-12), bound

    # T2 with u = 1: S_t is the scalar 1 + k C k^T; the bound is an equality on any stream.
    problem = Problem(rng.standard_normal((d_k, d_v)), 0.5, 0.0)
    rls = RecursiveLS(problem)
    for _ in range(5):
        K, V = rng.standard_normal((1, d_k)), rng.standard_normal((1, d_v))
        W_prev, C_prev = rls.W_.copy(), rls.C_.copy()
        rls.update(K, V)
        bound = B.t2_adherence_bound(K, V, W_prev, rls.W_, C_prev)
        assert math.isclose(bound.lhs, bound.rhs, rel_tol=1e-10), bound

    # T4(a), (b), d_k = 1: K_t^2 = G_{t-1} makes the one-step problem the scalar T3 case.
    problem = Problem(np.array([[w0]]), 1.0, 0.0)
    rls = RecursiveLS(problem)
    rls.update(np.array([[math.sqrt(3.0)]]), np.array([[0.4]]))  # G_1 = 1 + 3 = 4
    W_prev, C_prev = rls.W_.copy(), rls.C_.copy()
    K, V = np.array([[2.0]]), np.array([[-1.3]])  # K^2 = 4 = G_1
    rls.update(K, V)
    for bound in (
        B.t4a_metric_bound(K, V, W_prev, rls.W_, C_prev),
        B.t4b_step_bound(K, V, W_prev, rls.W_, C_prev),
    ):
        assert math.isclose(bound.lhs, bound.rhs, rel_tol=1e-12), bound

    # T5(d): the regret is zero at W = W*_t; T5(c) with a single realisable batch written at the
    # scalar tight point: ||k W_t - v|| = ||W_dag - W*_0||_A / 2 ... strictly inside the budget.
    problem = Problem(np.array([[w0]]), a, 0.0)
    edits = [(np.array([[k]]), np.array([[v]]))]
    W_t = closed_form(problem, edits)
    regret = B.t5d_regret_bound(problem, edits, W_t, W_t)
    assert regret.lhs == regret.rhs
    W_dag = np.array([[v / k]])
    retention = B.t5c_retention_bound(problem, edits, W_t, W_dag)
    # Here ||k W_t - v|| = |R0| / 2 and ||W_dag - w0||_A = sqrt(a) |R0| / k = |R0|.
    assert math.isclose(retention.ratio, 0.5, rel_tol=1e-12)


# ----------------------------------------------------------------------------------------------
# Input validation


def test_bound_functions_reject_bad_input_with_typed_errors():
    from rlsedit_theory import HyperparameterError, NonFiniteError, ShapeError

    rng = np.random.default_rng(4)
    problem = Problem(rng.standard_normal((4, 2)), 1.0, 0.0)
    K, V = rng.standard_normal((2, 4)), rng.standard_normal((2, 2))
    W, C = problem.W0, np.eye(4)
    with pytest.raises(ShapeError):
        B.t2_adherence_bound(K, V[:, :1], W, W, C)  # V has the wrong width
    with pytest.raises(ShapeError):
        B.t4b_step_bound(K, V, W, W, np.eye(3))  # C_prev is not d_k x d_k
    with pytest.raises(ShapeError):
        B.t3a_deviation_bound(problem, [(K, V)], W[:3])  # W_t is not (d_k, d_v)
    with pytest.raises(NonFiniteError):
        B.t3_metric_bound(problem, [(K, V)], np.full((4, 2), np.nan))
    with pytest.raises(HyperparameterError):
        B.t3b_anchor_bound(problem, [(K, V)], W)  # beta = 0: no anchor bound
    with pytest.raises(HyperparameterError):
        B.t5b_drift_bound(problem, [(K, V)], 2, W)  # j out of range
    with pytest.raises(HyperparameterError):
        B.t3d_sqrt_t_bound(problem, [(K, V)], W, rho=1e-9)  # rho below the demand
    with pytest.raises(TypeError):
        B.t3_metric_bound("not a problem", [(K, V)], W)
