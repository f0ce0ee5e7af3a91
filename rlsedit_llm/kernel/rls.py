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

import torch

from rlsedit_llm.errors import NonFiniteError, NotPositiveDefiniteError, ShapeError
from rlsedit_llm.kernel.inplace import woodbury_factors
from rlsedit_llm.kernel.protocol import Capabilities, LayerSolver, Step, spd_condition
from rlsedit_llm.kernel.registry import register

__all__ = ["LayerRLS", "woodbury_update", "woodbury_downdate", "anchor_metric"]


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


def woodbury_update(C: torch.Tensor, W: torch.Tensor, K: torch.Tensor, V: torch.Tensor):
    """Add the batch ``(K, V)``: return ``(C_t, W_t)`` (inputs untouched).

    Mirrors :func:`rlsedit_theory.recursive.woodbury_update`.
    """
    return _step(C, W, K, V, -1.0, "I + K C K^T is not SPD: the state is corrupted")


def woodbury_downdate(C: torch.Tensor, W: torch.Tensor, K: torch.Tensor, V: torch.Tensor):
    """Remove the batch ``(K, V)`` added earlier: return ``(C_prev, W_prev)``.

    Mirrors :func:`rlsedit_theory.recursive.woodbury_downdate`; raises
    :class:`NotPositiveDefiniteError` when the batch cannot have been part of the data.
    """
    return _step(C, W, K, V, 1.0, "I - K C K^T is not positive definite: this batch was never added to the state")


def anchor_metric(d_k: int, alpha: float, beta: float, gram0: torch.Tensor | None, *, dtype, device):
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


@register
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
    """

    name = "rlsedit"
    capabilities = Capabilities(retracts=True, cumulative_objective=True, keeps_inverse=True)
    state_tensors = ("W0_", "W_", "C_", "G_", "gram0_")

    def __init__(self, W0: torch.Tensor, alpha: float, beta: float, gram0: torch.Tensor | None = None, *,
                 dtype: torch.dtype = torch.float64, track_information: bool = False):
        self._init_common(W0, alpha, beta, dtype)
        d_k = self.W0_.shape[0]
        A, self.gram0_ = anchor_metric(d_k, self.alpha, self.beta, gram0, dtype=dtype, device=self.device)
        L = _cholesky(A, "the preservation metric A = alpha*I + beta*N*E[kk^T] is singular; "
                         "use alpha > 0 or more statistics tokens")
        C = torch.cholesky_solve(torch.eye(d_k, dtype=dtype, device=self.device), L)
        self.C_ = ((C + C.mT) / 2).contiguous()  # (d_k, d_k)
        self.G_ = A if track_information else None

    def _propose(self, K: torch.Tensor, V: torch.Tensor, sign: int) -> Step:
        """The step as factors: ``W + sign G Y`` (a new tensor) and the in-place terms
        ``C_ -= sign G G^T`` (and ``G_ += sign K^T K`` when tracked), ``O(d_k u)`` memory."""
        G, Y = woodbury_factors(self.C_, K, V - K @ self.W_, sign=sign)  # reads C_; changes nothing
        W = torch.addmm(self.W_, G, Y, alpha=sign)
        terms = (("C_", G, -sign),)
        if self.G_ is not None:
            terms += (("G_", K.mT, sign),)
        return Step(W, {}, sign * K.shape[0], terms)

    def propose(self, K: torch.Tensor, V: torch.Tensor) -> Step:
        K, V = self._check(K, V)
        return self._propose(K, V, +1)

    def propose_removal(self, K: torch.Tensor, V: torch.Tensor) -> Step:
        K, V = self._check(K, V)
        if K.shape[0] > self.n_rows_:
            raise ShapeError(f"cannot remove {K.shape[0]} rows: the state holds {self.n_rows_}")
        return self._propose(K, V, -1)

    def condition_number(self) -> float:
        """``cond(G_t) = cond(C_t)`` (one symmetric eigendecomposition, ``O(d_k^3)``)."""
        return spd_condition(self.C_)

    def drift(self) -> float:
        """``||C_t G_t - I||_F`` (needs ``track_information=True``)."""
        if self.G_ is None:
            raise RuntimeError("construct with track_information=True to measure drift")
        eye = torch.eye(self.C_.shape[0], dtype=self.dtype, device=self.device)
        return float(torch.linalg.norm(self.C_ @ self.G_ - eye))
