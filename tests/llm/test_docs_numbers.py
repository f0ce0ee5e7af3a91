"""Tables of the docs that are generated from committed raw figures equal what their script renders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_scale_page_memory_table_is_rendered_from_the_json(benchmark_script):
    render = benchmark_script("render_memory_table")
    page = (ROOT / "docs" / "llm" / "scale.md").read_text()
    results = json.loads((ROOT / "docs" / "assets" / "memory" / "edit_memory.json").read_text())
    assert render.render(page, results) == page, (
        "docs/llm/scale.md's memory table is stale: run .venv/bin/python benchmarks/render_memory_table.py")


def test_render_replaces_only_the_text_between_the_markers(benchmark_script):
    render = benchmark_script("render_memory_table")
    results = {"rows": [], "fit": {}}
    page = f"intro\n{render.START}\nold table\n{render.END}\noutro\n"
    new = render.render(page, results)
    assert new.startswith("intro\n") and new.endswith("\noutro\n") and "old table" not in new
    assert render.render(new, results) == new  # idempotent
    with pytest.raises(ValueError, match="markers|pair"):
        render.render("no markers here", results)
