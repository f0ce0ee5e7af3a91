"""RLSEdit's trade-off on a real stream: a grid of (alpha, N) fed one stream of keys and values.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/tradeoff.py --leader DIR --out OUT \
        [--alphas 0,5,35,300] [--mom2-weights 15000,default,4x] [--eval-cases 200] [--compare BENCH_DIR]

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
from rlsedit_llm.adapters.spec import write_weight
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
    parser.add_argument("--compare", type=Path, nargs="*", default=[],
                        help="rlsedit bench folders on the same stream: their other methods join the plot")
    parser.add_argument("--plot-only", action="store_true", help="redraw OUT/pareto.png from OUT/tradeoff.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "tradeoff.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {"points": []}
    missing = [str(f) for f in args.compare if not (Path(f) / "results.json").is_file()]
    if missing:
        parser.error(f"--compare: no results.json in {', '.join(missing)}")
    if args.plot_only:
        if "stream" not in results:
            parser.error(f"--plot-only: no finished grid in {results_path}")
        plot(results, out / "pareto.png", compared(args.compare, results["stream"]))
        return

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
    plot(results, out / "pareto.png", compared(args.compare, results["stream"]))


def bench_points(folder: Path, stream: dict) -> dict[str, dict]:
    """The other methods of an ``rlsedit bench`` folder on the same stream, for the plot: each
    method's final scores over every edit and on the retention set, if the grid scored the whole
    stream (``--eval-cases`` at least its length); else nothing, since the two would not compare."""
    results = json.loads((Path(folder) / "results.json").read_text())
    if stream["eval_cases"] < stream["edits"]:
        return {}
    settings = results["settings"]
    out = {}
    for name, rec in results["methods"].items():
        final = rec.get("final") or {}
        if final.get("edits") != stream["edits"] or not final.get("all"):
            continue
        if name == "rlsedit":
            label = _rlsedit_variant(settings)
            if label is None:  # the grid's own alpha = 0 point
                continue
        else:
            label = name + (" (shadow)" if name in settings.get("shadow", []) else "")
        out[label] = {"summary": final["all"], "retention": final["retention"]}
    return out


def _rlsedit_variant(settings: dict) -> str | None:
    """The label of a bench run's RLSEdit that the shadow grid does not contain (own values with
    value-norm anchoring or alpha > 0), or None for the plain alpha = 0 run."""
    changes = []
    if settings.get("anchor_value_norms"):
        changes.append("value norms anchored")
    if settings.get("alpha"):
        changes.append(f"a={settings['alpha']:g}")
    return f"RLSEdit own values, {', '.join(changes)}" if changes else None


def compared(folders: list[Path], stream: dict) -> dict[str, dict]:
    """:func:`bench_points` of several folders; a name seen before gets its folder's name."""
    out = {}
    for folder in folders:
        for name, point in bench_points(folder, stream).items():
            out[name if name not in out else f"{name} ({Path(folder).name})"] = point
    return out


def plot(results: dict, path: Path, others: dict[str, dict] | None = None) -> None:
    """Efficacy, generalization and the retained edits' efficacy against specificity: one marker
    per (alpha, N), a line through each N's alphas, and the other methods of ``others``."""
    plt = _pyplot()
    panels = (("summary", "efficacy", "efficacy (ES)"), ("summary", "generalization", "generalization (PS)"),
              ("retention", "efficacy", "first 10 % of edits: ES"))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    for ax, (part, y, label) in zip(axes, panels, strict=True):
        weights = sorted({p["mom2_weight"] for p in results["points"]})
        for i, mom2 in enumerate(weights):  # RLSEdit in shades of blue, the other methods in other colours
            pts = sorted((p for p in results["points"] if p["mom2_weight"] == mom2), key=lambda p: p["alpha"])
            xs = [p["summary"]["specificity"] for p in pts]
            ys = [p[part][y] for p in pts]
            ax.plot(xs, ys, marker="o", ms=5, color=plt.cm.Blues(0.9 - 0.5 * i / max(1, len(weights) - 1)),
                    label=f"RLSEdit, N={mom2:.0f}")
            for p, x, v in zip(pts, xs, ys, strict=True):
                ax.annotate(f"a={p['alpha']:g}", (x, v), fontsize=7, xytext=(3, 3), textcoords="offset points")
        for j, (name, point) in enumerate((others or {}).items()):
            ax.scatter(point["summary"]["specificity"], point[part][y], marker="sD^vPX*"[j % 7], s=45,
                       color=plt.cm.tab10(1 + j % 9), label=name)
        ax.set_xlabel("specificity (NS)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    st = results["stream"]
    fig.suptitle(f"RLSEdit trade-off (shadow scan): {st['edits']} edits, {st['eval_cases']} scored, "
                 f"{st['edits_per_key_dim']:.2f} edits per key dimension", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
