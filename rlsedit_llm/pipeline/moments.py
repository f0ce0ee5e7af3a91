"""The moment accumulator: a running sum of ``k kᵀ`` over tokens, with its token count.

Sums (not means) are what passes, checkpoints and ranks combine: two sums over disjoint tokens
merge by addition, and the mean ``E[k kᵀ]`` is taken once, at the end.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch

from rlsedit_llm.errors import CorpusError, HyperparameterError, ShapeError

__all__ = ["MomentSum"]


@dataclasses.dataclass
class MomentSum:
    """Sum of ``k kᵀ`` over ``count`` tokens.

    Attributes
    ----------
    total : Tensor (d_k, d_k), float64
        ``Σ_tokens k kᵀ`` (symmetric positive semi-definite up to rounding).
    count : int
        Number of tokens summed.
    """

    total: torch.Tensor
    count: int

    def __post_init__(self):
        if self.total.ndim != 2 or self.total.shape[0] != self.total.shape[1]:
            raise ShapeError(f"MomentSum.total must be square (d_k, d_k), got {tuple(self.total.shape)}")
        if int(self.count) < 0:
            raise HyperparameterError(f"MomentSum.count must be >= 0, got {self.count}")
        self.count = int(self.count)

    @classmethod
    def zeros(cls, d_k: int, *, device: torch.device | str | None = None,
              dtype: torch.dtype = torch.float64) -> MomentSum:
        """An empty sum (no token) of width ``d_k``."""
        return cls(torch.zeros(d_k, d_k, dtype=dtype, device=device), 0)

    @property
    def d_k(self) -> int:
        return self.total.shape[0]

    def merge(self, other: MomentSum) -> MomentSum:
        """The sum over the tokens of both (a new object on ``self``'s device and dtype)."""
        if other.d_k != self.d_k:
            raise ShapeError(f"cannot merge MomentSums of widths {self.d_k} and {other.d_k}")
        return MomentSum(self.total + other.total.to(self.total), self.count + other.count)

    def mean(self) -> torch.Tensor:
        """``E[k kᵀ] = total / count`` in float64 (``CorpusError`` when no token was summed)."""
        if self.count == 0:
            raise CorpusError("no token was summed: the second moment is undefined")
        return self.total.to(torch.float64) / self.count

    def to_tensors(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """``{prefix+"total": (d_k, d_k), prefix+"count": (1,) int64}`` on the CPU (for safetensors)."""
        return {
            prefix + "total": self.total.detach().to("cpu").contiguous(),
            prefix + "count": torch.tensor([self.count], dtype=torch.int64),
        }

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], prefix: str = "", *,
                     device: torch.device | str | None = None) -> MomentSum:
        """Inverse of :meth:`to_tensors`."""
        total = tensors[prefix + "total"]
        count = tensors[prefix + "count"]
        if count.numel() != 1:
            raise ShapeError(f"{prefix}count must hold one integer")
        return cls(total.to(device=device), int(count.reshape(()).item()))
