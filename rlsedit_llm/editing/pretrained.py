"""An edited model and its editor state in one Hugging Face folder: ``save_pretrained`` and
``from_pretrained`` (the PEFT-like names of :meth:`rlsedit_llm.Editor.save_pretrained` and
:meth:`rlsedit_llm.Editor.from_pretrained`, which call :func:`save_editor` and :func:`load_editor`).

A folder written by :func:`save_editor`::

    config.json, generation_config.json, model.safetensors (or its shards), tokenizer files
                   the edited model and its tokenizer, as ``model.save_pretrained`` and
                   ``tokenizer.save_pretrained`` write them; ``config.json`` carries the stream
                   mark ``rlsedit`` (:func:`rlsedit_llm.editing.persistence.mark_model`: stream id,
                   edits, base and edited fingerprints, ``"state": "rlsedit"``)
    rlsedit/       the editor's state, exactly what :meth:`Editor.save` writes

Any tool that reads Hugging Face folders loads the edited model from it (the ``rlsedit/``
subfolder is ignored); :func:`load_editor` loads the model, the tokenizer and the state, so the
stream continues (edit ids, undo, the same recursion).

**Atomic.** The same machinery as :meth:`Editor.save`: one writer per folder (the lock
``<dir>.rlsedit-lock`` of :mod:`~rlsedit_llm.editing.folder_lock`); everything is written into a
work folder ``<dir>.tmp-XXXXXXXX`` (:func:`~rlsedit_llm.editing.folder_swap.make_work_folder`,
removed by the next writer if this process is killed), the state's manifest last, every file and
folder fsynced, and the folder is swapped in with one ``renameat2(RENAME_EXCHANGE)``, so
``<dir>`` is at every instant the previous complete folder or the new one. Where the exchange is
not available the swap is two renames (``<dir>`` to ``<dir>.old-XXXXXXXX``, the new folder to
``<dir>``); a crash between them leaves no ``<dir>`` and the previous complete folder in
``<dir>.old-XXXXXXXX``, which is never removed automatically (:func:`load_editor` names it). A
half-written folder is therefore never under the name ``<dir>``, and :func:`load_editor` refuses a
folder without ``config.json`` and ``rlsedit/editor.json`` and checks the loaded model against the
state's fingerprints.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import secrets
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError

from rlsedit_llm.adapters.fingerprint import model_fingerprint
from rlsedit_llm.editing import folder_swap, persistence
from rlsedit_llm.editing import state as state_io
from rlsedit_llm.editing.folder_lock import locked
from rlsedit_llm.editing.save_paths import MANIFEST, state_path
from rlsedit_llm.errors import HyperparameterError, ModelLoadError, StateMismatchError, StateWriteError
from rlsedit_llm.files import fsync_path

if TYPE_CHECKING:
    from rlsedit_llm.editing.editor import Editor
    from rlsedit_llm.editing.folder_lock import Hold

__all__ = ["SUBFOLDER", "is_pretrained_folder", "load_editor", "save_editor"]

log = logging.getLogger(__name__)

#: The subfolder that holds the editor's state.
SUBFOLDER = state_io.SUBFOLDER
_MISSING = object()


def is_pretrained_folder(folder: Path) -> bool:
    """Whether ``folder`` is a complete folder of :func:`save_editor` (model config and state manifest)."""
    return (folder / "config.json").is_file() and (folder / SUBFOLDER / MANIFEST).is_file()


def _save_kwargs(model: torch.nn.Module, safe_serialization: bool) -> dict:
    """The keyword arguments of ``model.save_pretrained`` for ``safe_serialization`` (transformers
    5 writes safetensors only and has no such argument)."""
    if not isinstance(safe_serialization, bool):
        raise HyperparameterError(f"safe_serialization must be True or False; got {safe_serialization!r}")
    params = inspect.signature(getattr(model, "save_pretrained")).parameters  # noqa: B009 (a Module attribute)
    if "safe_serialization" in params:
        return {"safe_serialization": safe_serialization}
    if not safe_serialization:
        raise HyperparameterError("this transformers version writes safetensors only; use safe_serialization=True")
    return {}


def save_editor(editor: Editor, directory: str | os.PathLike[str], *, safe_serialization: bool = True) -> Path:
    """Write ``editor``'s model and tokenizer in Hugging Face format and its state in
    ``directory/rlsedit``, atomically (see the module docstring); return the folder.

    Holds the model's lock for the whole save (no edit runs meanwhile) and refuses, like
    :meth:`Editor.save`, a model that no longer holds the editor's state (every tensor re-read:
    :class:`StateMismatchError`). The model's config is marked with the editor's stream
    (``model.config.rlsedit``) before it is written, so a copy of the folder loaded with plain
    transformers is recognised as carrying this stream's edits.

    Raises
    ------
    PathError
        ``directory`` is not a path.
    FileExistsError
        ``directory`` holds something other than an earlier folder of this function.
    StateLockedError
        Another process or thread is writing the folder.
    StateWriteError
        The folder cannot be written (full disk, permissions); the previous folder is unchanged.
    HyperparameterError
        ``safe_serialization=False`` where transformers writes safetensors only, or a model or
        tokenizer without ``save_pretrained``.
    """
    target = state_path(directory, "the model folder")
    model, tokenizer = editor.model, editor.tokenizer
    if not (callable(getattr(model, "save_pretrained", None)) and callable(getattr(tokenizer, "save_pretrained", None))
            and getattr(model, "config", None) is not None):
        raise HyperparameterError("save_pretrained needs a Hugging Face model and tokenizer (with save_pretrained); "
                                  "use Editor.save for the state alone")
    kwargs = _save_kwargs(model, safe_serialization)
    with editor._owning("save", claim=False, fresh=True):
        edited = model_fingerprint(model)
        state = persistence.gather_state(editor, snapshot=False)  # written at once: no snapshot
        if not target.parent.is_dir():
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise _write_error(target, exc, had_save=False) from exc
            fsync_path(target.parent.parent)
        with locked(target) as hold:
            had_save = is_pretrained_folder(target)
            if target.exists() and not had_save and (not target.is_dir() or any(target.iterdir())):
                raise FileExistsError(f"{target} exists and is not a folder written by save_pretrained with an "
                                      f"editor state; refusing to replace it (choose a new or empty folder)")
            previous = getattr(model.config, persistence.MARK, _MISSING)
            tmp = None
            try:
                tmp = folder_swap.make_work_folder(target, hold)
                persistence.mark_model(editor, edited_fingerprint=edited, state=SUBFOLDER)  # relative in config.json
                model.save_pretrained(tmp, **kwargs)
                tokenizer.save_pretrained(tmp)
                (tmp / SUBFOLDER).mkdir()
                state_io.write_state_files(tmp / SUBFOLDER, state, edited_fingerprint=edited)  # its manifest last
                _fsync_tree(tmp)
                _swap_in(tmp, target, hold)
                tmp = None
            except BaseException as exc:
                if previous is _MISSING:
                    if hasattr(model.config, persistence.MARK):
                        delattr(model.config, persistence.MARK)
                else:
                    setattr(model.config, persistence.MARK, previous)
                if isinstance(exc, (OSError, SafetensorError)) and not isinstance(exc, StateWriteError):
                    raise _write_error(target, exc, had_save) from exc
                raise
            finally:
                if tmp is not None:
                    folder_swap.discard(tmp)
        persistence.mark_model(editor, edited_fingerprint=edited, state=str(Path(os.path.abspath(target)) / SUBFOLDER))
    log.info("saved the edited model and its editor state (%d edits, layers %s) to %s", len(editor.journal_),
             list(editor.layers_), target)
    return target


def _write_error(target: Path, exc: BaseException, had_save: bool) -> StateWriteError:
    reason = " ".join(str(exc).split()) or type(exc).__name__
    kept = f"the previous folder at {target} is unchanged" if had_save else f"nothing was saved at {target}"
    error = StateWriteError(f"could not write the model and editor state to {target} ({reason}); free space on the "
                            f"disk that holds {target.parent}, or check that you may write there, then save again; "
                            f"{kept}")
    error.errno = getattr(exc, "errno", None)
    return error


def _fsync_tree(folder: Path) -> None:
    """fsync every file under ``folder``, then every folder, deepest first."""
    for root, dirs, files in os.walk(folder, topdown=False):
        for name in files:
            fsync_path(Path(root) / name)
        for name in dirs:
            fsync_path(Path(root) / name)
    fsync_path(folder)


def _swap_in(tmp: Path, target: Path, hold: Hold) -> None:
    """Make the complete folder ``tmp`` the folder ``target``: a rename when there is none, else
    one atomic exchange, else two renames whose intermediate ``<dir>.old-XXXXXXXX`` (the previous
    complete folder) is neither recorded in the lock's ledger nor named in a swap marker, so no
    clean-up ever removes it (the state saves' recovery, :func:`folder_swap.repair`, recognises a
    complete save by a top-level ``editor.json``, which this folder keeps in ``rlsedit/``)."""
    parent = target.parent
    if not os.path.lexists(target):
        os.rename(tmp, target)
        fsync_path(parent)
        return
    if folder_swap._exchange(tmp, target):
        fsync_path(parent)  # the exchange is durable before the previous folder is deleted
        folder_swap.discard(tmp)  # now the previous folder
        fsync_path(parent)
        return
    old = parent / f"{target.name}.old-{secrets.token_hex(4)}"
    os.rename(target, old)  # from here until the next rename, only `old` is complete
    fsync_path(parent)
    try:
        os.rename(tmp, target)
    except OSError:
        os.rename(old, target)
        fsync_path(parent)
        raise
    fsync_path(parent)
    folder_swap.discard(old)
    fsync_path(parent)


def _saved_dtype(target: Path) -> str | None:
    try:
        config = json.loads((target / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(config, dict):
        return None
    saved = config.get("dtype", config.get("torch_dtype"))
    return saved if isinstance(saved, str) else None


def _not_a_folder(target: Path) -> StateMismatchError:
    if not os.path.lexists(target):
        prefix = f"{target.name}.old-"
        leftovers = sorted(p.name for p in target.parent.iterdir()
                           if p.name.startswith(prefix) and is_pretrained_folder(p)) if target.parent.is_dir() else []
        hint = (f"; {', '.join(leftovers)} holds the previous complete folder of a save that was interrupted: rename "
                f"it to {target.name} to use it") if leftovers else ""
        return StateMismatchError(f"no saved model at {target}: the folder does not exist{hint}")
    return StateMismatchError(f"{target} is not a folder written by save_pretrained with an editor state: it needs "
                              f"config.json and {SUBFOLDER}/{MANIFEST} (an interrupted save is never left under this "
                              f"name); for a model without a state use rlsedit_llm.load_model")


def load_editor(cls: type[Editor], directory: str | os.PathLike[str], *, device: torch.device | str | None = None,
                dtype: torch.dtype | None = None, take_over: bool = False) -> Editor:
    """Load the model (``AutoModelForCausalLM``, local files only: never the hub), the tokenizer
    and the editor state of a folder written by :func:`save_editor`; return the editor (its
    ``.model`` and ``.tokenizer``), which continues the saved stream.

    ``device``: where to put the model (default: CPU); the state follows each edited layer.
    ``dtype``: None loads the model in the dtype it was saved in, which is the only one the state
    continues (its fingerprints are of those weights): another dtype is refused with
    :class:`StateMismatchError`. ``take_over`` as in :meth:`Editor.load`.

    Raises :class:`StateMismatchError` for a folder that is not such a save (or a damaged one, or
    a model whose weights are not the saved ones), :class:`ModelLoadError` when transformers
    cannot load the model or tokenizer, :class:`PathError` for a path that is not one.
    """
    target = state_path(directory, "the model folder")
    if not is_pretrained_folder(target):
        raise _not_a_folder(target)
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise HyperparameterError(f"dtype must be a torch floating dtype or None; got {dtype!r}")
    saved = _saved_dtype(target)
    if dtype is not None and saved is not None and str(dtype).removeprefix("torch.") != saved:
        raise StateMismatchError(f"the editor state in {target / SUBFOLDER} continues the model saved in {saved}; in "
                                 f"{str(dtype).removeprefix('torch.')} its weights would differ from the saved edited "
                                 f"ones. Load it with dtype=None")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(target), local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(str(target), local_files_only=True,
                                                     dtype=dtype if dtype is not None else "auto")
    except Exception as exc:  # transformers raises many types for a damaged folder
        raise ModelLoadError(f"could not load the model saved in {target}: {type(exc).__name__}: {exc}") from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    module: torch.nn.Module = model
    if device is not None:
        module.to(device)
    module.eval()
    return cls.load(module, tokenizer, target / SUBFOLDER, take_over=take_over)
