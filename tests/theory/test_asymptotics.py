"""T7 and its corollaries C1-C4 on stationary streams with fixed seeds.

Asymptotic statements are checked the way theory.md recommends: i.i.d. Gaussian keys with a fixed
covariance, ``V = K W_true + noise``, and an error that decreases over a decade of ``t`` (not an
exact rate). Tests of inequalities have "bounds" in their names. States are the exact minimisers
(closed form or :func:`conftest.exact_steps`), so these tests do not depend on the recursion.
"""

from __future__ import annotations

import numpy as np
import pytest

from rlsedit_theory import Problem, closed_form, objective_terms
from rlsedit_theory import bounds as B
from rlsedit_theory.asymptotics import (
    empirical_moments,
    hard_write_limit,
    limit_weights,
    make_stationary_stream,
    misfit,
    preservation,
    stationary_moments,
    t7_pointwise_bound,
    t7_rate_bound,
    tradeoff_path,
)

from .conftest import exact_steps

D_K, D_V, U, NOISE = 6, 3, 2, 0.5


def _setup(seed: int, T: int, *, subspace: int | None = None):
    """A stationary stream, its population moments, ``W0`` and explicit anchor keys ``K0``."""
    rng = np.random.default_rng(seed)
    root = rng.standard_normal((D_K, D_K))
    cov = root @ root.T / D_K + 0.2 * np.eye(D_K)  # condition number ~ 10
    W_true = rng.standard_normal((D_K, D_V))
    W0 = rng.standard_normal((D_K, D_V))
    K0 = rng.standard_normal((3, D_K))
    edits = make_stationary_stream(rng, D_K, D_V, T, U, W_true, cov, NOISE)
    moments = stationary_moments(W_true, cov, NOISE, U)
    if subspace is not None:  # keys confined to a subspace: Sigma_KK singular
        basis = np.linalg.qr(rng.standard_normal((D_K, subspace)))[0]  # (d_k, r)
        P = basis @ basis.T
        edits = [(K @ P, K @ P @ W_true + (V - K @ W_true)) for K, V in edits]
        moments = stationary_moments(W_true, P @ cov @ P, NOISE, U)
    return edits, moments, W_true, W0, K0


def _running_moments(edits):
    """Cumulative ``(S_hat_t, B_hat_t)`` for ``t = 1..T``: arrays (T, d_k, d_k), (T, d_k, d_v)."""
    t = np.arange(1, len(edits) + 1)[:, None, None]
    S = np.cumsum([K.T @ K for K, _ in edits], axis=0) / t
    Bv = np.cumsum([K.T @ V for K, V in edits], axis=0) / t
    return S, Bv


DECADE = (10, 100, 1000)


# ----------------------------------------------------------------------------------------------
# T7


def test_t7_scaled_regularisers_converge_to_limit():
    """alpha_t = 0.8 t, beta_t = 0.2 t: ||W*_t - W_inf|| falls over decades of t."""
    edits, mom, _, W0, K0 = _setup(0, 1000)
    W_inf = limit_weights(mom.S_KK, mom.S_KV, W0, 0.8, 0.2, K0=K0)
    errors = []
    for t in DECADE:
        problem = Problem(W0, 0.8 * t, 0.2 * t, K0=K0)
        errors.append(np.linalg.norm(closed_form(problem, edits[:t]) - W_inf))
    assert errors[1] < errors[0] and errors[2] < errors[1], errors
    assert errors[2] < 0.4 * errors[0], errors


def test_t7_closed_form_consistency():
    """(iii): W*_t = H_t^{-1} b~_t, i.e. the limit formula with the empirical moments."""
    edits, _, _, W0, K0 = _setup(1, 50)
    for t in (1, 7, 50):
        mom_t = empirical_moments(edits[:t])
        alpha_t, beta_t = 0.8 * t, 0.2 * t
        W_t = closed_form(Problem(W0, alpha_t, beta_t, K0=K0), edits[:t])
        W_lim = limit_weights(mom_t.S_KK, mom_t.S_KV, W0, alpha_t / t, beta_t / t, K0=K0)
        np.testing.assert_allclose(W_lim, W_t, rtol=1e-10, atol=1e-12)
        # ... also with the anchor passed as a Problem (whose own alpha, beta are ignored).
        W_lim2 = limit_weights(
            mom_t.S_KK, mom_t.S_KV, Problem(W0, 1.0, 1.0, K0=K0), alpha_t / t, beta_t / t
        )
        np.testing.assert_allclose(W_lim2, W_t, rtol=1e-10, atol=1e-12)


def test_t7_perturbation_bounds():
    """||W*_t - W_inf|| <= ||H_t^{-1}|| (||b~_t - b~|| + ||H_t - H|| ||W_inf||) at every t,
    also with a W_t passed in (the closed form of J_t) at checkpoints."""
    edits, mom, _, W0, K0 = _setup(2, 400)
    S, Bv = _running_moments(edits)
    for t in range(1, len(edits) + 1):
        bound = t7_rate_bound(
            S[t - 1], Bv[t - 1], 0.8, 0.2, mom.S_KK, mom.S_KV, W0, 0.8, 0.2, K0=K0
        )
        assert bound.holds(1e-12, rtol=1e-9), (t, bound)
    # The rhs itself shrinks over a decade (consistency, O_p(t^{-1/2})).
    rhs = [
        t7_rate_bound(S[t - 1], Bv[t - 1], 0.8, 0.2, mom.S_KK, mom.S_KV, W0, 0.8, 0.2, K0=K0).rhs
        for t in (40, 400)
    ]
    assert rhs[1] < 0.6 * rhs[0], rhs
    # Constant ratios: a = b = 0 in the limit while alpha_t / t = 1/t at finite t.
    problem = Problem(W0, 1.0, 0.5, K0=K0)
    for t in (1, 10, 100, 400):
        W_t = closed_form(problem, edits[:t])
        bound = t7_rate_bound(
            S[t - 1], Bv[t - 1], 1.0 / t, 0.5 / t, mom.S_KK, mom.S_KV, problem, 0.0, 0.0, W_t=W_t
        )
        assert bound.holds(1e-12, rtol=1e-9), (t, bound)


def test_t7_pointwise_convergence_bounds():
    """(i): |Jbar_t(W) - Jbar_inf(W)| is within the quantitative bound at random W, and both
    sides shrink over a decade of t."""
    edits, mom, _, W0, K0 = _setup(3, 1000)
    rng = np.random.default_rng(33)
    Ws = [rng.standard_normal((D_K, D_V)) for _ in range(5)]
    gaps = {}
    for t in DECADE:
        mom_t = empirical_moments(edits[:t])
        problem = Problem(W0, 0.8 * t + 1.0, 0.2 * t, K0=K0)  # alpha_t / t = 0.8 + 1/t -> 0.8
        for i, W in enumerate(Ws):
            bound = t7_pointwise_bound(
                W,
                mom_t.S_KK,
                mom_t.S_KV,
                mom_t.s_VV,
                problem.alpha / t,
                problem.beta / t,
                mom.S_KK,
                mom.S_KV,
                mom.s_VV,
                W0,
                0.8,
                0.2,
                K0=K0,
            )
            assert bound.holds(1e-10, rtol=1e-9), (t, bound)
            # The normalised objective of the package equals the expansion of Step 1.
            J_t = objective_terms(problem, edits[:t], W).total / t
            np.testing.assert_allclose(
                J_t,
                misfit(W, mom_t.S_KK, mom_t.S_KV, mom_t.s_VV)
                + preservation(W, W0, problem.alpha / t, problem.beta / t, K0=K0),
                rtol=1e-9,
            )
            gaps.setdefault(i, []).append(bound.rhs)
    for rhs in gaps.values():
        assert rhs[2] < 0.5 * rhs[0], rhs


# ----------------------------------------------------------------------------------------------
# C1, C2


def test_c1_constant_regularisers_reach_least_squares_limit():
    edits, mom, W_true, W0, K0 = _setup(4, 1000)
    problem = Problem(W0, 1.0, 0.5, K0=K0)
    W_ls = np.linalg.solve(mom.S_KK, mom.S_KV)
    np.testing.assert_allclose(W_ls, W_true, atol=1e-10)  # noise is independent of the keys
    errors, shifts = [], []
    for t in DECADE:
        W_t = closed_form(problem, edits[:t])
        errors.append(np.linalg.norm(W_t - W_ls))
        # The preservation terms move W*_t off the sample least squares by exactly
        # -H_t^{-1} [(alpha/t)(W_ls_t - W0) + (beta/t) K0^T (K0 W_ls_t - V0)].
        mom_t = empirical_moments(edits[:t])
        W_ls_t = np.linalg.solve(mom_t.S_KK, mom_t.S_KV)
        a_t, b_t = problem.alpha / t, problem.beta / t
        H_t = mom_t.S_KK + a_t * np.eye(D_K) + b_t * problem.gram0
        shift = -np.linalg.solve(
            H_t, a_t * (W_ls_t - W0) + b_t * problem.K0.T @ (problem.K0 @ W_ls_t - problem.V0)
        )
        np.testing.assert_allclose(W_t - W_ls_t, shift, rtol=1e-7, atol=1e-10)
        shifts.append(t * np.linalg.norm(shift))
    assert max(shifts) < 3 * min(shifts), shifts  # the shift is O(1/t)
    assert errors[1] < errors[0] and errors[2] < errors[1], errors
    assert errors[2] < 0.2 * errors[0], errors


def test_c1_singular_key_covariance_keeps_preservation_off_the_edit_subspace():
    """Keys in a 3-dim subspace: the limit is the minimum-A-deviation least-squares solution
    (the hard-write limit of T6b applied to the population problem)."""
    edits, mom, W_true, W0, K0 = _setup(5, 1000, subspace=3)
    problem = Problem(W0, 1.0, 0.5, K0=K0)
    evals, evecs = np.linalg.eigh(mom.S_KK)
    evals[evals < 1e-10 * evals[-1]] = 0.0  # exact zeros off the subspace (rank 3)
    root = evecs @ np.diag(np.sqrt(evals)) @ evecs.T  # Sigma^{1/2}, (d_k, d_k) PSD
    W_lim = hard_write_limit(problem, [(root, root @ W_true)])
    errors = [np.linalg.norm(closed_form(problem, edits[:t]) - W_lim) for t in DECADE]
    assert errors[2] < 0.2 * errors[0], errors
    # Off the subspace nothing is learned: the limit differs from W_true there.
    assert np.linalg.norm(W_lim - W_true) > 0.1


def test_c2_scaled_regularisers_interpolate_between_least_squares_and_preservation():
    _, mom, _, W0, K0 = _setup(6, 1)
    a1, b1 = 0.8, 0.2
    W_ls = np.linalg.solve(mom.S_KK, mom.S_KV)
    W_star0 = Problem(W0, a1, b1, K0=K0).W_star0
    to_ls = [
        np.linalg.norm(limit_weights(mom.S_KK, mom.S_KV, W0, r * a1, r * b1, K0=K0) - W_ls)
        for r in 10.0 ** np.arange(-1, -5, -1)
    ]
    to_w0 = [
        np.linalg.norm(limit_weights(mom.S_KK, mom.S_KV, W0, r * a1, r * b1, K0=K0) - W_star0)
        for r in 10.0 ** np.arange(2, 6)
    ]
    for distances in (to_ls, to_w0):  # O(rho) and O(1/rho)
        ratios = np.array(distances[:-1]) / np.array(distances[1:])
        assert np.all((ratios > 7) & (ratios < 13)), ratios


# ----------------------------------------------------------------------------------------------
# C3


@pytest.mark.parametrize("anchor_v0", ["consistent", "different"])
def test_c3_tradeoff_path_monotone_bounds(anchor_v0):
    edits, mom, _, W0, K0 = _setup(7, 1)
    V0 = K0 @ W0 if anchor_v0 == "consistent" else K0 @ W0 + 1.0
    rhos = np.concatenate([[0.0], 10.0 ** np.linspace(-3, 3, 25)])
    path = tradeoff_path(mom.S_KK, mom.S_KV, mom.s_VV, W0, 0.8, 0.2, rhos, K0=K0, V0=V0)
    scale = 1e-10 * (abs(path.f).max() + abs(path.g).max())
    assert np.all(np.diff(path.f) >= -scale), path.f  # misfit non-decreasing
    assert np.all(np.diff(path.g) <= scale), path.g  # preservation cost non-increasing
    assert path.f[-1] > path.f[0] + 1e-3 and path.g[-1] < path.g[0] - 1e-3  # a real trade-off
    # The ends: least squares at rho = 0, near W*_0 at rho = 1e3.
    np.testing.assert_allclose(path.W[0], np.linalg.solve(mom.S_KK, mom.S_KV), atol=1e-10)
    W_star0 = Problem(W0, 0.8, 0.2, K0=K0, V0=V0).W_star0
    assert np.linalg.norm(path.W[-1] - W_star0) < 1e-2 * np.linalg.norm(path.W[0] - W_star0)


def test_c3_finite_t_monotone_bounds():
    """At finite t the two parts of J_t move the same way along (alpha, beta) = rho (a1, b1)."""
    edits, _, _, W0, K0 = _setup(8, 40)
    V0 = K0 @ W0 + 0.5
    a1, b1 = 0.8, 0.2
    fits, costs = [], []
    for rho in 10.0 ** np.linspace(-3, 4, 22):
        problem = Problem(W0, rho * a1, rho * b1, K0=K0, V0=V0)
        terms = objective_terms(problem, edits, closed_form(problem, edits))
        fits.append(terms.fit)
        costs.append((terms.proximity + terms.anchor) / rho)
    fits, costs = np.array(fits), np.array(costs)
    scale = 1e-10 * (fits.max() + costs.max())
    assert np.all(np.diff(fits) >= -scale), fits
    assert np.all(np.diff(costs) <= scale), costs
    assert fits[-1] > 2 * fits[0] and costs[-1] < 0.5 * costs[0]
    # ... and the finite-t path equals the limit path with the empirical moments.
    mom_t = empirical_moments(edits)
    t = len(edits)
    path = tradeoff_path(
        mom_t.S_KK,
        mom_t.S_KV,
        mom_t.s_VV,
        W0,
        a1,
        b1,
        10.0 ** np.linspace(-3, 4, 22) / t,
        K0=K0,
        V0=V0,
    )
    np.testing.assert_allclose(path.f * t, fits, rtol=1e-8)
    np.testing.assert_allclose(path.g, costs, rtol=1e-8)  # g is not normalised by t


# ----------------------------------------------------------------------------------------------
# C4


def test_c4_information_growth_bounds():
    """lambda_min(G_t) >= lambda_min(A) + t lambda_min(S_hat_t) at every t, and the floor grows
    linearly: ~ t lambda_min(Sigma_KK)."""
    edits, mom, _, W0, K0 = _setup(9, 300)
    problem = Problem(W0, 1.0, 0.5, gram0=K0.T @ K0)
    for t, _, _, _, _, C_prev, G_prev in exact_steps(problem, edits):
        if (t - 1) % 10 == 0 or t < 10:
            bound = B.information_floor_bound(problem, edits[: t - 1])
            assert bound.holds(1e-11 * np.linalg.norm(G_prev, 2)), (t - 1, bound)
            # The floor is a floor on the state's information: 1 / ||C_t|| = lambda_min(G_t).
            np.testing.assert_allclose(1 / np.linalg.norm(C_prev, 2), bound.rhs, rtol=1e-8)
    lam = np.linalg.eigvalsh(mom.S_KK)[0]
    assert bound.lhs > 0.5 * len(edits) * lam


def test_c4_plasticity_decay():
    """Constant regularisers: ||C_t||_2 = O(1/t), the T2 absorption factor -> 1, and the per-step
    change ||W_t - W_{t-1}|| falls (T4's reading)."""
    edits, _, _, W0, K0 = _setup(10, 1500)
    problem = Problem(W0, 1.0, 0.5, K0=K0)
    c_norm, shortfall, step = {}, {}, {}
    for t, K, _, W_prev, W_new, C_prev, _ in exact_steps(problem, edits):
        shortfall[t] = 1 - B.t2_shrink_factor(K, C_prev)  # 1 - absorption factor
        step[t] = np.linalg.norm(W_new - W_prev)
        c_norm[t - 1] = np.linalg.norm(C_prev, 2)
    scaled = np.array([t * c_norm[t] for t in DECADE])
    assert scaled.max() / scaled.min() < 2.0, scaled  # t ||C_t|| roughly constant
    assert c_norm[1000] < 0.2 * c_norm[100] < 0.04 * c_norm[10]

    def window(values, start):  # the mean over [start, 1.5 start), to average out the noise
        return np.mean([values[t] for t in range(start, start + start // 2)])

    assert window(shortfall, 1000) < 0.2 * window(shortfall, 100) < 0.04 * window(shortfall, 10)
    assert window(shortfall, 1000) < 1e-2  # absorption factor -> 1
    assert window(step, 1000) < 0.3 * window(step, 100) < 0.09 * window(step, 10)


def test_asymptotics_reject_bad_input_with_typed_errors():
    from rlsedit_theory import HyperparameterError, NotPositiveDefiniteError, ShapeError

    _, mom, _, W0, K0 = _setup(11, 1)
    with pytest.raises(NotPositiveDefiniteError):  # A3 fails: H = 0 + 0 + 0
        limit_weights(np.zeros((D_K, D_K)), mom.S_KV, W0, 0.0, 0.0)
    with pytest.raises(HyperparameterError):
        limit_weights(mom.S_KK, mom.S_KV, W0, -1.0, 0.0)
    with pytest.raises(ShapeError):
        limit_weights(mom.S_KK[:3], mom.S_KV, W0, 1.0, 0.0)
    with pytest.raises(ShapeError):
        limit_weights(mom.S_KK, mom.S_KV, W0, 1.0, 1.0, gram0=K0.T @ K0, K0=K0)
    with pytest.raises(HyperparameterError):
        tradeoff_path(mom.S_KK, mom.S_KV, mom.s_VV, W0, 1.0, 0.0, [-1.0])
    with pytest.raises(ShapeError):
        empirical_moments([])
