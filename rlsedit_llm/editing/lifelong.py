"""The one-call lifelong API: :func:`edit` keeps one :class:`~rlsedit_llm.Editor` with the model,
so that every call continues the same stream; :func:`save_model_state` / :func:`load_model_state`
persist it, :func:`save_pretrained` / :func:`from_pretrained` persist it with the model
(Hugging Face folders, :mod:`rlsedit_llm.editing.pretrained`), :func:`edits_disabled` switches
its edits off for a block.

Every successful :func:`edit` marks the model's config with the editor's stream
(:func:`rlsedit_llm.editing.persistence.mark_model`), so that a copy written with
``model.save_pretrained`` and edited again without its state is refused
(:class:`~rlsedit_llm.errors.StreamError`) instead of silently starting a new stream."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from rlsedit_llm.editing import persistence
from rlsedit_llm.editing.config import EditConfig
from rlsedit_llm.editing.editor import Editor
from rlsedit_llm.editing.guard import EditsDisabled, guard_of, refuse_reentry
from rlsedit_llm.editing.reports import EditReport
from rlsedit_llm.errors import FactError, HyperparameterError, RLSEditError
from rlsedit_llm.interrupts import deferred_interrupts
from rlsedit_llm.pipeline.facts import EASYEDIT_KEYWORDS, easyedit_keyword_error, from_easyedit

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

    from rlsedit_llm.pipeline.facts import Fact

__all__ = ["edit", "editor_of", "save_model_state", "load_model_state", "save_pretrained", "from_pretrained",
           "edits_disabled"]

_ATTR = "_rlsedit_editor"  # where rlsedit_llm.edit keeps the lifelong editor on the model


def edit(model: torch.nn.Module, facts: Iterable[Fact | Mapping[str, Any]] | None = None, *,
         tokenizer: PreTrainedTokenizerBase | None = None, config: EditConfig | None = None,
         new_stream: bool = False, **easyedit: Any) -> EditReport:
    """Edit ``model`` with ``facts``, continuing the model's lifelong RLSEdit stream.

    The first call creates an :class:`Editor` (statistics, per-layer state) and keeps it with the
    model; later calls continue the same recursion. ``tokenizer`` is needed on the first call.

    A model whose weights carry the edits of a stream whose state is not loaded (for example a
    copy written with ``model.save_pretrained`` after editing and reloaded with plain
    transformers) is refused with :class:`~rlsedit_llm.errors.StreamError`, which names the state
    to load (:func:`from_pretrained`, :func:`load_model_state`); ``new_stream=True`` starts a new
    stream on those weights deliberately (on a model without a lifelong editor only).

    Instead of ``facts``, EasyEdit's call form: ``edit(model, prompts=[...], target_new=[...],
    subject=[...], ground_truth=..., rephrase_prompts=..., locality_inputs=...,
    portability_inputs=..., tokenizer=tok)``, converted by
    :func:`~rlsedit_llm.pipeline.facts.from_easyedit` before anything else runs. Giving both, or
    a keyword that is none of these, raises :class:`FactError`.
    """
    facts = _facts_or_easyedit(facts, easyedit)
    # one get-or-create at a time; Ctrl-C deferred to the call's safe points, so that an edit that
    # completed is always attached to the model
    guard = guard_of(model)
    with deferred_interrupts(), guard.lock:
        refuse_reentry(guard, "edit")  # e.g. inside `with editor.disabled():`, before an editor is made
        report = _edit(model, facts, tokenizer, config, new_stream)
        persistence.mark_model(getattr(model, _ATTR), edited_fingerprint=None, state=None)
        return report


def _facts_or_easyedit(facts, easyedit: dict[str, Any]):
    """``facts``, or the facts of EasyEdit's keyword arguments (exactly one of the two)."""
    unknown = [k for k in easyedit if k not in EASYEDIT_KEYWORDS]
    if unknown:
        raise easyedit_keyword_error(unknown, context="rlsedit_llm.edit (besides its own parameters)")
    if easyedit and facts is not None:
        raise FactError(f"pass facts or EasyEdit's keyword arguments ({', '.join(sorted(easyedit))}), not both")
    if facts is not None:
        return facts
    missing = [k for k in ("prompts", "target_new", "subject") if easyedit.get(k) is None]
    if missing:
        raise FactError(f"no facts given: pass facts, or EasyEdit's prompts=, target_new= and subject= "
                        f"(missing: {', '.join(missing)})")
    return from_easyedit(**easyedit)


def _edit(model, facts, tokenizer, config, new_stream: bool) -> EditReport:
    editor = getattr(model, _ATTR, None)
    if editor is None:
        if tokenizer is None:
            raise HyperparameterError("the first rlsedit_llm.edit call on a model needs tokenizer=")
        editor = Editor(model, tokenizer, config, new_stream=new_stream)
        report = editor.edit(facts)
        object.__setattr__(model, _ATTR, editor)  # only once the first edit succeeded
        return report
    elif config is not None and config != editor.config:
        raise HyperparameterError(
            "this model already has a lifelong editor with a different config; "
            "use rlsedit_llm.Editor for a separate stream"
        )
    elif new_stream:
        raise HyperparameterError(
            f"new_stream=True starts a stream on a model without a lifelong editor; this model's editor holds "
            f"{len(editor.journal_)} edit(s): continue it (drop new_stream), or use rlsedit_llm.Editor(model, tok, "
            f"config, take_over=True, new_stream=True) for a separate stream"
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


def save_pretrained(model: torch.nn.Module, directory: str | os.PathLike[str], *,
                    safe_serialization: bool = True) -> None:
    """Write ``model`` (edited by :func:`edit`), its tokenizer and its lifelong editor's state to
    the Hugging Face folder ``directory`` (state in ``directory/rlsedit``), atomically; see
    :meth:`Editor.save_pretrained`. :func:`from_pretrained` loads it back."""
    editor = editor_of(model)
    if editor is None:
        raise RLSEditError("this model carries no edit state: call rlsedit_llm.edit(model, facts, tokenizer=...) "
                           "first (an unedited model is saved with model.save_pretrained)")
    editor.save_pretrained(directory, safe_serialization=safe_serialization)


def from_pretrained(directory: str | os.PathLike[str], *, device: torch.device | str | None = None,
                    dtype: torch.dtype | None = None) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """Load a folder written by :func:`save_pretrained` (or :meth:`Editor.save_pretrained`):
    return ``(model, tokenizer)`` with the editor attached, so that :func:`edit` continues the
    saved stream (edit ids, undo). Local files only; see :meth:`Editor.from_pretrained`."""
    editor = Editor.from_pretrained(directory, device=device, dtype=dtype)
    object.__setattr__(editor.model, _ATTR, editor)
    return editor.model, editor.tokenizer


def edits_disabled(model: torch.nn.Module) -> EditsDisabled:
    """``with rlsedit_llm.edits_disabled(model):`` the block runs on the base model, the lifelong
    editor's edits switched off and back on exactly afterwards (:meth:`Editor.disabled`)."""
    editor = editor_of(model)
    if editor is None:
        raise RLSEditError("this model carries no lifelong editor: call rlsedit_llm.edit(model, facts, "
                           "tokenizer=...) first, or use Editor.disabled()")
    return editor.disabled()
