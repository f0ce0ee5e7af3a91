"""UltraEdit's step size on SmolLM2-135M: does any ``lr`` make it edit, and at what cost to specificity?

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/ultraedit_tune.py [--facts 100] [--start 1000]
        [--batch 100] [--lr-scales 1,10,100,1000] [--ridges 1] [--threads 1]

The released UltraEdit settings (``lr = 1e-6`` on Llama-3-8B, scaled here to ``d_k`` as
:class:`~rlsedit_llm.editing.ultraedit.UltraEditor` does by default; ``ridge = 1``) barely move
SmolLM2 (300-edit stream: efficacy 19.7 against 18.3 unedited). This script writes one held-out
CounterFact stream (records ``--start`` onwards of the usable ones, disjoint from the bench's
streams, which take the first records) from the unedited weights for every ``(lr scale, ridge)``
and prints efficacy, generalization, specificity (x100) and seconds per edit, so that the
benchmark page can report UltraEdit at its best setting on this model besides the released one.
It is a tuning scan on held-out facts, not a result: the chosen setting is then run on the
bench's stream like every other method.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

import rlsedit_llm
from rlsedit_llm.editing.ultraedit import UltraEditor
from rlsedit_llm.evaluation import data, metrics

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common beside this script
from _common import load_average


def run(model, tok, base, facts, batch: int, lr_scale: float, ridge: float) -> dict:
    """One stream from the unedited weights; summary and seconds per edit."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(base[name])
    probe = UltraEditor(model, tok, ridge=ridge)
    editor = UltraEditor(model, tok, lr=probe.lr_ * lr_scale, ridge=ridge)
    tic = time.perf_counter()
    for start in range(0, len(facts), batch):
        editor.edit(facts[start:start + batch])
    seconds = time.perf_counter() - tic
    summary = metrics.summarize_cases(metrics.counterfact_case_scores(model, tok, facts))
    return {"lr": editor.lr_, "seconds_per_edit": seconds / len(facts), "summary": summary}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--facts", type=int, default=100)
    parser.add_argument("--start", type=int, default=1000, help="first usable CounterFact record of the stream")
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--lr-scales", default="1,10,100,1000", help="multiples of the width-scaled released lr")
    parser.add_argument("--ridges", default="1")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model, tok = rlsedit_llm.load_model("smollm2")
    facts = data.load_stream("counterfact", args.start + args.facts, tok)[args.start:]
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    load = load_average()
    unedited = metrics.summarize_cases(metrics.counterfact_case_scores(model, tok, facts))
    rows = [(s, r, run(model, tok, base, facts, args.batch, float(s), float(r)))
            for r in args.ridges.split(",") for s in args.lr_scales.split(",")]

    print(f"SmolLM2-135M, UltraEdit, {len(facts)} held-out CounterFact edits (usable records "
          f"{args.start}-{args.start + len(facts) - 1}) in batches of {args.batch}, "
          f"{torch.get_num_threads()} torch threads, load average {load:.1f} at the start")
    print("| lr scale | lr | ridge | ES | PS | NS | score | s/edit |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| unedited | | | {100 * unedited['efficacy']:.1f} | {100 * unedited['generalization']:.1f} | "
          f"{100 * unedited['specificity']:.1f} | {100 * unedited['score']:.1f} | |")
    for scale, ridge, r in rows:
        sm = r["summary"]
        print(f"| {scale} | {r['lr']:.3g} | {ridge} | {100 * sm['efficacy']:.1f} | {100 * sm['generalization']:.1f} | "
              f"{100 * sm['specificity']:.1f} | {100 * sm['score']:.1f} | {r['seconds_per_edit']:.3f} |")


if __name__ == "__main__":
    main()
