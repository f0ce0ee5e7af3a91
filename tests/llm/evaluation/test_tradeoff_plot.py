"""benchmarks/tradeoff.py: which other methods join the trade-off plot, and the plot itself."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def tradeoff(benchmark_script):
    return benchmark_script("tradeoff")


def _scores(es, ns):
    return {"efficacy": es, "generalization": es - 0.1, "specificity": ns, "score": es * ns}


def _bench_folder(path: Path, edits: int, methods: dict[str, int], shadow=()) -> Path:
    """A bench results.json whose methods end after the given numbers of edits."""
    path.mkdir(parents=True)
    results = {"settings": {"shadow": list(shadow)}, "methods": {
        name: {"final": {"edits": n, "all": _scores(0.5 + i / 10, 0.6), "retention": _scores(0.4, 0.7)}}
        for i, (name, n) in enumerate(methods.items())}}
    (path / "results.json").write_text(json.dumps(results))
    return path


def test_other_methods_join_only_when_the_whole_stream_was_scored(tradeoff, tmp_path):
    folder = _bench_folder(tmp_path / "a", 100, {"rlsedit": 100, "memit": 100, "encore": 100, "ft": 40},
                           shadow=["memit"])
    stream = {"edits": 100, "eval_cases": 100, "edits_per_key_dim": 0.1}
    got = tradeoff.bench_points(folder, stream)
    # RLSEdit is the grid itself; a method that stopped early is another stream length.
    assert set(got) == {"memit (shadow)", "encore"}
    assert got["encore"]["summary"]["efficacy"] == pytest.approx(0.7)
    assert tradeoff.bench_points(folder, {**stream, "eval_cases": 50}) == {}  # the grid scored fewer edits
    other = _bench_folder(tmp_path / "b", 100, {"encore": 100})
    both = tradeoff.compared([folder, other], stream)
    assert set(both) == {"memit (shadow)", "encore", "encore (b)"}


def test_rlsedit_runs_the_grid_lacks_join_the_plot_by_their_settings(tradeoff, tmp_path):
    """An RLSEdit run with value-norm anchoring or alpha > 0 is not a grid point: it joins, labelled
    by what differs; a plain alpha = 0 run does not."""
    stream = {"edits": 100, "eval_cases": 100, "edits_per_key_dim": 0.1}
    for name, settings, label in (("plain", {"alpha": 0.0}, None),
                                  ("anchored", {"alpha": 0.0, "anchor_value_norms": True},
                                   "RLSEdit own values, value norms anchored"),
                                  ("alpha", {"alpha": 20.0}, "RLSEdit own values, a=20")):
        folder = _bench_folder(tmp_path / name, 100, {"rlsedit": 100})
        results = json.loads((folder / "results.json").read_text())
        results["settings"].update(settings)
        (folder / "results.json").write_text(json.dumps(results))
        assert set(tradeoff.bench_points(folder, stream)) == ({label} if label else set())


def test_plot_draws_the_grid_and_the_other_methods(tradeoff, tmp_path):
    points = [{"alpha": a, "mom2_weight": n, "summary": _scores(0.9 - a / 100, 0.6 + a / 100),
               "retention": _scores(0.8 - a / 100, 0.7)} for a in (0, 5, 35) for n in (1000.0, 4000.0)]
    results = {"points": points, "stream": {"edits": 100, "eval_cases": 100, "edits_per_key_dim": 0.1}}
    path = tmp_path / "pareto.png"
    tradeoff.plot(results, path, {"encore": {"summary": _scores(0.8, 0.65), "retention": _scores(0.7, 0.7)}})
    assert path.stat().st_size > 10_000 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
