"""Scale: the memory planner against real tensors, the in-place Woodbury step, half-precision
models (the written weight is the float64 master rounded), and the GPU check's dry run."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from rlsedit_llm import EditConfig, Editor, ValueConfig
from rlsedit_llm.adapters.spec import get_module, read_weight
from rlsedit_llm.errors import NotPositiveDefiniteError, RLSEditError
from rlsedit_llm.kernel.inplace import mirror_upper_, symmetric_rank_update_, woodbury_update_
from rlsedit_llm.kernel.rls import LayerRLS, woodbury_downdate, woodbury_update
from rlsedit_llm.memory import MODEL_SHAPES, InsufficientMemoryError, check_fits, memory_table, plan

ROOT = Path(__file__).resolve().parents[3]
TINY_FACTS = [
    {"prompt": "we saw {}", "subject": "the old cat", "target": "paris"},
    {"prompt": "they sold {}", "subject": "the long table", "target": "wood"},
]
pytestmark = pytest.mark.usefixtures("one_thread_unless_slow")


def _layer(d_k, d_v, dtype, track=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(3 * d_k, d_k, generator=g, dtype=torch.float64)
    W0 = torch.randn(d_k, d_v, generator=g, dtype=torch.float64)
    return LayerRLS(W0, 0.1, 1.0, X.mT @ X / (3 * d_k), dtype=dtype, track_information=track)


# -- planner -------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("track", [False, True])
def test_plan_state_bytes_equal_the_tensors_nbytes(dtype, track):
    d_k, d_v = 96, 40
    solver = _layer(d_k, d_v, dtype, track)
    t = solver.state_dict()["tensors"]
    p = plan(d_v, d_k, 1, dtype, batch=5, track_information=track)
    assert p.state_per_layer == sum(t[k].nbytes for k in ("C", "gram0", "G") if k in t)
    assert p.master_per_layer == t["W"].nbytes + t["W0"].nbytes
    assert p.state == sum(x.nbytes for x in t.values())
    # the pending step of LayerRLS holds a new W and (d_k, u) factors, no d_k^2 tensor: within
    # the planned temporaries of the in-place editor
    K = torch.randn(5, d_k, dtype=dtype)
    step = solver.propose(K, K @ solver.W_ + torch.randn(5, d_v, dtype=dtype))
    assert not step.state and all(F.shape == (d_k, 5) for _, F, _ in step.inplace)
    assert step.W.nbytes + sum(F.nbytes for _, F, _ in step.inplace) <= p.edit_temporaries < p.state_per_layer // 2
    assert p.statistics_per_layer == torch.zeros(d_k, d_k, dtype=torch.float64).nbytes


def test_editor_memory_plan_matches_the_prepared_editor(tiny, tmp_path):
    model, tok = tiny("llama", init_std=0.3)
    cfg = EditConfig(alpha=1e-3, mom2_weight=1.0, stats_tokens=500, stats_max_length=32, cache_dir=str(tmp_path),
                     n_templates=1, template_length=3)
    editor = Editor(model, tok, cfg).prepare()
    p = editor.memory_plan()
    kept = sum(x.nbytes for s in editor.solvers_.values() for x in s.state_dict()["tensors"].values())
    assert p.state == kept
    assert p.model_bytes == sum(x.nbytes for x in model.parameters())


def test_plan_figures_for_llama3_8b():
    p64 = plan(4096, 14336, 5, "float64")
    p32 = plan(4096, 14336, 5, "float32")
    assert p64.state_per_layer == 2 * 8 * 14336**2  # C and gram0: 3.29 GB
    assert p64.master_per_layer == 2 * 8 * 14336 * 4096
    assert p32.state * 2 == p64.state
    square = 8 * 14336**2
    # in place (the default): a new W and a factor G (d_k, u) per layer, F^T at one: no d_k^2 term
    assert p64.edit_temporaries == 5 * 8 * 14336 * (4096 + 100) + 8 * 14336 * 100
    pure = plan(4096, 14336, 5, "float64", inplace=False)  # the pure update: (n_edit + 3) d_k^2 more
    assert pure.edit_temporaries > 8 * square  # (n_edit + 3) d_k^2
    assert plan(4096, 14336, 5, "float64", replacing=True).edit_temporaries == p64.edit_temporaries + 5 * square
    assert p64.peak == max(p64.peak_edit, p64.peak_prepare) >= p64.statistics
    table = memory_table()
    assert table.count("\n") == 1 + 2 * len(MODEL_SHAPES)
    assert "Llama-3-70B" in table and "| no |" in table and "| yes |" in table


def test_plan_rejects_bad_input():
    with pytest.raises(RLSEditError):
        plan(0, 10, 1)
    with pytest.raises(RLSEditError):
        plan(10, 10, 1, "bfloat16")


def test_check_fits_raises_a_typed_error_naming_the_sizes():
    p = plan(4096, 14336, 5, "float64")
    with pytest.raises(InsufficientMemoryError) as info:
        check_fits(p, "cpu", free_bytes=24 * 10**9)
    assert isinstance(info.value, MemoryError) and isinstance(info.value, RLSEditError)
    message = str(info.value)
    assert "14336" in message and "24.00 GB" in message and "float32" in message
    headroom = check_fits(plan(576, 1536, 5, "float64"), "cpu", free_bytes=10**10)
    assert headroom > 0


def test_check_fits_reads_the_free_memory_of_the_device(monkeypatch):
    import rlsedit_llm.memory as memory

    monkeypatch.setattr(memory, "free_memory", lambda device: 10**8)
    with pytest.raises(InsufficientMemoryError):
        check_fits(plan(576, 1536, 5, "float64"), "cpu")
    monkeypatch.undo()
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2 * 10**9, 8 * 10**9))
    assert memory.free_memory("cuda:0") == 2 * 10**9
    assert memory.free_memory("cpu") > 0


# -- in-place Woodbury step ---------------------------------------------------------------------
def _stream(u, d_k, d_v, seed=1):
    """Batches (K, noise) in float64; the third step removes the second batch."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(u, d_k, generator=g, dtype=torch.float64),
             torch.randn(u, d_v, generator=g, dtype=torch.float64)) for _ in range(2)]


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-11), (torch.float32, 1e-3)])
@pytest.mark.parametrize("u", [1, 7])
@pytest.mark.parametrize("block", [16, 512])  # 70 is not a multiple of 16; 512 > 70: one panel
def test_inplace_update_equals_the_pure_update(dtype, tol, u, block):
    """woodbury_update_ against the pure woodbury_update / woodbury_downdate (the theory's torch
    twin), always computed in float64: additions, then the removal of the batch added last."""
    d_k, d_v = 70, 9
    start = _layer(d_k, d_v, torch.float64)
    C_ref, W_ref = start.C_.clone(), start.W_.clone()
    C, W = start.C_.to(dtype).contiguous(), start.W_.to(dtype)
    batches = _stream(u, d_k, d_v)
    added = []
    for sign, (K, noise) in ((-1, batches[0]), (-1, batches[1]), (1, batches[1])):  # the theory's signs
        if sign < 0:
            V = K @ W_ref + noise
            added.append(V)
            C_ref, W_ref = woodbury_update(C_ref, W_ref, K, V)
        else:  # remove the batch added last, with its absolute targets
            V = added[-1]
            C_ref, W_ref = woodbury_downdate(C_ref, W_ref, K, V)
        data_ptr = C.data_ptr()
        Kd, Vd = K.to(dtype), V.to(dtype)
        woodbury_update_(C, W, Kd, Vd, sign=sign, block=block)
        assert C.data_ptr() == data_ptr and C.dtype == dtype
        assert torch.equal(C, C.mT)  # bitwise symmetric
        assert float((C.double() - C_ref).abs().max()) <= tol * float(C_ref.abs().max())
        assert float((W.double() - W_ref).abs().max()) <= tol * float(W_ref.abs().max())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_symmetric_rank_update_keeps_c_bitwise_symmetric_over_many_updates(dtype):
    n, u = 203, 9  # not a multiple of the block
    g = torch.Generator().manual_seed(0)
    X = torch.randn(n, n, generator=g, dtype=torch.float64)
    C_ref = X @ X.mT / n + torch.eye(n, dtype=torch.float64)
    C_ref = C_ref.triu() + C_ref.triu(1).mT  # symmetric to start with
    C = C_ref.to(dtype).clone()
    for t in range(60):
        G = torch.randn(n, u, generator=g, dtype=torch.float64) / 10
        alpha = 1.0 if t % 3 else -0.5  # additions and removals
        symmetric_rank_update_(C, G.to(dtype), alpha, block=64)
        C_ref += alpha * G @ G.mT
        assert torch.equal(C, C.mT), t
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert float((C.double() - C_ref).abs().max()) <= tol * float(C_ref.abs().max())


@pytest.mark.parametrize("mode", ["symmetric", "auto", "mirror", "none"])
def test_every_symmetrize_mode_computes_the_same_step(mode):
    solver = _layer(48, 5, torch.float64)
    K = torch.randn(6, 48, dtype=torch.float64)
    R = torch.randn(6, 5, dtype=torch.float64)
    C, W = solver.C_.clone(), solver.W_.clone()
    woodbury_update_(C, W, K, K @ W + R, symmetrize=mode, block=20)
    C_ref, W_ref = woodbury_update(solver.C_, solver.W_, K, K @ solver.W_ + R)
    assert float((C - C_ref).abs().max()) <= 1e-11 * float(C_ref.abs().max())
    assert float((W - W_ref).abs().max()) <= 1e-11 * float(W_ref.abs().max())
    if mode != "none":
        assert torch.equal(C, C.mT)
    with pytest.raises(ValueError):
        woodbury_update_(C, W, K, K @ W + R, symmetrize="sometimes")


def test_inplace_step_follows_the_theory_sign_convention():
    """sign = -1 adds a batch and +1 removes it, with absolute targets, as in
    rlsedit_theory.recursive: the kernel's factors reproduce the NumPy update."""
    import numpy as np

    from rlsedit_llm.kernel.inplace import woodbury_factors
    from rlsedit_theory import recursive

    solver = _layer(24, 4, torch.float64)
    K, V = torch.randn(3, 24, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    C_np, W_np, _ = recursive.woodbury_update(solver.C_.numpy(), solver.W_.numpy(), K.numpy(), V.numpy())
    G, Y = woodbury_factors(solver.C_, solver.W_, K, V, sign=-1)
    np.testing.assert_allclose((solver.W_ + G @ Y).numpy(), W_np, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose((solver.C_ - G @ G.mT).numpy(), C_np, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="sign"):
        woodbury_factors(solver.C_, solver.W_, K, V, sign=2)


def test_inplace_update_refuses_a_removal_that_was_never_added():
    solver = _layer(16, 3, torch.float64)
    C, W = solver.C_.clone(), solver.W_.clone()
    K = 100 * torch.randn(1, 16, dtype=torch.float64)
    with pytest.raises(NotPositiveDefiniteError):
        woodbury_update_(C, W, K, torch.zeros(1, 3, dtype=torch.float64), sign=1)
    assert torch.equal(C, solver.C_) and torch.equal(W, solver.W_)


def test_mirror_upper_copies_the_upper_triangle():
    A = torch.randn(37, 37, dtype=torch.float64)
    expected = torch.triu(A) + torch.triu(A, 1).mT
    assert torch.equal(mirror_upper_(A, block=8), expected)


# -- half precision: the master copy -------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_edit_holds_and_writes_the_rounded_master(dtype, tiny, tmp_path):
    model, tok = tiny("llama", init_std=0.3, dtype=dtype)
    cfg = EditConfig(alpha=1e-3, mom2_weight=1.0, stats_tokens=2000, stats_max_length=64, cache_dir=str(tmp_path),
                     n_templates=2, template_length=4, value=ValueConfig(lr=0.5, steps=40, clamp_norm_factor=4.0))
    editor = Editor(model, tok, cfg)
    for batch in (TINY_FACTS[:1], TINY_FACTS[1:]):  # two edits: the second starts from the master
        report = editor.edit(batch)
        assert all(r.prob_after > r.prob_before for r in report.facts), str(report)
        for layer, solver in editor.solvers_.items():
            assert solver.W_.dtype == torch.float64
            written = read_weight(get_module(model, editor.spec_.edit_module_path.format(layer)))
            assert written.dtype == dtype
            assert torch.equal(written, solver.W_.to(dtype))  # exactly the master, rounded


# -- the GPU check's CPU dry run -----------------------------------------------------------------
@pytest.mark.slow  # about 90 s on 2 shared cores
def test_gpu_check_dry_run_prints_the_summary(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", GPU_CHECK_OUT=str(tmp_path))
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry-run"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "GPU CHECK SUMMARY" in out
    for step in ("pytest -m gpu", "counterfact stream", "scale.py"):
        assert step in out
    table = [line for line in out.split("GPU CHECK SUMMARY", 1)[1].splitlines() if line.startswith("| ")]
    rows = {cells[0]: cells[1] for cells in ([c.strip() for c in line.strip("|").split("|")] for line in table[1:])}
    assert set(rows) == {"pytest -m gpu", "counterfact stream", "scale.py (quick)"}, table
    assert all(status == "PASS" for status in rows.values()), table


@pytest.mark.slow  # about 60 s on 2 shared cores
def test_gpu_check_bench_step_dry_run(tmp_path):
    """The opt-in bench step (every method's benchmark) runs the bench CLI and reports its table."""
    env = dict(os.environ, OMP_NUM_THREADS="1", GPU_CHECK_OUT=str(tmp_path))
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry-run", "--steps", "bench"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| rlsedit bench (every method) | PASS |" in proc.stdout
    assert "4 of 4 methods done at 4 edits" in proc.stdout  # rlsedit, memit (shadow), encore, ultraedit
    results = json.loads((tmp_path / "bench" / "results.json").read_text())
    assert all(results["methods"][m]["done"] for m in ("rlsedit", "memit", "encore", "ultraedit"))
    bad = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry-run", "--steps", "tests,nope"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "bench" in bad.stderr


@pytest.mark.slow  # about 60 s on 2 shared cores
def test_gpu_check_long_and_zsre_steps_dry_run(tmp_path):
    """The opt-in long-stream and zsRE steps run RLSEdit, AlphaEdit and MEMIT on their own values
    (no shadows) to the end, with every edit re-scored at the long stream's full checkpoints."""
    env = dict(os.environ, OMP_NUM_THREADS="1", GPU_CHECK_OUT=str(tmp_path))
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry-run", "--steps", "long,zsre"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| long stream (own values) | PASS |" in proc.stdout and "| zsRE stream (own values) | PASS |" in proc.stdout
    long = json.loads((tmp_path / "long" / "results.json").read_text())
    zsre = json.loads((tmp_path / "zsre" / "results.json").read_text())
    assert long["settings"]["shadow"] == [] and zsre["settings"]["dataset"] == "zsre"
    for results, n in ((long, 6), (zsre, 4)):
        assert {m: (r["done"], r["edits_done"]) for m, r in results["methods"].items()} == {
            m: (True, n) for m in ("rlsedit", "alphaedit", "memit")}
    full = [p["edits"] for p in long["methods"]["alphaedit"]["checkpoints"] if p.get("all")]
    assert full == [2, 4]


@pytest.mark.slow  # about 90 s on 2 shared cores
def test_gpu_check_compare_step_dry_run(tmp_path):
    """The opt-in comparison step runs one resumable bench per stream (released and +nas variants),
    then the leaderboard over the streams."""
    env = dict(os.environ, OMP_NUM_THREADS="1", GPU_CHECK_OUT=str(tmp_path))
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry-run", "--steps", "compare"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for stream in (0, 1):
        results = json.loads((tmp_path / f"compare_s{stream}" / "results.json").read_text())
        assert results["settings"].get("stream_seed", 0) == stream
        assert {m: r["done"] for m, r in results["methods"].items()} == {
            m: True for m in ("rlsedit", "rlsedit+nas", "alphaedit@released")}
    board = (tmp_path / "leaderboard.md").read_text()
    assert "2 streams" in board and "rlsedit+nas" in board and "alphaedit@released" in board
    assert "| leaderboard over the comparison's streams | PASS |" in proc.stdout


def test_editor_refuses_up_front_a_state_that_cannot_fit(monkeypatch, tmp_path):
    """Editor.prepare checks the memory plan against the device before any statistics pass."""
    import rlsedit_llm
    from rlsedit_llm import memory
    from rlsedit_llm.adapters.tiny import tiny_model

    model, tok = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    monkeypatch.setattr(memory, "free_memory", lambda device: 1024)
    editor = rlsedit_llm.Editor(model, tok, rlsedit_llm.EditConfig(stats_tokens=500, cache_dir=str(tmp_path)))
    with pytest.raises(rlsedit_llm.InsufficientMemoryError, match="does not fit on cpu: it needs .* kB"):
        editor.edit([{"prompt": "{} lives in", "subject": "Alice", "target": "Paris"}])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not editor.solvers_ and not editor.journal_
