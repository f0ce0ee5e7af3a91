"""rlsedit_theory.capacity: plasticity, retention and the deterministic-equivalent forecast.

The identities (T2 share, self hat block, retained share) are checked against the closed form
``W_t = G_t^{-1} B_t`` and explicit inverses on small random problems (Hypothesis); the
deterministic equivalent against Monte Carlo averages of the exact state and against the
exact recursion on the same key model; the composition of layers against brute-force loops.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.optimize
from hypothesis import given
from hypothesis import strategies as st

from rlsedit_theory import Problem, closed_form, information_matrix
from rlsedit_theory import capacity as cap
from rlsedit_theory.errors import HyperparameterError, ShapeError

from .conftest import THEORY_SETTINGS, problems_and_streams, random_problem, random_stream


def _inv(M: np.ndarray) -> np.ndarray:
    return np.linalg.inv(M)


def _state(problem: Problem, edits) -> np.ndarray:
    """``C = G^{-1}`` by an explicit inverse of the information matrix (brute force)."""
    return _inv(information_matrix(problem, edits))


# ----------------------------------------------------------------------------------------------
# One write, one earlier batch


@THEORY_SETTINGS
@given(problems_and_streams())
def test_batch_residual_share_is_the_t2_ratio_of_the_closed_form(case):
    """With ``innovation_cov = r r^T`` the share is exactly ``||V - K W_t|| / ||r||`` after the write
    (W from the closed form, not the recursion); with the default it is ``sqrt(tr S^-2 / u)``."""
    problem, edits = case
    *before, (K, V) = edits
    W_prev = closed_form(problem, before)
    W_new = closed_form(problem, edits)
    r = V - K @ W_prev
    C_prev = _state(problem, before)
    if np.linalg.norm(r) > 1e-8:
        expected = np.linalg.norm(V - K @ W_new) / np.linalg.norm(r)
        got = cap.batch_residual_share(C_prev, K, r @ r.T)
        assert got == pytest.approx(expected, rel=1e-7, abs=1e-9)
    S_inv = _inv(np.eye(K.shape[0]) + K @ C_prev @ K.T)
    assert cap.batch_residual_share(C_prev, K) == pytest.approx(np.sqrt(np.trace(S_inv @ S_inv) / K.shape[0]),
                                                                rel=1e-9)
    assert 0 < cap.batch_residual_share(C_prev, K) <= 1 + 1e-12


@THEORY_SETTINGS
@given(problems_and_streams())
def test_batch_mean_share_is_one_minus_the_in_sample_leverage(case):
    problem, edits = case
    *before, (K, _) = edits
    C_t = _state(problem, edits)  # the state WITH the batch
    expected = 1 - np.mean(np.diag(K @ C_t @ K.T))
    assert cap.batch_mean_share(_state(problem, before), K) == pytest.approx(expected, rel=1e-7, abs=1e-9)


@THEORY_SETTINGS
@given(problems_and_streams(), st.data())
def test_self_hat_block_is_the_response_of_the_fit_to_its_own_targets(case, data):
    """``H_jj = I - (I + K_j C_{t,-j} K_j^T)^{-1}`` equals ``K_j G_t^{-1} K_j^T`` and is the exact
    derivative of the fitted values ``K_j W_t`` in ``V_j`` (closed form with and without a change)."""
    problem, edits = case
    j = data.draw(st.integers(0, len(edits) - 1))
    K_j, V_j = edits[j]
    others = edits[:j] + edits[j + 1:]
    H = cap.self_hat_block(_state(problem, others), K_j)
    np.testing.assert_allclose(H, K_j @ _state(problem, edits) @ K_j.T, rtol=1e-7, atol=1e-9)
    E = np.random.default_rng(j).standard_normal(V_j.shape)
    moved = edits[:j] + [(K_j, V_j + E)] + edits[j + 1:]
    response = K_j @ (closed_form(problem, moved) - closed_form(problem, edits))
    np.testing.assert_allclose(response, H @ E, rtol=1e-6, atol=1e-8 * (1 + np.abs(H @ E).max()))
    eig = np.linalg.eigvalsh(H)
    assert eig.min() > -1e-10 and eig.max() < 1


def test_retained_share_falls_as_later_edits_arrive():
    """An early batch keeps ``tr H(now) / tr H(then)`` of its response: 1 when nothing came after
    it, decreasing with every later batch, and equal to the brute-force trace ratio."""
    rng = np.random.default_rng(3)
    problem = random_problem(rng, 8, 3, alpha=0.5, beta=1.0, anchor="gram", full_rank_anchor=True)
    edits = random_stream(rng, 8, 3, 12, u_max=3, rank_deficient=0.0)
    K_1 = edits[0][0]
    C_then = _state(problem, [])
    values = []
    for t in range(1, len(edits) + 1):
        C_now = _state(problem, edits[1:t])  # everything but batch 1, up to t
        got = cap.retained_share(C_then, C_now, K_1)
        brute = np.trace(K_1 @ _state(problem, edits[:t]) @ K_1.T) / np.trace(
            K_1 @ _state(problem, edits[:1]) @ K_1.T)
        assert got == pytest.approx(brute, rel=1e-9)
        values.append(got)
    assert values[0] == pytest.approx(1.0)
    assert all(b <= a + 1e-12 for a, b in zip(values, values[1:], strict=False))
    assert 0 < values[-1] < 1


def test_the_write_functions_refuse_bad_input():
    C = np.eye(3)
    with pytest.raises(ShapeError):
        cap.batch_residual_share(C, np.ones((2, 4)))
    with pytest.raises(ShapeError):
        cap.batch_residual_share(np.ones((3, 2)), np.ones((2, 3)))
    with pytest.raises(ShapeError):
        cap.batch_residual_share(C, np.ones((2, 3)), np.eye(3))
    with pytest.raises(HyperparameterError):
        cap.retained_share(C, C, np.zeros((1, 3)))


# ----------------------------------------------------------------------------------------------
# The key model and the deterministic equivalent


def _anisotropic(rng, d: int, decay: float = 0.9) -> np.ndarray:
    """A covariance with eigenvalues ``decay^k`` in a random basis."""
    Q = np.linalg.qr(rng.standard_normal((d, d)))[0]
    return (Q * decay ** np.arange(d)) @ Q.T


def test_ledoit_wolf_shrinkage_is_large_for_isotropic_and_small_for_well_sampled_anisotropic_keys():
    rng = np.random.default_rng(0)
    iso = rng.standard_normal((40, 30))
    assert cap.ledoit_wolf_shrinkage(iso) > 0.7
    cov = _anisotropic(rng, 10, 0.5)
    many = rng.multivariate_normal(np.zeros(10), cov, size=5000)
    assert cap.ledoit_wolf_shrinkage(many) < 0.05
    for X in (iso, many):
        assert 0 <= cap.ledoit_wolf_shrinkage(X) <= 1
    with pytest.raises(ShapeError):
        cap.ledoit_wolf_shrinkage(np.ones((1, 3)))


@pytest.mark.parametrize("shrinkage", [None, 0.0, 0.4, 1.0])
def test_key_model_low_rank_form_is_the_dense_second_moment(shrinkage):
    """The spectrum and eigenvectors (kept in low-rank form, from an (n+1, d) factor) describe
    exactly ``mean mean^T + (1 - g) S + g tr(S)/d I`` in the coordinates whitened by ``A``."""
    rng = np.random.default_rng(1)
    d, n = 12, 7
    A = _anisotropic(rng, d) + 0.5 * np.eye(d)
    keys = rng.standard_normal((n, d)) @ np.linalg.cholesky(A).T + 0.3
    model = cap.fit_key_model(keys, A, shrinkage=shrinkage)
    L = np.linalg.cholesky(A)
    X = np.linalg.solve(L, keys.T).T
    np.testing.assert_allclose(model.samples, X, rtol=1e-10)
    np.testing.assert_allclose(model.whiten(keys), X, rtol=1e-10)
    g = model.shrinkage
    Xc = X - X.mean(axis=0)
    S = Xc.T @ Xc / (n - 1)
    dense = np.outer(X.mean(axis=0), X.mean(axis=0)) + (1 - g) * S + g * np.trace(S) / d * np.eye(d)
    np.testing.assert_allclose(model.second_moment(), dense, rtol=1e-10, atol=1e-12)
    U = model.eigenvectors
    rebuilt = (U * model.spectrum[:model.rank]) @ U.T + model.floor * (np.eye(d) - U @ U.T)
    np.testing.assert_allclose(rebuilt, dense, rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(np.sort(model.spectrum), np.linalg.eigvalsh(dense), rtol=1e-8, atol=1e-11)
    assert model.rank <= n


def test_key_model_draws_have_the_model_moments():
    rng = np.random.default_rng(2)
    d = 6
    model = cap.fit_key_model(rng.standard_normal((9, d)) + 1.0, np.eye(d) * 2, shrinkage=0.3)
    draws = model.draw(np.random.default_rng(0), 200_000)
    second = draws.T @ draws / len(draws)
    np.testing.assert_allclose(second, model.second_moment(), atol=0.03 * np.abs(model.second_moment()).max())


def test_equivalent_leverage_solves_its_fixed_point_and_falls_with_n():
    rng = np.random.default_rng(4)
    lam = rng.exponential(0.05, size=40)
    assert cap.equivalent_leverage(lam, 0) == pytest.approx(lam.sum())
    prev = np.inf
    for n in (1, 10, 100, 1000, 10_000):
        delta = cap.equivalent_leverage(lam, n)
        assert delta == pytest.approx(np.sum(lam / (1 + n * lam / (1 + delta))), rel=1e-10)
        root = scipy.optimize.brentq(lambda x, n=n: x - np.sum(lam / (1 + n * lam / (1 + x))), 0, lam.sum())
        assert delta == pytest.approx(root, rel=1e-8)
        assert delta < prev
        prev = delta
    # far past the dimension: delta ~ d / n
    assert cap.equivalent_leverage(lam, 1e7) * 1e7 == pytest.approx(40, rel=0.01)
    with pytest.raises(HyperparameterError):
        cap.equivalent_leverage([-1.0], 3)


def test_equivalent_state_matches_the_monte_carlo_mean_of_the_exact_state():
    """``E[G_n^{-1}]`` and a fresh key's mean leverage, averaged over independent draws of ``n``
    Gaussian keys, against the deterministic equivalent (d = 100, below and above n = d)."""
    rng = np.random.default_rng(5)
    d = 100
    A = _anisotropic(rng, d, 0.97) + 0.2 * np.eye(d)
    root = np.linalg.cholesky(_anisotropic(rng, d, 0.95) * 0.05)  # a fresh key's leverage on A: about 2.4
    model = cap.fit_key_model(rng.standard_normal((400, d)) @ root.T, A, shrinkage=0.0)
    L = np.linalg.cholesky(A)
    for n in (50, 200):
        C_bar = cap.equivalent_state(model, n)
        mean_C, lev = np.zeros((d, d)), []
        for _ in range(200):
            K = model.draw(rng, n) @ L.T  # back to the original coordinates
            C = np.linalg.inv(A + K.T @ K)
            mean_C += C / 200
            k = model.draw(rng, 1) @ L.T
            lev.append(float((k @ C @ k.T)[0, 0]))
        assert np.linalg.norm(C_bar - mean_C) / np.linalg.norm(mean_C) < 0.05
        assert np.mean(lev) == pytest.approx(cap.equivalent_leverage(model.spectrum, n), rel=0.05)
    np.testing.assert_allclose(cap.equivalent_state(model, 0), np.linalg.inv(A), rtol=1e-9, atol=1e-12)


def test_forecast_shares_starts_exact_and_agrees_with_the_exact_recursion():
    """At position 0 the forecast is the exact T2 share of the sample batches on ``A^{-1}``; later
    it agrees with the exact recursion on keys drawn from the same model; shares rise, retention
    falls from 1."""
    rng = np.random.default_rng(6)
    d, batch = 120, 20
    A = _anisotropic(rng, d, 0.97) + 0.2 * np.eye(d)
    # keys about as strong as the prior (a fresh key's leverage on A near 4), as on SmolLM2
    keys = rng.standard_normal((120, d)) @ np.linalg.cholesky(_anisotropic(rng, d, 0.97) * 0.05).T + 0.02
    model = cap.fit_key_model(keys, A)
    positions = [0, 40, 120, 240, 480]
    f = cap.forecast_shares(model, positions, batch=batch)
    exact0 = np.mean([cap.batch_residual_share(np.linalg.inv(A), keys[i:i + batch]) for i in range(0, 120, batch)])
    assert f["share"][0] == pytest.approx(exact0, rel=1e-9)
    assert f["retained"][0] == pytest.approx(1.0) and f["retained"][1] < 1
    assert np.all(np.diff(f["share"]) > 0) and np.all(np.diff(f["retained"]) < 0)
    assert np.all(np.diff(f["leverage"]) < 0)
    sims = [cap.simulate_states(model, positions, batch=batch, rng=np.random.default_rng(s))["share"] for s in range(4)]
    np.testing.assert_allclose(np.mean(sims, axis=0), f["share"], atol=0.03)
    with pytest.raises(HyperparameterError):
        cap.simulate_states(model, [5], batch=batch, rng=rng)
    with pytest.raises(ShapeError):
        cap.forecast_shares(model, [0], batch=1000)


# ----------------------------------------------------------------------------------------------
# Several layers


def _compose_loop(s, eta):
    left = 1.0
    L = len(s)
    for i, si in enumerate(s):
        e = 1.0 if i == L - 1 else eta[i]
        left *= 1 - e * (1 - si) / (L - i)
    return left


@THEORY_SETTINGS
@given(st.lists(st.floats(0, 1), min_size=1, max_size=9), st.floats(0, 1))
def test_compose_layers_bounds_and_contributions(shares, eta):
    s = np.array(shares)
    got = cap.compose_layers(s, eta)
    assert got == pytest.approx(_compose_loop(s, [eta] * len(s)), abs=1e-12)
    assert np.prod(s) - 1e-12 <= got <= s[-1] + 1e-12  # at most the last layer's share, at least the product
    c = cap.layer_contributions(s, eta)
    assert np.all(c >= -1e-15) and c.sum() == pytest.approx(1 - got, abs=1e-12)
    assert cap.compose_layers(s, min(eta + 0.1, 1.0)) <= got + 1e-12  # more propagation leaves less


def test_compose_layers_limits_and_vectorised_positions():
    assert cap.compose_layers([0.4], 0.2) == pytest.approx(0.4)
    assert cap.compose_layers([0.0] * 5, 1.0) == pytest.approx(0.0)
    assert cap.compose_layers([1.0] * 5, 0.7) == pytest.approx(1.0)
    grid = np.array([[0.3, 0.5], [0.4, 0.6], [0.2, 0.7]])  # (L, T)
    out = cap.compose_layers(grid, 0.5)
    assert out.shape == (2,)
    for k in range(2):
        assert out[k] == pytest.approx(cap.compose_layers(grid[:, k], 0.5))
    with pytest.raises(HyperparameterError):
        cap.compose_layers([1.5], 1.0)


@pytest.mark.parametrize("eta", [0.0, 0.3, 0.9, 1.6])
def test_propagation_for_inverts_the_composition(eta):
    s = np.array([0.35, 0.36, 0.34, 0.32, 0.3])
    assert cap.propagation_for(s, cap.compose_layers(s, eta)) == pytest.approx(eta, abs=1e-9)
    assert cap.propagation_for([0.3], 0.5) == 1.0


def test_interpolate_propagation_is_the_line_through_its_points_clipped():
    points = [(0.3, 0.4), (0.6, 0.55)]
    assert cap.interpolate_propagation(points, 0.3) == pytest.approx(0.4)
    assert cap.interpolate_propagation(points, 0.6) == pytest.approx(0.55)
    assert cap.interpolate_propagation(points, 0.45) == pytest.approx(0.475)
    assert cap.interpolate_propagation(points, 0.0) == pytest.approx(0.4)  # clipped at the smallest eta
    assert cap.interpolate_propagation(points, 3.0) == pytest.approx(1.0)  # clipped at 1
    assert cap.interpolate_propagation([(0.5, 0.7)], np.array([0.1, 0.9])).tolist() == [0.7, 0.7]
    with pytest.raises(ShapeError):
        cap.interpolate_propagation([], 0.5)


@pytest.mark.parametrize("L", [1, 2, 5, 9])
def test_equal_shares_compose_to_the_gamma_product(L):
    """With equal shares ``sigma`` and ``a = eta (1 - sigma)``: ``s = sigma Gamma(L + 1 - a) /
    (Gamma(2 - a) Gamma(L + 1))``, the formula the docs use for what a wider window buys."""
    from scipy.special import gamma

    sigma, eta = 0.6, 0.55
    a = eta * (1 - sigma)
    expected = sigma * gamma(L + 1 - a) / (gamma(2 - a) * gamma(L + 1))
    assert cap.compose_layers([sigma] * L, eta) == pytest.approx(expected, rel=1e-12)
