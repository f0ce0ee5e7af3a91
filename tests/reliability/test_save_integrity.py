"""Integrity of saves: a checksummed, cross-checked manifest; recovery only of what an
interrupted swap left; fsync before every rename that could lose a save."""

from __future__ import annotations

import json
import logging
import os
import shutil

import pytest

from rlsedit_llm.adapters.tiny import tiny_model
from rlsedit_llm.editing import folder_swap
from rlsedit_llm.editing import state as state_mod
from rlsedit_llm.editing.editor import Editor
from rlsedit_llm.errors import StateMismatchError

from .conftest import fresh_editor


def _tamper(src, dst, change, *, rechecksum: bool):
    shutil.copytree(src, dst)
    manifest = json.loads((dst / "editor.json").read_text())
    change(manifest)
    if rechecksum:  # a consistent-looking manifest: only the cross-checks can catch it
        manifest["digest"] = state_mod.manifest_digest(manifest)
    (dst / "editor.json").write_text(json.dumps(manifest))
    return dst


def _set(path, value):
    def change(m):
        node = m
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return change


TAMPERS = {
    "config alpha 5": _set(("config", "alpha"), 5.0),
    "next_id rewound": _set(("next_id",), 1),
    "fact text changed": _set(("journal", 0, "facts", 0, "target"), "Spain"),
    "n_rows zeroed": lambda m: [s["scalars"].__setitem__("n_rows", 0) for s in m["solvers"].values()],
    "missing key": lambda m: m.pop("templates"),
    "empty files map": _set(("files",), {}),
    "duplicate edit id": lambda m: m["journal"][1].__setitem__("edit_id", m["journal"][0]["edit_id"]),
    "solver method": lambda m: [s.__setitem__("method", "memit") for s in m["solvers"].values()],
    "layers": _set(("layers",), [0]),
}


@pytest.mark.parametrize("rechecksum", [False, True], ids=["as-tampered", "re-checksummed"])
@pytest.mark.parametrize("name", sorted(TAMPERS))
def test_a_tampered_manifest_is_refused(saved, tmp_path, name, rechecksum):
    editor, directory = saved
    bad = _tamper(directory, tmp_path / "bad", TAMPERS[name], rechecksum=rechecksum)
    model, tok = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(StateMismatchError):
        Editor.load(model, tok, bad)
    assert all((v == before[k]).all() for k, v in model.state_dict().items())


def test_a_deleted_save_is_not_brought_back(saved, tmp_path):
    _, directory = saved
    shutil.copytree(directory, tmp_path / "s.old-abcd1234")  # left by an earlier save
    with pytest.raises(StateMismatchError, match="not restored automatically"):
        Editor.load(*tiny_model("llama"), tmp_path / "s")
    assert not (tmp_path / "s").exists()


def test_an_interrupted_swap_is_recovered_with_a_warning(saved, tmp_path, caplog):
    _, directory = saved
    shutil.copytree(directory, tmp_path / "s.old-abcd1234")
    shutil.copytree(directory, tmp_path / "s.tmp-abcd5678")  # the new save an interrupted swap leaves too
    (tmp_path / "s.swap-intent").write_text(json.dumps({"old": "s.old-abcd1234", "new": "s.tmp-abcd5678"}))
    with caplog.at_level(logging.WARNING):
        Editor.load(*tiny_model("llama"), tmp_path / "s")
    assert (tmp_path / "s" / "editor.json").is_file() and not (tmp_path / "s.swap-intent").exists()
    assert "interrupted" in caplog.text


@pytest.mark.parametrize("use_exchange", [True, False], ids=["exchange", "two-renames"])
def test_every_file_and_folder_is_fsynced_before_the_swap(stats_dir, tmp_path, monkeypatch, use_exchange):
    editor = fresh_editor(stats_dir)
    target = tmp_path / "s"
    editor.save(target)  # a second save replaces the first
    events = []
    real_fsync, real_rename, real_exchange, real_rmtree = os.fsync, os.rename, folder_swap._exchange, shutil.rmtree

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def rename(a, b):
        events.append(("rename", str(a), str(b)))
        return real_rename(a, b)

    def exchange(a, b):
        events.append(("swap", str(a), str(b)))
        return real_exchange(a, b) if use_exchange else False

    def rmtree(path, *a, **kw):
        events.append(("rmtree", str(path)))
        return real_rmtree(path, *a, **kw)

    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc")
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(folder_swap, "_exchange", exchange)
    monkeypatch.setattr(folder_swap.shutil, "rmtree", rmtree)
    editor.save(target)
    moves = [i for i, e in enumerate(events)
             if (e[0] == "swap" and use_exchange) or (e[0] == "rename" and e[1] == str(target))]
    first_move = moves[0]
    synced_before = {e[1] for e in events[:first_move] if e[0] == "fsync"}
    tmp = next(e[1] for e in events if e[0] == "swap") if use_exchange else \
        next(e[1] for e in events if e[0] == "rename" and e[2] == str(target))
    for name in ("editor.json", "solvers.safetensors", "journal.safetensors"):
        assert os.path.join(tmp, name) in synced_before, name
    assert tmp in synced_before and (str(tmp_path) in synced_before or use_exchange)
    # the previous save is deleted only after the parent folder recorded the new one
    first_delete = next(i for i, e in enumerate(events) if e[0] == "rmtree")
    last_move = max(i for i, e in enumerate(events) if e[0] == "rename" or (e[0] == "swap" and use_exchange))
    assert any(e == ("fsync", str(tmp_path)) for e in events[last_move:first_delete])
    assert events[-1] == ("fsync", str(tmp_path))
    Editor.load(*tiny_model("llama"), target)
