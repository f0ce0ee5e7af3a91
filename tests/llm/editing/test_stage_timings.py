"""An edit call's stage timings (``EditReport.seconds``): every stage the benchmarks break the
cost into is reported, and the parts add up (``solve`` is inside ``update``)."""

from __future__ import annotations

import pytest

from rlsedit_llm import Editor
from tests.helpers import small_config

FACTS = [{"prompt": "we saw {}", "subject": "the old cat", "target": "paris"},
         {"prompt": "they met {}", "subject": "a tall man", "target": "rome"}]


@pytest.mark.parametrize("method", ["rlsedit", "memit"])
def test_an_edit_reports_every_stage(tiny, stats_dir, method):
    model, tok = tiny("llama")
    editor = Editor(model, tok, small_config(stats_dir, method=method)).prepare()
    report = editor.edit(FACTS)
    seconds = report.seconds
    assert {"score", "values", "keys", "update", "solve", "residual", "commit"} <= set(seconds)
    assert all(t >= 0 for t in seconds.values())
    assert 0 < seconds["solve"] <= seconds["update"]  # propose is timed inside the update
