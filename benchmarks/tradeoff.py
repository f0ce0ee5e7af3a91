"""RLSEdit's trade-off on a real stream: a grid of (alpha, N) fed one stream of keys and values.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/tradeoff.py --leader DIR --out OUT \
        [--alphas 0,5,35,300] [--mom2-weights 15000,default,4x] [--eval-cases 200]

``--leader`` is a saved editor (``Editor.save``; e.g. ``OUT/state/rlsedit`` of an
``rlsedit bench`` run) on SmolLM2. Every grid point is a fresh RLSEdit editor on the base weights
that absorbs the leader's journal, batch by batch (``Editor.absorb``): the same keys and absolute
values, only the solver's ``alpha`` and ``N`` differ. This is a *shadow* scan (the values were
optimised on the leader's weights, not the point's own); confirm the chosen settings with runs
that compute their own values. Each point is scored on the first ``--eval-cases`` edits of the
stream (CounterFact efficacy, generalization, specificity and their harmonic score), on the
retention set (the first 10 %), and by the weight deviation. Results go to ``OUT/tradeoff.json``
(resumable: finished points are skipped) and ``OUT/pareto.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import replace
from pathlib import Path

import torch

import rlsedit_llm
from rlsedit_llm.adapters.architectures import write_weight
from rlsedit_llm.evaluation import metrics
from rlsedit_llm.evaluation.plots import _pyplot
from rlsedit_llm.files import atomic_write_text


def _mom2_weights(text: str, default: float) -> list[float]:
    out = []
    for item in text.split(","):
        item = item.strip()
        out.append(default if item == "default" else default * float(item[:-1]) if item.endswith("x") else float(item))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--leader", required=True)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--out", required=True)
    parser.add_argument("--alphas", default="0,5,35,300")
    parser.add_argument("--mom2-weights", default="15000,default,4x")
    parser.add_argument("--eval-cases", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "tradeoff.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {"points": []}

    model, tok = rlsedit_llm.load_model(args.model)
    leader = rlsedit_llm.Editor.load(model, tok, args.leader)  # writes the leader's weights
    journal = list(leader.journal_)
    facts = [f for r in journal for f in r.facts]
    base_config = leader.config
    leader_weights = {l: s.W_.clone() for l, s in leader.solvers_.items()}
    W0 = {l: s.W0_.clone() for l, s in leader.solvers_.items()}
    d_k = leader.spec_.d_k
    leader.release()
    evaluated = facts[: args.eval_cases]
    retention = facts[: max(1, len(facts) // 10)]
    results["stream"] = {"edits": len(facts), "batches": len(journal), "edits_per_key_dim": len(facts) / d_k,
                         "eval_cases": len(evaluated), "retention_cases": len(retention),
                         "leader": {"alpha": base_config.alpha, "mom2_weight": leader.mom2_weight_}}
    done = {(p["alpha"], p["mom2_weight"]) for p in results["points"]}

    grid = [(a, n) for n in _mom2_weights(args.mom2_weights, leader.mom2_weight_)
            for a in (float(x) for x in args.alphas.split(","))]
    for alpha, mom2 in grid:
        if (alpha, mom2) in done:
            continue
        tic = time.perf_counter()
        for layer, W in W0.items():  # the base weights, then a fresh editor on them
            write_weight(leader._module(layer), W)
        config = replace(base_config, alpha=alpha, mom2_weight=mom2)
        editor = rlsedit_llm.Editor(model, tok, config, take_over=True)
        for record in journal:
            editor.absorb(record.facts, record.keys, record.values)
        summary = metrics.summarize_cases(metrics.counterfact_case_scores(model, tok, evaluated))
        kept = metrics.summarize_cases(metrics.counterfact_case_scores(model, tok, retention))
        dev = {str(l): float(torch.linalg.norm(s.W_ - W0[l].to(s.W_))) for l, s in editor.solvers_.items()}
        gap = {str(l): float(torch.linalg.norm(s.W_ - leader_weights[l].to(s.W_)) /
                             torch.linalg.norm(leader_weights[l].to(s.W_) - W0[l].to(s.W_)))
               for l, s in editor.solvers_.items()}
        editor.release()
        results["points"].append({"alpha": alpha, "mom2_weight": mom2, "summary": summary, "retention": kept,
                                  "deviation": dev, "gap_to_leader": gap,
                                  "seconds": round(time.perf_counter() - tic, 1)})
        results["threads"], results["load"] = torch.get_num_threads(), os.getloadavg()[0]
        atomic_write_text(results_path, json.dumps(results, indent=1))
        print(f"alpha {alpha:g}, N {mom2:.0f}: ES {summary['efficacy']:.3f} PS {summary['generalization']:.3f} "
              f"NS {summary['specificity']:.3f} score {summary['score']:.3f} retained ES {kept['efficacy']:.3f}",
              flush=True)
    plot(results, out / "pareto.png")


def plot(results: dict, path: Path) -> None:
    """Efficacy and generalization against specificity, one marker per (alpha, N)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, y in zip(axes, ("efficacy", "generalization")):
        for p in results["points"]:
            s = p["summary"]
            ax.scatter(s["specificity"], s[y], s=30)
            ax.annotate(f"a={p['alpha']:g}, N={p['mom2_weight']:.0f}", (s["specificity"], s[y]), fontsize=7)
        ax.set_xlabel("specificity (NS)")
        ax.set_ylabel(y)
        ax.grid(alpha=0.3)
    st = results["stream"]
    fig.suptitle(f"RLSEdit trade-off (shadow scan): {st['edits']} edits, "
                 f"{st['edits_per_key_dim']:.2f} edits per key dimension", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
