"""Saving and restoring an :class:`~rlsedit_llm.Editor`: its state as a dict (the PyTorch/PEFT
convention), the state written to and read from a folder, and the weight deltas as an edit pack.

Functions of an editor, which its methods of the same names call; file formats
live in :mod:`rlsedit_llm.editing.state`, the checks of a loaded state in
:mod:`rlsedit_llm.editing.state_checks`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import TYPE_CHECKING

import torch

from rlsedit_llm.adapters.fingerprint import model_fingerprint
from rlsedit_llm.adapters.spec import read_weight, write_weight
from rlsedit_llm.editing import state as state_io
from rlsedit_llm.editing.config import EditConfig
from rlsedit_llm.editing.guard import guard_of, refuse_foreign_owner, refuse_reentry, tensor_digests
from rlsedit_llm.editing.packs import write_edit_pack
from rlsedit_llm.editing.reports import EditRecord
from rlsedit_llm.editing.save_paths import state_path
from rlsedit_llm.errors import StateMismatchError
from rlsedit_llm.interrupts import deferred_interrupts
from rlsedit_llm.kernel.registry import solver_class
from rlsedit_llm.pipeline.values import ValueConfig

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from rlsedit_llm.editing.editor import Editor
    from rlsedit_llm.editing.guard import ModelGuard

__all__ = ["state_dict", "gather_state", "from_state_dict", "rebuild", "install", "save", "load",
           "save_edit_pack"]

log = logging.getLogger("rlsedit_llm.editing.editor")


# -- state (the PyTorch/PEFT convention) -----------------------------------------------------
def state_dict(editor: Editor) -> dict:
    """Everything that defines this editor besides the model and tokenizer.

    Tensors are the editor's own (not copies), and the dict stays a valid snapshot: an edit
    that updates a tensor in place (``LayerRLS``'s ``C``) copies it first after this call.
    :meth:`from_state_dict` rebuilds the editor; :mod:`rlsedit_llm.editing.state` writes and
    reads it as files.
    """
    with guard_of(editor.model).lock:  # never a half-written state of a concurrent call
        return gather_state(editor)

def gather_state(editor: Editor, *, snapshot: bool = True) -> dict:
    return {
        "config": editor.config.to_dict(),
        "value_config": dataclasses.asdict(editor.value_config_),
        "spec": state_io.spec_summary(editor.spec_),
        "model_class": type(editor.model).__name__,
        "layers": list(editor.layers_),
        "templates": editor.templates_,
        "next_id": editor.next_id_,
        "base_fingerprint": editor.base_fingerprint_,
        "solvers": {layer: solver.state_dict(snapshot=snapshot) for layer, solver in editor.solvers_.items()},
        "journal": [r.to_state() for r in editor.journal_],
    }

def from_state_dict(cls: type[Editor], model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, state: dict, *,
                    take_over: bool = False) -> Editor:
    """Rebuild an editor from :meth:`state_dict` and write its weights into ``model``'s edited
    layers (all or nothing). ``model`` must be the base model or already the edited one; the
    caller checks which (:func:`rlsedit_llm.editing.state.read_state` does it by fingerprint).
    Refused with :class:`OwnershipError` while another editor owns the model, unless
    ``take_over``; the new editor owns the model.
    """
    guard = guard_of(model)
    with deferred_interrupts(), guard.lock:
        editor = rebuild(cls, model, tokenizer, state, take_over)
        install(editor, guard, take_over)
        return editor

def rebuild(cls: type[Editor], model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, state: dict, take_over: bool,
            share: bool = True) -> Editor:
    """The editor of ``state``, not yet written into the model (see :meth:`_install`).
    ``share``: the state's tensors may be held elsewhere (copied before an in-place change);
    ``False`` when they were just read from files."""
    try:
        config = EditConfig.from_dict(state["config"])
        value_config = ValueConfig(**state["value_config"])
    except (TypeError, KeyError) as exc:  # fields this version does not know
        raise StateMismatchError(f"the saved hyperparameters do not fit this rlsedit version ({exc})") from None
    editor = cls.__new__(cls)
    editor._bind(model, tokenizer, config)
    editor.solvers_, editor.journal_ = {}, []
    editor.ownership.refuse_if_owned(take_over, "load an editor state")
    if list(editor.layers_) != list(state["layers"]):
        raise StateMismatchError(f"saved layers {state['layers']} differ from {list(editor.layers_)}")
    solver_cls = solver_class(config.method)
    solvers = {}
    for layer, solver_state in state["solvers"].items():
        layer = int(layer)
        device = editor._module(layer).weight.device
        solvers[layer] = solver_cls.from_state_dict(solver_state, device=device, share=share)
    editor.value_config_ = value_config
    editor.templates_ = state["templates"]
    editor.base_fingerprint_ = state["base_fingerprint"]
    editor.next_id_ = int(state["next_id"])
    try:
        journal = [EditRecord.from_state(e) for e in state["journal"]]
    except (TypeError, KeyError, ValueError) as exc:
        raise StateMismatchError(f"the saved journal is malformed ({exc!r}); the save is damaged") from None
    editor.solvers_ = solvers
    editor.journal_ = journal
    return editor

def install(editor: Editor, guard: ModelGuard, take_over: bool, *, edited_fingerprint: str | None = None) -> None:
    """Write this editor's weights into the model, check the result (against
    ``edited_fingerprint`` when given) and make the editor the model's owner: all or nothing.
    On any exception or signal the model gets its own weights back and the owner is unchanged."""
    before = {layer: read_weight(editor._module(layer)) for layer in editor.solvers_}  # the model's own
    previous = guard.owner
    displaced = previous.ownership.displaced if previous is not None else False
    try:
        for layer, solver in editor.solvers_.items():
            write_weight(editor._module(layer), solver.W_)
        if edited_fingerprint is not None and model_fingerprint(editor.model) != edited_fingerprint:
            raise StateMismatchError("after writing the saved weights the model does not match the saved "
                                     "edited model; the base model or the save is inconsistent (the model's "
                                     "own weights were put back)")
        editor._reference_ = tensor_digests(editor.model)
        editor.check_model()
        editor.ownership.hand_over(take_over)
    except BaseException:
        with deferred_interrupts():
            for layer, W in before.items():
                write_weight(editor._module(layer), W)
            guard.owner = previous
            if previous is not None:
                previous.ownership.displaced = displaced
        raise

# -- persistence and certificates -----------------------------------------------------------
def save(editor: Editor, directory: str | os.PathLike[str]) -> None:
    """Write the whole lifelong state to ``directory`` atomically (see :mod:`.state`).

    Refused with :class:`StateMismatchError` when the model no longer holds this editor's
    state (every tensor re-read: the save must load onto the base model); with
    :class:`PathError` for a path that is not one, :class:`StateLockedError` while another process
    writes the folder, :class:`StateWriteError` when it cannot be written (the previous save kept)."""
    state_path(directory)  # a path that is not one is refused before the state is gathered
    with editor._owning("save", claim=False, fresh=True):
        state_io.write_state(directory, gather_state(editor, snapshot=False),  # written at once: no snapshot
                             edited_fingerprint=model_fingerprint(editor.model))
    log.info("saved editor state (%d edits, layers %s) to %s", len(editor.journal_), list(editor.layers_), directory)

def load(cls: type[Editor], model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase,
         directory: str | os.PathLike[str], *, take_over: bool = False) -> Editor:
    """Restore an editor saved by :meth:`save` onto ``model``: the base model the edits were
    made on (the saved weights are written into it) or the saved edited model itself.
    Refused with :class:`StateMismatchError` for any other model, which is left untouched, and
    with :class:`OwnershipError` while another editor owns the model (for example the same save
    loaded a second time), unless ``take_over`` (the other editor can then no longer change it).
    """
    guard = guard_of(model)
    with deferred_interrupts(), guard.lock:
        refuse_reentry(guard, "load an editor state")
        state, mode = state_io.read_state(directory, model)  # refuses a save of another model first
        refuse_foreign_owner(guard, None, take_over, "load an editor state",
                             hint=" (a save loaded twice onto one model?)")
        editor = rebuild(cls, model, tokenizer, state, True, share=False)  # fresh from the files
        install(editor, guard, take_over,
                edited_fingerprint=state["edited_fingerprint"] if mode == "base" else None)
    log.info("loaded editor state (%d edits, layers %s) from %s onto the %s model",
             len(editor.journal_), list(editor.layers_), directory, mode)
    return editor

def save_edit_pack(editor: Editor, path: str | os.PathLike[str], *, dtype: torch.dtype | None = None) -> None:
    """Write only the edited weights' deltas, to apply to a fresh copy of the base model."""
    with editor._owning("save an edit pack", claim=False, fresh=True):
        write_pack(editor, path, dtype)

def write_pack(editor: Editor, path: str | os.PathLike[str], dtype: torch.dtype | None) -> None:
    write_edit_pack(
        path, {l: s.W_ - s.W0_ for l, s in editor.solvers_.items()}, dtype=dtype,
        spec=editor.spec_, base_fingerprint=editor.base_fingerprint_,
        edited_fingerprint=model_fingerprint(editor.model),
        edit_ids=[r.edit_id for r in editor.journal_],
        facts=[dataclasses.asdict(f) for r in editor.journal_ for f in r.facts],
    )
