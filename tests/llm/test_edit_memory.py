"""benchmarks/edit_memory.py: the peak memory of one edit call, by stage, in a fresh process per
configuration (its CPU dry run: a tiny random Llama, batches 2 and 4)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


_HWM_CHECK = """
import sys
sys.path.insert(0, "benchmarks")
import edit_memory as em
if not em.hwm_resettable():
    print("unresettable")
    raise SystemExit(0)
meter = em.Meter()
before = meter.start()
grow = meter.wrap("grow", lambda n: bytearray(n))
buf = grow(200 * 2**20)  # 200 MiB, touched (zero-filled)
peak = meter.finish()
print(peak - before, meter.stages["grow"]["calls"], meter.stages["grow"]["increment"])
"""


def test_rss_high_water_mark_resets_and_sees_an_allocation():
    # A fresh process, as the benchmark uses: in a long-lived one (the whole suite) the allocator can
    # serve the 200 MiB from pages it already holds, and the RSS does not grow.
    proc = subprocess.run([sys.executable, "-c", _HWM_CHECK], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    if proc.stdout.strip() == "unresettable":
        pytest.skip("this kernel does not let a process reset VmHWM")
    growth, calls, increment = (int(x) for x in proc.stdout.split())
    assert growth >= 190 * 2**20
    assert calls == 1 and increment >= 190 * 2**20


def test_edit_memory_dry_run_writes_rows_and_a_table(tmp_path, benchmark_script):
    out = tmp_path / "mem.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "benchmarks/edit_memory.py", "--dry-run", "--out", str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    rows = results["rows"]
    assert [(r["model"], r["batch"]) for r in rows] == [("tiny", 2), ("tiny", 4)]
    for r in rows:
        assert r["peak"] >= r["rss_before"] > 0 and r["increment"] == r["peak"] - r["rss_before"]
        assert {"score_before", "values", "keys", "hidden", "propose", "commit", "score_after"} <= set(r["stages"])
        assert all(s["peak"] <= r["peak"] for s in r["stages"].values())  # the call's peak covers every stage
        assert r["logits_bytes"] == r["value_positions"] * r["vocab"] * 4
    assert "tiny" in results["fit"]
    render = benchmark_script("render_memory_table")
    assert render.table(results) in proc.stdout


def test_merge_keeps_earlier_rows_and_replaces_a_rerun(benchmark_script):
    em = benchmark_script("edit_memory")

    def row(batch, chunk=None, inc=1, steps=2):
        return {"model": "smollm2", "batch": batch, "value_chunk": chunk, "value_steps": steps, "increment": inc}

    class Args:
        value_steps = 2

    first = em.collect([row(10, inc=1), row(100, inc=5)], "machine A", Args())
    second = em.collect([row(100, inc=7), row(500, chunk=50, inc=2)], "machine B", Args(), previous=first)
    assert [(r["batch"], r["increment"]) for r in second["rows"]] == [(10, 1), (100, 7)]
    assert [(r["batch"], r["value_chunk"]) for r in second["chunked_rows"]] == [(500, 50)]
    assert [r["machine"] for r in second["runs"]] == ["machine A", "machine B"]
