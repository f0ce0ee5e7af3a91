"""File-system plumbing (rlsedit_llm.files): the cache root and durable atomic writes."""

from __future__ import annotations

import os

import pytest

from rlsedit_llm import files
from rlsedit_llm.files import atomic_path, atomic_write_bytes, atomic_write_text, cache_root


def test_cache_root_honours_xdg_cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "rlsedit"
    monkeypatch.setenv("XDG_CACHE_HOME", "")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "rlsedit"


def test_atomic_writes_create_folders_and_replace(tmp_path):
    path = tmp_path / "a" / "b" / "x.json"
    atomic_write_text(path, "first")
    atomic_write_bytes(path, b"second")
    assert path.read_bytes() == b"second"
    assert os.listdir(path.parent) == ["x.json"]  # no temporary file left


def test_atomic_path_keeps_the_old_file_when_the_writer_fails(tmp_path):
    path = tmp_path / "x.bin"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="crash"):
        with atomic_path(path) as tmp:
            assert tmp.parent == path.parent and not tmp.exists()
            tmp.write_bytes(b"half")
            raise RuntimeError("crash")
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["x.bin"]


def test_atomic_path_fsyncs_the_file_and_the_folder(tmp_path, monkeypatch):
    synced = []
    real = files.fsync_path
    monkeypatch.setattr(files, "fsync_path", lambda p: (synced.append(os.fspath(p)), real(p)))
    path = tmp_path / "x.bin"
    with atomic_path(path) as tmp:
        tmp.write_bytes(b"new")
    assert synced == [os.fspath(tmp), os.fspath(tmp_path)]
    assert path.read_bytes() == b"new"


def test_every_data_fixture_reads_the_copy_shipped_in_the_package_first():
    """The data fixtures must not skip on a fresh clone: each reads the package's own copy when
    it exists (it always does), and only then the shared reference folder."""
    from tests.llm.conftest import _PACKAGED, DATASETS

    for name, candidates in DATASETS.items():
        assert candidates[0].parent == _PACKAGED, name
        assert candidates[0].is_file(), f"{name}: {candidates[0]} is not shipped"
