"""``save_pretrained`` / ``from_pretrained``: the edited model in Hugging Face format with the
editor's state, atomic; and no silent new stream: a reloaded edited copy is refused without its
state (``StreamError``), continues with it, and starts a new stream only when asked."""

from __future__ import annotations

import errno
import json
import os

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import rlsedit_llm
from rlsedit_llm.adapters.fingerprint import model_fingerprint
from rlsedit_llm.adapters.tiny import tiny_model
from rlsedit_llm.editing import folder_swap
from rlsedit_llm.editing.editor import Editor
from rlsedit_llm.editing.lifelong import edit, editor_of, from_pretrained, load_model_state, save_pretrained
from rlsedit_llm.errors import RLSEditError, StateMismatchError, StateWriteError, StreamError
from tests.helpers import STREAM
from tests.helpers import small_config as _config

pytestmark = pytest.mark.usefixtures("one_thread_unless_slow")


def _params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_params(model, reference) -> bool:
    current = model.state_dict()
    return current.keys() == reference.keys() and all(torch.equal(current[k], v) for k, v in reference.items())


def _edited(stats_dir, n_edits=2) -> Editor:
    model, tok = tiny_model("llama")
    editor = Editor(model, tok, _config(stats_dir))
    for facts in STREAM[:n_edits]:
        editor.edit(facts)
    return editor


def _plain(folder):
    """The folder loaded with plain transformers, as a user would."""
    return AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)


def test_save_pretrained_writes_a_hugging_face_folder_with_the_state(stats_dir, tmp_path):
    editor = _edited(stats_dir)
    editor.save_pretrained(tmp_path / "m")
    names = {p.name for p in (tmp_path / "m").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "rlsedit"} <= names
    assert sorted(p.name for p in (tmp_path / "m" / "rlsedit").iterdir()) == [
        "editor.json", "journal.safetensors", "solvers.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no work folder or lock file left
    mark = json.loads((tmp_path / "m" / "config.json").read_text())["rlsedit"]
    assert mark["stream"] == editor.stream_id_ and mark["edits"] == 2 and mark["next_id"] == 2
    assert mark["edited_fingerprint"] == model_fingerprint(editor.model) and mark["state"] == "rlsedit"
    assert mark["base_fingerprint"] == editor.base_fingerprint_
    assert AutoConfig.from_pretrained(tmp_path / "m").rlsedit == mark  # the mark survives transformers' config
    assert editor.model.config.rlsedit["state"] == str(tmp_path / "m" / "rlsedit")  # in memory: absolute


def test_from_pretrained_continues_the_stream_bitwise(stats_dir, tmp_path):
    editor = _edited(stats_dir)
    editor.save_pretrained(tmp_path / "m")
    loaded = Editor.from_pretrained(tmp_path / "m")
    assert loaded.tokenizer is not None and model_fingerprint(loaded.model) == model_fingerprint(editor.model)
    assert [r.edit_id for r in loaded.journal_] == [0, 1] and loaded.stream_id_ == editor.stream_id_
    a, b = editor.edit(STREAM[2]), loaded.edit(STREAM[2])
    assert a.edit_id == b.edit_id == 2
    for layer in editor.layers_:
        assert torch.equal(loaded.solvers_[layer].W_, editor.solvers_[layer].W_)
        assert torch.equal(loaded.solvers_[layer].C_, editor.solvers_[layer].C_)
    loaded.undo(0)
    assert [r.edit_id for r in loaded.journal_] == [1, 2]


def test_a_plain_transformers_copy_is_refused_without_its_state(stats_dir, tmp_path):
    editor = _edited(stats_dir)
    editor.save_pretrained(tmp_path / "m")
    model, tok = _plain(tmp_path / "m")
    before = _params(model)
    with pytest.raises(StreamError, match="carries 2 edit") as info:
        edit(model, STREAM[2], tokenizer=tok, config=_config(stats_dir))
    message = str(info.value)
    assert str(tmp_path / "m" / "rlsedit") in message and "from_pretrained" in message and "new_stream=True" in message
    with pytest.raises(StreamError):
        Editor(model, tok, _config(stats_dir))
    assert isinstance(info.value, StateMismatchError) and isinstance(info.value, rlsedit_llm.StreamError)
    assert _same_params(model, before) and editor_of(model) is None

    # with the state loaded, the stream continues: ids go on, an earlier edit can be undone
    load_model_state(model, tok, tmp_path / "m" / "rlsedit")
    report = edit(model, STREAM[2])
    assert report.edit_id == 2
    editor_of(model).undo(0)
    assert [r.edit_id for r in editor_of(model).journal_] == [1, 2]


def test_new_stream_starts_a_new_stream_deliberately(stats_dir, tmp_path):
    editor = _edited(stats_dir)
    editor.save_pretrained(tmp_path / "m")
    model, tok = _plain(tmp_path / "m")
    report = edit(model, STREAM[2], tokenizer=tok, config=_config(stats_dir), new_stream=True)
    assert report.edit_id == 0
    ours = editor_of(model)
    assert ours.stream_id_ != editor.stream_id_ and ours.base_fingerprint_ == model_fingerprint(editor.model)
    assert model.config.rlsedit["stream"] == ours.stream_id_ and model.config.rlsedit["edits"] == 1
    with pytest.raises(rlsedit_llm.HyperparameterError, match="new_stream"):
        edit(model, STREAM[3], new_stream=True)  # a lifelong editor is attached: continue it instead
    other, tok2 = _plain(tmp_path / "m")
    assert Editor(other, tok2, _config(stats_dir), new_stream=True).next_id_ == 0


def test_editor_save_marks_the_model_so_a_plain_copy_names_the_state(stats_dir, tmp_path):
    editor = _edited(stats_dir)
    editor.save(tmp_path / "state")
    editor.model.save_pretrained(tmp_path / "copy")  # plain transformers, after the state was saved
    editor.tokenizer.save_pretrained(tmp_path / "copy")
    model, tok = _plain(tmp_path / "copy")
    with pytest.raises(StreamError, match="weights are those of the stream's last save") as info:
        Editor(model, tok, _config(stats_dir))
    assert str(tmp_path / "state") in str(info.value) and "load_model_state" in str(info.value)
    loaded = Editor.load(model, tok, tmp_path / "state")  # the edited model itself: nothing written
    assert loaded.next_id_ == 2


def test_edits_after_the_last_save_are_recognised_too(stats_dir, tmp_path):
    model, tok = tiny_model("llama")
    edit(model, STREAM[0], tokenizer=tok, config=_config(stats_dir))
    rlsedit_llm.save_model_state(model, tmp_path / "state")
    edit(model, STREAM[1])  # not saved: the mark keeps the stream, the last save, and the count
    assert model.config.rlsedit["edits"] == 2 and model.config.rlsedit["edited_fingerprint"] is None
    model.save_pretrained(tmp_path / "copy")
    tok.save_pretrained(tmp_path / "copy")
    copy, tok2 = _plain(tmp_path / "copy")
    with pytest.raises(StreamError, match="not those its last save recorded") as info:
        edit(copy, STREAM[2], tokenizer=tok2, config=_config(stats_dir))
    assert str(tmp_path / "state") in str(info.value)


def test_an_unmarked_edited_copy_is_recognised_by_its_state(stats_dir, tmp_path):
    """Without the config mark (e.g. weights copied into a fresh config), the edited model is
    still recognised when its state is passed: loading accepts the saved edited fingerprint."""
    editor = _edited(stats_dir)
    editor.save(tmp_path / "state")
    del editor.model.config.rlsedit
    editor.model.save_pretrained(tmp_path / "copy")
    model, tok = AutoModelForCausalLM.from_pretrained(tmp_path / "copy"), editor.tokenizer
    assert not hasattr(model.config, "rlsedit")
    loaded = Editor.load(model, tok, tmp_path / "state")
    assert loaded.next_id_ == 2 and model.config.rlsedit["stream"] == editor.stream_id_


def test_the_one_call_api_round_trip(stats_dir, tmp_path):
    model, tok = tiny_model("llama")
    with pytest.raises(RLSEditError, match="no edit state"):
        save_pretrained(model, tmp_path / "m")
    edit(model, STREAM[0], tokenizer=tok, config=_config(stats_dir))
    save_pretrained(model, tmp_path / "m")
    again, tok2 = from_pretrained(tmp_path / "m")
    assert editor_of(again) is not None and editor_of(again).tokenizer is tok2
    assert edit(again, STREAM[1]).edit_id == 1
    editor_of(again).undo(0)
    save_pretrained(again, tmp_path / "m")  # replaces its own earlier folder
    third, _ = rlsedit_llm.from_pretrained(tmp_path / "m")
    assert [r.edit_id for r in editor_of(third).journal_] == [1]


def test_save_pretrained_never_replaces_a_folder_it_did_not_write(stats_dir, tmp_path):
    editor = _edited(stats_dir, n_edits=1)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="not a folder written by save_pretrained"):
        editor.save_pretrained(tmp_path / "mine")
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]
    editor.save(tmp_path / "state")
    with pytest.raises(FileExistsError):
        editor.save_pretrained(tmp_path / "state")  # a state folder is not a model folder
    editor.save_pretrained(tmp_path / "m")
    with pytest.raises(FileExistsError):
        editor.save(tmp_path / "m")  # nor the other way round


def test_a_failed_save_pretrained_keeps_the_previous_folder(stats_dir, tmp_path, monkeypatch):
    editor = _edited(stats_dir, n_edits=1)
    editor.save_pretrained(tmp_path / "m")
    mark = dict(editor.model.config.rlsedit)
    editor.edit(STREAM[1])

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(editor.tokenizer, "save_pretrained", full_disk)
    with pytest.raises(StateWriteError, match="previous folder") as info:
        editor.save_pretrained(tmp_path / "m")
    assert info.value.errno == errno.ENOSPC
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # the work folder removed
    assert editor.model.config.rlsedit == mark  # the model's mark as before the failed save
    loaded = Editor.from_pretrained(tmp_path / "m")
    assert [r.edit_id for r in loaded.journal_] == [0]


def test_without_the_atomic_exchange_the_two_renames_leave_nothing_behind(stats_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(folder_swap, "_exchange", lambda a, b: False)
    editor = _edited(stats_dir, n_edits=1)
    editor.save_pretrained(tmp_path / "m")
    editor.edit(STREAM[1])
    editor.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    assert Editor.from_pretrained(tmp_path / "m").next_id_ == 2


def test_from_pretrained_refuses_what_is_not_a_complete_save(stats_dir, tmp_path):
    editor = _edited(stats_dir, n_edits=1)
    with pytest.raises(StateMismatchError, match="does not exist"):
        Editor.from_pretrained(tmp_path / "nothing")
    editor.model.save_pretrained(tmp_path / "plain")  # a model without a state
    with pytest.raises(StateMismatchError, match="rlsedit/editor.json"):
        Editor.from_pretrained(tmp_path / "plain")
    editor.save_pretrained(tmp_path / "m")
    os.remove(tmp_path / "m" / "rlsedit" / "editor.json")  # damaged by hand
    with pytest.raises(StateMismatchError, match="rlsedit/editor.json"):
        rlsedit_llm.from_pretrained(tmp_path / "m")
    editor.save_pretrained(tmp_path / "n")
    with pytest.raises(StateMismatchError, match="dtype=None"):
        Editor.from_pretrained(tmp_path / "n", dtype=torch.float16)
    assert Editor.from_pretrained(tmp_path / "n", dtype=torch.float32, device="cpu").next_id_ == 1
