"""The one-call lifelong API: :func:`edit` keeps one :class:`~rlsedit_llm.Editor` with the model,
so that every call continues the same stream; :func:`save_model_state` / :func:`load_model_state`
persist it."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from rlsedit_llm.editing.config import EditConfig
from rlsedit_llm.editing.editor import Editor
from rlsedit_llm.editing.guard import guard_of
from rlsedit_llm.editing.reports import EditReport
from rlsedit_llm.errors import HyperparameterError, RLSEditError
from rlsedit_llm.interrupts import deferred_interrupts

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

    from rlsedit_llm.pipeline.facts import Fact

__all__ = ["edit", "editor_of", "save_model_state", "load_model_state"]

_ATTR = "_rlsedit_editor"  # where rlsedit_llm.edit keeps the lifelong editor on the model


def edit(model: torch.nn.Module, facts: Iterable[Fact | Mapping[str, Any]], *,
         tokenizer: PreTrainedTokenizerBase | None = None, config: EditConfig | None = None) -> EditReport:
    """Edit ``model`` with ``facts``, continuing the model's lifelong RLSEdit stream.

    The first call creates an :class:`Editor` (statistics, per-layer state) and keeps it with the
    model; later calls continue the same recursion. ``tokenizer`` is needed on the first call.
    """
    # one get-or-create at a time; Ctrl-C deferred to the call's safe points, so that an edit that
    # completed is always attached to the model
    with deferred_interrupts(), guard_of(model).lock:
        return _edit(model, facts, tokenizer, config)


def _edit(model, facts, tokenizer, config) -> EditReport:
    editor = getattr(model, _ATTR, None)
    if editor is None:
        if tokenizer is None:
            raise HyperparameterError("the first rlsedit_llm.edit call on a model needs tokenizer=")
        editor = Editor(model, tokenizer, config)
        report = editor.edit(facts)
        object.__setattr__(model, _ATTR, editor)  # only once the first edit succeeded
        return report
    elif config is not None and config != editor.config:
        raise HyperparameterError(
            "this model already has a lifelong editor with a different config; "
            "use rlsedit_llm.Editor for a separate stream"
        )
    if tokenizer is not None and tokenizer is not editor.tokenizer:
        previous, editor.tokenizer = editor.tokenizer, tokenizer
        try:
            return editor.edit(facts)
        except BaseException:
            editor.tokenizer = previous
            raise
    return editor.edit(facts)


def editor_of(model: torch.nn.Module) -> Editor | None:
    """The lifelong editor :func:`edit` keeps with ``model`` (None before the first call)."""
    return getattr(model, _ATTR, None)


def save_model_state(model: torch.nn.Module, directory: str | os.PathLike[str]) -> None:
    """Save the lifelong editor that :func:`edit` keeps with ``model``."""
    editor = editor_of(model)
    if editor is None:
        raise RLSEditError("this model carries no edit state: call rlsedit_llm.edit(model, facts, tokenizer=...) first")
    editor.save(directory)


def load_model_state(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, directory: str | os.PathLike[str], *,
                     take_over: bool = False) -> Editor:
    """Restore a state saved by :func:`save_model_state` and attach it to ``model``, so that
    :func:`edit` continues the saved stream. Returns the editor. ``take_over`` as in
    :meth:`Editor.load`."""
    with deferred_interrupts(), guard_of(model).lock:
        editor = Editor.load(model, tokenizer, directory, take_over=take_over)
        object.__setattr__(model, _ATTR, editor)
        return editor
