"""The command line: `rlsedit edit` continues one stream across invocations through --state."""

import json
import re

import pytest
import torch

import rlsedit_llm
from rlsedit_llm import cli
from rlsedit_llm.adapters.tiny import tiny_model


@pytest.mark.usefixtures("one_thread_unless_slow")
def test_edit_command_saves_and_continues_the_stream(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    models = []

    def fake_load(name, **kwargs):  # a fresh copy of the same base model on every invocation
        models.append(tiny_model("llama", init_std=0.3))
        return models[-1]

    monkeypatch.setattr(rlsedit_llm, "load_model", fake_load)
    state = tmp_path / "state"
    args = ["edit", "--model", "tiny", "--state", str(state), "--alpha", "0.001",
            "--mom2-weight", "1", "--stats-tokens", "2000", "--batch", "1"]
    first = tmp_path / "a.jsonl"
    first.write_text(json.dumps({"prompt": "we saw {}", "subject": "the old cat", "target": "paris"}))
    assert cli.main(args + ["--facts", str(first)]) == 0
    assert (state / "editor.json").exists()

    second = tmp_path / "b.json"
    second.write_text(json.dumps([{"prompt": "they sold {}", "subject": "the long table", "target": "wood"}]))
    assert cli.main(args + ["--facts", str(second)]) == 0
    out = capsys.readouterr().out
    assert "edit 0" in out and "edit 1" in out  # the second invocation continued the numbering
    editor = rlsedit_llm.Editor.load(*fake_load("tiny"), state)
    assert [r.edit_id for r in editor.journal_] == [0, 1]
    assert all(s.n_updates_ == 2 for s in editor.solvers_.values())


def test_edit_command_rejects_a_bad_fact_file(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(rlsedit_llm, "load_model", lambda name, **kw: tiny_model("llama"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "no slot here", "subject": "x", "target": "y"}))
    assert cli.main(["edit", "--model", "tiny", "--facts", str(bad), "--stats-tokens", "2000"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {bad}:1: ")
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_a_malformed_jsonl_line_is_reported_by_its_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(rlsedit_llm, "load_model", lambda name, **kw: tiny_model("llama"))
    bad = tmp_path / "bad.jsonl"
    good = json.dumps({"prompt": "we saw {}", "subject": "the cat", "target": "paris"})
    bad.write_text(good + "\n\n" + good[:-3] + "\n")
    assert cli.main(["edit", "--model", "tiny", "--facts", str(bad)]) == 1
    assert capsys.readouterr().err.startswith(f"error: {bad}:3: invalid JSON at column")


@pytest.mark.parametrize("flags", [["--batch", "0"], ["--batch", "-1"], ["--layers", "a,b"]])
def test_bad_flags_end_in_a_usage_error(tmp_path, flags, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["edit", "--facts", str(tmp_path / "f.jsonl"), *flags])
    assert exc.value.code == 2 and "Traceback" not in capsys.readouterr().err


@pytest.mark.slow
def test_demo_rewrites_known_facts_and_keeps_the_first_call(capsys):
    """`rlsedit demo` on the real SmolLM2: every edited prompt answers its new target after both
    calls, the first call survives the second, and at most one neighbouring answer moves."""
    assert cli.main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "before editing" in out and "after call 2" in out
    last = out.split("after call 2", 1)[1].split("\n\n", 1)[0]
    answers = dict(re.findall(r"^\s+'(.*?)'\s+-> '(.*?)'", last, flags=re.M))
    facts = [rlsedit_llm.as_fact(f) for call in cli.DEMO_CALLS for f in call]
    for f in facts:
        assert cli._answer(answers[f.text()]) == f.target.lower(), (f.text(), answers[f.text()])
    before = out.split("before editing", 1)[1].split("\n\n", 1)[0]
    known = dict(re.findall(r"^\s+'(.*?)'\s+-> '(.*?)'", before, flags=re.M))
    assert all(cli._answer(known[f.text()]) != f.target.lower() for f in facts)  # they were real rewrites
    assert re.search(r"first call's edits still hold after the second: 2/2", out)
    moved = int(re.search(r"neighbouring prompts whose answer \(first word\) changed: (\d+)/", out).group(1))
    assert moved <= 1


@pytest.mark.usefixtures("one_thread_unless_slow")
def test_demo_takes_the_gemma_model_and_its_own_prompt_set(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    names = []

    def fake_load(name, **kwargs):
        names.append(name)
        return tiny_model("llama", init_std=0.3)

    monkeypatch.setattr(rlsedit_llm, "load_model", fake_load)
    assert cli.main(["demo", "--model", "gemma3-270m", "--stats-tokens", "500"]) == 0
    out = capsys.readouterr().out
    assert names == ["gemma3-270m"] and "loaded gemma3-270m" in out
    for prompt in cli.GEMMA_DEMO_NEIGHBOURS + ["Brazil"]:
        assert prompt in out
    with pytest.raises(SystemExit):
        cli.main(["demo", "--model", "no-such-model"])


@pytest.mark.parametrize("flags, message", [
    (["--device", "gpu0"], "--device takes a torch device"),
    (["--ultraedit-lr", "0"], "--ultraedit-lr must be > 0"),
    (["--ultraedit-ridge", "-1"], "--ultraedit-ridge must be > 0"),
    pytest.param(["--device", "cuda"], "no CUDA device is visible",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible")),
])
def test_bench_refuses_a_device_or_setting_it_cannot_use_before_writing(tmp_path, monkeypatch, capsys, flags, message):
    loads = []
    monkeypatch.setattr("rlsedit_llm.evaluation.bench.load_model", lambda *a, **k: loads.append(k))
    out = tmp_path / "bench"
    assert cli.main(["bench", *flags, "--edits", "2", "--batch", "1", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
    assert not out.exists() and not loads  # nothing loaded, nothing written


def test_bench_loads_the_model_on_the_device_it_is_given(tmp_path, monkeypatch):
    from rlsedit_llm.evaluation import bench

    seen = []

    def fake_load(name, **kwargs):  # stop the run right after the load: only the device matters here
        seen.append(kwargs.get("device"))
        raise rlsedit_llm.ModelLoadError("stop here")

    monkeypatch.setattr(bench, "load_model", fake_load)
    assert cli.main(["bench", "--device", "cpu", "--edits", "2", "--batch", "1", "--out", str(tmp_path / "b")]) == 1
    assert seen == [torch.device("cpu")]
