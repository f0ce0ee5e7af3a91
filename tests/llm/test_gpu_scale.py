"""benchmarks/gpu_scale.py and its two opt-in steps of the GPU check (edit10k, big8b), run as the
CPU dry run: a tiny random model, 20 facts in batches of 10, tiny widths with a small vocabulary."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_edit10k_and_big8b_dry_run(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", GPU_CHECK_OUT=str(tmp_path), TQDM_DISABLE="1")
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry-run", "--steps", "edit10k,big8b"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| edit10k (tiny model, simplified CounterFact) | PASS |" in proc.stdout
    assert "| big8b (quick widths) | PASS |" in proc.stdout
    edit10k = json.loads((tmp_path / "edit10k.json").read_text())
    assert edit10k["edits_done"] == edit10k["edits"] == 20 and len(edit10k["batches"]) == 2
    assert {"values", "keys", "update", "score"} <= set(edit10k["seconds_per_edit"])
    assert 0 <= edit10k["efficacy"] <= 1 and 0 <= edit10k["top1"] <= 1
    assert edit10k["profile"]["top"] and (tmp_path / "edit10k.json.profile.txt").exists()  # batch 2 profiled
    big8b = json.loads((tmp_path / "big8b.json").read_text())
    assert big8b["vocab"] == 1024 and big8b["batch"] == 10 and big8b["cuda_peak_edit"] is None
    assert big8b["seconds_per_edit"] > 0 and "values" in big8b["stages"]
    bad = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry-run", "--steps", "edit10k,nope"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "edit10k, big8b" in bad.stderr


def test_edit10k_stops_at_a_batch_boundary_when_the_budget_is_spent(tmp_path, benchmark_script):
    """A spent editing budget ends the stream after a whole batch and still scores what was written."""
    gpu_scale = benchmark_script("gpu_scale")
    out = tmp_path / "e.json"
    assert gpu_scale.main(["edit10k", "--dry-run", "--time-budget", "0", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["edits_done"] == 10 and result["edits"] == 20  # one batch, then the budget check
    assert len(result["batches"]) == 1 and 0 <= result["efficacy"] <= 1
