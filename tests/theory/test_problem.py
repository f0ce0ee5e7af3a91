"""Problem: validation with typed errors, the (lambda, mu) conventions, the preservation state
``W*_0``, and the agreement of explicit and Gram-only anchors."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rlsedit_theory import (
    HyperparameterError,
    NonFiniteError,
    NotPositiveDefiniteError,
    Problem,
    RecursiveLS,
    RLSEditError,
    ShapeError,
    closed_form,
    objective_terms,
)

RNG = np.random.default_rng(20240601)
D_K, D_V = 4, 3
W0 = RNG.standard_normal((D_K, D_V))
K0 = RNG.standard_normal((7, D_K))  # full column rank
V0 = RNG.standard_normal((7, D_V))


# ---------------------------------------------------------------------------------------------
# Typed errors.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(alpha=-1.0, beta=0.0), "alpha must be finite and >= 0"),
        (dict(alpha=1.0, beta=-0.5), "beta must be finite and >= 0"),
        (dict(alpha=float("nan"), beta=1.0), "alpha"),
        (dict(alpha=1.0, beta=float("nan")), "beta"),
        (dict(alpha=float("inf"), beta=1.0), "alpha"),
        (dict(alpha="big", beta=1.0), "alpha must be a real number"),
        (dict(alpha=1.0, beta=None), "beta must be a real number"),
    ],
)
def test_bad_weights_raise_hyperparameter_error(kwargs, match):
    with pytest.raises(HyperparameterError, match=match):
        Problem(W0, **kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(alpha=0.0, beta=0.0),  # A = 0
        dict(alpha=0.0, beta=1.0),  # no anchor: A = 0
        dict(alpha=0.0, beta=1.0, K0=K0[:2]),  # rank-deficient anchor (2 < d_k rows)
        dict(alpha=0.0, beta=1.0, gram0=K0[:2].T @ K0[:2]),
        dict(alpha=0.0, beta=0.0, K0=K0),  # full-rank anchor but beta = 0
        dict(alpha=1.0, beta=1.0, gram0=-5.0 * np.eye(D_K)),  # A = -4 I
    ],
)
def test_singular_metric_raises_not_positive_definite(kwargs):
    with pytest.raises(NotPositiveDefiniteError, match="alpha > 0|semidefinite"):
        Problem(W0, **kwargs)


def test_alpha_zero_with_full_rank_anchor_is_accepted():
    p = Problem(W0, 0.0, 2.0, K0=K0)
    np.testing.assert_allclose(p.metric, 2.0 * K0.T @ K0)


def test_asymmetric_gram_raises():
    g = K0.T @ K0
    g[0, 1] += 1.0
    with pytest.raises(NotPositiveDefiniteError, match="symmetric"):
        Problem(W0, 1.0, 1.0, gram0=g)


def test_gram_symmetrised_when_asymmetric_only_by_round_off():
    g = K0.T @ K0
    g[0, 1] *= 1 + 1e-14
    p = Problem(W0, 1.0, 1.0, gram0=g)
    assert np.array_equal(p.gram0, p.gram0.T)


def test_v0_without_k0_raises():
    with pytest.raises(ShapeError, match="V0 needs explicit anchor keys K0"):
        Problem(W0, 1.0, 1.0, V0=V0)
    with pytest.raises(ShapeError, match="V0 needs"):
        Problem(W0, 1.0, 1.0, gram0=K0.T @ K0, V0=V0)


def test_both_gram_and_k0_raise():
    with pytest.raises(ShapeError, match="not both"):
        Problem(W0, 1.0, 1.0, gram0=K0.T @ K0, K0=K0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(W0=np.ones(D_K)), "W0 must be 2-D"),
        (dict(W0=np.ones((2, 2, 2))), "W0 must be 2-D"),
        (dict(W0="weights"), "W0"),
        (dict(W0=W0, K0=np.ones((5, D_K + 1))), "K0 has shape"),
        (dict(W0=W0, K0=K0, V0=np.ones((6, D_V))), "V0 has shape"),
        (dict(W0=W0, K0=K0, V0=np.ones((7, D_V + 1))), "V0 has shape"),
        (dict(W0=W0, gram0=np.eye(D_K + 1)), "gram0 has shape"),
    ],
)
def test_bad_shapes_raise_shape_error(kwargs, match):
    with pytest.raises(ShapeError, match=match):
        Problem(alpha=1.0, beta=1.0, **kwargs)


@pytest.mark.parametrize("name", ["W0", "K0", "V0", "gram0"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_inputs_raise(name, bad):
    arrays = dict(W0=W0.copy(), K0=K0.copy(), V0=V0.copy(), gram0=K0.T @ K0)
    arrays[name][0, 0] = bad
    kwargs = dict(W0=arrays["W0"])
    if name == "gram0":
        kwargs["gram0"] = arrays["gram0"]
    elif name in ("K0", "V0"):
        kwargs.update(K0=arrays["K0"], V0=arrays["V0"])
    with pytest.raises(NonFiniteError, match=name):
        Problem(alpha=1.0, beta=1.0, **kwargs)


def test_errors_are_value_errors_and_rlsedit_errors():
    for exc in (ShapeError, NonFiniteError, HyperparameterError, NotPositiveDefiniteError):
        assert issubclass(exc, ValueError) and issubclass(exc, RLSEditError)


@pytest.mark.parametrize(
    "K, V, error, match",
    [
        (np.ones((2, D_K + 1)), np.ones((2, D_V)), ShapeError, "K has shape"),
        (np.ones((2, D_K)), np.ones((3, D_V)), ShapeError, "one value per key"),
        (np.ones((2, D_K)), np.ones((2, D_V + 1)), ShapeError, "V has shape"),
        (np.ones((0, D_K)), np.ones((0, D_V)), ShapeError, "at least one row"),
        (np.full((1, D_K), np.nan), np.ones((1, D_V)), NonFiniteError, "K contains NaN"),
        (np.ones((1, D_K)), np.full((1, D_V), np.inf), NonFiniteError, "V contains NaN"),
    ],
)
def test_bad_batches_raise_and_leave_the_state_untouched(K, V, error, match):
    rls = RecursiveLS(Problem(W0, 1.0, 1.0, K0=K0))
    rls.update(RNG.standard_normal((2, D_K)), RNG.standard_normal((2, D_V)))
    before = rls.copy()
    with pytest.raises(error, match=match):
        rls.update(K, V)
    with pytest.raises(error, match=match):
        rls.downdate(K, V)
    assert rls.allclose(before, rtol=0.0)
    assert (rls.n_updates_, rls.n_rows_) == (1, 2)


def test_one_dimensional_key_is_one_row():
    p = Problem(W0, 1.0, 0.0)
    k, v = RNG.standard_normal(D_K), RNG.standard_normal(D_V)
    a, b = RecursiveLS(p), RecursiveLS(p)
    a.update(k, v)
    b.update(k[None, :], v[None, :])
    np.testing.assert_array_equal(a.W_, b.W_)
    assert a.n_rows_ == 1


def test_recursive_ls_needs_a_problem():
    with pytest.raises(TypeError, match="Problem"):
        RecursiveLS(W0)


# ---------------------------------------------------------------------------------------------
# Conventions and the preservation state.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lam, mu", [(0.5, 2.0), (3.0, 0.0), (1.0, 1.0)])
def test_from_lambda_mu_conventions(lam, mu):
    code = Problem.from_lambda_mu(W0, lam, mu, K0=K0)
    assert (code.alpha, code.beta) == (lam**2, mu**2)
    v1 = Problem.from_lambda_mu(W0, lam, mu, convention="v1", K0=K0)
    assert (v1.alpha, v1.beta) == (lam / 2, mu / 2)
    np.testing.assert_allclose(code.metric, lam**2 * np.eye(D_K) + mu**2 * K0.T @ K0)


def test_from_lambda_mu_passes_the_anchor_through():
    p = Problem.from_lambda_mu(W0, 1.0, 2.0, gram0=K0.T @ K0)
    np.testing.assert_allclose(p.gram0, K0.T @ K0)
    p = Problem.from_lambda_mu(W0, 1.0, 2.0, K0=K0, V0=V0)
    np.testing.assert_array_equal(p.V0, V0)


def test_from_lambda_mu_rejects_bad_input():
    with pytest.raises(HyperparameterError, match="convention"):
        Problem.from_lambda_mu(W0, 1.0, 1.0, convention="v3")
    with pytest.raises(HyperparameterError, match="lambda"):
        Problem.from_lambda_mu(W0, -1.0, 1.0)
    with pytest.raises(HyperparameterError, match="mu"):
        Problem.from_lambda_mu(W0, 1.0, float("nan"))


@pytest.mark.parametrize(
    "anchor",
    [dict(), dict(K0=K0), dict(K0=K0, V0=K0 @ W0), dict(gram0=K0.T @ K0)],
    ids=["none", "K0", "K0-V0=K0W0", "gram0"],
)
@pytest.mark.parametrize("alpha, beta", [(1.0, 0.0), (0.3, 5.0), (2.0, 1e-3)])
def test_w_star0_is_w0_when_anchor_is_consistent(anchor, alpha, beta):
    p = Problem(W0, alpha, beta, **anchor)
    np.testing.assert_allclose(p.W_star0, W0, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(RecursiveLS(p).W_, W0, rtol=1e-12, atol=1e-12)


def test_w_star0_with_general_anchor_solves_the_regulariser():
    p = Problem(W0, 0.7, 2.0, K0=K0, V0=V0)
    Ws = p.W_star0
    assert np.linalg.norm(Ws - W0) > 1e-3  # genuinely moved
    np.testing.assert_allclose(p.metric @ Ws, 0.7 * W0 + 2.0 * K0.T @ V0, rtol=1e-12)
    # and alpha = 0: the anchor's own least-squares fit
    p0 = Problem(W0, 0.0, 3.0, K0=K0, V0=V0)
    np.testing.assert_allclose(p0.W_star0, np.linalg.lstsq(K0, V0, rcond=None)[0], rtol=1e-10)


@settings(deadline=None, max_examples=30)
@given(st.integers(0, 2**32 - 1), st.floats(0.0, 5.0), st.floats(0.01, 5.0))
def test_regulariser_is_a_shifted_metric_norm(seed, alpha, beta):
    """Spec 1.2: ``alpha||W - W0||^2 + beta||K0 W - V0||^2 = ||W - W*_0||_A^2 + reg(W*_0)``."""
    rng = np.random.default_rng(seed)
    p = Problem(W0, alpha, beta, K0=K0, V0=V0)
    W = rng.standard_normal((D_K, D_V)) * 3
    reg_W = sum(objective_terms(p, [], W)[1:])
    reg_star = sum(objective_terms(p, [], p.W_star0)[1:])
    D = W - p.W_star0
    assert reg_W == pytest.approx(float(np.sum(D * (p.metric @ D))) + reg_star, rel=1e-10, abs=1e-10)


@settings(deadline=None, max_examples=30)
@given(st.integers(0, 2**32 - 1), st.integers(1, 4), st.floats(0.0, 3.0), st.floats(0.01, 3.0))
def test_explicit_and_gram_anchors_agree(seed, n_batches, alpha, beta):
    """With ``V0 = K0 W0`` the Gram-only anchor gives the same objective terms, minimiser and
    recursion as the explicit anchor."""
    rng = np.random.default_rng(seed)
    explicit = Problem(W0, alpha, beta, K0=K0)
    gram = Problem(W0, alpha, beta, gram0=K0.T @ K0)
    edits = [(rng.standard_normal((2, D_K)), rng.standard_normal((2, D_V))) for _ in range(n_batches)]
    for W in (W0, rng.standard_normal((D_K, D_V)), closed_form(explicit, edits)):
        te, tg = objective_terms(explicit, edits, W), objective_terms(gram, edits, W)
        assert te.fit == tg.fit and te.proximity == tg.proximity
        assert tg.anchor == pytest.approx(te.anchor, rel=1e-9, abs=1e-9 * (1 + te.total))
    np.testing.assert_allclose(closed_form(gram, edits), closed_form(explicit, edits), rtol=1e-10, atol=1e-12)
    a, b = RecursiveLS(explicit), RecursiveLS(gram)
    for K, V in edits:
        a.update(K, V)
        b.update(K, V)
    assert a.allclose(b, rtol=1e-10)


def test_anchor_term_at_w0_is_zero_for_consistent_anchor():
    for p in (Problem(W0, 1.0, 2.0, K0=K0), Problem(W0, 1.0, 2.0, gram0=K0.T @ K0)):
        terms = objective_terms(p, [], W0)
        assert terms.proximity == 0.0
        assert terms.anchor == pytest.approx(0.0, abs=1e-10)
        assert terms.total == terms.fit + terms.proximity + terms.anchor


def test_indefinite_gram0_is_rejected_even_when_A_is_positive_definite():
    import numpy as np
    import pytest

    from rlsedit_theory import NotPositiveDefiniteError, Problem

    with pytest.raises(NotPositiveDefiniteError, match="semidefinite"):
        Problem(np.ones((3, 2)), 1.0, 1.0, gram0=-0.5 * np.eye(3))
