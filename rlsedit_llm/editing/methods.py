"""Build or restore the editor of any registered method by name.

Layer-solver methods run inside :class:`~rlsedit_llm.Editor`; editor-level methods (``ft``,
``ultraedit``) are their own editor class with ``from_config`` and ``load``. Each method's own
settings are a field of its config class, reachable here by name (:func:`make_editor`'s
``settings``, :func:`parse_settings` for ``FIELD=VALUE`` texts, :func:`edit_config_from_mapping`
for a config file). Both speak the editor protocol:
``edit(facts) -> EditReport``, ``weights()``, ``save(dir)``, ``layers_``, ``n_batches_``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from rlsedit_llm.adapters.spec import detect_spec
from rlsedit_llm.editing.config import EditConfig
from rlsedit_llm.editing.editor import Editor
from rlsedit_llm.errors import HyperparameterError
from rlsedit_llm.kernel.registry import config_class, get_method, is_layer_method
from rlsedit_llm.pipeline.values import ValueConfig, default_value_config

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

    from rlsedit_llm.adapters.spec import ModelSpec

__all__ = ["make_editor", "load_editor", "method_value_config", "with_method_settings", "parse_settings",
           "edit_config_from_mapping"]


def method_value_config(method: str, spec: ModelSpec, **changes: Any) -> ValueConfig:
    """The value settings a layer-solver ``method`` uses by default on a model of ``spec``: the
    family's (:func:`default_value_config`) with the method's declared ``value_defaults`` on top,
    then ``changes`` (ValueConfig fields, e.g. ``steps=50``), validated."""
    if not is_layer_method(method):
        raise HyperparameterError(f"{method!r} optimises no values, so it has no value settings")
    unknown = sorted(set(changes) - set(ValueConfig.__dataclass_fields__))
    if unknown:
        raise HyperparameterError(
            f"ValueConfig has no field(s) {unknown}; fields: {sorted(ValueConfig.__dataclass_fields__)}"
        )
    value = replace(default_value_config(spec), **getattr(get_method(method), "value_defaults", None) or {})
    value = replace(value, **changes)
    value.validate()
    return value


def make_editor(method: str, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase,
                config: EditConfig | None = None, *, new_stream: bool = False, **settings: Any) -> Any:
    """A fresh editor of ``method`` on ``model``; ``config`` (its ``method`` is overridden) sets the
    layers, statistics and shared hyperparameters; ``settings`` are fields of the method's config
    class (:func:`~rlsedit_llm.kernel.registry.config_class`), put over ``config.method_config``,
    e.g. ``make_editor("alphaedit", m, t, threshold=2e-2)`` or ``make_editor("ft", m, t, lr=1e-3)``.
    An unknown setting is refused with a :class:`HyperparameterError` listing the valid ones.

    A layer-solver class may declare ``value_defaults`` (ValueConfig fields its method is defined
    with, e.g. ENCORE's ``{"stop_when_top1": True}``): when ``config.value`` is None they are
    applied over the family's default value settings. An explicit ``config.value`` is used as is.
    ``new_stream``: as in :class:`~rlsedit_llm.Editor` (start a new stream on weights that carry
    the edits of a stream whose state is not loaded); editor-level methods keep no stream mark."""
    cls: Any = get_method(method)
    config = with_method_settings(replace(config or EditConfig(), method=method), settings)
    if is_layer_method(method):
        if getattr(cls, "value_defaults", None) and config.value is None:
            config = replace(config, value=method_value_config(method, detect_spec(model)))
        return Editor(model, tokenizer, config, new_stream=new_stream)
    if config.anchor_value_norms:  # an editor-level method optimises no value z* to rescale (NAS or h0 rule)
        raise HyperparameterError(f"{method!r} computes no values, so value-norm anchoring (anchor_value_norms="
                                  f"{config.anchor_value_norms!r}) does not apply to it; use "
                                  "EditConfig(anchor_value_norms=False), or a layer-solver method (rlsedit, memit, "
                                  "memit_seq, alphaedit, encore), which all solve values")
    config.validate()
    return cls.from_config(model, tokenizer, config)


def with_method_settings(config: EditConfig, settings: Mapping[str, Any]) -> EditConfig:
    """``config`` with ``settings`` (fields of its method's config class) put over its
    ``method_config`` (or the method's defaults); unknown names refused, the result validated."""
    config_cls = config_class(config.method)
    current = config.method_config
    if current is not None and type(current) is not config_cls:
        raise HyperparameterError(f"method_config must be a {config_cls.__name__} for method {config.method!r} "
                                  f"(or None); got {type(current).__name__}")
    if settings:
        config = replace(config, method_config=(current or config_cls()).replace(**settings))
    return config


def parse_settings(method: str, items: Iterable[str]) -> dict[str, Any]:
    """``FIELD=VALUE`` texts (the command line's ``--set``) as settings of ``method``'s config
    class, each value read as its field's type: ``parse_settings("alphaedit", ["threshold=0.02"])
    == {"threshold": 0.02}``. A later item overrides an earlier one; a malformed item, an
    unknown field or a value of the wrong type is refused with a :class:`HyperparameterError`."""
    config_cls = config_class(method)
    settings: dict[str, Any] = {}
    for item in items:
        name, sep, text = item.partition("=")
        name = name.strip()
        if not sep or not name:
            raise HyperparameterError(f"a setting must read FIELD=VALUE; got {item!r} (fields of {method}: "
                                      f"{', '.join(config_cls.field_names()) or 'none'})")
        settings[name] = config_cls.parse(name, text)
    config_cls.build(**settings)  # each value in its range, before anything runs
    return settings


def edit_config_from_mapping(data: Mapping[str, Any], *, method: str | None = None,
                             settings: Mapping[str, Any] | None = None, **fields: Any) -> EditConfig:
    """The :class:`EditConfig` of a config file's object (:meth:`EditConfig.to_dict`'s form: its
    fields, ``method_config`` an object of the method's settings), with ``fields``, ``method``
    and ``settings`` (method settings, over the file's) put over it; validated. Unknown field
    names are refused with a :class:`HyperparameterError` listing the valid ones."""
    if not isinstance(data, Mapping):
        raise HyperparameterError(f"a config must be an object of EditConfig fields; got {type(data).__name__}")
    known = [f.name for f in dataclasses.fields(EditConfig)]
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise HyperparameterError(f"EditConfig has no field(s) {unknown}; fields: {', '.join(known)}")
    merged = {**data, **fields}
    if method is not None:
        merged["method"] = method
    name = merged.get("method", EditConfig.method)
    file_settings = merged.pop("method_config", None) or {}
    if not isinstance(file_settings, Mapping):
        raise HyperparameterError(f"method_config must be an object of {name}'s settings; got {file_settings!r}"[:300])
    combined = {**file_settings, **(settings or {})}
    merged["method_config"] = config_class(name).build(**combined) if combined else None
    if merged.get("value") is not None and not isinstance(merged["value"], ValueConfig):
        merged["value"] = _value_config(merged["value"])
    if merged.get("layers") is not None:
        merged["layers"] = tuple(merged["layers"])
    config = EditConfig(**merged)
    config.validate()
    return config


def _value_config(data: Any) -> ValueConfig:
    known = [f.name for f in dataclasses.fields(ValueConfig)]
    if not isinstance(data, Mapping) or set(data) - set(known):
        raise HyperparameterError(
            f"value must be an object of ValueConfig fields ({', '.join(known)}); got {data!r}"[:300])
    return ValueConfig(**data)


def load_editor(method: str, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase,
                directory: str | os.PathLike[str]) -> Any:
    """Restore an editor of ``method`` saved in ``directory`` onto ``model``."""
    if not is_layer_method(method):
        method_cls: Any = get_method(method)
        return method_cls.load(model, tokenizer, directory)
    editor = Editor.load(model, tokenizer, directory)
    if editor.config.method != method:
        raise HyperparameterError(f"the state in {directory} is of method {editor.config.method!r}, not {method!r}")
    return editor
