"""Seconds per edit on SmolLM2-135M, by stage, next to a naive value optimisation.

    .venv/bin/python benchmarks/edit_speed.py [--facts 10] [--batch 5] [--stats-tokens 20000]

Stages: key statistics (cold cache, once per model), keys, value optimisation, and the recursive
update. The naive value optimisation (a full forward pass every step) runs on the same first
batch in the same process, so the speed-up is measured under the same machine load.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

import rlsedit_llm
from rlsedit_llm.pipeline.values import compute_values

DATA = Path(rlsedit_llm.__file__).parent / "data" / "counterfact.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--facts", type=int, default=10)
    parser.add_argument("--batch", type=int, default=5)
    parser.add_argument("--stats-tokens", type=int, default=20_000)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tok = rlsedit_llm.load_model("smollm2")
    facts = rlsedit_llm.as_facts(json.loads(DATA.read_text())[: args.facts])
    with tempfile.TemporaryDirectory() as cache:  # cold statistics cache
        editor = rlsedit_llm.Editor(
            model, tok, rlsedit_llm.EditConfig(stats_tokens=args.stats_tokens, cache_dir=cache)
        )
        totals: dict[str, float] = {}
        for start in range(0, len(facts), args.batch):
            report = editor.edit(facts[start : start + args.batch])
            for stage, sec in report.seconds.items():
                totals[stage] = totals.get(stage, 0.0) + sec

    # Both value paths on the first batch, back to back (the cost does not depend on the weights).
    batch = facts[: args.batch]
    tic = time.perf_counter()
    compute_values(model, tok, editor.spec_, editor.layers_[-1], batch, editor.templates_,
                   editor.value_config_, naive=True)
    naive = time.perf_counter() - tic
    tic = time.perf_counter()
    compute_values(model, tok, editor.spec_, editor.layers_[-1], batch, editor.templates_,
                   editor.value_config_)
    fast = time.perf_counter() - tic

    n = len(facts)
    print(f"SmolLM2-135M, {n} CounterFact edits in batches of {args.batch}, "
          f"{torch.get_num_threads()} torch threads")
    print(f"{'stage':<22}{'total s':>10}{'s / edit':>10}")
    names = {"prepare": "statistics (cold)", "values": "value optimisation", "keys": "keys",
             "update": "update (recursion)", "score": "report scoring"}
    for stage, sec in totals.items():
        print(f"{names.get(stage, stage):<22}{sec:>10.2f}{sec / n:>10.3f}")
    print(f"\nvalue optimisation, one batch of {len(batch)}: fast {fast:.2f} s, naive {naive:.2f} s, "
          f"speed-up {naive / fast:.1f}x (target >= 3x)")


if __name__ == "__main__":
    main()
