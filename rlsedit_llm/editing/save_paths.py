"""Where a save lives: the checked path of a save folder and the names of the files in it.

``directory`` must be a non-empty ``str`` or ``os.PathLike``; anything else (``None``, a number,
``""``) is refused with :class:`~rlsedit_llm.errors.PathError` before anything is read or written.
When ``directory`` is a symbolic link, the folder it points to is what is saved and read: a save
replaces that folder atomically and the link stays as it is (a link that leads in a loop is refused
with :class:`~rlsedit_llm.errors.PathError`).

What the files hold is :mod:`rlsedit_llm.editing.state`'s business; what lies beside the folder
(the lock file, the work folders of a save in progress) is :mod:`rlsedit_llm.editing.folder_lock`'s
and :mod:`rlsedit_llm.editing.folder_swap`'s.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from rlsedit_llm.errors import PathError

__all__ = ["JOURNAL", "MANIFEST", "SOLVERS", "state_path"]

log = logging.getLogger(__name__)

#: The files of a save folder (their contents: :mod:`rlsedit_llm.editing.state`). A folder with a
#: manifest is a complete save: the manifest is the last file written before the swap.
MANIFEST = "editor.json"
SOLVERS = "solvers.safetensors"
JOURNAL = "journal.safetensors"


def state_path(directory: str | os.PathLike[str], what: str = "the editor state folder") -> Path:
    """``directory`` as a :class:`Path` to save to or read from.

    Refused with :class:`PathError` unless a non-empty ``str`` or ``os.PathLike`` (``None``, numbers
    and bytes never reach the file system). A path without a last name (``"."``) is made
    absolute; a symbolic link is replaced by the folder it points to (see the module docstring)."""
    if isinstance(directory, (str, os.PathLike)):
        text = os.fspath(directory)
    else:
        text = None
    if not isinstance(text, str):
        raise PathError(f"{what} must be a path (str or os.PathLike); got {type(directory).__name__} "
                        f"{directory!r}")
    if not text.strip() or "\0" in text:
        raise PathError(f"{what} must be a non-empty path without NUL characters; got {text!r}")
    target = Path(text)
    if target.name in ("", ".", ".."):
        target = Path(os.path.abspath(target))
    if target.is_symlink():
        real = Path(os.path.realpath(target))
        if real.is_symlink() or not real.name:
            raise PathError(f"{target} is a symbolic link that leads in a loop (or to the root folder); "
                            f"point it at a folder, or pass the folder itself")
        log.debug("%s is a symbolic link: saving to and reading from %s", target, real)
        target = real
    if not target.name:
        raise PathError(f"{what} cannot be the root folder {target}; name a folder inside it")
    return target
