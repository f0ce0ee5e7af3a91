"""RLSEdit's layer solver: the torch twin of :mod:`rlsedit_theory.recursive`.

Same recursion and conventions as the NumPy reference: row keys ``K (u, d_k)``, absolute targets
``V (u, d_v)``, weights ``W (d_k, d_v)``, ``C = G^{-1}``; :func:`woodbury_update` and
:func:`woodbury_downdate` mirror the functions of the same names in
:mod:`rlsedit_theory.recursive` (a test proves them equal on the same data). The state is
float64 (default) or float32 on the layer's own device, whatever the model's dtype.

:class:`LayerRLS` itself does not call the pure functions (they make several ``d_k^2``
temporaries): ``propose`` computes the step's ``O(d_k u)`` factors with
:func:`rlsedit_llm.kernel.inplace.woodbury_factors` and ``commit`` updates ``C_`` in place with
the symmetric rank-``u`` update (see :mod:`rlsedit_llm.kernel.inplace` and
:mod:`rlsedit_llm.kernel.protocol`); the same step to rounding (tested).

The anchor is given by its Gram matrix only (``K0^T K0 = N E[k k^T]``) with ``V0 = K0 W0``
implicit, so ``W*_0 = W0`` and ``C_0 = (alpha I + beta K0^T K0)^{-1}``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from rlsedit_llm.errors import HyperparameterError, NonFiniteError, NotPositiveDefiniteError, ShapeError
from rlsedit_llm.kernel.inplace import woodbury_factors
from rlsedit_llm.kernel.method_config import MethodConfig
from rlsedit_llm.kernel.protocol import Capabilities, LayerSolver, Step, spd_condition

__all__ = ["LayerRLS", "RLSEditConfig", "woodbury_update", "woodbury_downdate", "anchor_metric", "max_condition"]


def _cholesky(S: torch.Tensor, what: str) -> torch.Tensor:
    L, info = torch.linalg.cholesky_ex((S + S.mT) / 2)
    if int(info) != 0:
        raise NotPositiveDefiniteError(what)
    return L


def _step(C, W, K, V, sign: float, what: str):
    """Shared body; ``sign = -1`` adds the batch, ``+1`` removes it (the theory's convention)."""
    F = C @ K.mT  # (d_k, u)
    r = V - K @ W  # innovation (u, d_v)
    S = torch.eye(K.shape[0], dtype=C.dtype, device=C.device) - sign * (K @ F)  # (u, u): I + K F or I - K F
    gain = torch.cholesky_solve(F.mT, _cholesky(S, what)).mT  # F S^{-1}  (d_k, u)
    C_new = C + sign * (gain @ F.mT)
    C_new = ((C_new + C_new.mT) / 2).contiguous()  # exactly symmetric, row-major after a reload too
    return C_new, W - sign * (gain @ r)


def woodbury_update(C: torch.Tensor, W: torch.Tensor, K: torch.Tensor,
                    V: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Add the batch ``(K, V)``: return ``(C_t, W_t)`` (inputs untouched).

    Mirrors :func:`rlsedit_theory.recursive.woodbury_update`.
    """
    return _step(C, W, K, V, -1.0, "I + K C K^T is not SPD: the state is corrupted")


def woodbury_downdate(C: torch.Tensor, W: torch.Tensor, K: torch.Tensor,
                      V: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Remove the batch ``(K, V)`` added earlier: return ``(C_prev, W_prev)``.

    Mirrors :func:`rlsedit_theory.recursive.woodbury_downdate`; raises
    :class:`NotPositiveDefiniteError` when the batch cannot have been part of the data.
    """
    return _step(C, W, K, V, 1.0, "I - K C K^T is not positive definite: this batch was never added to the state")


def anchor_metric(d_k: int, alpha: float, beta: float, gram0: torch.Tensor | None, *, dtype: torch.dtype,
                  device: torch.device | str | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(A, gram0)``: the prior metric ``A = alpha I + beta gram0`` (d_k, d_k) and the
    symmetrised anchor Gram (or None). Mirrors ``rlsedit_theory.Problem.metric``."""
    A = alpha * torch.eye(d_k, dtype=dtype, device=device)
    if gram0 is not None:
        if not isinstance(gram0, torch.Tensor) or gram0.shape != (d_k, d_k):
            raise ShapeError(f"gram0 must have shape ({d_k}, {d_k}); got {tuple(getattr(gram0, 'shape', ()))}")
        gram0 = gram0.detach().to(device=device, dtype=dtype)
        gram0 = (gram0 + gram0.mT) / 2
        A = A + beta * gram0
    if not torch.isfinite(A).all():
        raise NonFiniteError("the anchor Gram matrix contains NaN or infinity")
    return A, gram0


# Numerical headroom of a state dtype. A quantity of condition ``kappa`` computed in a dtype of
# unit round-off ``eps`` is known to about ``kappa * eps`` relative error; at ``kappa * eps = 1e-3``
# the state keeps three correct digits in its weakest direction. That is about where it stops
# working in practice: on a tiny model a float64 state whose ``cond(C_t)`` reached ``3e12``
# (``kappa * eps ~ 7e-4``) could no longer undo its own edits ("this batch was never added"),
# one at ``4.5e9`` could; a float32 state failed the same way at ``4e6`` and worked at ``250``.
_HEADROOM = 1e3


def max_condition(dtype: torch.dtype) -> float:
    """The largest condition number a state in ``dtype`` can carry: ``1 / (1000 eps)`` (4.5e12
    for float64, 8.4e3 for float32; see ``_HEADROOM``)."""
    return 1.0 / (_HEADROOM * torch.finfo(dtype).eps)


def _largest_eigenvalue(S: torch.Tensor, iters: int = 24) -> float:
    """A lower estimate of ``lambda_max`` of a symmetric PSD matrix ``S``: the best Rayleigh
    quotient of a few power iterations on four fixed random vectors (``O(d^2)`` each and no
    ``d^2`` temporary: no ``d^3`` eigendecomposition), never below the largest diagonal entry
    (itself a lower bound). ``inf`` or ``nan`` when ``S`` holds them."""
    def unit(Y):  # by the largest entry first: iterates of 1e-300 or 1e300 keep a usable norm
        Y = Y / Y.abs().amax(dim=0).clamp_min(torch.finfo(Y.dtype).tiny)
        return Y / Y.norm(dim=0).clamp_min(torch.finfo(Y.dtype).tiny)

    gen = torch.Generator(device="cpu").manual_seed(0)
    X = unit(torch.randn(S.shape[0], 4, generator=gen, dtype=torch.float64).to(device=S.device, dtype=S.dtype))
    for _ in range(iters):
        X = unit(S @ X)
    quotient = float(((S @ X) * X).sum(dim=0).max())
    return max(quotient, float(S.diagonal().max()))


def _check_metric_condition(A: torch.Tensor, C: torch.Tensor, alpha: float, beta: float) -> None:
    """Refuse ``A = alpha I + beta gram0`` (and its inverse ``C``) when the state dtype cannot
    carry it: ``C`` not finite (the regulariser underflows), or ``cond(A) = lambda_max(A) *
    lambda_max(C)`` above :func:`max_condition` (a rank-deficient anchor with a negligible
    ``alpha``). The estimate is a lower one, so only states that are surely unusable are refused."""
    dtype = A.dtype
    lam_max, lam_max_inverse = _largest_eigenvalue(A), _largest_eigenvalue(C)
    if not math.isfinite(lam_max_inverse):
        raise HyperparameterError(
            f"alpha={alpha:g}, beta={beta:g}: the preservation metric A = alpha*I + beta*N*E[kk^T] is so small that "
            f"its inverse overflows {str(dtype).removeprefix('torch.')}; raise alpha or mom2_weight (N)")
    condition = lam_max * lam_max_inverse
    limit = max_condition(dtype)
    if not condition <= limit:
        raise HyperparameterError(
            f"alpha={alpha:g}, beta={beta:g}: the preservation metric A = alpha*I + beta*N*E[kk^T] has condition "
            f"number about {condition:.2g}, more than a {str(dtype).removeprefix('torch.')} state can carry "
            f"({limit:.2g} = 1/(1000 eps)): its inverse would be numerically singular and edits could not be undone. "
            f"Raise alpha to at least {lam_max / limit:.3g} (the anchor's statistics are nearly rank-deficient: more "
            f"statistics tokens also help){' or use state_dtype=float64' if dtype == torch.float32 else ''}")


def _check_absorbable(K: torch.Tensor, G: torch.Tensor, alpha: float, beta: float) -> None:
    """Refuse a batch next to which the regulariser is negligible (e.g. ``alpha = 1e-300`` and a tiny
    ``mom2_weight``): such a step shrinks the inverse ``C`` by a factor ``s = 1 + k^T C k`` in the
    keys' directions, and the state's condition grows by about ``s``. With ``G G^T = C K^T S^{-1} K
    C`` (the step's factor), ``||K G||_F^2 = sum_i (s_i - 1)^2 / s_i`` (about ``sum_i s_i``, ``O(d_k
    u^2)``); above :func:`max_condition` the state is numerically singular after the step."""
    dtype = G.dtype
    shrink = float((K @ G).square().sum())
    limit = max_condition(dtype)
    if not shrink <= limit:
        raise HyperparameterError(
            f"alpha={alpha:g}, beta={beta:g}: the regulariser is negligible next to this batch's keys (absorbing it "
            f"would shrink the state's inverse by a factor of about {shrink:.2g}, more than a "
            f"{str(dtype).removeprefix('torch.')} state can carry, {limit:.2g}), which leaves the state numerically "
            f"singular (later undos fail); raise alpha or the anchor weight beta * mom2_weight")


class LayerRLS(LayerSolver):
    """Recursive least-squares state of one edited layer (method ``"rlsedit"``).

    Parameters
    ----------
    W0 : Tensor (d_k, d_v)
        Pre-edit weights in row-key orientation (any dtype/device; copied).
    alpha, beta : float >= 0
        Weights of ``||W - W0||^2`` and ``||K0 (W - W0)||^2``.
    gram0 : Tensor (d_k, d_k) or None
        Anchor Gram ``K0^T K0`` (symmetric PSD). ``None`` means no anchor term.
    dtype : torch.float64 (default) or torch.float32
        Dtype of the state.
    track_information : bool
        Also carry ``G_t`` to measure ``||C_t G_t - I||`` (``d_k^2`` more memory).

    Attributes
    ----------
    W_ (d_k, d_v), C_ (d_k, d_k), G_ (d_k, d_k) or None, gram0_ (d_k, d_k) or None (the
    symmetrised anchor Gram, so ``A = alpha I + beta gram0_`` is recoverable), n_updates_, n_rows_.

    Notes
    -----
    Regularisers the state dtype cannot carry are refused with :class:`HyperparameterError`:
    here when ``cond(A)`` exceeds :func:`max_condition` (``1 / (1000 eps)``: 4.5e12 in float64,
    8.4e3 in float32) or ``A^{-1}`` overflows, and at the first batch that would shrink ``C`` by
    more than that factor (a regulariser negligible next to the keys, e.g. ``alpha = 1e-300``
    with a tiny ``mom2_weight``); nothing is changed then.
    """

    name = "rlsedit"
    capabilities = Capabilities(retracts=True, cumulative_objective=True, keeps_inverse=True)
    state_tensors = ("W0_", "W_", "C_", "G_", "gram0_")

    def __init__(self, W0: torch.Tensor, alpha: float, beta: float, gram0: torch.Tensor | None = None, *,
                 dtype: torch.dtype = torch.float64, track_information: bool = False) -> None:
        self._init_common(W0, alpha, beta, dtype)
        d_k = self.W0_.shape[0]
        A, self.gram0_ = anchor_metric(d_k, self.alpha, self.beta, gram0, dtype=dtype, device=self.device)
        L = _cholesky(A, f"the preservation metric A = alpha*I + beta*N*E[kk^T] is singular in {dtype} "
                         f"(alpha={self.alpha:g}, beta={self.beta:g}); raise alpha or use more statistics tokens")
        C = torch.cholesky_solve(torch.eye(d_k, dtype=dtype, device=self.device), L)
        C = ((C + C.mT) / 2).contiguous()  # (d_k, d_k)
        _check_metric_condition(A, C, self.alpha, self.beta)
        self.C_ = C
        self.G_ = A if track_information else None

    def _propose(self, K: torch.Tensor, V: torch.Tensor, sign: int) -> Step:
        """The step as factors (``sign = -1`` adds, ``+1`` removes, the theory's convention):
        ``W - sign G Y`` (a new tensor) and the in-place terms ``C_ += sign G G^T`` (and
        ``G_ -= sign K^T K`` when tracked), ``O(d_k u)`` memory."""
        G, Y = woodbury_factors(self.C_, self.W_, K, V, sign=sign)  # reads C_; changes nothing
        if sign < 0:
            _check_absorbable(K, G, self.alpha, self.beta)
        W = torch.addmm(self.W_, G, Y, alpha=-sign)
        terms: tuple[tuple[str, torch.Tensor, int], ...] = (("C_", G, sign),)
        if self.G_ is not None:
            terms += (("G_", K.mT, -sign),)
        return Step(W, {}, -sign * K.shape[0], terms)

    def propose(self, K: torch.Tensor, V: torch.Tensor) -> Step:
        K, V = self._check(K, V)
        return self._propose(K, V, -1)

    def propose_removal(self, K: torch.Tensor, V: torch.Tensor) -> Step:
        K, V = self._check(K, V)
        if K.shape[0] > self.n_rows_:
            raise ShapeError(f"cannot remove {K.shape[0]} rows: the state holds {self.n_rows_}")
        return self._propose(K, V, +1)

    def condition_number(self) -> float:
        """``cond(G_t) = cond(C_t)`` (one symmetric eigendecomposition, ``O(d_k^3)``)."""
        return spd_condition(self.C_)

    def drift(self) -> float:
        """``||C_t G_t - I||_F`` (needs ``track_information=True``)."""
        if self.G_ is None:
            raise RuntimeError("construct with track_information=True to measure drift")
        eye = torch.eye(self.C_.shape[0], dtype=self.dtype, device=self.device)
        return float(torch.linalg.norm(self.C_ @ self.G_ - eye))


@dataclass(frozen=True)
class RLSEditConfig(MethodConfig):
    """rlsedit's settings: none of its own (``alpha``, ``beta``, the anchor, ``track_information``
    and the state dtype are :class:`~rlsedit_llm.EditConfig`'s)."""

    method = "rlsedit"
