"""benchmarks/value_reach.py: how close the optimised values come to their targets, per setting."""

from __future__ import annotations

import pytest

from rlsedit_llm.adapters.fingerprint import model_fingerprint
from rlsedit_llm.adapters.tiny import tiny_model
from rlsedit_llm.editing.config import EditConfig
from rlsedit_llm.errors import HyperparameterError
from rlsedit_llm.pipeline.facts import Fact
from rlsedit_llm.pipeline.values import ValueConfig

FACTS = [Fact("The mother tongue of {} is", "Danielle Darrieux", "English", relation_id="P103"),
         Fact("{} plays the", "Alice", "piano", relation_id="P1303"),
         Fact("{} is located in", "Toyota", "Germany", relation_id="P17")]


@pytest.fixture(scope="module")
def value_reach(benchmark_script):
    return benchmark_script("value_reach")


def test_settings_are_parsed_onto_the_editor_defaults_and_bad_ones_refused(value_reach):
    base = ValueConfig(lr=0.5, steps=25)
    assert value_reach.parse_setting("default", base) is base
    assert value_reach.parse_setting("mpes", base).stop_when_top1
    both = value_reach.parse_setting("clamp=1.5:steps=50:mpes", base)
    assert (both.clamp_norm_factor, both.steps, both.stop_when_top1, both.lr) == (1.5, 50, True, 0.5)
    for bad in ("clamp", "width=3", "clamp=-1", "steps=0"):
        with pytest.raises(HyperparameterError):
            value_reach.parse_setting(bad, base)


def test_reach_reports_the_clamp_the_early_stops_and_top1(value_reach, tmp_path, one_thread_unless_slow):
    model, tok = tiny_model("llama")
    before = model_fingerprint(model)
    config = EditConfig(cache_dir=str(tmp_path / "stats"), stats_tokens=1000, stats_max_length=128, n_templates=1,
                        value=ValueConfig(steps=6))
    rows = value_reach.measure(model, tok, FACTS, ["default", "clamp=0.001", "mpes:steps=1", "steps=1"], config)
    assert model_fingerprint(model) == before  # nothing written
    default, tight, mpes, one = rows
    assert [r["setting"] for r in rows] == ["default", "clamp=0.001", "mpes:steps=1", "steps=1"]
    assert all(r["facts"] == 3 for r in rows)
    # A clamp far below what the targets need binds for every fact, and keeps |delta| at it.
    assert tight["clamped"] == 3 and tight["delta_ratio"] == pytest.approx(0.001, rel=1e-3)
    # The batch stops early only once every fact reached the stop loss; otherwise it runs 5 updates.
    assert default["steps"] == 5 or default["reached"] == 3
    # Optimising lowers the target's NLL below the single evaluation of delta = 0.
    assert default["nll_mean"] < one["nll_mean"] and one["steps"] == 0 and one["delta_ratio"] == 0
    # top-1 is only counted under MPES; a random tiny model puts few targets on top at delta = 0.
    assert default["top1"] is None and 0 <= mpes["top1"] <= 3
    assert mpes["nll_mean"] == pytest.approx(one["nll_mean"], rel=1e-5)
