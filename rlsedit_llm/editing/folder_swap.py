"""Replacing a save folder atomically and durably, and repairing what a killed save left.

Everything is written into a temporary sibling ``<dir>.tmp-XXXXXXXX`` (:func:`make_work_folder`);
once every file and the folder are fsynced, :func:`swap_in` makes it ``<dir>``:

- on Linux, with ``renameat2(RENAME_EXCHANGE)``, which exchanges the two folders in one step, so
  at every instant ``<dir>`` is either the old complete save or the new complete save;
- elsewhere (or on file systems without the exchange), by two renames: ``<dir>`` to
  ``<dir>.old-XXXXXXXX``, then the new folder to ``<dir>``. Before the first rename the marker
  ``<dir>.swap-intent`` records both names; the previous save is deleted, and then the marker,
  right after the second rename.

Only this code's own folders are removed. A save deletes the temporary and old folders it made
itself. The names of those folders are recorded in the lock file
(:mod:`rlsedit_llm.editing.folder_lock`) before they are created, so the folders of a save that was
killed are removed by the next writer of the same folder; any other ``<dir>.tmp-*`` or
``<dir>.old-*`` (a user's backup, or what an older rlsedit left) is left alone
(:func:`log_foreign_leftovers` mentions them).

Recovery of an interrupted swap (:func:`repair`, run under the lock by whoever takes it next). When
``<dir>`` is missing and the marker's two recorded folders both exist (the state between the two
renames), the old, complete save is renamed back to ``<dir>`` (with a warning) and the new copy
removed. Any other marker is stale: it is removed and nothing is restored, so a folder deleted on
purpose stays deleted (a complete ``<dir>.old-*`` is then left in place); when ``<dir>`` exists,
the work folders a stale marker names are removed.
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import re
import secrets
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from rlsedit_llm.editing.save_paths import MANIFEST
from rlsedit_llm.files import fsync_path

if TYPE_CHECKING:
    from rlsedit_llm.editing.folder_lock import Hold

__all__ = ["discard", "intent_path", "log_foreign_leftovers", "make_work_folder", "repair", "swap_in",
           "write_durably"]

log = logging.getLogger(__name__)

INTENT_FORMAT = "rlsedit-swap-intent"


#: Names this module gives the folders of a save in progress (8 characters: ``secrets.token_hex(4)``
#: now, ``tempfile.mkdtemp`` before): only folders named so, and recorded as ours, are ever removed.
_WORK_SUFFIX = re.compile(r"\.(?:tmp|old)-[a-z0-9_]{8}")


def _is_work_name(target: Path, name) -> bool:
    return (isinstance(name, str) and name.startswith(target.name)
            and _WORK_SUFFIX.fullmatch(name[len(target.name):]) is not None)


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


def intent_path(target: Path) -> Path:
    """The marker a two-rename swap writes first: only then may ``<dir>.old-*`` be recovered."""
    return target.parent / f"{target.name}.swap-intent"


def _intent_names(target: Path) -> tuple[str | None, str | None]:
    """The old and new folder names a marker records (None for what is unreadable or not ours)."""
    try:
        data = json.loads(intent_path(target).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None, None
    if not isinstance(data, dict):
        return None, None
    old, new = (n if _is_work_name(target, n) else None for n in (data.get("old"), data.get("new")))
    return old, new


def write_durably(path: Path, data: bytes) -> None:
    """Create ``path`` with ``data`` and fsync it (through the writing handle)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def discard(path: Path) -> bool:
    """Remove a work folder; a failure is logged, not raised (nothing depends on it any more)."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("could not remove %s (%s); the next save of %s tries again", path, exc,
                    path.name.rsplit(".", 1)[0])
        return False
    return True


def swap_in(tmp: Path, target: Path, hold: Hold | None = None) -> None:
    """Make the complete folder ``tmp`` the folder ``target`` (see the module docstring).

    Every step that must survive a power loss is followed by an fsync of the parent folder
    before the next step can destroy anything (the previous save is removed only once the new
    one is durably in place). Raises OSError only while the previous save is still ``target``
    (or, if the process dies, recoverable from the marker)."""
    parent = target.parent
    if not target.exists():
        os.rename(tmp, target)
        fsync_path(parent)
    elif _exchange(tmp, target):
        fsync_path(parent)  # the exchange is durable before the previous save is deleted
        discard(tmp)  # now the previous save
        fsync_path(parent)
    else:
        old = parent / f"{target.name}.old-{secrets.token_hex(4)}"
        if hold is not None:
            hold.record(old.name)
        intent = intent_path(target)
        with open(intent, "w", encoding="utf-8") as f:  # recorded before anything moves
            json.dump({"format": INTENT_FORMAT, "old": old.name, "new": tmp.name}, f)
            f.flush()
            os.fsync(f.fileno())
        fsync_path(parent)
        os.rename(target, old)  # from here until the next rename, only `old` is complete
        fsync_path(parent)
        try:
            os.rename(tmp, target)
        except OSError:
            os.rename(old, target)  # the previous save back in place before the error is reported
            fsync_path(parent)
            intent.unlink()
            fsync_path(parent)
            raise
        fsync_path(parent)
        # The previous save goes before the marker: a marker left by a crash from here on names an
        # old folder that is gone or being deleted, never one a load could bring back.
        discard(old)
        fsync_path(parent)
        intent.unlink()
        fsync_path(parent)


def repair(target: Path, inherited: list) -> None:
    """Under the lock: finish what a killed writer left. Recover an interrupted two-rename swap,
    drop a stale marker, remove the work folders recorded as ours (never a complete save while
    ``target`` is missing)."""
    parent = target.parent
    ours = {name for name in inherited if _is_work_name(target, name)}
    intent = intent_path(target)
    if os.path.lexists(intent):
        old, new = _intent_names(target)
        if (old and new and not os.path.lexists(target) and (parent / old / MANIFEST).is_file()
                and (parent / new).is_dir()):
            os.rename(parent / old, target)
            fsync_path(parent)
            log.warning("recovered the previous complete save of %s from %s: a save was interrupted between its "
                        "two renames (recorded in %s)", target, old, intent.name)
        elif not os.path.lexists(target):
            log.warning("removed the stale marker %s: it does not record the swap that stopped between its two "
                        "renames (the old and new folders it names do not both exist); nothing was restored",
                        intent.name)
        ours |= {name for name in (old, new) if name}
        intent.unlink()
        fsync_path(parent)
    removed = False
    for name in sorted(ours):
        path = parent / name
        if not os.path.lexists(path):
            continue
        if not os.path.lexists(target) and (path / MANIFEST).is_file():
            log.warning("left %s in place: it holds a complete earlier save and %s does not exist; rename it to "
                        "%s if you want it back", path, target, target.name)
            continue
        removed |= discard(path)
    if removed:
        fsync_path(parent)


def make_work_folder(target: Path, hold: Hold) -> Path:
    """A new empty ``<dir>.tmp-XXXXXXXX``, recorded in the lock file before it exists."""
    for _ in range(100):
        tmp = target.parent / f"{target.name}.tmp-{secrets.token_hex(4)}"
        if os.path.lexists(tmp):
            continue
        hold.record(tmp.name)
        try:
            os.mkdir(tmp, 0o700)
        except FileExistsError:  # made by someone else since the check: not ours to remove later
            hold.made.remove(tmp.name)
            continue
        try:  # returned from inside the try: an interrupt at the return removes the new folder
            return tmp
        except BaseException:
            discard(tmp)
            raise
    raise FileExistsError(f"could not find a free temporary folder name beside {target}")  # pragma: no cover


def log_foreign_leftovers(target: Path, hold: Hold) -> None:
    """Mention work-folder-like siblings this code did not make: they are never removed."""
    mine = set(hold.made)
    foreign = sorted(p.name for p in target.parent.iterdir()
                     if p.name.startswith((f"{target.name}.tmp-", f"{target.name}.old-")) and p.name not in mine)
    if foreign:
        log.info("left %s beside %s alone: not made by this save (a crashed save of an older rlsedit, or your "
                 "own); delete it yourself if you do not need it", ", ".join(foreign), target)
