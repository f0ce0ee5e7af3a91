"""benchmarks/combine_bench.py on the committed runs: the 2,000-edit run extends the 1,000-edit
one, so it carries copies of that run's scores, which the table must show once."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
ASSETS = ROOT / "docs" / "assets" / "bench"


@pytest.fixture(scope="module")
def combine():
    spec = importlib.util.spec_from_file_location("combine_bench", ROOT / "benchmarks" / "combine_bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rows_at_several_lengths_are_distinct_and_match_the_runs(combine, tmp_path, capsys):
    runs = [ASSETS / "smol1000s", ASSETS / "smol2000s"]
    rows, base = combine.collect(runs, [1000, 2000])
    keys = [(label, edits) for label, _run, edits, *_ in rows]
    assert len(keys) == len(set(keys))  # the 1,000-edit copies in smol2000s are dropped
    assert ("rlsedit", 1000) in keys and ("rlsedit", 2000) in keys
    final2000 = json.loads((runs[1] / "results.json").read_text())["methods"]["rlsedit"]["final"]
    row = next(r for r in rows if r[0] == "rlsedit" and r[2] == 2000)
    assert row[3].to_json() == final2000["all"] and row[4].to_json() == final2000["retention"]
    assert set(base) == {1000, 2000} and 0 < base[2000].efficacy < 1
    plot = tmp_path / "lengths.png"
    combine.main(["--at", "2000,1000", "--plot", str(plot), *map(str, runs)])
    out = capsys.readouterr().out
    assert plot.stat().st_size > 0
    assert f"| rlsedit | smol2000s | final | 2000 | {100 * final2000['all']['efficacy']:.1f} |" in out


def test_different_streams_and_bad_lengths_are_refused(combine, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    results = json.loads((ASSETS / "smol1000s" / "results.json").read_text())
    results["settings"]["case_ids"] = list(reversed(results["settings"]["case_ids"]))
    (other / "results.json").write_text(json.dumps(results))
    with pytest.raises(SystemExit, match="not the same stream"):
        combine.collect([ASSETS / "smol1000s", other], [1000])
    for bad in ("0", "ten", ""):
        with pytest.raises(SystemExit):
            combine.main(["--at", bad, str(ASSETS / "smol1000s")])


def test_retention_plot_merges_runs_of_one_stream_and_refuses_unequal_retention_sets(combine, tmp_path, capsys):
    runs = [ASSETS / "zsre887", ASSETS / "zsre887o_memit"]  # RLSEdit with shadows; MEMIT on its own values
    merged = combine.merge_retention(runs)
    assert set(merged.methods) == {"rlsedit", "memit (shadow)", "alphaedit (shadow)", "memit"}
    own = json.loads((runs[1] / "results.json").read_text())["methods"]["memit"]
    assert [p.to_json() for p in merged.methods["memit"].checkpoints] == own["checkpoints"]
    # two runs of one method: each label names its run (by path where the folder names agree)
    copies = []
    for parent in ("a", "b"):
        copy = tmp_path / parent / runs[1].name
        copy.mkdir(parents=True)
        (copy / "results.json").write_bytes((runs[1] / "results.json").read_bytes())
        copies.append(copy)
    assert set(combine.merge_retention(copies).methods) == {f"memit [{copy}]" for copy in copies}
    plot = tmp_path / "retention.png"
    combine.main(["--at", "887", "--retention-plot", str(plot), *map(str, runs)])
    assert plot.stat().st_size > 0 and "retention plot:" in capsys.readouterr().out
    # a run that re-scores a different number of first edits is refused
    other = tmp_path / "other"
    other.mkdir()
    results = json.loads((runs[1] / "results.json").read_text())
    results["config"]["retention_size"] = 50
    (other / "results.json").write_text(json.dumps(results))
    with pytest.raises(SystemExit, match="different numbers of first edits"):
        combine.merge_retention([runs[0], other])
