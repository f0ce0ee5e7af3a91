"""Typed errors of the LLM layer. All subclass :class:`rlsedit_theory.errors.RLSEditError`."""

from __future__ import annotations

from rlsedit_theory.errors import (  # noqa: F401  (re-exported)
    HyperparameterError,
    NonFiniteError,
    NotPositiveDefiniteError,
    RLSEditError,
    ShapeError,
)


class FactError(RLSEditError, ValueError):
    """A fact cannot be edited as given: the subject is missing from the prompt, the target is
    empty or cannot be encoded by the tokenizer, a batch holds the same fact twice, ..."""


class UnsupportedArchitectureError(RLSEditError, TypeError):
    """The model's architecture is not one rlsedit knows how to edit."""


class StateMismatchError(RLSEditError, ValueError):
    """A saved edit state does not belong to this model (weights fingerprint or shapes differ)."""


class ModelLoadError(RLSEditError, OSError):
    """A model could not be loaded (for example a hub name while offline)."""


class CorpusError(RLSEditError, ValueError):
    """A text corpus for key statistics cannot be read or holds too few tokens."""


class UnknownEditError(RLSEditError, KeyError):
    """An edit id that is not (or no longer) in the editor's journal."""


class OwnershipError(RLSEditError, RuntimeError):
    """A second editor tried to change a model that another editor owns (its edits are in the
    model), or a call on a model re-entered while another call on it was running in the same
    thread. Continue with the owning editor, or hand the model over explicitly
    (``owner.release()``, ``Editor(..., take_over=True)``, ``Editor.load(..., take_over=True)``)."""


class InsufficientMemoryError(RLSEditError, MemoryError):
    """The edit state (plus its temporaries) cannot fit in the device's free memory."""


class StateLockedError(RLSEditError, RuntimeError):
    """Another process (or another thread) is editing or saving the same state folder: one writer
    per folder. Wait for it to finish, or use another folder."""


class StateWriteError(RLSEditError, OSError):
    """A save could not be written (a full disk, no permission). The previous save is unchanged;
    free space or fix the permissions and save again."""


class PathError(RLSEditError, TypeError, ValueError):
    """A file or folder argument is not a usable path (``None``, a number, an empty string)."""


class EditPackError(StateMismatchError):
    """An edit pack is damaged or malformed: unreadable, its digest does not match its contents,
    or its metadata or tensors are not those of a pack. Get an intact copy, or export the pack
    again from the editor that made it (``Editor.save_edit_pack``)."""


class StreamError(StateMismatchError):
    """The model's weights carry the edits of an rlsedit stream whose state is not loaded (a copy
    reloaded with plain ``from_pretrained``, a model saved after editing, ...): editing it with a
    fresh editor would silently start a new stream, on top of edits that could then no longer be
    undone. Load the stream's state first (``rlsedit_llm.from_pretrained(folder)``,
    ``rlsedit_llm.load_model_state(model, tok, state_folder)``, ``Editor.load``), or start a new
    stream deliberately (``Editor(model, tok, config, new_stream=True)``,
    ``rlsedit_llm.edit(model, facts, tokenizer=tok, new_stream=True)``)."""
