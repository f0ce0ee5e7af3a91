"""Render the table of ``benchmarks/edit_memory.py``'s raw figures into the Scale page.

    .venv/bin/python benchmarks/render_memory_table.py            # rewrite the table in docs/llm/scale.md
    .venv/bin/python benchmarks/render_memory_table.py --check    # exit 1 if the page's table is stale

The table sits between the marker comments ``<!-- memory-table:start -->`` and
``<!-- memory-table:end -->`` of the page and is generated from the committed JSON
(``docs/assets/memory/edit_memory.json`` by default), never typed by hand; the test
``tests/llm/test_docs_numbers.py`` checks that the page holds exactly what this script renders.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
JSON = ROOT / "docs" / "assets" / "memory" / "edit_memory.json"
PAGE = ROOT / "docs" / "llm" / "scale.md"
START, END = "<!-- memory-table:start -->", "<!-- memory-table:end -->"
MODEL_NAMES = {"smollm2": "SmolLM2-135M", "llama8b": "Llama-3-8B widths, 2 layers", "tiny": "tiny Llama"}


def gb(n: float) -> str:
    """Decimal GB, two decimals (three below 0.1 GB)."""
    return f"{n / 1e9:.2f}" if abs(n) >= 1e8 else f"{n / 1e9:.3f}"


def _stage_increment(row: dict, *names: str) -> int:
    """The largest RSS of the named stages above the RSS before the call."""
    return max((row["stages"][n]["peak"] - row["rss_before"] for n in names if n in row["stages"]), default=0)


def table(results: dict) -> str:
    """The Markdown table of an ``edit_memory.py`` results dict (peaks above the RSS before the call)."""
    lines = ["| model | batch $u$ | RSS before the call | peak of the call | **increment** | values | keys | scoring "
             "| propose + commit | value logits $N \\times V$ (fp32) | seconds |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    rows = list(results["rows"]) + list(results.get("chunked_rows", []))
    for r in rows:
        name = MODEL_NAMES.get(r["model"], r["model"])
        if r.get("value_chunk"):
            name += f", values in sub-batches of {r['value_chunk']}"
        lines.append(
            f"| {name} | {r['batch']} | {gb(r['rss_before'])} GB "
            f"| {gb(r['peak'])} GB | **{gb(r['increment'])} GB** | {gb(_stage_increment(r, 'values'))} GB "
            f"| {gb(_stage_increment(r, 'keys', 'hidden'))} GB "
            f"| {gb(_stage_increment(r, 'score_before', 'score_after'))} GB "
            f"| {gb(_stage_increment(r, 'propose', 'commit'))} GB "
            f"| {gb(r['logits_bytes'])} GB ({r['value_positions']:,} × {r['vocab']:,}) | {r['seconds']:.0f} |")
    for r in results.get("failed_rows", []):
        lines.append(f"| {MODEL_NAMES.get(r['model'], r['model'])} | {r['batch']} | did not fit: {r['failed']} "
                     "| | | | | | | | |")
    for model, f in results.get("fit", {}).items():
        lines.append("")
        lines.append(f"Fit over the {f['points']} batches of {MODEL_NAMES.get(model, model)}: increment ≈ "
                     f"{gb(f['a'])} GB + {f['b'] / 1e6:.1f} MB × $u$.")
    return "\n".join(lines)


def render(page: str, results: dict) -> str:
    """``page`` with the text between the markers replaced by the table of ``results``."""
    if page.count(START) != 1 or page.count(END) != 1 or page.index(START) > page.index(END):
        raise ValueError(f"the page needs exactly one {START} ... {END} pair")
    head, rest = page.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{table(results)}\n{END}{tail}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=str(JSON))
    parser.add_argument("--page", default=str(PAGE))
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 when the page differs")
    args = parser.parse_args(argv)
    results = json.loads(Path(args.json).read_text())
    page = Path(args.page).read_text()
    new = render(page, results)
    if args.check:
        if new != page:
            print(f"{args.page}: the memory table differs from what {args.json} renders", file=sys.stderr)
            return 1
        return 0
    if new != page:
        Path(args.page).write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
