"""Machine check of the algebra behind per-fact (per-row) weights (proofs/weights.md).

Notation: a batch ``K (u x d_k)``, ``V (u x d_v)`` with positive row weights ``omega``,
``Omega = diag(omega)``; ``Sq = Omega^{1/2}``, ``Sqi = Omega^{-1/2}`` (diagonal, so symmetric);
before the step ``C = G^{-1}``, ``W``; ``r = V - K W``; the weighted step is the unweighted one on
the row-scaled batch ``(Sq K, Sq V)``: ``S = I + Sq K C K^T Sq``, ``W_t = W + C K^T Sq S^{-1} Sq r``.
For one fact ``(k, v)`` of weight ``w``: ``G = G_{-i}`` (the information without it),
``W_{-i} = G^{-1} B``, ``m = k G^{-1} k^T``, ``e0 = v - k W_{-i}``.

Checked:

* row-scaling lemma (explicit entries, ``omega_i = s_i^2``): the weighted misfit, information
  ``K^T Omega K`` and right-hand side ``K^T Omega V`` are those of the scaled rows;
* an integer weight is the row repeated: ``omega = 2`` equals stacking the row twice;
* weighted Woodbury (update and downdate) and the weighted weight update
  ``(G + K^T Omega K) W_t = G W + K^T Omega V`` (free algebra);
* weighted T2, scaled: ``Sq (V - K W_t) = S^{-1} Sq r``; original coordinates:
  ``V - K W_t = Omega^{-1/2} S^{-1} Omega^{1/2} r = (I + K C K^T Omega)^{-1} r`` (free algebra,
  after multiplying by the invertible ``Sq``); the wrong order ``(I + Omega K C K^T)^{-1} r`` is
  rejected (negative control);
* per fact (explicit entries, rational): ``v - k W_t = e0 / (1 + w m)``,
  ``W_t - W_{-i} = w / (1 + w m) G^{-1} k^T e0`` and ``1 - w k C_t k^T = 1 / (1 + w m)``;
* the scalar facts behind monotonicity and saturation: ``d/dw [1/(1 + w m)] = -m/(1 + w m)^2``,
  ``d/dw [w/(1 + w m)] = 1/(1 + w m)^2``, ``1/m - w/(1 + w m) = 1/(m (1 + w m))`` and
  ``w/4 - m (w/(1 + w m))^2 = w (1 - w m)^2 / (4 (1 + w m)^2)``;
* weighted T3 energy identity (explicit entries): with ``E = (A + K^T Omega K) D - K^T Omega R0``
  free, ``||Sq R0||^2 = ||Sq(K D - R0)||^2 + ||Sq K D||^2 + 2 ||D||_A^2 + 2 <D, E>``;
* weighted T4 saturation: ``(Omega^{-1} + M) Sq S^{-1} Sq = I`` with ``M = K C K^T`` (explicit),
  and ``S^{-1} - S^{-1} (S - I) S^{-1} = S^{-2}`` (free algebra).

Run: ``python proofs/check_weights.py`` (exit status 0 iff every identity is verified).
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

G, C, K, Kt, S, Si, W, V, Sq, Sqi = nc("G C K Kt S Si W V Sq Sqi")
ONE = sp.Integer(1)
# C = G^{-1}; S = I + Sq K C K^T Sq (the scaled innovation Gram); Si = S^{-1}; Sq Sqi = 1.
UPDATE_RELATIONS = [
    (G * C, ONE), (C * G, ONE), (Sq * K * C * Kt * Sq, S - 1), (S * Si, ONE), (Si * S, ONE),
    (Sq * Sqi, ONE), (Sqi * Sq, ONE),
]
# Downdate of a weighted batch contained in G: S_- = I - Sq K C K^T Sq.
DOWNDATE_RELATIONS = [
    (G * C, ONE), (C * G, ONE), (Sq * K * C * Kt * Sq, 1 - S), (S * Si, ONE), (Si * S, ONE),
]
r = V - K * W
W_t = W + C * Kt * Sq * Si * Sq * r  # the step on the scaled rows (Sq K)^T = Kt Sq


def _diag_weights(u: int):
    """``S = diag(s_i)`` with positive symbols and ``Omega = S^2``."""
    s = sp.symbols(f"s0:{u}", positive=True)
    root = sp.diag(*s)
    return root, root * root


def row_scaling_lemma(u: int, d_k: int, d_v: int) -> bool:
    """Weighted misfit, ``K^T Omega K`` and ``K^T Omega V`` equal those of ``(S K, S V)``."""
    root, Omega = _diag_weights(u)
    Km, Vm, Wm = generic("k", u, d_k), generic("v", u, d_v), generic("w", d_k, d_v)
    R = Km * Wm - Vm
    misfit = (R.T * Omega * R).trace() - trace_inner(root * Km * Wm - root * Vm, root * Km * Wm - root * Vm)
    info = Km.T * Omega * Km - (root * Km).T * (root * Km)
    rhs = Km.T * Omega * Vm - (root * Km).T * (root * Vm)
    return is_zero_matrix(misfit) and is_zero_matrix(info) and is_zero_matrix(rhs)


def integer_weight_is_repetition(d_k: int, d_v: int) -> bool:
    """A row of weight 2 contributes what the row given twice contributes (to ``G`` and ``B``)."""
    k, v = generic("k", 1, d_k), generic("v", 1, d_v)
    twice_k, twice_v = k.col_join(k), v.col_join(v)
    return is_zero_matrix(2 * k.T * k - twice_k.T * twice_k) and is_zero_matrix(2 * k.T * v - twice_k.T * twice_v)


def weighted_update_inverse() -> bool:
    """``(G + K^T Omega K)(C - C K^T Sq S^{-1} Sq K C) = I`` with ``Omega = Sq Sq``."""
    C_t = C - C * Kt * Sq * Si * Sq * K * C
    return is_zero_word_polynomial((G + Kt * Sq * Sq * K) * C_t - 1, UPDATE_RELATIONS)


def weighted_downdate_inverse() -> bool:
    """``(G - K^T Omega K)(C + C K^T Sq S_-^{-1} Sq K C) = I``: removing a weighted batch."""
    C_prev = C + C * Kt * Sq * Si * Sq * K * C
    return is_zero_word_polynomial((G - Kt * Sq * Sq * K) * C_prev - 1, DOWNDATE_RELATIONS)


def weighted_normal_equation() -> bool:
    """``(G + K^T Omega K) W_t = G W + K^T Omega V``: the step solves the weighted normal equations."""
    return is_zero_word_polynomial((G + Kt * Sq * Sq * K) * W_t - (G * W + Kt * Sq * Sq * V), UPDATE_RELATIONS)


def weighted_residual_scaled() -> bool:
    """Weighted T2 in scaled coordinates: ``Sq (V - K W_t) = S^{-1} Sq r``."""
    return is_zero_word_polynomial(Sq * (V - K * W_t) - Si * Sq * r, UPDATE_RELATIONS)


def weighted_residual_original(correct_order: bool = True) -> bool:
    """Weighted T2 in the original coordinates, multiplied by the invertible ``Sq``:
    ``V - K W_t = Sqi S^{-1} Sq r = (I + K C K^T Omega)^{-1} r``. ``correct_order=False`` claims
    ``Sq S^{-1} Sqi r = (I + Omega K C K^T)^{-1} r`` instead (negative control)."""
    claimed = Sqi * Si * Sq * r if correct_order else Sq * Si * Sqi * r
    return is_zero_word_polynomial(Sq * (V - K * W_t - claimed), UPDATE_RELATIONS)


def original_coordinates_form() -> bool:
    """``(I + K C K^T Omega) Sqi S^{-1} Sq = I``: the two forms of the original-coordinate factor."""
    lhs = (1 + K * C * Kt * Sq * Sq) * Sqi * Si * Sq
    # K C K^T Sq Sq Sqi = K C K^T Sq = Sqi (Sq K C K^T Sq): insert Sqi Sq on the left to rewrite.
    return is_zero_word_polynomial(Sq * lhs * Sqi - 1, UPDATE_RELATIONS)


def _one_fact(d_k: int, d_v: int):
    Gm = generic_symmetric("g", d_k)
    Bm = generic("b", d_k, d_v)
    k, v = generic("k", 1, d_k), generic("v", 1, d_v)
    w = sp.Symbol("w", positive=True)
    Ci = Gm.adjugate() / Gm.det()  # G_{-i}^{-1}
    W_minus = Ci * Bm
    m = (k * Ci * k.T)[0, 0]
    e0 = v - k * W_minus
    G_t = Gm + w * k.T * k
    C_t = G_t.adjugate() / G_t.det()
    W_t = C_t * (Bm + w * k.T * v)
    return w, k, v, Ci, W_minus, m, e0, C_t, W_t


def fact_identities(d_k: int, d_v: int) -> bool:
    """Per fact: residual ``e0/(1 + w m)``, displacement ``w/(1 + w m) G^{-1} k^T e0``, share
    ``1 - w k C_t k^T = 1/(1 + w m)`` (rational identities in generic entries)."""
    w, k, v, Ci, W_minus, m, e0, C_t, W_t = _one_fact(d_k, d_v)
    residual = (v - k * W_t) - e0 / (1 + w * m)
    displacement = (W_t - W_minus) - (w / (1 + w * m)) * Ci * k.T * e0
    share = 1 - w * (k * C_t * k.T)[0, 0] - 1 / (1 + w * m)
    return (
        is_zero_matrix(residual, rational=True)
        and is_zero_matrix(displacement, rational=True)
        and is_zero_matrix(share, rational=True)
    )


def scalar_monotonicity() -> bool:
    """The derivatives and remainders behind monotonicity and saturation (``w, m > 0``)."""
    w, m = sp.symbols("w m", positive=True)
    share, phi = 1 / (1 + w * m), w / (1 + w * m)
    return (
        is_zero_matrix(sp.diff(share, w) + m / (1 + w * m) ** 2, rational=True)
        and is_zero_matrix(sp.diff(phi, w) - 1 / (1 + w * m) ** 2, rational=True)
        and is_zero_matrix(1 / m - phi - 1 / (m * (1 + w * m)), rational=True)
        and is_zero_matrix(w / 4 - m * phi**2 - w * (1 - w * m) ** 2 / (4 * (1 + w * m) ** 2), rational=True)
    )


def weighted_energy_identity(n: int, d_k: int, d_v: int, *, weight: int = 2) -> bool:
    """Weighted T3: ``||Sq(KD - R0)||^2 + ||Sq K D||^2 + weight ||D||_A^2 - ||Sq R0||^2 - 2 <D, E>
    == 0`` with ``E = (A + K^T Omega K) D - K^T Omega R0``. ``weight=1`` is a wrong variant."""
    root, Omega = _diag_weights(n)
    A = generic_symmetric("a", d_k)
    Km, D, R0 = generic("k", n, d_k), generic("x", d_k, d_v), generic("r", n, d_v)
    E = (A + Km.T * Omega * Km) * D - Km.T * Omega * R0
    KD = Km * D
    lhs = (
        trace_inner(root * (KD - R0), root * (KD - R0))
        + trace_inner(root * KD, root * KD)
        + weight * trace_inner(D, A * D)
    )
    return is_zero_matrix(lhs - trace_inner(root * R0, root * R0) - 2 * trace_inner(D, E))


def saturation_factor(u: int) -> bool:
    """``(Omega^{-1} + M) Sq (I + Sq M Sq)^{-1} Sq = I`` for symmetric ``M`` (u x u)."""
    root, Omega = _diag_weights(u)
    M = generic_symmetric("m", u)
    S_m = sp.eye(u) + root * M * root
    inverse = S_m.adjugate() / S_m.det()
    return is_zero_matrix((Omega.inv() + M) * root * inverse * root - sp.eye(u), rational=True)


def saturation_gap() -> bool:
    """``S^{-1} - S^{-1}(S - I)S^{-1} = S^{-2}``: the one-step value exceeds the step's G-cost."""
    return is_zero_word_polynomial(Si - Si * (S - 1) * Si - Si * Si, UPDATE_RELATIONS)


def main() -> bool:
    report = Report("Weights: row scaling, weighted T2-T5 algebra (check_weights.py)")
    for u, d_k, d_v in [(2, 2, 1), (3, 2, 2)]:
        report.check(f"explicit u={u}, d_k={d_k}, d_v={d_v}: row-scaling lemma (misfit, K^T Omega K, K^T Omega V)",
                     row_scaling_lemma(u, d_k, d_v))
    report.check("explicit d_k=3, d_v=2: weight 2 = the row given twice", integer_weight_is_repetition(3, 2))
    report.check("free algebra: weighted Woodbury update (G + K^T Omega K) C_t = I", weighted_update_inverse())
    report.check("free algebra: weighted downdate (G - K^T Omega K) C_prev = I", weighted_downdate_inverse())
    report.check("free algebra: weighted normal equation (G + K^T Omega K) W_t = G W + K^T Omega V",
                 weighted_normal_equation())
    report.check("free algebra: weighted T2, scaled: Sq (V - K W_t) = S^-1 Sq r", weighted_residual_scaled())
    report.check("free algebra: weighted T2, original: V - K W_t = Omega^-1/2 S^-1 Omega^1/2 r",
                 weighted_residual_original())
    report.check("free algebra: (I + K C K^T Omega) Omega^-1/2 S^-1 Omega^1/2 = I", original_coordinates_form())
    for d_k, d_v in [(2, 1), (2, 2)]:
        report.check(f"explicit d_k={d_k}, d_v={d_v}: per-fact residual, displacement and share",
                     fact_identities(d_k, d_v))
    report.check("scalar: monotonicity derivatives and saturation remainders", scalar_monotonicity())
    for n, d_k, d_v in [(2, 2, 1), (3, 2, 2)]:
        report.check(f"explicit n={n}, d_k={d_k}, d_v={d_v}: weighted T3 energy identity",
                     weighted_energy_identity(n, d_k, d_v))
    report.check("explicit u=2: (Omega^-1 + M) Sq S^-1 Sq = I (T4 saturation form)", saturation_factor(2))
    report.check("free algebra: S^-1 - S^-1 (S - I) S^-1 = S^-2", saturation_gap())
    return report.summary()


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
