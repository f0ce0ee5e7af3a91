"""The command line: `rlsedit edit` continues one stream across invocations through --state;
`query`, `undo` and `export` on a saved stream; input checked before any model is loaded."""

import json
import re
import shutil
import sys

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


# ----------------------------------------------------------------------------------------------
# query, undo, export on a tiny random model saved with save_pretrained; checks before loading

GOOD_FACTS = [{"prompt": "we saw {}", "subject": "the old cat", "target": "paris"},
              {"prompt": "they sold {}", "subject": "the long table", "target": "wood"}]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A folder with ``model/`` (a tiny Llama, save_pretrained) and ``state/``: two edits written
    by `rlsedit edit` with a YAML config (``1e-3`` is read as a float)."""
    root = tmp_path_factory.mktemp("cli")
    model, tok = tiny_model("llama", init_std=0.3)
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    (root / "facts.jsonl").write_text("\n".join(json.dumps(f) for f in GOOD_FACTS))
    (root / "config.yaml").write_text(f"alpha: 1e-3\nmom2_weight: 1\nstats_tokens: 2000\ncache_dir: {root / 'stats'}\n")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert cli.main(["edit", "--model", str(root / "model"), "--facts", str(root / "facts.jsonl"), "--state",
                         str(root / "state"), "--config", str(root / "config.yaml"), "--batch", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    return root


def _edited(saved, state=None):
    """The saved tiny model with the stream of ``state`` (default: the saved one) on it."""
    model, tok = rlsedit_llm.load_model(str(saved / "model"))
    editor = rlsedit_llm.Editor.load(model, tok, state or saved / "state")
    return model, tok, editor


def _no_load(monkeypatch):
    monkeypatch.setattr(rlsedit_llm, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))


@pytest.mark.usefixtures("one_thread_unless_slow")
def test_query_prints_what_the_edited_model_says(saved, capsys):
    prompts = ["we saw the old cat", "they sold the long table"]
    args = ["query", "--model", str(saved / "model"), "--max-new-tokens", "3", "--top-k", "2"]
    for p in prompts:
        args += ["--prompt", p]
    assert cli.main(args + ["--state", str(saved / "state")]) == 0
    out = capsys.readouterr().out.splitlines()
    model, tok, editor = _edited(saved)
    assert editor.config.alpha == 0.001  # the YAML config of the stream
    assert out[0] == f"{prompts[0]!r} -> {cli._generate(model, tok, prompts[0], 3)!r}"
    assert out[3] == f"{prompts[1]!r} -> {cli._generate(model, tok, prompts[1], 3)!r}"
    (token, p), _ = cli._next_tokens(model, tok, prompts[1], 2)
    assert out[4] == f"    1. {token!r:<24} {p:.4f}" and len(out) == 6
    assert cli.main(["generate"] + args[1:]) == 0  # the alias; without --state: the saved base model
    plain = capsys.readouterr().out.splitlines()
    base, base_tok = rlsedit_llm.load_model(str(saved / "model"))
    assert plain[0] == f"{prompts[0]!r} -> {cli._generate(base, base_tok, prompts[0], 3)!r}"


@pytest.mark.usefixtures("one_thread_unless_slow")
def test_undo_lists_the_journal_and_retracts_an_edit_exactly(saved, tmp_path, monkeypatch, capsys):
    state = tmp_path / "state"
    shutil.copytree(saved / "state", state)
    _no_load(monkeypatch)  # listing, and refusing an unknown id, need no model
    assert cli.main(["undo", "--state", str(state), "--list"]) == 0
    listing = capsys.readouterr().out
    assert f"{state}: method rlsedit, 2 edit(s) in the journal" in listing
    assert re.search(r"edit 0 .* 'we saw the old cat' -> 'paris'", listing)
    assert re.search(r"edit 1 .* 'they sold the long table' -> 'wood'", listing)
    assert cli.main(["undo", "--model", str(saved / "model"), "--state", str(state), "--edit-id", "5"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: no edit 5 in {state} (its journal holds ids [0, 1]") and len(err.splitlines()) == 1
    monkeypatch.undo()
    assert cli.main(["undo", "--model", str(saved / "model"), "--state", str(state), "--edit-id", "0"]) == 0
    assert "retracted edit 0: 'we saw the old cat' -> 'paris'" in capsys.readouterr().out
    model, _, editor = _edited(saved, state)
    assert [r.edit_id for r in editor.journal_] == [1]
    reference, _, ref_editor = _edited(saved)  # the same undo through the library
    ref_editor.undo(0)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values(),
                                                   strict=True))


@pytest.mark.usefixtures("one_thread_unless_slow")
def test_export_writes_the_edited_model_in_hugging_face_format(saved, tmp_path, monkeypatch, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "exported"
    assert cli.main(["export", "--model", str(saved / "model"), "--state", str(saved / "state"),
                     "--out", str(out)]) == 0
    assert f"(2 edit(s) in its journal) to {out}" in capsys.readouterr().out
    exported = AutoModelForCausalLM.from_pretrained(out)
    edited, tok, _ = _edited(saved)
    theirs = edited.state_dict()
    assert all(torch.equal(t, theirs[name]) for name, t in exported.state_dict().items())
    assert AutoTokenizer.from_pretrained(out)("we saw")["input_ids"] == tok("we saw")["input_ids"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported"]  # no temporary folder left
    _no_load(monkeypatch)
    assert cli.main(["export", "--model", str(saved / "model"), "--state", str(saved / "state"),
                     "--out", str(out)]) == 1  # a non-empty folder is refused before loading
    assert "already exists and is not an empty folder" in capsys.readouterr().err
    monkeypatch.undo()
    half = tmp_path / "half"
    assert cli.main(["export", "--model", str(saved / "model"), "--state", str(saved / "state"),
                     "--out", str(half), "--out-dtype", "bfloat16"]) == 0
    assert AutoModelForCausalLM.from_pretrained(half, dtype="auto").dtype == torch.bfloat16


@pytest.mark.usefixtures("one_thread_unless_slow")
def test_an_exported_model_is_edited_only_with_its_state_or_new_stream(saved, tmp_path, capsys):
    """An exported model carries its stream's mark: `rlsedit edit` without that stream's state is
    refused (one line naming StreamError's remedy); --new-stream starts a new stream deliberately,
    and is refused with a --state folder that holds a saved stream."""
    out = tmp_path / "exported"
    assert cli.main(["export", "--model", str(saved / "model"), "--state", str(saved / "state"),
                     "--out", str(out)]) == 0
    config = ["--config", str(saved / "config.yaml"), "--batch", "1"]
    facts = ["--facts", str(saved / "facts.jsonl")]
    capsys.readouterr()
    assert cli.main(["edit", "--model", str(out), *facts, "--state", str(tmp_path / "fresh"), *config]) == 1
    last = capsys.readouterr().err.splitlines()[-1]  # after the loader's progress bars
    assert last.startswith("error: this model carries 2 edit(s)") and last.endswith("or pass --new-stream")
    assert not (tmp_path / "fresh" / "editor.json").exists()
    assert cli.main(["edit", "--model", str(out), *facts, "--state", str(tmp_path / "fresh"), *config,
                     "--new-stream"]) == 0
    assert (tmp_path / "fresh" / "editor.json").exists()
    assert cli.main(["edit", "--model", str(out), *facts, "--state", str(tmp_path / "fresh"), *config,
                     "--new-stream"]) == 1
    assert "holds a saved one" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["edit", "--model", "./no/such/model", "--facts", "f.jsonl"], "no model at ./no/such/model"),
    (["query", "--model", "~/no-such-model-for-rlsedit", "--prompt", "x"], "no model at ~/no-such-model-for-rlsedit"),
    (["export", "--model", "no-such-org/no-such-model", "--state", "s", "--out", "o"],
     "no model at no-such-org/no-such-model"),
    (["undo", "--model", "./nope", "--state", "s", "--edit-id", "0"], "no model at ./nope"),
    (["query", "--model", "tiny", "--prompt", "x", "--state", "nowhere"], "no saved edit state at nowhere"),
    (["export", "--model", "tiny", "--state", ".", "--out", "o"], "no saved edit state in ."),
    (["undo", "--state", "nowhere", "--list"], "no saved edit state at nowhere"),
    (["edit", "--model", "tiny", "--facts", "f.jsonl", "--config", "c.json"], "c.json: EditConfig has no field"),
    (["edit", "--model", "tiny", "--facts", "f.jsonl", "--method", "romeo"], "unknown method 'romeo'"),
    (["demo", "--config", "c.yaml"], "c.yaml:2:1: invalid YAML"),
    pytest.param(["query", "--model", "tiny", "--prompt", "x", "--device", "cuda:0"], "--device cuda:0: no CUDA device",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible")),
])
def test_input_errors_are_one_line_before_any_model_is_loaded(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "f.jsonl").write_text(json.dumps(GOOD_FACTS[0]))
    (tmp_path / "c.json").write_text(json.dumps({"alpah": 1}))
    (tmp_path / "c.yaml").write_text("alpha: [1\n")
    _no_load(monkeypatch)
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and len(err.splitlines()) == 1, err


def test_a_yaml_config_without_pyyaml_and_a_bench_without_matplotlib_name_what_to_install(tmp_path, monkeypatch,
                                                                                          capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "f.jsonl").write_text(json.dumps(GOOD_FACTS[0]))
    (tmp_path / "c.yml").write_text("alpha: 0.1\n")
    _no_load(monkeypatch)
    monkeypatch.setitem(sys.modules, "yaml", None)  # as if PyYAML were not installed
    assert cli.main(["edit", "--model", "tiny", "--facts", "f.jsonl", "--config", "c.yml"]) == 1
    assert capsys.readouterr().err == "error: c.yml: a YAML config needs PyYAML (pip install pyyaml); or write the " \
                                      "file as JSON\n"
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert cli.main(["bench", "--edits", "2", "--batch", "1", "--out", "b"]) == 1
    assert "pip install 'rlsedit[bench]'" in capsys.readouterr().err and not (tmp_path / "b").exists()


def test_the_model_flags_reach_the_loader(monkeypatch, capsys):
    seen = []

    def fake_load(name, **kwargs):
        seen.append((name, kwargs))
        return tiny_model("llama")

    monkeypatch.setattr(rlsedit_llm, "load_model", fake_load)
    assert cli.main(["query", "--model", "tiny", "--prompt", "we saw", "--max-new-tokens", "1",
                     "--device", "CPU", "--dtype", "bfloat16"]) == 0
    assert seen == [("tiny", {"dtype": torch.bfloat16, "device": torch.device("cpu"), "local_files_only": True})]
    assert cli.main(["query", "--model", "smollm2", "--prompt", "we saw", "--max-new-tokens", "1",
                     "--dtype", "auto"]) == 0
    assert seen[1] == ("smollm2", {"dtype": torch.float32, "device": None, "local_files_only": True})


@pytest.mark.parametrize("argv", [["query", "--prompt", "x", "--device", "gpu"], ["undo", "--state", "s"],
                                  ["query", "--prompt", " "], ["no-such-command"], []])
def test_usage_errors_are_one_line_with_exit_status_2(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith("error: ") and len(err.splitlines()) == 1, err


def test_version_and_help_show_the_library_defaults(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0 and re.fullmatch(r"rlsedit \S+.*\n", capsys.readouterr().out)
    with pytest.raises(SystemExit):
        cli.main(["edit", "--help"])
    out = capsys.readouterr().out
    assert f"default {rlsedit_llm.EditConfig.method}" in out and "shown with --help" not in out


def test_bench_flags_for_variants_and_the_nas_reference_reach_the_bench_config():
    from rlsedit_llm import cli

    args = cli.build_parser().parse_args(["bench", "--out", "x", "--methods", "rlsedit+nas,alphaedit@released",
                                          "--nas-reference-facts", "50", "--stream", "2"])
    config = cli._bench_config(args)
    assert config.methods == ("rlsedit+nas", "alphaedit@released")
    assert config.nas_reference_facts == 50 and config.stream == 2
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["bench", "--out", "x", "--nas-reference-facts", "0"])
