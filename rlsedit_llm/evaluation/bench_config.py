"""The settings of one benchmark run: :class:`BenchConfig` (typed; the CLI parses the flags into it)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from types import MappingProxyType
from typing import Any

from rlsedit_llm.editing.config import EditConfig
from rlsedit_llm.editing.norm_anchors import NAS_REFERENCE_FACTS
from rlsedit_llm.errors import HyperparameterError
from rlsedit_llm.evaluation.protocol_config import FLUENCY_PROTOCOLS, LITERATURE_FLUENCY, ProtocolConfig
from rlsedit_llm.kernel.registry import config_class, is_layer_method, method_names

__all__ = ["BenchConfig", "scaled_defaults", "SHADOW_LEADER", "DEFAULT_METHOD_SETTINGS", "MethodVariant",
           "method_variant", "NAS_SUFFIX"]

#: The method whose keys and values a shadow writes (:class:`.runners.ShadowRunner`).
SHADOW_LEADER = "rlsedit"

#: The bench's settings of its FT baseline (Adam learning rate and steps per batch).
DEFAULT_METHOD_SETTINGS: Mapping[str, Mapping[str, Any]] = MappingProxyType(
    {"ft": MappingProxyType({"lr": 5e-4, "steps": 10})})


#: The suffix of a ``--methods`` entry that runs the method with NAS (``EditConfig(anchor_value_norms="nas")``).
NAS_SUFFIX = "+nas"


@dataclass(frozen=True)
class MethodVariant:
    """One ``--methods`` entry, ``METHOD[@PRESET][+nas]``: a registered method, optionally at a named
    preset of its own settings (its config class's ``presets``, e.g. ``alphaedit@released``:
    :meth:`~rlsedit_llm.kernel.alphaedit.AlphaEditConfig.released`) and with NAS value-norm
    anchoring (``+nas``, layer-solver methods only). The entry is the name of its results record
    and of its state folder; the record's ``extra`` says what ran (:meth:`record`)."""

    name: str
    method: str
    preset: str | None = None
    nas: bool = False

    @property
    def preset_settings(self) -> dict[str, Any]:
        """The method settings the preset sets (empty without one)."""
        if self.preset is None:
            return {}
        return dict(getattr(config_class(self.method), "presets", {})[self.preset])

    def record(self, nas_reference_facts: int) -> dict[str, Any]:
        """What a results record of this entry says beside its settings (empty for a plain method)."""
        if self.name == self.method:
            return {}
        out: dict[str, Any] = {"method": self.method}
        if self.preset is not None:
            out["preset"] = self.preset
        if self.nas:
            out.update(value_norm_anchor="nas", nas_reference_facts=nas_reference_facts)
        return out


def method_variant(name: str) -> MethodVariant:
    """The :class:`MethodVariant` of a ``--methods`` entry; a typed error names what is wrong."""
    if not isinstance(name, str) or not name:
        raise HyperparameterError(f"a method entry must be a non-empty str; got {name!r}")
    base, nas = (name[: -len(NAS_SUFFIX)], True) if name.endswith(NAS_SUFFIX) else (name, False)
    method, _, preset = base.partition("@")
    known = method_names()
    if method not in known:
        raise HyperparameterError(f"unknown method {method!r} in {name!r}; choose from {list(known)} (or 'all' on "
                                  f"the command line), optionally as METHOD@PRESET and/or METHOD{NAS_SUFFIX}")
    if "@" in base:
        presets = getattr(config_class(method), "presets", {})
        if preset not in presets:
            raise HyperparameterError(f"{name!r}: {method} has no preset {preset!r}; its presets: "
                                      f"{sorted(presets) or 'none'}")
    if nas and not is_layer_method(method):
        raise HyperparameterError(f"{name!r}: {method} computes no values, so NAS (value-norm anchoring) does not "
                                  "apply to it; NAS variants exist for the layer-solver methods")
    return MethodVariant(name, method, preset or None, nas)


def scaled_defaults(n_edits: int) -> dict[str, int]:
    """Defaults that follow the stream's length: key-statistics tokens (20k below 100 edits, else
    :class:`EditConfig`'s 100k), fluency cases (one per 20 edits, 5 to 50) and GLUE items per task
    (none below 100 edits, then one per 10 edits up to the 200 shipped)."""
    return {
        "stats_tokens": 20_000 if n_edits < 100 else EditConfig.stats_tokens,
        "fluency_cases": min(50, max(5, n_edits // 20)),
        "glue": 0 if n_edits < 100 else min(200, n_edits // 10),
    }


def _frozen_settings(settings: Any) -> Mapping[str, Mapping[str, Any]]:
    if not isinstance(settings, Mapping) or not all(isinstance(s, Mapping) for s in settings.values()):
        raise HyperparameterError("method_settings maps a method name to {setting: value}, e.g. "
                                  f"{{'ft': {{'lr': 5e-4}}}}; got {settings!r}")
    return MappingProxyType({str(m): MappingProxyType(dict(s)) for m, s in settings.items()})


def _names(field_name: str, value: Any, example: str) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise HyperparameterError(f"{field_name} takes a tuple of method names such as {example}; got {value!r} "
                                  "(the command line parses comma-separated names)")
    return tuple(value)


def _counts(field_name: str, value: Any, example: str) -> tuple[int, ...]:
    if isinstance(value, str) or not isinstance(value, (list, tuple)) or \
            not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise HyperparameterError(f"{field_name} takes a tuple of ints such as {example}; got {value!r} "
                                  "(the command line parses comma-separated numbers)")
    return tuple(value)


@dataclass(frozen=True)
class BenchConfig:
    """Settings of one benchmark run; one field per ``rlsedit bench`` flag except the per-method
    settings, which ``method_settings`` holds (``--ft-lr`` is ``{"ft": {"lr": ...}}``). The CLI
    parses the flags into it; these are the only defaults. Checked when built (typed errors).

    ``stats_tokens``, ``fluency_cases`` and ``glue`` left at None follow the run's size
    (:meth:`resolved`, printed at the start of a run): a 10-edit trial takes minutes, not the
    statistics pass and 50 fluency generations of a 1,000-edit run.

    ``methods`` entries may be variants, ``METHOD[@PRESET][+nas]`` (:func:`method_variant`):
    ``alphaedit@released`` (AlphaEdit's released threshold rule and ridge), ``rlsedit+nas``,
    ``memit+nas``, ``alphaedit+nas``, ``alphaedit@released+nas`` ... Each runs as its own method
    (its own record and state, on the same stream); ``method_settings`` may name a variant too,
    over its method's settings and its preset. ``nas_reference_facts`` is NAS's reference sample
    (:attr:`rlsedit_llm.EditConfig.nas_reference_facts`) for the ``+nas`` entries.

    ``stream`` picks the stream of records (:func:`.data.stream_order`: 0, the default, is the data
    set's file order, the stream of every run recorded before; ``s >= 1`` other records in another
    order). ``fluency_protocol`` left at None is the literature's ``rome`` for a new run and the
    recorded one when the run is resumed or extended (runs recorded before the choice existed used
    ``greedy-eos``). ``zsre_target``: ``alt`` (EasyEdit's) or ``answer`` (MEMIT's ``answers[0]``).
    """

    out: str
    # the model and the stream
    dataset: str = "counterfact"
    model: str = "smollm2"
    device: str | None = None
    edits: int = 100
    batch: int = 10
    stream: int = 0
    zsre_target: str = "alt"
    methods: tuple[str, ...] = ("rlsedit", "memit_seq")
    shadow: tuple[str, ...] = ()
    interleave: bool = False
    # scoring
    checkpoints: int = 5
    score_all_at: tuple[int, ...] = ()
    retention_fraction: float = 0.1
    fluency_cases: int | None = None
    fluency_tokens: int = 100
    fluency_protocol: str | None = None
    glue: int | None = None
    no_wild: bool = False
    # the edit: layers, objective, statistics, values; each method's own settings
    layers: tuple[int, ...] | None = None
    alpha: float = 0.0
    beta: float = 1.0
    mom2_weight: float | None = None
    stats_tokens: int | None = None
    cache_dir: str | None = None
    anchor_value_norms: bool = False
    value_steps: int | None = None
    nas_reference_facts: int = NAS_REFERENCE_FACTS
    method_settings: Mapping[str, Mapping[str, Any]] = field(default_factory=lambda: DEFAULT_METHOD_SETTINGS)
    # where the run is kept, and how it resumes
    state_dir: str | None = None
    keep_state: bool = False
    save_every: int = 1
    restart: bool = False
    report_only: bool = False
    extend_from: str | None = None
    time_budget: float | None = None
    quiet: bool = False

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # normalised copies of the sequence fields (the dataclass is frozen)
        set_(self, "methods", _names("methods", self.methods, "('rlsedit', 'memit_seq')"))
        set_(self, "shadow", _names("shadow", self.shadow, "('memit_seq',)"))
        set_(self, "score_all_at", _counts("score_all_at", self.score_all_at, "(300, 600)"))
        if self.layers is not None:
            set_(self, "layers", _counts("layers", self.layers, "(3, 4, 5)"))
        set_(self, "method_settings", _frozen_settings(self.method_settings))
        self.validate()

    def validate(self) -> None:
        """Raise :class:`HyperparameterError` naming the first setting to fix."""
        known = method_names()
        if not self.methods:
            raise HyperparameterError(f"no method to run; choose from {list(known)} (or 'all' on the command line)")
        variants = [method_variant(m) for m in self.methods]  # a typed error names a bad entry
        if len(set(self.methods)) != len(self.methods):
            raise HyperparameterError(f"a method is listed twice in {list(self.methods)}")
        self._validate_shadows()
        for name in self.method_settings:
            if name not in known and name not in self.methods:
                raise HyperparameterError(f"method_settings names an unknown method {name!r}; choose from "
                                          f"{list(known)} or the entries of methods")
            base = method_variant(name).method
            config_class(base).build(**self.method_settings[name])  # a typed error names the bad field
        for variant in variants:
            config_class(variant.method).build(**self.settings_of(variant.name))
        n_ref = self.nas_reference_facts
        if isinstance(n_ref, bool) or not isinstance(n_ref, int) or n_ref < 1:
            raise HyperparameterError(f"nas_reference_facts must be an int >= 1; got {n_ref!r}")
        vs = self.value_steps
        if vs is not None and (isinstance(vs, bool) or not isinstance(vs, int) or vs < 1):
            raise HyperparameterError(f"--value-steps must be an int >= 1; got {vs!r}")
        if isinstance(self.stream, bool) or not isinstance(self.stream, int) or self.stream < 0:
            raise HyperparameterError(f"--stream must be an int >= 0 (0: the data set's file order); "
                                      f"got {self.stream!r}")
        if self.fluency_protocol is not None and self.fluency_protocol not in FLUENCY_PROTOCOLS:
            raise HyperparameterError(f"--fluency-protocol must be one of {FLUENCY_PROTOCOLS} (rome: the literature's "
                                      f"top-5 sampling to a fixed length); got {self.fluency_protocol!r}")
        if self.zsre_target not in ("alt", "answer"):
            raise HyperparameterError(f"--zsre-target must be 'alt' (EasyEdit's) or 'answer' (MEMIT's answers[0]); "
                                      f"got {self.zsre_target!r}")
        if isinstance(self.save_every, bool) or not isinstance(self.save_every, int) or self.save_every < 1:
            raise HyperparameterError(f"--save-every must be an int >= 1; got {self.save_every!r}")
        if self.time_budget is not None:
            if not self.interleave:
                raise HyperparameterError("--time-budget needs --interleave (so that every method stops at the "
                                          "same edit)")
            if not (isinstance(self.time_budget, (int, float)) and math.isfinite(self.time_budget)
                    and self.time_budget > 0):
                raise HyperparameterError(f"--time-budget must be a number of seconds > 0; got {self.time_budget!r}")

    def _validate_shadows(self) -> None:
        if not self.shadow:
            return
        bad = [m for m in self.shadow if m not in self.methods or m == SHADOW_LEADER
               or not is_layer_method(method_variant(m).method) or method_variant(m).nas]
        if bad:
            raise HyperparameterError(f"--shadow names methods that must also be in --methods and be layer-solver "
                                      f"methods other than {SHADOW_LEADER!r}, without {NAS_SUFFIX} (a shadow writes "
                                      f"its leader's values); got {bad}")
        if SHADOW_LEADER not in self.methods:
            raise HyperparameterError(f"--shadow needs {SHADOW_LEADER!r} in --methods: shadows write its keys and "
                                      "values")
        if not self.interleave:
            raise HyperparameterError("--shadow needs --interleave (a shadow writes each batch right after its "
                                      "leader)")

    def resolved(self) -> BenchConfig:
        """This config with the size-dependent defaults filled in (see :func:`scaled_defaults`)."""
        scaled = scaled_defaults(int(self.edits))
        missing: dict[str, Any] = {k: v for k, v in scaled.items() if getattr(self, k) is None}
        return replace(self, **missing)

    def run_order(self) -> tuple[str, ...]:
        """The methods in the order they write each batch: every shadow after its leader."""
        return tuple(m for m in self.methods if m not in self.shadow) + self.shadow

    def protocol(self) -> ProtocolConfig:
        """The stream and its scoring (validated; call on a :meth:`resolved` config)."""
        if self.fluency_cases is None or self.glue is None:
            raise HyperparameterError("BenchConfig.protocol() needs the sizes resolved: call resolved() first")
        cfg = ProtocolConfig(dataset=self.dataset, n_edits=self.edits, batch_size=self.batch,
                             checkpoints=self.checkpoints, retention_fraction=self.retention_fraction,
                             fluency_cases=self.fluency_cases, fluency_tokens=self.fluency_tokens,
                             glue_items=self.glue, wild=not self.no_wild, full_checkpoints=self.score_all_at,
                             stream_seed=self.stream, zsre_target=self.zsre_target,
                             fluency_protocol=self.fluency_protocol or LITERATURE_FLUENCY)
        cfg.validate()
        return cfg

    def edit_config(self) -> EditConfig:
        """The hyperparameters shared by the layer-solver methods (validated)."""
        tokens: dict[str, Any] = {} if self.stats_tokens is None else {"stats_tokens": int(self.stats_tokens)}
        config = EditConfig(layers=self.layers, alpha=float(self.alpha), beta=float(self.beta),
                            mom2_weight=self.mom2_weight, cache_dir=self.cache_dir, replace=False,
                            anchor_value_norms=bool(self.anchor_value_norms),
                            report_accuracies=False,  # the protocol scores paraphrases and neighbours itself
                            **tokens)
        config.validate()
        return config

    def settings_of(self, method: str) -> dict[str, Any]:
        """The settings of the ``methods`` entry ``method`` (fields of its method's config; empty: its
        defaults): those given for its method, its preset's over them, then those given for the
        entry itself (a variant)."""
        variant = method_variant(method)
        settings = dict(self.method_settings.get(variant.method, {}))
        settings.update(variant.preset_settings)
        if method != variant.method:
            settings.update(self.method_settings.get(method, {}))
        return settings

    def variant(self, method: str) -> MethodVariant:
        """The :class:`MethodVariant` of the ``methods`` entry ``method``."""
        return method_variant(method)

    def edit_config_of(self, method: str, base: EditConfig | None = None) -> EditConfig:
        """The :class:`EditConfig` the entry ``method`` edits with: ``base`` (default
        :meth:`edit_config`), with NAS for a ``+nas`` entry (validated)."""
        config = base if base is not None else self.edit_config()
        if method_variant(method).nas:
            config = replace(config, anchor_value_norms="nas", nas_reference_facts=self.nas_reference_facts)
            config.validate()
        return config

    @classmethod
    def field_default(cls, name: str) -> Any:
        """The default of field ``name`` (for the CLI's help texts)."""
        return next(f.default for f in fields(cls) if f.name == name)
