"""Edit packs: one safetensors file with the weight deltas ``W_t - W0`` of the edited layers and
metadata (base fingerprint, layers, facts). It turns a fresh copy of the base model into the
edited model without the recursion state (so it cannot be edited further or undone).

Packs are what users pass around, so they are checked before they touch a model. The metadata
carries a ``digest``: SHA-256 over every metadata field (the base model's fingerprint among them,
which binds the pack to its base model) and every tensor's name, dtype, shape and bytes. It
catches damage (a flipped bit, a truncated or mixed-up copy), not forgery: anyone can re-sign a
changed pack, which is why :func:`apply_edit_pack` also validates every field and every tensor
before the first write. Packs written before the digest existed (same format version) are still
applied, with a logged warning, after the same validation.

:func:`remove_edit_pack` is the exact inverse of :func:`apply_edit_pack`: it takes a model that
holds base + pack back to the base model's weights, bit for bit (checked by the base
fingerprint). ``W + delta`` rounded to the model's dtype loses the low bits of ``W`` where the
delta is comparable to the weight, so ``W_new - delta`` alone does not give ``W`` back (on tiny
random models 35-50 % of the entries differ in their last bits): the map is not one to one.
:func:`apply_edit_pack` therefore keeps with the model, on the CPU, the entries where it does not
(positions and base values, or the base weights of the edited layers when that is smaller), which
makes the removal exact. A model that got its pack elsewhere (loaded from disk as base + pack) is
restored from ``W_new - delta`` alone only when that reproduces the base fingerprint, and refused
otherwise (load the base model again).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from rlsedit_llm.adapters.fingerprint import model_fingerprint
from rlsedit_llm.adapters.spec import detect_spec, get_module, read_weight, write_weight
from rlsedit_llm.editing.guard import guard_of, refuse_foreign_owner, refuse_reentry
from rlsedit_llm.editing.state import cpu_tensors, package_version, spec_summary
from rlsedit_llm.errors import EditPackError, HyperparameterError, NonFiniteError, ShapeError, StateMismatchError
from rlsedit_llm.files import atomic_path
from rlsedit_llm.interrupts import deferred_interrupts

if TYPE_CHECKING:
    from rlsedit_llm.adapters.spec import ModelSpec

__all__ = ["write_edit_pack", "read_edit_pack_metadata", "apply_edit_pack", "remove_edit_pack", "pack_digest",
           "EditPackError", "PACK_FORMAT", "PACK_VERSION"]

log = logging.getLogger(__name__)

PACK_FORMAT = "rlsedit-edit-pack"
PACK_VERSION = 1  # the digest is an optional field of version 1: older readers ignore it

_DIGEST_DOMAIN = b"rlsedit-edit-pack-digest-v1\0"
_REQUIRED_FIELDS = frozenset({"format", "version", "rlsedit_version", "base_fingerprint", "edited_fingerprint",
                              "spec", "layers", "edit_ids", "facts"})
_OPTIONAL_FIELDS = frozenset({"digest"})
_SHA256 = re.compile(r"sha256:[0-9a-f]{64}")


def pack_digest(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """``"sha256:<hex>"`` over ``metadata`` (every field but ``digest``, sorted by name; the base
    model fingerprint is one of them) and every tensor's name, dtype, shape and raw bytes (sorted
    by name), each part length-delimited so that no two packs share a digest by concatenation."""
    h = hashlib.sha256(_DIGEST_DOMAIN)

    def part(data: bytes) -> None:
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)

    for key in sorted(metadata):
        if key != "digest":
            part(key.encode())
            part(str(metadata[key]).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        part(name.encode())
        part(f"{t.dtype}{tuple(t.shape)}".encode())
        raw = t.reshape(-1).view(torch.uint8).numpy()  # the bytes safetensors stores (little-endian)
        h.update(raw.nbytes.to_bytes(8, "little"))
        h.update(raw.data)  # the array's buffer (C-contiguous): the same bytes
    return "sha256:" + h.hexdigest()


def write_edit_pack(path: str | os.PathLike[str], deltas: dict[int, torch.Tensor], *, spec: ModelSpec,
                    base_fingerprint: str, edited_fingerprint: str, edit_ids: list[int], facts: list[dict],
                    dtype: torch.dtype | None = None) -> Path:
    """Write the edited layers' weight deltas ``W_t - W0`` to one safetensors file, atomically.

    Parameters
    ----------
    path : file to write (conventionally ``*.safetensors``)
    deltas : layer -> (d_k, d_v) delta in row-key orientation
    dtype : dtype of the stored deltas; default the state dtype (float64), which reproduces the
        edited model exactly; float32/bfloat16 give a smaller, approximate pack.

    The metadata holds the base model's fingerprint (checked by :func:`apply_edit_pack`), the
    architecture, the layers, the edit ids, the facts and the :func:`pack_digest` of it all.
    Raises :class:`NonFiniteError` (nothing written) for a delta that is not finite in ``dtype``.
    """
    path = Path(path)
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise HyperparameterError(f"dtype must be a torch floating dtype or None; got {dtype!r}")
    tensors = cpu_tensors({f"layer{layer}": d if dtype is None else d.to(dtype) for layer, d in deltas.items()})
    for name, t in tensors.items():
        if not (t.is_floating_point() and t.ndim == 2):
            raise ShapeError(
                f"{name}: a delta must be a 2-D floating-point tensor (d_k, d_v); got {t.dtype} {tuple(t.shape)}"
            )
        if not torch.isfinite(t).all():
            raise NonFiniteError(f"{name}: the delta holds NaN/inf in {t.dtype} (a narrower pack dtype overflows); "
                                 f"nothing was written; keep the default dtype")
    metadata = {
        "format": PACK_FORMAT,
        "version": str(PACK_VERSION),
        "rlsedit_version": package_version(),
        "base_fingerprint": base_fingerprint,
        "edited_fingerprint": edited_fingerprint,
        "spec": json.dumps(spec_summary(spec)),
        "layers": json.dumps(sorted(deltas)),
        "edit_ids": json.dumps(edit_ids),
        "facts": json.dumps(facts, ensure_ascii=False),
    }
    metadata["digest"] = pack_digest(tensors, metadata)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)
    log.info("wrote edit pack of %d edits (layers %s) to %s", len(edit_ids), sorted(deltas), path)
    return path


# --------------------------------------------------------------------------------------------
# Reading and validation
# --------------------------------------------------------------------------------------------
def _read_pack(path, *, with_tensors: bool) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """The raw metadata and (optionally) the tensors of the safetensors file ``path``."""
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = dict(f.metadata() or {})
            tensors = {name: f.get_tensor(name) for name in f.keys()} if with_tensors else {}
    except Exception as exc:  # safetensors raises its own errors (and OSError) for damaged files
        raise EditPackError(f"{path} is not a readable edit pack ({exc})") from None
    return raw, tensors


def _check_digest(raw: dict[str, str], tensors: dict[str, torch.Tensor], path) -> None:
    if "digest" not in raw:
        log.warning("edit pack %s carries no digest (written before packs were signed): its integrity cannot be "
                    "checked; every field and tensor is still validated before it is applied", path)
        return
    if pack_digest(tensors, raw) != raw["digest"]:
        raise EditPackError(
            f"{path}: the digest does not match the contents: the file was changed or damaged after it was written "
            f"(a flipped bit, a truncated or mixed-up copy). Nothing was applied; get an intact copy or export the "
            f"pack again (Editor.save_edit_pack)")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _decode_metadata(raw: dict[str, str], path) -> dict:
    """The metadata with its JSON fields decoded; :class:`EditPackError` for anything a pack
    written by :func:`write_edit_pack` would not hold."""
    def bad(why: str) -> NoReturn:
        raise EditPackError(f"{path} is not a valid edit pack: {why}; export it again (Editor.save_edit_pack)")

    if raw.get("format") != PACK_FORMAT:
        raise EditPackError(f"{path} is not an rlsedit edit pack (format {raw.get('format')!r})")
    if raw.get("version") != str(PACK_VERSION):
        raise EditPackError(f"{path} is edit pack version {raw.get('version')}; this rlsedit reads {PACK_VERSION}")
    unknown = sorted(set(raw) - _REQUIRED_FIELDS - _OPTIONAL_FIELDS)
    missing = sorted(_REQUIRED_FIELDS - set(raw))
    if unknown or missing:
        bad(f"unknown metadata fields {unknown}, missing {missing}")
    for key in ("base_fingerprint", "edited_fingerprint") + (("digest",) if "digest" in raw else ()):
        if not _SHA256.fullmatch(raw[key]):
            bad(f"{key} must be 'sha256:' and 64 hex digits; got {raw[key][:80]!r}")
    meta: dict = dict(raw)
    for key in ("spec", "layers", "edit_ids", "facts"):
        try:
            meta[key] = json.loads(raw[key])
        except (json.JSONDecodeError, RecursionError) as exc:
            bad(f"{key} is not JSON ({exc})")
    spec = meta["spec"]
    # The architecture's fields are compared with the model's own summary on apply; the layer
    # count is needed here to check the layer indices.
    if not (isinstance(spec, dict) and _is_int(spec.get("n_layers")) and spec["n_layers"] > 0):
        bad(f"spec must be an architecture summary with n_layers > 0; got {raw['spec'][:200]!r}")
    layers = meta["layers"]
    if not (isinstance(layers, list) and all(_is_int(l) and 0 <= l < spec["n_layers"] for l in layers)
            and layers == sorted(set(layers))):
        bad(f"layers must be distinct ascending layer indices in [0, {spec['n_layers']}); got {raw['layers'][:200]!r}")
    ids = meta["edit_ids"]
    if not (isinstance(ids, list) and all(_is_int(i) and i >= 0 for i in ids) and len(set(ids)) == len(ids)):
        bad(f"edit_ids must be distinct ints >= 0; got {raw['edit_ids'][:200]!r}")
    facts = meta["facts"]
    if not (isinstance(facts, list) and all(isinstance(f, dict) and all(isinstance(k, str) for k in f) for f in facts)):
        bad("facts must be a list of records (JSON objects)")
    meta["version"] = int(raw["version"])
    return meta


def read_edit_pack_metadata(path: str | os.PathLike[str]) -> dict:
    """The metadata of an edit pack, validated, with the JSON fields decoded.

    Reads the header only, so the digest is not checked here (:func:`apply_edit_pack` checks it).
    """
    raw, _ = _read_pack(path, with_tensors=False)
    return _decode_metadata(raw, path)


def _check_deltas(meta: dict, tensors: dict[str, torch.Tensor], before: dict[int, torch.Tensor], path) -> None:
    """Every delta: the names of the metadata's layers, floating point, the exact shape of the
    layer's weight, finite."""
    expected = {f"layer{l}" for l in meta["layers"]}
    if set(tensors) != expected:
        raise EditPackError(f"{path}: the tensors {sorted(tensors)} do not match the layers {meta['layers']} of its "
                            f"metadata; export the pack again")
    for layer, W in before.items():
        delta = tensors[f"layer{layer}"]
        if not delta.is_floating_point():
            raise EditPackError(f"{path}: the delta of layer {layer} is {delta.dtype}; deltas are floating point")
        if tuple(delta.shape) != tuple(W.shape):  # a (1, d_v) delta would broadcast to every row
            raise ShapeError(f"{path}: the delta of layer {layer} has shape {tuple(delta.shape)}; this model's weight "
                             f"is (d_k, d_v) = {tuple(W.shape)} (row-key orientation). The pack is not for this model")
        if not torch.isfinite(delta).all():
            raise NonFiniteError(f"{path}: the delta of layer {layer} holds NaN/inf; nothing was changed")


def _new_weights(meta: dict, tensors: dict[str, torch.Tensor], before: dict[int, torch.Tensor], path):
    """Per layer ``W + delta`` (added in float64) in the module's dtype, every delta and result
    checked first: names, dtype, exact shape, finite before and after the cast."""
    _check_deltas(meta, tensors, before, path)
    new = {}
    for layer, W in before.items():
        delta = tensors[f"layer{layer}"]
        W_new = (W.double() + delta.to(device=W.device, dtype=torch.float64)).to(W.dtype)
        if not torch.isfinite(W_new).all():
            raise NonFiniteError(f"{path}: layer {layer} would hold values beyond the range of the model's dtype "
                                 f"{W.dtype} after adding the delta; nothing was applied "
                                 f"(load the model in a wider dtype)")
        new[layer] = W_new
    return new


def _read_for(model: torch.nn.Module, path) -> tuple[dict[str, str], dict[str, torch.Tensor], dict, ModelSpec]:
    """The pack at ``path`` read and verified (digest, metadata) for ``model``, whose architecture
    must be the pack's: its raw metadata, tensors, decoded metadata and the model's spec."""
    raw, tensors = _read_pack(path, with_tensors=True)
    _check_digest(raw, tensors, path)
    meta = _decode_metadata(raw, path)
    spec = detect_spec(model)
    if spec_summary(spec) != meta["spec"]:
        raise StateMismatchError(
            f"the edit pack is for a model with {meta['spec']}; this model has {spec_summary(spec)}"
        )
    return raw, tensors, meta, spec


def apply_edit_pack(model: torch.nn.Module, path: str | os.PathLike[str]) -> dict:
    """Add the deltas of an edit pack to a fresh copy of the base model; return its metadata.

    Before anything is written: the digest is verified (a pack without one is accepted with a
    warning), every metadata field is validated (:class:`EditPackError`), the architecture and
    the base model's fingerprint are compared (:class:`StateMismatchError`), and every delta is
    checked: exact shape ``(d_k, d_v)`` of the layer's weight (:class:`ShapeError`), floating
    point, finite, and finite once added to the weights and cast to the model's dtype
    (:class:`NonFiniteError`). The deltas are added in float64 to the module's weights (in
    row-key orientation) and written back in the module's own dtype and orientation. All or
    nothing: on any failure the model is left as it was.
    """
    raw, tensors, meta, spec = _read_for(model, path)
    current = model_fingerprint(model)
    if current != meta["base_fingerprint"]:
        hint = ("the pack is already applied to this model" if current == meta["edited_fingerprint"] else
                "apply it to a fresh copy of the same pre-trained model (same weights and dtype)")
        raise StateMismatchError(
            f"this model's weights (fingerprint {current[:23]}...) are not the base model of the edit pack "
            f"({meta['base_fingerprint'][:23]}...): {hint}"
        )
    modules = {l: get_module(model, spec.edit_module_path.format(l)) for l in meta["layers"]}
    before = {l: read_weight(m) for l, m in modules.items()}
    new = _new_weights(meta, tensors, before, path)
    try:
        for layer, module in modules.items():
            write_weight(module, new[layer])
    except BaseException:
        for layer, W in before.items():
            write_weight(modules[layer], W)
        raise
    after = model_fingerprint(model)
    if after != meta["edited_fingerprint"]:
        log.warning("after applying %s the model differs from the packed edited model (a reduced-precision "
                    "pack, or rounding); the deltas were applied", path)
    _remember(model, raw.get("digest") or pack_digest(tensors, raw), after, tensors, before, new)
    return meta


# --------------------------------------------------------------------------------------------
# Removal: the exact inverse of apply_edit_pack
# --------------------------------------------------------------------------------------------
_APPLIED = "_rlsedit_applied_packs"  # on the model: pack digest -> what removing it needs


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}[t.element_size()])


def _subtracted(W: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``W - delta`` in float64, in ``W``'s dtype: the base weights, up to the rounding of the apply."""
    return (W.double() - delta.to(device=W.device, dtype=torch.float64)).to(W.dtype)


def _remember(model: torch.nn.Module, digest: str, after: str, tensors: dict[str, torch.Tensor],
              before: dict[int, torch.Tensor], new: dict[int, torch.Tensor]) -> None:
    """Keep with ``model`` (on the CPU) what :func:`remove_edit_pack` needs beyond the pack: per
    layer the positions where ``new - delta`` is not bitwise the base weight and the base values
    there, or the whole base weight when that is smaller (at most the size of the edited layers)."""
    fixes: dict[int, tuple[torch.Tensor | None, torch.Tensor]] = {}
    for layer, W in before.items():
        guess = _subtracted(new[layer], tensors[f"layer{layer}"]).reshape(-1)
        flat = W.reshape(-1)
        where = (_bits(guess) != _bits(flat)).nonzero().reshape(-1)
        if where.numel() * (4 + W.element_size()) < W.numel() * W.element_size():
            fixes[layer] = (where.to("cpu", torch.int32), flat[where].to("cpu"))
        else:
            fixes[layer] = (None, W.to("cpu"))
    records = model.__dict__.setdefault(_APPLIED, {})
    records[digest] = {"after": after, "fixes": fixes}


def _fixed(guess: torch.Tensor, fix: tuple[torch.Tensor | None, torch.Tensor]) -> torch.Tensor:
    """``guess`` (``W - delta``) with the recorded base values put back (:func:`_remember`)."""
    where, values = fix
    if where is None:
        return values.to(guess.device)
    guess.reshape(-1)[where.to(device=guess.device, dtype=torch.int64)] = values.to(guess.device)
    return guess


def remove_edit_pack(model: torch.nn.Module, path: str | os.PathLike[str]) -> dict:
    """Take the edit pack at ``path`` back out of ``model``: the exact inverse of
    :func:`apply_edit_pack`; return the pack's metadata.

    ``model`` must hold base + pack (its fingerprint is the pack's edited fingerprint, or what
    :func:`apply_edit_pack` made of it in this process). The pack is verified and validated as by
    :func:`apply_edit_pack`; the base weights are written back into the edited layers (in the
    module's dtype and orientation) and the result checked against the pack's base fingerprint.
    All or nothing, signals deferred, the model's lock held: on any failure the model keeps the
    weights it had.

    Raises
    ------
    EditPackError
        The pack is damaged or malformed.
    StateMismatchError
        Another architecture; the pack is not applied (the model is its base model); the model
        holds something other than base + pack; or its base weights cannot be recovered exactly
        (a model that got the pack elsewhere, where ``W - delta`` does not round back to the base:
        reload the base model instead).
    OwnershipError
        An editor owns the model and the model holds its state (release it first), or the call
        comes from inside an editor call on the model.
    ShapeError, NonFiniteError
        A delta does not fit the model, or the result would not be finite.
    """
    raw, tensors, meta, spec = _read_for(model, path)
    digest = raw.get("digest") or pack_digest(tensors, raw)
    guard = guard_of(model)
    with deferred_interrupts(), guard.lock:
        refuse_reentry(guard, "remove an edit pack")
        refuse_foreign_owner(guard, None, False, "remove an edit pack")
        record = model.__dict__.get(_APPLIED, {}).get(digest)
        current = model_fingerprint(model)
        if current != meta["edited_fingerprint"] and not (record is not None and current == record["after"]):
            if current == meta["base_fingerprint"]:
                why = "the pack is not applied: this model already is the pack's base model"
            else:
                why = ("this model does not hold the pack's base model plus the pack (another model, another pack, "
                       "or weights changed since it was applied)")
            raise StateMismatchError(f"cannot remove the edit pack {path}: {why} (fingerprint {current[:23]}...; "
                                     f"the pack's edited model is {meta['edited_fingerprint'][:23]}...); nothing "
                                     f"was changed")
        modules = {l: get_module(model, spec.edit_module_path.format(l)) for l in meta["layers"]}
        held = {l: read_weight(m) for l, m in modules.items()}
        _check_deltas(meta, tensors, held, path)  # the same checks of every delta as apply
        base = {}
        for layer, W in held.items():
            guess = _subtracted(W, tensors[f"layer{layer}"])
            if record is not None and layer in record["fixes"]:
                guess = _fixed(guess, record["fixes"][layer])
            if not torch.isfinite(guess).all():
                raise NonFiniteError(f"{path}: layer {layer} would hold NaN/inf once the delta is taken out; "
                                     f"nothing was changed")
            base[layer] = guess
        try:
            for layer, module in modules.items():
                write_weight(module, base[layer])
            if model_fingerprint(model) != meta["base_fingerprint"]:
                raise StateMismatchError(
                    f"cannot remove the edit pack {path} exactly: taking its deltas out of this model does not give "
                    f"back the base model bit for bit (the pack was applied to it elsewhere, and the rounding of "
                    f"the weights plus the deltas lost low bits of the base weights); nothing was changed. Load the "
                    f"base model again instead")
        except BaseException:
            for layer, W in held.items():
                write_weight(modules[layer], W)
            raise
        if record is not None:
            model.__dict__[_APPLIED].pop(digest, None)
    log.info("removed edit pack %s (layers %s) from the model", path, meta["layers"])
    return meta
