"""File-system plumbing shared by every layer: the shipped data folder, the user cache root,
durable atomic writes.

An atomic write leaves readers the old file or the whole new one, never a torn one, even across
a crash: the bytes go to a temporary sibling (same folder, so the rename stays on one file
system), the file is flushed and fsynced, ``os.replace`` puts it in place, and the folder is
fsynced so the rename itself survives a power loss.

    atomic_write_bytes(path, blob)
    atomic_write_text(path, json.dumps(meta))
    with atomic_path(path) as tmp:       # for writers that want a path (safetensors save_file)
        save_file(tensors, tmp)
"""

from __future__ import annotations

import hashlib
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["DATA_DIR", "cache_root", "atomic_path", "atomic_write_bytes", "atomic_write_text", "fsync_path",
           "sha256_file"]

#: ``rlsedit_llm/data``: the shipped corpus and evaluation files (licences in its README.md).
DATA_DIR = Path(__file__).resolve().parent / "data"


def cache_root() -> Path:
    """``$XDG_CACHE_HOME/rlsedit`` (``~/.cache/rlsedit`` when ``XDG_CACHE_HOME`` is unset or empty).

    Read at every call, so a changed environment variable takes effect at once."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "rlsedit"


def fsync_path(path: str | os.PathLike) -> None:
    """fsync a file or a folder by path; a no-op where the OS cannot (folders on Windows)."""
    path = Path(path)
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if path.is_dir() else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling path of ``path`` to write; on a clean exit it becomes ``path``.

    The caller writes the whole file at the yielded path (it does not exist yet); then it is
    fsynced, renamed over ``path`` and the folder fsynced. On an exception the temporary file is
    removed and ``path`` is untouched. Creates the parent folder if needed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A fresh random name, not created here: writers such as safetensors' save_file create it.
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
    fsync_path(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically and durably (see the module docstring)."""
    with atomic_path(path) as tmp:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # through the writing handle: fsync_path cannot on every OS


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    """Write ``text`` to ``path`` atomically and durably (see the module docstring)."""
    atomic_write_bytes(path, text.encode(encoding))


def sha256_file(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes (hex), read in 4 MiB blocks (a saved state can be many GB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()
