"""Nothing lost on a second process, a full disk, a symbolic link, a stale marker or a forged save:
one writer per state folder (an OS lock, checked with real processes), only a save's own folders
removed, typed errors for write failures and for paths that are not paths, and every field of a
loaded save checked as if forged (the model stays bit-identical when one is refused)."""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import rlsedit_llm
from rlsedit_llm import cli
from rlsedit_llm.adapters.tiny import tiny_model
from rlsedit_llm.editing import folder_lock, folder_swap
from rlsedit_llm.editing import state as state_mod
from rlsedit_llm.editing.editor import Editor
from rlsedit_llm.editing.folder_lock import state_lock
from rlsedit_llm.errors import (
    PathError,
    RLSEditError,
    StateLockedError,
    StateMismatchError,
    StateWriteError,
)
from rlsedit_llm.files import sha256_file

from .conftest import assert_same_params, params

ROOT = Path(__file__).resolve().parents[2]
LOCK = folder_lock.LOCK_SUFFIX

# A second process holding the lock of the folder argv[1] until its stdin closes.
HOLDER = """
import sys
from rlsedit_llm.editing.folder_lock import state_lock
with state_lock(sys.argv[1]):
    print("locked", flush=True)
    sys.stdin.read()
"""
# A second process trying the lock of the folder argv[1] once.
PROBE = """
import sys
from rlsedit_llm.editing.folder_lock import state_lock
from rlsedit_llm.errors import StateLockedError
try:
    with state_lock(sys.argv[1]):
        print("acquired")
except StateLockedError as exc:
    print("locked:", exc)
"""


def _python(code: str, *args, **kw):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


@contextmanager
def _held_by_another_process(directory):
    proc = _python(HOLDER, directory, stdin=subprocess.PIPE)
    try:
        line = proc.stdout.readline()
        assert line.strip() == "locked", proc.stderr.read()
        yield proc
    finally:
        if proc.poll() is None:
            proc.stdin.close()
            proc.wait(60)


def _probe(directory) -> str:
    """What another process gets when it tries the lock now: "acquired" or "locked: <message>"."""
    proc = _python(PROBE, directory)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    return out.strip()


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def _fork_context():
    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("needs the fork start method")
    return multiprocessing.get_context("fork")


def _run_in_child(target, *args) -> int:
    proc = _fork_context().Process(target=target, args=args)
    proc.start()
    proc.join(120)
    return proc.exitcode


@pytest.fixture
def save_copy(saved, tmp_path):
    editor, directory = saved
    shutil.copytree(directory, tmp_path / "s")
    return editor, tmp_path / "s"


# =============================================================================================
# One writer per folder
# =============================================================================================
def test_a_second_process_cannot_save_while_one_holds_the_lock(save_copy):
    editor, directory = save_copy
    before = _files(directory)
    with _held_by_another_process(directory) as holder:
        with pytest.raises(StateLockedError, match=f"another process is editing or saving .*process {holder.pid}"):
            editor.save(directory)
        assert _files(directory) == before  # nothing written
        assert sorted(p.name for p in directory.parent.iterdir()) == ["s", "s" + LOCK]
    editor.save(directory)  # free again once the holder ended
    assert sorted(p.name for p in directory.parent.iterdir()) == ["s"]


def _cli_args(state: Path, facts: Path) -> list[str]:
    return ["edit", "--model", "tiny", "--state", str(state), "--facts", str(facts), "--alpha", "0.001",
            "--mom2-weight", "1", "--stats-tokens", "2000", "--batch", "1"]


def _facts_file(tmp_path: Path) -> Path:
    path = tmp_path / "facts.jsonl"
    path.write_text(json.dumps({"prompt": "we saw {}", "subject": "the old cat", "target": "paris"}))
    return path


def test_the_cli_refuses_a_second_edit_of_one_state_folder_before_loading_the_model(tmp_path, monkeypatch, capsys):
    loads = []
    monkeypatch.setattr(rlsedit_llm, "load_model", lambda name, **kw: loads.append(name) or tiny_model("llama"))
    state = tmp_path / "state"
    with _held_by_another_process(state) as holder:
        assert cli.main(_cli_args(state, _facts_file(tmp_path))) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: another process is editing or saving {state} (process {holder.pid};")
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert loads == [] and not state.exists()


def test_the_cli_holds_the_lock_from_loading_the_model_until_the_save(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    state = tmp_path / "state"
    seen = {}

    def load_model(name, **kw):
        seen["at load"] = _probe(state)
        return tiny_model("llama", init_std=0.3)

    real_save = Editor.save

    def save(self, directory):
        seen["at save"] = _probe(state)
        return real_save(self, directory)

    monkeypatch.setattr(rlsedit_llm, "load_model", load_model)
    monkeypatch.setattr(Editor, "save", save)
    assert cli.main(_cli_args(state, _facts_file(tmp_path))) == 0, capsys.readouterr().err
    assert seen["at load"].startswith("locked: another process") and seen["at save"].startswith("locked:")
    assert (state / "editor.json").is_file()
    assert _probe(state) == "acquired"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "facts.jsonl", "state"]


def test_the_lock_is_released_after_a_normal_end_and_after_an_exception(tmp_path):
    folder = tmp_path / "s"
    with state_lock(folder) as target:
        assert target == folder
        assert _probe(folder).startswith("locked:")
    assert _probe(folder) == "acquired"
    with pytest.raises(KeyError), state_lock(folder):
        raise KeyError("boom")
    assert _probe(folder) == "acquired"
    assert list(tmp_path.iterdir()) == []  # no lock file left behind


def test_a_killed_holder_does_not_block_the_next_writer(save_copy):
    editor, directory = save_copy
    with _held_by_another_process(directory) as holder:
        holder.send_signal(signal.SIGKILL)
        holder.wait(60)
        assert (directory.parent / ("s" + LOCK)).exists()  # its lock file is still there, unlocked
        editor.save(directory)
    assert sorted(p.name for p in directory.parent.iterdir()) == ["s"]
    Editor.load(*tiny_model("llama"), directory)


def test_another_thread_is_refused_and_the_holding_thread_reenters(save_copy):
    editor, directory = save_copy
    errors = []

    def other_thread():
        try:
            editor.save(directory)
        except RLSEditError as exc:
            errors.append(exc)

    with state_lock(directory):
        editor.save(directory)  # the thread that holds the lock saves inside it
        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join(120)
    assert len(errors) == 1 and isinstance(errors[0], StateLockedError)
    assert "another thread of this process" in str(errors[0])


# =============================================================================================
# Only a save's own folders are removed
# =============================================================================================
@pytest.mark.parametrize("use_exchange", [True, False], ids=["exchange", "two-renames"])
def test_a_save_never_removes_a_users_folders_beside_it(saved, tmp_path, monkeypatch, use_exchange):
    editor, directory = saved
    if not use_exchange:
        monkeypatch.setattr(folder_swap, "_exchange", lambda a, b: False)
    backup = tmp_path / "s.old-backup"
    backup.mkdir()
    (backup / "notes.txt").write_text("keep me")
    (tmp_path / "s.tmp-mine").mkdir()
    lookalike = tmp_path / "s.old-abcd1234"  # named like this code's folders, but no save recorded it
    shutil.copytree(directory, lookalike)
    editor.save(tmp_path / "s")  # a first save
    editor.save(tmp_path / "s")  # and one that replaces it
    assert (backup / "notes.txt").read_text() == "keep me"
    assert (tmp_path / "s.tmp-mine").is_dir() and (lookalike / "editor.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s", "s.old-abcd1234", "s.old-backup", "s.tmp-mine"]


def _save_and_die_after_the_first_file(editor, directory):
    torch.set_num_threads(1)  # a forked child must not reuse the parent's OpenMP pool
    real = state_mod.save_file

    def save_file(tensors, path, metadata=None):
        real(tensors, path, metadata=metadata)
        os.kill(os.getpid(), signal.SIGKILL)

    state_mod.save_file = save_file
    editor.save(directory)


def test_the_folders_of_a_killed_save_are_removed_by_the_next_save_and_nothing_else(save_copy):
    editor, directory = save_copy
    parent = directory.parent
    users = parent / "s.tmp-12345678"  # the user's, though named like a work folder
    users.mkdir()
    assert _run_in_child(_save_and_die_after_the_first_file, editor, directory) == -signal.SIGKILL
    left = sorted(p.name for p in parent.iterdir() if p.name not in ("s", users.name))
    assert len(left) == 2 and left[0] == "s" + LOCK and left[1].startswith("s.tmp-"), left
    editor.save(directory)
    assert sorted(p.name for p in parent.iterdir()) == ["s", users.name]


@pytest.mark.parametrize("use_exchange", [True, False], ids=["exchange", "two-renames"])
def test_a_failure_to_delete_the_previous_save_after_the_swap_is_only_logged(save_copy, monkeypatch, caplog,
                                                                              use_exchange):
    editor, directory = save_copy
    if not use_exchange:
        monkeypatch.setattr(folder_swap, "_exchange", lambda a, b: False)

    def rmtree(path, *args, **kwargs):
        raise PermissionError(errno.EACCES, "simulated", str(path))

    with monkeypatch.context() as patch, caplog.at_level("WARNING"):
        patch.setattr(folder_swap.shutil, "rmtree", rmtree)
        editor.save(directory)  # the new save is in place: no error
    assert "could not remove" in caplog.text
    left = {p.name for p in directory.parent.iterdir()} - {"s", "s" + LOCK}  # the lock file records the leftover
    assert (directory.parent / ("s" + LOCK)).is_file()
    assert len(left) == 1 and left.pop().startswith(("s.tmp-", "s.old-"))
    Editor.load(*tiny_model("llama"), directory)
    editor.save(directory)  # the next save removes the previous one's leftover
    assert sorted(p.name for p in directory.parent.iterdir()) == ["s"]


# =============================================================================================
# A full disk
# =============================================================================================
def _enospc_safetensors(tensors, path, metadata=None):
    raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                          'message: "No space left on device" })')


def _enospc_write(fd, data):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("where", ["safetensors", "manifest"])
def test_a_full_disk_raises_a_typed_error_and_keeps_the_previous_save(save_copy, monkeypatch, where):
    editor, directory = save_copy
    before = _files(directory)
    with monkeypatch.context() as patch:
        if where == "safetensors":
            patch.setattr(state_mod, "save_file", _enospc_safetensors)
        else:
            patch.setattr(os, "write", _enospc_write)
        with pytest.raises(StateWriteError, match="free space on the disk") as info:
            editor.save(directory)
    assert isinstance(info.value, OSError) and info.value.errno == errno.ENOSPC
    assert str(directory) in str(info.value) and "previous save" in str(info.value)
    assert _files(directory) == before
    assert sorted(p.name for p in directory.parent.iterdir()) == ["s"]  # temporary folder and lock removed
    Editor.load(*tiny_model("llama"), directory)


def test_the_cli_reports_a_full_disk_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(rlsedit_llm, "load_model", lambda name, **kw: tiny_model("llama", init_std=0.3))
    monkeypatch.setattr(state_mod, "save_file", _enospc_safetensors)
    state = tmp_path / "state"
    assert cli.main(_cli_args(state, _facts_file(tmp_path))) == 1
    err = capsys.readouterr().err
    # not the progress bar
    lines = [line for line in err.splitlines() if line.strip() and "key statistics" not in line]
    assert len(lines) == 1 and "Traceback" not in err
    assert lines[0].startswith(f"error: could not write the editor state to {state}") and "free space" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "facts.jsonl"]


# =============================================================================================
# Symbolic links
# =============================================================================================
@pytest.mark.parametrize("use_exchange", [True, False], ids=["exchange", "two-renames"])
def test_a_save_through_a_symbolic_link_replaces_the_folder_it_points_to(saved, tmp_path, monkeypatch, use_exchange):
    editor, directory = saved
    real, link = tmp_path / "real", tmp_path / "link"
    shutil.copytree(directory, real)
    link.symlink_to(real, target_is_directory=True)
    other = Editor.load(tiny_model("llama")[0], editor.tokenizer, link)  # read through the link
    other.undo(0)
    if not use_exchange:
        monkeypatch.setattr(folder_swap, "_exchange", lambda a, b: False)
    other.save(link)
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]
    for path in (link, real):
        loaded = Editor.load(tiny_model("llama")[0], editor.tokenizer, path)
        assert [r.edit_id for r in loaded.journal_] == [1]


def test_a_symbolic_link_loop_is_refused_before_anything_is_written(saved, tmp_path):
    editor, _ = saved
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    with pytest.raises(PathError, match="loop"):
        editor.save(tmp_path / "a")
    with pytest.raises(PathError, match="loop"):
        Editor.load(*tiny_model("llama"), tmp_path / "a")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"] and (tmp_path / "a").is_symlink()


# =============================================================================================
# The swap-intent marker
# =============================================================================================
def _save_and_die_right_after_the_swap(editor, directory):
    """Child: save by two renames and die right after the new save was renamed into place."""
    torch.set_num_threads(1)
    real_rename = os.rename

    def rename(a, b):
        real_rename(a, b)
        if str(b) == str(directory):
            os.kill(os.getpid(), signal.SIGKILL)

    folder_swap._exchange = lambda a, b: False
    os.rename = rename
    editor.save(directory)


def test_a_folder_deleted_after_a_completed_swap_stays_deleted(save_copy):
    editor, directory = save_copy
    assert _run_in_child(_save_and_die_right_after_the_swap, editor, directory) == -signal.SIGKILL
    marker = directory.parent / "s.swap-intent"
    assert marker.exists() and (directory / "editor.json").is_file()  # the swap completed; its marker remains
    shutil.rmtree(directory)  # the user deletes the save on purpose
    with pytest.raises(StateMismatchError, match="no saved editor state"):
        Editor.load(*tiny_model("llama"), directory)
    assert not directory.exists() and not marker.exists()
    kept = [p for p in directory.parent.iterdir() if p.name.startswith("s.old-")]
    assert len(kept) == 1 and (kept[0] / "editor.json").is_file()  # left for the user, not brought back
    with pytest.raises(StateMismatchError, match="no saved editor state"):  # and it stays deleted
        Editor.load(*tiny_model("llama"), directory)


def test_a_stale_marker_is_dropped_and_only_the_folders_it_names_are_removed(save_copy):
    editor, directory = save_copy
    parent = directory.parent
    shutil.copytree(directory, parent / "s.old-abcd1234")  # the previous save of the completed swap
    (parent / "s.old-backup").mkdir()
    (parent / "s.swap-intent").write_text(json.dumps({"old": "s.old-abcd1234", "new": "s.tmp-abcd5678"}))
    editor.save(directory)
    assert sorted(p.name for p in parent.iterdir()) == ["s", "s.old-backup"]
    # a marker naming a folder this code never makes: the folder is not touched
    (parent / "s.swap-intent").write_text(json.dumps({"old": "s.old-backup", "new": "s.tmp-abcd5678"}))
    editor.save(directory)
    assert sorted(p.name for p in parent.iterdir()) == ["s", "s.old-backup"]


def test_an_interrupted_swap_with_both_folders_is_recovered(saved, tmp_path, caplog):
    editor, directory = saved
    shutil.copytree(directory, tmp_path / "s.old-abcd1234")  # the previous save, moved away
    newer = Editor.load(tiny_model("llama")[0], editor.tokenizer, directory)
    newer.undo(0)
    newer.save(tmp_path / "s.tmp-abcd5678")  # the complete new save, not yet renamed into place
    (tmp_path / "s.swap-intent").write_text(json.dumps({"old": "s.old-abcd1234", "new": "s.tmp-abcd5678"}))
    with caplog.at_level("WARNING"):
        loaded = Editor.load(tiny_model("llama")[0], editor.tokenizer, tmp_path / "s")
    assert [r.edit_id for r in loaded.journal_] == [0, 1]  # the previous complete save
    assert "interrupted" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]


# =============================================================================================
# Forged fields: refused on load, the model untouched
# =============================================================================================
def _forge(src: Path, dst: Path, *, manifest=None, solvers=None, journal=None) -> Path:
    """A copy of the save with a field changed and every checksum recomputed, so that only the
    field checks can refuse it."""
    shutil.copytree(src, dst)
    meta = json.loads((dst / "editor.json").read_text())
    for name, change in (("solvers.safetensors", solvers), ("journal.safetensors", journal)):
        if change is not None:
            tensors = {k: v.clone() for k, v in load_file(dst / name).items()}
            change(tensors)
            save_file(tensors, dst / name, metadata={"format": state_mod.FORMAT})
            meta["files"][name] = sha256_file(dst / name)
    if manifest is not None:
        manifest(meta)
    meta["digest"] = state_mod.manifest_digest(meta)
    (dst / "editor.json").write_text(json.dumps(meta))
    return dst


def _every_layer(name, change):
    def apply(tensors):
        for key in [k for k in tensors if k.endswith(f".{name}")]:
            tensors[key] = change(tensors[key])
    return apply


def _set_entry(index, value):
    def apply(t):
        t = t.clone()
        t[index] = value
        return t
    return apply


def _value_config(**fields):
    return lambda m: m["value_config"].update(fields)


def _scalars(**fields):
    return lambda m: [s["scalars"].update(fields) for s in m["solvers"].values()]


FORGERIES = {
    # solver tensors
    "C too small": {"solvers": _every_layer("C", lambda t: t[:-1].contiguous())},
    "C with NaN": {"solvers": _every_layer("C", _set_entry((0, 0), float("nan")))},
    "C as float32": {"solvers": _every_layer("C", lambda t: t.float())},
    "C missing": {"solvers": lambda ts: [ts.pop(k) for k in [k for k in ts if k.endswith(".C")]]},
    "W with infinity": {"solvers": _every_layer("W", _set_entry((1, 1), float("inf")))},
    "anchor Gram not square": {"solvers": _every_layer("gram0", lambda t: torch.cat([t, t[:, :1]], 1))},
    "unknown tensor": {"solvers": lambda ts: ts.__setitem__("layer0.Evil", torch.zeros(2, 2, dtype=torch.float64))},
    # journal tensors
    "journal keys with NaN": {"journal": _every_layer("K", _set_entry((0, 0), float("nan")))},
    "journal values as ints": {"journal": _every_layer("V", lambda t: t.long())},
    # solver scalars and dtype
    "n_updates negative": {"manifest": _scalars(n_updates=-3)},
    "n_updates a string": {"manifest": _scalars(n_updates="2")},
    "unknown scalar": {"manifest": _scalars(evil=1.0)},
    "solver dtype float16": {"manifest": lambda m: [s.__setitem__("dtype", "float16") for s in m["solvers"].values()]},
    # value optimisation
    "value steps 10**9": {"manifest": _value_config(steps=10**9)},
    "value lr a string": {"manifest": _value_config(lr="0.5")},
    "value kl_prompt without slot": {"manifest": _value_config(kl_prompt="no slot here")},
    # templates
    "template with a bad field": {"manifest": lambda m: m.__setitem__("templates", ["{}", "a {0} b {}"])},
    "too many templates": {"manifest": lambda m: m.__setitem__("templates", ["{}"] * 5000)},
    "template too long": {"manifest": lambda m: m.__setitem__("templates", ["{}", "x" * 50_000 + ". {}"])},
    # journal and counters
    "created a string": {"manifest": lambda m: m["journal"][0].__setitem__("created", "yesterday")},
    "fact prompt a number": {"manifest": lambda m: m["journal"][0]["facts"][0].__setitem__("prompt", 5)},
    "next_id huge": {"manifest": lambda m: m.__setitem__("next_id", 2**70)},
}


@pytest.mark.parametrize("name", sorted(FORGERIES))
def test_a_forged_field_is_refused_and_the_model_is_untouched(saved, tmp_path, name):
    _, directory = saved
    forged = _forge(directory, tmp_path / "forged", **FORGERIES[name])
    model, tok = tiny_model("llama")
    before = params(model)
    with pytest.raises(StateMismatchError, match="damaged or forged"):
        Editor.load(model, tok, forged)
    assert_same_params(model, before)


def test_a_deeply_nested_manifest_is_refused_with_a_typed_error(saved, tmp_path):
    _, directory = saved
    shutil.copytree(directory, tmp_path / "s")
    (tmp_path / "s" / "editor.json").write_text("[" * 100_000 + "]" * 100_000)
    model, tok = tiny_model("llama")
    before = params(model)
    with pytest.raises(StateMismatchError, match="nests too deeply"):
        Editor.load(model, tok, tmp_path / "s")
    assert_same_params(model, before)


def test_the_unforged_save_passes_every_check(saved):
    """The checks refuse the forgeries above, not the saves this code writes."""
    editor, directory = saved
    model, tok = tiny_model("llama")
    loaded = Editor.load(model, tok, directory)
    assert [r.edit_id for r in loaded.journal_] == [r.edit_id for r in editor.journal_]


# =============================================================================================
# Paths that are not paths
# =============================================================================================
@pytest.mark.parametrize("bad", [None, 5, True, "", "   "], ids=["None", "int", "bool", "empty", "blank"])
def test_a_path_that_is_not_one_is_refused_before_anything_happens(saved, tmp_path, monkeypatch, bad):
    editor, _ = saved
    monkeypatch.chdir(tmp_path)
    model, tok = tiny_model("llama")
    before = params(model)
    calls = [lambda: editor.save(bad), lambda: Editor.load(model, tok, bad),
             lambda: state_mod.write_state(bad, editor.state_dict(), edited_fingerprint="sha256:x"),
             lambda: state_mod.read_state(bad, model), lambda: state_mod.read_manifest(bad),
             lambda: state_lock(bad).__enter__()]
    for call in calls:
        with pytest.raises(PathError, match="path"):
            call()
    assert list(tmp_path.iterdir()) == []
    assert_same_params(model, before)


@pytest.mark.parametrize("flag", ["--state", "--facts"])
def test_the_cli_refuses_an_empty_path(tmp_path, monkeypatch, capsys, flag):
    monkeypatch.setattr(rlsedit_llm, "load_model", lambda name, **kw: pytest.fail("the model was loaded"))
    args = {"--state": str(tmp_path / "state"), "--facts": str(_facts_file(tmp_path))}
    args[flag] = ""
    with pytest.raises(SystemExit) as info:
        cli.main(["edit", "--model", "tiny", *[x for kv in args.items() for x in kv]])
    assert info.value.code == 2
    assert f"error: argument {flag}: expected a file or folder path" in capsys.readouterr().err
