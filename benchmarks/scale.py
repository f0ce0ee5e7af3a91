"""RLSEdit at Llama-3-8B widths: the whole editing path, the update against its roofline floor,
and the drift of a float32 state over a long stream.

    .venv/bin/python benchmarks/scale.py                  # 2 decoder layers, CPU (~8 GB RSS at most)
    .venv/bin/python benchmarks/scale.py --quick          # tiny widths, seconds
    .venv/bin/python benchmarks/scale.py --layers 32 --dtype bfloat16 --device cuda   # full 8B shape
    .venv/bin/python benchmarks/scale.py --drift          # float32 vs float64 over 10,000 updates
    .venv/bin/python benchmarks/scale.py --kernel-only    # only the update against the floor
    .venv/bin/python benchmarks/scale.py --stream --device cuda   # SmolLM2, 1,000 CounterFact edits
    .venv/bin/python benchmarks/scale.py --half --dtype bfloat16 --edits 20 --batch 5   # SmolLM2 in bf16

Parts (each printed as a table):

1. **pipeline** — a random model with Llama-3-8B's widths (hidden 4096, MLP 14336, 32 query /
   8 key-value heads of 128) but ``--layers`` decoder layers and the tiny test tokenizer's
   vocabulary, built offline from a ``LlamaConfig``. An :class:`~rlsedit_llm.Editor` runs
   statistics, templates, keys, values, one update of ``--batch`` CounterFact facts per edited
   layer, the certificate, save, load and undo; per stage: seconds and peak memory (RSS of the
   process, and on CUDA the allocator's peak).
2. **kernel** — the update at ``d_k = 14336`` (``--kernel-dk``), ``u = --batch``: LayerRLS.step
   (the library's pure update) and the in-place :func:`~rlsedit_llm.kernel.inplace.woodbury_update_`, against
   a dense re-solve (Cholesky of ``G`` and the solve for ``W``) and against the roofline floor:
   ``max(3 s d_k^2 / bandwidth, 4 d_k^2 u / GEMM rate)`` with the copy bandwidth measured on a
   large tensor (2 bytes moved per byte copied) and the GEMM rate measured on a large matmul.
3. **drift** (``--drift``) — a float64 and a float32 state fed the same stream of
   ``--drift-updates`` batches of ``--drift-u`` keys at ``d_k = --drift-dk``, with the exact
   ``G_t`` kept in float64: ``||C_t G_t - I||_F`` for both, at checkpoints.

4. **stream** (``--stream``) — ``--edits`` CounterFact facts in batches of ``--batch`` on
   SmolLM2 (``--stream-model tiny``: a tiny random model, for dry runs) on ``--device``, with
   the editor's per-stage seconds and the final efficacy over every edit. (``rlsedit bench``
   loads its model on the CPU, so on a GPU machine this is the stream to time.)
5. **half** (``--half --dtype bfloat16``) — the same stream on a model loaded in half precision
   with a float64 state: per batch, whether the edits hold and how far the written (rounded)
   weights are from the float64 master.

The output names the machine, torch's thread count and the load average.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common beside this script
from _common import ROOT, best_of, counterfact_records, machine_description, sync

sys.path.insert(0, str(ROOT))
from rlsedit_llm.kernel.inplace import DEFAULT_BLOCK, symmetric_rank_update_, woodbury_update_
from rlsedit_llm.kernel.rls import woodbury_update
from rlsedit_llm.memory import format_bytes, plan

LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                 head_dim=128)
QUICK = dict(hidden_size=64, intermediate_size=224, num_attention_heads=4, num_key_value_heads=2, head_dim=16)


# -- measurement helpers ----------------------------------------------------------------------------
def rss_peak() -> int:
    """Peak resident set size of this process so far (bytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss_now() -> int:
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except ImportError:  # pragma: no cover
        return rss_peak()


class Stages:
    """Per-stage seconds and memory."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.rows: list[dict] = []

    def run(self, name, fn, *args, **kwargs):
        """Run one stage; a stage that raises an RLSEditError is recorded (``error``) and returns None."""
        from rlsedit_llm.errors import RLSEditError

        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        tic = time.perf_counter()
        error = None
        try:
            result = fn(*args, **kwargs)
        except RLSEditError as exc:
            result, error = None, f"{type(exc).__name__}: {exc}"
        sync(self.device)
        row = {"stage": name, "seconds": time.perf_counter() - tic, "rss_peak": rss_peak(), "rss_now": rss_now(),
               "error": error}
        if cuda:
            row["cuda_peak"] = torch.cuda.max_memory_allocated()
        self.rows.append(row)
        print(f"  {name:<28}{row['seconds']:>9.2f} s   RSS peak {format_bytes(row['rss_peak']):>9}"
              + (f"   CUDA peak {format_bytes(row['cuda_peak']):>9}" if cuda else "")
              + (f"   FAILED ({error})" if error else ""), flush=True)
        return result

    def table(self) -> str:
        cuda = self.device.type == "cuda"
        lines = ["| stage | seconds | RSS peak (process) | RSS now |" + (" CUDA peak |" if cuda else ""),
                 "|---|---|---|---|" + ("---|" if cuda else "")]
        for r in self.rows:
            lines.append(f"| {r['stage']}{' (failed: ' + r['error'].split(':')[0] + ')' if r['error'] else ''} "
                         f"| {r['seconds']:.2f} | {format_bytes(r['rss_peak'])} | "
                         f"{format_bytes(r['rss_now'])} |" + (f" {format_bytes(r['cuda_peak'])} |" if cuda else ""))
        return "\n".join(lines)


def bandwidth(device, dtype=torch.float64, nbytes=512 * 2**20) -> float:
    """Copy bandwidth (bytes moved per second; a copy moves 2 bytes per byte copied)."""
    n = nbytes // torch.tensor([], dtype=dtype).element_size()
    x = torch.ones(n, dtype=dtype, device=device)
    y = torch.empty_like(x)
    return 2 * nbytes / best_of(lambda: y.copy_(x), 5, device)


def gemm_rate(device, dtype, n=4096) -> float:
    """Flop/s of an n x n x n matmul."""
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    c = torch.empty_like(a)
    t = best_of(lambda: torch.mm(a, b, out=c), 3, device)
    return 2 * n**3 / t


# -- part 1: the pipeline ------------------------------------------------------------------------------
def build_model(n_layers: int, dtype, device, quick: bool):
    from transformers import AutoModelForCausalLM, LlamaConfig

    from rlsedit_llm.adapters.tiny import _tiny_tokenizer

    tok = _tiny_tokenizer()
    eos = tok.convert_tokens_to_ids(tok.eos_token)
    widths = QUICK if quick else LLAMA3_8B
    cfg = LlamaConfig(vocab_size=len(tok), num_hidden_layers=n_layers, max_position_embeddings=512,
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


def run_pipeline(args, device, model_dtype, state_dtype) -> dict:
    import rlsedit_llm
    from rlsedit_llm import EditConfig, Editor, ValueConfig

    stages = Stages(device)
    print(f"\n== pipeline: Llama-3-8B widths, {args.layers} decoder layer(s), model {model_dtype}, "
          f"state {state_dtype}, {args.edit_layers} edited layer(s), batch {args.batch}, {device} ==")
    model, tok = stages.run("build model", build_model, args.layers, model_dtype, device, args.quick)
    n_params = sum(p.numel() for p in model.parameters())
    spec_dk = model.config.intermediate_size
    print(f"  model: {n_params / 1e6:.0f} M parameters ({format_bytes(n_params * model_dtype.itemsize)}), "
          f"d_k {spec_dk}")
    facts = rlsedit_llm.as_facts(counterfact_records(args.batch))
    from rlsedit_llm.adapters.spec import default_layers

    layers = default_layers("llama", args.layers)[: args.edit_layers]  # 32 layers: 4..8 as published
    cache = tempfile.mkdtemp(prefix="rlsedit-scale-")
    try:
        cfg = EditConfig(layers=layers, alpha=args.alpha, mom2_weight=args.mom2_weight,
                         stats_tokens=args.stats_tokens, stats_max_length=256,
                         state_dtype=str(state_dtype).removeprefix("torch."), cache_dir=args.cache_dir or cache,
                         n_templates=1, template_length=4, value=ValueConfig(steps=args.value_steps))
        editor = Editor(model, tok, cfg)
        p = plan(editor.spec_.d_model, editor.spec_.d_k, len(layers), state_dtype, batch=args.batch,
                 model_bytes=n_params * model_dtype.itemsize)
        print(f"  planner: state {format_bytes(p.state)}, peak (editor) {format_bytes(p.peak)}, "
              f"with the model {format_bytes(p.total_peak)}")
        stages.run("statistics + state build", editor.prepare)
        report = stages.run(f"edit (batch {len(facts)})", editor.edit, facts)
        for stage, sec in (report.seconds.items() if report else ()):
            print(f"      edit.{stage:<20}{sec:>9.2f} s")
        _print_lambda(editor)
        cert = stages.run("certificate", editor.certificate)
        state_dir = Path(cache) / "state"  # always the temporary folder
        stages.run("save", editor.save, state_dir)
        size = sum(f.stat().st_size for f in state_dir.rglob("*") if f.is_file())
        del editor
        gc.collect()
        editor = stages.run("load", Editor.load, model, tok, state_dir)
        if editor is not None and editor.journal_:
            stages.run("undo", editor.undo, editor.journal_[-1].edit_id)
        improved = report.improved if report else float("nan")  # target more probable than before
        success = report.success_rate if report else float("nan")  # target top-1 after the edit
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    print(f"  saved state on disk: {format_bytes(size)}; the edit's targets: more probable {improved:.2f}, "
          f"top-1 (took) {success:.2f}; "
          f"certificate gradient {max(l.gradient for l in cert.layers) if hasattr(cert, 'layers') else cert}")
    if any(r["error"] for r in stages.rows):
        print("  FAILED stages: " + "; ".join(f"{r['stage']}: {r['error']}" for r in stages.rows if r["error"]))
    print("\n" + stages.table())
    return {"stages": stages.rows, "edit_seconds": report.seconds if report else None, "improved": improved,
            "success_rate": success, "saved_bytes": size, "params": n_params}


def _print_lambda(editor) -> None:
    """The eigenvalues ``m`` of ``K_t C_t K_t^T`` for the last edit (``m = lambda / (1 + lambda)``
    with ``lambda`` those of ``K_t C_{t-1} K_t^T``): the downdate of the certificate and undo
    needs ``1 - m`` above the state dtype's cancellation error."""
    if not editor.journal_:
        return
    record = editor.journal_[-1]
    for layer, solver in editor.solvers_.items():
        K = record.keys[layer].to(device=solver.device, dtype=solver.dtype)
        F = (solver.C_ @ K.mT).double()  # (d_k, u) in the state dtype, then float64
        M = K.double() @ F
        m = torch.linalg.eigvalsh((M + M.mT) / 2)
        lam = m / (1 - m).clamp_min(1e-300)
        print(f"  layer {layer}: eig(K C_t K^T) in [{float(m[0]):.6g}, {float(m[-1]):.6g}] "
              f"(lambda = m / (1 - m) in [{float(lam[0]):.3g}, {float(lam[-1]):.3g}]); "
              f"key norms^2 median {float((K.double() ** 2).sum(1).median()):.4g}", flush=True)


# -- part 2: the update kernel against the floor --------------------------------------------------
def _spd_state(d_k: int, d_v: int, dtype, device, seed=0):
    """A well-conditioned SPD C (d_k, d_k) without a d_k^3 factorisation: C = I/a + small low rank."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    C = torch.eye(d_k, dtype=dtype, device=device)
    B = (torch.randn(d_k, 8, generator=g, dtype=dtype) / math.sqrt(d_k)).to(device)
    C.addmm_(B, B.mT)
    W = (torch.randn(d_k, d_v, generator=g, dtype=dtype) * 0.02).to(device)
    return C, W


def _kernel_row(args, device: torch.device, dtype: torch.dtype) -> dict:
    """One dtype's row of the kernel table: the floor, the in-place update's variants, its parts,
    the pure update and the dense re-solve (seconds)."""
    d_k, d_v, u = args.kernel_dk, args.kernel_dv, args.batch
    s = dtype.itemsize
    bw = bandwidth(device, dtype)
    rate = gemm_rate(device, dtype, n=min(4096, d_k))
    mem_floor = 3 * s * d_k * d_k / bw
    flop_floor = 4 * d_k * d_k * u / rate
    floor = max(mem_floor, flop_floor)
    print(f"  {str(dtype):<14} copy bandwidth {bw / 1e9:.1f} GB/s, GEMM {rate / 1e9:.1f} GFLOP/s; "
          f"floor: memory {mem_floor * 1e3:.4g} ms, flops {flop_floor * 1e3:.4g} ms")
    print(f"  {'':<14} state per layer: C {format_bytes(s * d_k * d_k)}; planner (C+gram0+W+W0) "
          f"{format_bytes(plan(d_v, d_k, 1, dtype).state)}")
    g = torch.Generator(device="cpu").manual_seed(1)
    # keys of norm ~1 against C ~ I: K C K^T ~ I, as for in-distribution keys with the editor's
    # default N (k^T (N E[kk^T])^{-1} k ~ d_k / N ~ 1); far larger K C K^T makes the float32
    # downdate I - K C K^T lose its positive definiteness to cancellation
    K = (torch.randn(u, d_k, generator=g, dtype=dtype) / math.sqrt(d_k)).to(device)
    R = (torch.randn(u, d_v, generator=g, dtype=dtype) * 0.1).to(device)
    C, W = _spd_state(d_k, d_v, dtype, device)
    row = {"dtype": str(dtype), "d_k": d_k, "u": u, "bandwidth": bw, "gemm": rate, "mem_floor": mem_floor,
           "flop_floor": flop_floor, "floor": floor}

    def timed_inplace(symmetrize, block=DEFAULT_BLOCK):
        # alternate add and remove so C stays the same state; only the add is timed
        times = []
        V = K @ W + R  # absolute targets (the kernel's convention)
        for _ in range(args.trials):
            times.append(best_of(lambda: woodbury_update_(C, W, K, V, symmetrize=symmetrize, block=block), 1, device))
            woodbury_update_(C, W, K, V, sign=1, symmetrize=symmetrize, block=block)
        return min(times)

    row["inplace"] = timed_inplace("symmetric")  # the default: blocked symmetric rank-u update
    # other panel sizes of the symmetric update (a GPU wants far larger panels than a CPU)
    row["inplace_blocks"] = {b: timed_inplace("symmetric", b) for b in args.blocks if b != DEFAULT_BLOCK}
    for b, t in row["inplace_blocks"].items():
        print(f"  {'':<14} in place, symmetric, block {b}: {t * 1e3:.4g} ms ({t / floor:.2f} x floor)")
    row["inplace_auto"] = timed_inplace("auto")
    row["inplace_none"] = timed_inplace("none")
    row["inplace_mirror"] = timed_inplace("mirror")
    Ft = torch.empty(u, d_k, dtype=dtype, device=device)
    row["gemm_F"] = best_of(lambda: torch.mm(K, C, out=Ft), args.trials, device)  # F^T = K C (the kernel's)
    F = torch.empty(d_k, u, dtype=dtype, device=device)
    row["gemm_F_CKt"] = best_of(lambda: torch.mm(C, K.mT, out=F), args.trials, device)  # F = C K^T (the other order)
    G = F / math.sqrt(d_k)
    row["rank_u"] = best_of(lambda: (C.addmm_(G, G.mT, alpha=-1), C.addmm_(G, G.mT)), args.trials, device) / 2
    row["rank_u_symmetric"] = best_of(lambda: (symmetric_rank_update_(C, G, -1.0), symmetric_rank_update_(C, G, 1.0)),
                                      args.trials, device) / 2
    print(f"  {'':<14} in place: symmetric {row['inplace'] * 1e3:.4g} ms, full GEMM + auto "
          f"{row['inplace_auto'] * 1e3:.4g} ms, full GEMM, no symmetrisation {row['inplace_none'] * 1e3:.4g} ms, "
          f"full GEMM + blocked mirror {row['inplace_mirror'] * 1e3:.4g} ms; parts: F^T = K C "
          f"{row['gemm_F'] * 1e3:.4g} ms (F = C K^T {row['gemm_F_CKt'] * 1e3:.4g} ms), C -= G G^T symmetric "
          f"{row['rank_u_symmetric'] * 1e3:.4g} ms (full GEMM {row['rank_u'] * 1e3:.4g} ms)")
    pure = plan(d_v, d_k, 1, dtype, inplace=False)  # the pure update's temporaries
    plan_step = pure.edit_temporaries + pure.state
    if args.skip_library or (device.type == "cpu" and plan_step > args.max_bytes):
        row["library"] = None
        print(f"  {'':<14} LayerRLS.step skipped (its temporaries, about {format_bytes(plan_step)}, "
              f"exceed --max-bytes {format_bytes(args.max_bytes)})")
    else:
        V = K @ W + R  # absolute values: the library's woodbury_update takes (K, V)
        row["library"] = best_of(lambda: woodbury_update(C, W, K, V), args.trials, device)
        gc.collect()
    if args.skip_resolve:
        row["resolve"] = None
    else:
        # the dense re-solve: Cholesky of G (here C itself stands in: same size, SPD) and W = G^{-1} B
        B = W.clone()

        def resolve():
            L, _ = torch.linalg.cholesky_ex(C)
            torch.cholesky_solve(B, L)

        row["resolve"] = best_of(resolve, 1, device)
    gc.collect()
    for name in ("library", "inplace", "resolve"):
        t = row[name]
        if t is not None:
            print(f"  {'':<14} {name:<10}{t * 1e3:>10.4g} ms   {t / floor:>6.2f} x floor")
    return row


def run_kernel(args, device, dtypes) -> list[dict]:
    d_k, d_v, u = args.kernel_dk, args.kernel_dv, args.batch
    print(f"\n== kernel: one update at d_k={d_k}, d_v={d_v}, u={u}, {device} ==")
    rows = [_kernel_row(args, device, dtype) for dtype in dtypes]
    print("\n| state | d_k | u | bandwidth GB/s | GEMM GFLOP/s | floor ms | LayerRLS.step ms (x floor) "
          "| in place, symmetric ms (x floor) | full GEMM + auto | full GEMM, none | full GEMM + mirror "
          "| re-solve ms |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        lib = f"{r['library'] * 1e3:.4g} ({r['library'] / r['floor']:.2f})" if r["library"] else "skipped"
        res = f"{r['resolve'] * 1e3:.4g}" if r["resolve"] else "skipped"
        print(f"| {r['dtype'].removeprefix('torch.')} | {r['d_k']} | {r['u']} | {r['bandwidth'] / 1e9:.1f} | "
              f"{r['gemm'] / 1e9:.1f} | {r['floor'] * 1e3:.4g} | {lib} | {r['inplace'] * 1e3:.4g} "
              f"({r['inplace'] / r['floor']:.2f}) "
              f"| {r['inplace_auto'] * 1e3:.4g} ({r['inplace_auto'] / r['floor']:.2f}) "
              f"| {r['inplace_none'] * 1e3:.4g} ({r['inplace_none'] / r['floor']:.2f}) "
              f"| {r['inplace_mirror'] * 1e3:.4g} ({r['inplace_mirror'] / r['floor']:.2f}) | {res} |")
    for r in rows:
        ratio = r["inplace"] / r["floor"]
        print(f"target (in place, symmetric, within 1.5x of the floor, {r['dtype']}): {ratio:.2f}x "
              f"{'PASS' if ratio <= 1.5 else 'FAIL'}")
    return rows


# -- part 3: float32 drift over a long stream ------------------------------------------------------
def run_drift(args, device) -> list[dict]:
    d_k, n, u, cond = args.drift_dk, args.drift_updates, args.drift_u, args.drift_cond
    print(f"\n== drift: float32 vs float64 state, d_k={d_k}, {n} updates of u={u}, "
          f"anchor condition number {cond:g}, {device} ==")
    g = torch.Generator(device="cpu").manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(d_k, d_k, generator=g, dtype=torch.float64))
    Q = Q.to(device)
    spec = torch.logspace(0, -math.log10(cond), d_k, dtype=torch.float64, device=device)  # E[kk^T] eigenvalues
    N = 15000.0 * d_k / 14336  # the editor's default anchor weight
    G = (Q * (N * spec)) @ Q.mT  # G_0 = N E[kk^T] (alpha = 0, the published setting)
    G = (G + G.mT) / 2
    C64 = (Q * (1.0 / (N * spec))) @ Q.mT
    C64 = ((C64 + C64.mT) / 2).contiguous()
    C32 = C64.to(torch.float32)
    d_v = 8
    W64 = torch.zeros(d_k, d_v, dtype=torch.float64, device=device)
    W32 = W64.to(torch.float32)
    eye = torch.eye(d_k, dtype=torch.float64, device=device)
    scale = Q * spec.sqrt()  # keys k = Q diag(sqrt(spec)) z

    def measure(t):
        d64 = float(torch.linalg.norm(C64 @ G - eye))
        d32 = float(torch.linalg.norm(C32.double() @ G - eye))
        gap = float(torch.linalg.norm(C32.double() - C64) / torch.linalg.norm(C64))
        w_gap = float(torch.linalg.norm(W32.double() - W64) / torch.linalg.norm(W64).clamp_min(1e-300))
        pd = int(torch.linalg.cholesky_ex(C32)[1]) == 0
        sym = bool(torch.equal(C32, C32.mT))
        row = {"t": t, "drift64": d64, "drift32": d32, "rel_gap": gap, "w_gap": w_gap, "float32_pd": pd,
               "float32_symmetric": sym, "seconds": time.perf_counter() - start}
        print(f"  t={t:>6}  ||CG-I||_F float64 {d64:.3e}  float32 {d32:.3e}  "
              f"||C32-C64||/||C64|| {gap:.2e}  ||W32-W64||/||W64|| {w_gap:.2e}  float32 PD {pd}  symmetric {sym}  "
              f"({row['seconds']:.0f} s)",
              flush=True)
        return row

    checkpoints = sorted({c for c in (0, 1, 10, 100, 1000, 3000, 10000, n) if c <= n})
    start = time.perf_counter()
    rows = [measure(0)]
    new_keys = []  # G_t is brought up to date at the checkpoints only (one GEMM instead of n rank-u updates)
    for t in range(1, n + 1):
        if t == 2:
            tic = time.perf_counter()
        z = torch.randn(u, d_k, generator=g, dtype=torch.float64).to(device)
        K = z @ scale.mT  # (u, d_k)
        R = torch.randn(u, d_v, generator=g, dtype=torch.float64).to(device)
        woodbury_update_(C64, W64, K, K @ W64 + R)  # innovation R at each state's own weights
        woodbury_update_(C32, W32, K, K @ W32.to(K.dtype) + R)
        new_keys.append(K)
        if t == 10:
            per = (time.perf_counter() - tic) / 9
            print(f"  one update of both states: {per * 1e3:.0f} ms; estimate for {n}: {per * n / 60:.1f} min "
                  f"(+ {len(checkpoints)} checkpoints)", flush=True)
        if t in checkpoints:
            Kt = torch.cat(new_keys)
            G.addmm_(Kt.mT, Kt)
            new_keys.clear()
            rows.append(measure(t))
    print("\n| t | drift float64 | drift float32 | rel. gap C32 vs C64 | rel. gap W32 vs W64 | float32 PD | seconds |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['t']} | {r['drift64']:.2e} | {r['drift32']:.2e} | {r['rel_gap']:.2e} | {r['w_gap']:.2e} | "
              f"{'yes' if r['float32_pd'] else 'NO'} | {r['seconds']:.0f} |")
    return rows


def _load(name, dtype, device):
    import rlsedit_llm

    if name == "tiny":
        from rlsedit_llm.adapters.tiny import tiny_model

        model, tok = tiny_model("llama", init_std=0.3, dtype=dtype)
        return model.to(device), tok
    return rlsedit_llm.load_model(name, dtype=dtype, device=device)


def _tiny_cfg(name) -> dict:
    """A light anchor and short templates for the tiny random model (as in the tests)."""
    return ({"alpha": 1e-3, "mom2_weight": 1.0, "n_templates": 2, "template_length": 4, "stats_max_length": 64}
            if name == "tiny" else {})


# -- part 4: a CounterFact stream (SmolLM2, or a tiny model for a dry run) ---------------------------
def run_stream(args, device, model_dtype, state_dtype) -> dict:
    import rlsedit_llm
    from rlsedit_llm import EditConfig, Editor
    from rlsedit_llm.pipeline.scoring import score_targets

    name = args.stream_model
    model, tok = _load(name, model_dtype, device)
    facts = rlsedit_llm.as_facts(counterfact_records(args.edits))
    print(f"\n== counterfact stream: {name}, {len(facts)} edits in batches of {args.batch}, model {model_dtype}, "
          f"state {state_dtype}, {device} ==")
    cache = tempfile.mkdtemp(prefix="rlsedit-stream-")
    totals: dict[str, float] = {}
    try:
        cfg = EditConfig(stats_tokens=args.stats_tokens, cache_dir=cache,
                         state_dtype=str(state_dtype).removeprefix("torch."),
                         **_tiny_cfg(name))
        editor = Editor(model, tok, cfg)
        tic = time.perf_counter()
        for start in range(0, len(facts), args.batch):
            report = editor.edit(facts[start:start + args.batch])
            for stage, sec in report.seconds.items():
                totals[stage] = totals.get(stage, 0.0) + sec
            print(f"  batch {start // args.batch + 1}: {sum(report.seconds.values()):.1f} s, "
                  f"more probable {report.improved:.2f}, took (top-1) {report.success_rate:.2f}", flush=True)
        wall = time.perf_counter() - tic
        new = score_targets(model, tok, [f.text() for f in facts], [f.target for f in facts])
        true = score_targets(model, tok, [f.text() for f in facts], [f.target_true or f.target for f in facts])
        efficacy = sum(a.mean_nll < b.mean_nll for a, b in zip(new, true, strict=True)) / len(facts)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    print("\n| stage | total s | s / edit |\n|---|---|---|")
    for stage, sec in totals.items():
        print(f"| {stage} | {sec:.2f} | {sec / len(facts):.4f} |")
    print(f"| wall (edits) | {wall:.2f} | {wall / len(facts):.4f} |")
    print(f"final efficacy over all {len(facts)} edits (new target more likely than the true one): {efficacy:.3f}")
    return {"stages": totals, "wall": wall, "efficacy": efficacy, "edits": len(facts)}


# -- part 5: half-precision model, float64 master --------------------------------------------------
def run_half(args, device, model_dtype) -> dict:
    import rlsedit_llm
    from rlsedit_llm import EditConfig, Editor
    from rlsedit_llm.adapters.spec import get_module, read_weight
    from rlsedit_llm.pipeline.scoring import score_targets

    model, tok = _load(args.stream_model, model_dtype, device)
    facts = rlsedit_llm.as_facts(counterfact_records(args.edits))
    print(f"\n== half precision: {args.stream_model} in {model_dtype}, float64 state, {len(facts)} edits "
          f"in batches of {args.batch}, {device} ==")
    print("| edits | batch: more probable / took (top-1) | max rel. rounding (written vs master, per entry) "
          "| ||round(W) - W||_F / ||W - W0||_F | written == master.to(dtype) |")
    print("|---|---|---|---|---|")
    cache = tempfile.mkdtemp(prefix="rlsedit-half-")
    rows = []
    try:
        config = EditConfig(stats_tokens=args.stats_tokens, cache_dir=cache, **_tiny_cfg(args.stream_model))
        editor = Editor(model, tok, config)
        for start in range(0, len(facts), args.batch):
            report = editor.edit(facts[start:start + args.batch])
            gaps, rels, exact = [], [], True
            for layer, solver in editor.solvers_.items():
                written = read_weight(get_module(model, editor.spec_.edit_module_path.format(layer)))
                exact &= bool(torch.equal(written, solver.W_.to(model_dtype)))
                diff = written.double() - solver.W_
                gaps.append(float(torch.linalg.norm(diff) / torch.linalg.norm(solver.W_ - solver.W0_)))
                rels.append(float((diff.abs() / solver.W_.abs().clamp_min(1e-30)).max()))
            row = {"edits": start + len(report.facts), "improved": report.improved, "success_rate": report.success_rate,
                   "max_entry_rel": max(rels), "gap_vs_edit": max(gaps), "exact_master": exact}
            rows.append(row)
            print(f"| {row['edits']} | {row['improved']:.2f} / {row['success_rate']:.2f} | "
                  f"{row['max_entry_rel']:.2e} | {row['gap_vs_edit']:.2e} | {exact} |", flush=True)
        new = score_targets(model, tok, [f.text() for f in facts], [f.target for f in facts])
        true = score_targets(model, tok, [f.text() for f in facts], [f.target_true or f.target for f in facts])
        efficacy = sum(a.mean_nll < b.mean_nll for a, b in zip(new, true, strict=True)) / len(facts)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    print(f"final efficacy over all {len(facts)} edits (new target more likely than the true one): {efficacy:.3f}")
    return {"rows": rows, "efficacy": efficacy}


def _mom2_weight(text: str):
    """``--mom2-weight``: a number, or ``default`` (None: the editor's default N)."""
    return None if text in ("default", "none", "None") else float(text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="the model's dtype")
    parser.add_argument("--state-dtype", default=None, choices=["float32", "float64"],
                        help="the editor's state (default: float64 on CUDA, float32 on CPU to stay under 8 GB)")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers (32: the full 8B shape)")
    parser.add_argument("--edit-layers", type=int, default=1)
    parser.add_argument("--batch", type=int, default=100, help="facts per edit, and u of the kernel timing")
    parser.add_argument("--stats-tokens", type=int, default=4000)
    parser.add_argument("--value-steps", type=int, default=3)
    parser.add_argument("--alpha", type=float, default=1.0,
                        help="weight of ||W - W0||^2 (> 0: a few thousand statistics tokens leave E[kk^T] singular)")
    parser.add_argument("--mom2-weight", type=_mom2_weight, default=1.0,
                        help="N of the anchor, or 'default' for the editor's default 15000 d_k / 14336 (keeps "
                             "lambda = k^T C k of order 1 for in-distribution keys, which a float32 state needs "
                             "for the downdate of the certificate and undo); 1 (the script's default) keeps A "
                             "well conditioned on a random model but makes lambda >> 1")
    parser.add_argument("--cache-dir", default=None, help="statistics cache (default: a temporary folder)")
    parser.add_argument("--kernel-dk", type=int, default=14336)
    parser.add_argument("--kernel-dv", type=int, default=4096)
    parser.add_argument("--kernel-dtypes", default="float64,float32")
    parser.add_argument("--blocks", type=lambda t: [int(x) for x in t.split(",") if x], default=[],
                        help="also time the symmetric update with these panel sizes (e.g. 1024,2048,4096)")
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--max-bytes", type=float, default=7e9,
                        help="skip LayerRLS.step on CPU when its planned peak exceeds this")
    parser.add_argument("--skip-library", action="store_true")
    parser.add_argument("--skip-resolve", action="store_true")
    parser.add_argument("--skip-pipeline", action="store_true")
    parser.add_argument("--kernel-only", action="store_true")
    parser.add_argument("--drift", action="store_true", help="run only the float32 drift stream")
    parser.add_argument("--drift-dk", type=int, default=4096)
    parser.add_argument("--drift-updates", type=int, default=10_000)
    parser.add_argument("--drift-u", type=int, default=1)
    parser.add_argument("--drift-cond", type=float, default=1e6,
                        help="condition number of the anchor E[kk^T] (eigenvalues log-spaced)")
    parser.add_argument("--half", action="store_true",
                        help="edit --stream-model loaded in --dtype (e.g. bfloat16): edits hold? written vs master")
    parser.add_argument("--stream", action="store_true", help="run only a CounterFact editing stream")
    parser.add_argument("--stream-model", default="smollm2", help="smollm2, or tiny (a dry run)")
    parser.add_argument("--edits", type=int, default=1000, help="edits of the --stream")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--quick", action="store_true", help="tiny widths everywhere (seconds)")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA requested but not available", file=sys.stderr)
        return 2
    if args.quick:
        args.kernel_dk, args.kernel_dv = min(args.kernel_dk, 512), min(args.kernel_dv, 64)
        args.drift_dk, args.drift_updates = min(args.drift_dk, 128), min(args.drift_updates, 100)
        args.batch, args.stats_tokens, args.value_steps = min(args.batch, 8), min(args.stats_tokens, 500), 2
        args.layers = min(args.layers, 4)
    model_dtype = getattr(torch, args.dtype)
    state_dtype = getattr(torch, args.state_dtype or ("float64" if device.type == "cuda" else "float32"))
    print(machine_description(device))
    print(f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    results: dict = {"machine": machine_description(device), "args": vars(args)}
    tic = time.perf_counter()
    if args.drift:
        results["drift"] = run_drift(args, device)
    elif args.half:
        results["half"] = run_half(args, device, model_dtype)
    elif args.stream:
        results["stream"] = run_stream(args, device, model_dtype, state_dtype)
    else:
        if not (args.skip_pipeline or args.kernel_only):
            results["pipeline"] = run_pipeline(args, device, model_dtype, state_dtype)
            gc.collect()
        dtypes = [getattr(torch, d) for d in args.kernel_dtypes.split(",") if d]
        results["kernel"] = run_kernel(args, device, dtypes)
    print(f"\ntotal {time.perf_counter() - tic:.1f} s; process RSS peak {format_bytes(rss_peak())}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
