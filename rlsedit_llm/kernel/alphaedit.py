"""AlphaEdit's layer rule: updates restricted to the null space of the anchor statistics.

``P`` projects onto the eigenvectors of the anchor statistics with small eigenvalues; with
``X_t = sum_{i<=t} K_i^T K_i`` (past and current keys),
``Delta = (P X_t + ridge I)^{-1} P K_t^T (V_t - K_t W_{t-1})``. ``alpha`` and ``beta`` do not
enter (the prior is the projection). Which eigenvectors are kept is
:attr:`AlphaEditConfig.threshold_rule`: rlsedit's ``"relative"`` cut (the default) or AlphaEdit's
released ``"absolute"`` one (:meth:`AlphaEditConfig.released`). NumPy reference:
:class:`rlsedit_theory.reference.NullSpaceProjection`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, ClassVar

import torch

from rlsedit_llm.errors import HyperparameterError, ShapeError
from rlsedit_llm.kernel.method_config import MethodConfig
from rlsedit_llm.kernel.protocol import Capabilities, LayerSolver, Step, check_weights
from rlsedit_llm.presets import method_preset

__all__ = ["NullSpaceLayer", "AlphaEditConfig", "THRESHOLD_RULES", "null_space_projector", "default_mom2_weight"]

#: The rules that pick the kept (null-space) directions (:attr:`AlphaEditConfig.threshold_rule`).
THRESHOLD_RULES = ("relative", "absolute")


def default_mom2_weight(d_k: int) -> float:
    """``N`` for an edited layer of input width ``d_k`` when ``EditConfig.mom2_weight`` is None:
    the published 15000 scaled to the width, ``15000 d_k / 14336`` (the rule of
    :meth:`rlsedit_llm.EditConfig.resolved_mom2_weight`)."""
    return float(method_preset("rlsedit", "mom2_weight")) * d_k / int(method_preset("rlsedit", "d_k"))


@dataclass(frozen=True)
class AlphaEditConfig(MethodConfig):
    """AlphaEdit's settings.

    threshold : the cut that selects the kept (null-space) directions (>= 0), read by ``threshold_rule``
    ridge : the ridge of the projected normal equations (> 0)
    threshold_rule : ``"relative"`` (default; rlsedit's rule, kept for the runs and saved states made
        with it): the eigenvectors of the anchor Gram ``gram0 = N E[kk^T]`` whose eigenvalue is at
        most ``threshold`` times the largest. ``"absolute"`` (AlphaEdit's released rule): those of
        the per-token second moment ``E[kk^T] = gram0 / N`` whose eigenvalue is below ``threshold``.
    mom2_weight : the ``N`` the anchor Gram carries, which the absolute rule divides out. Leave it
        None: :class:`~rlsedit_llm.EditConfig` fills in its own ``mom2_weight``, and a solver given
        None uses EditConfig's default ``N = 15000 d_k / 14336`` (:func:`default_mom2_weight`).

    **The released setting** (:meth:`released`, the bench's ``alphaedit@released``): AlphaEdit's
    code (``experiments/evaluate.py``, ``get_project``) takes the singular vectors of the layer's
    covariance ``mom2 / count``, the uncentred per-token mean of ``k k^T`` over Wikipedia
    (``mom2_n_samples`` = 100,000 documents set how many tokens are averaged, not the scale;
    ``mom2_update_weight`` never touches it), and keeps those with singular value ``< 2e-2``;
    it solves ``(P (K K^T + cache_c) + L2 I) Delta = P K R^T`` with ``L2 = 10`` and the raw key
    Grams. Here the editor builds ``gram0 = N E[kk^T]`` from the same per-token mean (its own
    corpus sample), so the released cut is, exactly, ``eig(gram0) / N < 2e-2`` (``eig(gram0) <
    2e-2 N`` on the anchor Gram itself), and since ``X_t`` holds the same raw key Grams,
    ``L2 = 10`` is ``ridge = 10`` unchanged. On another model the absolute number is used as it is,
    against that model's own ``E[kk^T]``: the released configs apply 2e-2 and 10 verbatim to
    GPT-2 XL, GPT-J and Llama-3-8B alike. How many directions it keeps therefore depends on the
    model's key scale (the relative rule is the scale-free alternative).
    """

    method = "alphaedit"
    checks = {"threshold": "number", "ridge": "positive", "mom2_weight": "positive or None"}
    #: Named settings (``AlphaEditConfig.build(**presets[name])``; the bench's ``alphaedit@name``).
    presets: ClassVar[Mapping[str, Mapping[str, Any]]] = MappingProxyType({
        "released": MappingProxyType({"threshold": float(method_preset("alphaedit", "released_threshold")),
                                      "ridge": float(method_preset("alphaedit", "released_ridge")),
                                      "threshold_rule": "absolute"}),
    })
    threshold: float = float(method_preset("alphaedit", "threshold"))
    ridge: float = float(method_preset("alphaedit", "ridge"))
    threshold_rule: str = "relative"
    mom2_weight: float | None = None

    def validate(self) -> None:
        super().validate()
        if self.threshold_rule not in THRESHOLD_RULES:
            raise HyperparameterError(f"AlphaEditConfig.threshold_rule must be one of {THRESHOLD_RULES} "
                                      f"('absolute' is AlphaEdit's released rule); got {self.threshold_rule!r}")

    @classmethod
    def released(cls, **changes: Any) -> AlphaEditConfig:
        """AlphaEdit's released setting: the absolute cut 2e-2 on ``E[kk^T]`` and ridge 10
        (``changes`` over it, e.g. ``mom2_weight``)."""
        return cls.build(**{**cls.presets["released"], **changes})


def null_space_projector(gram0: torch.Tensor, threshold: float, rule: str = "relative",
                         mom2_weight: float | None = None) -> torch.Tensor:
    """The projector ``Q Q^T`` onto the kept eigenvectors ``Q`` of the symmetric anchor Gram
    ``gram0 = N E[kk^T]`` (in its dtype and device): with ``rule="relative"`` those whose eigenvalue
    is at most ``threshold`` times the largest; with ``"absolute"`` those whose eigenvalue divided
    by ``N`` (``mom2_weight``; None: :func:`default_mom2_weight`) is below ``threshold``."""
    if rule not in THRESHOLD_RULES:
        raise HyperparameterError(f"threshold_rule must be one of {THRESHOLD_RULES}; got {rule!r}")
    evals, evecs = torch.linalg.eigh(gram0)
    if rule == "relative":
        keep = evals <= threshold * evals.max().clamp(min=0)
    else:
        N = float(mom2_weight) if mom2_weight is not None else default_mom2_weight(gram0.shape[0])
        keep = evals / N < threshold
    Q = evecs[:, keep]  # (d_k, m)
    return Q @ Q.mT


class NullSpaceLayer(LayerSolver):
    """AlphaEdit with projector ``P_`` and cumulative key Gram ``X_``.

    The rule that chose ``P_`` is not a state scalar: the projector itself is saved, and the
    editor's saved config names the rule (so every state saved before the rule existed loads).
    """

    name = "alphaedit"
    capabilities = Capabilities()
    state_tensors = ("W0_", "W_", "P_", "X_")
    state_scalars = LayerSolver.state_scalars + ("ridge", "threshold")

    def __init__(self, W0: torch.Tensor, alpha: float, beta: float, gram0: torch.Tensor | None = None, *,
                 dtype: torch.dtype = torch.float64, track_information: bool = False,
                 threshold: float = AlphaEditConfig.threshold, ridge: float = AlphaEditConfig.ridge,
                 threshold_rule: str = AlphaEditConfig.threshold_rule,
                 mom2_weight: float | None = AlphaEditConfig.mom2_weight) -> None:
        self._init_common(W0, alpha, beta, dtype)
        self.threshold, self.ridge = check_weights("threshold", threshold), check_weights("ridge", ridge)
        if gram0 is None or self.ridge <= 0:
            raise HyperparameterError("alphaedit needs anchor statistics (gram0) and ridge > 0")
        if mom2_weight is not None and not check_weights("mom2_weight", mom2_weight) > 0:
            raise HyperparameterError(f"mom2_weight must be > 0 or None; got {mom2_weight!r}")
        d_k = self.W0_.shape[0]
        if gram0.shape != (d_k, d_k):
            raise ShapeError(f"gram0 must have shape ({d_k}, {d_k}); got {tuple(gram0.shape)}")
        gram = gram0.detach().to(dtype=dtype, device=self.device)
        self.P_ = null_space_projector(gram, self.threshold, threshold_rule, mom2_weight)  # kept directions
        self.X_ = torch.zeros_like(self.P_)

    def propose(self, K: torch.Tensor, V: torch.Tensor) -> Step:
        K, V = self._check(K, V)
        X = self.X_ + K.mT @ K
        M = self.P_ @ X + self.ridge * torch.eye(X.shape[0], dtype=X.dtype, device=X.device)
        delta = torch.linalg.solve(M, self.P_ @ (K.mT @ (V - K @ self.W_)))
        return Step(self.W_ + delta, {"X_": X}, K.shape[0])
