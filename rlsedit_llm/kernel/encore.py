"""ENCORE's layer rule: MEMIT-seq with a norm constraint on the update (Gupta et al., 2025).

ENCORE ("Early stopping and Norm-Constrained Robust knowledge Editing") changes two things of the
MEMIT lineage: the value optimisation stops a fact as soon as its target is the most probable
token in all its contexts (``ValueConfig(stop_when_top1=True)``, see
:mod:`rlsedit_llm.pipeline.values`), and the write adds ``lambda ||Delta||^2`` to the per-batch
objective, with the past edits' keys kept in the preservation term (the released configurations
all accumulate them). Per batch

    Delta_t = (lambda I + beta N E[kk^T] + sum_{p<t} K_p^T K_p + K_t^T K_t)^{-1} K_t^T (V_t - K_t W_{t-1}),

solved densely like the authors' code. Because the metric carries every earlier batch, the
per-batch penalty telescopes into ``lambda ||W - W0||^2`` in the cumulative objective: ENCORE's
weights are the exact minimiser of ``J_t`` with ``alpha + lambda`` in place of ``alpha`` (the same
estimator as ``memit_seq`` and ``rlsedit`` with that ``alpha``; docs/theory/relation.md#encore).
NumPy reference: :class:`rlsedit_theory.reference.DenseCumulative` with ``alpha + lambda``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlsedit_llm.kernel.memit_seq import DenseCumulativeLayer
from rlsedit_llm.kernel.method_config import MethodConfig
from rlsedit_llm.kernel.protocol import Capabilities, LayerSolver, check_weights
from rlsedit_llm.kernel.rls import anchor_metric
from rlsedit_llm.presets import method_preset

__all__ = ["EncoreLayer", "EncoreConfig", "ENCORE_NORM_WEIGHT"]

#: The norm-constraint weight ``lambda`` of the released Llama-3-8B configuration (``update_norm_lambda``;
#: 10 for GPT-2 XL and Llama-2-7B). In the units of the key Gram, like ``alpha``.
ENCORE_NORM_WEIGHT = float(method_preset("encore", "norm_weight"))


@dataclass(frozen=True)
class EncoreConfig(MethodConfig):
    """ENCORE's settings.

    norm_weight : ``lambda`` of the norm constraint ``lambda ||Delta||^2`` (>= 0), in the units of
        the key Gram like ``alpha``; the metric's identity weight is ``alpha + norm_weight``
    """

    method = "encore"
    checks = {"norm_weight": "number"}
    norm_weight: float = ENCORE_NORM_WEIGHT


class EncoreLayer(DenseCumulativeLayer):
    """ENCORE: the cumulative normal equations with the extra ridge ``norm_weight * I``.

    ``alpha`` and ``beta`` come from the editor's config like every solver's; the metric is
    ``A = (alpha + norm_weight) I + beta gram0``, so with the config's default ``alpha = 0`` the
    ridge is ENCORE's own ``norm_weight``. The ``alpha`` attribute is the config's (the saved state
    is cross-checked against the config); the objective ``J_t`` it minimises has the identity weight
    ``alpha + norm_weight``.

    Through an :class:`~rlsedit_llm.Editor` the norm weight is ``EditConfig.method_config``'s
    (:class:`EncoreConfig`; :data:`ENCORE_NORM_WEIGHT` by default).
    """

    name = "encore"
    capabilities = Capabilities(cumulative_objective=True)
    state_scalars = LayerSolver.state_scalars + ("norm_weight",)
    #: The value settings ENCORE is defined with (applied by ``make_editor`` when the config leaves
    #: ``value`` unset): most-probable early stopping.
    value_defaults = {"stop_when_top1": True}

    def __init__(self, W0: torch.Tensor, alpha: float, beta: float, gram0: torch.Tensor | None = None, *,
                 dtype: torch.dtype = torch.float64, track_information: bool = False,
                 norm_weight: float = EncoreConfig.norm_weight) -> None:
        self.norm_weight = check_weights("norm_weight", norm_weight)
        self._init_common(W0, alpha, beta, dtype)
        self.G_, self.gram0_ = anchor_metric(self.W0_.shape[0], self.alpha + self.norm_weight, self.beta, gram0,
                                             dtype=dtype, device=self.device)

    @property
    def identity_weight(self) -> float:
        """``alpha + norm_weight``: the per-batch norm penalty telescopes into ``||W - W0||^2``."""
        return self.alpha + self.norm_weight
