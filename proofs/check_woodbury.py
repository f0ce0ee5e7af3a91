"""Machine check of theorem T1's algebra: the Woodbury update, the gain identity, the weight
update, the downdate, and that a downdate undoes an update.

Notation (proofs/T1_recursion.md): ``C = G^{-1}`` (symmetric), a batch ``K (u x d_k)``,
``F = C K^T``, ``S = I + K F``, ``C_t = C - F S^{-1} F^T``, ``L = F S^{-1}``,
``W_t = W + L (V - K W)``. For the downdate of a batch contained in ``G``:
``S_- = I - K C K^T`` and ``C_prev = C + C K^T S_-^{-1} K C``.

Run: ``python proofs/check_woodbury.py`` (exit status 0 iff every identity is verified).
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
)

# ---------------------------------------------------------------------------------------------
# Dimension-free checks in the free algebra.
# Symbols: G (information), C (its inverse), K, Kt (= K^T), S, Si (= S^{-1}), W, V, B.
# ---------------------------------------------------------------------------------------------
G, C, K, Kt, S, Si, W, V, B = nc("G C K Kt S Si W V B")
ONE = sp.Integer(1)

# C = G^{-1}; S = I + K C K^T (so K C K^T -> S - 1); Si = S^{-1}.
UPDATE_RELATIONS = [(G * C, ONE), (C * G, ONE), (K * C * Kt, S - 1), (S * Si, ONE), (Si * S, ONE)]
# Downdate of a batch contained in G: S_- = I - K C K^T (so K C K^T -> 1 - S).
DOWNDATE_RELATIONS = [(G * C, ONE), (C * G, ONE), (K * C * Kt, 1 - S), (S * Si, ONE), (Si * S, ONE)]

F = C * Kt  # d_k x u
Ft = K * C  # F^T (C symmetric)
C_new = C - F * Si * Ft  # Woodbury update of the inverse
L = F * Si  # gain


def update_is_right_inverse(sign: int = -1) -> bool:
    """``(G + K^T K) (C - F S^{-1} F^T) = I``; ``sign=+1`` gives a wrong variant (negative control)."""
    candidate = C + sign * F * Si * Ft
    return is_zero_word_polynomial((G + Kt * K) * candidate - 1, UPDATE_RELATIONS)


def update_is_left_inverse() -> bool:
    """``(C - F S^{-1} F^T) (G + K^T K) = I``."""
    return is_zero_word_polynomial(C_new * (G + Kt * K) - 1, UPDATE_RELATIONS)


def gain_identity() -> bool:
    """``C_t K^T = F S^{-1}``."""
    return is_zero_word_polynomial(C_new * Kt - F * Si, UPDATE_RELATIONS)


def weight_update() -> bool:
    """If ``G W = B`` then ``(G + K^T K)(W + F S^{-1}(V - K W)) = B + K^T V``."""
    W_new = W + L * (V - K * W)
    relations = UPDATE_RELATIONS + [(G * W, B)]
    return is_zero_word_polynomial((G + Kt * K) * W_new - (B + Kt * V), relations)


def downdate_is_inverse() -> bool:
    """``(G - K^T K)(C + C K^T S_-^{-1} K C) = I`` and the left-sided version, ``S_- = I - K C K^T``."""
    C_prev = C + F * Si * Ft
    right = is_zero_word_polynomial((G - Kt * K) * C_prev - 1, DOWNDATE_RELATIONS)
    left = is_zero_word_polynomial(C_prev * (G - Kt * K) - 1, DOWNDATE_RELATIONS)
    return right and left


def downdate_weights() -> bool:
    """If ``G W = B`` then ``(G - K^T K)(W - C K^T S_-^{-1}(V - K W)) = B - K^T V``."""
    W_prev = W - F * Si * (V - K * W)
    relations = DOWNDATE_RELATIONS + [(G * W, B)]
    return is_zero_word_polynomial((G - Kt * K) * W_prev - (B - Kt * V), relations)


def downdate_undoes_update() -> bool:
    """Updating ``C`` by ``K`` and then downdating by ``K`` returns ``C`` (and ``W``).

    After the update, ``K C_t K^T = I - S^{-1}``, so the downdate's ``S_-`` is ``S^{-1}`` and its
    inverse is ``S``: ``C_t + C_t K^T S K C_t`` must reduce to ``C``. Likewise for the weights:
    ``W_t - C_t K^T S (V - K W_t)`` must reduce to ``W``.
    """
    Ct_Kt = C_new * Kt
    K_Ct = K * C_new
    back = C_new + Ct_Kt * S * K_Ct
    W_t = W + L * (V - K * W)
    W_back = W_t - Ct_Kt * S * (V - K * W_t)
    return is_zero_word_polynomial(back - C, UPDATE_RELATIONS) and is_zero_word_polynomial(
        W_back - W, UPDATE_RELATIONS
    )


# ---------------------------------------------------------------------------------------------
# Explicit-entry checks: C generic symmetric, K generic; S^{-1} = adj(S)/det(S).
# Clearing the denominator det(S) leaves polynomial identities in the entries.
# ---------------------------------------------------------------------------------------------


def explicit_update(d_k: int, u: int) -> bool:
    """``C_t (I + K^T K C) = C``, i.e. ``C_t = (C^{-1} + K^T K)^{-1}``, times ``det S``; and the
    gain identity ``C_t K^T = F S^{-1}`` times ``det S``."""
    Cm = generic_symmetric("c", d_k)
    Km = generic("k", u, d_k)
    I_k, I_u = sp.eye(d_k), sp.eye(u)
    Fm = Cm * Km.T
    Sm = I_u + Km * Fm
    det, adj = Sm.det(), Sm.adjugate()
    Ct_det = det * Cm - Fm * adj * Fm.T  # det(S) * C_t
    inverse_ok = is_zero_matrix(Ct_det * (I_k + Km.T * Km * Cm) - det * Cm)
    gain_ok = is_zero_matrix(Ct_det * Km.T - Fm * adj)
    return inverse_ok and gain_ok


def explicit_downdate(d_k: int, u: int) -> bool:
    """With ``C`` generic and ``S_- = I - K C K^T``: ``C_prev (I - K^T K C) = C`` times ``det S_-``."""
    Cm = generic_symmetric("c", d_k)
    Km = generic("k", u, d_k)
    I_k, I_u = sp.eye(d_k), sp.eye(u)
    Fm = Cm * Km.T
    Sm = I_u - Km * Fm
    det, adj = Sm.det(), Sm.adjugate()
    Cp_det = det * Cm + Fm * adj * Fm.T
    return is_zero_matrix(Cp_det * (I_k - Km.T * Km * Cm) - det * Cm)


def main() -> bool:
    report = Report("T1: Woodbury recursion (check_woodbury.py)")
    report.check("free algebra: (G + K^T K)(C - F S^-1 F^T) = I", update_is_right_inverse())
    report.check("free algebra: (C - F S^-1 F^T)(G + K^T K) = I", update_is_left_inverse())
    report.check("free algebra: gain C_t K^T = F S^-1", gain_identity())
    report.check("free algebra: G W = B  =>  G_t W_t = B + K^T V", weight_update())
    report.check("free algebra: downdate (G - K^T K)^-1 = C + C K^T S_-^-1 K C", downdate_is_inverse())
    report.check("free algebra: downdate weights  G_prev W_prev = B - K^T V", downdate_weights())
    report.check("free algebra: downdate(update(C, W)) = (C, W)", downdate_undoes_update())
    for d_k, u in [(2, 1), (3, 1), (2, 3)]:
        report.check(f"explicit entries d_k={d_k}, u={u}: Woodbury inverse and gain", explicit_update(d_k, u))
    for d_k, u in [(2, 1), (2, 2)]:
        report.check(f"explicit entries d_k={d_k}, u={u}: downdate inverse", explicit_downdate(d_k, u))
    return report.summary()


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
