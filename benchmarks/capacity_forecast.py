"""Forecast, then measure: plasticity and retention of a long stream forecast from a sample of keys
before any edit, against the committed 1,000- and 3,000-edit SmolLM2 streams; and the planner's
choice for 1,000, 3,000 and 10,000 expected edits.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/capacity_forecast.py --threads 1   # the raw file and the page
    .venv/bin/python benchmarks/capacity_forecast.py --render-only                   # page and figure from the JSON
    .venv/bin/python benchmarks/capacity_forecast.py --check                         # exit 1 if the page is stale

What it does (SmolLM2-135M, the committed streams' settings: layers 3-7, alpha 0, beta 1, the
width-scaled N, batches of 100, key statistics over 100,000 Wikipedia tokens):

1. samples ``--facts`` simplified-CounterFact facts that are *not* in the committed stream
   (seeded), and computes their keys at the planner's candidate layers on the unedited model;
2. forecasts the default window (:func:`rlsedit_llm.editing.planner.forecast_stream`) at every
   batch of the 3,000-edit stream and on to 10,000 edits, and checks the deterministic
   equivalent against the exact recursion on synthetic keys of the same model
   (``rlsedit_theory.capacity.simulate_states``) at layers 3 and 7;
3. reads the measured curves of the committed runs: each write's per-layer T2 share (the theory
   checks ``docs/assets/bench/theory1000`` and ``theory3000``), its end-to-end residual share
   (``smol3000s/results.json``, ``residual_ratio`` per batch) and the first 100 edits' efficacy
   at every checkpoint;
4. forecasts the levers the planner keeps fixed (N halved and doubled, alpha = 20) and runs the
   planner (:func:`rlsedit_llm.editing.planner.plan_stream`, on the first ``--planner-facts``
   facts of the sample) for 1,000, 3,000 and 10,000 expected edits;
5. writes ``forecast.json`` (raw) and ``forecast.png`` to ``--out`` and renders the numbers of
   the docs page ``docs/llm/capacity.md`` between its ``<!-- capacity:NAME:start/end -->``
   markers (never typed by hand; ``--check`` compares).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

os.environ.setdefault("TQDM_DISABLE", "1")
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common beside this script
from _common import ROOT, machine_description  # noqa: E402

OUT = ROOT / "docs" / "assets" / "capacity"
BENCH = ROOT / "docs" / "assets" / "bench"
PAGE = ROOT / "docs" / "llm" / "capacity.md"
COMMAND = "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/capacity_forecast.py --threads 1"
LENGTHS = (1000, 3000, 10000)
BATCH = 100
BLOCKS = ("keys", "comparison", "retention", "plans", "levers", "run")


# ----------------------------------------------------------------------------------------------
# The measured curves of the committed runs


def measured_curves(bench: Path = BENCH) -> dict:
    """Per-layer T2 shares, end-to-end residual shares and first-100 retention of the committed
    RLSEdit stream (simplified CounterFact, SmolLM2, batches of 100, layers 3-7)."""
    layer_share: dict[str, dict[str, float]] = {}
    for name in ("theory1000", "theory3000"):
        raw = json.loads((bench / name / "theory_check.json").read_text())
        for r in raw["records"]:
            if r["bound"] == "T2" and r["innovation"] > 0:
                layer_share.setdefault(str(r["layer"]), {})[str(r["t"])] = r["measured"] / r["innovation"]
    results = json.loads((bench / "smol3000s" / "results.json").read_text())
    record = results["methods"]["rlsedit"]
    end_to_end = [b["residual_ratio"] for b in record["immediate"]]
    retention = {str(c["edits"]): c["retention"]["efficacy"] for c in record["checkpoints"]}
    settings = results["settings"]
    return {
        "source": ("docs/assets/bench/{theory1000,theory3000}/theory_check.json, "
                   "docs/assets/bench/smol3000s/results.json"),
        "batch": settings["batch_size"], "layers": settings["layers"], "alpha": settings["alpha"],
        "beta": settings["beta"], "mom2_weight": settings["mom2_weight"],
        "layer_share": {l: [v[str(t)] for t in sorted(map(int, v))] for l, v in sorted(layer_share.items())},
        "end_to_end": end_to_end,
        "retention_efficacy": retention,
        "retention_unedited": results["base"]["retention"]["efficacy"],
        "case_ids": settings["case_ids"],
    }


# ----------------------------------------------------------------------------------------------
# The forecasts


def run(args) -> dict:
    import rlsedit_llm
    from rlsedit_llm.adapters.spec import detect_spec
    from rlsedit_llm.editing import planner
    from rlsedit_llm.editing.config import EditConfig
    from rlsedit_llm.editing.statistics import layer_moments
    from rlsedit_theory import capacity

    tic = time.perf_counter()
    torch.set_num_threads(args.threads)
    measured = measured_curves(Path(args.bench))
    model, tok = rlsedit_llm.load_model("smollm2")
    spec = detect_spec(model)
    config = EditConfig()
    default = tuple(spec.default_layers)
    assert list(default) == measured["layers"], "the committed stream edited the default block"
    windows = planner.candidate_windows(default, spec.n_layers, max_layers=args.max_layers)
    every = sorted({l for w in windows for l in w})
    timing: dict[str, float] = {}

    t = time.perf_counter()
    facts = planner.sample_facts(tok, args.facts, seed=args.seed, exclude=measured["case_ids"])
    sample = planner.sample_keys(model, tok, facts, every, config=config, batch=BATCH, spec=spec)
    moments = layer_moments(model, tok, spec, every, config, progress=False)
    timing["keys"] = time.perf_counter() - t

    t = time.perf_counter()
    positions = list(range(0, 3001, BATCH)) + list(range(4000, 10001, 1000))
    forecast = planner.forecast_stream(model, tok, sample, layers=default, edits=positions, config=config,
                                       batch=BATCH, moments=moments, seed=args.seed)
    timing["forecast"] = time.perf_counter() - t

    t = time.perf_counter()
    checks = {}
    for layer in (default[0], default[-1]):
        km = forecast.key_models[layer]
        at = [0, 1000, 2000, 3000]
        sim = capacity.simulate_states(km, at, batch=BATCH, rng=np.random.default_rng(args.seed))
        det = capacity.forecast_shares(km, at, batch=BATCH)
        checks[str(layer)] = {"positions": at, "simulated": sim["share"].tolist(), "equivalent": det["share"].tolist()}
    timing["simulation_check"] = time.perf_counter() - t

    t = time.perf_counter()
    small = sample.head(args.planner_facts)
    shared = [0, BATCH, 1000, 1075, 3000, 10000]
    forecasts: dict = {}
    levers = {}
    n_default = config.resolved_mom2_weight(spec.d_k)
    for name, cfg in (("N/2", replace(config, mom2_weight=n_default / 2)), ("N (default)", config),
                      ("2N", replace(config, mom2_weight=2 * n_default)), ("alpha = 20", replace(config, alpha=20.0))):
        f = planner.forecast_stream(model, tok, small, layers=default, edits=shared, config=cfg, batch=BATCH,
                                    moments=moments, seed=args.seed)
        if name == "N (default)":
            forecasts[default] = f
        levers[name] = {"alpha": cfg.alpha, "mom2_weight": f.mom2_weight, "positions": f.positions,
                        "residual_share": f.residual_share, "retained": f.retained}
    timing["levers"] = time.perf_counter() - t

    t = time.perf_counter()
    plans = {}
    for n in LENGTHS:
        plan = planner.plan_stream(model, n, tokenizer=tok, config=config, batch=BATCH, max_layers=args.max_layers,
                                   seed=args.seed, forecasts=forecasts, sample=small, positions=shared)
        plans[str(n)] = plan.summary()
        plans[str(n)]["config_is_default"] = plan.config == config
    timing["planner"] = time.perf_counter() - t

    raw = {
        "format": "rlsedit-capacity-v1",
        "command": COMMAND,
        "machine": machine_description(),
        "threads": args.threads,
        "seconds": time.perf_counter() - tic,
        "timing": timing,
        "model": "smollm2",
        "d_k": spec.d_k,
        "sample": {"dataset": "counterfact_simple", "facts": len(facts), "seed": args.seed,
                   "excluded": "the committed stream's case ids", "planner_facts": args.planner_facts,
                   "case_ids": [f.case_id for f in facts]},
        "forecast": forecast.to_dict(),
        "simulation_check": checks,
        "measured": {k: v for k, v in measured.items() if k != "case_ids"},
        "levers": levers,
        "plans": plans,
        "planner_windows": {"-".join(map(str, w)): f.to_dict() for w, f in forecasts.items()},
    }
    raw["comparison"] = compare(raw)
    return raw


# ----------------------------------------------------------------------------------------------
# Forecast against measurement


def _at(forecast: dict, key: str, position: int, layer: str | None = None) -> float:
    pos = forecast["positions"]
    values = forecast["per_layer"][layer][key] if layer is not None else forecast[key]
    return float(np.interp(position, pos, values))


def compare(raw: dict) -> dict:
    """Forecast minus measured, per curve: at chosen batches, and the mean error per block of 10
    batches (batch b is written after 100 (b - 1) edits)."""
    f, m = raw["forecast"], raw["measured"]
    batch = m["batch"]
    curves = {f"layer {l}": (l, v) for l, v in m["layer_share"].items()}
    curves["end to end"] = (None, m["end_to_end"])
    out: dict = {"curves": {}, "retention": {}}
    for name, (layer, values) in curves.items():
        rows = []
        for b, v in enumerate(values, start=1):
            pos = batch * (b - 1)
            fc = _at(f, "share", pos, layer) if layer is not None else _at(f, "residual_share", pos)
            rows.append({"batch": b, "edits_before": pos, "measured": v, "forecast": fc, "error": fc - v})
        blocks = {}
        for lo in range(0, len(rows), 10):
            part = rows[lo:lo + 10]
            blocks[f"{part[0]['batch']}-{part[-1]['batch']}"] = float(np.mean([r["error"] for r in part]))
        out["curves"][name] = {"rows": rows, "mean_error_by_block": blocks,
                               "mean_abs_error": float(np.mean([abs(r["error"]) for r in rows]))}
    # eta implied by the measured shares (layers 4-6 are measured to batch 10; later, linear
    # between layers 3 and 7) against the eta the forecast uses.
    from rlsedit_theory import capacity

    rows = []
    first, last = m["layer_share"]["3"], m["layer_share"]["7"]
    for b, e2e in enumerate(m["end_to_end"], start=1):
        shares = []
        for layer in range(3, 8):
            values = m["layer_share"].get(str(layer), [])
            shares.append(values[b - 1] if b <= len(values) else
                          first[b - 1] + (last[b - 1] - first[b - 1]) * (layer - 3) / 4)
        pos = batch * (b - 1)
        rows.append({"batch": b, "measured": capacity.propagation_for(shares, e2e),
                     "forecast": float(np.interp(pos, f["positions"], f["notes"]["propagation_along"]))})
    out["propagation"] = rows
    base = m["retention_unedited"]
    for edits, es in m["retention_efficacy"].items():
        e = int(edits)
        out["retention"][edits] = {"forecast_retained": _at(f, "retained", e), "measured_efficacy": es,
                                   "measured_above_unedited": (es - base) / (1 - base),
                                   "forecast_layer_3": _at(f, "retained", e, "3"),
                                   "forecast_layer_7": _at(f, "retained", e, "7")}
    return out


# ----------------------------------------------------------------------------------------------
# Figure and page


def figure(raw: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    f, m, c = raw["forecast"], raw["measured"], raw["comparison"]
    pos = np.array(f["positions"])
    batch = m["batch"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    ax = axes[0]
    for layer, colour in (("3", "tab:blue"), ("7", "tab:red")):
        ax.plot(pos, f["per_layer"][layer]["share"], color=colour, label=f"layer {layer}: forecast")
        values = m["layer_share"][layer]
        ax.plot(batch * np.arange(len(values)), values, "o", ms=3, color=colour, label=f"layer {layer}: measured")
    ax.set_title("per-layer T2 share of each write")
    ax = axes[1]
    ax.plot(pos, f["residual_share"], color="k", label="forecast (composition)")
    ax.plot(batch * np.arange(len(m["end_to_end"])), m["end_to_end"], "o", ms=3, color="k", label="measured")
    ax.set_title("end-to-end residual share of each write")
    ax = axes[2]
    ax.plot(pos, f["retained"], color="tab:green", label="forecast: first batch's response retained")
    rows = sorted((int(k), v) for k, v in c["retention"].items())
    ax.plot([e for e, _ in rows], [v["measured_efficacy"] for _, v in rows], "o", ms=4, color="tab:green",
            label="measured: first 100 edits holding (ES)")
    ax.plot([e for e, _ in rows], [v["measured_above_unedited"] for _, v in rows], "s", ms=4, mfc="none",
            color="tab:green", label="measured: holding above the unedited model")
    ax.set_title("retention of the first 100 edits")
    for ax in axes:
        ax.axvline(3000, color="grey", lw=0.8, ls=":")
        ax.set_xlabel("edits written before (or, right: in all)")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        top = ax.secondary_xaxis("top", functions=(lambda x: x / raw["d_k"], lambda y: y * raw["d_k"]))
        top.set_xlabel("edits per key dimension", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _p(x: float) -> str:
    return f"{x:.3f}"


def blocks(raw: dict) -> dict[str, str]:
    """The Markdown of each rendered block of the page, from the raw file."""
    c, f = raw["comparison"], raw["forecast"]
    out = {}
    lines = ["| layer | T2 share of the sample's batches at the start: unedited keys | keys as written (emulated) "
             "| Ledoit-Wolf shrinkage |", "|---|---|---|---|"]
    for l, v in f["per_layer"].items():
        lines.append(f"| {l} | {_p(f['notes']['unedited_start_share'][l])} | {_p(v['start_share'])} "
                     f"| {v['shrinkage']:.2f} |")
    out["keys"] = "\n".join(lines)
    lines = ["| batch (edits before it) | layer 3: forecast / measured | layer 7: forecast / measured "
             "| end to end: forecast / measured |", "|---|---|---|---|"]
    for b in (1, 5, 10, 15, 20, 25, 30):
        cells = []
        for name in ("layer 3", "layer 7", "end to end"):
            row = c["curves"][name]["rows"][b - 1]
            cells.append(f"{_p(row['forecast'])} / {_p(row['measured'])}")
        lines.append(f"| {b} ({100 * (b - 1):,}) | " + " | ".join(cells) + " |")
    lines.append("")
    for name in ("layer 3", "layer 7", "end to end"):
        blocks_ = c["curves"][name]["mean_error_by_block"]
        text = ", ".join(f"batches {k}: {v:+.3f}" for k, v in blocks_.items())
        lines.append(f"- {name}: mean error (forecast minus measured) {text}; mean absolute error "
                     f"{c['curves'][name]['mean_abs_error']:.3f}.")
    layers = ", ".join(f"layer {l} {c['curves'][f'layer {l}']['mean_abs_error']:.3f}"
                       for l in ("4", "5", "6") if f"layer {l}" in c["curves"])
    lines.append(f"- Layers 4-6 (measured to 1,000 edits only), mean absolute error: {layers}.")
    eta = c["propagation"]
    text = ", ".join(f"batch {r['batch']}: {r['forecast']:.2f} / {r['measured']:.2f}" for r in eta
                     if r["batch"] in (1, 10, 20, 30))
    lines.append(f"- Propagation eta, forecast / implied by the measured shares: {text}.")
    out["comparison"] = "\n".join(lines)

    lines = ["| after edits | forecast: first batch's response retained (layer 3 / layer 7) "
             "| measured: first 100 holding (ES) | measured: holding above the unedited model |", "|---|---|---|---|"]
    for edits, v in sorted(c["retention"].items(), key=lambda kv: int(kv[0])):
        lines.append(f"| {int(edits):,} | {_p(v['forecast_retained'])} ({_p(v['forecast_layer_3'])} / "
                     f"{_p(v['forecast_layer_7'])}) | {v['measured_efficacy']:.2f} | "
                     f"{v['measured_above_unedited']:.2f} |")
    ten = float(np.interp(10000, f["positions"], f["retained"]))
    lines.append("")
    lines.append(f"Forecast at 10,000 edits (6.5 per key dimension): retained {_p(ten)}, end-to-end residual "
                 f"share {_p(float(np.interp(10000, f['positions'], f['residual_share'])))}.")
    out["retention"] = "\n".join(lines)

    d_k = raw["d_k"]
    lines = ["| expected edits | per key dimension | window chosen | forecast plasticity at that length "
             "| target (default at the reference) | met | candidates compared (plasticity) |",
             "|---|---|---|---|---|---|---|"]
    for n, p in sorted(raw["plans"].items(), key=lambda kv: int(kv[0])):
        layers = p["layers"]
        window = f"{layers[0]}-{layers[-1]}" + (" (the default)" if p["config_is_default"] else "")
        cands = ", ".join(f"{k.split('-')[0]}-{k.split('-')[-1]}: {v:.3f}" for k, v in p["candidates"].items())
        lines.append(f"| {int(n):,} | {int(n) / d_k:.2f} | {window} | {_p(p['plasticity'])} | "
                     f"{_p(p['target_plasticity'])} (at {p['reference_edits']:,}) | {'yes' if p['met'] else 'no'} "
                     f"| {cands} |")
    out["plans"] = "\n".join(lines)

    lines = ["| setting (layers 3-7) | plasticity at 0 | at 1,000 | at 3,000 | at 10,000 "
             "| retained at 1,000 | at 3,000 |", "|---|---|---|---|---|---|---|"]
    for name, v in raw["levers"].items():
        def p_at(e, key="residual_share", v=v):
            return float(np.interp(e, v["positions"], v[key]))
        lines.append(f"| {name} (N = {v['mom2_weight']:.0f}, alpha = {v['alpha']:g}) | {_p(1 - p_at(0))} | "
                     f"{_p(1 - p_at(1000))} | {_p(1 - p_at(3000))} | {_p(1 - p_at(10000))} | "
                     f"{_p(p_at(1000, 'retained'))} | {_p(p_at(3000, 'retained'))} |")
    out["levers"] = "\n".join(lines)

    sim = raw["simulation_check"]
    gap = max(abs(a - b) for v in sim.values() for a, b in zip(v["simulated"], v["equivalent"], strict=True))
    t = raw["timing"]
    out["run"] = (f"Regenerate: `{raw['command']}` ({raw['seconds'] / 60:.1f} min on {raw['threads']} torch "
                  f"thread(s): keys {t['keys']:.0f} s, forecast {t['forecast']:.0f} s, simulation check "
                  f"{t['simulation_check']:.0f} s, levers {t['levers']:.0f} s, planner {t['planner']:.0f} s; "
                  f"{raw['machine']}). Sample: {raw['sample']['facts']} simplified-CounterFact facts outside the "
                  f"committed stream (seed {raw['sample']['seed']}); the planner used the first "
                  f"{raw['sample']['planner_facts']}. Propagation "
                  f"eta = {f['propagation']:.3f}; emulated end-to-end share at the start "
                  f"{f['emulated_share']:.3f}. Deterministic equivalent against the exact recursion on "
                  f"synthetic keys (layers 3 and 7, 0-3,000 edits): largest gap {gap:.4f}.")
    return out


def render_page(raw: dict, page: Path = PAGE) -> str:
    text = page.read_text()
    for name, body in blocks(raw).items():
        start, end = f"<!-- capacity:{name}:start -->", f"<!-- capacity:{name}:end -->"
        if start not in text or end not in text:
            raise SystemExit(f"{page} has no {start} ... {end} block")
        head, rest = text.split(start, 1)
        _, tail = rest.split(end, 1)
        text = f"{head}{start}\n{body}\n{end}{tail}"
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--facts", type=int, default=500, help="facts in the key sample (default 500)")
    parser.add_argument("--planner-facts", type=int, default=200, help="of which the planner uses (default 200)")
    parser.add_argument("--max-layers", type=int, default=9)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--bench", default=str(BENCH), help="the committed runs (default docs/assets/bench)")
    parser.add_argument("--out", default=str(OUT))
    parser.add_argument("--page", default=str(PAGE))
    parser.add_argument("--render-only", action="store_true", help="figure and page from the existing JSON")
    parser.add_argument("--check", action="store_true", help="exit 1 if the page differs from the JSON's rendering")
    args = parser.parse_args(argv)
    out, page = Path(args.out), Path(args.page)
    path = out / "forecast.json"
    if args.check:
        raw = json.loads(path.read_text())
        if render_page(raw, page) != page.read_text():
            print(f"{page} is stale: run benchmarks/capacity_forecast.py --render-only", file=sys.stderr)
            return 1
        return 0
    if args.render_only:
        raw = json.loads(path.read_text())
    else:
        raw = run(args)
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(raw, indent=1) + "\n")
    figure(raw, out / "forecast.png")
    page.write_text(render_page(raw, page))
    print(json.dumps({k: raw[k] for k in ("seconds", "timing", "plans")}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
