"""The published value optimiser (Adam) against the per-fact L-BFGS one, side by side on the same
facts: seconds per edit end to end and by stage, ES/PS/NS and first-batch retention, on SmolLM2.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/value_speed.py --dataset counterfact --facts 200 \\
        --batch 100 --threads 2 --out docs/assets/speed/values_counterfact.json

For each optimiser (``--optimizers``, default ``adam,lbfgs``) the model is put back to its base
weights, a fresh editor (statistics from the cache, computed once before any timing) writes the
same ``--facts`` records (``--start`` onwards) in batches of ``--batch`` as one lifelong stream,
and the editor's own stage timings (``EditReport.seconds``: report scoring, values, keys,
update) are summed. The first batch is scored right after it is written and again after the
last batch (retention); after the stream every edit is scored with the benchmark's metrics
(CounterFact: efficacy, paraphrase generalization, neighbourhood specificity; zsRE: top-1 token
accuracies). Scoring is outside the timed edit calls. All runs are in one process, one after
the other, so their ratios share the machine load. ``--out`` writes the raw figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

os.environ.setdefault("TQDM_DISABLE", "1")  # no progress bars in the printed table
import rlsedit_llm  # noqa: E402
from rlsedit_llm.editing import editor as editor_module  # noqa: E402
from rlsedit_llm.evaluation import data, metrics  # noqa: E402
from rlsedit_llm.pipeline.values import default_value_config  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common beside this script
from _common import EDIT_STAGES, edit_stages, load_average, machine_description  # noqa: E402

STAGES = EDIT_STAGES
SETTINGS = {"adam": "published (Adam, 25 steps)", "lbfgs": "L-BFGS (per-fact stop)"}
METRICS = ("efficacy", "generalization", "specificity")


class _ValueProbe:
    """Wraps the editor's ``compute_values`` to count the loss evaluations each fact took."""

    def __init__(self) -> None:
        self.fact_steps: list[int] = []
        self.inner = editor_module.compute_values

    def __call__(self, *args, **kwargs):
        result = self.inner(*args, **kwargs)
        if result.fact_steps is not None:
            self.fact_steps += result.fact_steps.tolist()
        return result


def run(model, tok, base_weights, facts, dataset: str, batch: int, value, cache: str | None,
        accuracies: bool = True) -> dict:
    """One stream on the base weights: per-stage seconds, wall time of the edit calls, scores."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(base_weights[name])
    config = rlsedit_llm.EditConfig(cache_dir=cache, value=value, replace=False, report_accuracies=accuracies)
    editor = rlsedit_llm.Editor(model, tok, config,
                                take_over=True)
    editor.prepare()
    probe = _ValueProbe()
    editor_module.compute_values = probe
    totals = dict.fromkeys(STAGES, 0.0)
    wall = 0.0
    first_batch = facts[:batch]
    first_after_write = None
    try:
        for start in range(0, len(facts), batch):
            tic = time.perf_counter()
            report = editor.edit(facts[start:start + batch])
            wall += time.perf_counter() - tic
            for stage, t in edit_stages(report.seconds).items():
                totals[stage] += t
            if start == 0:
                first_after_write = metrics.summarize_cases(data.case_scores(dataset, model, tok, first_batch))
    finally:
        editor_module.compute_values = probe.inner
    rows = data.case_scores(dataset, model, tok, facts)
    editor.release()
    steps = probe.fact_steps
    return {"stages": totals, "wall": wall, "summary": metrics.summarize_cases(rows),
            "first_batch_after_write": first_after_write,
            "first_batch_after_stream": metrics.summarize_cases(rows[:batch]),
            "value_evaluations_per_fact": sum(steps) / max(len(steps), 1), "value_config": asdict(value)}


def setting(published, name: str):
    """``"lbfgs+stop_nll=0.002+lbfgs_max_step=1"``: the published ValueConfig with that optimiser and
    those fields (numbers parsed as int or float, ``true``/``false``/``none`` as such, anything else a string)."""
    optimizer, *changes = name.split("+")
    fields: dict = {"optimizer": optimizer}
    for change in changes:
        key, _, text = change.partition("=")
        value: object = {"true": True, "false": False, "none": None}.get(text.lower(), text)
        for kind in (int, float):
            try:
                value = kind(text)
                break
            except ValueError:
                pass
        fields[key] = value
    return replace(published, **fields)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=("counterfact", "zsre"), default="counterfact")
    parser.add_argument("--facts", type=int, default=200)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--start", type=int, default=None,
                        help="first usable record of the stream (default: 1000 for counterfact, 0 for zsre)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--optimizers", default="adam,lbfgs",
                        help="comma-separated settings, each a ValueConfig.optimizer value optionally followed by "
                             "'+field=value' changes of the published ValueConfig, e.g. lbfgs+stop_nll=0.002")
    parser.add_argument("--cache", default=None, help="statistics cache folder (default: the user cache)")
    parser.add_argument("--out", default=None, help="write the raw figures to this JSON file")
    parser.add_argument("--rewrite-only", action="store_true",
                        help="the edit reports score only the rewrite prompts (EditConfig(report_accuracies=False), "
                             "as the bench runs); default: also the paraphrase and neighbourhood prompts")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = args.start if args.start is not None else (1000 if args.dataset == "counterfact" else 0)

    model, tok = rlsedit_llm.load_model("smollm2")
    facts = data.load_stream(args.dataset, start + args.facts, tok, batch_size=args.batch)[start:]
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    published = default_value_config(rlsedit_llm.detect_spec(model))
    names = args.optimizers.split(",")
    machine = machine_description()
    load = load_average()
    rlsedit_llm.Editor(model, tok, rlsedit_llm.EditConfig(cache_dir=args.cache), take_over=True).prepare().release()
    tic = time.perf_counter()
    results = {name: run(model, tok, base, facts, args.dataset, args.batch, setting(published, name), args.cache,
                         accuracies=not args.rewrite_only)
               for name in names}
    total = time.perf_counter() - tic
    load_end = load_average()

    n = len(facts)
    lines = [machine,
             f"SmolLM2-135M, {n} {args.dataset} edits (usable records {start}-{start + n - 1}) in batches of "
             f"{args.batch}, {torch.get_num_threads()} torch threads, load average {load:.2f} at the start and "
             f"{load_end:.2f} at the end, {total:.0f} s for all runs",
             "",
             "| value optimiser | " + " | ".join(f"{v} s/edit" for v in STAGES.values())
             + " | **total s/edit** | evaluations/fact | ES | PS | NS | first batch ES after write | after stream |",
             "|---" * (len(STAGES) + 8) + "|"]
    for name, r in results.items():
        sm, fb0, fb1 = r["summary"], r["first_batch_after_write"], r["first_batch_after_stream"]
        cells = " | ".join(f"{r['stages'][s] / n:.3f}" for s in STAGES)
        lines.append(f"| {SETTINGS.get(name, name)} | {cells} | **{r['wall'] / n:.3f}** | "
                     f"{r['value_evaluations_per_fact']:.1f} | "
                     + " | ".join(f"{100 * sm[k]:.1f}" for k in METRICS)
                     + f" | {100 * fb0['efficacy']:.1f} | {100 * fb1['efficacy']:.1f} |")
    if "adam" in results:
        ref = results["adam"]
        for name, r in results.items():
            if name != "adam":
                lines.append("")
                lines.append(f"{SETTINGS.get(name, name)} vs published: values "
                             f"{ref['stages']['values'] / max(r['stages']['values'], 1e-12):.2f}x faster, "
                             f"end to end {ref['wall'] / max(r['wall'], 1e-12):.2f}x; "
                             + ", ".join(f"{k} {100 * (r['summary'][k] - ref['summary'][k]):+.1f}" for k in METRICS))
    text = "\n".join(lines)
    print(text)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        payload = {"command": " ".join(sys.argv), "machine": machine, "threads": torch.get_num_threads(),
                   "load_average_start": load, "load_average_end": load_end, "dataset": args.dataset,
                   "facts": n, "batch": args.batch, "start": start, "seconds_all_runs": total,
                   "case_ids": [f.case_id for f in facts], "runs": results}
        out.write_text(json.dumps(payload, indent=1, default=str))
        out.with_suffix(".txt").write_text(text + "\n")


if __name__ == "__main__":
    main()
