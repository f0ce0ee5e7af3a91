"""Key statistics in the MEMIT/ROME ``.npz`` layer-statistics format: read, validate, bind, write.

Users of MEMIT, AlphaEdit, EasyEdit and the RLSEdit authors' code already have these files, one
per edited module, named ``{module_path}_{precision}_mom2_{n_tokens}.npz`` (e.g.
``model.layers.4.mlp.down_proj_float32_mom2_100000.npz``) and holding ROME's ``SecondMoment``
state: ``mom2.mom2`` (the *sum* of ``k kᵀ`` over the tokens, ``(d_k, d_k)``) and ``mom2.count``
(the token count); a bare ``mom2`` / ``count`` pair is read too. The mean ``E[k kᵀ]`` is
``mom2 / count``.

A foreign file says nothing about which model it was computed on, so it is *bound* first:
:func:`bind_stats` validates every file of a folder against a model (shapes, count, dtype,
finite, symmetric positive semi-definite) and writes a sidecar ``rlsedit_stats.json`` with the
model's weights fingerprint and the files' SHA-256. :func:`load_stats` (what
``EditConfig(precomputed_stats=folder)`` uses) refuses a folder that is unbound, bound to other
weights, or changed since. :func:`export_stats` writes our statistics in the same format, bound.
"""

from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from rlsedit_llm.adapters.fingerprint import model_fingerprint
from rlsedit_llm.errors import NonFiniteError, ShapeError, StateMismatchError
from rlsedit_llm.files import atomic_write_bytes, atomic_write_text, sha256_file
from rlsedit_llm.pipeline.moments import MomentSum

if TYPE_CHECKING:
    from rlsedit_llm.adapters.spec import ModelSpec

__all__ = ["read_layer_stats", "write_layer_stats", "stats_file_name", "bind_stats", "load_stats", "export_stats"]

SIDECAR = "rlsedit_stats.json"
SIDECAR_FORMAT = "rlsedit-bound-stats-v1"


def stats_file_name(module_path: str, n_tokens: int, precision: str = "float32") -> str:
    """ROME's file name for the statistics of one module."""
    return f"{module_path}_{precision}_mom2_{n_tokens}.npz"


def read_layer_stats(path: str | os.PathLike[str], *, d_k: int) -> MomentSum:
    """One ROME/MEMIT ``.npz`` as a :class:`MomentSum`, validated for a layer of width ``d_k``.

    Raises :class:`ShapeError` (missing keys, wrong shape, count < 1, non-float data),
    :class:`NonFiniteError` (NaN/inf) or :class:`StateMismatchError` (not symmetric positive
    semi-definite: not a second moment)."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            keys = set(data.files)
            prefix = "mom2." if "mom2.mom2" in keys else ""
            if f"{prefix}mom2" not in keys or f"{prefix}count" not in keys:
                raise ShapeError(f"{path.name}: no ROME second moment in it (keys {sorted(keys)}); expected "
                                 "'mom2.mom2' and 'mom2.count'")
            total, count = data[f"{prefix}mom2"], data[f"{prefix}count"]
    except (OSError, ValueError) as exc:
        raise ShapeError(f"{path}: not a readable .npz file ({exc})") from None
    if total.shape != (d_k, d_k):
        raise ShapeError(f"{path.name}: a ({d_k}, {d_k}) second moment was expected for this layer; the file "
                         f"holds {total.shape}")
    if not np.issubdtype(total.dtype, np.floating):
        raise ShapeError(f"{path.name}: the second moment has dtype {total.dtype}; expected floats")
    if count.size != 1 or not np.issubdtype(count.dtype, np.number) or int(count) < 1 or int(count) != count:
        raise ShapeError(f"{path.name}: the token count must be one integer >= 1; got {count!r}")
    T = torch.from_numpy(np.asarray(total, dtype=np.float64))
    if not torch.isfinite(T).all():
        raise NonFiniteError(f"{path.name}: the second moment contains NaN or infinity")
    scale = float(T.abs().max()) or 1.0
    if float((T - T.mT).abs().max()) > 1e-5 * scale:
        raise StateMismatchError(f"{path.name}: the second moment is not symmetric; the file is damaged")
    T = (T + T.mT) / 2
    if float(torch.linalg.eigvalsh(T)[0]) < -1e-6 * scale:
        raise StateMismatchError(f"{path.name}: the second moment has a negative eigenvalue; not a sum of k k^T")
    return MomentSum(T, int(count))


def write_layer_stats(moment: MomentSum, path: str | os.PathLike[str], *, precision: str = "float32") -> Path:
    """Write ``moment`` as ROME's ``SecondMoment`` state (``mom2.mom2`` sum, ``mom2.count``), atomically."""
    buffer = io.BytesIO()
    arrays: dict[str, Any] = {"mom2.mom2": moment.total.detach().cpu().numpy().astype(precision),
                              "mom2.count": np.asarray(moment.count, dtype=np.int64)}
    np.savez(buffer, **arrays)
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)




def _files_by_layer(folder: Path, spec, layers) -> dict[int, Path]:
    """The ``.npz`` of each layer in ``folder``, found by ROME's naming of its module path."""
    found = {}
    for layer in layers:
        stem = re.escape(spec.edit_module_path.format(layer))
        hits = sorted(p for p in folder.glob("*.npz") if re.fullmatch(stem + r"_\w+_mom2_\d+\.npz", p.name))
        if len(hits) != 1:
            raise StateMismatchError(
                f"{folder}: expected one statistics file for layer {layer} named "
                f"{stats_file_name(spec.edit_module_path.format(layer), 100000)!r} (any precision and count); "
                f"found {[p.name for p in hits]}")
        found[layer] = hits[0]
    return found


def bind_stats(model: torch.nn.Module, spec: ModelSpec, layers: Iterable[int], folder: str | os.PathLike[str]) -> dict:
    """Validate the ``.npz`` files of ``layers`` in ``folder`` against ``model`` and bind them to its
    weights (the sidecar ``rlsedit_stats.json``). Only bind files computed on these weights."""
    folder = Path(folder)
    files = _files_by_layer(folder, spec, layers)
    entries = {}
    for layer, path in files.items():
        moment = read_layer_stats(path, d_k=spec.d_k)
        entries[str(layer)] = {"file": path.name, "sha256": sha256_file(path), "count": moment.count}
    sidecar = {"format": SIDECAR_FORMAT, "model_fingerprint": model_fingerprint(model), "layers": entries}
    atomic_write_text(folder / SIDECAR, json.dumps(sidecar, indent=1))
    return sidecar


def load_stats(model: torch.nn.Module, spec: ModelSpec, layers: Iterable[int], folder: str | os.PathLike[str], *,
               dtype: torch.dtype = torch.float64) -> dict[int, torch.Tensor]:
    """``E[k kᵀ]`` per layer from a folder bound to ``model`` by :func:`bind_stats` or
    :func:`export_stats`. Raises :class:`StateMismatchError` for an unbound folder, other weights,
    or files changed since binding."""
    folder = Path(folder)
    try:
        sidecar = json.loads((folder / SIDECAR).read_text())
    except (OSError, ValueError):
        raise StateMismatchError(
            f"{folder} has no readable {SIDECAR}: bind the statistics to this model first "
            f"(rlsedit_llm.pipeline.stats_npz.bind_stats(model, spec, layers, folder)), after checking that "
            f"they were computed on the same weights") from None
    if sidecar.get("format") != SIDECAR_FORMAT:
        raise StateMismatchError(f"{folder / SIDECAR} is not an rlsedit statistics binding")
    if sidecar.get("model_fingerprint") != model_fingerprint(model):
        raise StateMismatchError(f"the statistics in {folder} are bound to other weights than this model's; "
                                 f"compute or bind statistics for this model")
    means = {}
    for layer in layers:
        entry = sidecar.get("layers", {}).get(str(layer))
        if entry is None:
            raise StateMismatchError(f"{folder / SIDECAR} binds no statistics for layer {layer}")
        path = folder / entry["file"]
        if not path.is_file() or sha256_file(path) != entry["sha256"]:
            raise StateMismatchError(f"{path} is missing or changed since it was bound; bind it again")
        means[layer] = read_layer_stats(path, d_k=spec.d_k).mean().to(dtype)
    return means


def export_stats(model: torch.nn.Module, spec: ModelSpec, sums: dict[int, MomentSum], folder: str | os.PathLike[str], *,
                 precision: str = "float32") -> Path:
    """Write per-layer sums in ROME's format under ROME's file names, bound to ``model``."""
    folder = Path(folder)
    for layer, moment in sums.items():
        write_layer_stats(moment, folder / stats_file_name(spec.edit_module_path.format(layer), moment.count,
                                                           precision), precision=precision)
    bind_stats(model, spec, sorted(sums), folder)
    return folder
