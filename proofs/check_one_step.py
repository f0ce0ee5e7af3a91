"""Machine check of the one-step algebra: theorem T2 (post-write residual), T4 (per-edit change)
and the exact relations behind T5 (interference, cumulative drift).

Notation (proofs/T2_adherence.md, T4_step.md): before the step ``C = G^{-1}`` (``G = G_{t-1}``),
``W = W*_{t-1}``; the batch ``(K, V)``; ``r = V - K W``; ``F = C K^T``; ``S = I + K F``;
``Delta_t = F S^{-1} r``; ``W_t = W + Delta_t``.

Checked:

* T2: ``V - K W_t = S^{-1} r``;
* the one-step normal equation ``(G + K^T K) Delta_t = K^T r`` (T3's relation with prior
  metric ``G``), hence by T3's identity
* T4(a): ``||r||^2 = ||V - K W_t||^2 + ||K Delta_t||^2 + 2 ||Delta_t||_G^2``, also verified
  directly as a rational identity with ``C = G^{-1}`` written out (explicit sizes);
* T5(a): ``K_j Delta_t = K_j C K^T S^{-1} r`` equals ``K_j C_t K^T r`` (the gain identity);
* T5(b): with two later batches, ``G_t (W_t - W_j) = sum_{s>j} K_s^T (V_s - K_s W_j)`` given
  ``G_j W_j = B_j`` and ``G_t W_t = B_t``.

Run: ``python proofs/check_one_step.py`` (exit status 0 iff every identity is verified).
"""

from __future__ import annotations

import sys
from pathlib import Path

import sympy as sp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _symbolic import (  # noqa: E402
    Report,
    generic,
    generic_symmetric,
    is_zero_matrix,
    is_zero_word_polynomial,
    nc,
    trace_inner,
)

G, C, K, Kt, S, Si, W, V = nc("G C K Kt S Si W V")
ONE = sp.Integer(1)
RELATIONS = [(G * C, ONE), (C * G, ONE), (K * C * Kt, S - 1), (S * Si, ONE), (Si * S, ONE)]
r = V - K * W
Delta = C * Kt * Si * r
W_t = W + Delta


def residual_identity(use_inverse: bool = True) -> bool:
    """T2: ``V - K W_t - S^{-1} r == 0``. ``use_inverse=False`` claims ``V - K W_t = r`` (a
    wrong, "hard write" variant; negative control)."""
    claimed = Si * r if use_inverse else r
    return is_zero_word_polynomial(V - K * W_t - claimed, RELATIONS)


def one_step_normal_equation() -> bool:
    """``(G + K^T K) Delta_t - K^T r == 0``."""
    return is_zero_word_polynomial((G + Kt * K) * Delta - Kt * r, RELATIONS)


def one_step_energy_explicit(d_k: int, u: int, d_v: int) -> bool:
    """T4(a) directly: ``G`` generic symmetric, ``C = G^{-1}``, ``S^{-1}`` explicit; the identity
    ``||r||^2 - ||V - K W_t||^2 - ||K Delta||^2 - 2 ||Delta||_G^2 = 0`` as a rational function."""
    Gm = generic_symmetric("g", d_k)
    Km = generic("k", u, d_k)
    rm = generic("r", u, d_v)
    Cm = Gm.adjugate() / Gm.det()
    Sm = sp.eye(u) + Km * Cm * Km.T
    Dm = Cm * Km.T * (Sm.adjugate() / Sm.det()) * rm
    post = rm - Km * Dm  # V - K W_t = r - K Delta
    expr = trace_inner(rm, rm) - trace_inner(post, post) - trace_inner(Km * Dm, Km * Dm) - 2 * trace_inner(Dm, Gm * Dm)
    return is_zero_matrix(expr, rational=True)


def interference_identity() -> bool:
    """T5(a): ``K_j C_t K^T r = K_j C K^T S^{-1} r`` with ``C_t = C - F S^{-1} F^T``."""
    Kj = nc("Kj")
    C_t = C - C * Kt * Si * K * C
    return is_zero_word_polynomial(Kj * C_t * Kt * r - Kj * C * Kt * Si * r, RELATIONS)


def cumulative_relation() -> bool:
    """T5(b): two batches after step ``j``. ``G_t = G_j + K2^T K2 + K3^T K3``,
    ``B_t = B_j + K2^T V2 + K3^T V3``; relations ``G_j W_j = B_j`` and ``G_t W_t = B_t`` (the
    latter used in the rearranged form ``G_j W_t = B_t - (K2^T K2 + K3^T K3) W_t``)."""
    Gj, Wj, Bj, Wt, K2, K2t, V2, K3, K3t, V3 = nc("Gj Wj Bj Wt K2 K2t V2 K3 K3t V3")
    extra = K2t * K2 + K3t * K3
    Bt = Bj + K2t * V2 + K3t * V3
    relations = [(Gj * Wj, Bj), (Gj * Wt, Bt - extra * Wt)]
    lhs = (Gj + extra) * (Wt - Wj)
    rhs = K2t * (V2 - K2 * Wj) + K3t * (V3 - K3 * Wj)
    return is_zero_word_polynomial(lhs - rhs, relations)


def main() -> bool:
    report = Report("T2/T4/T5: one-step identities (check_one_step.py)")
    report.check("free algebra: T2 residual V - K W_t = S^-1 r", residual_identity())
    report.check("free algebra: one-step normal equation (G + K^T K) Delta_t = K^T r", one_step_normal_equation())
    for d_k, u, d_v in [(2, 1, 2), (2, 2, 1), (3, 1, 1)]:
        report.check(f"explicit d_k={d_k}, u={u}, d_v={d_v}: T4(a) one-step energy identity",
                     one_step_energy_explicit(d_k, u, d_v))
    report.check("free algebra: T5(a) K_j Delta_t = K_j C_{t-1} K^T S^-1 r", interference_identity())
    report.check("free algebra: T5(b) G_t (W_t - W_j) = sum_s K_s^T (V_s - K_s W_j)", cumulative_relation())
    return report.summary()


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
