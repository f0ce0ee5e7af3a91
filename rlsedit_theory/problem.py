"""The editing problem: pre-trained weights, regularisation weights and the anchor mapping.

Row-key convention throughout: ``W`` has shape ``(d_k, d_v)``; an edit batch is
``K_t (u_t, d_k)``, ``V_t (u_t, d_v)`` and asks for ``K_t W ~ V_t``.

The regulariser of the cumulative objective is

    alpha * ||W - W0||_F^2 + beta * ||K0 W - V0||_F^2,

a quadratic with Hessian ``2 A`` where ``A = alpha I + beta K0^T K0`` is the *preservation
metric*. It must be positive definite for the problem to have a unique minimiser.

Per-fact (per-row) weights. An edit batch may carry positive weights ``omega (u,)``, one per row;
its term in the objective is then ``||Omega^{1/2} (K W - V)||_F^2`` with ``Omega = diag(omega)``.
That is exactly the unweighted term of the row-scaled batch ``(Omega^{1/2} K, Omega^{1/2} V)``
(row-scaling lemma, proofs/weights.md), so every function of the package handles weights by
:func:`scale_rows` and then runs its unweighted code. ``omega = 1`` scales by exactly ``1.0``, so
it reproduces the unweighted results bit for bit.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg
from numpy.typing import ArrayLike

from .errors import HyperparameterError, NonFiniteError, NotPositiveDefiniteError, ShapeError

__all__ = [
    "Problem",
    "as_matrix",
    "check_batch",
    "check_weight",
    "check_row_weights",
    "scale_rows",
    "weighted_batch",
]


def as_matrix(x: ArrayLike, name: str, *, shape: tuple | None = None) -> np.ndarray:
    """Return ``x`` as a finite float64 2-D array, or raise a typed error naming ``name``.

    ``shape`` entries that are ``None`` are not checked.
    """
    try:
        a = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ShapeError(f"{name} must be a numeric array; got {type(x).__name__}") from exc
    if a.ndim != 2:
        raise ShapeError(f"{name} must be 2-D; got shape {a.shape}")
    if shape is not None:
        for axis, (got, want) in enumerate(zip(a.shape, shape, strict=True)):
            if want is not None and got != want:
                raise ShapeError(
                    f"{name} has shape {a.shape}; axis {axis} must be {want} (expected {shape})"
                )
    if not np.all(np.isfinite(a)):
        raise NonFiniteError(f"{name} contains NaN or infinity; clean the input first")
    return a


def check_batch(K: np.ndarray, V: np.ndarray, d_k: int, d_v: int) -> tuple[np.ndarray, np.ndarray]:
    """Validate one edit batch: ``K (u, d_k)``, ``V (u, d_v)`` with the same ``u >= 1``.

    A 1-D ``K`` (or ``V``) is read as a single row.
    """
    K = np.atleast_2d(np.asarray(K, dtype=np.float64)) if np.ndim(K) == 1 else K
    V = np.atleast_2d(np.asarray(V, dtype=np.float64)) if np.ndim(V) == 1 else V
    K = as_matrix(K, "K", shape=(None, d_k))
    V = as_matrix(V, "V", shape=(None, d_v))
    if K.shape[0] != V.shape[0]:
        raise ShapeError(f"K has {K.shape[0]} rows but V has {V.shape[0]}; one value per key")
    if K.shape[0] == 0:
        raise ShapeError("an edit batch needs at least one row")
    return K, V


def check_weight(x: float, name: str) -> float:
    """``x`` as a finite float >= 0, or :class:`HyperparameterError` naming ``name``."""
    try:
        value = float(x)
    except (TypeError, ValueError) as exc:
        raise HyperparameterError(f"{name} must be a real number; got {x!r}") from exc
    if not np.isfinite(value) or value < 0:
        raise HyperparameterError(f"{name} must be finite and >= 0; got {value}")
    return value


def check_row_weights(weights: ArrayLike | None, u: int, name: str = "weights") -> np.ndarray:
    """Validate the per-row weights of a batch of ``u`` rows; return them as ``omega (u,)`` float64.

    ``None`` means weight 1 on every row; a scalar is the same weight on every row; otherwise a
    1-D array with one entry per row. Every weight must be finite and ``> 0``.

    Raises
    ------
    ShapeError
        Not numeric, not 0-D or 1-D, or not one weight per row.
    NonFiniteError
        A weight is NaN or infinite.
    HyperparameterError
        A weight is ``<= 0`` (a zero weight is no constraint: leave the row out, or downdate it).
    """
    if weights is None:
        return np.ones(u)
    try:
        omega = np.asarray(weights, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ShapeError(f"{name} must be numeric (one weight per row); got {type(weights).__name__}") from exc
    if omega.ndim == 0:
        omega = np.full(u, float(omega))
    if omega.ndim != 1 or omega.shape[0] != u:
        raise ShapeError(f"{name} must hold one weight per row of the batch ({u}); got shape {omega.shape}")
    if not np.all(np.isfinite(omega)):
        raise NonFiniteError(f"{name} contains NaN or infinity; every weight must be finite")
    if not np.all(omega > 0):
        bad = float(omega[~(omega > 0)][0])
        raise HyperparameterError(
            f"{name} must be > 0 on every row; got {bad:g} (to drop a fact, leave it out or downdate it)"
        )
    return omega


def scale_rows(K: np.ndarray, V: np.ndarray, omega: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """The row-scaled batch ``(Omega^{1/2} K, Omega^{1/2} V)`` for validated ``omega (u,)``.

    ``||Omega^{1/2}(K W - V)||_F^2 = ||(Omega^{1/2} K) W - Omega^{1/2} V||_F^2`` for every ``W``
    (the row-scaling lemma), so the weighted problem is the unweighted one on these rows.
    ``omega=None`` returns ``(K, V)`` themselves. Raises :class:`NonFiniteError` if the scaled
    rows overflow.
    """
    if omega is None:
        return K, V
    root = np.sqrt(omega)[:, None]  # (u, 1)
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported below, typed
        Ks, Vs = root * K, root * V  # (u, d_k), (u, d_v)
    if not (np.all(np.isfinite(Ks)) and np.all(np.isfinite(Vs))):
        raise NonFiniteError("the weighted rows sqrt(omega) * K, sqrt(omega) * V overflow; use smaller weights")
    return Ks, Vs


def weighted_batch(K: np.ndarray, V: np.ndarray, weights: ArrayLike | None, d_k: int,
                   d_v: int) -> tuple[np.ndarray, np.ndarray]:
    """Validate a batch and its row weights; return the row-scaled batch.

    ``K (u, d_k)``, ``V (u, d_v)``, ``weights`` as in :func:`check_row_weights`. With
    ``weights=None`` this is :func:`check_batch` (the rows are not touched).
    """
    K, V = check_batch(K, V, d_k, d_v)
    if weights is None:
        return K, V
    return scale_rows(K, V, check_row_weights(weights, K.shape[0]))


class Problem:
    """Pre-trained weights ``W0``, weights ``alpha``, ``beta`` and the anchor ``(K0, V0)``.

    Parameters
    ----------
    W0 : array (d_k, d_v)
        Pre-trained weights.
    alpha : float >= 0
        Weight of ``||W - W0||_F^2``.
    beta : float >= 0
        Weight of ``||K0 W - V0||_F^2``.
    gram0 : array (d_k, d_k), optional
        ``K0^T K0`` when the anchor keys are known only through their Gram matrix (in practice
        ``N * E[k k^T]``). Then ``V0 = K0 W0`` implicitly. Must be symmetric PSD.
    K0 : array (n0, d_k), optional
        Explicit anchor keys (excludes ``gram0``).
    V0 : array (n0, d_v), optional
        Explicit anchor values; defaults to ``K0 @ W0``. Requires ``K0``.

    Raises
    ------
    ShapeError, NonFiniteError, HyperparameterError, NotPositiveDefiniteError
        When shapes disagree, inputs are not finite, a weight is negative, or the preservation
        metric ``A = alpha I + beta K0^T K0`` is not positive definite (use ``alpha > 0`` or a
        full-column-rank anchor with ``beta > 0``).
    """

    def __init__(self, W0: np.ndarray, alpha: float, beta: float, gram0: np.ndarray | None = None,
                 K0: np.ndarray | None = None, V0: np.ndarray | None = None):
        self.W0 = as_matrix(W0, "W0")
        d_k, d_v = self.W0.shape
        self.alpha = check_weight(alpha, "alpha")
        self.beta = check_weight(beta, "beta")
        if gram0 is not None and K0 is not None:
            raise ShapeError("give the anchor as gram0 or as K0 (with optional V0), not both")
        if V0 is not None and K0 is None:
            raise ShapeError("V0 needs explicit anchor keys K0 (with gram0 alone, V0 = K0 W0)")

        self.K0 = self.V0 = None
        if K0 is not None:
            self.K0 = as_matrix(K0, "K0", shape=(None, d_k))
            n0 = self.K0.shape[0]
            self.V0 = self.K0 @ self.W0 if V0 is None else as_matrix(V0, "V0", shape=(n0, d_v))
            self.gram0 = self.K0.T @ self.K0  # (d_k, d_k)
            self.cross0 = self.K0.T @ self.V0  # (d_k, d_v)  K0^T V0
            self.v0_sq = float(np.sum(self.V0**2))  # ||V0||_F^2
        elif gram0 is not None:
            g = as_matrix(gram0, "gram0", shape=(d_k, d_k))
            if not np.allclose(g, g.T, rtol=1e-10, atol=1e-12 * max(1.0, np.abs(g).max())):
                raise NotPositiveDefiniteError("gram0 must be symmetric (it is K0^T K0)")
            self.gram0 = (g + g.T) / 2
            scale = max(1.0, float(np.abs(self.gram0).max()))
            if np.linalg.eigvalsh(self.gram0)[0] < -1e-10 * scale:
                raise NotPositiveDefiniteError(
                    "gram0 must be positive semidefinite (it is K0^T K0); it has a negative eigenvalue"
                )
            self.cross0 = self.gram0 @ self.W0  # K0^T K0 W0
            self.v0_sq = float(np.sum(self.W0 * self.cross0))  # ||K0 W0||^2
        else:
            self.gram0 = np.zeros((d_k, d_k))
            self.cross0 = np.zeros((d_k, d_v))
            self.v0_sq = 0.0

        # A = alpha I + beta K0^T K0 must be SPD: check with a Cholesky factorisation.
        self.metric = self.alpha * np.eye(d_k) + self.beta * self.gram0  # (d_k, d_k)
        try:
            self._metric_chol = scipy.linalg.cho_factor(self.metric, lower=True)
        except np.linalg.LinAlgError as exc:
            raise NotPositiveDefiniteError(
                "the preservation metric A = alpha*I + beta*K0^T K0 is singular or indefinite; "
                "use alpha > 0, or beta > 0 with a full-column-rank anchor"
            ) from exc
        self.rhs0 = self.alpha * self.W0 + self.beta * self.cross0  # B_0 (d_k, d_v)

    @classmethod
    def from_lambda_mu(cls, W0: np.ndarray, lam: float, mu: float, *, convention: str = "code", **anchor):
        """Build from the authors' ``(lambda, mu)``.

        ``convention="code"`` (the authors' code and paper v2): ``alpha = lam**2``,
        ``beta = mu**2``. ``convention="v1"`` (paper v1 as rendered): ``alpha = lam/2``,
        ``beta = mu/2``.
        """
        lam = check_weight(lam, "lambda")
        mu = check_weight(mu, "mu")
        if convention == "code":
            return cls(W0, lam**2, mu**2, **anchor)
        if convention == "v1":
            return cls(W0, lam / 2, mu / 2, **anchor)
        raise HyperparameterError(f"convention must be 'code' or 'v1'; got {convention!r}")

    @property
    def d_k(self) -> int:
        return self.W0.shape[0]

    @property
    def d_v(self) -> int:
        return self.W0.shape[1]

    def solve_metric(self, X: np.ndarray) -> np.ndarray:
        """``A^{-1} X`` by the Cholesky factor of ``A``."""
        return scipy.linalg.cho_solve(self._metric_chol, X)

    @property
    def W_star0(self) -> np.ndarray:
        """Minimiser of the regulariser alone, ``A^{-1}(alpha W0 + beta K0^T V0)`` (d_k, d_v).

        Equals ``W0`` when ``V0 = K0 W0``.
        """
        return self.solve_metric(self.rhs0)

    def check_batch(self, K: np.ndarray, V: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Validate an edit batch against this problem's sizes."""
        return check_batch(K, V, self.d_k, self.d_v)

    def weighted_batch(self, K: np.ndarray, V: np.ndarray,
                       weights: ArrayLike | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Validate an edit batch and its row weights; return ``(Omega^{1/2} K, Omega^{1/2} V)``.

        See :func:`weighted_batch`; ``weights=None`` returns what :meth:`check_batch` returns.
        """
        return weighted_batch(K, V, weights, self.d_k, self.d_v)

    def __repr__(self) -> str:
        return (
            f"Problem(d_k={self.d_k}, d_v={self.d_v}, alpha={self.alpha:g}, beta={self.beta:g}, "
            f"anchor={'explicit' if self.K0 is not None else 'gram' if self.gram0.any() else 'none'})"
        )
