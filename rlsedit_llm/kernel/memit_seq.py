"""MEMIT-seq's layer rule: the cumulative normal equations re-solved densely every batch.

``G_t = A + sum_i K_i^T K_i`` is kept and factorised each batch (``O(d_k^3)``), and
``W_t = W_{t-1} + G_t^{-1} K_t^T (V_t - K_t W_{t-1})``: mathematically the same estimator as
RLSEdit with the same ``alpha, beta`` (the exact minimiser of ``J_t``), without the Woodbury
recursion. NumPy reference: :class:`rlsedit_theory.reference.DenseCumulative`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlsedit_llm.errors import NotPositiveDefiniteError
from rlsedit_llm.kernel.method_config import MethodConfig
from rlsedit_llm.kernel.protocol import Capabilities, LayerSolver, Step, spd_condition
from rlsedit_llm.kernel.rls import anchor_metric

__all__ = ["DenseCumulativeLayer", "MemitSeqConfig"]


class DenseCumulativeLayer(LayerSolver):
    """MEMIT-seq: ``G_`` is the information matrix, solved by Cholesky every batch."""

    name = "memit_seq"
    capabilities = Capabilities(cumulative_objective=True)
    state_tensors = ("W0_", "W_", "G_", "gram0_")

    def __init__(self, W0: torch.Tensor, alpha: float, beta: float, gram0: torch.Tensor | None = None, *,
                 dtype: torch.dtype = torch.float64, track_information: bool = False) -> None:
        self._init_common(W0, alpha, beta, dtype)
        self.G_, self.gram0_ = anchor_metric(self.W0_.shape[0], self.alpha, self.beta, gram0,
                                             dtype=dtype, device=self.device)

    def condition_number(self) -> float:
        """``cond(G_t)``."""
        return spd_condition(self.G_)

    def propose(self, K: torch.Tensor, V: torch.Tensor) -> Step:
        K, V = self._check(K, V)
        G = self.G_ + K.mT @ K  # (d_k, d_k)
        G = ((G + G.mT) / 2).contiguous()
        L, info = torch.linalg.cholesky_ex(G)
        if int(info) != 0:
            raise NotPositiveDefiniteError("G_t is not positive definite: use alpha > 0 or more statistics tokens")
        delta = torch.cholesky_solve(K.mT @ (V - K @ self.W_), L)  # (d_k, d_v)
        return Step(self.W_ + delta, {"G_": G}, K.shape[0])


@dataclass(frozen=True)
class MemitSeqConfig(MethodConfig):
    """memit_seq's settings: none of its own (``alpha``, ``beta``, the anchor: :class:`~rlsedit_llm.EditConfig`)."""

    method = "memit_seq"
