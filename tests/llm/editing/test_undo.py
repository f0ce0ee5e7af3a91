"""Undo and replace retract past edits exactly (downdate): the state equals a stream without them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rlsedit_llm.adapters.spec import read_weight
from rlsedit_llm.adapters.tiny import tiny_model
from rlsedit_llm.editing.config import EditConfig
from rlsedit_llm.editing.editor import Editor
from rlsedit_llm.errors import UnknownEditError
from rlsedit_llm.kernel.rls import LayerRLS
from rlsedit_llm.pipeline.facts import Fact
from rlsedit_llm.pipeline.values import ValueConfig
from rlsedit_theory import Problem, closed_form
from tests.helpers import STREAM
from tests.helpers import small_config as _config

FACTS = STREAM


def _snapshot_journal(editor):
    return {r.edit_id: (list(r.facts), {l: k.clone() for l, k in r.keys.items()},
                        {l: v.clone() for l, v in r.values.items()}) for r in editor.journal_}


def _replay(editor, layer):
    """A fresh LayerRLS for ``layer`` fed the journal's (K, V) records, in order."""
    s = editor.solvers_[layer]
    fresh = LayerRLS(s.W0_, s.alpha, s.beta, s.gram0_, dtype=s.dtype)
    for record in editor.journal_:
        fresh.update(record.keys[layer], record.values[layer])
    return fresh


def _assert_equals_stream_without(editor, *, rtol=1e-9):
    """Every layer's state equals (1) a fresh recursion over the journal and (2) the closed form."""
    for layer in editor.layers_:
        s = editor.solvers_[layer]
        ref = _replay(editor, layer)
        scale = float(ref.W_.abs().max())
        torch.testing.assert_close(s.W_, ref.W_, rtol=0, atol=rtol * scale)
        torch.testing.assert_close(s.C_, ref.C_, rtol=0, atol=rtol * float(ref.C_.abs().max()))
        assert s.n_rows_ == ref.n_rows_
        problem = Problem(s.W0_.numpy(), s.alpha, s.beta, gram0=s.gram0_.numpy())
        edits = [(r.keys[layer].numpy(), r.values[layer].numpy()) for r in editor.journal_]
        np.testing.assert_allclose(s.W_.numpy(), closed_form(problem, edits), rtol=0, atol=1e-8 * scale)
        # The model holds the master weights (cast to its dtype).
        held = read_weight(editor._module(layer))
        assert torch.equal(held, s.W_.to(held.dtype))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_undo_equals_a_stream_in_which_the_edit_was_never_made(stats_dir, family):
    model, tok = tiny_model(family)
    editor = Editor(model, tok, _config(stats_dir))
    for facts in FACTS[:3]:
        editor.edit(facts)
    kept = _snapshot_journal(editor)
    del kept[1]

    editor.undo(1)  # the two-fact batch in the middle
    assert [r.edit_id for r in editor.journal_] == [0, 2]
    for r in editor.journal_:  # the other edits' stored keys and values are untouched
        facts, keys, values = kept[r.edit_id]
        assert r.facts == facts
        assert all(torch.equal(r.keys[l], keys[l]) and torch.equal(r.values[l], values[l]) for l in keys)
    _assert_equals_stream_without(editor)
    cert = editor.certificate()
    assert cert.gradient < 1e-12 and cert.holds()

    with pytest.raises(UnknownEditError, match="known ids: \\[0, 2\\]"):
        editor.undo(1)  # already undone
    report = editor.edit(FACTS[3])  # the stream goes on after an undo
    assert report.edit_id == 3
    _assert_equals_stream_without(editor)


def test_undoing_every_edit_returns_to_the_base_model(stats_dir):
    model, tok = tiny_model("llama")
    base = {k: v.clone() for k, v in model.state_dict().items()}
    editor = Editor(model, tok, _config(stats_dir))
    for facts in FACTS[:3]:
        editor.edit(facts)
    C0 = LayerRLS(editor.solvers_[editor.layers_[0]].W0_, 0.0, 1.0, editor.solvers_[editor.layers_[0]].gram0_).C_
    for edit_id in (2, 0, 1):
        editor.undo(edit_id)
    assert editor.journal_ == []
    for layer in editor.layers_:
        s = editor.solvers_[layer]
        assert s.n_rows_ == 0
        torch.testing.assert_close(s.W_, s.W0_, rtol=0, atol=1e-12 * float(s.W0_.abs().max()))
    s = editor.solvers_[editor.layers_[0]]
    torch.testing.assert_close(s.C_, C0, rtol=0, atol=1e-9 * float(C0.abs().max()))
    for name, value in model.state_dict().items():  # float32 weights: back to base up to one rounding
        torch.testing.assert_close(value, base[name], rtol=0, atol=1e-7 * max(float(base[name].abs().max()), 1.0))


@pytest.mark.parametrize("replace", [True, False])
def test_replace_retracts_the_earlier_fact_with_the_same_subject_and_relation(stats_dir, replace):
    model, tok = tiny_model("llama")
    editor = Editor(model, tok, _config(stats_dir, replace=replace))
    editor.edit(FACTS[0])
    editor.edit(FACTS[1])
    before = _snapshot_journal(editor)
    # Same subject and relation as the first fact of edit 1, new target.
    report = editor.edit([Fact("{} is located in", "Toyota", "Japan", relation_id="P17")])
    if replace:
        assert report.facts[0].replaced == (1,)
        assert [(r.edit_id, [f.subject for f in r.facts]) for r in editor.journal_] == \
            [(0, ["Danielle Darrieux"]), (1, ["Italy"]), (2, ["Toyota"])]
        # The surviving row of edit 1 keeps its stored key and value.
        kept = editor.journal_[1]
        assert all(torch.equal(kept.keys[l], before[1][1][l][1:]) for l in editor.layers_)
        assert all(torch.equal(kept.values[l], before[1][2][l][1:]) for l in editor.layers_)
    else:
        assert report.facts[0].replaced == ()
        assert [len(r.facts) for r in editor.journal_] == [1, 2, 1]
    _assert_equals_stream_without(editor)


def test_replace_matches_the_prompt_when_there_is_no_relation_id(stats_dir):
    model, tok = tiny_model("llama")
    editor = Editor(model, tok, _config(stats_dir))
    editor.edit([Fact("{} plays the", "Alice", "piano")])
    editor.edit([Fact("{} plays the", "Bob", "guitar")])  # another subject: kept
    report = editor.edit([Fact("{} plays the", "Alice", "violin")])
    assert report.facts[0].replaced == (0,)
    assert [r.edit_id for r in editor.journal_] == [1, 2]
    _assert_equals_stream_without(editor)


@pytest.mark.slow
def test_undo_on_smollm2(smollm2, tmp_path_factory):
    model, tok = smollm2
    stats = str(tmp_path_factory.mktemp("smollm2-stats"))
    config = EditConfig(cache_dir=stats, stats_tokens=4000, stats_max_length=256, n_templates=1,
                        value=ValueConfig(steps=4), layers=(3, 4))
    editor = Editor(model, tok, config)
    originals = {l: read_weight(editor._module(l)) for l in config.layers}
    try:
        for facts in FACTS[:3]:
            editor.edit(facts)
        editor.undo(1)
        assert [r.edit_id for r in editor.journal_] == [0, 2]
        _assert_equals_stream_without(editor, rtol=1e-8)
        assert editor.certificate().gradient < 1e-10
    finally:
        from rlsedit_llm.adapters.spec import write_weight

        for layer, W in originals.items():  # the session's model goes back to the base weights
            write_weight(editor._module(layer), W)
