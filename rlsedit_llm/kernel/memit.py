"""MEMIT's layer rule: every batch is solved against the prior metric only.

``Delta = (A + K^T K)^{-1} K^T (V - K W)`` with the fixed ``A = alpha I + beta N E[kk^T]``: the
RLSEdit recursion with ``C`` reset to ``A^{-1}`` after every batch, so no memory of earlier
edits. NumPy reference: :class:`rlsedit_theory.reference.PerBatchReset`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlsedit_llm.kernel.method_config import MethodConfig
from rlsedit_llm.kernel.protocol import Capabilities, LayerSolver, Step
from rlsedit_llm.kernel.rls import _cholesky, anchor_metric, woodbury_update

__all__ = ["PerBatchLayer", "MemitConfig"]


class PerBatchLayer(LayerSolver):
    """Per-batch MEMIT write; ``C_ = A^{-1}`` is computed once and never updated."""

    name = "memit"
    capabilities = Capabilities()
    state_tensors = ("W0_", "W_", "C_", "gram0_")

    def __init__(self, W0: torch.Tensor, alpha: float, beta: float, gram0: torch.Tensor | None = None, *,
                 dtype: torch.dtype = torch.float64, track_information: bool = False) -> None:
        self._init_common(W0, alpha, beta, dtype)
        d_k = self.W0_.shape[0]
        A, self.gram0_ = anchor_metric(d_k, self.alpha, self.beta, gram0, dtype=dtype, device=self.device)
        L = _cholesky(A, "the prior metric A = alpha*I + beta*N*E[kk^T] is singular; use alpha > 0")
        C = torch.cholesky_solve(torch.eye(d_k, dtype=dtype, device=self.device), L)  # A^{-1}
        self.C_ = ((C + C.mT) / 2).contiguous()  # symmetric, row-major (bitwise the same after a reload)

    def propose(self, K: torch.Tensor, V: torch.Tensor) -> Step:
        K, V = self._check(K, V)
        _, W = woodbury_update(self.C_, self.W_, K, V)  # the updated C is dropped: no memory
        return Step(W, {}, K.shape[0])


@dataclass(frozen=True)
class MemitConfig(MethodConfig):
    """memit's settings: none of its own (``alpha``, ``beta``, the anchor: :class:`~rlsedit_llm.EditConfig`)."""

    method = "memit"
