"""Torch twin of :mod:`rlsedit_theory.recursive` for one edited layer.

Same recursion, same row-key convention (``W (d_k, d_v)``, ``K (u, d_k)``), in float64 (default)
or float32 on the layer's own device, whatever the model's dtype. A test proves it equal to
:class:`rlsedit_theory.RecursiveLS` on the same ``K, V``.

The anchor is given by its Gram matrix only (``K0^T K0 = N E[k k^T]``) with ``V0 = K0 W0``
implicit, so ``W*_0 = W0`` and ``C_0 = (alpha I + beta K0^T K0)^{-1}``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from rlsedit_llm.errors import HyperparameterError, NonFiniteError, NotPositiveDefiniteError, ShapeError

__all__ = ["LayerRLS", "Pending"]


class Pending(NamedTuple):
    """A computed but not yet adopted step (see :meth:`LayerRLS.step`)."""

    C: torch.Tensor  # new state matrix (d_k, d_k)
    W: torch.Tensor  # new weights (d_k, d_v)
    K: torch.Tensor  # the batch's keys (u, d_k), in the state dtype and device
    sign: int  # +1 added, -1 removed

_STATE_DTYPES = (torch.float32, torch.float64)


def _cholesky(S: torch.Tensor, what: str) -> torch.Tensor:
    L, info = torch.linalg.cholesky_ex((S + S.mT) / 2)
    if int(info) != 0:
        raise NotPositiveDefiniteError(what)
    return L


class LayerRLS:
    """Recursive least-squares state of one edited layer.

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

    def __init__(
        self,
        W0: torch.Tensor,
        alpha: float,
        beta: float,
        gram0: torch.Tensor | None = None,
        *,
        dtype: torch.dtype = torch.float64,
        track_information: bool = False,
    ):
        if dtype not in _STATE_DTYPES:
            raise HyperparameterError(f"state dtype must be float32 or float64; got {dtype}")
        for name, value in (("alpha", alpha), ("beta", beta)):
            if not (isinstance(value, (int, float)) and value >= 0 and value == value
                    and value != float("inf")):
                raise HyperparameterError(f"{name} must be a finite number >= 0; got {value!r}")
        if W0.ndim != 2:
            raise ShapeError(f"W0 must be 2-D (d_k, d_v); got shape {tuple(W0.shape)}")
        d_k = W0.shape[0]
        device = W0.device
        self.alpha, self.beta, self.dtype = float(alpha), float(beta), dtype
        self.W0_ = W0.detach().to(dtype=dtype).clone()  # (d_k, d_v)
        A = alpha * torch.eye(d_k, dtype=dtype, device=device)  # (d_k, d_k)
        if gram0 is not None:
            if gram0.shape != (d_k, d_k):
                raise ShapeError(f"gram0 must have shape ({d_k}, {d_k}); got {tuple(gram0.shape)}")
            gram0 = gram0.detach().to(device=device, dtype=dtype)
            gram0 = (gram0 + gram0.mT) / 2
            A = A + beta * gram0
        if not torch.isfinite(A).all():
            raise NonFiniteError("the anchor Gram matrix contains NaN or infinity")
        L = _cholesky(A, "the preservation metric A = alpha*I + beta*N*E[kk^T] is singular; "
                         "use alpha > 0 or more statistics tokens")
        C = torch.cholesky_solve(torch.eye(d_k, dtype=dtype, device=device), L)
        self.C_ = ((C + C.mT) / 2).contiguous()  # row-major always: same BLAS path after a reload
        self.W_ = self.W0_.clone()
        self.G_ = A if track_information else None
        self.gram0_ = gram0  # the anchor Gram K0^T K0, so A (and G_t, J_t) stay recoverable
        self.n_updates_ = 0
        self.n_rows_ = 0

    # -- the recursion -------------------------------------------------------------------
    def _check(self, K: torch.Tensor, X: torch.Tensor, name: str):
        if K.ndim != 2 or K.shape[1] != self.C_.shape[0]:
            raise ShapeError(f"K must have shape (u, {self.C_.shape[0]}); got {tuple(K.shape)}")
        if X.ndim != 2 or X.shape != (K.shape[0], self.W_.shape[1]):
            raise ShapeError(f"{name} must have shape ({K.shape[0]}, {self.W_.shape[1]}); "
                             f"got {tuple(X.shape)}")
        K = K.detach().to(device=self.C_.device, dtype=self.dtype)
        X = X.detach().to(device=self.C_.device, dtype=self.dtype)
        if not (torch.isfinite(K).all() and torch.isfinite(X).all()):
            raise NonFiniteError(f"K or {name} contains NaN or infinity")
        return K, X

    def step(self, K: torch.Tensor, R: torch.Tensor, *, sign: int = 1) -> Pending:
        """Compute the state after adding (``sign=1``) or removing (``sign=-1``) a batch whose
        innovation at the current weights is ``R = V - K W_`` (u, d_v). Changes nothing: pass
        the result to :meth:`commit` to adopt it (so a caller can roll back by not committing).
        """
        K, R = self._check(K, R, "R")
        F = self.C_ @ K.mT  # (d_k, u)
        S = torch.eye(K.shape[0], dtype=self.dtype, device=K.device) + sign * (K @ F)  # (u, u)
        what = ("I + K C K^T is not SPD: the state is corrupted" if sign > 0 else
                "I - K C K^T is not positive definite: this batch was never added to the state")
        L = torch.cholesky_solve(F.mT, _cholesky(S, what)).mT  # gain F S^{-1}  (d_k, u)
        C_new = self.C_ - sign * (L @ F.mT)
        C_new = ((C_new + C_new.mT) / 2).contiguous()  # (the sum of X and X^T may come out column-major)
        return Pending(C_new, self.W_ + sign * (L @ R), K, sign)

    def commit(self, pending: Pending) -> None:
        """Adopt a step computed by :meth:`step` (plain assignments: cannot fail half-way)."""
        self.C_, self.W_ = pending.C, pending.W
        if self.G_ is not None:
            self.G_ = self.G_ + pending.sign * (pending.K.mT @ pending.K)
        self.n_updates_ += pending.sign
        self.n_rows_ += pending.sign * pending.K.shape[0]

    def update_innovation(self, K: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
        """Add a batch given its innovation ``R = V - K W_``; return the new ``W_``."""
        self.commit(self.step(K, R))
        return self.W_

    def update(self, K: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
        """Add the batch ``K (u, d_k)``, ``V (u, d_v)``; return the new ``W_``."""
        K, V = self._check(K, V, "V")
        return self.update_innovation(K, V - K @ self.W_)

    def downdate(self, K: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
        """Remove a batch added earlier with absolute values ``V``; return the new ``W_``."""
        K, V = self._check(K, V, "V")
        if K.shape[0] > self.n_rows_:
            raise ShapeError(f"cannot remove {K.shape[0]} rows: the state holds {self.n_rows_}")
        self.commit(self.step(K, V - K @ self.W_, sign=-1))
        return self.W_

    # -- diagnostics and persistence -----------------------------------------------------
    def drift(self) -> float:
        """``||C_t G_t - I||_F`` (needs ``track_information=True``)."""
        if self.G_ is None:
            raise RuntimeError("construct with track_information=True to measure drift")
        eye = torch.eye(self.C_.shape[0], dtype=self.dtype, device=self.C_.device)
        return float(torch.linalg.norm(self.C_ @ self.G_ - eye))

    def state_dict(self) -> dict:
        """Tensors and scalars that fully describe the state."""
        tensors = {"W0": self.W0_, "W": self.W_, "C": self.C_}
        if self.G_ is not None:
            tensors["G"] = self.G_
        if getattr(self, "gram0_", None) is not None:
            tensors["gram0"] = self.gram0_
        return {"tensors": tensors, "alpha": self.alpha, "beta": self.beta,
                "dtype": str(self.dtype).removeprefix("torch."),
                "n_updates": self.n_updates_, "n_rows": self.n_rows_}

    @classmethod
    def from_state_dict(cls, state: dict, device=None) -> "LayerRLS":
        """Rebuild a state saved by :meth:`state_dict` (on ``device`` if given)."""
        t = state["tensors"]
        new = object.__new__(cls)
        new.alpha, new.beta = float(state["alpha"]), float(state["beta"])
        new.dtype = getattr(torch, state["dtype"])
        move = dict(device=device, dtype=new.dtype)
        new.W0_, new.W_, new.C_ = (t[k].to(**move).clone() for k in ("W0", "W", "C"))
        new.G_ = t["G"].to(**move).clone() if "G" in t else None
        new.gram0_ = t["gram0"].to(**move).clone() if "gram0" in t else None
        new.n_updates_, new.n_rows_ = int(state["n_updates"]), int(state["n_rows"])
        return new

    def clone(self) -> "LayerRLS":
        """Deep copy."""
        return LayerRLS.from_state_dict(self.state_dict())

    def __repr__(self) -> str:
        return (f"LayerRLS(d_k={self.C_.shape[0]}, d_v={self.W_.shape[1]}, alpha={self.alpha:g}, "
                f"beta={self.beta:g}, dtype={self.dtype}, n_updates_={self.n_updates_})")
