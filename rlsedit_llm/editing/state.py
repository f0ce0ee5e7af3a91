"""Saving and loading the lifelong edit state, and edit packs.

A saved editor is a folder::

    editor.json           manifest: format, hyperparameters, templates, next id, fingerprints,
                          the journal's facts, per-layer solver scalars, SHA-256 of the files
    solvers.safetensors   per edited layer: W0, W (the master copy), C = G_t^{-1}, the anchor
                          Gram, ... (``layer{l}.{attribute}``), in the state dtype
    journal.safetensors   per journal entry and layer: the keys K and absolute values V that were
                          added (``edit{id}.layer{l}.K`` / ``.V``); what undo needs

Writes are atomic. Everything is written into a temporary sibling ``<dir>.tmp-XXXX``, every file
and the folder are fsynced, and the new folder is then swapped in:

- on Linux, with ``renameat2(RENAME_EXCHANGE)``, which exchanges the two folders in one step, so
  at every instant ``<dir>`` is either the old complete save or the new complete save;
- elsewhere (or on file systems without the exchange), by two renames: ``<dir>`` to
  ``<dir>.old-XXXX``, then the new folder to ``<dir>``. A crash between the two leaves no
  ``<dir>`` but a complete ``<dir>.old-XXXX``, which :func:`load_editor` renames back.

Loading checks the model. The saved state records the fingerprint of the **pre-edit** weights
(taken when the editor was created, before any edit) and of the edited model at save time. The
model passed to :func:`load_editor` must be either

- the base model (its fingerprint equals the pre-edit one): the saved edited weights are written
  into the edited layers, and the result is checked against the saved edited fingerprint; or
- the edited model itself (its fingerprint equals the saved edited one, e.g. the same model
  object, or a copy saved with ``save_pretrained`` after editing): nothing is written.

Anything else is refused with :class:`StateMismatchError`. The loaded editor continues the same
recursion: a further edit gives bitwise the same weights and state as on the original editor.

An *edit pack* (:func:`save_edit_pack`, :func:`apply_edit_pack`) is one safetensors file with the
weight deltas ``W_t - W0`` of the edited layers (row-key orientation ``(d_k, d_v)``, float64 by
default) and metadata (base fingerprint, layers, facts). It turns a fresh copy of the base model
into the edited model without the recursion state (so it cannot be edited further or undone).

One writer at a time: two processes saving to the same folder at once is not supported.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import hashlib
import json
import logging
import os
import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from rlsedit_llm.kernel.baselines import METHODS
from rlsedit_llm.editing.editor import _ATTR, EditConfig, Editor, EditRecord, editor_of
from rlsedit_llm.errors import HyperparameterError, RLSEditError, StateMismatchError
from rlsedit_llm.pipeline.facts import Fact
from rlsedit_llm.adapters.architectures import detect_spec, get_module, read_weight, write_weight
from rlsedit_llm.pipeline.stats import model_fingerprint
from rlsedit_llm.pipeline.values import ValueConfig

__all__ = [
    "save_editor",
    "load_editor",
    "save_model_state",
    "load_model_state",
    "save_edit_pack",
    "apply_edit_pack",
    "read_edit_pack_metadata",
    "read_manifest",
]

log = logging.getLogger(__name__)

FORMAT = "rlsedit-editor-state"
PACK_FORMAT = "rlsedit-edit-pack"
VERSION = 1
MANIFEST = "editor.json"
SOLVERS = "solvers.safetensors"
JOURNAL = "journal.safetensors"


# ---------------------------------------------------------------------------------------------
# Durable file-system primitives
# ---------------------------------------------------------------------------------------------
def _fsync_path(path: Path) -> None:
    """fsync a file or a folder by path (folders: where the OS allows it)."""
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if path.is_dir() else 0)
    try:
        fd = os.open(path, flags)
    except OSError:  # e.g. folders on Windows
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _exchange(a: Path, b: Path) -> bool:
    """Atomically exchange two paths with Linux ``renameat2(RENAME_EXCHANGE)``.

    Returns False when the call is unavailable here (not Linux, old libc or kernel, or a file
    system without the exchange); raises OSError for real failures.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def _swap_in(tmp: Path, target: Path) -> None:
    """Make the complete folder ``tmp`` the folder ``target`` (see the module docstring)."""
    parent = target.parent
    if not target.exists():
        os.rename(tmp, target)
    elif _exchange(tmp, target):
        shutil.rmtree(tmp)  # now the previous save
    else:
        old = parent / f"{target.name}.old-{secrets.token_hex(4)}"
        os.rename(target, old)  # from here until the next rename, only `old` is complete
        _fsync_path(parent)
        os.rename(tmp, target)
        _fsync_path(parent)
        shutil.rmtree(old)
    _fsync_path(parent)


def _siblings(target: Path, kind: str) -> list[Path]:
    """``<target>.<kind>-XXXX`` folders next to ``target``, newest first."""
    prefix = f"{target.name}.{kind}-"
    if not target.parent.is_dir():
        return []
    found = [p for p in target.parent.iterdir() if p.name.startswith(prefix) and p.is_dir()]
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def _resolve_save(directory) -> Path:
    """The folder of a save; recovers an interrupted swap (``<dir>`` missing, ``<dir>.old-*``)."""
    target = Path(directory)
    if (target / MANIFEST).is_file():
        return target
    if not target.exists():
        for old in _siblings(target, "old"):
            if (old / MANIFEST).is_file():
                os.rename(old, target)
                _fsync_path(target.parent)
                log.warning("recovered the previous complete save of %s from %s (a save was interrupted)",
                            target, old.name)
                return target
        raise StateMismatchError(f"no saved editor state at {target}: the folder does not exist")
    raise StateMismatchError(f"{target} is not a saved editor state: it has no {MANIFEST}")


# ---------------------------------------------------------------------------------------------
# Serialisation helpers
# ---------------------------------------------------------------------------------------------
def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _cpu_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors with no shared storage (safetensors refuses shared storage)."""
    out, seen = {}, set()
    for name, t in tensors.items():
        t = t.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[name] = t
    return out


def _solver_payload(layer: int, solver) -> tuple[dict, dict[str, torch.Tensor]]:
    """Every attribute of a layer solver: tensors to safetensors, scalars to JSON.

    Generic over :mod:`.baselines` (their extra attributes are kept too)."""
    scalars, tensors = {}, {}
    for name, value in vars(solver).items():
        if isinstance(value, torch.Tensor):
            tensors[f"layer{layer}.{name}"] = value
        elif isinstance(value, torch.dtype):
            scalars[name] = {"torch_dtype": _dtype_name(value)}
        elif value is None or isinstance(value, (bool, int, float, str)):
            scalars[name] = value
        else:  # pragma: no cover - a new solver attribute type must be taught here
            raise TypeError(f"cannot save solver attribute {name!r} of type {type(value).__name__}")
    return {"class": type(solver).__name__, "scalars": scalars}, tensors


def _solver_from_payload(meta: dict, tensors: dict[str, torch.Tensor], layer: int, cls, device):
    if meta["class"] != cls.__name__:
        raise StateMismatchError(
            f"layer {layer}: the saved solver is a {meta['class']} but the config's method needs {cls.__name__}"
        )
    solver = object.__new__(cls)
    for name, value in meta["scalars"].items():
        if isinstance(value, dict) and "torch_dtype" in value:
            value = getattr(torch, value["torch_dtype"])
        setattr(solver, name, value)
    prefix = f"layer{layer}."
    for key, t in tensors.items():
        if key.startswith(prefix):
            setattr(solver, key[len(prefix):], t.to(device))
    return solver


def _fact_to_dict(fact: Fact) -> dict:
    return dataclasses.asdict(fact)


def _fact_from_dict(d: dict) -> Fact:
    return Fact(**d)


def _spec_summary(spec) -> dict:
    return {"family": spec.family, "n_layers": spec.n_layers, "edit_module_path": spec.edit_module_path,
            "d_k": spec.d_k, "d_model": spec.d_model}


def _package_version() -> str:
    try:
        from importlib.metadata import version

        return version("rlsedit")
    except Exception:  # not installed (running from a checkout)
        return "unknown"


def _check_model_matches_state(editor: Editor) -> None:
    """The edited layers of the model must hold exactly the editor's master weights."""
    for layer, solver in editor.solvers_.items():
        actual = read_weight(editor._module(layer))
        if not torch.equal(actual, solver.W_.to(device=actual.device, dtype=actual.dtype)):
            raise StateMismatchError(
                f"layer {layer}: the model's weights differ from the editor's state (they were changed "
                f"outside the editor); the state would not reproduce this model"
            )


# ---------------------------------------------------------------------------------------------
# Editor state
# ---------------------------------------------------------------------------------------------
def save_editor(editor: Editor, directory) -> Path:
    """Write the whole lifelong state of ``editor`` to the folder ``directory``, atomically.

    Saved: hyperparameters, edited layers, templates, the value configuration, ``next_id_``, the
    pre-edit and current model fingerprints, every layer's recursion state and the journal
    (facts, keys, values). An existing save at ``directory`` is replaced only once the new one is
    complete and on disk. Returns the folder.

    Raises :class:`StateMismatchError` if the model's edited layers no longer hold the editor's
    weights (changed outside the editor), FileExistsError if ``directory`` holds something other
    than a save (it is never replaced), and OSError for file-system failures (the previous save
    stays in place).
    """
    target = Path(directory)
    if target.exists() and not (target / MANIFEST).is_file() and (not target.is_dir() or any(target.iterdir())):
        raise FileExistsError(f"{target} exists and is not a saved editor state; refusing to replace it")
    _check_model_matches_state(editor)

    layers_meta, solver_tensors = {}, {}
    for layer, solver in editor.solvers_.items():
        meta, tensors = _solver_payload(layer, solver)
        layers_meta[str(layer)] = meta
        solver_tensors.update(tensors)
    journal_meta, journal_tensors = [], {}
    for record in editor.journal_:
        journal_meta.append({"edit_id": record.edit_id, "created": record.created,
                             "facts": [_fact_to_dict(f) for f in record.facts],
                             "layers": sorted(record.keys)})
        for layer in record.keys:
            journal_tensors[f"edit{record.edit_id}.layer{layer}.K"] = record.keys[layer]
            journal_tensors[f"edit{record.edit_id}.layer{layer}.V"] = record.values[layer]
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "rlsedit_version": _package_version(),
        "saved": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model_class": type(editor.model).__name__,
        "spec": _spec_summary(editor.spec_),
        "base_fingerprint": editor.base_fingerprint_,
        "edited_fingerprint": model_fingerprint(editor.model),
        "config": editor.config.to_dict(),
        "value_config": dataclasses.asdict(editor.value_config_),
        "layers": list(editor.layers_),
        "templates": editor.templates_,
        "next_id": editor.next_id_,
        "solvers": layers_meta,
        "journal": journal_meta,
    }

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{target.name}.tmp-", dir=target.parent))
    try:
        files = {}
        for name, tensors in ((SOLVERS, solver_tensors), (JOURNAL, journal_tensors)):
            save_file(_cpu_tensors(tensors), tmp / name, metadata={"format": FORMAT})
            _fsync_path(tmp / name)
            files[name] = _sha256(tmp / name)
        manifest["files"] = files
        with open(tmp / MANIFEST, "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=1, ensure_ascii=False)
            f.flush()
            os.fsync(f.fileno())
        _fsync_path(tmp)
        _swap_in(tmp, target)
        tmp = None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    for stale in _siblings(target, "tmp") + _siblings(target, "old"):  # left by crashed saves
        shutil.rmtree(stale, ignore_errors=True)
    log.info("saved editor state (%d edits, layers %s) to %s", len(editor.journal_), list(editor.layers_), target)
    return target


def read_manifest(directory) -> dict:
    """The ``editor.json`` of a save (after recovering an interrupted swap), checked for format."""
    target = _resolve_save(directory)
    try:
        manifest = json.loads((target / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise StateMismatchError(f"{target / MANIFEST} is unreadable ({exc}); the save is damaged") from None
    if manifest.get("format") != FORMAT:
        raise StateMismatchError(f"{target} is not a saved rlsedit editor state (format {manifest.get('format')!r})")
    if manifest.get("version") != VERSION:
        raise StateMismatchError(
            f"{target} was saved in state format version {manifest.get('version')}; this rlsedit reads version {VERSION}"
        )
    return manifest


def load_editor(model, tokenizer, directory) -> Editor:
    """Restore an editor saved by :func:`save_editor` onto ``model``.

    ``model`` must be the base model the edits were made on (then the saved edited weights are
    written into it) or already the saved edited model (then nothing is written). Further edits
    continue the same recursion as if the editor had never been saved.

    Raises
    ------
    StateMismatchError
        No (complete) save at ``directory``, a damaged save, another architecture, or weights
        that are neither the saved base nor the saved edited model. The model is then untouched.
    UnsupportedArchitectureError
        ``model`` is not a supported causal LM.
    """
    target = _resolve_save(directory)
    manifest = read_manifest(target)
    for name, digest in manifest["files"].items():
        if not (target / name).is_file() or _sha256(target / name) != digest:
            raise StateMismatchError(f"{target / name} is missing or damaged (checksum mismatch); the save is unusable")

    spec = detect_spec(model)
    saved_spec = manifest["spec"]
    if _spec_summary(spec) != saved_spec:
        raise StateMismatchError(
            f"the saved state is for a {saved_spec['family']} model with {saved_spec['n_layers']} layers and "
            f"edited matrices of shape ({saved_spec['d_k']}, {saved_spec['d_model']}); this model is a "
            f"{spec.family} with {spec.n_layers} layers and ({spec.d_k}, {spec.d_model})"
        )
    current = model_fingerprint(model)
    base, edited = manifest["base_fingerprint"], manifest["edited_fingerprint"]
    if current == base:
        mode = "base"
    elif current == edited:
        mode = "edited"
    else:
        raise StateMismatchError(
            f"this model's weights (fingerprint {current[:23]}...) match neither the base model the saved "
            f"edits were made on ({base[:23]}...) nor the saved edited model ({edited[:23]}...); load the "
            f"same pre-trained model (same weights and dtype) before loading the state"
        )

    try:
        config = EditConfig.from_dict(manifest["config"])
        value_config = ValueConfig(**manifest["value_config"])
    except TypeError as exc:  # fields this version does not know
        raise StateMismatchError(f"the saved hyperparameters do not fit this rlsedit version ({exc})") from None
    editor = Editor(model, tokenizer, config)
    editor.base_fingerprint_ = base
    if list(editor.layers_) != manifest["layers"]:
        raise StateMismatchError(f"saved layers {manifest['layers']} differ from {list(editor.layers_)}")
    cls = METHODS[config.method]

    solver_tensors = load_file(target / SOLVERS)
    journal_tensors = load_file(target / JOURNAL)
    solvers = {}
    for key, meta in manifest["solvers"].items():
        layer = int(key)
        device = get_module(model, spec.edit_module_path.format(layer)).weight.device
        solvers[layer] = _solver_from_payload(meta, solver_tensors, layer, cls, device)
    journal = []
    for entry in manifest["journal"]:
        eid = entry["edit_id"]
        keys = {l: journal_tensors[f"edit{eid}.layer{l}.K"] for l in entry["layers"]}
        values = {l: journal_tensors[f"edit{eid}.layer{l}.V"] for l in entry["layers"]}
        journal.append(EditRecord(eid, [_fact_from_dict(f) for f in entry["facts"]], keys, values,
                                  created=entry["created"]))

    editor.value_config_ = value_config
    editor.templates_ = manifest["templates"]
    editor.solvers_ = solvers
    editor.journal_ = journal
    editor.next_id_ = int(manifest["next_id"])

    if mode == "base" and solvers:
        before = {l: read_weight(editor._module(l)) for l in solvers}
        try:
            for layer, solver in solvers.items():
                write_weight(editor._module(layer), solver.W_)
            if model_fingerprint(model) != edited:
                raise StateMismatchError(
                    "after writing the saved weights the model does not match the saved edited model; "
                    "the base model or the save is inconsistent"
                )
        except BaseException:
            for layer, W in before.items():
                write_weight(editor._module(layer), W)
            raise
    else:
        _check_model_matches_state(editor)
    log.info("loaded editor state (%d edits, layers %s) from %s onto the %s model",
             len(journal), list(editor.layers_), target, mode)
    return editor


# ---------------------------------------------------------------------------------------------
# The editor rlsedit_llm.edit keeps with a model
# ---------------------------------------------------------------------------------------------
def save_model_state(model, directory) -> Path:
    """Save the lifelong editor that :func:`rlsedit_llm.edit` keeps with ``model``."""
    editor = editor_of(model)
    if editor is None:
        raise RLSEditError("this model carries no edit state: call rlsedit_llm.edit(model, facts, tokenizer=...) first")
    return save_editor(editor, directory)


def load_model_state(model, tokenizer, directory) -> Editor:
    """Restore a state saved by :func:`save_model_state` and attach it to ``model``, so that
    :func:`rlsedit_llm.edit` continues the saved stream. Returns the editor."""
    editor = load_editor(model, tokenizer, directory)
    object.__setattr__(model, _ATTR, editor)
    return editor


# ---------------------------------------------------------------------------------------------
# Edit packs
# ---------------------------------------------------------------------------------------------
def save_edit_pack(editor: Editor, path, *, dtype: torch.dtype | None = None) -> Path:
    """Write the edited layers' weight deltas ``W_t - W0`` to one safetensors file, atomically.

    Parameters
    ----------
    editor : Editor
    path : file to write (conventionally ``*.safetensors``)
    dtype : dtype of the stored deltas; default the state dtype (float64), which reproduces the
        edited model exactly; float32/bfloat16 give a smaller, approximate pack.

    The metadata holds the base model's fingerprint (checked by :func:`apply_edit_pack`), the
    architecture, the layers, the edit ids and the facts.
    """
    path = Path(path)
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise HyperparameterError(f"dtype must be a torch floating dtype or None; got {dtype!r}")
    _check_model_matches_state(editor)
    tensors = {}
    for layer, solver in editor.solvers_.items():
        delta = solver.W_ - solver.W0_  # (d_k, d_v)
        tensors[f"layer{layer}"] = delta if dtype is None else delta.to(dtype)
    facts = [_fact_to_dict(f) for r in editor.journal_ for f in r.facts]
    metadata = {
        "format": PACK_FORMAT,
        "version": str(VERSION),
        "rlsedit_version": _package_version(),
        "base_fingerprint": editor.base_fingerprint_,
        "edited_fingerprint": model_fingerprint(editor.model),
        "spec": json.dumps(_spec_summary(editor.spec_)),
        "layers": json.dumps(sorted(editor.solvers_)),
        "edit_ids": json.dumps([r.edit_id for r in editor.journal_]),
        "facts": json.dumps(facts, ensure_ascii=False),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{secrets.token_hex(4)}")
    try:
        save_file(_cpu_tensors(tensors), tmp, metadata=metadata)
        _fsync_path(tmp)
        os.replace(tmp, path)
        _fsync_path(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()
    log.info("wrote edit pack of %d edits (layers %s) to %s", len(editor.journal_), sorted(editor.solvers_), path)
    return path


def read_edit_pack_metadata(path) -> dict:
    """The metadata of an edit pack, with the JSON fields decoded."""
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
    except Exception as exc:
        raise StateMismatchError(f"{path} is not a readable edit pack ({exc})") from None
    if raw.get("format") != PACK_FORMAT:
        raise StateMismatchError(f"{path} is not an rlsedit edit pack (format {raw.get('format')!r})")
    if raw.get("version") != str(VERSION):
        raise StateMismatchError(f"{path} is edit pack version {raw.get('version')}; this rlsedit reads {VERSION}")
    meta = dict(raw)
    for key in ("spec", "layers", "edit_ids", "facts"):
        meta[key] = json.loads(raw[key])
    meta["version"] = int(raw["version"])
    return meta


def apply_edit_pack(model, path) -> dict:
    """Add the deltas of an edit pack to a fresh copy of the base model; return its metadata.

    The deltas are added in float64 to the module's weights (in row-key orientation) and written
    back in the module's own dtype and orientation. All or nothing: on any failure the model is
    left as it was.

    Raises :class:`StateMismatchError` when the model's weights are not those of the pack's base
    model (including a model the pack was already applied to) or the architecture differs.
    """
    meta = read_edit_pack_metadata(path)
    spec = detect_spec(model)
    if _spec_summary(spec) != meta["spec"]:
        raise StateMismatchError(f"the edit pack is for a model with {meta['spec']}; this model has {_spec_summary(spec)}")
    current = model_fingerprint(model)
    if current != meta["base_fingerprint"]:
        hint = ("the pack is already applied to this model" if current == meta["edited_fingerprint"] else
                "apply it to a fresh copy of the same pre-trained model (same weights and dtype)")
        raise StateMismatchError(
            f"this model's weights (fingerprint {current[:23]}...) are not the base model of the edit pack "
            f"({meta['base_fingerprint'][:23]}...): {hint}"
        )
    deltas = load_file(str(path))
    modules = {l: get_module(model, spec.edit_module_path.format(l)) for l in meta["layers"]}
    before = {l: read_weight(m) for l, m in modules.items()}
    try:
        for layer, module in modules.items():
            W = before[layer]
            write_weight(module, W.double() + deltas[f"layer{layer}"].to(device=W.device, dtype=torch.float64))
    except BaseException:
        for layer, W in before.items():
            write_weight(modules[layer], W)
        raise
    if model_fingerprint(model) != meta["edited_fingerprint"]:
        log.warning("after applying %s the model differs from the packed edited model (a reduced-precision "
                    "pack, or rounding); the deltas were applied", path)
    return meta
