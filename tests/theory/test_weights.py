"""Per-fact (per-row) weights: ``sum_i ||Omega_i^{1/2}(K_i W - V_i)||^2`` in the cumulative objective.

Checked (proofs/weights.md):

- the recursion with weights equals the weighted closed form, built here independently from
  ``K^T diag(omega) K`` and ``K^T diag(omega) V`` (update, downdate of a weighted batch, partial
  downdate of a weight);
- ``omega = 1`` reproduces every unweighted result bit for bit;
- the row-scaling lemma, and that an integer weight is the row repeated;
- the weighted statements T2-T5 (identities, and the inequalities in the tests whose names contain
  ``bounds``), in row-scaled and in original coordinates;
- what raising one fact's weight does: its residual falls strictly, by the predicted factor; the
  weights move further along one fixed direction (any norm of the displacement rises); the cost
  to everything else in the objective does not fall; the deviation from ``W*_0`` itself may fall;
- bad weights raise typed errors and leave every solver unchanged.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
from hypothesis import given
from hypothesis import strategies as st

from rlsedit_theory import (
    DenseCumulative,
    HardWrite,
    HyperparameterError,
    NonFiniteError,
    NotPositiveDefiniteError,
    NullSpaceProjection,
    PerBatchReset,
    Problem,
    RecursiveLS,
    ShapeError,
    check_row_weights,
    closed_form,
    gradient,
    information_matrix,
    normal_rhs,
    objective,
    objective_terms,
    run_stream,
    scale_rows,
    stack_edits,
    weighted_edits,
    woodbury_downdate,
    woodbury_update,
)
from rlsedit_theory import bounds as B

from .conftest import (
    COND_CAP,
    THEORY_SETTINGS,
    bound_slack,
    condition_bound,
    problems_and_streams,
    realisable_problems_and_streams,
)

# ----------------------------------------------------------------------------------------------
# Instances and independent references


def _random_weights(rng: np.random.Generator, edits, kind: str, spread: float) -> list:
    """One entry per batch: per-row arrays, scalars, or a mix with ``None`` (weight 1)."""
    out: list = []
    for K, _ in edits:
        u = K.shape[0]
        rows = 10.0 ** rng.uniform(-spread, spread, size=u)
        if kind == "rows":
            out.append(rows)
        elif kind == "scalar":
            out.append(float(rows[0]))
        else:  # mixed
            out.append([None, float(rows[0]), rows, list(rows)][int(rng.integers(0, 4))])
    return out


def _cap(problem: Problem, scaled) -> Problem:
    """Raise ``alpha`` so that ``lambda_max(G_T) / lambda_min(A) <= COND_CAP`` for the weighted data
    (as conftest does for unweighted streams)."""
    K = np.vstack([K for K, _ in scaled])
    top = np.linalg.eigvalsh(problem.metric)[-1] + np.linalg.norm(K, 2) ** 2
    floor = np.linalg.eigvalsh(problem.metric)[0]
    if top <= COND_CAP * floor:
        return problem
    alpha = problem.alpha + top / COND_CAP
    if problem.K0 is not None:
        return Problem(problem.W0, alpha, problem.beta, K0=problem.K0, V0=problem.V0)
    if problem.gram0.any():
        return Problem(problem.W0, alpha, problem.beta, gram0=problem.gram0)
    return Problem(problem.W0, alpha, problem.beta)


@st.composite
def weighted_instances(draw, *, min_T: int = 1, max_T: int = 20, d_k=(2, 12), realisable: bool = False):
    """``(problem, edits, weights[, W_true])``: a conftest instance plus row weights in
    ``1e-2 .. 1e2`` (per-row arrays, scalars or mixed with ``None``), conditioning re-capped."""
    strategy = realisable_problems_and_streams if realisable else problems_and_streams
    instance = draw(strategy(min_T=min_T, max_T=max_T, d_k=d_k), label="instance")
    kind = draw(st.sampled_from(["rows", "scalar", "mixed"]), label="weight_kind")
    seed = draw(st.integers(0, 2**32 - 1), label="weight_seed")
    problem, edits = instance[0], instance[1]
    weights = _random_weights(np.random.default_rng(seed), edits, kind, spread=2.0)
    problem = _cap(problem, weighted_edits(problem, edits, weights))
    return (problem, edits, weights, instance[2]) if realisable else (problem, edits, weights)


def _omega(w, u: int) -> np.ndarray:
    return np.ones(u) if w is None else np.broadcast_to(np.asarray(w, dtype=float), (u,)).copy()


def explicit_normal_equations(problem: Problem, edits, weights):
    """``G = A + sum K^T diag(omega) K`` and ``B = B_0 + sum K^T diag(omega) V``, formed with the
    diagonal matrices (not by row scaling), and the minimiser ``G^{-1} B``."""
    G, Bm = problem.metric.copy(), problem.rhs0.copy()
    for (K, V), w in zip(edits, weights, strict=True):
        Om = np.diag(_omega(w, K.shape[0]))
        G = G + K.T @ Om @ K
        Bm = Bm + K.T @ Om @ V
    return G, Bm, scipy.linalg.solve(G, Bm, assume_a="pos")


def weighted_exact_steps(problem: Problem, edits, weights):
    """Exact weighted states step by step: ``(t, K, V, omega, W_prev, W_new, C_prev, G_prev)``."""
    G, Bm = problem.metric.copy(), problem.rhs0.copy()
    W, C = problem.W_star0, problem.solve_metric(np.eye(problem.d_k))
    for t, ((K, V), w) in enumerate(zip(edits, weights, strict=True), start=1):
        omega = _omega(w, K.shape[0])
        G_prev, C_prev, W_prev = G, C, W
        G = G + K.T @ (omega[:, None] * K)
        Bm = Bm + K.T @ (omega[:, None] * V)
        factor = scipy.linalg.cho_factor(G, lower=True)
        W = scipy.linalg.cho_solve(factor, Bm)
        C = scipy.linalg.cho_solve(factor, np.eye(problem.d_k))
        C = (C + C.T) / 2
        yield t, K, V, omega, W_prev, W, C_prev, G_prev


def rel_err(a, b) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def weighted_demand_sq(problem: Problem, edits, weights) -> float:
    """``sum_i omega_i ||V_i - K_i W*_0||^2`` computed row by row."""
    total = 0.0
    for (K, V), w in zip(edits, weights, strict=True):
        R0 = V - K @ problem.W_star0
        total += float(np.sum(_omega(w, K.shape[0]) * np.sum(R0**2, axis=1)))
    return total


def identity_rtol(cond: float) -> float:
    return 1e-9 * max(cond, 1.0)


def eigen_rtol(cond: float) -> float:
    return 1e-12 * cond + 1e-9


def assert_holds(bound: B.Bound, slack: float, rtol: float = 1e-9):
    assert bound.holds(slack, rtol=rtol), f"{bound.name}: lhs={bound.lhs:.6g} > rhs={bound.rhs:.6g} (+{slack:.2g})"


def checkpoints(T: int) -> set[int]:
    return {1, 2, T // 2, T} & set(range(1, T + 1))


def weighted_cond(problem, edits, weights) -> float:
    return condition_bound(problem, weighted_edits(problem, edits, weights))


# ----------------------------------------------------------------------------------------------
# The recursion equals the weighted closed form


@THEORY_SETTINGS
@given(weighted_instances())
def test_weighted_recursion_equals_weighted_closed_form_at_every_step(instance):
    problem, edits, weights = instance
    cond = weighted_cond(problem, edits, weights)
    rls = RecursiveLS(problem)
    for t, ((K, V), w) in enumerate(zip(edits, weights, strict=True), start=1):
        rls.update(K, V, w)
        G, _, W_ref = explicit_normal_equations(problem, edits[:t], weights[:t])
        assert rel_err(rls.W_, W_ref) <= 1e-10 * cond, t
        assert rel_err(closed_form(problem, edits[:t], weights=weights[:t]), W_ref) <= 1e-10 * cond
        assert np.linalg.norm(rls.C_ @ G - np.eye(problem.d_k)) <= 1e-10 * cond * math.sqrt(problem.d_k)
        assert rel_err(rls.G_, G) <= 1e-13
    G, Bm, W_ref = explicit_normal_equations(problem, edits, weights)
    assert rel_err(information_matrix(problem, edits, weights=weights), G) <= 1e-13
    assert rel_err(normal_rhs(problem, edits, weights=weights), Bm) <= 1e-13
    # The weighted gradient vanishes there, and the weighted objective is minimised with the exact
    # excess J(W + E) - J(W) = ||E||_G^2.
    grad = gradient(problem, edits, rls.W_, weights=weights)
    assert np.linalg.norm(grad) <= 2e-10 * cond * (np.linalg.norm(G, 2) * np.linalg.norm(rls.W_) + np.linalg.norm(Bm))
    E = np.random.default_rng(len(edits)).standard_normal(rls.W_.shape) * 1e-2 * (np.linalg.norm(rls.W_) + 1)
    J = objective(problem, edits, rls.W_, weights=weights)
    excess = objective(problem, edits, rls.W_ + E, weights=weights) - J
    curvature = float(np.sum(E * (G @ E)))
    assert abs(excess - curvature) <= 1e-8 * (abs(J) + curvature) + 1e-10 * cond * abs(J)


@THEORY_SETTINGS
@given(weighted_instances(min_T=2), st.integers(0, 2**32 - 1), st.floats(0.05, 0.95))
def test_weighted_downdate_removes_a_weighted_batch_exactly(instance, seed, keep):
    problem, edits, weights = instance
    rng = np.random.default_rng(seed)
    j = int(rng.integers(0, len(edits)))
    rls = RecursiveLS(problem)
    for (K, V), w in zip(edits, weights, strict=True):
        rls.update(K, V, w)
    K, V = edits[j]
    omega = _omega(weights[j], K.shape[0])
    before = rls.copy()
    # Remove part of the weight: the state is the one where batch j carries keep * omega.
    partial = rls.copy()
    partial.downdate(K, V, (1 - keep) * omega)
    reweighted = list(weights)
    reweighted[j] = keep * omega
    cond = max(weighted_cond(problem, edits, weights), weighted_cond(problem, edits, reweighted))
    S_minus = np.eye(K.shape[0]) - np.sqrt(omega)[:, None] * K @ rls.C_ @ K.T * np.sqrt(omega)[None, :]
    kappa = np.linalg.norm(K, 2) ** 2 * omega.max() * np.linalg.norm(rls.C_, 2) / np.linalg.eigvalsh(S_minus)[0]
    tol = 1e-10 * max(cond, kappa)
    assert rel_err(partial.W_, explicit_normal_equations(problem, edits, reweighted)[2]) <= tol
    # Remove all of it: the state of the stream without batch j.
    rls.downdate(K, V, weights[j])
    rest = edits[:j] + edits[j + 1 :]
    rest_w = weights[:j] + weights[j + 1 :]
    G_rest, _, W_rest = explicit_normal_equations(problem, rest, rest_w)
    assert rel_err(rls.W_, W_rest) <= tol
    assert np.linalg.norm(rls.C_ @ G_rest - np.eye(problem.d_k)) <= tol * math.sqrt(problem.d_k)
    assert rls.n_rows_ == before.n_rows_ - K.shape[0]
    # ... and adding it back with its weights restores the state.
    rls.update(K, V, weights[j])
    assert rls.allclose(before, rtol=tol)


def test_single_fact_absorption_by_hand():
    # d_k = d_v = 1, A = 2, W0 = 0, one fact k = 1, v = 1 of weight w: C_0 = 1/2 and
    # W_1 = w / (2 + w), so r_after = 2 / (2 + w) = r_before / (1 + w k C_0 k).
    problem = Problem(np.zeros((1, 1)), 2.0, 0.0)
    k, v = np.ones((1, 1)), np.ones((1, 1))
    for w, after in ((1.0, 2 / 3), (4.0, 1 / 3), (0.5, 0.8)):
        rls = RecursiveLS(problem)
        W = rls.update(k, v, [w])
        assert math.isclose((v - k @ W).item(), after, rel_tol=1e-14)
        assert math.isclose((v - k @ W).item(), 1.0 / (1.0 + w * 0.5), rel_tol=1e-14)
        assert math.isclose(B.fact_residual_share(k, rls.C_, w), after, rel_tol=1e-14)
        identity = B.t2_weighted_residual_identity(k, v, np.zeros((1, 1)), W, np.array([[0.5]]), weights=[w])
        assert identity.holds(1e-14)


# ----------------------------------------------------------------------------------------------
# omega = 1 is the unweighted problem, bit for bit; row scaling; repetition


@THEORY_SETTINGS
@given(problems_and_streams(max_T=12, d_k=(2, 10)), st.sampled_from(["ones", "scalar", "none"]))
def test_unit_weights_reproduce_unweighted_results_exactly(instance, form):
    problem, edits = instance
    weights = [
        np.ones(K.shape[0]) if form == "ones" else 1.0 if form == "scalar" else None for K, _ in edits
    ]
    W_any = problem.W0 + 0.1
    assert np.array_equal(closed_form(problem, edits, weights=weights), closed_form(problem, edits))
    assert objective_terms(problem, edits, W_any, weights=weights) == objective_terms(problem, edits, W_any)
    assert np.array_equal(gradient(problem, edits, W_any, weights=weights), gradient(problem, edits, W_any))
    plain, weighted = RecursiveLS(problem), RecursiveLS(problem)
    for (K, V), w in zip(edits, weights, strict=True):
        plain.update(K, V)
        weighted.update(K, V, w)
        assert np.array_equal(plain.W_, weighted.W_) and np.array_equal(plain.C_, weighted.C_)
        assert np.array_equal(plain.G_, weighted.G_)
        for a, b in zip(plain.last_step_, weighted.last_step_, strict=True):
            assert np.array_equal(a, b)
    K, V = edits[-1]
    try:  # removing the last batch can be numerically refused (T1's downdate condition) ...
        C1, W1, _ = woodbury_downdate(plain.C_, plain.W_, K, V)
    except NotPositiveDefiniteError:  # ... and then it is refused with unit weights as well
        with pytest.raises(NotPositiveDefiniteError):
            woodbury_downdate(plain.C_, plain.W_, K, V, weights[-1])
    else:
        C2, W2, _ = woodbury_downdate(plain.C_, plain.W_, K, V, weights[-1])
        assert np.array_equal(C1, C2) and np.array_equal(W1, W2)
    for make in (HardWrite, PerBatchReset, NullSpaceProjection, DenseCumulative):
        a = run_stream(make(problem), edits)
        b = run_stream(make(problem), edits, weights)
        assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True)), make.__name__
    W_T = plain.W_
    for name, f in (("T3", B.t3_metric_bound), ("T3a", B.t3a_deviation_bound), ("T3 identity", B.t3_energy_identity)):
        assert f(problem, edits, W_T, weights=weights) == f(problem, edits, W_T), name
    assert B.t5d_regret_bound(problem, edits, W_T, W_any, weights=weights) == B.t5d_regret_bound(
        problem, edits, W_T, W_any
    )


@THEORY_SETTINGS
@given(weighted_instances(max_T=10))
def test_row_scaling_lemma_and_repetition(instance):
    problem, edits, weights = instance
    rng = np.random.default_rng(len(edits))
    W = problem.W0 + rng.standard_normal(problem.W0.shape)
    # The weighted misfit, row by row, equals the unweighted misfit of the scaled rows.
    fit = sum(
        float(np.sum(_omega(w, K.shape[0]) * np.sum((K @ W - V) ** 2, axis=1)))
        for (K, V), w in zip(edits, weights, strict=True)
    )
    terms = objective_terms(problem, edits, W, weights=weights)
    assert math.isclose(terms.fit, fit, rel_tol=1e-12, abs_tol=1e-300)
    scaled = [scale_rows(K, V, check_row_weights(w, K.shape[0])) for (K, V), w in zip(edits, weights, strict=True)]
    assert math.isclose(objective(problem, scaled, W), terms.total, rel_tol=1e-12)
    K_s, V_s = stack_edits(problem, edits, weights=weights)
    assert np.array_equal(K_s, np.vstack([K for K, _ in scaled]))
    assert np.array_equal(V_s, np.vstack([V for _, V in scaled]))
    assert np.array_equal(closed_form(problem, scaled), closed_form(problem, edits, weights=weights))


@pytest.mark.parametrize("m", [2, 3])
def test_integer_weight_equals_repeated_rows_and_weights_add(m):
    rng = np.random.default_rng(m)
    d_k, d_v = 5, 2
    K0 = rng.standard_normal((3, d_k))
    problem = Problem(rng.standard_normal((d_k, d_v)), 0.2, 1.5, gram0=K0.T @ K0)
    edits = [(rng.standard_normal((u, d_k)), rng.standard_normal((u, d_v))) for u in (2, 1, 4)]
    heavy = [float(m), None, None]
    repeated = [(np.vstack([edits[0][0]] * m), np.vstack([edits[0][1]] * m)), edits[1], edits[2]]
    W_heavy = closed_form(problem, edits, weights=heavy)
    assert rel_err(W_heavy, closed_form(problem, repeated)) < 1e-12
    assert rel_err(RecursiveLS(problem).update(*edits[0], m).copy(), RecursiveLS(problem).update(*repeated[0])) < 1e-12
    # Adding a batch twice with weights w1, w2 is adding it once with w1 + w2.
    w1, w2 = rng.uniform(0.5, 2, size=2), rng.uniform(0.5, 2, size=2)
    twice = RecursiveLS(problem)
    twice.update(*edits[0], w1)
    twice.update(*edits[0], w2)
    once = RecursiveLS(problem)
    once.update(*edits[0], w1 + w2)
    assert twice.allclose(once, rtol=1e-12)
    # ... and weight m is not weight 1 (so the checks above can fail).
    assert rel_err(W_heavy, closed_form(problem, edits)) > 1e-3


def test_reference_editors_apply_weights_by_row_scaling():
    rng = np.random.default_rng(11)
    d_k, d_v = 6, 2
    K0 = rng.standard_normal((2, d_k))
    problem = Problem(rng.standard_normal((d_k, d_v)), 0.3, 2.0, K0=K0)
    edits = [(rng.standard_normal((u, d_k)), rng.standard_normal((u, d_v))) for u in (2, 3, 1, 2)]
    weights = [rng.uniform(0.1, 10, size=K.shape[0]) for K, _ in edits]
    dense = run_stream(DenseCumulative(problem), edits, weights)
    for t in range(1, len(edits) + 1):
        assert rel_err(dense[t - 1], explicit_normal_equations(problem, edits[:t], weights[:t])[2]) < 1e-10
    # Per-batch reset: one weighted step from the prior metric around the current weights.
    reset = PerBatchReset(problem)
    reset.update(*edits[0], weights[0])
    assert rel_err(reset.W_, closed_form(problem, edits[:1], weights=weights[:1])) < 1e-10
    # A hard write of a full-row-rank batch is exact whatever the weights; with more rows than
    # d_k (a least-squares write) the weights matter.
    hard = HardWrite(problem)
    K, V = edits[1]
    assert np.allclose(K @ hard.update(K, V, weights[1]), V, atol=1e-9)
    K_big, V_big = rng.standard_normal((d_k + 3, d_k)), rng.standard_normal((d_k + 3, d_v))
    omega = rng.uniform(0.1, 10, size=d_k + 3)
    a = HardWrite(problem).update(K_big, V_big)
    b = HardWrite(problem).update(K_big, V_big, omega)
    residual_a = np.sum(omega[:, None] * (K_big @ a - V_big) ** 2)
    residual_b = np.sum(omega[:, None] * (K_big @ b - V_big) ** 2)
    assert residual_b < residual_a  # the weighted least-squares write fits the weighted misfit better
    ns_a = NullSpaceProjection(problem).update(K, V)
    ns_b = NullSpaceProjection(problem).update(K, V, weights[1])
    assert rel_err(ns_a, ns_b) > 1e-6


# ----------------------------------------------------------------------------------------------
# Weighted T2


@THEORY_SETTINGS
@given(weighted_instances())
def test_weighted_t2_identity_and_adherence_bounds(instance):
    problem, edits, weights = instance
    cond = weighted_cond(problem, edits, weights)
    rtol = identity_rtol(cond)
    rls = RecursiveLS(problem)
    for (_, K, V, omega, W_prev, W_new, C_prev, _), w in zip(
        weighted_exact_steps(problem, edits, weights), weights, strict=True
    ):
        r = V - K @ W_prev
        # Original coordinates, independently: (I + K C K^T Omega)^{-1} r by a dense LU solve.
        expected = np.linalg.solve(np.eye(K.shape[0]) + K @ C_prev @ K.T @ np.diag(omega), r)
        scale = np.linalg.norm(r) + np.linalg.norm(K) * np.linalg.norm(W_new) + 1e-300
        assert np.linalg.norm((V - K @ W_new) - expected) <= rtol * scale
        original = B.t2_weighted_residual_identity(K, V, W_prev, W_new, C_prev, weights=w)
        assert original.holds(rtol, atol=rtol * scale), original.relative_error
        scaled = B.t2_residual_identity(K, V, W_prev, W_new, C_prev, weights=w)
        assert scaled.holds(rtol, atol=rtol * scale * math.sqrt(omega.max()))
        if K.shape[0] == 1:  # one fact: r_after = r / (1 + omega k C k^T)
            m = (K @ C_prev @ K.T).item()
            assert np.allclose(V - K @ W_new, r / (1 + omega[0] * m), rtol=rtol, atol=rtol * scale)
        # The weighted T2 bound, on the exact states and on the recursion's own.
        slack = bound_slack(float(np.sum(omega[:, None] * r**2)))
        assert_holds(B.t2_adherence_bound(K, V, W_prev, W_new, C_prev, weights=w), slack)
        factor = B.t2_shrink_factor(K, C_prev, weights=w)
        assert 0 < factor <= 1
        W_rec_prev, C_rec_prev = rls.W_.copy(), rls.C_.copy()
        rls.update(K, V, w)
        assert_holds(B.t2_adherence_bound(K, V, W_rec_prev, rls.W_, C_rec_prev, weights=w), slack)
    # Heavier weights on a batch shrink its shrink factor (more is absorbed).
    K = edits[-1][0]
    light = B.t2_shrink_factor(K, C_prev, weights=np.full(K.shape[0], 0.5))
    heavy = B.t2_shrink_factor(K, C_prev, weights=np.full(K.shape[0], 2.0))
    assert heavy <= light * (1 + 1e-12)


# ----------------------------------------------------------------------------------------------
# Weighted T3


@THEORY_SETTINGS
@given(weighted_instances())
def test_weighted_t3_energy_identity_and_deviation_bounds(instance):
    problem, edits, weights = instance
    cond = weighted_cond(problem, edits, weights)
    for t in sorted(checkpoints(len(edits))):
        prefix, w = edits[:t], weights[:t]
        _, _, W_t = explicit_normal_equations(problem, prefix, w)
        demand = weighted_demand_sq(problem, prefix, w)
        slack = bound_slack(demand)
        identity = B.t3_energy_identity(problem, prefix, W_t, weights=w)
        assert identity.holds(identity_rtol(cond), atol=slack), identity.relative_error
        assert math.isclose(identity.lhs, demand, rel_tol=1e-12, abs_tol=1e-300)
        # ||Delta||_A^2 <= sum_i omega_i ||R0_i||^2 / 4, computed here without the library.
        D = W_t - problem.W_star0
        metric_sq = float(np.sum(D * (problem.metric @ D)))
        assert metric_sq <= demand / 4 + slack + 1e-9 * demand
        checks = [
            B.t3_metric_bound(problem, prefix, W_t, weights=w),
            B.t3a_deviation_bound(problem, prefix, W_t, weights=w),
            B.t3c_w0_bound(problem, prefix, W_t, weights=w),
            B.t3d_sqrt_t_bound(problem, prefix, W_t, weights=w),
            *B.t3d_crude_bounds(problem, prefix, W_t, weights=w),
            *B.deviation_certificate(problem, prefix, W_t, weights=w).values(),
        ]
        if problem.beta > 0:
            checks += [
                B.t3b_anchor_bound(problem, prefix, W_t, weights=w),
                B.t3c_anchor_misfit_bound(problem, prefix, W_t, weights=w),
            ]
        for bound in checks:
            assert_holds(bound, slack, eigen_rtol(cond))


# ----------------------------------------------------------------------------------------------
# Weighted T4


@THEORY_SETTINGS
@given(weighted_instances())
def test_weighted_t4_step_and_saturation_bounds(instance):
    problem, edits, weights = instance
    cond = weighted_cond(problem, edits, weights)
    rtol, eig = identity_rtol(cond), eigen_rtol(cond)
    for (_, K, V, omega, W_prev, W_new, C_prev, G_prev), w in zip(
        weighted_exact_steps(problem, edits, weights), weights, strict=True
    ):
        r = V - K @ W_prev
        scaled_r_sq = float(np.sum(omega[:, None] * r**2))
        slack = bound_slack(scaled_r_sq)
        # Delta_t = C_{t-1} K^T (Omega^{-1} + K C_{t-1} K^T)^{-1} r_t, independently.
        M = K @ C_prev @ K.T
        step = C_prev @ K.T @ np.linalg.solve(np.diag(1 / omega) + M, r)
        assert np.linalg.norm((W_new - W_prev) - step) <= rtol * (np.linalg.norm(step) + np.linalg.norm(W_new))
        for G in (None, G_prev):
            identity = B.t4_energy_identity(K, V, W_prev, W_new, C_prev, G_prev=G, weights=w)
            assert identity.holds(rtol, atol=slack), identity.relative_error
            assert math.isclose(identity.lhs, scaled_r_sq, rel_tol=1e-12, abs_tol=1e-300)
            for bound in B.step_certificate(K, V, W_prev, W_new, C_prev, G_prev=G, weights=w).values():
                assert_holds(bound, slack, eig)
            value, hard = B.t4_saturation_bounds(K, V, W_prev, W_new, C_prev, weights=w, G_prev=G)
            assert_holds(value, slack)
            assert value.rhs**2 <= scaled_r_sq * (1 + 1e-9) + slack  # and <= ||Omega^{1/2} r||^2
            if np.linalg.eigvalsh(M)[0] > 1e-6 * np.linalg.norm(M, 2):  # an exact write exists
                assert_holds(hard, slack, 1e-7)


def test_t4_saturation_step_cost_rises_with_the_weight_but_stays_below_the_exact_write_bounds():
    rng = np.random.default_rng(5)
    d_k, d_v = 6, 2
    problem = Problem(rng.standard_normal((d_k, d_v)), 0.5, 0.0)
    rls = RecursiveLS(problem)
    rls.update(rng.standard_normal((3, d_k)), rng.standard_normal((3, d_v)))
    K, V = rng.standard_normal((2, d_k)), rng.standard_normal((2, d_v))
    costs, quarters = [], []
    for w in (0.01, 0.1, 1.0, 10.0, 1e2, 1e4):
        C, W, _ = woodbury_update(rls.C_, rls.W_, K, V, np.full(2, w))
        value, hard = B.t4_saturation_bounds(K, V, rls.W_, W, rls.C_, weights=np.full(2, w), G_prev=rls.G_)
        assert value.holds(1e-12) and hard.holds(1e-12)
        quarter = B.t4a_metric_bound(K, V, rls.W_, W, rls.C_, G_prev=rls.G_, weights=np.full(2, w))
        assert quarter.holds(1e-12)
        costs.append(value.lhs)
        quarters.append(quarter.rhs)
    assert all(b > a for a, b in zip(costs, costs[1:], strict=False))  # uniform weights: strictly larger steps
    assert costs[-1] <= hard.rhs and costs[-1] > 0.99 * hard.rhs  # ... saturating at the exact write
    assert quarters[-1] > 10 * hard.rhs  # while the quarter bound grows like sqrt(w)


# ----------------------------------------------------------------------------------------------
# Weighted T5


@THEORY_SETTINGS
@given(weighted_instances(min_T=2))
def test_weighted_t5_interference_and_protection_bounds(instance):
    problem, edits, weights = instance
    cond = weighted_cond(problem, edits, weights)
    rtol = identity_rtol(cond)
    rng = np.random.default_rng(len(edits))
    Ws, Cs = {}, {}
    for (t, K, V, omega, W_prev, W_new, C_prev, _), w in zip(
        weighted_exact_steps(problem, edits, weights), weights, strict=True
    ):
        Ws[t], Cs[t - 1] = W_new, C_prev
        slack = bound_slack(float(np.sum(omega[:, None] * (V - K @ W_prev) ** 2)))
        for j in rng.choice(np.arange(1, t), size=min(2, t - 1), replace=False) if t > 1 else []:
            K_j, w_j = edits[j - 1][0], weights[j - 1]
            identity = B.t5a_interference_identity(K_j, K, V, W_prev, W_new, C_prev, weights=w, weights_j=w_j)
            assert identity.holds(rtol, atol=slack), identity.relative_error
            for bound in B.t5a_interference_bounds(K_j, K, V, W_prev, W_new, C_prev, weights=w, weights_j=w_j):
                assert_holds(bound, slack)
            moved, sensitivity = B.t5_protection_bounds(K_j, K, V, W_prev, W_new, C_prev, weights=w, weights_j=w_j)
            assert_holds(moved, slack)
            assert_holds(sensitivity, 1e-9 * sensitivity.rhs)
            # Per fact: ||k_l Delta_t|| < ||Omega_t^{1/2} r_t|| / (2 sqrt(omega_l)).
            omega_j = _omega(w_j, K_j.shape[0])
            per_fact = np.linalg.norm(K_j @ (W_new - W_prev), axis=1)
            demand = math.sqrt(float(np.sum(omega[:, None] * (V - K @ W_prev) ** 2)))
            assert np.all(per_fact <= 0.5 * demand / np.sqrt(omega_j) + slack)
    T = len(edits)
    base = weighted_demand_sq(problem, edits, weights)
    for j in sorted({1, max(1, T // 2), T}):
        given_state = B.t5b_drift_bound(problem, edits, j, Ws[T], W_j=Ws[j], C_j=Cs.get(j), weights=weights)
        scratch = B.t5b_drift_bound(problem, edits, j, Ws[T], weights=weights)
        assert_holds(given_state, bound_slack(base))
        assert_holds(scratch, bound_slack(base))
        assert math.isclose(given_state.rhs, scratch.rhs, rel_tol=rtol, abs_tol=bound_slack(base))


@THEORY_SETTINGS
@given(weighted_instances(realisable=True, max_T=15), weighted_instances(max_T=8))
def test_weighted_t5_retention_and_regret_bounds(realisable, general):
    problem, edits, weights, W_true = realisable
    D = W_true - problem.W_star0
    budget = float(np.sum(D * (problem.metric @ D)))
    for t in sorted(checkpoints(len(edits))):
        prefix, w = edits[:t], weights[:t]
        _, _, W_t = explicit_normal_equations(problem, prefix, w)
        slack = bound_slack(weighted_demand_sq(problem, prefix, w) + budget)
        assert_holds(B.t5c_retention_bound(problem, prefix, W_t, W_true, weights=w), slack)
        assert_holds(B.t5d_regret_bound(problem, prefix, W_t, W_true, weights=w), slack)
        for b in (1, t):
            omega_b = _omega(w[b - 1], prefix[b - 1][0].shape[0])
            whole = B.t5_fact_retention_bound(problem, prefix, W_t, W_true, batch=b, weights=w)
            assert_holds(whole, slack)
            assert math.isclose(whole.rhs**2, budget / omega_b.min(), rel_tol=1e-6, abs_tol=slack)
            for row in range(prefix[b - 1][0].shape[0]):
                assert_holds(B.t5_fact_retention_bound(problem, prefix, W_t, W_true, batch=b, row=row, weights=w),
                             slack)
    # Regret: the weighted minimiser beats every reference editor run with the same weights.
    problem, edits, weights = general
    _, _, W_T = explicit_normal_equations(problem, edits, weights)
    slack = bound_slack(weighted_demand_sq(problem, edits, weights))
    J = objective(problem, edits, W_T, weights=weights)
    for make in (HardWrite, PerBatchReset, NullSpaceProjection):
        W_alt = run_stream(make(problem), edits, weights)[-1]
        assert_holds(B.t5d_regret_bound(problem, edits, W_T, W_alt, weights=weights), slack)
        J_alt = objective(problem, edits, W_alt, weights=weights)
        assert J <= J_alt + slack + 1e-9 * abs(J_alt), make.__name__
    # The unweighted minimiser is not better on the weighted objective either.
    assert J <= objective(problem, edits, closed_form(problem, edits), weights=weights) * (1 + 1e-9) + slack


# ----------------------------------------------------------------------------------------------
# One fact: what its weight buys it and what it costs the others


@THEORY_SETTINGS
@given(weighted_instances(max_T=8, d_k=(2, 8), realisable=True), st.data())
def test_fact_identities_and_cost_bounds(instance, data):
    problem, edits, weights, W_true = instance
    batch = data.draw(st.integers(1, len(edits)), label="batch")
    row = data.draw(st.integers(0, edits[batch - 1][0].shape[0] - 1), label="row")
    cond = weighted_cond(problem, edits, weights)
    rtol = identity_rtol(cond)
    G, _, W_t = explicit_normal_equations(problem, edits, weights)
    slack = bound_slack(weighted_demand_sq(problem, edits, weights))
    scale = np.linalg.norm(W_t) * max(np.linalg.norm(K) for K, _ in edits) + np.linalg.norm(edits[batch - 1][1])
    residual = B.t2_fact_identity(problem, edits, W_t, batch=batch, row=row, weights=weights)
    assert residual.holds(rtol, atol=rtol * scale), residual.relative_error
    displacement = B.fact_displacement_identity(problem, edits, W_t, batch=batch, row=row, weights=weights)
    assert displacement.holds(rtol, atol=rtol * (np.linalg.norm(W_t) + 1)), displacement.relative_error
    # The share 1 - omega k C_t k^T equals 1 / (1 + omega m) with m from the stream without the fact.
    k = edits[batch - 1][0][row : row + 1]
    omega = float(_omega(weights[batch - 1], edits[batch - 1][0].shape[0])[row])
    without = [list(x) for x in zip(edits, weights, strict=True)]
    K_b, V_b = edits[batch - 1]
    keep = np.arange(K_b.shape[0]) != row
    w_b = _omega(weights[batch - 1], K_b.shape[0])
    without[batch - 1] = [(K_b[keep], V_b[keep]), w_b[keep]]
    without = [pair for pair in without if pair[0][0].shape[0] > 0]
    G_minus, _, _ = explicit_normal_equations(problem, [p[0] for p in without], [p[1] for p in without])
    m = (k @ np.linalg.solve(G_minus, k.T)).item()
    share = B.fact_residual_share(k, np.linalg.inv(G), omega)
    assert math.isclose(share, 1 / (1 + omega * m), rel_tol=1e-9, abs_tol=1e-12 * cond)
    for bound in B.t3_fact_cost_bounds(problem, edits, W_t, batch=batch, row=row, weights=weights):
        assert_holds(bound, slack, eigen_rtol(cond))
    for j in {1, len(edits)}:
        interference = B.t5_fact_interference_bound(problem, edits, W_t, edits[j - 1][0], batch=batch, row=row,
                                                    weights=weights)
        assert_holds(interference, slack, eigen_rtol(cond))
    retention = B.t5_fact_retention_bound(problem, edits, W_t, W_true, batch=batch, row=row, weights=weights)
    assert_holds(retention, slack)


def _stream_with_fact_weight(edits, weights, batch: int, row: int, omega_i: float):
    """The same edits and weights, with fact (batch, row) given weight ``omega_i`` (0: removed)."""
    edits = list(edits)
    weights = [_omega(w, K.shape[0]) for (K, _), w in zip(edits, weights, strict=True)]
    w = weights[batch - 1].copy()
    if omega_i > 0:
        w[row] = omega_i
        weights[batch - 1] = w
        return edits, weights
    K, V = edits[batch - 1]
    keep = np.arange(K.shape[0]) != row
    if keep.any():
        edits[batch - 1] = (K[keep], V[keep])
        weights[batch - 1] = w[keep]
    else:
        del edits[batch - 1], weights[batch - 1]
    return edits, weights


def _rest_of_objective(problem, edits, weights, batch, row, W) -> float:
    """Every term of ``J_t`` except fact (batch, row)'s own: the other fits and the regulariser."""
    others, other_w = _stream_with_fact_weight(edits, weights, batch, row, 0.0)
    return objective(problem, others, W, weights=other_w) if others else objective(problem, [], W)


@THEORY_SETTINGS
@given(weighted_instances(max_T=8, d_k=(2, 8)), st.data())
def test_raising_one_fact_weight_monotonicity_bounds(instance, data):
    problem, edits, weights = instance
    batch = data.draw(st.integers(1, len(edits)), label="batch")
    row = data.draw(st.integers(0, edits[batch - 1][0].shape[0] - 1), label="row")
    k, v = edits[batch - 1][0][row : row + 1], edits[batch - 1][1][row : row + 1]
    grid = [0.0, 0.01, 0.1, 1.0, 3.0, 10.0, 100.0, 1e4]
    conds, Ws = [], []
    for omega_i in grid:
        e, w = _stream_with_fact_weight(edits, weights, batch, row, omega_i)
        conds.append(weighted_cond(problem, e, w) if e else 1.0)
        Ws.append(explicit_normal_equations(problem, e, w)[2] if e else problem.W_star0)
    cond = max(conds)
    W_minus = Ws[0]
    G_minus = explicit_normal_equations(
        problem, *_stream_with_fact_weight(edits, weights, batch, row, 0.0)
    )[0] if len(edits) > 1 or edits[0][0].shape[0] > 1 else problem.metric
    m = (k @ np.linalg.solve(G_minus, k.T)).item()
    tol = 1e-12 * cond * (np.linalg.norm(k) * max(np.linalg.norm(W) for W in Ws) + np.linalg.norm(v)) + 1e-300
    residuals = [float(np.linalg.norm(v - k @ W)) for W in Ws]
    metrics = {"I": np.eye(problem.d_k), "A": problem.metric, "G_-i": G_minus}
    moved = {name: [math.sqrt(max(float(np.sum((W - W_minus) * (M @ (W - W_minus)))), 0.0)) for W in Ws]
             for name, M in metrics.items()}
    others_keys = np.vstack([K for K, _ in edits])
    interference = [float(np.linalg.norm(others_keys @ (W - W_minus))) for W in Ws]
    rest = [_rest_of_objective(problem, edits, weights, batch, row, W) for W in Ws]
    for a in range(len(grid) - 1):
        w1, w2 = grid[a], grid[a + 1]
        ratio = (1 + w1 * m) / (1 + w2 * m)  # < 1: the exact factor between the two residuals
        # (1) Its own residual falls by exactly that factor, strictly when that is measurable.
        assert abs(residuals[a + 1] - ratio * residuals[a]) <= 10 * tol, (w1, w2)
        if residuals[a] * (1 - ratio) > 100 * tol:
            assert residuals[a + 1] < residuals[a]
        # (2) The weights move along one fixed direction, further with every raise, in any norm.
        phi1, phi2 = w1 / (1 + w1 * m), w2 / (1 + w2 * m)
        for name, d in moved.items():
            norm_tol = 10 * tol * np.linalg.norm(metrics[name], 2) ** 0.5 / max(np.linalg.norm(k), 1e-300)
            assert d[a + 1] >= d[a] - norm_tol, name
            if phi1 > 0:
                assert abs(d[a + 1] - d[a] * phi2 / phi1) <= norm_tol + 1e-9 * d[a + 1], name
        # ... and so does the interference on every other key, ||K (W(w) - W(0))||.
        assert interference[a + 1] >= interference[a] * (1 - 1e-9) - 10 * tol * np.linalg.norm(others_keys)
        # (3) The rest of the objective (other edits and preservation) never falls.
        assert rest[a + 1] >= rest[a] - 1e-9 * cond * 1e-3 * (abs(rest[a]) + 1)
    # (4) Saturation: the displacement stays below the exact write of the fact, ||e^0|| / sqrt(m).
    e0 = residuals[0]
    if m > 0:
        assert moved["G_-i"][-1] <= e0 / math.sqrt(m) * (1 + 1e-9) + 10 * tol


def test_the_cost_is_relative_deviation_from_the_preservation_state_can_fall_bounds():
    """Only the displacement caused by a fact must grow with its weight: a fact that asks for the
    preservation state's own output pulls the weights back, so ||W - W*_0|| falls as it gets heavier,
    while its displacement from the stream without it grows (and the rest of J_t does not fall)."""
    problem = Problem(np.zeros((1, 1)), 1.0, 0.0)  # A = 1, W*_0 = 0
    edits = [(np.ones((1, 1)), np.ones((1, 1))), (np.ones((1, 1)), np.zeros((1, 1)))]
    deviation, displacement, rest = [], [], []
    W_minus = closed_form(problem, edits[:1])  # = 1/2
    for w in (0.1, 1.0, 10.0):
        W = closed_form(problem, edits, weights=[None, [w]])
        assert math.isclose(W.item(), 1.0 / (2.0 + w), rel_tol=1e-14)
        deviation.append(abs((W - problem.W_star0).item()))
        displacement.append(abs((W - W_minus).item()))
        rest.append(objective(problem, edits[:1], W))
    assert deviation[0] > deviation[1] > deviation[2]
    assert displacement[0] < displacement[1] < displacement[2] < 0.5  # below the exact write, 1/2
    assert rest[0] < rest[1] < rest[2]
    for w, dev in zip((0.1, 1.0, 10.0), deviation, strict=True):  # weighted T3 still holds
        bound = B.t3_metric_bound(problem, edits, np.array([[1.0 / (2.0 + w)]]), weights=[None, [w]])
        assert bound.holds(1e-14) and math.isclose(bound.lhs, dev**2, rel_tol=1e-12)


# ----------------------------------------------------------------------------------------------
# Bad weights: typed errors, state unchanged

BAD_WEIGHTS = [
    ([1.0, 0.0], HyperparameterError),
    ([1.0, -2.0], HyperparameterError),
    (0.0, HyperparameterError),
    ([1.0, np.nan], NonFiniteError),
    ([np.inf, 1.0], NonFiniteError),
    ([1.0], ShapeError),
    ([1.0, 1.0, 1.0], ShapeError),
    ([[1.0, 1.0]], ShapeError),
    ("heavy", ShapeError),
    ([1e308, 1.0], NonFiniteError),  # sqrt(1e308) * 1e200 overflows
]


def _state(obj) -> tuple:
    names = ("W_", "C_", "G_", "n_updates_", "n_rows_", "_X")
    out = []
    for name in names:
        value = getattr(obj, name, None)
        out.append(value.copy() if isinstance(value, np.ndarray) else value)
    step = getattr(obj, "last_step_", None)
    out.append(None if step is None else tuple(a.copy() for a in step))
    return tuple(out)


def _same(a: tuple, b: tuple) -> bool:
    def eq(x, y):
        if isinstance(x, tuple):
            return isinstance(y, tuple) and len(x) == len(y) and all(eq(p, q) for p, q in zip(x, y, strict=True))
        if isinstance(x, np.ndarray):
            return isinstance(y, np.ndarray) and np.array_equal(x, y)
        return x == y

    return eq(a, b)


@pytest.mark.parametrize(("bad", "error"), BAD_WEIGHTS)
def test_bad_weights_raise_typed_errors_and_leave_every_solver_unchanged(bad, error):
    rng = np.random.default_rng(2)
    d_k, d_v = 3, 2
    problem = Problem(rng.standard_normal((d_k, d_v)), 0.5, 0.0)
    K, V = rng.standard_normal((2, d_k)), rng.standard_normal((2, d_v))
    if error is NonFiniteError and np.isfinite(np.asarray(bad, dtype=float)).all():
        K = np.full((2, d_k), 1e200)  # the scaled rows overflow
    rls = RecursiveLS(problem)
    rls.update(rng.standard_normal((2, d_k)), rng.standard_normal((2, d_v)), [2.0, 0.5])
    editors = [rls, HardWrite(problem), PerBatchReset(problem), NullSpaceProjection(problem), DenseCumulative(problem)]
    for editor in editors[1:]:
        editor.update(rng.standard_normal((1, d_k)), rng.standard_normal((1, d_v)))
    for editor in editors:
        before = _state(editor)
        with pytest.raises(error):
            editor.update(K, V, bad)
        assert _same(_state(editor), before), type(editor).__name__
    before = _state(rls)
    with pytest.raises(error):
        rls.downdate(K, V, bad)
    with pytest.raises(error):
        rls.partial_fit(K, V, bad)
    assert _same(_state(rls), before)
    C, W = rls.C_.copy(), rls.W_.copy()
    for step in (woodbury_update, woodbury_downdate):
        with pytest.raises(error):
            step(C, W, K, V, bad)
    assert np.array_equal(C, rls.C_) and np.array_equal(W, rls.W_)
    # The objective, the closed form and the bounds refuse them too (typed, ValueError subclasses).
    edits = [(K, V)]
    for call in (
        lambda: closed_form(problem, edits, weights=[bad]),
        lambda: objective(problem, edits, problem.W0, weights=[bad]),
        lambda: B.t2_residual_identity(K, V, W, W, C, weights=bad),
        lambda: B.t2_weighted_residual_identity(K, V, W, W, C, weights=bad),
        lambda: B.t3_metric_bound(problem, edits, W, weights=[bad]),
        lambda: B.t2_fact_identity(problem, edits, W, batch=1, row=0, weights=[bad]),
    ):
        with pytest.raises(error):
            call()
    assert issubclass(error, ValueError)


def test_weights_must_match_the_batches_and_facts_must_exist():
    rng = np.random.default_rng(3)
    problem = Problem(rng.standard_normal((3, 1)), 1.0, 0.0)
    edits = [(rng.standard_normal((2, 3)), rng.standard_normal((2, 1))), (rng.standard_normal((1, 3)), np.ones((1, 1)))]
    W = closed_form(problem, edits)
    with pytest.raises(ShapeError):
        closed_form(problem, edits, weights=[None])  # one entry per batch
    with pytest.raises(ShapeError):
        weighted_edits(problem, edits, 2.0)  # a bare scalar: which batch?
    with pytest.raises(ShapeError):
        run_stream(RecursiveLS(problem), edits, [None])
    with pytest.raises(HyperparameterError):
        B.t2_fact_identity(problem, edits, W, batch=3, row=0)  # batches are 1-based, t = 2
    with pytest.raises(HyperparameterError):
        B.t2_fact_identity(problem, edits, W, batch=2, row=1)  # batch 2 has one row
    with pytest.raises(HyperparameterError):
        B.fact_residual_share(edits[1][0], np.eye(3), 0.0)
    with pytest.raises(ShapeError):
        B.fact_residual_share(edits[0][0], np.eye(3), 1.0)  # two keys, not one fact
    # Removing more weight than a batch carries is refused, and the state is kept.
    problem = Problem(np.zeros((2, 1)), 0.1, 0.0)
    rls = RecursiveLS(problem)
    K, V = np.array([[3.0, 0.0]]), np.ones((1, 1))
    rls.update(K, V, [1.0])
    before = _state(rls)
    with pytest.raises(NotPositiveDefiniteError):
        rls.downdate(K, V, [2.0])
    assert _same(_state(rls), before)
