"""Saving and loading the lifelong edit state: the file format and its public write and read.

File I/O only: this module writes and reads the dict of :meth:`rlsedit_llm.Editor.state_dict`
and checks that a save belongs to a model; it knows nothing of the editor itself.

A saved editor is a folder::

    editor.json           manifest: format, version, hyperparameters, templates, next id,
                          fingerprints, the journal's facts, per-layer solver method, dtype and
                          scalars, SHA-256 of the files
    solvers.safetensors   per edited layer the solver's tensors: W0, W (the master copy),
                          C = G_t^{-1}, the anchor Gram, ... (``layer{l}.{name}``), state dtype;
                          a symmetric matrix (C, G, the anchor Gram) as its packed triangle
    journal.safetensors   per journal entry and layer: the keys K and absolute values V that were
                          added (``edit{id}.layer{l}.K`` / ``.V``); what undo needs

Version 4 stores every solver tensor that is a bitwise symmetric square matrix as its upper
triangle packed into a ``(2m+1, n-m)`` matrix, ``m = n // 2`` (:func:`pack_symmetric`, exact: the
matrix read back is bit for bit the one saved) and lists those names in the solver's ``packed``
field of the manifest; a matrix that is not bitwise symmetric is stored whole. So a save of
``rlsedit`` takes :func:`state_size` bytes of tensors. Versions 1 to 3 (whole matrices) are still
read. Version 1 (rlsedit 0.1.0, solvers saved attribute by attribute) is read through
:func:`migrate_v1`.

What lies around the format, each in its own module:

- :mod:`rlsedit_llm.editing.save_paths`: which paths are accepted (``None``, numbers and ``""`` are
  refused with :class:`~rlsedit_llm.errors.PathError`; a symbolic link saves to the folder it points
  to) and the names of the three files;
- :mod:`rlsedit_llm.editing.folder_lock`: one writer per folder (a second writer gets
  :class:`~rlsedit_llm.errors.StateLockedError`); :func:`~rlsedit_llm.editing.folder_lock.state_lock`
  holds the lock across a load, edits and a save;
- :mod:`rlsedit_llm.editing.folder_swap`: writes are atomic (the new save is written beside the
  folder and swapped in, so ``<dir>`` is always the old or the new complete save) and what a killed
  save left is repaired by the next writer or load;
- :mod:`rlsedit_llm.editing.state_checks`: every field of a loaded state checked as if forged.

A write that fails (a full disk, no permission) raises
:class:`~rlsedit_llm.errors.StateWriteError` (an ``OSError``); the temporary folder is removed and
the previous save stays as it was. Once the new save is in place, a failure to delete the
previous one is only logged.

Loading checks the model. The saved state records the fingerprint of the **pre-edit** weights
(taken when the editor was created, before any edit) and of the edited model at save time. The
model passed to :func:`read_state` must be either

- the base model (its fingerprint equals the pre-edit one): the saved edited weights are written
  into the edited layers, and the result is checked against the saved edited fingerprint; or
- the edited model itself (its fingerprint equals the saved edited one, e.g. the same model
  object, or a copy saved with ``save_pretrained`` after editing): nothing is written.

Anything else is refused with :class:`StateMismatchError`. The manifest is cross-checked against
the tensors (:func:`check_consistency`) and every field is checked as if forged
(:func:`~rlsedit_llm.editing.state_checks.validate_state`); a save that fails is refused with
:class:`StateMismatchError` before the editor is built, so the model is never touched. The loaded
editor continues the same recursion: a further edit gives bitwise the same weights and state as on
the original editor.

Edit packs (the weight deltas alone) are written and applied by :mod:`rlsedit_llm.editing.packs`.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from rlsedit_llm.adapters.fingerprint import model_fingerprint
from rlsedit_llm.adapters.spec import detect_spec
from rlsedit_llm.editing import folder_swap
from rlsedit_llm.editing.folder_lock import locked
from rlsedit_llm.editing.save_paths import JOURNAL, MANIFEST, SOLVERS, state_path
from rlsedit_llm.editing.state_checks import check_consistency, validate_state
from rlsedit_llm.errors import StateMismatchError, StateWriteError
from rlsedit_llm.files import fsync_path, sha256_file

if TYPE_CHECKING:
    from rlsedit_llm.adapters.spec import ModelSpec

__all__ = [
    "check_consistency",
    "is_bitwise_symmetric",
    "manifest_digest",
    "migrate_v1",
    "pack_symmetric",
    "packed_size",
    "read_manifest",
    "read_state",
    "read_state_files",
    "spec_summary",
    "state_size",
    "unpack_symmetric",
    "write_state",
    "write_state_files",
]

log = logging.getLogger(__name__)

FORMAT = "rlsedit-editor-state"
VERSION = 4
READABLE_VERSIONS = (1, 2, 3, 4)
#: The first version that may store symmetric matrices packed (:func:`pack_symmetric`).
PACKED_SINCE = 4
#: The subfolder of a ``save_pretrained`` folder that holds the editor's state.
SUBFOLDER = "rlsedit"


# ---------------------------------------------------------------------------------------------
# Finding a save
# ---------------------------------------------------------------------------------------------
def _resolve_save(target: Path) -> Path:
    """The folder of a save; recovers an interrupted swap (``<dir>`` missing, marker present)."""
    if (target / MANIFEST).is_file():
        return target
    if not os.path.lexists(target) and os.path.lexists(folder_swap.intent_path(target)):
        with locked(target):  # taking the lock recovers a genuine interrupted swap, drops a stale marker
            pass
        if (target / MANIFEST).is_file():
            return target
    if not target.exists():
        prefix = f"{target.name}.old-"
        leftovers = sorted(p.name for p in target.parent.iterdir()
                           if p.name.startswith(prefix) and p.is_dir()) if target.parent.is_dir() else []
        hint = (f"; {', '.join(leftovers)} left by an earlier save is not restored automatically (no interrupted "
                f"save was recorded): rename it to {target.name} yourself if you want it back") if leftovers else ""
        raise StateMismatchError(f"no saved editor state at {target}: the folder does not exist{hint}")
    raise StateMismatchError(f"{target} is not a saved editor state: it has no {MANIFEST}")


# ---------------------------------------------------------------------------------------------
# Serialisation helpers
# ---------------------------------------------------------------------------------------------
def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def cpu_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
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


_BITS = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}


def is_bitwise_symmetric(t: torch.Tensor) -> bool:
    """Whether ``t`` is a square floating-point matrix equal to its transpose bit for bit (``-0.0``
    and ``0.0`` differ here, unlike ``torch.equal``), so that its packed triangle restores it exactly."""
    if not (isinstance(t, torch.Tensor) and t.is_floating_point() and t.ndim == 2 and t.shape[0] == t.shape[1]
            and t.shape[0] > 0):
        return False
    bits = t.detach().view(_BITS[t.element_size()])
    return torch.equal(bits, bits.mT)


def pack_symmetric(A: torch.Tensor) -> torch.Tensor:
    """The upper triangle of the symmetric ``(n, n)`` matrix ``A`` as a ``(2m+1, n-m)`` matrix,
    ``m = n // 2``: ``n(n+1)/2`` entries, copied (never computed), so :func:`unpack_symmetric` gives
    ``A`` back bit for bit when ``A`` is bitwise symmetric (:func:`is_bitwise_symmetric`).

    Layout, with ``k = n - m`` and ``A = [[A11, A12], [A21, A22]]`` split at ``k``: the first
    ``m + 1`` rows hold the upper triangle of ``A11`` (``k x k``) on and above their diagonal and
    the upper triangle of ``A22`` (``m x m``), transposed, below it (shifted down one row); the
    last ``m`` rows hold ``A21`` (``m x k``): the idea of LAPACK's rectangular full packed format,
    a 2-D tensor with no padding."""
    n = A.shape[0]
    m = n // 2
    k = n - m
    R = A.new_empty((2 * m + 1, k))
    T = R[: m + 1]
    upper = torch.ones(k, k, dtype=torch.bool, device=A.device).triu()
    T[:k][upper] = A[:k, :k][upper]
    lower = torch.ones(m, m, dtype=torch.bool, device=A.device).tril()
    T[1:, :m][lower] = A[k:, k:].mT[lower]
    R[m + 1:] = A[k:, :k]
    return R


def packed_size(shape: tuple[int, ...]) -> int | None:
    """The order ``n`` of the symmetric matrix a packed ``(2m+1, n-m)`` tensor of ``shape`` holds,
    or None when ``shape`` is not such a shape."""
    if len(shape) != 2 or shape[0] < 1 or shape[0] % 2 != 1:
        return None
    m = (shape[0] - 1) // 2
    if shape[1] == m and m > 0:
        return 2 * m
    if shape[1] == m + 1:
        return 2 * m + 1
    return None


def unpack_symmetric(R: torch.Tensor) -> torch.Tensor:
    """The symmetric ``(n, n)`` matrix of a :func:`pack_symmetric` tensor (selected, never
    computed: bit for bit). Raises ``ValueError`` for a tensor of no packed shape."""
    n = packed_size(tuple(R.shape))
    if n is None:
        raise ValueError(f"shape {tuple(R.shape)} is not that of a packed symmetric matrix (2m+1, n-m)")
    m = n // 2
    k = n - m
    A = R.new_empty((n, n))
    U = R[:k]
    upper = torch.ones(k, k, dtype=torch.bool, device=R.device).triu()
    A[:k, :k] = torch.where(upper, U, U.mT)
    L = R[1 : m + 1, :m]
    lower = torch.ones(m, m, dtype=torch.bool, device=R.device).tril()
    A[k:, k:] = torch.where(lower, L, L.mT)
    A[k:, :k] = R[m + 1:]
    A[:k, k:] = R[m + 1:].mT
    return A


def state_size(d_k: int, d_v: int, n_layers: int = 1, *, rows: int = 0, dtype: torch.dtype = torch.float64,
               gram0: bool = True, track_information: bool = False) -> int:
    """Bytes of the tensors an ``rlsedit`` save holds (the files add a few KB of headers and the
    ``editor.json`` manifest).

    Per edited layer: ``W0`` and ``W`` (``d_k x d_v`` each), the packed triangles of ``C`` and of
    the anchor Gram (``d_k (d_k+1) / 2`` each; ``G`` too with ``track_information``), and the
    journal's keys and values (``rows x (d_k + d_v)``, ``rows`` = facts in the journal), all in the
    state dtype. In float64 with the anchor Gram kept:
    ``n_layers * 8 * (2 d_k d_v + d_k (d_k + 1) + rows (d_k + d_v))``."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    triangle = d_k * (d_k + 1) // 2
    symmetric = 1 + int(bool(gram0)) + int(bool(track_information))
    return itemsize * n_layers * (2 * d_k * d_v + symmetric * triangle + rows * (d_k + d_v))


def spec_summary(spec: ModelSpec) -> dict:
    """What a save records of the architecture (compared on load)."""
    return {"family": spec.family, "n_layers": spec.n_layers, "edit_module_path": spec.edit_module_path,
            "d_k": spec.d_k, "d_model": spec.d_model}


def package_version() -> str:
    try:
        from importlib.metadata import version

        return version("rlsedit")
    except Exception:  # noqa: BLE001 - not installed (running from a checkout)
        return "unknown"


def _split(state: dict) -> tuple[dict, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """An editor state dict -> (JSON manifest part, solver tensors, journal tensors); bitwise
    symmetric solver matrices as their packed triangle (named in the solver's ``packed``)."""
    manifest = {k: v for k, v in state.items() if k not in ("solvers", "journal")}
    solvers_meta, solver_tensors = {}, {}
    for layer, solver in state["solvers"].items():
        meta = {k: v for k, v in solver.items() if k != "tensors"}
        packed = []
        for name, t in solver["tensors"].items():
            if is_bitwise_symmetric(t):  # C, G, the anchor Gram: half the bytes, exactly
                t = pack_symmetric(t.detach().to("cpu"))  # on the CPU: no device memory for the copy
                packed.append(name)
            solver_tensors[f"layer{layer}.{name}"] = t
        if packed:
            meta["packed"] = packed
        solvers_meta[str(layer)] = meta
    journal_meta, journal_tensors = [], {}
    for entry in state["journal"]:
        eid = entry["edit_id"]
        journal_meta.append({"edit_id": eid, "created": entry["created"], "facts": entry["facts"],
                             "layers": sorted(entry["keys"])})
        for layer in entry["keys"]:
            journal_tensors[f"edit{eid}.layer{layer}.K"] = entry["keys"][layer]
            journal_tensors[f"edit{eid}.layer{layer}.V"] = entry["values"][layer]
    manifest["solvers"], manifest["journal"] = solvers_meta, journal_meta
    return manifest, solver_tensors, journal_tensors


def _join(manifest: dict, solver_tensors: dict[str, torch.Tensor], journal_tensors: dict[str, torch.Tensor]) -> dict:
    """Inverse of :func:`_split` (for a version-2 manifest)."""
    state = {k: v for k, v in manifest.items() if k not in ("solvers", "journal", "files")}
    state["solvers"] = {}
    for key, meta in manifest["solvers"].items():
        prefix = f"layer{key}."
        tensors = {name[len(prefix):]: t for name, t in solver_tensors.items() if name.startswith(prefix)}
        state["solvers"][int(key)] = {**meta, "tensors": tensors}
    state["journal"] = []
    for entry in manifest["journal"]:
        eid = entry["edit_id"]
        try:
            keys = {l: journal_tensors[f"edit{eid}.layer{l}.K"] for l in entry["layers"]}
            values = {l: journal_tensors[f"edit{eid}.layer{l}.V"] for l in entry["layers"]}
        except KeyError as exc:
            raise StateMismatchError(f"the journal file lacks {exc} for edit {eid}; the save is damaged") from None
        state["journal"].append({"edit_id": eid, "created": entry["created"], "facts": entry["facts"],
                                 "keys": keys, "values": values})
    return state


def _unpack(manifest: dict, solver_tensors: dict[str, torch.Tensor]) -> dict:
    """The manifest without the solvers' ``packed`` fields; the tensors they name unpacked in
    ``solver_tensors`` (in place). Refuses a ``packed`` field that is malformed, names a missing
    tensor, appears before version 4, or a tensor of no packed shape of the model's ``d_k``."""
    solvers = manifest.get("solvers")
    if not isinstance(solvers, dict):
        return manifest  # refused by check_consistency
    spec = manifest.get("spec")
    d_k = spec.get("d_k") if isinstance(spec, dict) else None
    out = {}
    for key, meta in solvers.items():
        if not (isinstance(meta, dict) and "packed" in meta):
            out[key] = meta
            continue
        packed = meta["packed"]
        where = f"the save is damaged or forged: solvers[{key}].packed"
        if manifest.get("version", 0) < PACKED_SINCE:
            raise StateMismatchError(f"{where} appears in a version-{manifest.get('version')} save")
        if not (isinstance(packed, list) and all(isinstance(n, str) for n in packed)
                and len(set(packed)) == len(packed)):
            raise StateMismatchError(f"{where} must be a list of distinct tensor names")
        for name in packed:
            full = f"layer{key}.{name}"
            t = solver_tensors.get(full)
            if t is None:
                raise StateMismatchError(f"{where} names {name!r}, which the solver file lacks")
            n = packed_size(tuple(t.shape))
            if n is None or n != d_k:
                raise StateMismatchError(f"the save is damaged or forged: layer {key} tensor {name} has shape "
                                         f"{tuple(t.shape)}, not the packed triangle of a ({d_k}, {d_k}) matrix")
            solver_tensors[full] = unpack_symmetric(t)
        out[key] = {k: v for k, v in meta.items() if k != "packed"}
    return {**manifest, "solvers": out}


#: Version-1 solver class names and the methods that replaced them.
_V1_CLASSES = {"LayerRLS": "rlsedit", "PerBatchLayer": "memit", "DenseCumulativeLayer": "memit_seq",
               "NullSpaceLayer": "alphaedit"}
#: Scalars version 1 did not save, at the values version 1 always used.
_V1_DEFAULTS = {"alphaedit": {"threshold": 1e-2}}


def migrate_v1(manifest: dict, solver_tensors: dict[str, torch.Tensor]) -> tuple[dict, dict[str, torch.Tensor]]:
    """A version-1 manifest and solver tensors in the version-2 layout.

    Version 1 saved every solver attribute by name (``layer{l}.C_``, scalars with a trailing
    ``_``, the dtype as ``{"torch_dtype": ...}``) under the solver's class name. Tensors the method
    no longer has (AlphaEdit's ``C_``) are dropped.
    """
    from rlsedit_llm.kernel.registry import solver_class

    manifest = dict(manifest)
    solvers, tensors = {}, {}
    for key, meta in manifest["solvers"].items():
        method = _V1_CLASSES.get(meta.get("class"))
        if method is None:
            raise StateMismatchError(f"layer {key}: unknown version-1 solver class {meta.get('class')!r}")
        scalars = {}
        dtype = None
        for name, value in meta["scalars"].items():
            if isinstance(value, dict) and "torch_dtype" in value:
                dtype = value["torch_dtype"]
            elif value is not None:
                scalars[name.rstrip("_")] = value
        scalars = {**_V1_DEFAULTS.get(method, {}), **scalars}
        if method == "alphaedit":  # version 1 stored a placeholder alpha; the config holds the real one
            scalars["alpha"], scalars["beta"] = manifest["config"]["alpha"], manifest["config"]["beta"]
        solvers[key] = {"method": method, "dtype": dtype, "scalars": scalars}
        prefix = f"layer{key}."
        kept = {a.rstrip("_") for a in solver_class(method).state_tensors}
        for name, t in solver_tensors.items():
            if name.startswith(prefix):
                short = name[len(prefix):].rstrip("_")
                if short in kept:  # version 1 also saved attributes the method no longer has
                    tensors[prefix + short] = t
                else:
                    log.info("layer %s: dropped the version-1 tensor %r, which %s no longer uses", key, short, method)
    manifest["solvers"], manifest["version"] = solvers, VERSION
    return manifest, tensors


# ---------------------------------------------------------------------------------------------
# Editor state
# ---------------------------------------------------------------------------------------------
def write_state(directory: str | os.PathLike[str], state: dict, *, edited_fingerprint: str) -> Path:
    """Write an editor state dict (:meth:`rlsedit_llm.Editor.state_dict`) to the folder
    ``directory``, atomically, holding the folder's one-writer lock; return the folder (a symbolic
    link's target).

    An existing save at ``directory`` is replaced only once the new one is complete and on disk.

    Raises
    ------
    PathError
        ``directory`` is not a path (``None``, a number, ``""``); nothing is written.
    StateLockedError
        Another process or thread holds the folder's lock; nothing is written.
    FileExistsError
        ``directory`` holds something other than a save (it is never replaced).
    StateWriteError
        The file system refused a write (full disk, permissions); the temporary folder is
        removed and the previous save stays in place.
    """
    target = state_path(directory)
    if not target.parent.is_dir():
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _write_error(target, exc, had_save=False) from exc
        fsync_path(target.parent.parent)
    with locked(target) as hold:
        had_save = (target / MANIFEST).is_file()
        if target.exists() and not had_save and (not target.is_dir() or any(target.iterdir())):
            raise FileExistsError(f"{target} exists and is not a saved editor state; refusing to replace it")
        tmp = None
        try:
            tmp = folder_swap.make_work_folder(target, hold)
            write_state_files(tmp, state, edited_fingerprint=edited_fingerprint)
            folder_swap.swap_in(tmp, target, hold)
            tmp = None
        except (OSError, SafetensorError) as exc:
            raise _write_error(target, exc, had_save) from exc
        finally:
            if tmp is not None:
                folder_swap.discard(tmp)
        folder_swap.log_foreign_leftovers(target, hold)
    return target


FACTS_DIGEST = "facts_sha256"  # key of the journal file's metadata (older saves do not carry it)


def facts_digest(journal: list) -> str:
    """SHA-256 of the facts of every journal entry of a manifest, in order (as JSON)."""
    facts = [entry["facts"] for entry in journal]
    return hashlib.sha256(json.dumps(facts, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


def _check_facts(target: Path, manifest: dict) -> None:
    """Refuse a manifest whose journal facts differ from those the journal file was written for
    (saves that carry no digest, written before it existed, are not checked)."""
    with safe_open(target / JOURNAL, framework="pt") as f:
        written = (f.metadata() or {}).get(FACTS_DIGEST)
    if written is not None and written != facts_digest(manifest["journal"]):
        raise StateMismatchError("the journal's facts differ from those its keys and values were written for "
                                 "(the manifest was edited); the save is damaged or forged")


def write_state_files(folder: Path, state: dict, *, edited_fingerprint: str) -> None:
    """Write the three files of a save into the existing, empty, private ``folder`` and fsync
    them and the folder; the manifest last, so a folder with a manifest is a complete save. No
    lock and no swap: :func:`write_state` (and ``Editor.save_pretrained``) make ``folder`` the save."""
    manifest, solver_tensors, journal_tensors = _split(state)
    manifest = {"format": FORMAT, "version": VERSION, "rlsedit_version": package_version(),
                "saved": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **manifest,
                "edited_fingerprint": edited_fingerprint}
    files = {}
    # The journal file also carries a digest of the facts its keys and values were written for:
    # a fact's text changed in the manifest (even with the manifest's digest recomputed) is caught.
    facts = {JOURNAL: {FACTS_DIGEST: facts_digest(manifest["journal"])}, SOLVERS: {}}
    for name, tensors in ((SOLVERS, solver_tensors), (JOURNAL, journal_tensors)):
        save_file(cpu_tensors(tensors), folder / name, metadata={"format": FORMAT, **facts[name]})
        fsync_path(folder / name)
        files[name] = sha256_file(folder / name)
    manifest["files"] = files
    manifest["digest"] = manifest_digest(manifest)
    folder_swap.write_durably(folder / MANIFEST, json.dumps(manifest, indent=1, ensure_ascii=False).encode("utf-8"))
    fsync_path(folder)


def _write_error(target: Path, exc: BaseException, had_save: bool) -> StateWriteError:
    """The typed error of a failed write: what failed, what to do, what was kept."""
    reason = " ".join(str(exc).split()) or type(exc).__name__
    kept = (f"the previous save at {target} is unchanged" if had_save else f"nothing was saved at {target}")
    error = StateWriteError(f"could not write the editor state to {target} ({reason}); free space on the disk "
                            f"that holds {target.parent}, or check that you may write there, then save again; "
                            f"{kept}")
    error.errno = getattr(exc, "errno", None)
    if error.errno is None and ("code: 28" in reason or "StorageFull" in reason):  # safetensors' I/O error
        error.errno = errno.ENOSPC
    return error


def manifest_digest(manifest: dict) -> str:
    """SHA-256 of the canonical JSON of a manifest without its ``digest`` field."""
    body = {k: v for k, v in manifest.items() if k != "digest"}
    try:
        text = json.dumps(body, sort_keys=True, ensure_ascii=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError, RecursionError) as exc:
        raise StateMismatchError(f"the manifest holds a value JSON cannot represent exactly ({exc})") from None
    return "sha256:" + hashlib.sha256(text.encode("ascii")).hexdigest()


def read_manifest(directory: str | os.PathLike[str]) -> dict:
    """The ``editor.json`` of a save (after recovering an interrupted swap), checked for format."""
    target = _resolve_save(state_path(directory))
    try:
        manifest = json.loads((target / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise StateMismatchError(f"{target / MANIFEST} is unreadable ({exc}); the save is damaged") from None
    except RecursionError:
        raise StateMismatchError(f"{target / MANIFEST} nests too deeply to be read; the save is damaged or "
                                 f"forged") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise StateMismatchError(f"{target} is not a saved rlsedit editor state")
    if type(manifest.get("version")) is not int or manifest["version"] not in READABLE_VERSIONS:
        raise StateMismatchError(
            f"{target} was saved in state format version {manifest.get('version')}; this rlsedit reads "
            f"versions {list(READABLE_VERSIONS)}"
        )
    if manifest["version"] >= 3:
        if manifest.get("digest") != manifest_digest(manifest):
            raise StateMismatchError(f"{target / MANIFEST} does not match its checksum: it was changed or damaged "
                                     f"after saving; the save is unusable (restore it from a copy)")
    else:
        log.warning("%s is a version-%d save without a manifest checksum; its manifest is cross-checked only",
                    target, manifest["version"])
    return manifest


def read_state(directory: str | os.PathLike[str], model: torch.nn.Module) -> tuple[dict, str]:
    """Read a save and check it belongs to ``model``; return ``(state, mode)``.

    ``state`` is the editor state dict (plus ``edited_fingerprint``), checked field by field by
    :func:`~rlsedit_llm.editing.state_checks.validate_state`; ``mode`` is ``"base"`` when ``model``
    holds the pre-edit weights (the caller writes the saved ones) or ``"edited"`` when it already is
    the saved edited model.

    Raises
    ------
    PathError
        ``directory`` is not a path.
    StateMismatchError
        No (complete) save at ``directory``, a damaged or forged save, another architecture, or
        weights that are neither the saved base nor the saved edited model. Nothing is changed.
    StateLockedError
        The save is missing its folder while another process is in the middle of saving it.
    UnsupportedArchitectureError
        ``model`` is not a supported causal LM.
    """
    target = _resolve_save(state_path(directory))
    manifest = _checked_manifest(target)
    spec = detect_spec(model)
    mode = _model_mode(target, manifest, spec, model)
    state = read_state_files(target, manifest=manifest)
    try:
        validate_state(state, model, spec=spec)
    except StateMismatchError as exc:
        raise StateMismatchError(f"{target}: {exc}") from None
    return state, mode


def _checked_manifest(target: Path) -> dict:
    """The manifest of the save at ``target`` with every required field, and the tensor files
    listed in it present and matching their checksums."""
    manifest = read_manifest(target)
    missing = [k for k in _REQUIRED if k not in manifest]
    if missing:
        raise StateMismatchError(f"{target / MANIFEST} lacks {missing}; the save is damaged")
    files = manifest["files"]
    if not isinstance(files, dict) or set(files) != {SOLVERS, JOURNAL}:
        raise StateMismatchError(f"{target / MANIFEST} must list the checksums of {SOLVERS} and {JOURNAL}; "
                                 f"it lists {sorted(files) if isinstance(files, dict) else files!r}; "
                                 f"the save is damaged")
    for name, digest in files.items():
        if not (target / name).is_file() or sha256_file(target / name) != digest:
            raise StateMismatchError(f"{target / name} is missing or damaged (checksum mismatch); the save is unusable")
    return manifest


def _model_mode(target: Path, manifest: dict, spec, model) -> str:
    """``"base"`` or ``"edited"``: which of the save's two models ``model`` is (else refused)."""
    saved_spec = manifest["spec"]
    if spec_summary(spec) != saved_spec:
        if not isinstance(saved_spec, dict):
            raise StateMismatchError(f"{target / MANIFEST}: spec must be a mapping; the save is damaged or forged")
        raise StateMismatchError(
            f"the saved state is for a {saved_spec.get('family')} model with {saved_spec.get('n_layers')} layers and "
            f"edited matrices of shape ({saved_spec.get('d_k')}, {saved_spec.get('d_model')}); this model is a "
            f"{spec.family} with {spec.n_layers} layers and ({spec.d_k}, {spec.d_model})"
        )
    current = model_fingerprint(model)
    base, edited = manifest["base_fingerprint"], manifest["edited_fingerprint"]
    if not (isinstance(base, str) and isinstance(edited, str)):
        raise StateMismatchError(f"{target / MANIFEST}: the fingerprints must be strings; the save is damaged or "
                                 f"forged")
    if current == base:
        return "base"
    if current == edited:
        return "edited"
    raise StateMismatchError(
        f"this model's weights (fingerprint {current[:23]}...) match neither the base model the saved "
        f"edits were made on ({base[:23]}...) nor the saved edited model ({edited[:23]}...); load the "
        f"same pre-trained model (same weights and dtype) before loading the state"
    )


def read_state_files(directory: str | os.PathLike[str], *, manifest: dict | None = None) -> dict:
    """The editor state dict of the save at ``directory`` (as :meth:`rlsedit_llm.Editor.state_dict`
    returns it, plus ``edited_fingerprint``) without a model: the manifest's format and checksum,
    every tensor file against its checksum, a version-1 save migrated, the manifest cross-checked
    against the tensors. Nothing is checked against a model (:func:`read_state` does that).

    Raises :class:`StateMismatchError` for a missing, damaged or forged save."""
    target = _resolve_save(state_path(directory)) if manifest is None else Path(directory)
    if manifest is None:
        manifest = _checked_manifest(target)
    try:
        # Fresh copies: a loaded buffer can sit at another alignment than a computed one, and BLAS
        # kernels round differently then; the loaded editor must continue bitwise the same.
        solver_tensors = {k: t.clone() for k, t in load_file(target / SOLVERS).items()}
        journal_tensors = load_file(target / JOURNAL)
    except (OSError, SafetensorError) as exc:
        raise StateMismatchError(f"{target}: the tensor files cannot be read ({exc}); the save is damaged") from None
    try:
        if manifest["version"] == 1:
            manifest, solver_tensors = migrate_v1(manifest, solver_tensors)
            log.info("read a version-1 save from %s; the next save writes version %d", target, VERSION)
        manifest = _unpack(manifest, solver_tensors)
        check_consistency(manifest, solver_tensors, journal_tensors)
        _check_facts(target, manifest)
        return _join(manifest, solver_tensors, journal_tensors)
    except StateMismatchError as exc:
        raise StateMismatchError(f"{target}: {exc}") from None
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, RecursionError) as exc:
        raise StateMismatchError(f"{target}: the manifest is malformed ({exc!r}); the save is damaged") from None


_REQUIRED = ("config", "value_config", "spec", "layers", "templates", "next_id", "base_fingerprint",
             "edited_fingerprint", "solvers", "journal", "files")
