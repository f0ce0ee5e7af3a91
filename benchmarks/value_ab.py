"""Paired timing of value settings on SmolLM2: ``compute_values`` on the same facts, the settings
alternated (A, B, A, B, ...) so that a changing machine load falls on both alike.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/value_ab.py --facts 20 --repeats 3 --threads 1 \\
        --settings adam,adam+compute_dtype=bfloat16 --out docs/assets/speed/values_ab.json

Each repeat runs every setting once, in order, on the same ``--facts`` CounterFact records
(``--start`` onwards) at the editor's last edited layer with its templates (statistics are not
needed: only values are computed). Printed per setting: the median seconds of a call, of an
evaluation (a forward and backward over the facts still optimising), the evaluations per fact,
and the mean final NLL; then each setting's median time against the first's. A setting is
``value_speed.py``'s ``optimizer+field=value`` form.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

os.environ.setdefault("TQDM_DISABLE", "1")
import rlsedit_llm  # noqa: E402
from rlsedit_llm.evaluation import data  # noqa: E402
from rlsedit_llm.pipeline.keys import generate_templates  # noqa: E402
from rlsedit_llm.pipeline.values import compute_values, default_value_config  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common and value_speed beside this script
from _common import load_average, machine_description  # noqa: E402
from value_speed import setting  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--facts", type=int, default=20)
    parser.add_argument("--start", type=int, default=1000, help="first CounterFact record")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--settings", default="adam,adam+compute_dtype=bfloat16")
    parser.add_argument("--out", default=None, help="write the raw timings to this JSON file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    model, tok = rlsedit_llm.load_model("smollm2")
    facts = data.load_stream("counterfact", args.start + args.facts, tok)[args.start:]
    editor = rlsedit_llm.Editor(model, tok, take_over=True)
    spec, layer = editor.spec_, editor.layers_[-1]
    config = editor.config
    templates = generate_templates(model, tok, seed=config.template_seed, n=config.n_templates,
                                   length=config.template_length)  # the editor's own
    editor.release()
    published = default_value_config(spec)
    names = args.settings.split(",")
    runs: dict[str, list[dict]] = {n: [] for n in names}
    load_start = load_average()
    for _ in range(args.repeats):
        for name in names:
            tic = time.perf_counter()
            result = compute_values(model, tok, spec, layer, facts, templates, setting(published, name),
                                    progress=False)
            seconds = time.perf_counter() - tic
            assert result.fact_steps is not None and result.final_nll is not None
            runs[name].append({"seconds": seconds, "evaluations": len(result.loss_history),
                               "fact_evaluations": int(result.fact_steps.sum()),
                               "final_nll": float(result.final_nll.mean())})
    load_end = load_average()

    lines = [machine_description(),
             f"SmolLM2-135M, {len(facts)} CounterFact facts (records {args.start}-{args.start + len(facts) - 1}), "
             f"layer {layer}, {len(templates)} templates, {torch.get_num_threads()} torch thread(s), "
             f"{args.repeats} alternated repeats, load average {load_start:.2f} at the start and {load_end:.2f} "
             f"at the end",
             "",
             "| setting | median s/call | median s/evaluation | evaluations/fact | final NLL | time vs first |",
             "|---|---|---|---|---|---|"]
    first = statistics.median(r["seconds"] for r in runs[names[0]])
    for name in names:
        rs = runs[name]
        med = statistics.median(r["seconds"] for r in rs)
        per_eval = statistics.median(r["seconds"] / r["evaluations"] for r in rs)
        lines.append(f"| {name} | {med:.2f} | {per_eval:.3f} | {rs[0]['fact_evaluations'] / len(facts):.1f} | "
                     f"{statistics.mean(r['final_nll'] for r in rs):.4f} | {first / med:.2f}x |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"command": " ".join(sys.argv), "machine": machine_description(),
                                   "threads": torch.get_num_threads(), "load_average_start": load_start,
                                   "load_average_end": load_end, "facts": len(facts), "layer": layer,
                                   "templates": templates, "runs": runs}, indent=1))
        out.with_suffix(".txt").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
