"""Edit packs: one safetensors file with the weight deltas ``W_t - W0`` of the edited layers and
metadata (base fingerprint, layers, facts). It turns a fresh copy of the base model into the
edited model without the recursion state (so it cannot be edited further or undone)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from rlsedit_llm.adapters.architectures import detect_spec, get_module, read_weight, write_weight
from rlsedit_llm.adapters.fingerprint import model_fingerprint
from rlsedit_llm.editing.state import _cpu_tensors, _package_version, spec_summary
from rlsedit_llm.errors import HyperparameterError, StateMismatchError
from rlsedit_llm.files import atomic_path

__all__ = ["write_edit_pack", "read_edit_pack_metadata", "apply_edit_pack", "PACK_FORMAT", "PACK_VERSION"]

log = logging.getLogger(__name__)

PACK_FORMAT = "rlsedit-edit-pack"
PACK_VERSION = 1


def write_edit_pack(path, deltas: dict[int, torch.Tensor], *, spec, base_fingerprint: str,
                    edited_fingerprint: str, edit_ids: list[int], facts: list[dict],
                    dtype: torch.dtype | None = None) -> Path:
    """Write the edited layers' weight deltas ``W_t - W0`` to one safetensors file, atomically.

    Parameters
    ----------
    path : file to write (conventionally ``*.safetensors``)
    deltas : layer -> (d_k, d_v) delta in row-key orientation
    dtype : dtype of the stored deltas; default the state dtype (float64), which reproduces the
        edited model exactly; float32/bfloat16 give a smaller, approximate pack.

    The metadata holds the base model's fingerprint (checked by :func:`apply_edit_pack`), the
    architecture, the layers, the edit ids and the facts.
    """
    path = Path(path)
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise HyperparameterError(f"dtype must be a torch floating dtype or None; got {dtype!r}")
    tensors = {f"layer{layer}": d if dtype is None else d.to(dtype) for layer, d in deltas.items()}
    metadata = {
        "format": PACK_FORMAT,
        "version": str(PACK_VERSION),
        "rlsedit_version": _package_version(),
        "base_fingerprint": base_fingerprint,
        "edited_fingerprint": edited_fingerprint,
        "spec": json.dumps(spec_summary(spec)),
        "layers": json.dumps(sorted(deltas)),
        "edit_ids": json.dumps(edit_ids),
        "facts": json.dumps(facts, ensure_ascii=False),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file(_cpu_tensors(tensors), tmp, metadata=metadata)
    log.info("wrote edit pack of %d edits (layers %s) to %s", len(edit_ids), sorted(deltas), path)
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
    if raw.get("version") != str(PACK_VERSION):
        raise StateMismatchError(f"{path} is edit pack version {raw.get('version')}; this rlsedit reads {PACK_VERSION}")
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
    if spec_summary(spec) != meta["spec"]:
        raise StateMismatchError(f"the edit pack is for a model with {meta['spec']}; this model has {spec_summary(spec)}")
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
