"""Malformed inputs thrown at the API and the command line: every one gives a typed
error (an RLSEditError, or a one-line `error:` and a non-zero exit on the command line), and the
model's weights, the editor's state and a saved state stay bit-identical."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch

import rlsedit_llm
from rlsedit_llm import cli
from rlsedit_llm.adapters.tiny import tiny_model
from rlsedit_llm.editing.config import EditConfig
from rlsedit_llm.editing.editor import Editor
from rlsedit_llm.errors import (
    FactError,
    HyperparameterError,
    NonFiniteError,
    RLSEditError,
    StateMismatchError,
    UnknownEditError,
)
from rlsedit_llm.pipeline.facts import Fact
from tests.helpers import small_config as config

from .conftest import assert_same, snapshot

GOOD = {"prompt": "{} is made in", "subject": "Nokia", "target": "Spain", "relation_id": "P495"}


def rec(**changes):
    out = dict(GOOD)
    for k, v in changes.items():
        if v is _DROP:
            out.pop(k)
        else:
            out[k] = v
    return out


_DROP = object()
LONG = "word " * 300

BAD_FACTS = {
    "None": None,
    "int": 42,
    "float": 3.5,
    "string": "Nokia is made in Spain",
    "bytes": b"facts",
    "empty list": [],
    "list of None": [None],
    "list of int": [7],
    "empty dict": {},
    "prompt only": {"prompt": "x {}"},
    "no target": rec(target=_DROP),
    "no subject": rec(subject=_DROP),
    "no slot": rec(prompt="is made in"),
    "two slots": rec(prompt="{} and {} are made in"),
    "empty subject": rec(subject=""),
    "blank subject": rec(subject="   "),
    "empty target": rec(target=""),
    "blank target": rec(target=" \n "),
    "subject int": rec(subject=5),
    "target int": rec(target=5),
    "target None": rec(target=None),
    "prompt None": rec(prompt=None),
    "prompt list": rec(prompt=["{} is"]),
    "lone surrogate subject": rec(subject="\ud800"),
    "lone surrogate target": rec(target="Sp\udfffain"),
    "lone surrogate prompt": rec(prompt="{} is \ud801 made in"),
    "NUL in target": rec(target="Spa\0in"),
    "relation_id list": rec(relation_id=["P17"]),
    "relation_id dict": rec(relation_id={"id": "P17"}),
    "relation_id int": rec(relation_id=17),
    "case_id list": rec(case_id=[1]),
    "case_id bool": rec(case_id=True),
    "target_true int": rec(target_true=3),
    "paraphrases ints": rec(paraphrases=[1, 2]),
    "neighbourhood None item": rec(neighbourhood=[None]),
    "prompt past positions": rec(prompt=LONG + "{} is made in"),
    "target past positions": rec(target=LONG),
    "same prompt and subject twice": [rec(), rec(target="Italy")],
    "same subject and relation twice": [rec(), rec(prompt="{} comes from", target="Italy")],
    "zsRE subject missing from src": {"subject": "Nokia", "src": "Where is it made?", "alt": "Spain"},
    "CounterFact without target_new": {"requested_rewrite": {"prompt": "{} is", "subject": "Nokia"}},
    "target mapping without str": rec(target={"id": "Q1"}),
}


@pytest.mark.parametrize("facts", list(BAD_FACTS.values()), ids=list(BAD_FACTS))
def test_a_malformed_fact_is_refused(edited, facts):
    before = snapshot(edited)
    with pytest.raises(FactError):
        edited.edit(facts)
    assert_same(before, snapshot(edited))


BAD_UNDO = {"True": (True, UnknownEditError), "False": (False, UnknownEditError), "1.0": (1.0, UnknownEditError),
            "'0'": ("0", UnknownEditError), "None": (None, UnknownEditError), "-1": (-1, UnknownEditError),
            "99": (99, UnknownEditError), "[0]": ([0], UnknownEditError), "nan": (math.nan, UnknownEditError)}


@pytest.mark.parametrize("edit_id,error", list(BAD_UNDO.values()), ids=list(BAD_UNDO))
def test_a_malformed_undo_is_refused(edited, edit_id, error):
    before = snapshot(edited)
    with pytest.raises(error):
        edited.undo(edit_id)
    assert_same(before, snapshot(edited))


def _absorb_args(editor, how):
    record = editor.journal_[0]
    keys, values = dict(record.keys), dict(record.values)
    layer = editor.layers_[0]
    if how == "keys not a dict":
        keys = list(keys.values())
    elif how == "a layer missing":
        del keys[layer]
    elif how == "wrong shape":
        keys[layer] = keys[layer][:, :-1]
    elif how == "NaN keys":
        keys[layer] = keys[layer].clone().fill_(float("nan"))
    elif how == "int values":
        values[layer] = values[layer].long()
    elif how == "rows differ from facts":
        return [*record.facts, GOOD], keys, values
    return record.facts, keys, values


@pytest.mark.parametrize("how", ["keys not a dict", "a layer missing", "wrong shape", "NaN keys", "int values",
                                 "rows differ from facts"])
def test_a_malformed_absorb_is_refused(edited, how):
    before = snapshot(edited)
    with pytest.raises(RLSEditError):
        edited.absorb(*_absorb_args(edited, how))
    assert_same(before, snapshot(edited))


BAD_CONFIGS = {
    "stats_tokens str": dict(stats_tokens="1000"),
    "stats_tokens 0": dict(stats_tokens=0),
    "stats_tokens float": dict(stats_tokens=1e3),
    "alpha negative": dict(alpha=-1.0),
    "alpha nan": dict(alpha=float("nan")),
    "alpha inf": dict(alpha=float("inf")),
    "alpha bool": dict(alpha=True),
    "beta str": dict(beta="1"),
    "mom2_weight negative": dict(mom2_weight=-1.0),
    "layers strings": dict(layers=("a", "b")),
    "layers empty": dict(layers=()),
    "layers out of range": dict(layers=(0, 99)),
    "layers descending": dict(layers=(1, 0)),
    "state_dtype float16": dict(state_dtype="float16"),
    "n_templates negative": dict(n_templates=-1),
    "template_length 0": dict(template_length=0),
    "template_seed str": dict(template_seed="0"),
    "replace str": dict(replace="yes"),
    "unknown method": dict(method="nope"),
    "method not a str": dict(method=3),
    "value a dict": dict(value={"steps": 3}),
    "corpus int": dict(corpus=5),
    "cache_dir int": dict(cache_dir=5),
}


@pytest.mark.parametrize("kwargs", list(BAD_CONFIGS.values()), ids=list(BAD_CONFIGS))
def test_a_malformed_config_is_refused(edited, kwargs):
    before = snapshot(edited)
    kwargs = {"stats_tokens": 1000, "n_templates": 1, **kwargs}
    with pytest.raises(HyperparameterError):
        Editor(edited.model, edited.tokenizer, EditConfig(**kwargs), take_over=True)
    assert edited.owns_model  # the refused editor took nothing over
    assert_same(before, snapshot(edited))


def test_cache_dir_pointing_at_a_file(edited, tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(HyperparameterError, match="is a file"):
        Editor(edited.model, edited.tokenizer, EditConfig(cache_dir=str(path)), take_over=True)


@pytest.mark.parametrize("tokenizer", [None, "tok", 5], ids=["None", "str", "int"])
def test_a_missing_tokenizer_is_refused(edited, tokenizer):
    before = snapshot(edited)
    with pytest.raises(HyperparameterError, match="tokenizer"):
        Editor(edited.model, tokenizer, edited.config, take_over=True)
    assert_same(before, snapshot(edited))


def test_a_regulariser_that_swamps_every_edit_is_refused(stats_dir):
    model, tok = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    editor = Editor(model, tok, config(stats_dir, alpha=1e308))
    with pytest.raises(HyperparameterError, match="swamp every edit"):
        editor.edit(Fact("{} is made in", "Nokia", "Spain"))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert editor.journal_ == [] and editor.solvers_ == {}


@pytest.mark.parametrize("where", ["lm_head", "upper layer"])
def test_nan_in_the_model_is_refused_before_anything_changes(stats_dir, where):
    model, tok = tiny_model("llama")
    with torch.no_grad():
        if where == "lm_head":
            model.lm_head.weight[0, 0] = float("nan")
        else:
            model.model.layers[-1].mlp.up_proj.weight[1, 1] = float("nan")
    editor = Editor(model, tok, config(stats_dir))
    with pytest.raises(NonFiniteError, match="NaN"):
        editor.edit(Fact("{} is made in", "Nokia", "Spain"))
    assert editor.journal_ == [] and editor.solvers_ == {}


@pytest.mark.parametrize("how", ["missing folder", "a file", "an empty folder", "not a save"])
def test_loading_from_a_bad_path_is_refused(edited, tmp_path, how):
    path = tmp_path / "x"
    if how == "a file":
        path.write_text("{}")
    elif how == "an empty folder":
        path.mkdir()
    elif how == "not a save":
        path.mkdir()
        (path / "editor.json").write_text("[1, 2]")
    before = snapshot(edited)
    with pytest.raises(StateMismatchError):
        Editor.load(edited.model, edited.tokenizer, path, take_over=True)
    assert edited.owns_model
    assert_same(before, snapshot(edited))


def test_saving_over_a_file_is_refused(edited, tmp_path):
    path = tmp_path / "file"
    path.write_text("keep me")
    with pytest.raises(FileExistsError):
        edited.save(path)
    assert path.read_text() == "keep me"


# -- the command line ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved_state(edited, tmp_path_factory):
    directory = tmp_path_factory.mktemp("cli") / "state"
    edited.save(directory)
    return directory


def _digest(directory: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def _facts_file(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


GOOD_LINE = json.dumps({"prompt": "{} is made in", "subject": "Nokia", "target": "Spain"})
BAD_CLI = {
    "batch 0": (["--batch", "0"], GOOD_LINE, "jsonl"),
    "batch -1": (["--batch", "-1"], GOOD_LINE, "jsonl"),
    "batch x": (["--batch", "x"], GOOD_LINE, "jsonl"),
    "layers a,b": (["--layers", "a,b"], GOOD_LINE, "jsonl"),
    "alpha differs from the save": (["--alpha", "0.5"], GOOD_LINE, "jsonl"),
    "layers differ from the save": (["--layers", "0"], GOOD_LINE, "jsonl"),
    "stats tokens differ from the save": (["--stats-tokens", "77"], GOOD_LINE, "jsonl"),
    "malformed JSONL line 2": ([], GOOD_LINE + "\n{\"prompt\": oops}\n", "jsonl"),
    "malformed JSON file": ([], "[{\"prompt\": }]", "json"),
    "a number per line": ([], "42\n", "jsonl"),
    "a fact without a slot": ([], json.dumps({"prompt": "x", "subject": "y", "target": "z"}), "jsonl"),
    "an empty file": ([], "\n\n", "jsonl"),
    "not UTF-8": ([], None, "jsonl"),
    "missing facts file": ([], "missing", "jsonl"),
}


@pytest.mark.parametrize("extra,text,kind", list(BAD_CLI.values()), ids=list(BAD_CLI))
def test_the_command_line_reports_one_line_and_changes_nothing(saved_state, tmp_path, monkeypatch, capsys,
                                                              extra, text, kind):
    monkeypatch.setattr(rlsedit_llm, "load_model", lambda name, **kw: tiny_model("llama"))
    if text == "missing":
        facts = tmp_path / "nope.jsonl"
    elif text is None:
        facts = tmp_path / "f.jsonl"
        facts.write_bytes(b"\xff\xfe\x00bad")
    else:
        facts = _facts_file(tmp_path, f"f.{kind}", text)
    before = _digest(saved_state)
    try:
        rc = cli.main(["edit", "--model", "tiny", "--facts", str(facts), "--state", str(saved_state), *extra])
    except SystemExit as exc:  # argparse: usage line and exit 2
        rc = exc.code
    err = capsys.readouterr().err
    assert rc not in (0, None)
    assert "Traceback" not in err
    lines = [l for l in err.splitlines() if l.startswith("error:") or ": error:" in l]
    assert len(lines) == 1, err
    assert _digest(saved_state) == before
    if "line 2" in str(extra) + str(BAD_CLI.get("malformed JSONL line 2")) and text and "oops" in text:
        assert f"{facts}:2:" in err


@pytest.mark.parametrize("edit_id", [True, 1.0], ids=["True", "1.0"])
def test_undo_with_a_bool_or_float_does_not_retract_edit_1(stats_dir, edit_id):
    from .conftest import fresh_editor

    editor = fresh_editor(stats_dir, n_edits=2)  # ids 0 and 1: True == 1.0 == 1 would match
    before = snapshot(editor)
    with pytest.raises(UnknownEditError, match="ints"):
        editor.undo(edit_id)
    assert_same(before, snapshot(editor))
