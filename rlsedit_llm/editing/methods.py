"""Build or restore the editor of any registered method by name.

Layer-solver methods run inside :class:`~rlsedit_llm.Editor`; editor-level methods (``ft``)
are their own editor class with ``from_config`` and ``load``. Both speak the editor protocol:
``edit(facts) -> EditReport``, ``weights()``, ``save(dir)``, ``layers_``, ``n_batches_``.
"""

from __future__ import annotations

from dataclasses import replace

from rlsedit_llm.adapters.spec import detect_spec
from rlsedit_llm.editing.editor import EditConfig, Editor
from rlsedit_llm.errors import HyperparameterError
from rlsedit_llm.kernel.registry import get_method, is_layer_method
from rlsedit_llm.pipeline.values import ValueConfig, default_value_config

__all__ = ["make_editor", "load_editor", "method_value_config"]


def method_value_config(method: str, spec, **changes) -> ValueConfig:
    """The value settings a layer-solver ``method`` uses by default on a model of ``spec``: the
    family's (:func:`default_value_config`) with the method's declared ``value_defaults`` on top,
    then ``changes`` (ValueConfig fields, e.g. ``steps=50``), validated."""
    if not is_layer_method(method):
        raise HyperparameterError(f"{method!r} optimises no values, so it has no value settings")
    unknown = sorted(set(changes) - set(ValueConfig.__dataclass_fields__))
    if unknown:
        raise HyperparameterError(f"ValueConfig has no field(s) {unknown}; fields: {sorted(ValueConfig.__dataclass_fields__)}")
    value = replace(default_value_config(spec), **getattr(get_method(method), "value_defaults", None) or {})
    value = replace(value, **changes)
    value.validate()
    return value


def make_editor(method: str, model, tokenizer, config: EditConfig | None = None, **options):
    """A fresh editor of ``method`` on ``model``; ``config`` (its ``method`` is overridden) sets the
    layers, statistics and hyperparameters; ``options`` go to editor-level methods (e.g. FT's
    ``lr``, ``steps``).

    A layer-solver class may declare ``value_defaults`` (ValueConfig fields its method is defined
    with, e.g. ENCORE's ``{"stop_when_top1": True}``): when ``config.value`` is None they are
    applied over the family's default value settings. An explicit ``config.value`` is used as is."""
    cls = get_method(method)
    config = replace(config or EditConfig(), method=method)
    if is_layer_method(method):
        if options:
            raise HyperparameterError(f"{method!r} takes its settings from EditConfig; unexpected {sorted(options)}")
        if getattr(cls, "value_defaults", None) and config.value is None:
            config = replace(config, value=method_value_config(method, detect_spec(model)))
        return Editor(model, tokenizer, config)
    if config.anchor_value_norms:  # an editor-level method optimises no value z* to rescale
        raise HyperparameterError(f"{method!r} computes no values, so value-norm anchoring does not apply to it; "
                                  "use EditConfig(anchor_value_norms=False)")
    return cls.from_config(model, tokenizer, config, **options)


def load_editor(method: str, model, tokenizer, directory):
    """Restore an editor of ``method`` saved in ``directory`` onto ``model``."""
    if not is_layer_method(method):
        return get_method(method).load(model, tokenizer, directory)
    editor = Editor.load(model, tokenizer, directory)
    if editor.config.method != method:
        raise HyperparameterError(f"the state in {directory} is of method {editor.config.method!r}, not {method!r}")
    return editor
