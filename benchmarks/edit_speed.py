"""Seconds per edit on SmolLM2-135M, by stage, at batch 10 and batch 100, for the published value
optimisation and for ENCORE's most-probable early stopping (MPES), on one held-out stream.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/edit_speed.py [--facts 100] [--start 1000] [--threads 2]

For each value setting and batch size a fresh editor (statistics cached once, before timing)
writes the same ``--facts`` CounterFact records (``--start`` onwards: records no setting was
tuned on) as one stream; the stages are the editor's own timings (report scoring, values, keys,
update). After each stream its edits are scored with the benchmark's CounterFact metrics
(efficacy, generalization, specificity), so the faster setting is measured, not assumed, to keep
them. All runs are in one process, one after the other, so their ratios share the machine load.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

import rlsedit_llm
from rlsedit_llm.evaluation import data, metrics
from rlsedit_llm.pipeline.values import default_value_config

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common beside this script
from _common import EDIT_STAGES, edit_stages, load_average

STAGES = EDIT_STAGES


def run(model, tok, base_weights, facts, batch: int, value, cache: str) -> dict:
    """One stream on the base weights; per-stage seconds, wall time and the CounterFact summary."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(base_weights[name])
    editor = rlsedit_llm.Editor(model, tok, rlsedit_llm.EditConfig(cache_dir=cache, value=value, replace=False),
                                take_over=True)
    editor.prepare()
    totals = dict.fromkeys(STAGES, 0.0)
    tic = time.perf_counter()
    for start in range(0, len(facts), batch):
        report = editor.edit(facts[start:start + batch])
        for stage, t in edit_stages(report.seconds).items():
            totals[stage] += t
    wall = time.perf_counter() - tic
    summary = metrics.summarize_cases(metrics.counterfact_case_scores(model, tok, facts))
    editor.release()
    return {"stages": totals, "wall": wall, "summary": summary}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--facts", type=int, default=100)
    parser.add_argument("--start", type=int, default=1000, help="first CounterFact record of the stream")
    parser.add_argument("--batches", default="10,100", help="batch sizes to time")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model, tok = rlsedit_llm.load_model("smollm2")
    facts = data.load_stream("counterfact", args.start + args.facts, tok)[args.start:]
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    published = default_value_config(rlsedit_llm.detect_spec(model))
    settings = {"published (25 Adam steps)": published, "MPES (stop at top-1)": replace(published, stop_when_top1=True)}
    batches = [int(b) for b in args.batches.split(",")]
    load = load_average()
    with tempfile.TemporaryDirectory() as cache:
        rlsedit_llm.Editor(model, tok, rlsedit_llm.EditConfig(cache_dir=cache), take_over=True).prepare().release()
        results = {(name, b): run(model, tok, base, facts, b, value, cache)
                   for name, value in settings.items() for b in batches}

    print(f"SmolLM2-135M, {len(facts)} CounterFact edits (records {args.start}-{args.start + len(facts) - 1}), "
          f"{torch.get_num_threads()} torch threads, load average {load:.1f} at the start")
    head = "| value setting | batch | " + " | ".join(f"{v} s/edit" for v in STAGES.values())
    print(head + " | total s/edit | ES | PS | NS |")
    print("|---" * (len(STAGES) + 7) + "|")
    for (name, b), r in results.items():
        n = len(facts)
        cells = " | ".join(f"{r['stages'][s] / n:.3f}" for s in STAGES)
        sm = r["summary"]
        print(f"| {name} | {b} | {cells} | {r['wall'] / n:.3f} | {100 * sm['efficacy']:.1f} | "
              f"{100 * sm['generalization']:.1f} | {100 * sm['specificity']:.1f} |")


if __name__ == "__main__":
    main()
