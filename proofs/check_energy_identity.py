"""Machine check of the algebra behind theorem T3 (and the completing-the-square lemma).

Notation (proofs/T3_deviation.md): stacked edits ``K (n x d_k)``, ``V (n x d_v)``, preservation
metric ``A`` (symmetric), ``W*_0`` the minimiser of the regulariser, ``R0 = V - K W*_0``,
``Delta = W*_t - W*_0``.

Checked:

* the normal equations at ``t`` minus those at ``0`` give ``(A + K^T K) Delta = K^T R0``;
* the energy identity ``||R0||^2 = ||K Delta - R0||^2 + ||K Delta||^2 + 2 ||Delta||_A^2``
  holds *exactly whenever* that relation holds: with
  ``E = (A + K^T K) Delta - K^T R0`` free, the difference of the two sides is ``2 <Delta, E>``
  identically in the entries (explicit sizes, including ``n > d_k``);
* the inner-product step ``||Delta||_A^2 + ||K Delta||^2 = <R0, K Delta> + <Delta, E>``;
* the scalar step ``r^2/4 - (s r - s^2) = (r/2 - s)^2`` used to conclude ``||Delta||_A^2 <= r^2/4``;
* tightness: for scalars ``A = a``, ``K = k`` with ``k^2 = a``, ``||Delta||_A^2 = R0^2/4``;
* the metric split ``||Delta||_A^2 = alpha ||Delta||^2 + beta ||K0 Delta||^2`` for
  ``A = alpha I + beta K0^T K0``;
* completing the square: ``reg(W) = ||W - W*_0||_A^2 + reg(W*_0)`` whenever
  ``A W*_0 = alpha W0 + beta K0^T V0``, and ``W*_0 = W0`` when ``V0 = K0 W0``.

Run: ``python proofs/check_energy_identity.py`` (exit status 0 iff every identity is verified).
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


def normal_equation_difference() -> bool:
    """Free algebra: ``(A + K^T K)(W_t - W0s) - K^T (V - K W0s)
    = [(A + K^T K) W_t - (B0 + K^T V)] - [A W0s - B0]`` (no relations needed)."""
    A, K, Kt, Wt, W0s, V, B0 = nc("A K Kt Wt W0s V B0")
    lhs = (A + Kt * K) * (Wt - W0s) - Kt * (V - K * W0s)
    rhs = ((A + Kt * K) * Wt - (B0 + Kt * V)) - (A * W0s - B0)
    return is_zero_word_polynomial(lhs - rhs, [])


def _energy_parts(n: int, d_k: int, d_v: int):
    A = generic_symmetric("a", d_k)
    K = generic("k", n, d_k)
    D = generic("x", d_k, d_v)  # Delta
    R0 = generic("r", n, d_v)
    E = (A + K.T * K) * D - K.T * R0  # zero exactly when the normal-equation relation holds
    return A, K, D, R0, E


def energy_identity(n: int, d_k: int, d_v: int, *, weight: int = 2) -> bool:
    """``||KD - R0||^2 + ||KD||^2 + weight ||D||_A^2 - ||R0||^2 - 2 <D, E> == 0``.

    True for ``weight=2`` (the theorem); ``weight=1`` is a wrong variant (negative control).
    """
    A, K, D, R0, E = _energy_parts(n, d_k, d_v)
    KD = K * D
    rhs = trace_inner(KD - R0, KD - R0) + trace_inner(KD, KD) + weight * trace_inner(D, A * D)
    return is_zero_matrix(rhs - trace_inner(R0, R0) - 2 * trace_inner(D, E))


def inner_product_step(n: int, d_k: int, d_v: int) -> bool:
    """``||D||_A^2 + ||KD||^2 - <R0, KD> - <D, E> == 0``."""
    A, K, D, R0, E = _energy_parts(n, d_k, d_v)
    KD = K * D
    expr = trace_inner(D, A * D) + trace_inner(KD, KD) - trace_inner(R0, KD) - trace_inner(D, E)
    return is_zero_matrix(expr)


def quarter_bound_step() -> bool:
    """``r^2/4 - (s r - s^2) = (r/2 - s)^2``, so ``||D||_A^2 = s r' - s^2 <= s r - s^2 <= r^2/4``."""
    r, s = sp.symbols("r s", real=True)
    return is_zero_matrix(r**2 / 4 - (s * r - s**2) - (r / 2 - s) ** 2)


def tightness_example() -> bool:
    """Scalar ``A = a = k^2``: ``D = k R0 / (a + k^2)`` gives ``a D^2 = R0^2 / 4`` and ``k D = R0/2``."""
    k, R0 = sp.symbols("k R0", positive=True)
    a = k**2
    D = k * R0 / (a + k**2)
    return is_zero_matrix(a * D**2 - R0**2 / 4, rational=True) and is_zero_matrix(
        k * D - R0 / 2, rational=True
    )


def metric_split(n0: int, d_k: int, d_v: int) -> bool:
    """``tr(D^T (alpha I + beta K0^T K0) D) = alpha ||D||^2 + beta ||K0 D||^2``."""
    alpha, beta = sp.symbols("alpha beta", real=True)
    K0 = generic("q", n0, d_k)
    D = generic("x", d_k, d_v)
    A = alpha * sp.eye(d_k) + beta * K0.T * K0
    expr = trace_inner(D, A * D) - alpha * trace_inner(D, D) - beta * trace_inner(K0 * D, K0 * D)
    return is_zero_matrix(expr)


def completing_the_square(n0: int, d_k: int, d_v: int) -> bool:
    """``reg(W) - ||W - Ws||_A^2 - reg(Ws) - 2 <W - Ws, E0> == 0`` with
    ``E0 = A Ws - (alpha W0 + beta K0^T V0)`` free; so ``E0 = 0`` gives the lemma."""
    alpha, beta = sp.symbols("alpha beta", real=True)
    K0, V0 = generic("q", n0, d_k), generic("p", n0, d_v)
    W0, W, Ws = generic("w0", d_k, d_v), generic("w", d_k, d_v), generic("s", d_k, d_v)
    A = alpha * sp.eye(d_k) + beta * K0.T * K0

    def reg(X):
        return alpha * trace_inner(X - W0, X - W0) + beta * trace_inner(K0 * X - V0, K0 * X - V0)

    E0 = A * Ws - (alpha * W0 + beta * K0.T * V0)
    expr = reg(W) - trace_inner(W - Ws, A * (W - Ws)) - reg(Ws) - 2 * trace_inner(W - Ws, E0)
    return is_zero_matrix(expr)


def anchor_consistent_start() -> bool:
    """Free algebra: with ``V0 = K0 W0``, ``A W0 = alpha W0 + beta K0^T V0`` (so ``W*_0 = W0``)."""
    K0, K0t, W0 = nc("K0 K0t W0")
    alpha, beta = sp.symbols("alpha beta", real=True)
    A_W0 = (alpha + beta * K0t * K0) * W0
    return is_zero_word_polynomial(A_W0 - (alpha * W0 + beta * K0t * (K0 * W0)), [])


def main() -> bool:
    report = Report("T3: energy identity (check_energy_identity.py)")
    report.check("free algebra: (A + K^T K) Delta = K^T R0 from the two normal equations",
                 normal_equation_difference())
    for n, d_k, d_v in [(1, 2, 1), (2, 2, 2), (4, 3, 2)]:
        report.check(f"explicit n={n}, d_k={d_k}, d_v={d_v}: energy identity", energy_identity(n, d_k, d_v))
        report.check(f"explicit n={n}, d_k={d_k}, d_v={d_v}: inner-product step", inner_product_step(n, d_k, d_v))
    report.check("scalar: r^2/4 - (s r - s^2) = (r/2 - s)^2", quarter_bound_step())
    report.check("scalar: bound attained when A = a = k^2", tightness_example())
    report.check("explicit n0=2, d_k=3, d_v=2: ||D||_A^2 = alpha||D||^2 + beta||K0 D||^2", metric_split(2, 3, 2))
    report.check("explicit n0=2, d_k=2, d_v=2: completing the square (spec 1.2)", completing_the_square(2, 2, 2))
    report.check("free algebra: V0 = K0 W0 => A W0 = alpha W0 + beta K0^T V0", anchor_consistent_start())
    return report.summary()


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
