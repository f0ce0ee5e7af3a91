"""Capacity of a lifelong stream: plasticity and retention forecast from key statistics.

The quantities (row keys, ``A = alpha I + beta K0^T K0`` the preservation metric, ``C = G^{-1}``):

* **Plasticity of a write** (T2). A batch ``K (u, d_k)`` written on the state ``C_prev`` leaves
  ``S^{-1} r`` of its innovation ``r (u, d_v)``, ``S = I + K C_prev K^T``. For an innovation whose
  rows are uncorrelated with equal energy (``E[r r^T] = c I``) the expected share of it left is
  ``sqrt(tr(S^{-2}) / u)`` (:func:`batch_residual_share`); ``tr(S^{-1}) / u`` is the mean
  share a fact keeps of its own residual (:func:`batch_mean_share`).
* **Retention of an earlier write** (T5, exact). In the minimiser ``W_t = G_t^{-1} B_t`` the
  fitted values of batch ``j`` respond to its own targets through the block ``H_jj(t) = K_j C_t
  K_j^T`` of the hat matrix, and by Woodbury ``H_jj(t) = I - (I + K_j C_{t,-j} K_j^T)^{-1}``,
  with ``C_{t,-j}`` the state of every *other* edit up to ``t`` (:func:`self_hat_block`). So an
  early edit keeps ``tr H_jj(t) / tr H_jj(j)`` of the response it had when written
  (:func:`retained_share`): exactly the absorption that a rewrite of the same keys would get
  now, relative to then. Plasticity decay (C4) and forgetting are the same quantity.
* **A state after n edits, before they happen** (deterministic equivalent). For keys drawn
  i.i.d. with second moment ``Sigma`` and ``Sigma~ = A^{-1/2} Sigma A^{-1/2} = U diag(lam) U^T``,
  ``G_n = A + sum_{i<=n} k_i k_i^T`` has ``G_n^{-1} ~ A^{-1/2} U diag(1 / (1 + n lam / (1 + delta_n)))
  U^T A^{-1/2}`` with ``delta_n`` the unique positive root of ``delta = sum_k lam_k / (1 + n lam_k /
  (1 + delta))`` (:func:`equivalent_leverage`; ``delta_n`` is the mean leverage
  ``k^T G_n^{-1} k`` of a fresh key). The key model (:func:`fit_key_model`) is fitted to a
  sample of keys: their mean plus a Ledoit-Wolf shrunk covariance in the ``A``-whitened
  coordinates (:func:`ledoit_wolf_shrinkage`), which extends the sample's spectrum to the
  directions the sample cannot see (``A``'s own shape). :func:`simulate_states` checks it by
  drawing synthetic keys from the same model and running the exact recursion.
* **Several layers** (the editor's spreading rule). Layer ``i`` of ``L`` is asked for ``1 / (L - i)``
  of what is left of the residual at the last edited layer and absorbs ``1 - sigma_i`` of it; a
  share ``eta`` of what a lower layer writes reaches the last layer's output (the last layer's
  own write reaches it in full). The residual left after all ``L`` writes is
  ``prod_i (1 - eta_i (1 - sigma_i) / (L - i))`` (:func:`compose_layers`): the last layer's share
  ``sigma_{L-1}`` times factors ``1 - eta (1 - sigma_i) / m``, ``m = 2 .. L``, whose product falls
  only like ``L^{-eta (1 - sigma)}`` (equal shares), so a wider window buys less and less as the
  layers saturate (``sigma -> 1``). ``eta`` is not a constant of the model: it is fitted
  to emulated writes (:func:`propagation_for`) and grows as the layers stiffen
  (:func:`interpolate_propagation`).

Everything is float64 NumPy and SciPy (Cholesky solves, small explicit inverses of ``u x u``
matrices, one SVD of the key sample's ``(n + 1, d)`` factor); the docs page "Capacity and stream
length" derives each formula.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.linalg
from numpy.typing import ArrayLike

from .errors import HyperparameterError, NotPositiveDefiniteError, ShapeError
from .problem import as_matrix, check_weight

__all__ = [
    "batch_residual_share",
    "batch_mean_share",
    "self_hat_block",
    "retained_share",
    "ledoit_wolf_shrinkage",
    "KeyModel",
    "fit_key_model",
    "equivalent_leverage",
    "equivalent_state",
    "equivalent_whitened_state",
    "forecast_shares",
    "simulate_states",
    "compose_layers",
    "layer_contributions",
    "propagation_for",
    "interpolate_propagation",
]


# ----------------------------------------------------------------------------------------------
# One write and one earlier batch, on a given state


def _square(C: ArrayLike, name: str) -> np.ndarray:
    C = as_matrix(C, name)
    if C.shape[0] != C.shape[1]:
        raise ShapeError(f"{name} must be square; got shape {C.shape}")
    return (C + C.T) / 2


def _keys(K: ArrayLike, d_k: int, name: str = "K") -> np.ndarray:
    K = np.atleast_2d(np.asarray(K, dtype=np.float64)) if np.ndim(K) == 1 else K
    K = as_matrix(K, name, shape=(None, d_k))
    if K.shape[0] == 0:
        raise ShapeError(f"{name} needs at least one row")
    return K


def _gram(C: ArrayLike, K: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """``(S, K)`` with ``S = I + K C K^T`` (u, u), checked."""
    C = _square(C, "C")
    K = _keys(K, C.shape[0])
    S = np.eye(K.shape[0]) + K @ C @ K.T
    return (S + S.T) / 2, K


def _cho(S: np.ndarray, what: str):
    try:
        return scipy.linalg.cho_factor(S, lower=True)
    except np.linalg.LinAlgError:
        raise NotPositiveDefiniteError(f"{what} is not positive definite: is the state C positive "
                                       f"semi-definite?") from None


def batch_residual_share(C_prev: ArrayLike, K: ArrayLike, innovation_cov: ArrayLike | None = None) -> float:
    """The share of its innovation that writing batch ``K (u, d_k)`` on ``C_prev`` leaves (T2).

    ``sqrt(tr(S^{-1} P S^{-1}) / tr(P))`` with ``S = I + K C_prev K^T`` and ``P (u, u)`` the
    innovation's row covariance ``E[r r^T]`` (default ``I``: facts with uncorrelated residuals of
    equal energy). For an innovation ``r`` with ``r r^T = P`` it is exactly ``||V - K W_t||_F /
    ||r||_F`` after the write (T2: ``V - K W_t = S^{-1} r``). In ``(0, 1]``; 1 for a state with
    no room left along the keys (``K C_prev K^T = 0``).
    """
    S, K = _gram(C_prev, K)
    u = K.shape[0]
    factor = _cho(S, "I + K C K^T")
    if innovation_cov is None:
        X = scipy.linalg.cho_solve(factor, np.eye(u))  # S^{-1}
        num, den = float(np.sum(X * X)), float(u)
    else:
        P = _square(innovation_cov, "innovation_cov")
        if P.shape[0] != u:
            raise ShapeError(f"innovation_cov must be ({u}, {u}); got {P.shape}")
        X = scipy.linalg.cho_solve(factor, P)  # S^{-1} P
        num = float(np.trace(scipy.linalg.cho_solve(factor, X.T)))  # tr(S^{-1} P S^{-1})
        den = float(np.trace(P))
        if not den > 0:
            raise HyperparameterError("innovation_cov must have a positive trace")
    return float(np.sqrt(max(num, 0.0) / den))


def batch_mean_share(C_prev: ArrayLike, K: ArrayLike) -> float:
    """``tr(S^{-1}) / u``: the mean over the batch's facts of the share of its own residual a
    fact keeps (``1 -`` the mean in-sample leverage ``k_i C_t k_i^T`` after the write)."""
    S, K = _gram(C_prev, K)
    factor = _cho(S, "I + K C K^T")
    return float(np.trace(scipy.linalg.cho_solve(factor, np.eye(K.shape[0]))) / K.shape[0])


def self_hat_block(C_other: ArrayLike, K_j: ArrayLike) -> np.ndarray:
    """``H_jj = I - (I + K_j C_other K_j^T)^{-1}`` (u, u): how batch ``j``'s fitted values
    ``K_j W_t`` respond to its own targets ``V_j``, where ``C_other`` is the state built from
    everything *except* batch ``j`` (the anchor and the other edits up to ``t``).

    By Woodbury it equals ``K_j C_t K_j^T`` with ``C_t`` the state that includes batch ``j``:
    ``d(K_j W_t) = H_jj dV_j``. Symmetric, with eigenvalues in ``[0, 1)``.
    """
    S, K_j = _gram(C_other, K_j)
    factor = _cho(S, "I + K_j C K_j^T")
    H = np.eye(K_j.shape[0]) - scipy.linalg.cho_solve(factor, np.eye(K_j.shape[0]))
    return (H + H.T) / 2


def retained_share(C_then: ArrayLike, C_now: ArrayLike, K_j: ArrayLike) -> float:
    """``tr H_jj(now) / tr H_jj(then)``: the share of its own response an edit keeps.

    ``C_then`` is the state of the other edits when batch ``j`` was written (everything before
    it), ``C_now`` the state of the other edits later (everything but batch ``j`` up to now);
    both without batch ``j`` itself (:func:`self_hat_block`). In ``[0, 1]`` when ``C_now <=
    C_then`` (more edits only shrink the state), the usual case.
    """
    then = float(np.trace(self_hat_block(C_then, K_j)))
    if not then > 0:
        raise HyperparameterError("batch j had no response when written (K_j C_then K_j^T = 0)")
    return float(np.trace(self_hat_block(C_now, K_j))) / then


# ----------------------------------------------------------------------------------------------
# A model of the keys of a stream, and the state it leads to


def ledoit_wolf_shrinkage(X: ArrayLike) -> float:
    """Ledoit and Wolf's (2004) shrinkage intensity towards a scaled identity for the covariance
    of the rows of ``X (n, p)`` (centred here): ``min(1, b^2 / d^2)`` with ``d^2 = ||S_n - m I||_F^2
    / p``, ``b^2 = (1 / n^2) sum_i ||x_i x_i^T - S_n||_F^2 / p``, ``S_n = X_c^T X_c / n``,
    ``m = tr(S_n) / p``. In ``[0, 1]``: 0 keeps the sample covariance, 1 keeps only its trace."""
    X = as_matrix(X, "X")
    n, p = X.shape
    if n < 2:
        raise ShapeError(f"need at least 2 rows to estimate a covariance; got {n}")
    Xc = X - X.mean(axis=0)
    Sn = Xc.T @ Xc / n
    m = float(np.trace(Sn)) / p
    d2 = float(np.sum((Sn - m * np.eye(p)) ** 2)) / p
    if not d2 > 0:
        return 1.0
    norms = np.sum(Xc * Xc, axis=1)
    b2 = (float(np.sum(norms ** 2)) / n - float(np.sum(Sn * Sn))) / n / p
    return float(min(max(b2, 0.0), d2) / d2)


@dataclass(frozen=True)
class KeyModel:
    """Keys of a stream in the coordinates whitened by the preservation metric ``A = L L^T``.

    ``x = L^{-1} k``. The model's second moment is ``E[x x^T] = mean mean^T + (1 - shrinkage) S +
    floor I`` with ``S`` the sample covariance of the whitened keys ``samples (n, d)`` and
    ``floor = shrinkage tr(S) / d`` (the Ledoit-Wolf covariance plus the mean). It is kept in
    low-rank form: ``eigenvectors (d, r)`` span the sample (``r <= n``) with eigenvalues
    ``spectrum[:r]``, every direction orthogonal to them has ``floor``; ``spectrum (d,)`` lists all
    ``d`` eigenvalues (the last ``d - r`` equal to ``floor``). ``chol (d, d)`` is ``L``.
    """

    chol: np.ndarray
    mean: np.ndarray
    shrinkage: float
    floor: float
    spectrum: np.ndarray
    eigenvectors: np.ndarray
    samples: np.ndarray

    @property
    def d(self) -> int:
        return int(self.mean.shape[0])

    @property
    def rank(self) -> int:
        """``r``: the number of eigenvalues above the floor that the sample carries."""
        return int(self.eigenvectors.shape[1])

    def second_moment(self) -> np.ndarray:
        """The model's whitened second moment ``E[x x^T]`` as a dense (d, d) matrix."""
        Xc = self.samples - self.samples.mean(axis=0)
        n = Xc.shape[0]
        M = (1 - self.shrinkage) * (Xc.T @ Xc) / (n - 1) + self.floor * np.eye(self.d) + np.outer(self.mean, self.mean)
        return (M + M.T) / 2

    def whiten(self, K: ArrayLike) -> np.ndarray:
        """Keys ``K (u, d)`` in the whitened coordinates, ``K L^{-T}``."""
        K = _keys(K, self.d)
        return scipy.linalg.solve_triangular(self.chol, K.T, lower=True).T

    def draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """``n`` synthetic whitened keys, Gaussian with the model's mean and covariance
        (``(1 - shrinkage) S + floor I``)."""
        Xc = self.samples - self.samples.mean(axis=0)
        m = Xc.shape[0]
        out = self.mean + np.sqrt((1 - self.shrinkage) / (m - 1)) * (rng.standard_normal((n, m)) @ Xc)
        return out + np.sqrt(self.floor) * rng.standard_normal((n, self.d))


def fit_key_model(keys: ArrayLike, metric: ArrayLike, *, shrinkage: float | None = None) -> KeyModel:
    """The :class:`KeyModel` of a sample of keys ``(n, d_k)`` under the metric ``A (d_k, d_k)``.

    ``shrinkage`` None: :func:`ledoit_wolf_shrinkage` of the whitened sample; else a number in
    ``[0, 1]``. The sample must have at least 2 keys; ``A`` must be positive definite. The
    eigendecomposition works on the ``(n + 1, d)`` factor of the low-rank part (``O(n^2 d)``).
    """
    A = _square(metric, "metric")
    K = _keys(keys, A.shape[0], "keys")
    if K.shape[0] < 2:
        raise ShapeError("need at least 2 keys to fit a key model")
    try:
        L = np.linalg.cholesky(A)
    except np.linalg.LinAlgError:
        raise NotPositiveDefiniteError("the preservation metric A is not positive definite") from None
    X = scipy.linalg.solve_triangular(L, K.T, lower=True).T
    n, d = X.shape
    mean = X.mean(axis=0)
    Xc = X - mean
    if shrinkage is None:
        shrinkage = ledoit_wolf_shrinkage(X)
    g = check_weight(shrinkage, "shrinkage")
    if g > 1:
        raise HyperparameterError(f"shrinkage must be in [0, 1]; got {g}")
    floor = g * float(np.sum(Xc * Xc)) / (n - 1) / d
    factor = np.vstack([np.sqrt((1 - g) / (n - 1)) * Xc, mean[None, :]])  # (n + 1, d): factor^T factor
    _, sv, Vt = np.linalg.svd(factor, full_matrices=False)
    keep = sv > sv.max(initial=0.0) * 1e-10 if sv.size else sv > 0
    U = Vt[keep].T  # (d, r)
    top = sv[keep] ** 2 + floor
    spectrum = np.concatenate([top, np.full(d - U.shape[1], floor)])
    return KeyModel(L, mean, g, floor, spectrum, U, X)


def equivalent_leverage(eigenvalues: ArrayLike, n: float) -> float:
    """``delta_n``: the unique root ``delta >= 0`` of ``delta = sum_k lam_k / (1 + n lam_k / (1 + delta))``.

    ``lam`` are the eigenvalues of the whitened second moment ``A^{-1/2} Sigma A^{-1/2}`` and
    ``n >= 0`` the number of keys already written; ``delta_n`` is the deterministic equivalent of
    a fresh key's leverage ``k^T G_n^{-1} k`` (``delta_0 = sum lam = E[k^T A^{-1} k]`` exactly).
    Decreasing in ``n``, about ``d_eff / n`` once ``n`` outgrows the keys' dimension.
    Solved by bisection on ``x = delta / (1 + delta)`` in ``(0, 1)``, where the equation reads
    ``x = (1 - x) sum_k lam_k / (1 + n lam_k (1 - x))`` (left side increasing, right side
    decreasing in ``x``: one root).
    """
    lam = np.asarray(eigenvalues, dtype=np.float64).ravel()
    if lam.size == 0 or not np.all(np.isfinite(lam)) or np.any(lam < 0):
        raise HyperparameterError("eigenvalues must be finite and >= 0")
    n = check_weight(n, "n")
    total = float(lam.sum())
    if n == 0 or total == 0:
        return total

    def excess(x: float) -> float:
        return (1 - x) * float(np.sum(lam / (1 + n * lam * (1 - x)))) - x

    lo, hi = 0.0, 1.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if excess(mid) > 0:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-15:
            break
    x = (lo + hi) / 2
    return x / (1 - x)


def equivalent_whitened_state(eigenvalues: ArrayLike, n: float) -> np.ndarray:
    """The diagonal ``1 / (1 + n lam / (1 + delta_n))`` of the deterministic-equivalent state in
    the whitened eigenbasis (``A^{1/2} G_n^{-1} A^{1/2} ~ U diag(.) U^T``); all ones at ``n = 0``."""
    lam = np.asarray(eigenvalues, dtype=np.float64).ravel()
    delta = equivalent_leverage(lam, n)
    return 1.0 / (1.0 + n * lam / (1.0 + delta))


def _split_state(model: KeyModel, n: float) -> tuple[np.ndarray, float]:
    """The equivalent state's diagonal on the sample's eigenvectors and its value on the rest."""
    c = equivalent_whitened_state(model.spectrum, n)
    r = model.rank
    rest = float(c[r]) if r < model.d else 1.0
    return c[:r], rest


def equivalent_state(model: KeyModel, n: float) -> np.ndarray:
    """``G_n^{-1}`` (d_k, d_k) in the original coordinates, deterministic equivalent of the state
    after ``n`` keys of ``model``: ``L^{-T} (c_rest I + U diag(c - c_rest) U^T) L^{-1}`` (exactly
    ``A^{-1}`` at ``n = 0``)."""
    top, rest = _split_state(model, n)
    eye = np.eye(model.d)
    Ainv = scipy.linalg.cho_solve((model.chol, True), eye)
    M = scipy.linalg.solve_triangular(model.chol, model.eigenvectors, lower=True, trans="T")  # L^{-T} U
    C = rest * Ainv + (M * (top - rest)) @ M.T
    return (C + C.T) / 2


def _batches(samples: np.ndarray, batch: int) -> list[np.ndarray]:
    n = samples.shape[0] // batch
    if n < 1:
        raise ShapeError(f"the sample has {samples.shape[0]} keys, fewer than one batch of {batch}")
    return [samples[i * batch:(i + 1) * batch] for i in range(n)]


def forecast_shares(model: KeyModel, positions: Sequence[float], *, batch: int) -> dict[str, np.ndarray]:
    """Plasticity and retention of one layer along a stream, from the deterministic equivalent.

    For each stream position ``t`` (edits written before the batch), the model's sample keys are
    cut into batches of ``batch`` and written on the equivalent state ``C_t`` (the batch itself
    is not in it). Returns arrays over ``positions``:

    * ``"share"``: the mean over the batches of :func:`batch_residual_share` (Frobenius, T2);
    * ``"mean_share"``: the mean of :func:`batch_mean_share`;
    * ``"retained"``: :func:`retained_share` of a batch written first (``C_then = A^{-1}``) and
      still in the model after ``t`` edits in all (``C_now`` = the state of the ``t - batch``
      others), averaged over the batches; 1 at ``t <= batch``.
    * ``"leverage"``: ``delta_t`` of :func:`equivalent_leverage`.
    """
    if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or batch < 1:
        raise HyperparameterError(f"batch must be an int >= 1; got {batch!r}")
    pos = np.asarray(positions, dtype=np.float64).ravel()
    if pos.size == 0 or not np.all(np.isfinite(pos)) or np.any(pos < 0):
        raise HyperparameterError("positions must be finite numbers >= 0")
    # Whitened coordinates: K C K^T = c_rest X X^T + (X U) diag(c - c_rest) (X U)^T.
    batches = _batches(model.samples, int(batch))
    plain = [B @ B.T for B in batches]
    rotated = [B @ model.eigenvectors for B in batches]
    eye = np.eye(int(batch))

    def inverses(n: float) -> list[np.ndarray]:
        top, rest = _split_state(model, n)
        return [np.linalg.inv(eye + rest * P + (R * (top - rest)) @ R.T) for P, R in zip(plain, rotated, strict=True)]

    def absorbed(n: float) -> float:  # mean tr(H_jj) / u over the batches
        return float(np.mean([1.0 - np.trace(X) / batch for X in inverses(n)]))

    first = absorbed(0.0)
    out: dict[str, list[float]] = {"share": [], "mean_share": [], "retained": [], "leverage": []}
    for t in pos:
        inv = inverses(t)
        out["share"].append(float(np.mean([np.sqrt(np.sum(X * X) / batch) for X in inv])))
        out["mean_share"].append(float(np.mean([np.trace(X) / batch for X in inv])))
        out["retained"].append(absorbed(max(t - batch, 0.0)) / first)
        out["leverage"].append(equivalent_leverage(model.spectrum, t))
    return {k: np.asarray(v) for k, v in out.items()}


def simulate_states(model: KeyModel, positions: Sequence[int], *, batch: int,
                    rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The same quantities as :func:`forecast_shares` (``"share"``, ``"mean_share"``) with the exact
    recursion instead of the deterministic equivalent: a stream of synthetic keys drawn from the
    model (:meth:`KeyModel.draw`) is written ``batch`` at a time in whitened coordinates
    (``C_0 = I``), and at each position in ``positions`` (multiples of ``batch``, ascending) the
    sample batches are written on the state reached (without being added to it)."""
    if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or batch < 1:
        raise HyperparameterError(f"batch must be an int >= 1; got {batch!r}")
    pos = [int(p) for p in positions]
    if any(p < 0 or p % batch for p in pos) or pos != sorted(pos):
        raise HyperparameterError(f"positions must be ascending multiples of batch={batch}")
    samples = _batches(model.samples, int(batch))
    C = np.eye(model.d)
    written = 0
    share, mean_share = [], []
    for p in pos:
        while written < p:
            K = model.draw(rng, int(batch))
            F = C @ K.T
            S = np.eye(int(batch)) + K @ F
            C = C - F @ np.linalg.solve(S, F.T)
            C = (C + C.T) / 2
            written += int(batch)
        share.append(float(np.mean([batch_residual_share(C, B) for B in samples])))
        mean_share.append(float(np.mean([batch_mean_share(C, B) for B in samples])))
    return {"share": np.asarray(share), "mean_share": np.asarray(mean_share)}


# ----------------------------------------------------------------------------------------------
# Several layers: the editor's spreading rule


def _layer_args(shares: ArrayLike, propagation: float | ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(shares, dtype=np.float64)
    if s.ndim == 0 or s.shape[0] == 0:
        raise ShapeError("shares needs one entry per layer (first axis)")
    if not np.all(np.isfinite(s)) or np.any(s < 0) or np.any(s > 1):
        raise HyperparameterError("shares must be in [0, 1]")
    eta = np.broadcast_to(np.asarray(propagation, dtype=np.float64), (s.shape[0],)).copy()
    if not np.all(np.isfinite(eta)) or np.any(eta < 0):
        raise HyperparameterError("propagation must be finite and >= 0")
    eta[-1] = 1.0  # the last layer's write lands on the residual it is measured at
    return s, eta


def layer_contributions(shares: ArrayLike, propagation: float | ArrayLike) -> np.ndarray:
    """The share of the initial residual (at the last edited layer) that each layer's write
    removes under the spreading rule: ``c_i = eta_i (1 - sigma_i) / (L - i) * prod_{j<i} (1 -
    eta_j (1 - sigma_j) / (L - j))``; ``sum_i c_i = 1 -`` :func:`compose_layers`.

    ``shares`` (L,) or (L, ...) per layer (ascending); ``propagation`` ``eta``: a number or one per
    layer (the last layer's is 1 whatever is given).
    """
    s, eta = _layer_args(shares, propagation)
    L = s.shape[0]
    left = np.ones(s.shape[1:])
    out = np.empty_like(s)
    for i in range(L):
        step = eta[i] * (1.0 - s[i]) / (L - i)
        out[i] = left * step
        left = left * (1.0 - step)
    return out


def compose_layers(shares: ArrayLike, propagation: float | ArrayLike) -> np.ndarray | float:
    """End-to-end residual share of a write through ``L`` layers: ``prod_i (1 - eta_i (1 -
    sigma_i) / (L - i))`` (see the module docstring). At most ``sigma_{L-1}`` (equal to it for one
    layer) and, when every ``eta_i <= 1``, at least ``prod_i sigma_i``."""
    s, eta = _layer_args(shares, propagation)
    L = s.shape[0]
    out = np.ones(s.shape[1:])
    for i in range(L):
        out = out * (1.0 - eta[i] * (1.0 - s[i]) / (L - i))
    return float(out) if out.ndim == 0 else out


def propagation_for(shares: ArrayLike, end_to_end: float) -> float:
    """The single ``eta`` for which :func:`compose_layers` of ``shares`` (L,) equals the measured
    (or emulated) ``end_to_end`` share; clipped to ``[0, 2]`` when no ``eta`` there reaches it.
    (The composition decreases in ``eta``; with one layer there is nothing to fit: 1.)"""
    s = np.asarray(shares, dtype=np.float64).ravel()
    target = check_weight(end_to_end, "end_to_end")
    if s.size == 1:
        return 1.0
    lo, hi = 0.0, 2.0
    if compose_layers(s, lo) <= target:
        return lo
    if compose_layers(s, hi) >= target:
        return hi
    for _ in range(100):
        mid = (lo + hi) / 2
        if compose_layers(s, mid) > target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def interpolate_propagation(calibration: Sequence[tuple[float, float]], mean_share: ArrayLike) -> np.ndarray | float:
    """``eta`` at a layer-mean share ``mean_share`` from calibration points ``(mean share, eta)``
    (e.g. emulated writes on the unedited state and on a stiffer one): linear in the mean share
    through the points (their least-squares line when more than two), extended beyond them,
    clipped to ``[min eta of the points, 1]``. One point: that ``eta`` everywhere."""
    pts = np.asarray(calibration, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 2 or pts.shape[0] == 0 or not np.all(np.isfinite(pts)):
        raise ShapeError("calibration must be a non-empty list of finite (mean share, eta) pairs")
    x = np.asarray(mean_share, dtype=np.float64)
    if pts.shape[0] == 1 or np.ptp(pts[:, 0]) == 0:
        out = np.full(x.shape, float(pts[:, 1].mean()))
    else:
        slope, intercept = np.polyfit(pts[:, 0], pts[:, 1], 1)
        out = intercept + slope * x
    out = np.clip(out, float(pts[:, 1].min()), 1.0)
    return float(out) if out.ndim == 0 else out
