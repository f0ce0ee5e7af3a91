"""benchmarks/leaderboard.py: on the committed single-stream runs, and on several synthetic streams
with per-fact rows."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from rlsedit_llm.evaluation.metrics import summarize_cases

ROOT = Path(__file__).resolve().parents[3]
ASSETS = ROOT / "docs" / "assets" / "bench"


@pytest.fixture(scope="module")
def board():
    import importlib.util

    spec = importlib.util.spec_from_file_location("leaderboard", ROOT / "benchmarks" / "leaderboard.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses resolve their annotations through sys.modules
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def _table(text: str, title_part: str) -> list[str]:
    """The lines of the table whose title contains ``title_part``, up to its notes."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("###") and title_part in line)
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("###")), len(lines))
    return lines[start:end]


def _row(table: list[str], label: str) -> list[str]:
    [line] = [line for line in table if line.startswith(f"| {label} |")]
    return [c.strip() for c in line.split("|")[1:-1]]


def test_committed_single_stream_runs(board, tmp_path, capsys):
    runs = [ASSETS / "smol1000s", ASSETS / "smol1000s_anchor", ASSETS / "smol1000s_ultratuned", ASSETS / "zsre887",
            ASSETS / "zsre887o_rlsedit"]
    out = tmp_path / "board.md"
    assert board.main([*map(str, runs), "--resamples", "300", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert out.read_text().strip() == text.strip()
    table = _table(text, "counterfact_simple · 1,000 edits")
    assert "1 stream" in table[0] and any(line.startswith("1 stream: intervals over facts only") for line in table)
    raw = json.loads((ASSETS / "smol1000s" / "results.json").read_text())["methods"]
    rls = _row(table, "rlsedit")
    efficacy = raw["rlsedit"]["final"]["all"]["efficacy"]
    assert rls[2].startswith(f"{100 * efficacy:.1f} [")  # the recorded mean, with its interval
    low, high = (float(x) for x in rls[2].split("[")[1].rstrip("]").split(","))
    assert low < 100 * efficacy < high and high - low < 6  # about +-1.4 points on 1,000 facts
    assert rls[1] == "1" and rls[-2] == "(reference)"
    sec = raw["rlsedit"]["seconds_edit"] / raw["rlsedit"]["edits_done"]
    assert rls[8] == f"{sec:.2f}"
    # memit_seq shadows rlsedit (the same estimator): nothing resolved; UltraEdit loses clearly
    assert _row(table, "memit_seq (shadow)")[-1] == "none resolved"
    assert "wins ES, PS, score" in _row(table, "ultraedit")[-1]
    assert "+norm-anchor" in text and "ultraedit lr=0.09333 ridge=0.01" in text
    # zsRE's token accuracies are not 0/1: no interval without per-fact rows, and the run that
    # did not finish is listed as skipped
    zsre = _table(text, "zsre · 887 edits")
    assert _row(zsre, "rlsedit")[2].endswith("(—)")
    assert any("Skipped: rlsedit in zsre887o_rlsedit" in line for line in zsre)


def _synthetic_runs(tmp_path: Path, p_ref, p_other, streams: int = 3, n: int = 400) -> list[Path]:
    """Runs of rlsedit and encore on ``streams`` streams (seeds 1..), each with per-fact rows drawn
    with the per-metric success rates ``p_ref`` and ``p_other``."""
    template = json.loads((ASSETS / "cf300b100" / "results.json").read_text())
    rng = np.random.default_rng(0)
    folders = []
    for seed in range(1, streams + 1):
        raw = copy.deepcopy(template)
        ids = [seed * 10_000 + i for i in range(n)]
        raw["settings"].update(dataset="counterfact_simple", n_edits=n, stream_seed=seed, fluency_protocol="rome",
                               case_ids=ids)
        rec = raw["methods"]["rlsedit"]
        raw["methods"] = {}
        for name, p in (("rlsedit", p_ref), ("encore", p_other)):
            rows = [{"case_id": c, **dict(zip(("efficacy", "generalization", "specificity"),
                                              map(float, rng.binomial(1, p)), strict=True))} for c in ids]
            method = copy.deepcopy(rec)
            rng.shuffle(rows)  # rows in another order: the comparison pairs them by case id
            method["final"].update(cases=rows, edits=n, all=summarize_cases(rows))
            method["edits_done"] = n
            raw["methods"][name] = method
        folder = tmp_path / f"stream{seed}"
        folder.mkdir(parents=True)
        (folder / "results.json").write_text(json.dumps(raw))
        folders.append(folder)
    return folders


def test_several_streams_with_per_fact_rows_pair_by_fact_and_wins_flip(board, tmp_path):
    folders = _synthetic_runs(tmp_path / "a", p_ref=[0.95, 0.85, 0.60], p_other=[0.80, 0.84, 0.75])
    groups = board.collect(folders)
    text = board.render(groups, n_resamples=300)
    table = _table(text, "3 streams")
    assert "fluency rome" in table[0] and not any("≈" in line for line in table)
    enc = _row(table, "encore")
    assert enc[1] == "3"
    assert "wins ES" in enc[-1] and "loses NS" in enc[-1] and "PS" not in enc[-1]
    # the difference is the reference minus the method, paired by case id over the three streams
    ref, other = groups[0].entries["rlsedit"], groups[0].entries["encore"]
    diff = board.versus_reference(ref, other, n_resamples=300, seed=0)
    assert diff["efficacy"].win and diff["specificity"].loss and diff["efficacy"].streams == 3
    # the same runs with the two methods' roles swapped: every win becomes a loss
    swapped = _synthetic_runs(tmp_path / "b", p_ref=[0.80, 0.84, 0.75], p_other=[0.95, 0.85, 0.60])
    enc = _row(_table(board.render(board.collect(swapped), n_resamples=300), "3 streams"), "encore")
    assert "loses ES" in enc[-1] and "wins NS" in enc[-1]


def test_a_missing_run_is_refused(board, tmp_path):
    with pytest.raises(SystemExit, match="no results.json"):
        board.main([str(tmp_path)])
