"""Machine check of the algebraic steps of theorem T6 (limits in the regularisation weights).

Notation (proofs/T6_limits.md): stacked edits ``K``, ``V``; ``A_1`` the metric direction with
``A = s A_1``; ``R0 = V - K W*_0``; ``P = K A_1^{-1} K^T`` (invertible when ``K`` has full row
rank); ``M_s = (s I + P)^{-1}``.

Checked (free algebra):

* push-through: ``Delta_s = A_1^{-1} K^T M_s R0`` solves ``(s A_1 + K^T K) Delta = K^T R0``,
  i.e. it is the soft minimiser with ``(alpha, beta) = s (a, b)``;
* the hard write is exact: ``K (W*_0 + A_1^{-1} K^T P^{-1} R0) = V``;
* the distance to the limit is ``O(s)``: ``M_s - P^{-1} = -s M_s P^{-1}`` (checked after
  multiplying by the invertible ``(s I + P)`` on the left and ``P`` on the right);
* rigid limit: ``Y* = (Q^T K^T K Q + alpha I)^{-1} Q^T K^T R0`` solves the ridge problem
  restricted to ``range(Q)`` (``Q^T Q = I``), i.e. ``Q^T[(alpha I + K^T K) Q Y* - K^T R0] = 0``.

Run: ``python proofs/check_limits.py`` (exit status 0 iff every identity is verified).
"""

from __future__ import annotations

import sys
from pathlib import Path

import sympy as sp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _symbolic import Report, is_zero_word_polynomial, nc  # noqa: E402

A1, A1i, K, Kt, P, Pi, Ms, R0, W0s, V = nc("A1 A1i K Kt P Pi Ms R0 W0s V")
s, alpha = sp.symbols("s alpha", positive=True)
ONE = sp.Integer(1)


def push_through() -> bool:
    """``(s A1 + K^T K) A1^{-1} K^T M_s R0 = K^T R0`` with ``K A1^{-1} K^T = P``, ``(sI + P) M_s = I``."""
    relations = [(A1 * A1i, ONE), (K * A1i * Kt, P), (P * Ms, ONE - s * Ms)]
    Delta = A1i * Kt * Ms * R0
    return is_zero_word_polynomial((s * A1 + Kt * K) * Delta - Kt * R0, relations)


def hard_write_exact() -> bool:
    """``K (W*_0 + A1^{-1} K^T P^{-1} R0) - V = 0`` with ``R0 = V - K W*_0``."""
    relations = [(K * A1i * Kt, P), (P * Pi, ONE)]
    W_hw = W0s + A1i * Kt * Pi * (V - K * W0s)
    return is_zero_word_polynomial(K * W_hw - V, relations)


def resolvent_rate(sign: int = 1) -> bool:
    """``(sI + P)(M_s - P^{-1} + sign * s M_s P^{-1}) P = 0``; ``sign=-1`` is a wrong variant."""
    relations = [(P * Ms, ONE - s * Ms), (Pi * P, ONE), (P * Pi, ONE)]
    X = Ms - Pi + sign * s * Ms * Pi
    return is_zero_word_polynomial((s + P) * X * P, relations)


def rigid_restricted_ridge() -> bool:
    """``Q^T (alpha I + K^T K) Q Y* - Q^T K^T R0 = 0`` with ``Q^T Q = I`` and
    ``M = Q^T K^T K Q + alpha I``, ``Y* = M^{-1} Q^T K^T R0``."""
    Q, Qt, M, Mi = nc("Q Qt M Mi")
    relations = [(Qt * Q, ONE), (Qt * Kt * K * Q, M - alpha), (M * Mi, ONE)]
    Y = Mi * Qt * Kt * R0
    return is_zero_word_polynomial(Qt * (alpha + Kt * K) * Q * Y - Qt * Kt * R0, relations)


def main() -> bool:
    report = Report("T6: limits (check_limits.py)")
    report.check("free algebra: soft minimiser Delta_s = A1^-1 K^T (sI + K A1^-1 K^T)^-1 R0", push_through())
    report.check("free algebra: hard write K W_HW = V", hard_write_exact())
    report.check("free algebra: (sI + P)^-1 - P^-1 = -s (sI + P)^-1 P^-1", resolvent_rate())
    report.check("free algebra: rigid limit Y* solves the ridge restricted to null(K0)", rigid_restricted_ridge())
    return report.summary()


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
