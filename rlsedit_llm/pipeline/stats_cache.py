"""The on-disk cache of the key statistics: verified entries written atomically.

An entry ``<stem>`` is ``<stem>.safetensors`` plus a JSON sidecar ``<stem>.json`` holding the
key fields and the safetensors file's SHA-256; both are written with
:func:`~rlsedit_llm.files.atomic_write_bytes`. A file is used only if its sidecar names the same
key and format and its bytes hash to the recorded digest; anything else is ignored and logged.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load as _st_load
from safetensors.torch import save as _st_save

from rlsedit_llm.files import atomic_write_bytes, atomic_write_text, cache_root

__all__ = ["FORMAT", "default_stats_dir", "write_entry", "read_entry"]

logger = logging.getLogger(__name__)

FORMAT = 1  # bump when the meaning of a cached file changes


def default_stats_dir() -> Path:
    """``$XDG_CACHE_HOME/rlsedit/stats`` (or ``~/.cache/rlsedit/stats``)."""
    return cache_root() / "stats"


def write_entry(stem: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """``stem.safetensors`` then ``stem.json`` (which records the safetensors file's SHA-256)."""
    blob = _st_save(tensors, metadata={"key": meta["key"]})
    atomic_write_bytes(stem.with_suffix(".safetensors"), blob)
    meta = dict(meta, sha256=hashlib.sha256(blob).hexdigest(), format=FORMAT)
    atomic_write_text(stem.with_suffix(".json"), json.dumps(meta, indent=1, sort_keys=True))


def read_entry(stem: Path, key: str) -> tuple[dict[str, torch.Tensor], dict] | None:
    """The tensors and meta of a verified entry, or ``None`` (missing, stale or corrupt)."""
    meta_path, data_path = stem.with_suffix(".json"), stem.with_suffix(".safetensors")
    if not meta_path.exists() and not data_path.exists():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != FORMAT or meta.get("key") != key:
            raise ValueError("its JSON sidecar names another key or format")
        blob = data_path.read_bytes()
        if hashlib.sha256(blob).hexdigest() != meta.get("sha256"):
            raise ValueError("its bytes do not match the recorded SHA-256")
        tensors = _st_load(blob)
    except Exception as exc:  # any defect: never trust the file
        logger.warning("ignoring cache entry %s: %s", data_path, exc)
        return None
    return tensors, meta
