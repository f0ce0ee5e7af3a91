"""Leaderboard tables of ``rlsedit bench`` runs: every method with 95 % intervals, and which of its
differences from RLSEdit are resolved.

    .venv/bin/python benchmarks/leaderboard.py                      # every run in docs/assets/bench
    .venv/bin/python benchmarks/leaderboard.py RUN1 RUN2 ... --out leaderboard.md

Runs are grouped by model, data set, stream length, batch size, fluency protocol and zsRE target:
one table per group. Inside a group a method (with its settings: a shadow, value-norm anchoring,
non-default hyperparameters) may have run on several streams (``rlsedit bench --stream S``); its
row pools them. Per method: efficacy, generalization, specificity and their harmonic score (x100)
with 95 % intervals (:mod:`rlsedit_llm.evaluation.intervals`: over facts for one stream, over
streams then facts for several), fluency and the generation NLL (means over streams), editing
seconds per edit (values, keys and solver update; scoring excluded) and where it ran (torch threads
or GPU). The last columns compare each method with RLSEdit (the ``rlsedit`` row of the group, own
values, default settings) on the streams both ran: the paired difference RLSEdit - method of the
score with its interval, and the metrics on which RLSEdit wins or loses, i.e. where the interval
of the difference excludes 0.

Runs recorded before the bench kept per-fact final rows (every run committed before this script)
carry only each metric's mean over facts. Where a metric is 0/1 per fact (efficacy on CounterFact;
all three on simplified CounterFact, one paraphrase and one neighbour per record), the 0/1 values
follow from the mean and the count, so its interval over facts is exact; but which facts they
were is not known, so the score's interval treats the three metrics as independent and a
difference from RLSEdit is unpaired (marked ``≈``). A metric that is not 0/1 (zsRE token
accuracies, CounterFact's averages over several prompts) has no interval in such runs (``—``).
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rlsedit_llm.evaluation.bench_config import DEFAULT_METHOD_SETTINGS, SHADOW_LEADER
from rlsedit_llm.evaluation.intervals import (
    SCORE_METRICS,
    Difference,
    Estimate,
    paired_difference,
    paired_matrices,
    stream_interval,
)
from rlsedit_llm.evaluation.results import MethodRecord, Results, load_results

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "docs" / "assets" / "bench"
REFERENCE = SHADOW_LEADER  # the row every other method is compared with
_SHORT = {"efficacy": "ES", "generalization": "PS", "specificity": "NS", "score": "score"}


# ----------------------------------------------------------------------------------------------
# One method on one stream


@dataclass
class Entry:
    """One method of one run: its label, the stream it ran on, its final record and run."""

    label: str
    run: str
    stream: str  # the stream's identity: seed and a digest of its case ids
    seed: int
    record: MethodRecord
    results: Results

    def facts(self, rng: np.random.Generator) -> tuple[np.ndarray, str]:
        """The per-fact values (n, 3) of efficacy, generalization and specificity (NaN: not known)
        and where they come from: ``rows`` (kept per-fact rows) or ``counts`` (0/1 metrics
        rebuilt from mean and count, each column in a random order; other metrics NaN)."""
        final = self.record.final
        assert final is not None
        if final.cases:
            return np.array([[_num(r.get(m)) for m in SCORE_METRICS] for r in final.cases]), "rows"
        n = final.all.n
        cols = []
        for m in SCORE_METRICS:
            mean = final.all.get(m)
            if mean is None or not binary(self.results.settings.stream.dataset, m):
                cols.append(np.full(n, np.nan))
                continue
            ones = int(round(mean * n))
            cols.append(rng.permutation(np.r_[np.ones(ones), np.zeros(n - ones)]))
        return np.stack(cols, axis=1), "counts"


def binary(dataset: str, metric: str) -> bool:
    """Whether ``metric`` is 0/1 per fact on ``dataset`` (one prompt decides it)."""
    return dataset == "counterfact_simple" or (dataset == "counterfact" and metric == "efficacy")


def _num(x: Any) -> float:
    return float("nan") if x is None else float(x)


def label(name: str, results: Results) -> str:
    """The method's name with what sets this run of it apart: a shadow, value-norm anchoring,
    alpha/beta/value steps off their defaults, its own settings off the bench's defaults."""
    s = results.settings
    parts = [name]
    if name in s.shadow:
        parts.append("(shadow)")
    if s.anchor_value_norms:
        parts.append("+norm-anchor")
    if s.alpha != 0.0 or s.beta != 1.0:
        parts.append(f"α={s.alpha:g} β={s.beta:g}")
    if s.value_steps is not None:
        parts.append(f"steps={s.value_steps}")
    defaults = DEFAULT_METHOD_SETTINGS.get(name, {})
    own = {k: v for k, v in (s.method_settings.get(name) or {}).items() if defaults.get(k) != v}
    parts += [f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(own.items())]
    return " ".join(parts)


def _stream_id(results: Results) -> str:
    digest = hashlib.sha256(repr(tuple(results.settings.case_ids)).encode()).hexdigest()[:8]
    return f"{results.settings.stream.stream_seed}:{digest}"


def group_key(results: Results) -> tuple:
    """What a leaderboard table shares: model, data set, length, batch, fluency protocol, zsRE target."""
    c = results.settings.stream
    return (results.settings.model, c.dataset, c.n_edits, c.batch_size, c.fluency_protocol,
            c.zsre_target if c.dataset == "zsre" else None)


def where_ran(results: Results, name: str) -> str:
    """The devices and torch threads of the sessions that ran ``name`` (all sessions if none names it)."""
    sessions = [s for s in results.sessions if name in s.methods] or results.sessions
    seen = []
    for s in sessions:
        gpu = s.machine.get("cuda")
        text = f"GPU {gpu}" if gpu and (s.device or "cpu") != "cpu" else f"CPU, {s.machine.get('torch_threads')} thr."
        if text not in seen:
            seen.append(text)
    return " / ".join(seen) or "—"


# ----------------------------------------------------------------------------------------------
# Collecting runs into groups


@dataclass
class Group:
    key: tuple
    entries: dict[str, dict[str, Entry]] = field(default_factory=dict)  # label -> stream -> entry
    skipped: list[str] = field(default_factory=list)


def collect(folders: Sequence[Path]) -> list[Group]:
    """The finished methods of every run, grouped (see the module docstring); a method whose
    stream stopped early is listed as skipped. Two runs of one label on one stream keep both,
    each label then naming its run."""
    groups: dict[tuple, Group] = {}
    for folder in folders:
        results = load_results(folder)
        if results is None:
            raise SystemExit(f"{folder}: no results.json (name the folder of an rlsedit bench run)")
        group = groups.setdefault(group_key(results), Group(group_key(results)))
        for name, rec in results.methods.items():
            if not rec.done or rec.final is None or rec.final.partial:
                group.skipped.append(f"{name} in {folder.name} (not finished: {rec.edits_done} edits)")
                continue
            entry = Entry(label(name, results), folder.name, _stream_id(results),
                          results.settings.stream.stream_seed, rec, results)
            streams = group.entries.setdefault(entry.label, {})
            if entry.stream in streams:  # the same method twice on one stream: name the runs
                other = streams.pop(entry.stream)
                other.label = f"{other.label} [{other.run}]"
                group.entries.setdefault(other.label, {})[other.stream] = other
                entry.label = f"{entry.label} [{entry.run}]"
                group.entries.setdefault(entry.label, {})[entry.stream] = entry
                if not streams:
                    del group.entries[label(name, results)]
            else:
                streams[entry.stream] = entry
    return list(groups.values())


# ----------------------------------------------------------------------------------------------
# Estimates


@dataclass
class Row:
    label: str
    streams: int
    estimates: dict[str, Estimate | float | None]  # metric -> interval, or a mean only, or None
    source: str  # rows, counts or mixed
    fluency: float | None
    nll: float | None
    sec_per_edit: float | None
    where: str
    versus: dict[str, Difference | None] = field(default_factory=dict)


def _mean(values: list[float | None]) -> float | None:
    got = [v for v in values if v is not None]
    return float(np.mean(got)) if got else None


def estimate_row(lbl: str, entries: Mapping[str, Entry], *, n_resamples: int, seed: int) -> Row:
    """A method's row: per metric and the score, an interval where the per-fact values allow, else
    the mean over streams of the recorded means."""
    rng = np.random.default_rng(seed)
    per_stream = [e.facts(rng) for e in entries.values()]
    sources = {src for _, src in per_stream}
    mats = [m for m, _ in per_stream]
    out: dict[str, Estimate | float | None] = {}
    for j, metric in enumerate(SCORE_METRICS):
        cols = [m[:, j] for m in mats]
        if all(np.isfinite(c).sum() >= 2 for c in cols):
            out[metric] = stream_interval(cols, n_resamples=n_resamples, rng=rng)
        else:
            out[metric] = _mean([e.record.final.all.get(metric) for e in entries.values() if e.record.final])
    if all(isinstance(out[m], Estimate) for m in SCORE_METRICS):
        out["score"] = stream_interval(mats, statistic="score", n_resamples=n_resamples, rng=rng)
    else:
        out["score"] = _mean([e.record.final.all.score for e in entries.values() if e.record.final])
    finals = [e.record.final for e in entries.values() if e.record.final is not None]
    edits = sum(e.record.edits_done for e in entries.values())
    seconds = sum(e.record.seconds_edit for e in entries.values())
    first = next(iter(entries.values()))
    name = lbl.split(" ")[0]
    return Row(lbl, len(entries), out, "mixed" if len(sources) > 1 else sources.pop(),
               _mean([None if f.fluency is None else 100 * f.fluency for f in finals]),
               _mean([f.generation_nll for f in finals]), seconds / edits if edits else None,
               where_ran(first.results, name))


def versus_reference(ref: Mapping[str, Entry], other: Mapping[str, Entry], *, n_resamples: int,
                     seed: int) -> dict[str, Difference | None]:
    """RLSEdit - method, per metric and the score, on the streams both ran: paired by case id
    where both kept per-fact rows, else unpaired from the 0/1 counts; None where neither works."""
    shared = [s for s in ref if s in other]
    out: dict[str, Difference | None] = dict.fromkeys((*SCORE_METRICS, "score"))
    if not shared:
        return out
    rng = np.random.default_rng(seed)
    pairs = []
    for s in shared:
        a, b = ref[s], other[s]
        fa, fb = a.record.final, b.record.final
        assert fa is not None and fb is not None
        if fa.cases and fb.cases:
            pairs.append(paired_matrices(fa.cases, fb.cases, SCORE_METRICS))
        else:  # counts only: random row orders make the bootstrap an unpaired one
            pairs.append((a.facts(rng)[0], b.facts(rng)[0]))
    for j, metric in enumerate(SCORE_METRICS):
        if all(np.isfinite(x[:, j]).sum() >= 2 and np.isfinite(y[:, j]).sum() >= 2 for x, y in pairs):
            out[metric] = paired_difference([x[:, j] for x, _ in pairs], [y[:, j] for _, y in pairs],
                                            n_resamples=n_resamples, rng=rng)
    if all(out[m] is not None for m in SCORE_METRICS):
        out["score"] = paired_difference([x for x, _ in pairs], [y for _, y in pairs], statistic="score",
                                         n_resamples=n_resamples, rng=rng)
    return out


# ----------------------------------------------------------------------------------------------
# Markdown


def _cell(x: Estimate | float | None, approx: bool = False) -> str:
    if x is None:
        return "—"
    if isinstance(x, Estimate):
        return f"{100 * x.value:.1f} [{100 * x.low:.1f}, {100 * x.high:.1f}]" + (" ≈" if approx else "")
    return f"{100 * x:.1f} (—)"


def _diff_cell(d: Difference | None, approx: bool) -> str:
    if d is None:
        return "—"
    return f"{100 * d.value:+.1f} [{100 * d.low:+.1f}, {100 * d.high:+.1f}]" + (" ≈" if approx else "")


def _verdict(versus: Mapping[str, Difference | None]) -> str:
    wins = [_SHORT[m] for m, d in versus.items() if d is not None and d.win]
    losses = [_SHORT[m] for m, d in versus.items() if d is not None and d.loss]
    parts = ([f"wins {', '.join(wins)}"] if wins else []) + ([f"loses {', '.join(losses)}"] if losses else [])
    if not parts:
        return "none resolved" if any(d is not None for d in versus.values()) else "—"
    return "; ".join(parts)


def render_group(group: Group, *, n_resamples: int, seed: int) -> list[str]:
    model, dataset, n_edits, batch, fluency, target = group.key
    n_streams = len({s for streams in group.entries.values() for s in streams})
    title = (f"### {model} · {dataset} · {n_edits:,} edits in batches of {batch} · fluency {fluency}"
             + (f" · zsRE target {target}" if target else "")
             + f" · {n_streams} stream{'s' if n_streams != 1 else ''}")
    rows = [estimate_row(lbl, ent, n_resamples=n_resamples, seed=seed) for lbl, ent in group.entries.items()]
    ref = group.entries.get(REFERENCE)
    if ref is not None:
        for row in rows:
            if row.label != REFERENCE:
                row.versus = versus_reference(ref, group.entries[row.label], n_resamples=n_resamples, seed=seed)
    rows.sort(key=lambda r: -(r.estimates["score"].value if isinstance(r.estimates["score"], Estimate)
                              else (r.estimates["score"] or 0.0)))
    lines = [title, "",
             "| method | streams | ES | PS | NS | score | fluency | gen. NLL | s/edit | ran on | "
             f"{REFERENCE} − method: score | {REFERENCE} vs method |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        approx = r.source != "rows"
        ref_approx = approx or (ref is not None and any(not (e.record.final and e.record.final.cases)
                                                        for e in ref.values()))
        est = r.estimates
        lines.append(
            f"| {r.label} | {r.streams} | {_cell(est['efficacy'])} | {_cell(est['generalization'])} | "
            f"{_cell(est['specificity'])} | {_cell(est['score'], approx)} | "
            f"{'—' if r.fluency is None else f'{r.fluency:.1f}'} | {'—' if r.nll is None else f'{r.nll:.2f}'} | "
            f"{'—' if r.sec_per_edit is None else f'{r.sec_per_edit:.2f}'} | {r.where} | "
            + ("(reference) | |" if r.label == REFERENCE else
               f"{_diff_cell(r.versus.get('score'), ref_approx)} | {_verdict(r.versus)} |"))
    notes = []
    if n_streams == 1:
        notes.append("1 stream: intervals over facts only (they do not include the variation between streams).")
    if ref is None:
        notes.append(f"No {REFERENCE} run in this group: no comparison.")
    if any(r.source != "rows" for r in rows):
        notes.append("≈: per-fact rows not recorded; 0/1 metrics rebuilt from their counts, the score's metrics "
                     "resampled as independent, differences unpaired. (—): no interval (a metric that is not 0/1 "
                     "per fact, without per-fact rows).")
    if any("(shadow)" in r.label for r in rows):
        notes.append(f"A shadow writes {REFERENCE}'s keys and values (its own solver only): its s/edit is the solver's "
                     "alone, and its scores compare solvers, not whole methods.")
    if group.skipped:
        notes.append("Skipped: " + "; ".join(group.skipped) + ".")
    runs = sorted({e.run for streams in group.entries.values() for e in streams.values()})
    notes.append("Runs: " + ", ".join(f"`{r}`" for r in runs) + ".")
    return lines + [""] + notes + [""]


def render(groups: Sequence[Group], *, n_resamples: int = 2000, seed: int = 0) -> str:
    order = sorted(groups, key=lambda g: (g.key[0] != "smollm2", *(("", v) if v is None else (type(v).__name__, v)
                                                                  for v in g.key)))
    lines = ["Scores x100 with 95 % bootstrap intervals [low, high] (rlsedit_llm.evaluation.intervals); "
             "wins and losses are differences whose interval excludes 0.", ""]
    for group in order:
        lines += render_group(group, n_resamples=n_resamples, seed=seed)
    return "\n".join(lines)


def _runs(paths: Sequence[Path]) -> list[Path]:
    if paths:
        return list(paths)
    return sorted(p.parent for p in ASSETS.glob("*/results.json"))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="*", type=Path,
                        help=f"rlsedit bench run folders (default: every run under {ASSETS.relative_to(ROOT)})")
    parser.add_argument("--out", type=Path, help="also write the Markdown here")
    parser.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples per interval (2000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap's random generator (0)")
    args = parser.parse_args(argv)
    if args.resamples < 100:
        parser.error("--resamples must be at least 100")
    text = render(collect(_runs(args.folders)), n_resamples=args.resamples, seed=args.seed)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
