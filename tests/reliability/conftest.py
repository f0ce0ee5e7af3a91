"""Shared fixtures of the reliability suite: one tiny model and one editor edited once, reused by
a module's tests (each test checks that what it throws leaves them bit-identical)."""

from __future__ import annotations

import pytest
import torch

from rlsedit_llm.adapters.tiny import tiny_model
from rlsedit_llm.editing.editor import Editor
from tests.helpers import FIRST, NEXT
from tests.helpers import small_config as config


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def fresh_editor(stats_dir, *, n_edits=1, family="llama", **kw) -> Editor:
    model, tok = tiny_model(family)
    editor = Editor(model, tok, config(stats_dir, **kw))
    for facts in (FIRST, NEXT)[:n_edits]:
        editor.edit(facts)
    return editor


@pytest.fixture(scope="module")
def edited(stats_dir):
    """A tiny llama model and its editor, edited once (shared by a module: tests must leave it as is)."""
    return fresh_editor(stats_dir)


@pytest.fixture(scope="module")
def saved(stats_dir, tmp_path_factory):
    """An editor with two edits and its save (tests copy the folder before changing anything)."""
    editor = fresh_editor(stats_dir, n_edits=2)
    directory = tmp_path_factory.mktemp("saves") / "s"
    editor.save(directory)
    return editor, directory


def params(model) -> dict[str, torch.Tensor]:
    """A copy of every parameter and persistent buffer of ``model``."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_params(model, before: dict[str, torch.Tensor]) -> None:
    now = model.state_dict()
    assert now.keys() == before.keys()
    for name, value in before.items():
        assert torch.equal(now[name], value), name


def copied(x):
    """A deep copy of nested dicts, lists and tuples of tensors (tensors cloned)."""
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, dict):
        return {k: copied(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(copied(v) for v in x)
    return x


def snapshot(editor: Editor) -> dict:
    """Every model parameter and buffer, the editor's state_dict tensors and journal (copies)."""
    return {"params": params(editor.model), "state": copied(editor.state_dict())}


def assert_same(a: dict, b: dict) -> None:
    assert a["params"].keys() == b["params"].keys()
    for name, value in a["params"].items():
        assert torch.equal(value, b["params"][name]), name

    def same(x, y, where="state"):
        if isinstance(x, torch.Tensor):
            assert isinstance(y, torch.Tensor) and x.dtype == y.dtype and torch.equal(x, y), where
        elif isinstance(x, dict):
            assert x.keys() == y.keys(), where
            for k in x:
                same(x[k], y[k], f"{where}.{k}")
        elif isinstance(x, (list, tuple)):
            assert len(x) == len(y), where
            for i, (u, v) in enumerate(zip(x, y, strict=True)):
                same(u, v, f"{where}[{i}]")
        else:
            assert x == y, where

    same(a["state"], b["state"])
