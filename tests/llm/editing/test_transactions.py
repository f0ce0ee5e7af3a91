"""Every edit is a transaction: bad input or a failure anywhere leaves every model weight bit-identical
and the editor's state unchanged, with a typed error that says what to fix."""

from __future__ import annotations

import math

import pytest
import torch

from rlsedit_llm.adapters.spec import read_weight
from rlsedit_llm.adapters.tiny import tiny_model
from rlsedit_llm.editing import editor as editor_mod
from rlsedit_llm.editing.config import EditConfig
from rlsedit_llm.editing.editor import Editor
from rlsedit_llm.errors import (
    FactError,
    HyperparameterError,
    NonFiniteError,
    NotPositiveDefiniteError,
    StateMismatchError,
    UnsupportedArchitectureError,
)
from rlsedit_llm.pipeline.facts import Fact
from rlsedit_llm.pipeline.values import ValueConfig
from tests.helpers import small_config as _config

FIRST = [Fact("{} is located in", "Toyota", "Germany", relation_id="P17"),
         Fact("The capital of {} is", "Italy", "Madrid", relation_id="P36")]
NEXT = [Fact("The mother tongue of {} is", "Danielle Darrieux", "English", relation_id="P103"),
        Fact("{} plays the", "Alice", "piano", relation_id="P1303")]


@pytest.fixture
def editor(stats_dir):
    """An editor with one edit already in its stream."""
    model, tok = tiny_model("llama")
    ed = Editor(model, tok, _config(stats_dir))
    ed.edit(FIRST)
    return ed


def _snapshot(ed: Editor) -> dict:
    def copy(value):
        return value.clone() if isinstance(value, torch.Tensor) else value

    return {
        "params": {k: v.detach().clone() for k, v in ed.model.state_dict().items()},
        "solvers": {l: {k: copy(v) for k, v in vars(s).items()} for l, s in ed.solvers_.items()},
        "journal": [(r.edit_id, list(r.facts), {l: k.clone() for l, k in r.keys.items()},
                     {l: v.clone() for l, v in r.values.items()}, r.created) for r in ed.journal_],
        "next_id": ed.next_id_,
        "templates": list(ed.templates_) if ed.templates_ is not None else None,
    }


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def _assert_unchanged(ed: Editor, snap: dict):
    now = _snapshot(ed)
    for name in ("params", "solvers", "journal", "next_id", "templates"):  # bit-identical
        assert _same(now[name], snap[name]), name


# ---------------------------------------------------------------------------------------------
# Bad input: a typed error naming what to fix, nothing touched
# ---------------------------------------------------------------------------------------------
BAD_FACTS = {
    "subject not in the prompt": ([{"prompt": "The capital city is", "subject": "Paris", "target": "Rome"}],
                                  "does not occur in prompt"),
    "no subject slot": ([Fact("The capital city is", "Paris", "Rome")], "exactly one '{}'"),
    "empty subject": ([Fact("The capital of {} is", " ", "Rome")], "subject is empty"),
    "empty target": ([Fact("The capital of {} is", "France", "   ")], "target is empty"),
    "duplicate facts": ([Fact("The capital of {} is", "France", "Rome"),
                         Fact("The capital of {} is", "France", "Oslo")], "same prompt and subject"),
    "no facts": ([], "no facts"),
    "not a fact": (["The capital of France is Rome"], "Fact objects or dict records|cannot read a fact"),
}


@pytest.mark.parametrize("case", list(BAD_FACTS))
def test_bad_facts_raise_fact_error_and_change_nothing(editor, case):
    facts, message = BAD_FACTS[case]
    snap = _snapshot(editor)
    with pytest.raises(FactError, match=message):
        editor.edit(facts)
    _assert_unchanged(editor, snap)


def test_a_target_the_tokenizer_cannot_encode(stats_dir):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", "<eos>", "The", "capital", "of", "is", "France", "Rome", "Paris"]
    wl = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    wl.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=wl, unk_token="[UNK]", eos_token="<eos>", pad_token="<eos>")
    model, _ = tiny_model("llama")
    ed = Editor(model, tok, _config(stats_dir))
    snap = _snapshot(ed)
    for target in ("Rome Zanzibar", "Zanzibar"):  # "Zanzibar" is not in the vocabulary
        with pytest.raises(FactError, match="cannot represent the target|encodes the target to no tokens"):
            ed.edit([Fact("The capital of {} is", "France", target)])
    _assert_unchanged(ed, snap)


# ---------------------------------------------------------------------------------------------
# Failures in the middle of an edit, after some layers were already written
# ---------------------------------------------------------------------------------------------
def _fail_on_call(monkeypatch, name: str, n: int, action, ed: Editor, witness: list):
    """Patch ``editor_mod.<name>`` so that its ``n``-th call runs ``action(result)`` instead of
    returning; ``witness`` records whether the first edited layer had already been rewritten."""
    real = getattr(editor_mod, name)
    calls = {"n": 0}
    first = ed._module(ed.layers_[0])
    base = read_weight(first)

    def patched(*args, **kwargs):
        calls["n"] += 1
        result = real(*args, **kwargs)
        if calls["n"] == n:
            witness.append(not torch.equal(read_weight(first), base))
            return action(result)
        return result

    monkeypatch.setattr(editor_mod, name, patched)


def _raise(exc):
    def action(_result):
        raise exc
    return action


def _nan_hidden(h):
    return torch.full_like(h, math.nan)


def _nan_values(result):
    result.target[0, 0] = math.nan
    return result


MID_EDIT = {
    # (patched function, failing call, action, expected exception, layers written before?)
    "MemoryError in the keys of the 2nd layer": ("compute_keys", 2, _raise(MemoryError()), MemoryError, True),
    "Ctrl-C in the keys of the 3rd layer": ("compute_keys", 3, _raise(KeyboardInterrupt()), KeyboardInterrupt, True),
    "CUDA-style out of memory in the 2nd layer": ("compute_keys", 2, _raise(torch.OutOfMemoryError("simulated")),
                                                  torch.OutOfMemoryError, True),
    "NaN hidden state at the 2nd layer": ("subject_hidden_states", 2, _nan_hidden, NonFiniteError, True),
    "NaN in the optimised values": ("compute_values", 1, _nan_values, NonFiniteError, False),
    "Ctrl-C while scoring after every layer was written": ("score_targets", 2, _raise(KeyboardInterrupt()),
                                                           KeyboardInterrupt, True),
}


@pytest.mark.parametrize("case", list(MID_EDIT))
def test_failures_mid_edit_roll_back_everything(editor, monkeypatch, case):
    name, n, action, exc, written = MID_EDIT[case]
    snap = _snapshot(editor)
    witness = []
    _fail_on_call(monkeypatch, name, n, action, editor, witness)
    with pytest.raises(exc):
        editor.edit(NEXT)
    assert witness == [written]  # the failure happened where intended (after writes, if any)
    _assert_unchanged(editor, snap)


def test_a_failed_edit_leaves_no_trace_in_the_stream(stats_dir, monkeypatch):
    model_a, tok = tiny_model("llama")
    a = Editor(model_a, tok, _config(stats_dir))
    a.edit(FIRST)
    with monkeypatch.context() as m:
        _fail_on_call(m, "compute_keys", 2, _raise(MemoryError()), a, [])
        with pytest.raises(MemoryError):
            a.edit(NEXT)
    a.edit(NEXT)
    model_b, _ = tiny_model("llama")
    b = Editor(model_b, tok, _config(stats_dir))
    b.edit(FIRST)
    b.edit(NEXT)
    snap_b = _snapshot(b)
    snap_b["journal"] = [j[:4] + (a.journal_[i].created,) for i, j in enumerate(snap_b["journal"])]
    _assert_unchanged(a, snap_b)  # bitwise the stream in which the failure never happened


def test_failure_after_a_replacement_restores_the_replaced_fact(editor, monkeypatch):
    snap = _snapshot(editor)
    _fail_on_call(monkeypatch, "compute_values", 1, _raise(RuntimeError("simulated")), editor, witness := [])
    with pytest.raises(RuntimeError, match="simulated"):
        editor.edit([Fact("{} is located in", "Toyota", "Japan", relation_id="P17")])  # replaces a fact
    assert witness == [True]  # the earlier fact had been retracted (weights rewritten) before the failure
    _assert_unchanged(editor, snap)


def test_failure_during_undo_restores_everything(editor, monkeypatch):
    editor.edit(NEXT)
    snap = _snapshot(editor)
    real = editor_mod.write_weight
    calls = {"n": 0}

    def failing(module, W):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        real(module, W)

    with monkeypatch.context() as m:
        m.setattr(editor_mod, "write_weight", failing)
        with pytest.raises(KeyboardInterrupt):
            editor.undo(0)
    _assert_unchanged(editor, snap)
    editor.undo(0)  # and it still works afterwards
    assert [r.edit_id for r in editor.journal_] == [1]


# ---------------------------------------------------------------------------------------------
# Failures while the batch is committed: C is updated in place, layer by layer
# ---------------------------------------------------------------------------------------------
def _assert_restored_to_rounding(ed: Editor, snap: dict):
    """Weights, journal and every scalar bitwise; the in-place-updated C to rounding."""
    now = _snapshot(ed)
    for name in ("params", "journal", "next_id", "templates"):
        assert _same(now[name], snap[name]), name
    for layer, attrs in snap["solvers"].items():
        assert now["solvers"][layer].keys() == attrs.keys()
        for attr, before in attrs.items():
            after = now["solvers"][layer][attr]
            if attr == "C_":
                assert torch.equal(after, after.mT), layer  # still bitwise symmetric
                assert float((after - before).abs().max()) <= 1e-12 * float(before.abs().max()), layer
            else:
                assert _same(after, before), (layer, attr)


def _uninterrupted(ed: Editor, facts) -> dict:
    """The snapshot the same edit gives without any failure (on a copy of the model)."""
    import copy

    twin = Editor.from_state_dict(copy.deepcopy(ed.model), ed.tokenizer, ed.state_dict())
    twin.edit(facts)
    return _snapshot(twin)


def _assert_completed(ed: Editor, expected: dict):
    now = _snapshot(ed)
    for name in ("params", "solvers", "next_id", "templates"):  # bit-identical to the uninterrupted edit
        assert _same(now[name], expected[name]), name
    assert len(now["journal"]) == len(expected["journal"])


def test_a_failure_between_two_layers_adoptions_finishes_the_edit(editor, monkeypatch):
    """Once the layers adopt their steps (C updated in place) the edit cannot be undone bitwise:
    it is finished, and the failure propagates after it."""
    from rlsedit_llm.kernel.protocol import PendingCommit

    expected = _uninterrupted(editor, NEXT)
    real, calls = PendingCommit.run, {"n": 0}

    def failing(self):
        calls["n"] += 1
        if calls["n"] == 2:  # the first layer adopted its step, the second fails
            raise MemoryError("simulated")
        return real(self)

    monkeypatch.setattr(PendingCommit, "run", failing)
    with pytest.raises(MemoryError):
        editor.edit(NEXT)
    monkeypatch.undo()
    _assert_completed(editor, expected)
    editor.check_model(fresh=True)
    editor.edit([Fact("{} is a", "Paris", "village", relation_id="P31")])  # and editing still works


def test_a_failure_inside_one_layers_in_place_update_finishes_every_layer(editor, monkeypatch):
    from rlsedit_llm.kernel.inplace import SymmetricRankUpdate

    expected = _uninterrupted(editor, NEXT)
    real, calls = SymmetricRankUpdate.run, {"n": 0}

    def failing(self):
        calls["n"] += 1
        if calls["n"] == 2:  # the second layer's update, before it starts
            raise KeyboardInterrupt
        return real(self)

    monkeypatch.setattr(SymmetricRankUpdate, "run", failing)
    with pytest.raises(KeyboardInterrupt):
        editor.edit(NEXT)
    monkeypatch.undo()
    _assert_completed(editor, expected)


def test_an_edit_updates_c_in_place_and_holds_no_pending_c(editor):
    c_before = {l: s.C_ for l, s in editor.solvers_.items()}
    ptrs = {l: C.data_ptr() for l, C in c_before.items()}
    editor.edit(NEXT)
    for layer, solver in editor.solvers_.items():
        assert solver.C_ is c_before[layer] and solver.C_.data_ptr() == ptrs[layer]
        assert torch.equal(solver.C_, solver.C_.mT)


def test_a_state_dict_stays_a_valid_snapshot_after_an_edit(editor):
    state = editor.state_dict()
    copies = {l: {k: v.clone() for k, v in s["tensors"].items()} for l, s in state["solvers"].items()}
    editor.edit(NEXT)
    for layer, solver_state in state["solvers"].items():  # copy on write: the dict was not changed
        for name, value in solver_state["tensors"].items():
            assert torch.equal(value, copies[layer][name]), (layer, name)
        assert not torch.equal(editor.solvers_[layer].C_, copies[layer]["C"])


# ---------------------------------------------------------------------------------------------
# Wrong model, wrong state, wrong hyperparameters
# ---------------------------------------------------------------------------------------------
def test_unsupported_architecture(stats_dir):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    model = MixtralForCausalLM(MixtralConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2,
                                             intermediate_size=32, num_attention_heads=2, num_key_value_heads=2,
                                             num_local_experts=2, max_position_embeddings=32))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _, tok = tiny_model("llama")
    with pytest.raises(UnsupportedArchitectureError, match="(?i)expert"):
        Editor(model, tok, _config(stats_dir))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_state_saved_for_another_model(editor, tmp_path):
    editor.save(tmp_path / "s")
    other, tok = tiny_model("llama", seed=7)
    other_editor = Editor(other, tok, editor.config)
    other_editor.edit(NEXT)
    snap = _snapshot(other_editor)
    with pytest.raises(StateMismatchError, match="match neither"):
        Editor.load(other, tok, tmp_path / "s")
    _assert_unchanged(other_editor, snap)


@pytest.mark.parametrize("kwargs,message", [
    (dict(alpha=-1.0), "alpha must be a finite number >= 0"),
    (dict(beta=-0.5), "beta must be a finite number >= 0"),
    (dict(alpha=float("nan")), "alpha must be a finite number >= 0"),
    (dict(alpha=0.0, beta=0.0), "singular"),
    (dict(alpha=0.0, mom2_weight=0.0), "singular"),
    (dict(state_dtype="float16"), "state_dtype"),
    (dict(layers=(2, 1)), "ascending"),
    (dict(layers=(0, 9)), "ascending"),
])
def test_wrong_hyperparameters(stats_dir, kwargs, message):
    model, tok = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(HyperparameterError, match=message):
        Editor(model, tok, _config(stats_dir, **kwargs))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_singular_preservation_metric_from_too_few_statistics(tmp_path):
    # alpha = 0 and 8 tokens of statistics for d_k = 64 keys: E[k k^T] has rank <= 8.
    model, tok = tiny_model("llama")
    ed = Editor(model, tok, EditConfig(cache_dir=str(tmp_path), stats_tokens=8, stats_max_length=8,
                                       n_templates=0, value=ValueConfig(steps=2)))
    snap = _snapshot(ed)
    with pytest.raises(NotPositiveDefiniteError, match="raise alpha or use more statistics tokens"):
        ed.edit(NEXT)
    _assert_unchanged(ed, snap)
    assert ed.solvers_ == {} and ed.journal_ == []


def test_a_failed_first_rlsedit_edit_attaches_no_editor(stats_dir):
    from rlsedit_llm.editing.lifelong import edit, editor_of

    model, tok = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(FactError):
        edit(model, [Fact("The capital of {} is", "France", " ")], tokenizer=tok, config=_config(stats_dir))
    assert editor_of(model) is None
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    edit(model, NEXT, tokenizer=tok, config=_config(stats_dir, alpha=0.1))  # a fresh start, another config
    assert editor_of(model).config.alpha == 0.1
