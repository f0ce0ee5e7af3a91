"""The paper's scale on one GPU: 10,000 SmolLM2 edits, and one 8B-shaped edit with Llama-3's vocabulary.

    python benchmarks/gpu_scale.py edit10k --device cuda --out edit10k.json   # gpu_check.sh --steps edit10k
    python benchmarks/gpu_scale.py big8b --device cuda --out big8b.json       # gpu_check.sh --steps big8b
    python benchmarks/gpu_scale.py edit10k --dry-run    # CPU: tiny random model, 20 facts in batches of 10
    python benchmarks/gpu_scale.py big8b --dry-run      # CPU: tiny widths, 2 layers, vocabulary 1,024, 10 facts

**edit10k** — SmolLM2-135M (float32 model, float64 state, the default layers, templates and
published value settings, statistics over ``--stats-tokens`` of the shipped corpus) edits the
first ``--edits`` facts of simplified CounterFact (``rlsedit_llm/data/counterfact_simple.json``,
``evaluation.data.load_stream``) in batches of ``--batch``. Per batch: the editor's own seconds by
stage (report scoring, values, keys, update) and the wall time with the device synchronised. The
edit reports score only the rewrite prompts (``report_accuracies=False``: no paraphrase or
neighbourhood prompts per edit). At the end every edit written is scored once, in batches of
``--score-batch`` prompts (``pipeline.scoring.score_targets``): **efficacy** (the new target's
length-normalised NLL below the true object's, CounterFact's comparison) and **top-1** (every
target token the teacher-forced argmax). JSON: per-stage totals and s/edit, the batches, the
final scores, the CUDA peak.

Budget. The step has to fit one 15-minute GPU window with the machine's start and the transfers.
The GPU check gives it 330 s (``GPU_CHECK_EDIT10K_S``) and big8b 240 s, so ``--steps edit10k,big8b``
is one call under the 600 s per-command limit; this script stops editing at a batch boundary once
``--time-budget`` seconds (240 there, 300 by default here) are spent, then scores what it wrote, so
a slow run still reports ``edits_done`` of ``--edits`` and its figures. The estimate, from the
H200 stream of the GPU check (1,000 CounterFact edits in batches of 100: 0.140 s/edit, of which
values 0.122, keys 0.010, report scoring 0.003, update 0.0001):

* **published optimiser** (25 Adam evaluations per batch): 10,000 x 0.140 s = 1,400 s. That does
  NOT fit in 5 minutes: within 240 s about 1,700 edits (17 batches) are written and scored. The
  rest is a matter of a faster value stage, which is why the optimiser is a flag.
* **10,000 edits in 5 minutes** need 0.030 s/edit: keys and report scoring (0.013 s) leave
  0.017 s/edit for the values, 7x below the published 0.122 s. Arithmetic is not the limit: an
  evaluation is a forward and backward pass of the 22 layers above layer 7 over the batch's 700
  rows (6 template rows and one KL row per fact) from the subject onwards (a few positions each),
  about 2 TFLOP in float32, some 30 ms at the H200's ~67 TFLOP/s, against the 0.49 s per
  evaluation measured (12.2 s per batch / 25): kernel launches of small matrices and host work
  (see "GPU: 10,000 edits" in docs/llm/scale.md). What can get there, all flags here, the default
  staying the published setting so the figures compare with the paper's: ``--optimizer lbfgs``
  (``ValueConfig(optimizer="lbfgs")`` in ``pipeline/values.py``: per-fact L-BFGS, each fact stops on
  its own NLL, so most evaluations run few rows: on a launch-bound GPU the gain is the number of
  evaluations, not the rows), ``--stop-top1`` (ENCORE's MPES: 1.8x at batch 100 on the CPU), and
  larger batches (``--batch 500``: the launches of an evaluation are shared by 5x the facts; the
  value stage's memory grows linearly with the batch, see "Memory of one edit call").
  ``--profile-batch 3`` (on in the GPU check) runs the third batch under ``torch.profiler`` and
  records the device's kernel time against the wall time, which settles where the time goes.
* No per-edit evaluation: the edit reports score only the rewrite prompts. The final scoring is
  2 x (edits written) prompts in batches of 256: about 80 forward passes for 10,000 edits,
  seconds.

**big8b** — the Llama-3-8B shape of ``benchmarks/scale.py`` (hidden 4096, MLP 14336, 32 query and
8 key-value heads; ``--layers`` 32 decoder layers, bf16) with the real Llama-3 vocabulary size
(``--vocab 128256``; the tiny test tokenizer's ids are a subset), a float64 state on layers 4-8,
alpha 1 and N 1 (a random model's statistics over a few thousand tokens are singular), and the
published value settings for Llama (``default_value_config``: 25 evaluations, lr 0.1) with the
default five templates of ten tokens. One edit of ``--batch`` (100) CounterFact facts. Reports
seconds per edit by stage, and ``torch.cuda.max_memory_allocated`` over the preparation and over
the edit. The vocabulary matters for the value stage: its logits are ``N x 128,256`` floats with
``N`` the scored positions (every target token of every template row plus a KL row per fact).
Estimate for an H200, from the GPU check's scale step (same shape, 2 templates, 10 evaluations,
a 512-entry vocabulary: build 9.5 s, statistics and state 19.1 s, values 17.6 s, CUDA peak 47.6 GB
in the preparation and 50.8 GB in the edit): 25 evaluations over 7 rows per fact instead of 3 give
about 100-130 s of values; the 128,256-entry head adds ~3 TFLOP per evaluation (about 2,500 scored
positions x 4,096 x 128,256 x 2, forward and backward), under a second in all, and ~1.3 GB per
float32 copy of the logits (the log-softmax and its gradient: ~4 GB). So about 3 minutes within
the 240 s limit, and a peak of ~55 GB: an 80 GB H100 holds it too.

The output names the machine and the load average; ``--out FILE.json`` writes every figure.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common beside this script
from _common import machine_description, sync

VALUE_FIELDS = {f.name for f in dataclasses.fields(__import__("rlsedit_llm").ValueConfig)}


def _cuda_peak(device) -> int | None:
    return torch.cuda.max_memory_allocated() if torch.device(device).type == "cuda" else None


def _reset_peak(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _timed_prepare(editor, device) -> float:
    """Prepare ``editor`` (statistics, state) with the device's peak memory reset first; its seconds."""
    _reset_peak(device)
    tic = time.perf_counter()
    editor.prepare()
    sync(device)
    return time.perf_counter() - tic


def value_config(spec, args):
    """The published value settings of the model's family, with the optional faster settings."""
    from rlsedit_llm.pipeline.values import default_value_config

    cfg = default_value_config(spec)
    changes: dict = {}
    if args.value_steps:
        changes["steps"] = args.value_steps
    if getattr(args, "stop_top1", False):
        changes["stop_when_top1"] = True
    if getattr(args, "optimizer", None) not in (None, "adam"):
        if "optimizer" not in VALUE_FIELDS:
            raise SystemExit("--optimizer needs ValueConfig(optimizer=...) (rlsedit_llm/pipeline/values.py)")
        changes["optimizer"] = args.optimizer
    return dataclasses.replace(cfg, **changes)


# -- edit10k ---------------------------------------------------------------------------------------
def run_edit10k(args) -> dict:
    import rlsedit_llm
    from rlsedit_llm import EditConfig, Editor
    from rlsedit_llm.evaluation import data
    from rlsedit_llm.pipeline.scoring import score_targets

    device = torch.device(args.device)
    model: Any
    tok: Any
    extra: dict[str, Any]
    if args.model == "tiny":
        from rlsedit_llm.adapters.tiny import tiny_model

        model, tok = tiny_model("llama", init_std=0.3)
        model = model.to(device)
        extra = {"alpha": 1e-3, "mom2_weight": 1.0, "n_templates": 2, "template_length": 4, "stats_max_length": 64}
    else:
        model, tok = rlsedit_llm.load_model(args.model, device=device)
        extra = {}
    facts = data.load_stream("counterfact_simple", args.edits, tok, batch_size=args.batch)
    spec = rlsedit_llm.detect_spec(model)
    value = value_config(spec, args)
    print(f"\n== edit10k: {args.model}, {len(facts)} simplified-CounterFact edits in batches of {args.batch}, "
          f"{device}, value {value.optimizer if hasattr(value, 'optimizer') else 'adam'} "
          f"({value.steps} evaluations, lr {value.lr}{', MPES' if value.stop_when_top1 else ''}), "
          f"editing budget {args.time_budget:.0f} s ==", flush=True)
    totals: dict[str, float] = {}
    batches: list[dict] = []
    profile = None
    with tempfile.TemporaryDirectory(prefix="rlsedit-edit10k-") as cache:
        cfg = EditConfig(stats_tokens=args.stats_tokens, cache_dir=cache, report_accuracies=False, value=value,
                         **extra)
        editor = Editor(model, tok, cfg)
        prepare_s = _timed_prepare(editor, device)
        done = 0
        start = time.perf_counter()
        for lo in range(0, len(facts), args.batch):
            spent = time.perf_counter() - start
            per_batch = spent / len(batches) if batches else 0.0
            if batches and spent + per_batch > args.time_budget:
                print(f"  editing budget spent after {done} edits ({spent:.0f} s); scoring them", flush=True)
                break
            sync(device)
            t0 = time.perf_counter()
            if len(batches) + 1 == args.profile_batch:
                report, profile = _profiled(editor, facts[lo:lo + args.batch], device, args.out)
            else:
                report = editor.edit(facts[lo:lo + args.batch])
            sync(device)
            wall = time.perf_counter() - t0
            done += len(report.facts)
            for stage, sec in report.seconds.items():
                totals[stage] = totals.get(stage, 0.0) + sec
            batches.append({"edits": done, "wall": wall, "seconds": dict(report.seconds),
                            "took": report.success_rate, "improved": report.improved})
            if len(batches) <= 3 or len(batches) % 10 == 0:
                print(f"  batch {len(batches)}: {wall:.2f} s ({wall / len(report.facts):.4f} s/edit), "
                      f"took {report.success_rate:.2f}", flush=True)
        edit_wall = time.perf_counter() - start
        written = facts[:done]
        tic = time.perf_counter()
        prompts = [f.text() for f in written]
        new = score_targets(model, tok, prompts, [f.target for f in written], batch_size=args.score_batch)
        true = score_targets(model, tok, prompts, [f.target_true or f.target for f in written],
                             batch_size=args.score_batch)
        sync(device)
        score_s = time.perf_counter() - tic
    efficacy = sum(a.mean_nll < b.mean_nll for a, b in zip(new, true, strict=True)) / max(done, 1)
    top1 = sum(a.all_correct for a in new) / max(done, 1)
    first = min(done, 100)
    efficacy_first = (sum(a.mean_nll < b.mean_nll for a, b in zip(new[:first], true[:first], strict=True))
                      / max(first, 1))
    print("\n| stage | total s | s / edit |\n|---|---|---|")
    for stage, sec in totals.items():
        print(f"| {stage} | {sec:.2f} | {sec / max(done, 1):.4f} |")
    print(f"| wall (edits) | {edit_wall:.2f} | {edit_wall / max(done, 1):.4f} |")
    print(f"edits done: {done} of {len(facts)}; prepare {prepare_s:.1f} s; final scoring {score_s:.1f} s")
    print(f"final scores over all {done} edits: efficacy {efficacy:.3f} (new target more likely than the true "
          f"object), top-1 {top1:.3f}; the first {first}: efficacy {efficacy_first:.3f}")
    return {"part": "edit10k", "model": args.model, "edits": len(facts), "edits_done": done, "batch": args.batch,
            "value": dataclasses.asdict(value), "prepare_seconds": prepare_s, "stages": totals,
            "seconds_per_edit": {k: v / max(done, 1) for k, v in totals.items()}, "edit_wall": edit_wall,
            "wall_per_edit": edit_wall / max(done, 1), "score_seconds": score_s, "efficacy": efficacy,
            "top1": top1, "efficacy_first_100": efficacy_first, "batches": batches, "profile": profile,
            "cuda_peak": _cuda_peak(device)}


def _profiled(editor, facts, device, out):
    """One edit under torch.profiler: where its time goes (kernels against the host's time).

    Returns the report and a summary: the wall time, the device's kernel time and kernel count
    (CUDA), the host's self time of the top operators; writes the profiler's operator table next
    to ``out`` (``<out>.profile.txt``)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.device(device).type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync(device)
    tic = time.perf_counter()
    with profile(activities=activities) as prof:
        report = editor.edit(facts)
        sync(device)
    wall = time.perf_counter() - tic
    events = prof.key_averages()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    rows = sorted(events, key=lambda e: getattr(e, key, 0.0), reverse=True)
    summary = {"wall": wall, "seconds": dict(report.seconds),
               "host_ops": sum(e.count for e in events),
               "top": [{"name": e.key, "count": e.count, "self_host_s": e.self_cpu_time_total / 1e6,
                        "self_device_s": getattr(e, "self_device_time_total", 0.0) / 1e6} for e in rows[:25]]}
    if cuda:  # the operators' self device time adds up to the kernels' time
        kernels = [e for e in prof.events() if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA]
        summary["kernels"] = len(kernels)
        summary["kernel_seconds"] = sum(getattr(e, "self_device_time_total", 0.0) for e in events) / 1e6
    print(f"  profiled batch: wall {wall:.2f} s, {summary['host_ops']} operator calls"
          + (f", {summary['kernels']} kernels taking {summary['kernel_seconds']:.2f} s on the device "
             f"({100 * summary['kernel_seconds'] / wall:.0f} % of the wall time)" if cuda else ""), flush=True)
    if out:
        Path(str(out) + ".profile.txt").write_text(events.table(sort_by=key, row_limit=40))
    return report, summary


# -- big8b -----------------------------------------------------------------------------------------
def build_llama(n_layers: int, vocab: int, dtype, device, *, quick: bool):
    """benchmarks/scale.py's Llama-3-8B-shaped random model (``quick``: its tiny widths) with a
    vocabulary of ``vocab`` entries; the tiny test tokenizer (ids below 512) drives it."""
    from scale import LLAMA3_8B, QUICK
    from transformers import AutoModelForCausalLM, LlamaConfig

    from rlsedit_llm.adapters.tiny import _tiny_tokenizer

    tok = _tiny_tokenizer()
    if vocab < len(tok):
        raise SystemExit(f"--vocab must be at least the tokenizer's {len(tok)}")
    eos = tok.eos_token_id
    widths: dict[str, Any] = dict(QUICK if quick else LLAMA3_8B)
    cfg = LlamaConfig(vocab_size=vocab, num_hidden_layers=n_layers, max_position_embeddings=512,
                      tie_word_embeddings=False, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos, **widths)
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(0)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # build in the target dtype: no fp32 copy of a 32-layer model
        try:
            model = AutoModelForCausalLM.from_config(cfg)
        finally:
            torch.set_default_dtype(previous)
    return model.to(dtype=dtype).eval(), tok


def run_big8b(args) -> dict:
    import rlsedit_llm
    from rlsedit_llm import EditConfig, Editor
    from rlsedit_llm.adapters.spec import default_layers
    from rlsedit_llm.evaluation import data

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    tic = time.perf_counter()
    model, tok = build_llama(args.layers, args.vocab, dtype, device, quick=args.quick)
    sync(device)
    build_s = time.perf_counter() - tic
    build_peak = _cuda_peak(device)
    n_params = sum(p.numel() for p in model.parameters())
    spec = rlsedit_llm.detect_spec(model)
    value = value_config(spec, args)
    layers = default_layers("llama", args.layers)[: args.edit_layers]
    facts = data.load_stream("counterfact", args.batch, tok, batch_size=args.batch)
    print(f"\n== big8b: {'tiny' if args.quick else 'Llama-3-8B'} widths, {args.layers} layers, vocabulary "
          f"{args.vocab:,}, {n_params / 1e6:,.0f} M parameters in {args.dtype}, {args.state_dtype} state on layers "
          f"{list(layers)}, one edit of {len(facts)} facts, value {value.steps} evaluations lr {value.lr}, "
          f"{device} ==", flush=True)
    with tempfile.TemporaryDirectory(prefix="rlsedit-big8b-") as cache:
        cfg = EditConfig(layers=layers, alpha=1.0, mom2_weight=1.0, stats_tokens=args.stats_tokens,
                         stats_max_length=256, state_dtype=args.state_dtype, cache_dir=cache,
                         report_accuracies=False, value=value)
        editor = Editor(model, tok, cfg)
        prepare_s = _timed_prepare(editor, device)
        prepare_peak = _cuda_peak(device)
        _reset_peak(device)
        tic = time.perf_counter()
        report = editor.edit(facts)
        sync(device)
        edit_s = time.perf_counter() - tic
        edit_peak = _cuda_peak(device)
    n = len(report.facts)

    def fmt(b):
        return "n/a (CPU)" if b is None else f"{b / 1e9:.2f} GB"

    print(f"  build {build_s:.1f} s (CUDA peak {fmt(build_peak)}); statistics + state {prepare_s:.1f} s "
          f"(CUDA peak {fmt(prepare_peak)})")
    print(f"  edit of {n} facts: {edit_s:.1f} s = {edit_s / n:.3f} s/edit; CUDA peak {fmt(edit_peak)}; "
          f"took (top-1) {report.success_rate:.2f}, more probable {report.improved:.2f}")
    print("| stage | s | s / edit |\n|---|---|---|")
    for stage, sec in report.seconds.items():
        print(f"| {stage} | {sec:.2f} | {sec / n:.4f} |")
    return {"part": "big8b", "layers": args.layers, "vocab": args.vocab, "params": n_params, "dtype": args.dtype,
            "state_dtype": args.state_dtype, "edit_layers": list(layers), "batch": n,
            "value": dataclasses.asdict(value), "templates": len(editor.templates_ or []),
            "build_seconds": build_s, "prepare_seconds": prepare_s, "edit_seconds": edit_s,
            "seconds_per_edit": edit_s / n, "stages": dict(report.seconds), "took": report.success_rate,
            "improved": report.improved, "cuda_peak_build": build_peak, "cuda_peak_prepare": prepare_peak,
            "cuda_peak_edit": edit_peak}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=["edit10k", "big8b"])
    parser.add_argument("--dry-run", action="store_true", help="CPU, a tiny model and a few facts (seconds)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--value-steps", type=int, default=0, help="value evaluations (0: the published setting)")
    parser.add_argument("--stop-top1", action="store_true", help="ENCORE's MPES (ValueConfig.stop_when_top1)")
    parser.add_argument("--optimizer", default="adam",
                        help="the value optimiser (ValueConfig.optimizer; adam: the published one)")
    # edit10k
    parser.add_argument("--model", default="smollm2", help="edit10k: smollm2, or tiny")
    parser.add_argument("--edits", type=int, default=10_000)
    parser.add_argument("--time-budget", type=float, default=300.0,
                        help="edit10k: seconds of editing; stops at a batch boundary, then scores what it wrote")
    parser.add_argument("--stats-tokens", type=int, default=None,
                        help="statistics tokens (default: 100,000 for edit10k, 4,096 for big8b)")
    parser.add_argument("--score-batch", type=int, default=256, help="prompts per scoring forward pass")
    parser.add_argument("--profile-batch", type=int, default=0,
                        help="edit10k: run this batch (1-based) under torch.profiler (0: none)")
    # big8b
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--edit-layers", type=int, default=5)
    parser.add_argument("--vocab", type=int, default=128_256, help="big8b: vocabulary size (Llama-3: 128,256)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--state-dtype", default="float64", choices=["float64", "float32"])
    parser.add_argument("--quick", action="store_true", help="big8b: scale.py's tiny widths")
    parser.add_argument("--verbose", action="store_true", help="edit10k: keep the editor's per-batch warnings")
    parser.add_argument("--out", default=None, help="write the figures to this JSON file")
    args = parser.parse_args(argv)
    if args.dry_run:
        args.device, args.model, args.quick = "cpu", "tiny", True
        args.edits, args.batch = min(args.edits, 20), min(args.batch, 10)
        args.layers, args.edit_layers, args.vocab = min(args.layers, 2), 1, min(args.vocab, 1024)
        args.dtype, args.stats_tokens = "float32", args.stats_tokens or 500
        args.value_steps = args.value_steps or 5
        args.threads = args.threads or 1
    if args.stats_tokens is None:
        args.stats_tokens = 100_000 if args.part == "edit10k" else 4096
    if args.threads:
        torch.set_num_threads(args.threads)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        print("CUDA requested but not available (use --dry-run on a CPU machine)", file=sys.stderr)
        return 2
    print(machine_description(args.device), flush=True)
    tic = time.perf_counter()
    library_log = logging.getLogger("rlsedit_llm")
    level = library_log.level
    if not args.verbose:  # one "did not take" warning per batch would bury the log's tail
        library_log.setLevel(logging.ERROR)
    try:
        result = run_edit10k(args) if args.part == "edit10k" else run_big8b(args)
    finally:  # main() is also called in-process (its dry-run test): leave the logger as it was
        library_log.setLevel(level)
    result.update(machine=machine_description(args.device), args=vars(args), total_seconds=time.perf_counter() - tic)
    print(f"total {result['total_seconds']:.1f} s")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1, default=lambda o: None if o is math.nan else str(o)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
