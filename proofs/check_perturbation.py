"""Machine check of the algebra behind theorem T7 (asymptotics) and its corollaries C1 and C3.

Notation (proofs/T7_asymptotics.md): ``Shat_t = (1/t) sum K_i^T K_i``, ``Bhat_t = (1/t) sum
K_i^T V_i``, ``shat_t = (1/t) sum ||V_i||^2``; ``H_t = Shat_t + (alpha_t/t) I + (beta_t/t)
K0^T K0``, ``b_t = Bhat_t + (alpha_t/t) W0 + (beta_t/t) K0^T V0``; the limits ``H``, ``b``,
``W_inf`` with ``H W_inf = b``.

Checked:

* step 1: ``J_t(W)/t`` equals the expanded normalised objective (explicit sizes, ``t = 2, 3``
  batches, symbolic ``alpha``, ``beta``, ``t`` fixed);
* the exact decomposition of ``Jbar_t - Jbar_inf`` into the five terms bounded in (i);
* (iii) the normalised normal equations: ``(G_t W - B_t)/t = H_t W - b_t``;
* the perturbation identity ``H_t (W_t - W_inf) = (b_t - b) - (H_t - H) W_inf`` (free algebra);
* C1: ``H_t (W_t - W_LS) = -[(alpha_t/t)(W_LS - W0) + (beta_t/t) K0^T (K0 W_LS - V0)]`` when
  ``Shat_t W_LS = Bhat_t`` (free algebra);
* C3: adding the two optimality inequalities gives ``(rho2 - rho1)(g2 - g1)``.

Run: ``python proofs/check_perturbation.py`` (exit status 0 iff every identity is verified).
"""

from __future__ import annotations

import sys
from pathlib import Path

import sympy as sp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _symbolic import (  # noqa: E402
    Report,
    generic,
    is_zero_matrix,
    is_zero_word_polynomial,
    nc,
    trace_inner,
)


def perturbation_identity(sign: int = -1) -> bool:
    """``H_t (W_t - W_inf) - [(b_t - b) + sign (H_t - H) W_inf] == 0`` given ``H_t W_t = b_t``,
    ``H W_inf = b``. ``sign=-1`` is the theorem; ``sign=+1`` is a wrong variant."""
    Ht, H, Wt, Winf, bt, b = nc("Ht H Wt Winf bt b")
    relations = [(Ht * Wt, bt), (H * Winf, b)]
    expr = Ht * (Wt - Winf) - ((bt - b) + sign * (Ht - H) * Winf)
    return is_zero_word_polynomial(expr, relations)


def _stream(t: int, u: int, d_k: int, d_v: int):
    return [(generic(f"k{i}", u, d_k), generic(f"v{i}", u, d_v)) for i in range(t)]


def normalised_objective(t: int, u: int, d_k: int, d_v: int, n0: int = 1) -> bool:
    """``J_t(W)/t - [tr(W^T Shat W) - 2 tr(W^T Bhat) + shat + (alpha/t)||W - W0||^2
    + (beta/t)||K0 W - V0||^2] == 0``."""
    alpha, beta = sp.symbols("alpha beta", real=True)
    batches = _stream(t, u, d_k, d_v)
    W, W0 = generic("w", d_k, d_v), generic("w0", d_k, d_v)
    K0, V0 = generic("q", n0, d_k), generic("p", n0, d_v)
    J = sum((trace_inner(Ki * W - Vi, Ki * W - Vi) for Ki, Vi in batches), sp.Integer(0))
    J += alpha * trace_inner(W - W0, W - W0) + beta * trace_inner(K0 * W - V0, K0 * W - V0)
    Shat = sum((Ki.T * Ki for Ki, _ in batches), sp.zeros(d_k, d_k)) / t
    Bhat = sum((Ki.T * Vi for Ki, Vi in batches), sp.zeros(d_k, d_v)) / t
    shat = sum((trace_inner(Vi, Vi) for _, Vi in batches), sp.Integer(0)) / t
    expanded = (
        trace_inner(W, Shat * W) - 2 * trace_inner(W, Bhat) + shat
        + alpha / t * trace_inner(W - W0, W - W0) + beta / t * trace_inner(K0 * W - V0, K0 * W - V0)
    )
    return is_zero_matrix(J / t - expanded)


def pointwise_decomposition(d_k: int, d_v: int, n0: int = 1) -> bool:
    """``Jbar_t - Jbar_inf`` equals the five-term sum bounded in step (i) (generic statistics)."""
    at, bt, a, b = sp.symbols("at bt a b", real=True)  # alpha_t/t, beta_t/t and their limits
    St, Sig = generic("st", d_k, d_k), generic("sg", d_k, d_k)
    Bt, Bs = generic("bt", d_k, d_v), generic("bs", d_k, d_v)
    st, s = sp.symbols("shat s", real=True)
    W, W0 = generic("w", d_k, d_v), generic("w0", d_k, d_v)
    K0, V0 = generic("q", n0, d_k), generic("p", n0, d_v)
    prox = trace_inner(W - W0, W - W0)
    anch = trace_inner(K0 * W - V0, K0 * W - V0)

    def Jbar(S_, B_, s_, a_, b_):
        return trace_inner(W, S_ * W) - 2 * trace_inner(W, B_) + s_ + a_ * prox + b_ * anch

    diff = Jbar(St, Bt, st, at, bt) - Jbar(Sig, Bs, s, a, b)
    terms = (
        trace_inner(W, (St - Sig) * W) - 2 * trace_inner(W, Bt - Bs) + (st - s)
        + (at - a) * prox + (bt - b) * anch
    )
    return is_zero_matrix(diff - terms)


def normalised_normal_equations(t: int, u: int, d_k: int, d_v: int, n0: int = 1) -> bool:
    """``(G_t W - B_t)/t - (H_t W - b_t) == 0`` with ``G_t``, ``B_t`` built from the batches."""
    alpha, beta = sp.symbols("alpha beta", real=True)
    batches = _stream(t, u, d_k, d_v)
    W, W0 = generic("w", d_k, d_v), generic("w0", d_k, d_v)
    K0, V0 = generic("q", n0, d_k), generic("p", n0, d_v)
    G = alpha * sp.eye(d_k) + beta * K0.T * K0 + sum((Ki.T * Ki for Ki, _ in batches), sp.zeros(d_k, d_k))
    B = alpha * W0 + beta * K0.T * V0 + sum((Ki.T * Vi for Ki, Vi in batches), sp.zeros(d_k, d_v))
    Shat = sum((Ki.T * Ki for Ki, _ in batches), sp.zeros(d_k, d_k)) / t
    Bhat = sum((Ki.T * Vi for Ki, Vi in batches), sp.zeros(d_k, d_v)) / t
    Ht = Shat + alpha / t * sp.eye(d_k) + beta / t * K0.T * K0
    bt = Bhat + alpha / t * W0 + beta / t * K0.T * V0
    return is_zero_matrix((G * W - B) / t - (Ht * W - bt))


def c1_identity() -> bool:
    """C1 in the free algebra; ``at``, ``bt`` are the commuting scalars ``alpha_t/t``, ``beta_t/t``.

    Relations: ``Shat W_LS = Bhat`` and ``H_t W_t = b_t`` written as
    ``Shat W_t = Bhat + at W0 + bt K0^T V0 - at W_t - bt K0^T K0 W_t``.
    """
    Shat, Bhat, Wt, WLS, W0, K0, K0t, V0 = nc("Shat Bhat Wt WLS W0 K0 K0t V0")
    at, bt = sp.symbols("at bt", real=True)
    relations = [
        (Shat * WLS, Bhat),
        (Shat * Wt, Bhat + at * W0 + bt * K0t * V0 - at * Wt - bt * K0t * K0 * Wt),
    ]
    Ht = Shat + at + bt * K0t * K0
    expr = Ht * (Wt - WLS) + at * (WLS - W0) + bt * K0t * (K0 * WLS - V0)
    return is_zero_word_polynomial(expr, relations)


def c3_pareto_sum() -> bool:
    """``(f1 + rho1 g1 - f2 - rho1 g2) + (f2 + rho2 g2 - f1 - rho2 g1) = (rho2 - rho1)(g2 - g1)``."""
    f1, f2, g1, g2, rho1, rho2 = sp.symbols("f1 f2 g1 g2 rho1 rho2", real=True)
    lhs = (f1 + rho1 * g1 - f2 - rho1 * g2) + (f2 + rho2 * g2 - f1 - rho2 * g1)
    return is_zero_matrix(lhs - (rho2 - rho1) * (g2 - g1))


def main() -> bool:
    report = Report("T7: asymptotics (check_perturbation.py)")
    report.check("free algebra: H_t (W_t - W_inf) = (b_t - b) - (H_t - H) W_inf", perturbation_identity())
    for t, u, d_k, d_v in [(2, 1, 2, 2), (3, 2, 2, 1)]:
        report.check(f"explicit t={t}, u={u}, d_k={d_k}, d_v={d_v}: step 1 normalised objective",
                     normalised_objective(t, u, d_k, d_v))
        report.check(f"explicit t={t}, u={u}, d_k={d_k}, d_v={d_v}: (G_t W - B_t)/t = H_t W - b_t",
                     normalised_normal_equations(t, u, d_k, d_v))
    report.check("explicit d_k=2, d_v=2: (i) Jbar_t - Jbar_inf = five-term decomposition",
                 pointwise_decomposition(2, 2))
    report.check("free algebra: C1 W_t - W_LS = -H_t^-1[(a_t)(W_LS - W0) + (b_t) K0^T(K0 W_LS - V0)]",
                 c1_identity())
    report.check("scalar: C3 sum of optimality inequalities = (rho2 - rho1)(g2 - g1)", c3_pareto_sum())
    return report.summary()


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
