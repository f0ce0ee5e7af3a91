"""AlphaEdit's layer rule: updates restricted to the null space of the anchor statistics.

``P`` projects onto the eigenvectors of ``E[k k^T]`` whose eigenvalue is at most ``threshold``
times the largest; with ``X_t = sum_{i<=t} K_i^T K_i`` (past and current keys),
``Delta = (P X_t + ridge I)^{-1} P K_t^T (V_t - K_t W_{t-1})``. ``alpha`` and ``beta`` do not
enter (the prior is the projection). NumPy reference:
:class:`rlsedit_theory.reference.NullSpaceProjection`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlsedit_llm.errors import HyperparameterError, ShapeError
from rlsedit_llm.kernel.method_config import MethodConfig
from rlsedit_llm.kernel.protocol import Capabilities, LayerSolver, Step, check_weights
from rlsedit_llm.presets import method_preset

__all__ = ["NullSpaceLayer", "AlphaEditConfig"]


@dataclass(frozen=True)
class AlphaEditConfig(MethodConfig):
    """AlphaEdit's settings.

    threshold : the kept (null-space) directions are the anchor Gram's eigenvectors whose eigenvalue
        is at most ``threshold`` times the largest (>= 0)
    ridge : the ridge of the projected normal equations (> 0)
    """

    method = "alphaedit"
    checks = {"threshold": "number", "ridge": "positive"}
    threshold: float = float(method_preset("alphaedit", "threshold"))
    ridge: float = float(method_preset("alphaedit", "ridge"))


class NullSpaceLayer(LayerSolver):
    """AlphaEdit with projector ``P_`` and cumulative key Gram ``X_``."""

    name = "alphaedit"
    capabilities = Capabilities()
    state_tensors = ("W0_", "W_", "P_", "X_")
    state_scalars = LayerSolver.state_scalars + ("ridge", "threshold")

    def __init__(self, W0: torch.Tensor, alpha: float, beta: float, gram0: torch.Tensor | None = None, *,
                 dtype: torch.dtype = torch.float64, track_information: bool = False,
                 threshold: float = AlphaEditConfig.threshold, ridge: float = AlphaEditConfig.ridge) -> None:
        self._init_common(W0, alpha, beta, dtype)
        self.threshold, self.ridge = check_weights("threshold", threshold), check_weights("ridge", ridge)
        if gram0 is None or self.ridge <= 0:
            raise HyperparameterError("alphaedit needs anchor statistics (gram0) and ridge > 0")
        d_k = self.W0_.shape[0]
        if gram0.shape != (d_k, d_k):
            raise ShapeError(f"gram0 must have shape ({d_k}, {d_k}); got {tuple(gram0.shape)}")
        evals, evecs = torch.linalg.eigh(gram0.detach().to(dtype=dtype, device=self.device))
        Q = evecs[:, evals <= self.threshold * evals.max().clamp(min=0)]  # (d_k, m)
        self.P_ = Q @ Q.mT  # projector onto the kept (small-eigenvalue) directions
        self.X_ = torch.zeros_like(self.P_)

    def propose(self, K: torch.Tensor, V: torch.Tensor) -> Step:
        K, V = self._check(K, V)
        X = self.X_ + K.mT @ K
        M = self.P_ @ X + self.ridge * torch.eye(X.shape[0], dtype=X.dtype, device=X.device)
        delta = torch.linalg.solve(M, self.P_ @ (K.mT @ (V - K @ self.W_)))
        return Step(self.W_ + delta, {"X_": X}, K.shape[0])
