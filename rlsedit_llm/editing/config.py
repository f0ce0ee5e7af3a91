"""The hyperparameters of an :class:`~rlsedit_llm.Editor` and the anchor Gram they define (the
value-norm anchoring they can ask for is measured in :mod:`rlsedit_llm.editing.norm_anchors`)."""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from rlsedit_llm.editing.norm_anchors import NAS_REFERENCE_FACTS
from rlsedit_llm.errors import HyperparameterError
from rlsedit_llm.kernel.method_config import MethodConfig
from rlsedit_llm.kernel.registry import config_class, get_method
from rlsedit_llm.kernel.rls import max_condition
from rlsedit_llm.pipeline.values import ValueConfig
from rlsedit_llm.presets import method_preset

if TYPE_CHECKING:

    pass

__all__ = ["EditConfig", "anchor_gram", "PUBLISHED_MOM2_WEIGHT", "PUBLISHED_D_K", "VALUE_NORM_RULES"]

log = logging.getLogger(__name__)

PUBLISHED_MOM2_WEIGHT = float(method_preset("rlsedit", "mom2_weight"))  # N of the published RLSEdit/AlphaEdit configs
PUBLISHED_D_K = int(method_preset("rlsedit", "d_k"))  # d_k of Llama-3-8B, the reference model of those configs

#: The value-norm anchoring rules (:attr:`EditConfig.anchor_value_norms`): NAS as released, and
#: rlsedit's earlier rule (``True`` is that one, as every run and save made with it recorded it).
VALUE_NORM_RULES = ("nas", "h0")


def anchor_gram(moment: torch.Tensor, mom2_weight: float, *, dtype: torch.dtype = torch.float64,
                device: torch.device | str | None = None) -> torch.Tensor:
    """The anchor Gram ``K0^T K0 = N E[k k^T]`` (d_k, d_k) of one layer from its second moment."""
    return mom2_weight * moment.to(device=device, dtype=dtype)


@dataclass(frozen=True)
class EditConfig:
    """Hyperparameters of an :class:`Editor` (all have published or sensible defaults).

    ``alpha`` weighs ``||W - W0||^2``; ``beta`` weighs the anchor ``||K0 (W - W0)||^2`` whose Gram
    is ``N * E[k k^T]`` (published RLSEdit: ``alpha = 0`` (lambda = 0), ``beta = 1`` (mu = 1),
    ``N = 15000`` for 7-8B models).

    ``mom2_weight`` is ``N``. ``None`` (the default) scales the published value to the edited
    layer's width, ``N = 15000 * d_k / 14336``: an in-distribution key's absorption
    ``k^T (N E[kk^T])^{-1} k ~ d_k / N`` then matches Llama-3-8B's (``d_k = 14336``) on any model.
    For SmolLM2 (``d_k = 1536``) that is ``N ~ 1607``; the unscaled 15000 there absorbs only
    about a tenth of each edit. Pass ``mom2_weight=15000`` for the published setting verbatim.

    ``method_config`` holds the settings of ``method`` alone (its registered config class, e.g.
    ``AlphaEditConfig(threshold=2e-2)``); None: that method's defaults.

    ``retry_weight`` (None: off; else a finite number > 1): within one :meth:`Editor.edit` call,
    the facts that did not take (target not the top-1 continuation after the write,
    ``FactReport.success``) are solved once more with their weight multiplied by this factor:
    the whole batch is re-proposed from the same pre-call state inside the same transaction, so
    the call still writes once, all or nothing, and the journal holds the rows actually written.
    The report marks those facts (``FactReport.retried``, ``FactReport.weight``).

    ``anchor_value_norms`` rescales each solved value before it is written (every layer-solver
    method; methods that solve no values refuse it):

    * ``"nas"``: Norm-Anchor Scaling (Liu et al., arXiv 2602.02543) as its released code does it
      (:func:`~rlsedit_llm.pipeline.values.anchor_norms`, :func:`anchored_values`): the MLP
      branch's value ``v* = z* - h0 + v0`` at the last edited layer (``v0`` what the branch adds
      there before the edit) is rescaled to ``rho``, the upper-trimmed mean (smallest 95 %) of
      ``||v*||`` over ``nas_reference_facts`` CounterFact rewrites solved on the unedited model
      (bare prompts, this editor's value settings; once per model, cached beside the key
      statistics), and a fact with ``||v*|| > 2 rho`` is dropped (``z* = h0``). After the value
      optimisation and its clamp, before the per-layer spreading.
    * ``"h0"`` (or ``True``): rlsedit's earlier rule, each ``z*`` rescaled to the norm of the
      unedited hidden state ``h0`` at that position (kept: it is what the runs and saved states
      made with ``True`` used).
    """

    layers: tuple[int, ...] | None = None  # None: the family's default block
    method: str = "rlsedit"  # a registered layer-solver method: memit, memit_seq, alphaedit, ...
    alpha: float = float(method_preset("rlsedit", "alpha"))
    beta: float = float(method_preset("rlsedit", "beta"))
    mom2_weight: float | None = None  # N; None: 15000 * d_k / 14336 (see above)
    corpus: str = "enwiki_sample"
    stats_tokens: int = 100_000
    stats_max_length: int = 512
    state_dtype: str = "float64"  # the recursion's state: float64 or float32
    template_seed: int = 0
    n_templates: int = 5
    template_length: int = 10
    value: ValueConfig | None = None  # None: the family's default
    replace: bool = True  # a new fact for an (subject, relation) retracts the earlier one
    track_information: bool = False  # carry G_t too (for drift certificates)
    # Value-norm anchoring (see the class docstring): False (off), "nas" (NAS, arXiv 2602.02543, as
    # released) or "h0" (rlsedit's earlier rule; True means it too).
    anchor_value_norms: bool | str = False
    nas_reference_facts: int = NAS_REFERENCE_FACTS  # NAS's reference sample (used by "nas" only)
    cache_dir: str | None = None  # statistics cache; None: the user cache directory
    # A folder of MEMIT/ROME .npz layer statistics bound to this model (pipeline.stats_npz):
    # used instead of computing E[kk^T] (corpus and stats_tokens then do not apply).
    precomputed_stats: str | None = None
    method_config: MethodConfig | None = None  # the method's own settings; None: its defaults
    retry_weight: float | None = None  # re-solve the facts that did not take with weight x this, once (see above)
    # Score the paraphrase, neighbourhood and portability prompts a fact carries in its edit report
    # (EasyEdit's rephrase / locality / portability accuracies). The benchmark turns it off: it
    # scores those prompts itself, and CounterFact's 12 prompts per fact would count as editing time.
    report_accuracies: bool = True

    def validate(self) -> None:
        for name in ("alpha", "beta", "mom2_weight"):
            value = getattr(self, name)
            if name == "mom2_weight" and value is None:
                continue
            if (isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0
                    or value == float("inf")):
                raise HyperparameterError(f"{name} must be a finite number >= 0; got {value!r}")
        for name in ("stats_tokens", "stats_max_length", "template_seed", "n_templates", "template_length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise HyperparameterError(f"{name} must be an int; got {value!r} ({type(value).__name__})")
        for name in ("replace", "track_information", "report_accuracies"):
            if not isinstance(getattr(self, name), bool):
                raise HyperparameterError(f"{name} must be True or False; got {getattr(self, name)!r}")
        if not (isinstance(self.anchor_value_norms, bool) or self.anchor_value_norms in VALUE_NORM_RULES):
            raise HyperparameterError(f"anchor_value_norms must be False, 'nas' (Norm-Anchor Scaling), 'h0' or True "
                                      f"(the h0 rule); got {self.anchor_value_norms!r}")
        n_ref = self.nas_reference_facts
        if isinstance(n_ref, bool) or not isinstance(n_ref, int) or n_ref < 1:
            raise HyperparameterError(f"nas_reference_facts must be an int >= 1 (NAS's reference sample; released: "
                                      f"{NAS_REFERENCE_FACTS}); got {n_ref!r}")
        if not isinstance(self.method, str):
            raise HyperparameterError(f"method must be a method name (str); got {self.method!r}")
        if not isinstance(self.corpus, (str, os.PathLike)):
            raise HyperparameterError(f"corpus must be a corpus name or path; got {self.corpus!r}")
        if self.value is not None and not isinstance(self.value, ValueConfig):
            raise HyperparameterError(f"value must be a ValueConfig or None; got {type(self.value).__name__}")
        if self.value is not None:
            self.value.validate()  # a bad value setting is refused with the editor, not at the first edit
        if self.layers is not None and (not isinstance(self.layers, (tuple, list)) or not all(
                isinstance(l, int) and not isinstance(l, bool) for l in self.layers)):
            raise HyperparameterError(f"layers must be a tuple of layer indices (ints) or None; got {self.layers!r}")
        if self.precomputed_stats is not None and not isinstance(self.precomputed_stats, (str, os.PathLike)):
            raise HyperparameterError(
                f"precomputed_stats must be a folder path or None; got {self.precomputed_stats!r}"
            )
        if self.cache_dir is not None:
            if not isinstance(self.cache_dir, (str, os.PathLike)):
                raise HyperparameterError(f"cache_dir must be a folder path or None; got {self.cache_dir!r}")
            if os.path.exists(self.cache_dir) and not os.path.isdir(self.cache_dir):
                raise HyperparameterError(f"cache_dir {os.fspath(self.cache_dir)!r} is a file, not a folder; "
                                          f"point it at a folder (it is created if missing)")
        if self.retry_weight is not None and (
                isinstance(self.retry_weight, bool) or not isinstance(self.retry_weight, (int, float))
                or not 1 < self.retry_weight < float("inf")):
            raise HyperparameterError(f"retry_weight must be None (no retry) or a finite number > 1 (the factor "
                                      f"applied to the weight of a fact that did not take); got {self.retry_weight!r}")
        if self.alpha == 0 and (self.beta == 0 or self.mom2_weight == 0):
            raise HyperparameterError(
                "alpha = 0 and a zero anchor weight leave the preservation metric singular; "
                "set alpha > 0 or beta > 0 and mom2_weight > 0"
            )
        get_method(self.method)  # a typed error naming the choices for an unknown method
        self._check_method_config()
        if self.state_dtype not in ("float32", "float64"):
            raise HyperparameterError(f"state_dtype must be 'float32' or 'float64'; got {self.state_dtype!r}")
        if self.alpha == 0:
            self._check_anchor_weight()
        if self.stats_tokens < 1 or self.n_templates < 0 or self.template_length < 1:
            raise HyperparameterError("stats_tokens and template_length must be >= 1, n_templates >= 0")
        if self.layers is not None and len(self.layers) == 0:
            raise HyperparameterError("layers must name at least one layer (or be None)")

    def _check_method_config(self) -> None:
        if self.method_config is None:
            return
        expected = config_class(self.method)
        if type(self.method_config) is not expected:
            raise HyperparameterError(f"method_config must be a {expected.__name__} for method {self.method!r} "
                                      f"(or None); got {type(self.method_config).__name__}")
        self.method_config.validate()
        own = getattr(self.method_config, "mom2_weight", None)  # AlphaEdit's copy of N (absolute threshold)
        if own is not None and own != self.mom2_weight:
            raise HyperparameterError(
                f"{type(self.method_config).__name__}.mom2_weight = {own!r} differs from EditConfig.mom2_weight = "
                f"{self.mom2_weight!r}, which scales the anchor Gram: set mom2_weight on EditConfig and leave the "
                "method's None (EditConfig fills it in)")

    @property
    def value_norm_rule(self) -> str | None:
        """The value-norm anchoring rule in force: ``"nas"``, ``"h0"`` or None (off)."""
        if self.anchor_value_norms is True:
            return "h0"
        return self.anchor_value_norms or None

    def resolved_method_config(self) -> MethodConfig:
        """``method_config``, or the method's defaults when it is None; a method setting that
        mirrors ``mom2_weight`` (AlphaEdit's, for its absolute threshold) gets this config's."""
        config = self.method_config if self.method_config is not None else config_class(self.method)()
        if "mom2_weight" in config.field_names() and getattr(config, "mom2_weight", None) is None \
                and self.mom2_weight is not None:
            config = config.replace(mom2_weight=float(self.mom2_weight))
        return config

    def _check_anchor_weight(self) -> None:
        """With ``alpha = 0`` the anchor alone regularises: an in-distribution key's absorption
        ``k^T (beta N E[kk^T])^{-1} k`` averages ``d_k / (beta N) >= 1 / (beta N)``, the factor by
        which its edit shrinks the state's inverse. Above what the state dtype can carry
        (:func:`~rlsedit_llm.kernel.rls.max_condition`, ``1 / (1000 eps)``) the first edit leaves
        the state numerically singular, whatever the model: refuse ``beta N`` below ``1000 eps``.
        (``N = None`` resolves to ``15000 d_k / 14336 >= 15000 / 14336``.)"""
        n = self.mom2_weight if self.mom2_weight is not None else PUBLISHED_MOM2_WEIGHT / PUBLISHED_D_K
        weight = self.beta * n
        floor = 1.0 / max_condition(getattr(torch, self.state_dtype))
        if weight < floor:
            raise HyperparameterError(
                f"alpha = 0 with beta * mom2_weight = {weight:.3g}: the anchor is negligible next to any edit, and a "
                f"{self.state_dtype} state would be numerically singular after the first one (it needs "
                f"beta * mom2_weight >= {floor:.2g}); raise mom2_weight or beta, or set alpha > 0")

    def resolved_mom2_weight(self, d_k: int) -> float:
        """``N`` for an edited layer of input width ``d_k``."""
        if self.mom2_weight is not None:
            return float(self.mom2_weight)
        return PUBLISHED_MOM2_WEIGHT * d_k / PUBLISHED_D_K

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["layers"] = list(self.layers) if self.layers is not None else None
        d["method_config"] = self.method_config.to_dict() if self.method_config is not None else None
        return d

    @classmethod
    def for_stream(cls, model: torch.nn.Module, expected_edits: int, tokenizer=None, **options) -> EditConfig:
        """The configuration for a stream of about ``expected_edits`` edits on ``model``, chosen by
        :func:`~rlsedit_llm.editing.planner.plan_stream` from a forecast of plasticity (computed
        before any edit from a sample of keys): the layer window; ``alpha`` and ``N`` stay at the
        defaults. Up to 0.7 edits per key dimension it is the default configuration. ``options``:
        ``plan_stream``'s keyword arguments (``facts``, ``batch``, ``config``, ``max_layers``, ...).
        The rule and its derivation: the docs page "Capacity and stream length"."""
        from rlsedit_llm.editing.planner import plan_stream  # the planner imports this module

        return plan_stream(model, expected_edits, tokenizer=tokenizer, **options).config

    @classmethod
    def from_dict(cls, d: dict) -> EditConfig:
        d = dict(d)
        if d.get("layers") is not None:
            d["layers"] = tuple(d["layers"])
        if d.get("value") is not None:
            d["value"] = ValueConfig(**d["value"])
        if d.get("method_config") is not None:  # a state saved without it gets None: the defaults
            d["method_config"] = config_class(d.get("method", cls.method)).from_dict(d["method_config"])
        return cls(**d)
