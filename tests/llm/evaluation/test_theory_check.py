"""benchmarks/theory_check.py: a saved tiny stream replayed by the theory layer, every bound checked."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rlsedit_llm.adapters.tiny import tiny_model
from rlsedit_llm.editing.config import EditConfig
from rlsedit_llm.editing.editor import Editor
from rlsedit_llm.pipeline.facts import Fact
from rlsedit_llm.pipeline.values import ValueConfig

BATCHES = [
    [Fact("The mother tongue of {} is", "Danielle Darrieux", "English", relation_id="P103"),
     Fact("{} plays the", "Alice", "piano", relation_id="P1303")],
    [Fact("{} is located in", "Toyota", "Germany", relation_id="P17")],
    [Fact("The capital of {} is", "Italy", "Madrid", relation_id="P36"),
     Fact("{} was born in", "Bob", "Paris", relation_id="P19")],
]


@pytest.fixture(scope="module")
def theory_check(benchmark_script):
    return benchmark_script("theory_check")


@pytest.fixture(scope="module")
def saved_stream(tmp_path_factory):
    """A tiny llama edited by RLSEdit in three batches (2, 1, 2 facts) and saved."""
    root = tmp_path_factory.mktemp("theory_check")
    model, tok = tiny_model("llama")
    config = EditConfig(cache_dir=str(root / "stats"), stats_tokens=1000, stats_max_length=128, n_templates=1,
                        value=ValueConfig(steps=3))
    editor = Editor(model, tok, config)
    for facts in BATCHES:
        editor.edit(facts)
    editor.save(root / "state")
    return root / "state", editor


def test_theory_check_replays_the_save_and_every_bound_holds(theory_check, saved_stream, tmp_path,
                                                             one_thread_unless_slow):
    state, editor = saved_stream
    out = tmp_path / "out"
    results = theory_check.main([str(state), "--out", str(out), "--quiet"])
    assert sorted(p.name for p in out.iterdir()) == ["theory_check.json", "theory_check.md", "theory_check.png"]
    assert json.loads((out / "theory_check.json").read_text())["summary"] == results["summary"]
    assert results["stream"]["edits"] == 5 and results["stream"]["batch_sizes"] == [2, 1, 2]
    assert results["stream"]["layers"] == list(editor.layers_)

    # The replay in float64 NumPy reaches the saved (torch) state and satisfies the exact identities.
    assert results["replay_consistent"]
    for c in results["consistency"].values():
        assert c["W_gap_relative_to_edit"] < 1e-9 and c["C_gap_relative"] < 1e-9
        assert all(e < 1e-9 for e in c["identities_relative_error"].values())

    # Every bound of T2-T5 and C4 holds on every layer, batch and earlier batch.
    assert results["all_bounds_hold"]
    assert all(r["ratio"] <= 1 + 1e-9 for r in results["records"])
    layers, T = len(editor.layers_), len(BATCHES)
    counts = {key: s["n"] for key, s in results["summary"].items()}
    per_step = {"T2", "T3", "T3a", "T3b", "T4a", "T4b", "C4", "C4p"}
    assert counts == {**{k: layers * T for k in per_step}, "T5a": layers * 3, "T5b": layers * 3}
    # C4's measured side comes from the replayed state, and agrees with lambda_min(G_t) formed from the keys.
    c4 = [r for r in results["records"] if r["bound"] == "C4"]
    assert all(abs(r["measured"] - r["closed_form_rhs"]) <= 1e-8 * abs(r["closed_form_rhs"]) for r in c4)
    # T2 with a single-row batch (t = 2) is an equality.
    t2 = [r for r in results["records"] if r["bound"] == "T2" and r["t"] == 2]
    assert all(abs(r["ratio"] - 1) < 1e-9 for r in t2)
    text = (out / "theory_check.md").read_text()
    assert "Replay consistent" in text and "| T5b |" in text


def test_theory_check_layers_option_and_a_foreign_state_is_caught(theory_check, saved_stream, tmp_path,
                                                                  one_thread_unless_slow):
    state, editor = saved_stream
    layer = editor.layers_[-1]
    results = theory_check.main([str(state), "--out", str(tmp_path), "--layers", str(layer), "--quiet"])
    assert list(results["consistency"]) == [str(layer)] and {r["layer"] for r in results["records"]} == {layer}
    with pytest.raises(ValueError, match="not edited"):
        theory_check.main([str(state), "--out", str(tmp_path), "--layers", "99", "--quiet"])

    # Weights that are not the replayed minimiser show up as a replay gap.
    stream = theory_check.read_stream(state, [layer])
    solver = dict(stream["solvers"][layer])
    solver["W"] = solver["W"] + 1e-3 * np.abs(solver["W"] - solver["W0"]).max()
    _, consistency = theory_check.check_layer(layer, solver, stream["batches"])
    assert consistency["W_gap_relative_to_edit"] > 1e-6
