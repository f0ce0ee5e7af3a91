"""One table of every method in several ``rlsedit bench`` folders, at one or more stream lengths.

    .venv/bin/python benchmarks/combine_bench.py --at 300 docs/assets/bench/cf1000 docs/assets/bench/cf300
    .venv/bin/python benchmarks/combine_bench.py --at 1000,2000,3000 --plot lengths.png RUN1 RUN2 ...
    .venv/bin/python benchmarks/combine_bench.py --at 887 --retention-plot retention.png RUN1 RUN2 ...

For each method of each folder it takes the scores of *every edit written so far* after each
``--at`` length: the final scoring if the method's stream ended there, or the mid-stream
re-scoring of a longer stream (``rlsedit bench --score-all-at``). Beside them, the stream's first
edits (the retention set) re-scored at that length, when the run scored them there. Streams must
be the same facts (checked on the case ids). Prints a Markdown table (x100), with the unedited
model's scores on the same cases; ``--plot`` draws score and first-edit efficacy against length,
``--retention-plot`` every run's first edits at its own checkpoints in one figure.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from rlsedit_llm.evaluation.metrics import harmonic_mean
from rlsedit_llm.evaluation.plots import plot_lengths, plot_retention
from rlsedit_llm.evaluation.protocol import base_summary
from rlsedit_llm.evaluation.results import MethodRecord, Results, Scores, load_results

KEYS = ("efficacy", "generalization", "specificity", "score", "wild")


def scores_at(record: MethodRecord, edits: int) -> tuple[Scores, Scores | None, str] | None:
    """(scores of every edit so far, scores of the first edits or None, where they come from)
    after ``edits`` edits, or None when the run did not score every edit there."""
    final = record.final
    if final is not None and final.edits == edits:
        return final.all, final.retention, "final" + (" (partial stream)" if final.partial else "")
    for point in record.checkpoints:
        if point.edits == edits and point.all is not None:
            return point.all, point.retention, f"mid-stream of {record.edits_done}"
    return None


def _lengths(text: str) -> list[int]:
    try:
        lengths = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--at takes comma-separated edit counts, e.g. 1000,2000; got {text!r}") from None
    if not lengths or min(lengths) < 1:
        raise argparse.ArgumentTypeError(f"--at needs edit counts >= 1; got {text!r}")
    return sorted(set(lengths))


def load_runs(folders: list[Path]) -> list[tuple[Path, Results]]:
    """Each folder's results; raises SystemExit when the streams differ (case ids)."""
    runs: list[tuple[Path, Results]] = []
    cases = None
    for folder in folders:
        results = load_results(folder)
        if results is None:
            raise SystemExit(f"{folder}: no results.json")
        ids = results.settings.case_ids
        common = min(len(ids), len(cases)) if cases is not None else len(ids)
        if cases is not None and ids[:common] != cases[:common]:
            raise SystemExit(f"{folder}: its facts differ from the other folders' (not the same stream)")
        cases = ids if cases is None or len(ids) > len(cases) else cases
        runs.append((folder, results))
    return runs


def _label(name: str, results: Results) -> str:
    return name + (" (shadow)" if name in results.settings.shadow else "")


def collect(folders: list[Path], lengths: list[int]):
    """Rows ``(label, run, edits, all, first, source)`` of every method scored at each length, and
    the unedited model's scores per length; raises SystemExit when the streams differ."""
    rows, base = [], {}
    for folder, results in load_runs(folders):
        for edits in lengths:
            if edits not in base and results.base is not None and len(results.base.cases) >= edits:
                base[edits] = base_summary(results.base, edits)
            for name, record in results.methods.items():
                got = scores_at(record, edits)
                if got is not None:
                    rows.append((_label(name, results), folder.name, edits, *got))
    return _distinct(rows), base


def merge_retention(folders: list[Path]) -> Results:
    """One results record whose methods are every run's, for :func:`plot_retention`: the
    retention set (the stream's first edits) re-scored at each run's checkpoints. A label that
    two runs share gets its run's folder name (its path where the names agree). Raises
    SystemExit when the streams or the retention sets differ."""
    runs = load_runs(folders)
    sizes = {results.config.retention_size if results.config is not None else None for _, results in runs}
    if len(sizes) != 1:
        raise SystemExit(f"the runs re-score different numbers of first edits ({sorted(map(str, sizes))}): "
                         "their retention curves are not comparable")
    names = [folder.name for folder, _ in runs]
    labelled = [(_label(name, results), folder.name if names.count(folder.name) == 1 else str(folder), record)
                for folder, results in runs for name, record in results.methods.items()]
    labels = [label for label, _, _ in labelled]
    methods = {(f"{label} [{run}]" if labels.count(label) > 1 else label): record for label, run, record in labelled}
    return replace(runs[0][1], methods=methods)


def _distinct(rows: list[tuple]) -> list[tuple]:
    """Rows without the copies a longer run carries of a shorter one (``--extend-from``: the same
    method, length and scores); two different runs of one method at one length stay, each label
    then naming its run."""
    kept: dict[tuple, list[tuple]] = {}
    for row in rows:
        same = kept.setdefault((row[0], row[2]), [])
        if all(other[3] != row[3] for other in same):
            same.append(row)
    clash = {key for key, same in kept.items() if len(same) > 1}
    clash_labels = {label for label, _ in clash}
    return [(f"{r[0]} [{r[1]}]" if r[0] in clash_labels else r[0], *r[1:]) for same in kept.values() for r in same]


def _score(s: Scores) -> float | None:
    parts = [s.efficacy, s.generalization, s.specificity]
    if s.score is None and all(p is not None for p in parts):
        return harmonic_mean(parts)
    return s.score


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--at", type=_lengths, required=True,
                        help="stream length(s) to compare at, comma-separated edit counts")
    parser.add_argument("--plot", type=Path, help="also draw score and first-edit efficacy against length here")
    parser.add_argument("--retention-plot", type=Path,
                        help="also draw every run's first edits re-scored at its checkpoints here, in one figure")
    args = parser.parse_args(argv)
    rows, base = collect(args.folders, args.at)
    fmt = lambda x: "—" if x is None else f"{100 * x:.1f}"  # noqa: E731
    print(f"Every edit re-scored after {', '.join(map(str, args.at))} edits (x100); "
          "'first: ES / NS' is the stream's first edits (n) at that length:\n")
    print("| method | run | from | edits | ES | PS | NS | score | wild | first: ES / NS (n) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for edits in args.at:
        if edits in base:
            b = base[edits]
            print(f"| unedited | | | {edits} | {' | '.join(fmt(b.get(k)) for k in KEYS)} | |")
    for label, run, edits, s, first, source in sorted(rows, key=lambda r: (r[0], r[2])):
        kept = "—" if first is None else f"{fmt(first.efficacy)} / {fmt(first.specificity)} ({first.n})"
        print(f"| {label} | {run} | {source} | {edits} | {fmt(s.efficacy)} | {fmt(s.generalization)} | "
              f"{fmt(s.specificity)} | {fmt(_score(s))} | {fmt(s.wild)} | {kept} |")
    if args.plot:
        points: dict[str, list] = {}
        for label, _run, edits, s, first, _source in rows:
            if _score(s) is not None:
                points.setdefault(label, []).append((edits, replace(s, score=_score(s)), first))
        plot_lengths(points, args.plot, base=base or None,
                     title=f"{len(args.folders)} run(s), every edit re-scored at each length")
        print(f"\nplot: {args.plot}")
    if args.retention_plot:
        plot_retention(merge_retention(args.folders), args.retention_plot)
        print(f"\nretention plot: {args.retention_plot}")


if __name__ == "__main__":
    main()
