"""Small symbolic toolkit shared by the ``check_*.py`` scripts in this folder.

Two independent ways of machine-checking a matrix identity:

1. **Dimension-free (free algebra).** Matrices are non-commuting sympy symbols (``K``, ``Kt`` for
   ``K^T``, ``C``, ``Si`` for ``S^{-1}`` ...). An identity is checked by expanding ``lhs - rhs``
   into words and rewriting contiguous sub-words with the defining relations (``G C -> 1``,
   ``K C Kt -> S - 1``, ``S Si -> 1`` ...) until nothing applies. If the result is the zero
   polynomial, the identity holds in *every* ring where the relations hold, so for matrices of
   every size. Transposes are written out by hand (``(C K^T)^T = K C`` for symmetric ``C``); the
   second method guards against mistakes there.

2. **Explicit entries.** Matrices of a fixed small size whose entries are independent symbols
   (symmetric where the statement needs it). The identity is checked as a polynomial (or
   rational-function) identity in those symbols, so it holds for every numeric value.

``is_zero_word_polynomial`` and ``is_zero_matrix`` are the two checkers. Each returns ``False`` on
a wrong identity; ``tests/theory/test_proofs.py`` checks that they do.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import sympy as sp

__all__ = [
    "nc",
    "rewrite",
    "is_zero_word_polynomial",
    "generic",
    "generic_symmetric",
    "is_zero_matrix",
    "trace_inner",
    "Report",
]


def nc(names: str):
    """Non-commuting symbols, e.g. ``C, K, Kt = nc("C K Kt")``."""
    return sp.symbols(names, commutative=False)


def _word(factors: Sequence[sp.Expr]) -> tuple:
    """Flatten a list of non-commuting factors into a tuple of symbols (powers expanded)."""
    out: list = []
    for f in factors:
        if isinstance(f, sp.Pow) and f.exp.is_Integer and f.exp > 0:
            out.extend([f.base] * int(f.exp))
        else:
            out.append(f)
    return tuple(out)


def _terms(expr: sp.Expr) -> list[tuple[sp.Expr, tuple]]:
    """``expr`` expanded as a list of ``(commutative coefficient, word)``."""
    expr = sp.expand(expr)
    terms = []
    for term in sp.Add.make_args(expr):
        if term == 0:
            continue
        c_part, nc_part = term.args_cnc()
        terms.append((sp.Mul(*c_part), _word(nc_part)))
    return terms


def _find(word: tuple, pattern: tuple) -> int:
    n, m = len(word), len(pattern)
    for i in range(n - m + 1):
        if word[i : i + m] == pattern:
            return i
    return -1


def rewrite(expr: sp.Expr, relations: Iterable[tuple[sp.Expr, sp.Expr]], max_rounds: int = 200):
    """Rewrite ``expr`` with ``relations`` (pairs ``lhs -> rhs``; ``lhs`` a product of symbols)
    until no contiguous sub-word matches any ``lhs``. Returns the expanded normal form.

    Every relation used must shorten words or be otherwise terminating; ``max_rounds`` guards
    against a bad rule set (raises ``RuntimeError``).
    """
    rules = []
    for lhs, rhs in relations:
        (c_lhs, w_lhs), = _terms(lhs)
        if c_lhs != 1 or not w_lhs:
            raise ValueError(f"relation lhs must be a bare word; got {lhs}")
        rules.append((w_lhs, rhs))

    for _ in range(max_rounds):
        changed = False
        pieces = []
        for coeff, word in _terms(expr):
            for pattern, rhs in rules:
                i = _find(word, pattern)
                if i >= 0:
                    pre = sp.Mul(*word[:i]) if i else sp.Integer(1)
                    post = sp.Mul(*word[i + len(pattern) :]) if i + len(pattern) < len(word) else sp.Integer(1)
                    pieces.append(coeff * pre * rhs * post)
                    changed = True
                    break
            else:
                pieces.append(coeff * sp.Mul(*word) if word else coeff)
        expr = sp.expand(sp.Add(*pieces))
        if not changed:
            return expr
    raise RuntimeError("rewriting did not terminate; check the relations")


def is_zero_word_polynomial(expr: sp.Expr, relations) -> bool:
    """Whether ``expr`` reduces to exactly 0 under ``relations`` (see :func:`rewrite`)."""
    return rewrite(expr, relations) == 0


def generic(name: str, rows: int, cols: int) -> sp.Matrix:
    """A ``rows x cols`` matrix of independent real symbols ``name_i_j``."""
    return sp.Matrix(rows, cols, lambda i, j: sp.Symbol(f"{name}_{i}_{j}", real=True))


def generic_symmetric(name: str, n: int) -> sp.Matrix:
    """An ``n x n`` symmetric matrix of independent real symbols (``n(n+1)/2`` of them)."""
    return sp.Matrix(n, n, lambda i, j: sp.Symbol(f"{name}_{min(i, j)}_{max(i, j)}", real=True))


def is_zero_matrix(M, *, rational: bool = False) -> bool:
    """Whether every entry of ``M`` (a sympy Matrix or scalar) is identically zero.

    Polynomial entries are expanded; with ``rational=True`` entries are first brought to a
    single fraction (``sympy.cancel``), for identities that contain explicit inverses.
    """
    entries = list(M) if isinstance(M, sp.MatrixBase) else [M]
    for x in entries:
        x = sp.cancel(sp.together(x)) if rational else sp.expand(x)
        if x != 0:
            return False
    return True


def trace_inner(X: sp.Matrix, Y: sp.Matrix) -> sp.Expr:
    """``<X, Y>_F = tr(X^T Y)``."""
    return (X.T * Y).trace()


class Report:
    """Collects named checks, prints each, and tells whether all passed."""

    def __init__(self, title: str):
        self.title = title
        self.results: list[tuple[str, bool]] = []
        print(f"== {title}")

    def check(self, name: str, ok: bool) -> bool:
        self.results.append((name, bool(ok)))
        print(f"  [{'verified' if ok else 'FAILED  '}] {name}")
        return bool(ok)

    @property
    def ok(self) -> bool:
        return bool(self.results) and all(ok for _, ok in self.results)

    def summary(self) -> bool:
        n_ok = sum(ok for _, ok in self.results)
        print(f"== {self.title}: {n_ok}/{len(self.results)} identities verified")
        return self.ok
