"""One writer per save folder: an OS-level lock beside the folder, with a ledger of work folders.

A save holds an exclusive OS lock (``fcntl.flock``; ``msvcrt.locking`` on Windows) on the file
``<dir>.rlsedit-lock`` next to the folder, without waiting: a second writer, in another process or
another thread, gets :class:`~rlsedit_llm.errors.StateLockedError` naming the holder's process id
and nothing is written. :func:`state_lock` takes the same lock for longer (``rlsedit edit`` holds it
from before loading the model until after the save); within the thread that holds it, a save or
load re-enters it. The lock is released when the block ends, by return or exception, and by the OS
when the holder is killed.

The lock file is also a ledger: the names of the work folders a save makes
(:mod:`rlsedit_llm.editing.folder_swap`) are recorded in it before they are created, so the folders
of a save that was killed are removed by the next holder of the same lock (taking the lock runs
:func:`~rlsedit_llm.editing.folder_swap.repair`). The lock file is removed on release; it stays only
when it records work folders still to remove (a killed save's, or one that could not be deleted).
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rlsedit_llm.editing import folder_swap
from rlsedit_llm.editing.save_paths import state_path
from rlsedit_llm.errors import StateLockedError, StateWriteError

fcntl: Any
msvcrt: Any
try:  # POSIX
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None
try:  # Windows
    import msvcrt
except ImportError:
    msvcrt = None

__all__ = ["LOCK_SUFFIX", "Hold", "locked", "state_lock"]

log = logging.getLogger(__name__)

LOCK_SUFFIX = ".rlsedit-lock"
LOCK_FORMAT = "rlsedit-state-lock"


class Hold:
    """This process's hold on the lock of one save folder.

    ``made``: the work folders this hold named (recorded in the lock file before each is created,
    so the next holder removes them if this process is killed); ``inherited``: what the lock file
    recorded when it was taken (a killed holder's folders)."""

    def __init__(self, target: Path, lock_file: Path, fd: int, inherited: list) -> None:
        self.target, self.lock_file, self.fd, self.inherited = target, lock_file, fd, inherited
        self.pid, self.thread, self.depth = os.getpid(), threading.get_ident(), 1
        self.made: list[str] = []

    def record(self, name: str) -> None:
        """Note a work folder before it is created."""
        self.made.append(name)
        self.write_ledger()

    def write_ledger(self) -> None:
        data = json.dumps({"format": LOCK_FORMAT, "pid": self.pid, "target": self.target.name,
                           "made": self.made}).encode("utf-8")
        try:
            os.lseek(self.fd, 0, os.SEEK_SET)
            os.ftruncate(self.fd, 0)
            view = memoryview(data)
            while view:
                view = view[os.write(self.fd, view):]
        except OSError as exc:  # the save itself can still succeed; only a crash's cleanup is lost
            log.warning("could not record the folders of this save in %s (%s); if this process is killed "
                        "during the save, remove %s.tmp-* yourself", self.lock_file, exc, self.target.name)


#: The locks this process holds, by folder: a save inside ``state_lock`` re-enters its own lock.
#: Not a cache: an entry lives exactly as long as the OS lock it stands for.
_HOLDS: dict[str, Hold] = {}
_HOLDS_GUARD = threading.Lock()


def _read_ledger(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        data = json.loads(os.read(fd, 1 << 20).decode("utf-8"))
    except (OSError, ValueError, RecursionError):
        return {}
    return data if isinstance(data, dict) and data.get("format") == LOCK_FORMAT else {}


def _try_lock(fd: int) -> bool:
    """Take the OS lock on ``fd`` without waiting; False when another process holds it."""
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True
    if msvcrt is not None:  # pragma: no cover - Windows
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    raise StateLockedError("this platform offers neither fcntl nor msvcrt file locks; rlsedit cannot make sure "
                           "that only one process writes a save folder")  # pragma: no cover


def _unlock(fd: int) -> None:
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_UN)
    elif msvcrt is not None:  # pragma: no cover - Windows
        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)


def _locked_message(target: Path, pid) -> str:
    who = f"process {pid}" if isinstance(pid, int) and not isinstance(pid, bool) else "another process"
    return (f"another process is editing or saving {target} ({who}; lock file {target.name}{LOCK_SUFFIX}); "
            f"wait for it to finish, or use another --state folder")


def _take_os_lock(target: Path) -> Hold:
    lock_file = target.parent / f"{target.name}{LOCK_SUFFIX}"
    for _ in range(100):
        try:
            fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            raise StateWriteError(f"cannot create the lock file {lock_file} ({exc.strerror or exc}); check that "
                                  f"you may write to {target.parent}") from exc
        try:
            if not _try_lock(fd):
                raise StateLockedError(_locked_message(target, _read_ledger(fd).get("pid")))
            try:
                current = os.path.samestat(os.fstat(fd), os.stat(lock_file))
            except FileNotFoundError:
                current = False
            if current:
                made = _read_ledger(fd).get("made")
                return Hold(target, lock_file, fd, made if isinstance(made, list) else [])
            # the previous holder removed this file after we opened it: lock the one now in place
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    raise StateLockedError(_locked_message(target, None))  # pragma: no cover - the file kept changing


def _acquire(target: Path) -> Hold:
    key = os.path.abspath(target)
    with _HOLDS_GUARD:
        hold = _HOLDS.get(key)
        if hold is not None and hold.pid == os.getpid():  # (a hold copied by fork is the parent's)
            if hold.thread != threading.get_ident():
                raise StateLockedError(f"another thread of this process (pid {hold.pid}) is editing or saving "
                                       f"{target}; wait for it to finish, or use another folder")
            hold.depth += 1
            try:  # returned from inside the try: an interrupt at the return takes the depth back
                return hold
            except BaseException:
                hold.depth -= 1
                raise
        hold = _take_os_lock(target)
        try:
            _HOLDS[key] = hold
        except BaseException:  # an interrupt right after the lock was taken: give it back
            try:
                _unlock(hold.fd)
            finally:
                os.close(hold.fd)
            raise
    try:
        folder_swap.repair(target, hold.inherited)
        hold.write_ledger()
        return hold  # inside the try: an interrupt at the return releases the lock
    except BaseException as exc:
        _release(hold)
        if isinstance(exc, OSError):
            raise StateWriteError(f"could not clean up what an interrupted save left beside {target} ({exc}); check "
                                  f"that you may write to {target.parent}") from exc
        raise


def _release(hold: Hold) -> None:
    if hold.pid != os.getpid():  # a forked child leaving a block it inherited: the lock is the parent's
        return
    with _HOLDS_GUARD:
        hold.depth -= 1
        if hold.depth > 0:
            return
        key = os.path.abspath(hold.target)
        if _HOLDS.get(key) is hold:
            del _HOLDS[key]
    left = [name for name in hold.made if os.path.lexists(hold.target.parent / name)]
    try:
        if left:  # could not be removed: the next holder tries again
            hold.made = left
            hold.write_ledger()
        elif fcntl is not None:
            os.unlink(hold.lock_file)  # while still locked: a waiter that opened it sees it replaced
    except OSError as exc:
        log.warning("could not remove the lock file %s (%s)", hold.lock_file, exc)
    finally:
        try:
            _unlock(hold.fd)
        finally:
            os.close(hold.fd)
    if fcntl is None and not left:  # pragma: no cover - Windows cannot delete an open file
        try:
            os.unlink(hold.lock_file)
        except OSError:
            pass


@contextmanager
def locked(target: Path) -> Iterator[Hold]:
    """Hold the lock of the (already checked) save folder ``target`` for a block; yield the :class:`Hold`."""
    hold = _acquire(target)
    try:
        yield hold
    finally:
        _release(hold)


@contextmanager
def state_lock(directory: str | os.PathLike[str]) -> Iterator[Path]:
    """Hold the one-writer lock of the save folder ``directory`` for a block; yield the folder.

    Raises :class:`StateLockedError` at once, without waiting, while another process (or another
    thread of this one) holds it; :class:`PathError` for a path that is not one. Saves and loads
    of the same folder in the same thread run inside the block. On entry, what a killed writer
    left is cleaned up (see the module docstring)::

        with state_lock(folder):
            editor = Editor.load(model, tok, folder)
            editor.edit(facts)
            editor.save(folder)
    """
    target = state_path(directory)
    if not target.parent.is_dir():
        target.parent.mkdir(parents=True, exist_ok=True)
    with locked(target):
        yield target

