"""One table of every method in several ``rlsedit bench`` folders, at one stream length.

    .venv/bin/python benchmarks/combine_bench.py --at 300 docs/assets/bench/cf1000 docs/assets/bench/cf300

For each method of each folder it takes the scores of *every edit written so far* after ``--at``
edits: the final scoring if the method's stream ended there, or the mid-stream re-scoring of a
longer stream (``rlsedit bench --score-all-at``). Streams must be the same facts (checked on the
case ids). Prints a Markdown table (x100), with the unedited model's scores on the same cases.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rlsedit_llm.evaluation.metrics import harmonic_mean
from rlsedit_llm.evaluation.protocol import base_summary

KEYS = ("efficacy", "generalization", "specificity", "score", "wild")


def scores_at(record: dict, edits: int) -> tuple[dict, str] | None:
    """(scores of every edit so far, where they come from) after ``edits`` edits, or None."""
    final = record.get("final") or {}
    if final.get("edits") == edits:
        return final["all"], "final" + (" (partial stream)" if final.get("partial") else "")
    for point in record.get("checkpoints", []):
        if point["edits"] == edits and point.get("all"):
            return point["all"], f"mid-stream of {record['edits_done']}"
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--at", type=int, required=True, help="stream length to compare at (edits)")
    args = parser.parse_args()
    rows, base, cases = [], None, None
    for folder in args.folders:
        results = json.loads((folder / "results.json").read_text(encoding="utf-8"))
        ids = results["settings"]["case_ids"][: args.at]
        if cases is not None and ids != cases:
            raise SystemExit(f"{folder}: its first {args.at} facts differ from the other folders'")
        cases = ids
        if base is None and len((results.get("base") or {}).get("cases", [])) >= args.at:
            base = base_summary(results["base"], args.at)
        shadows = results["settings"].get("shadow") or []
        for name, record in results["methods"].items():
            got = scores_at(record, args.at)
            if got is None:
                continue
            label = name + (" (shadow)" if name in shadows else "")
            rows.append((label, folder.name, got[1], got[0]))
    print(f"Every edit re-scored after {args.at} edits (x100):\n")
    print("| method | run | from | ES | PS | NS | score | wild |")
    print("|---|---|---|---|---|---|---|---|")
    fmt = lambda x: "—" if x is None else f"{100 * x:.1f}"  # noqa: E731
    if base:
        print(f"| unedited | | | {' | '.join(fmt(base.get(k)) for k in KEYS)} |")
    for label, run, source, s in rows:
        score = s.get("score")
        if score is None and all(s.get(k) is not None for k in KEYS[:3]):
            score = harmonic_mean([s[k] for k in KEYS[:3]])
        print(f"| {label} | {run} | {source} | {fmt(s.get('efficacy'))} | {fmt(s.get('generalization'))} | "
              f"{fmt(s.get('specificity'))} | {fmt(score)} | {fmt(s.get('wild'))} |")


if __name__ == "__main__":
    main()
