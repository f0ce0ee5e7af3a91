"""Peak memory of ONE ``Editor.edit`` call, by stage, at several batch sizes.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/edit_memory.py            # SmolLM2 at 10/100/500, 8B shape at 10/100
    .venv/bin/python benchmarks/edit_memory.py --configs smollm2:10,llama8b:10 --out mem.json
    .venv/bin/python benchmarks/edit_memory.py --dry-run                    # a tiny random model, batches 2 and 4 (CI)

Each configuration (model and batch) runs in a **fresh subprocess**, so no configuration sees the
allocator state of another. The child loads the model, prepares an editor (statistics from the
cache, the state built), and then makes one edit of ``batch`` CounterFact facts. Memory is the
process's resident set (RSS) as the kernel counts it, read from ``/proc/self/status``:

* ``rss_before``: ``VmRSS`` right before the call (model, editor state, interpreter);
* ``peak``: ``VmHWM`` over the call, after the high-water mark was reset to the current RSS by
  writing ``5`` to ``/proc/self/clear_refs`` just before it (Linux >= 4.0). This is the kernel's
  own high-water mark, not sampling, and it excludes what preparing the editor used (the state
  build's temporaries are larger than an edit at the 8B widths, so ``ru_maxrss`` alone would hide
  the edit). ``increment = peak - rss_before``.
* **per stage**: the editor's calls of ``report_scores`` (before and after the write),
  ``compute_values``, ``compute_keys``, ``subject_hidden_states``, each solver's ``propose`` and
  the commit are wrapped: each resets the high-water mark on entry and reads it on exit, so a
  stage's ``peak`` is the process's RSS high-water mark during that stage alone (``entry``: the
  RSS when it started). The call's peak is the largest of the stages' and of the gaps between them.

Memory freed by torch goes back to glibc; blocks over its mmap threshold (at most 32 MB) go back to
the kernel at once, smaller ones may stay in the heap and be reused by the next stage, so a
stage's ``peak - entry`` can understate what it would need alone; its ``peak`` is exact.

The value optimisation's peak is its first evaluations (every fact active; later evaluations
run only the facts still optimising, and Adam's state is two ``(u, d_model)`` tensors), so the
memory runs use ``--value-steps 2`` (one forward and backward with every fact) to keep the
500-fact batch within minutes on the CPU; ``--check-steps`` repeats the first configuration with
the published 25 steps to show the peak is the same.

Models: ``smollm2`` (SmolLM2-135M offline, ``EditConfig(stats_tokens=20_000)``: the statistics
``make demo`` cached; the default layers, five templates of ten tokens, the published value lr);
``llama8b`` (refused at present by the float32 state checks, see docs/llm/scale.md):
benchmarks/scale.py's random model with Llama-3-8B's widths (hidden 4096, MLP 14336)
and 2 decoder layers in bf16, its tiny tokenizer (vocabulary 512), one edited layer with a float32
state, alpha 1 and the default N (scale.py's N = 1 is refused by a float32 state), one template of four tokens;
``tiny`` (``--dry-run``): a tiny random Llama.

For each configuration the script also reports the size of the value optimisation's logits,
``N x vocab x 4`` bytes with ``N`` the positions the loss reads (every target token of every
template row, plus one KL row per fact), and fits ``increment = a + b u`` over the batches of a
model. ``--out FILE.json`` writes every figure.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common beside this script
from _common import ROOT, load_average
from render_memory_table import gb, table

DEFAULT_CONFIGS = "smollm2:10,smollm2:100,smollm2:500,llama8b:10,llama8b:100"
DRY_CONFIGS = "tiny:2,tiny:4"
STAGES = ("score_before", "values", "keys", "hidden", "propose", "commit", "score_after")


# -- the kernel's RSS counters -------------------------------------------------------------------
def _status_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def rss() -> int:
    """Resident set size now (bytes)."""
    return _status_kb("VmRSS") * 1024


def hwm() -> int:
    """The RSS high-water mark since the last :func:`reset_hwm` (bytes)."""
    return _status_kb("VmHWM") * 1024


def reset_hwm() -> None:
    """Reset the high-water mark to the current RSS (Linux: ``5`` into ``/proc/self/clear_refs``)."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def hwm_resettable() -> bool:
    try:
        reset_hwm()
        return True
    except OSError:
        return False


class Meter:
    """Per-stage RSS peaks within one call; the call's peak is the largest seen anywhere."""

    def __init__(self) -> None:
        self.stages: dict[str, dict] = {}
        self.peak = 0

    def start(self) -> int:
        reset_hwm()
        self.peak = 0
        return rss()

    def wrap(self, name: str, fn):
        def wrapped(*args, **kwargs):
            self.peak = max(self.peak, hwm())  # the gap since the last stage
            entry = rss()
            reset_hwm()
            try:
                return fn(*args, **kwargs)
            finally:
                peak = hwm()
                self.peak = max(self.peak, peak)
                row = self.stages.setdefault(name, {"calls": 0, "peak": 0, "entry": 0, "increment": 0})
                row["calls"] += 1
                if peak > row["peak"]:
                    row["peak"], row["entry"] = peak, entry
                row["increment"] = max(row["increment"], peak - entry)
        return wrapped

    def finish(self) -> int:
        self.peak = max(self.peak, hwm())
        return self.peak


# -- the child: one configuration ----------------------------------------------------------------
def _load(model_name: str, args):
    import torch

    import rlsedit_llm
    from rlsedit_llm import EditConfig, ValueConfig
    from rlsedit_llm.pipeline.values import default_value_config

    if model_name == "smollm2":
        model, tok = rlsedit_llm.load_model("smollm2")
        value = default_value_config(rlsedit_llm.detect_spec(model))
        cfg = EditConfig(stats_tokens=20_000, value=ValueConfig(lr=value.lr, steps=args.value_steps),
                         report_accuracies=not args.rewrite_only)
    elif model_name == "llama8b":
        from scale import build_model  # benchmarks/scale.py: Llama-3-8B widths, the tiny tokenizer

        from rlsedit_llm.adapters.spec import default_layers

        model, tok = build_model(args.layers_8b, torch.bfloat16, "cpu", False)
        # N at the editor's default (15000 d_k / 14336): scale.py's N = 1 makes lambda = k^T C k so large that a
        # float32 state refuses the batch (HyperparameterError in propose)
        cfg = EditConfig(layers=default_layers("llama", args.layers_8b)[:1], alpha=1.0,
                         stats_tokens=args.stats_tokens_8b, stats_max_length=256, state_dtype="float32",
                         cache_dir=args.cache_dir, n_templates=1, template_length=4,
                         value=ValueConfig(steps=args.value_steps), report_accuracies=not args.rewrite_only)
    elif model_name == "tiny":
        from rlsedit_llm.adapters.tiny import tiny_model

        model, tok = tiny_model("llama", init_std=0.3)
        cfg = EditConfig(alpha=1e-3, mom2_weight=1.0, n_templates=2, template_length=4, stats_max_length=64,
                         stats_tokens=500, cache_dir=args.cache_dir, value=ValueConfig(steps=args.value_steps))
    else:
        raise SystemExit(f"unknown model {model_name!r}; use smollm2, llama8b or tiny")
    return model, tok, cfg


def run_child(model_name: str, batch: int, args) -> dict:
    import torch

    import rlsedit_llm
    from rlsedit_llm.editing import editor as editor_module
    from rlsedit_llm.evaluation import data
    from rlsedit_llm.pipeline.values import _build_rows

    torch.set_num_threads(args.threads)
    start_rss = rss()
    model, tok, cfg = _load(model_name, args)
    if args.value_chunk:  # the library's sub-batching of the value stage (ValueConfig.max_batch)
        cfg = dataclasses.replace(cfg, value=dataclasses.replace(cfg.value, max_batch=args.value_chunk))
    facts = data.load_stream("counterfact", batch, tok, batch_size=batch)
    editor = rlsedit_llm.Editor(model, tok, cfg, take_over=True)
    tic = time.perf_counter()
    editor.prepare()
    prepare_s = time.perf_counter() - tic
    prepare_peak = hwm()  # since the process started: the load and the preparation

    meter = Meter()
    names = {"report_scores": None, "compute_values": "values", "compute_keys": "keys",
             "subject_hidden_states": "hidden"}
    originals = {name: getattr(editor_module, name) for name in names}
    scores_seen: list[str] = []

    def score_wrapper(*a, **k):
        stage = "score_before" if not scores_seen else "score_after"
        scores_seen.append(stage)
        return meter.wrap(stage, originals["report_scores"])(*a, **k)

    for name, stage in names.items():
        fn = originals[name]
        setattr(editor_module, name, score_wrapper if stage is None else meter.wrap(stage, fn))
    for solver in editor.solvers_.values():
        solver.propose = meter.wrap("propose", solver.propose)  # type: ignore[method-assign]
    editor._commit = meter.wrap("commit", editor._commit)  # type: ignore[method-assign]
    try:
        rss_before = meter.start()
        tic = time.perf_counter()
        report = editor.edit(facts)
        seconds = time.perf_counter() - tic
        peak = meter.finish()
    finally:
        for name, fn in originals.items():
            setattr(editor_module, name, fn)

    spec = editor.spec_
    rows = _build_rows(tok, facts, editor.templates_ or ["{}"], editor.value_config_)
    n_logits = len(rows.tok_row) + len(facts)
    vocab = model.get_output_embeddings().weight.shape[0]
    return {
        "model": model_name, "batch": len(facts), "value_chunk": args.value_chunk or None,
        "value_steps": editor.value_config_.steps,
        "threads": torch.get_num_threads(), "d_model": spec.d_model, "d_k": spec.d_k,
        "vocab": vocab, "layers": list(editor.layers_), "templates": len(editor.templates_ or []),
        "value_rows": len(rows.ids), "value_positions": n_logits, "logits_bytes": n_logits * vocab * 4,
        "rss_start": start_rss, "prepare_peak": prepare_peak, "prepare_seconds": prepare_s,
        "rss_before": rss_before, "peak": peak, "increment": peak - rss_before, "seconds": seconds,
        "edit_seconds": dict(report.seconds), "took": report.success_rate, "stages": meter.stages,
        "rss_after": rss(), "report_accuracies": cfg.report_accuracies,
    }


# -- the parent: one subprocess per configuration ------------------------------------------------
def _parse_configs(text: str) -> list[tuple[str, int, int]]:
    """``model:batch[/chunk]`` items: ``smollm2:500/50`` runs the values in sub-batches of 50."""
    out = []
    for item in text.split(","):
        if item.strip():
            name, _, rest = item.strip().partition(":")
            batch, _, chunk = rest.partition("/")
            out.append((name, int(batch), int(chunk or 0)))
    return out


def _available() -> int:
    """MemAvailable of /proc/meminfo (bytes)."""
    with open("/proc/meminfo") as fh:
        return next(int(l.split()[1]) * 1024 for l in fh if l.startswith("MemAvailable:"))


def spawn(model_name: str, batch: int, chunk: int, args, value_steps: int) -> dict:
    """One configuration in a fresh process, its address space capped at ``--max-gb`` (and at what
    the machine has available), so a batch too large for the machine fails in the child
    (recorded as out of memory) instead of pushing other processes out."""
    import resource

    # MemAvailable as address space: the libraries map ~1.5-2 GB more than they keep resident
    limit = int(min(args.max_gb * 1e9, _available()))

    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", f"{model_name}:{batch}/{chunk}",
           "--value-steps", str(value_steps), "--threads", str(args.threads), "--cache-dir", args.cache_dir,
           "--layers-8b", str(args.layers_8b), "--stats-tokens-8b", str(args.stats_tokens_8b)]
    cmd += ["--rewrite-only"] if args.rewrite_only else []
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TQDM_DISABLE="1")
    tic = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.timeout,
                          preexec_fn=cap)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    oom = ("can't allocate memory" in proc.stderr or "MemoryError" in proc.stderr
           or "not enough memory" in proc.stderr or "InsufficientMemoryError" in proc.stderr)
    if proc.returncode != 0 and oom:
        return {"model": model_name, "batch": batch, "value_chunk": chunk or None, "value_steps": value_steps,
                "failed": f"out of memory under an address-space limit of {limit / 1e9:.1f} GB",
                "limit": limit, "wall_seconds": time.perf_counter() - tic, "stderr_tail": proc.stderr[-1500:]}
    if proc.returncode != 0 or not lines:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"model": model_name, "batch": batch, "value_chunk": chunk or None, "value_steps": value_steps,
                "failed": f"error (rc {proc.returncode}): {last[:300]}", "limit": limit,
                "wall_seconds": time.perf_counter() - tic, "stderr_tail": proc.stderr[-1500:]}
    result = json.loads(lines[-1][len("RESULT "):])
    result["wall_seconds"] = time.perf_counter() - tic
    result["limit"] = limit
    return result


def fit(rows: list[dict]) -> dict[str, dict]:
    """Least squares ``increment = a + b u`` per model and value-step setting (two or more batches)."""
    out: dict[str, dict] = {}
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["model"], []).append(r)
    for model, rs in groups.items():
        us = sorted({r["batch"] for r in rs})
        if len(us) < 2:
            continue
        pts = [(r["batch"], r["increment"]) for r in rs if r["value_steps"] == rs[0]["value_steps"]]
        n = len(pts)
        mu = sum(u for u, _ in pts) / n
        my = sum(y for _, y in pts) / n
        var = sum((u - mu) ** 2 for u, _ in pts)
        b = sum((u - mu) * (y - my) for u, y in pts) / var if var else 0.0
        out[model] = {"a": my - b * mu, "b": b, "points": n}
    return out


def _key(row: dict) -> tuple:
    return row["model"], row["batch"], row.get("value_chunk") or None, row["value_steps"]


def collect(rows: list[dict], machine: str, args, previous: dict | None = None) -> dict:
    """The results dict of the configurations run so far (written after each one). ``previous``
    (``--merge``): an earlier results file whose rows are kept unless a new row has the same
    model, batch, value sub-batch and value steps; its runs are listed before this one."""
    method = "VmHWM after clear_refs=5, one fresh process per configuration"
    run_args = {k: v for k, v in vars(args).items() if k not in ("child", "cache_dir")}
    runs = [{"machine": machine, "args": run_args}]
    if previous:
        new = {_key(r) for r in rows}
        old = [r for part in ("rows", "chunked_rows", "failed_rows", "check_rows")
               for r in previous.get(part, []) if _key(r) not in new]
        rows = old + rows
        runs = previous.get("runs") or [{"machine": previous.get("machine"), "args": previous.get("args")}]
        runs = [*runs, {"machine": machine, "args": run_args}]
    results: dict[str, Any] = {"machine": machine, "method": method, "runs": runs, "args": run_args,
               "rows": [r for r in rows if r["value_steps"] == args.value_steps and not r.get("failed")
                        and not r.get("value_chunk")],
               "chunked_rows": [r for r in rows if r.get("value_chunk") and not r.get("failed")],
               "failed_rows": [r for r in rows if r.get("failed")],
               "check_rows": [r for r in rows if r["value_steps"] != args.value_steps and not r.get("failed")]}
    results["fit"] = fit(results["rows"])
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default=None, help=f"model:batch,... (default {DEFAULT_CONFIGS})")
    parser.add_argument("--dry-run", action="store_true", help=f"a tiny random model: {DRY_CONFIGS}")
    parser.add_argument("--value-steps", type=int, default=2,
                        help="value evaluations (2: one forward and backward with every fact, the peak)")
    parser.add_argument("--check-steps", type=int, default=0,
                        help="also run the first configuration with this many value steps (e.g. 25)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--layers-8b", type=int, default=2, help="decoder layers of the 8B-shaped model")
    parser.add_argument("--stats-tokens-8b", type=int, default=512,
                        help="statistics tokens of the 8B shape (cached across its runs; no effect on the edit)")
    parser.add_argument("--cache-dir", default=None, help="statistics cache of llama8b/tiny (default: temporary)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per configuration")
    parser.add_argument("--max-gb", type=float, default=16.0,
                        help="address-space cap of each configuration's process (GB; at most MemAvailable)")
    parser.add_argument("--out", default=None, help="write the raw figures to this JSON file")
    parser.add_argument("--merge", action="store_true",
                        help="keep the rows already in --out (a new row replaces an old one of the same "
                             "model, batch, value sub-batch and value steps)")
    parser.add_argument("--rewrite-only", action="store_true",
                        help="the edit reports score only the rewrite prompts (EditConfig(report_accuracies=False)); "
                             "default: also CounterFact's paraphrase and neighbourhood prompts, before and after")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.set_defaults(value_chunk=0)
    args = parser.parse_args(argv)

    if args.child:
        name, batch, args.value_chunk = _parse_configs(args.child)[0]
        print("RESULT " + json.dumps(run_child(name, batch, args)), flush=True)
        return 0

    if not hwm_resettable():
        print("this kernel does not let a process reset its RSS high-water mark (/proc/self/clear_refs)",
              file=sys.stderr)
        return 2
    configs = _parse_configs(args.configs or (DRY_CONFIGS if args.dry_run else DEFAULT_CONFIGS))
    previous = json.loads(Path(args.out).read_text()) if args.merge and args.out and Path(args.out).is_file() else None
    with tempfile.TemporaryDirectory(prefix="rlsedit-edit-memory-") as tmp:
        args.cache_dir = args.cache_dir or tmp
        import torch

        machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs, "
                   f"torch {torch.__version__}, {args.threads} torch thread(s), nice {os.nice(0)}, "
                   f"load average {load_average():.2f} at the start")
        print("machine: " + machine, flush=True)
        rows = []
        plan = [(n, b, c, args.value_steps) for n, b, c in configs]
        if args.check_steps:
            plan.insert(1, (*configs[0], args.check_steps))
        for name, batch, chunk, steps in plan:
            print(f"  {name} batch {batch}{f' (values in sub-batches of {chunk})' if chunk else ''}, "
                  f"{steps} value steps ...", flush=True)
            r = spawn(name, batch, chunk, args, steps)
            rows.append(r)
            if args.out:  # after every configuration: a long run that is stopped keeps what it measured
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                Path(args.out).write_text(json.dumps(collect(rows, machine, args, previous), indent=1))
            if r.get("failed"):
                print(f"    FAILED: {r['failed']}", flush=True)
                continue
            print(f"    RSS before {gb(r['rss_before'])} GB, peak {gb(r['peak'])} GB, increment "
                  f"{gb(r['increment'])} GB; values peak {gb(r['stages'].get('values', {}).get('peak', 0))} GB; "
                  f"{r['seconds']:.0f} s (child {r['wall_seconds']:.0f} s, load {load_average():.2f})", flush=True)
    results = collect(rows, machine, args, previous)
    print()
    print(table(results))
    for model, f in results["fit"].items():
        print(f"{model}: increment ~ {gb(f['a'])} GB + {f['b'] / 1e6:.2f} MB per fact ({f['points']} batches)")
    for r in results["failed_rows"]:
        print(f"{r['model']} batch {r['batch']}: {r['failed']}")
    for r in results["chunked_rows"]:
        print(f"{r['model']} batch {r['batch']}, values in sub-batches of {r['value_chunk']}: increment "
              f"{gb(r['increment'])} GB (values {gb(r['stages']['values']['peak'] - r['rss_before'])} GB), "
              f"{r['seconds']:.0f} s")
    for r in results["check_rows"]:
        base = next((x for x in results["rows"] if (x["model"], x["batch"]) == (r["model"], r["batch"])), None)
        if base:
            print(f"check: {r['model']} batch {r['batch']} with {r['value_steps']} value steps: increment "
                  f"{gb(r['increment'])} GB (values {gb(r['stages']['values']['peak'] - r['rss_before'])} GB) against "
                  f"{gb(base['increment'])} GB with {base['value_steps']}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
