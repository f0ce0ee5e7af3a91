"""Saving and restoring an :class:`~rlsedit_llm.Editor`: its state as a dict (the PyTorch/PEFT
convention), the state written to and read from a folder, and the weight deltas as an edit pack.

Functions of an editor, which its methods of the same names call; file formats
live in :mod:`rlsedit_llm.editing.state`, the checks of a loaded state in
:mod:`rlsedit_llm.editing.state_checks`, the model-and-state folders of ``save_pretrained`` in
:mod:`rlsedit_llm.editing.pretrained`.

**Stream marks.** Every editor belongs to a *stream* (``Editor.stream_id_``, a random id kept in
its state and saves). A save (:func:`save`, ``save_pretrained``), a load and every
``rlsedit_llm.edit`` call mark the model's Hugging Face config with it
(``model.config.rlsedit``, see :func:`mark_model`), so a copy of the edited model written with
``model.save_pretrained`` and reloaded with plain ``from_pretrained`` is recognised without its
state: creating an editor on it (:func:`begin_stream`, from ``Editor(...)``) raises
:class:`~rlsedit_llm.errors.StreamError` naming the state to load, unless ``new_stream=True``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import uuid
from pathlib import Path
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
from rlsedit_llm.errors import StateMismatchError, StreamError
from rlsedit_llm.interrupts import deferred_interrupts
from rlsedit_llm.kernel.registry import solver_class
from rlsedit_llm.pipeline.values import ValueConfig

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from rlsedit_llm.editing.editor import Editor
    from rlsedit_llm.editing.guard import ModelGuard

__all__ = ["state_dict", "gather_state", "from_state_dict", "rebuild", "install", "save", "load",
           "save_edit_pack", "state_bytes", "stream_id", "stream_mark", "mark_model", "begin_stream", "MARK"]

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
        "stream": stream_id(editor),
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
    stream = state.get("stream")  # saves before streams were recorded: a new id (stream_id)
    if isinstance(stream, str) and _STREAM_ID.fullmatch(stream):
        setattr(editor, "stream_id_", stream)  # noqa: B010 (set outside the class, like every state attribute here)
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
        edited = model_fingerprint(editor.model)
        target = state_io.write_state(directory, gather_state(editor, snapshot=False),  # written at once: no snapshot
                                      edited_fingerprint=edited)
        mark_model(editor, edited_fingerprint=edited, state=str(Path(os.path.abspath(target))))
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
        mark_model(editor, edited_fingerprint=state["edited_fingerprint"],
                   state=str(Path(os.path.abspath(state_path(directory)))))
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


def state_bytes(editor: Editor) -> int:
    """Bytes of the tensors a save of ``editor`` writes now (the files add a few KB of headers
    and the manifest): every solver tensor (a bitwise symmetric matrix as its packed triangle,
    as :mod:`~rlsedit_llm.editing.state` stores it) and the journal's keys and values. Before the
    first edit (no solver yet), what the first save after it will hold without the journal:
    :func:`~rlsedit_llm.editing.state.state_size` for ``rlsedit``, and the same count from the
    method's state tensors for the others (their square matrices counted as packed only when
    they are symmetric by construction)."""
    if editor.solvers_:
        total = 0
        for solver in editor.solvers_.values():
            for t in solver.state_dict(snapshot=False)["tensors"].values():
                n = t.shape[0]
                count = n * (n + 1) // 2 if state_io.is_bitwise_symmetric(t) else t.numel()
                total += count * t.element_size()
        for record in editor.journal_:
            for part in (record.keys, record.values):
                total += sum(t.numel() * t.element_size() for t in part.values())
        return total
    from rlsedit_llm.kernel.registry import solver_class

    cfg, spec = editor.config, editor.spec_
    dtype = getattr(torch, cfg.state_dtype)
    if cfg.method == "rlsedit":
        return state_io.state_size(spec.d_k, spec.d_model, len(editor.layers_), dtype=dtype,
                                   track_information=cfg.track_information)
    names = [a.rstrip("_") for a in solver_class(cfg.method).state_tensors]
    d_k, d_v = spec.d_k, spec.d_model
    per_layer = sum(d_k * d_v if n in ("W0", "W") else d_k * (d_k + 1) // 2 if n in _SYMMETRIC else d_k * d_k
                    for n in names)
    return per_layer * len(editor.layers_) * torch.empty((), dtype=dtype).element_size()


#: Square state tensors that are symmetric by construction (packed in saves).
_SYMMETRIC = frozenset({"C", "G", "gram0", "X"})


# -- streams: which edits a model carries ---------------------------------------------------------
#: The attribute of ``model.config`` that carries the stream mark (saved in ``config.json``).
MARK = "rlsedit"
MARK_FORMAT = "rlsedit-stream"
_STREAM_ID = re.compile(r"[0-9a-f]{32}")


def stream_id(editor: Editor) -> str:
    """The id of ``editor``'s stream (32 hex digits), made on first use and kept in its state."""
    sid = getattr(editor, "stream_id_", None)
    if not (isinstance(sid, str) and _STREAM_ID.fullmatch(sid)):
        sid = uuid.uuid4().hex
        setattr(editor, "stream_id_", sid)  # noqa: B010 (made on first use)
    return sid


def stream_mark(model: torch.nn.Module) -> dict | None:
    """The stream mark of ``model`` (``model.config.rlsedit``), or None when it carries none."""
    mark = getattr(getattr(model, "config", None), MARK, None)
    if isinstance(mark, dict) and isinstance(mark.get("stream"), str):
        return mark
    return None


def mark_model(editor: Editor, *, edited_fingerprint: str | None, state: str | None) -> None:
    """Record in ``model.config.rlsedit`` (a JSON dict, written by ``model.save_pretrained``) that
    the model carries ``editor``'s stream: its id, method, number of edits in the journal and
    next edit id, the base fingerprint, the fingerprint of the edited weights when known (a save or
    a load: else None) and the folder of the last save (``state``: an absolute path; ``"rlsedit"``,
    relative to the model folder, in the ``config.json`` of ``save_pretrained``). A model without
    a Hugging Face config is left alone."""
    config = getattr(editor.model, "config", None)
    if config is None:
        return
    previous = stream_mark(editor.model)
    sid = stream_id(editor)
    if state is None and previous is not None and previous.get("stream") == sid:
        state = previous.get("state")  # the last save of this stream stays the one to name
    setattr(config, MARK, {
        "format": MARK_FORMAT, "stream": sid, "method": editor.config.method, "edits": len(editor.journal_),
        "next_id": editor.next_id_, "base_fingerprint": editor.base_fingerprint_,
        "edited_fingerprint": edited_fingerprint, "state": state,
    })


def _holds_stream(model: torch.nn.Module, sid: str, editor: Editor) -> bool:
    """Whether a live editor other than ``editor`` (the owner, or the one ``rlsedit_llm.edit``
    keeps) holds stream ``sid`` and the model holds its state: the stream's state is loaded."""
    candidates = (guard_of(model).owner, model.__dict__.get("_rlsedit_editor"))
    return any(other is not None and other is not editor and getattr(other, "stream_id_", None) == sid
               and other.ownership.mismatch() is None for other in candidates)


def _state_hint(model: torch.nn.Module, mark: dict) -> str:
    """How to load the state of the stream ``mark`` names: the folder, and the call."""
    saved = mark.get("state")
    origin = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    candidates = []
    if isinstance(saved, str) and saved:
        candidates.append(Path(saved) if os.path.isabs(saved) or not origin else Path(origin) / saved)
    if origin:
        candidates.append(Path(origin) / state_io.SUBFOLDER)
    for folder in candidates:
        if (folder / "editor.json").is_file():
            if folder.name == state_io.SUBFOLDER and (folder.parent / "config.json").is_file():
                return (f"rlsedit_llm.from_pretrained({str(folder.parent)!r}) (model and state), or "
                        f"rlsedit_llm.load_model_state(model, tok, {str(folder)!r}) / "
                        f"Editor.load(model, tok, {str(folder)!r})")
            return (f"rlsedit_llm.load_model_state(model, tok, {str(folder)!r}) or "
                    f"Editor.load(model, tok, {str(folder)!r})")
    where = f" (its last save was at {saved!r}, which is not there)" if isinstance(saved, str) and saved else \
        " (no save of it is recorded)"
    return (f"rlsedit_llm.load_model_state(model, tok, <state folder>) or rlsedit_llm.from_pretrained(<folder>) "
            f"with the folder that holds its state{where}")


def begin_stream(editor: Editor, *, new_stream: bool) -> None:
    """At the creation of ``editor`` (its ``base_fingerprint_`` just taken): refuse, with
    :class:`StreamError`, a model whose weights carry the edits of a stream whose state is not
    loaded; with ``new_stream`` start the new stream deliberately (the model's mark is replaced).

    The model carries such edits when its config has a stream mark (:func:`mark_model`) with
    edits, its weights are not that stream's base model, and no live editor of the model holds
    that stream (the owner, reached with ``take_over=True``, or the editor ``rlsedit_llm.edit``
    keeps). A model whose mark was lost (a copy saved without its config) is not recognised here;
    :meth:`Editor.load` recognises it by the saved edited fingerprint."""
    model = editor.model
    mark = stream_mark(model)
    if mark is None or not mark.get("edits") or editor.base_fingerprint_ == mark.get("base_fingerprint"):
        return
    if _holds_stream(model, mark["stream"], editor):
        return
    if new_stream:
        log.info("starting a new stream on a model that carries %s edit(s) of stream %s (new_stream=True)",
                 mark.get("edits"), mark["stream"][:8])
        setattr(model.config, MARK, {
            "format": MARK_FORMAT, "stream": stream_id(editor), "method": editor.config.method, "edits": 0,
            "next_id": 0, "base_fingerprint": editor.base_fingerprint_, "edited_fingerprint": None, "state": None,
        })
        return
    same = editor.base_fingerprint_ == mark.get("edited_fingerprint")
    weights = ("its weights are those of the stream's last save" if same else
               "its weights are not those its last save recorded (edits made after that save, or other changes)")
    raise StreamError(
        f"this model carries {mark.get('edits')} edit(s) of the rlsedit stream {mark['stream'][:8]} "
        f"(model.config.rlsedit; {weights}) whose state is not loaded: a new editor would silently start a new "
        f"stream on top of them, and they could no longer be undone. To continue that stream, load its state: "
        f"{_state_hint(model, mark)}. To start a new stream on these weights deliberately, pass new_stream=True "
        f"(Editor(model, tok, config, new_stream=True), or rlsedit_llm.edit(model, facts, tokenizer=tok, "
        f"new_stream=True))")
