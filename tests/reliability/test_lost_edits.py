"""Lost edits: one owner per model, calls serialised by a per-model lock, and the
"model still holds this editor's state" check before every state-changing call."""

from __future__ import annotations

import copy
import threading

import pytest
import torch

from rlsedit_llm.adapters.spec import read_weight, write_weight
from rlsedit_llm.adapters.tiny import tiny_model
from rlsedit_llm.editing import editor as editor_mod
from rlsedit_llm.editing.editor import Editor
from rlsedit_llm.errors import OwnershipError, StateMismatchError
from tests.helpers import FIRST, NEXT, OTHER
from tests.helpers import small_config as config

from .conftest import assert_same, fresh_editor, snapshot


def test_a_failed_edit_in_one_thread_keeps_another_threads_completed_edit(stats_dir, monkeypatch):
    editor = fresh_editor(stats_dir)
    real = editor_mod.compute_values
    other_done = threading.Event()

    def slow_then_fail(model, tok, spec, layer, facts, *args, **kw):
        if facts[0] == NEXT[0]:
            other_done.wait(3.0)  # with the lock the other call cannot run meanwhile
            raise RuntimeError("injected failure")
        return real(model, tok, spec, layer, facts, *args, **kw)

    monkeypatch.setattr(editor_mod, "compute_values", slow_then_fail)
    errors, reports = [], []

    def failing():
        try:
            editor.edit(NEXT)
        except RuntimeError as exc:
            errors.append(exc)

    def succeeding():
        reports.append(editor.edit(OTHER))
        other_done.set()

    t1 = threading.Thread(target=failing)
    t1.start()
    threading.Event().wait(0.3)
    t2 = threading.Thread(target=succeeding)
    t2.start()
    t1.join(30)
    t2.join(30)
    assert len(errors) == 1 and len(reports) == 1
    assert [r.edit_id for r in editor.journal_] == [0, 1]
    assert editor.journal_[1].facts == OTHER and reports[0].edit_id == 1
    editor.check_model()  # the completed edit is in the model
    monkeypatch.undo()
    assert editor.edit([NEXT[0]]).edit_id == 2  # ids are never handed out twice


def test_concurrent_edits_on_one_editor_all_land(stats_dir):
    editor = fresh_editor(stats_dir)
    batches = [NEXT, OTHER, [FIRST[0].__class__("{} was born in", "Bob Smith", "Paris", relation_id="P19")]]
    errors = []

    def run(facts):
        try:
            editor.edit(facts)
        except Exception as exc:  # noqa: BLE001 - any error fails the test
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(b,)) for b in batches]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert sorted(r.edit_id for r in editor.journal_) == [0, 1, 2, 3]
    assert sorted(r.facts[0].subject for r in editor.journal_[1:]) == sorted(b[0].subject for b in batches)
    editor.check_model()


def test_a_second_editor_on_an_owned_model_is_refused(stats_dir):
    editor = fresh_editor(stats_dir)
    before = snapshot(editor)
    with pytest.raises(OwnershipError, match="take_over=True"):
        Editor(editor.model, editor.tokenizer, editor.config)
    assert_same(before, snapshot(editor))
    other = Editor(editor.model, editor.tokenizer, editor.config, take_over=True)  # explicit
    with pytest.raises(OwnershipError, match="took this model over"):
        editor.edit(NEXT)
    with pytest.raises(OwnershipError):
        editor.undo(0)
    assert_same(before, snapshot(editor))
    editor.take_over()  # the model still holds its state: it may take it back
    editor.edit(NEXT)
    with pytest.raises(OwnershipError):
        other.edit(OTHER)


def test_two_fresh_editors_never_overwrite_each_others_writes(stats_dir):
    model, tok = tiny_model("llama")
    a = Editor(model, tok, config(stats_dir))
    b = Editor(model, tok, config(stats_dir))  # allowed: neither has changed the model yet
    a.edit(FIRST)
    before = snapshot(a)
    with pytest.raises(StateMismatchError, match="changed"):
        b.edit(NEXT)
    assert_same(before, snapshot(a))
    a.check_model()


def test_a_save_loaded_twice_onto_one_model(stats_dir, tmp_path):
    editor = fresh_editor(stats_dir)
    editor.save(tmp_path / "s")
    model, tok = tiny_model("llama")
    first = Editor.load(model, tok, tmp_path / "s")
    before = snapshot(first)
    with pytest.raises(OwnershipError, match="loaded twice"):
        Editor.load(model, tok, tmp_path / "s")
    second = Editor.load(model, tok, tmp_path / "s", take_over=True)
    second.edit(NEXT)
    with pytest.raises(OwnershipError):  # undo on the first can no longer wipe the second's edit
        first.undo(0)
    second.check_model()
    assert [r.edit_id for r in second.journal_] == [0, 1]
    del before


def test_a_users_change_to_an_edited_layer_is_never_overwritten(stats_dir, tmp_path):
    editor = fresh_editor(stats_dir)
    module = editor._module(editor.layers_[0])
    with torch.no_grad():
        module.weight[0, 0] += 1.0
    before = snapshot(editor)
    for call in (lambda: editor.edit(NEXT), lambda: editor.undo(0), lambda: editor.save(tmp_path / "s"),
                 lambda: editor.absorb(NEXT, {l: r for l, r in editor.journal_[0].keys.items()},
                                       {l: r for l, r in editor.journal_[0].values.items()})):
        with pytest.raises(StateMismatchError, match="layer"):
            call()
        assert_same(before, snapshot(editor))  # the user's change is still there
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("how", ["no_grad", "data"])
def test_a_change_outside_the_edited_layers_is_noticed(stats_dir, tmp_path, how):
    editor = fresh_editor(stats_dir)
    embed = editor.model.get_input_embeddings().weight
    if how == "no_grad":
        with torch.no_grad():
            embed[3, 1] += 0.5
    else:  # bypasses the version counter: the uncached check of save() still sees it
        embed.data[3, 1] += 0.5
    before = snapshot(editor)
    with pytest.raises(StateMismatchError, match="outside the edited layers"):
        editor.save(tmp_path / "s")
    if how == "no_grad":
        with pytest.raises(StateMismatchError, match="outside the edited layers"):
            editor.edit(NEXT)
    assert_same(before, snapshot(editor))
    assert not (tmp_path / "s").exists()


def test_editors_restoring_their_own_weights_in_turn_work(stats_dir):
    """The benchmark's round robin: each editor's call finds its own weights in the model."""
    model, tok = tiny_model("llama")
    a = Editor(model, tok, config(stats_dir))
    b = Editor(model, tok, config(stats_dir, method="memit_seq", replace=False))
    base = {l: read_weight(a._module(l)).clone() for l in a.layers_}
    a.edit(FIRST)
    mine = {l: read_weight(a._module(l)).clone() for l in a.layers_}
    for l, W in base.items():
        write_weight(a._module(l), W)
    b.edit(FIRST)
    for l, W in mine.items():
        write_weight(a._module(l), W)
    a.edit(NEXT)
    a.check_model()
    with pytest.raises(StateMismatchError):
        b.edit(NEXT)


def test_a_reentrant_call_is_refused(stats_dir, monkeypatch):
    editor = fresh_editor(stats_dir)
    before = snapshot(editor)
    real = editor_mod.compute_values

    def reenter(*args, **kw):
        editor.undo(0)
        return real(*args, **kw)

    monkeypatch.setattr(editor_mod, "compute_values", reenter)
    with pytest.raises(OwnershipError, match="re-entrant"):
        editor.edit(NEXT)
    assert_same(before, snapshot(editor))


def test_a_copied_model_gets_no_owner(stats_dir):
    editor = fresh_editor(stats_dir)
    clone = copy.deepcopy(editor.model)
    Editor(clone, editor.tokenizer, editor.config)  # not owned: the copy is another model
