"""Build or restore the editor of any registered method by name.

Layer-solver methods run inside :class:`~rlsedit_llm.Editor`; editor-level methods (``ft``)
are their own editor class with ``from_config`` and ``load``. Both speak the editor protocol:
``edit(facts) -> EditReport``, ``weights()``, ``save(dir)``, ``layers_``, ``n_batches_``.
"""

from __future__ import annotations

from dataclasses import replace

from rlsedit_llm.editing.editor import EditConfig, Editor
from rlsedit_llm.errors import HyperparameterError
from rlsedit_llm.kernel.registry import get_method, is_layer_method

__all__ = ["make_editor", "load_editor"]


def make_editor(method: str, model, tokenizer, config: EditConfig | None = None, **options):
    """A fresh editor of ``method`` on ``model``; ``config`` (its ``method`` is overridden) sets the
    layers, statistics and hyperparameters; ``options`` go to editor-level methods (e.g. FT's
    ``lr``, ``steps``)."""
    cls = get_method(method)
    config = replace(config or EditConfig(), method=method)
    if is_layer_method(method):
        if options:
            raise HyperparameterError(f"{method!r} takes its settings from EditConfig; unexpected {sorted(options)}")
        return Editor(model, tokenizer, config)
    return cls.from_config(model, tokenizer, config, **options)


def load_editor(method: str, model, tokenizer, directory):
    """Restore an editor of ``method`` saved in ``directory`` onto ``model``."""
    if not is_layer_method(method):
        return get_method(method).load(model, tokenizer, directory)
    editor = Editor.load(model, tokenizer, directory)
    if editor.config.method != method:
        raise HyperparameterError(f"the state in {directory} is of method {editor.config.method!r}, not {method!r}")
    return editor
