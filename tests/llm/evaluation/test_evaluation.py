"""Evaluation metrics, the sequential protocol, fine-tuning baseline and the benchmark harness."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from rlsedit_llm import EditConfig, Editor, EditReport, Fact, cli
from rlsedit_llm.adapters.spec import get_module, read_weight
from rlsedit_llm.editing.finetune import FineTuneEditor, target_nll
from rlsedit_llm.errors import FactError, HyperparameterError
from rlsedit_llm.evaluation import bench, data, metrics, protocol
from rlsedit_llm.evaluation import report as bench_report
from rlsedit_llm.evaluation import results as results_mod
from rlsedit_llm.kernel.registry import method_names
from rlsedit_llm.pipeline.facts import encode_target
from rlsedit_llm.pipeline.scoring import score_targets
from rlsedit_llm.pipeline.tokens import encode_prompt, needs_bos
from tests.helpers import FAST_VALUE
from tests.helpers import fast_config as _fast_config

pytestmark = pytest.mark.usefixtures("one_thread_unless_slow")

ASSETS = Path(__file__).resolve().parents[3] / "docs" / "assets" / "bench"

FACTS = [
    Fact("{} is located in the city of", "The Eiffel Tower", "Rome", target_true="Paris", case_id=0,
         paraphrases=("The Eiffel Tower stands in", "Where is the Eiffel Tower? In"),
         neighbourhood=("The Louvre is located in the city of", "Big Ben is located in the city of"),
         generation_prompts=("The Eiffel Tower is",)),
    Fact("The mother tongue of {} is", "Danielle Darrieux", "English", target_true="French", case_id=1,
         paraphrases=("Danielle Darrieux speaks",),
         neighbourhood=("The mother tongue of Jean Gabin is",)),
    Fact("{} is headquartered in the country of", "Toyota", "Germany", target_true="Japan", case_id=2,
         paraphrases=("Toyota has its head office in",),
         neighbourhood=("Honda is headquartered in the country of", "Nissan is based in")),
    Fact("{} is the capital of", "Berlin", "Spain", target_true="Germany", case_id=3,
         paraphrases=("Berlin is a capital city in",), neighbourhood=("Madrid is the capital of",)),
    Fact("{} was founded in", "Apple", "Japan", target_true="California", case_id=4,
         paraphrases=("Apple started in",), neighbourhood=("Microsoft was founded in",)),
    Fact("The president of {} is", "the club", "a doctor", target_true="a writer", case_id=5,
         paraphrases=("Who leads the club? It is",), neighbourhood=("The president of the company is",)),
]


@pytest.fixture
def llama(tiny):
    return tiny("llama")




# ----------------------------------------------------------------------------------------------
# Pure functions


def test_ngram_entropy_known_value():
    # words a b a b a b: bigrams ab x3, ba x2; trigrams aba x2, bab x2.
    h2 = -(0.6 * math.log2(0.6) + 0.4 * math.log2(0.4))
    h3 = 1.0
    assert metrics.ngram_entropy("a b a b a b") == pytest.approx((2 / 3 * h2 + 4 / 3 * h3) / 2, abs=1e-12)
    # Repetitive text scores below varied text; punctuation counts as a word.
    varied = "The cat sat on the mat while a dog ran past the old red barn at noon."
    assert metrics.ngram_entropy("the the the the the the the") < metrics.ngram_entropy(varied)
    assert metrics.ngram_entropy("") == 0.0
    with pytest.raises(HyperparameterError):
        metrics.ngram_entropy("a b", ns=(2,), weights=(1.0, 2.0))


def test_harmonic_mean_and_summary():
    assert metrics.harmonic_mean([1.0, 0.5]) == pytest.approx(2 / 3)
    assert metrics.harmonic_mean([1.0, 0.0, 1.0]) == 0.0
    rows = [{"case_id": 0, "efficacy": 1.0, "generalization": 0.5, "specificity": float("nan")},
            {"case_id": 1, "efficacy": 0.0, "generalization": 1.0, "specificity": 0.5}]
    s = metrics.summarize_cases(rows)
    assert s["n"] == 2 and s["efficacy"] == 0.5 and s["generalization"] == 0.75
    assert s["specificity"] == 0.5  # the NaN (no neighbourhood prompts) is skipped
    assert s["score"] == pytest.approx(metrics.harmonic_mean([0.5, 0.75, 0.5]))


def test_protocol_config_checkpoints_and_validation():
    cfg = protocol.ProtocolConfig(n_edits=100, batch_size=10, checkpoints=5)
    assert cfg.n_batches == 10 and cfg.retention_batches == 1 and cfg.retention_size == 10
    assert cfg.checkpoint_batches() == [1, 2, 4, 6, 8, 10]
    cfg = protocol.ProtocolConfig(n_edits=1000, batch_size=10, checkpoints=4)
    assert cfg.retention_size == 100 and cfg.checkpoint_batches() == [10, 25, 50, 75, 100]
    odd = protocol.ProtocolConfig(n_edits=25, batch_size=10, checkpoints=2, retention_fraction=0.1)
    assert odd.n_batches == 3 and odd.retention_size == 10 and odd.checkpoint_batches()[-1] == 3
    for bad in (dict(n_edits=0), dict(batch_size=0), dict(retention_fraction=0.0), dict(dataset="mquake"),
                dict(glue_items=-1)):
        with pytest.raises(HyperparameterError):
            protocol.ProtocolConfig(**bad).validate()


def _cli_config(**flags):
    """The BenchConfig `rlsedit bench` builds from these flag values (strings as typed)."""
    return cli._bench_config(argparse.Namespace(**flags))


def test_bench_flags_parse_into_typed_fields():
    cfg = _cli_config(out="o", methods="rlsedit, memit_seq", layers="3,4", score_all_at="300,600",
                      shadow="memit_seq", interleave=True, ft_lr=0.25, ultraedit_ridge=0.5)
    assert cfg.methods == ("rlsedit", "memit_seq") and cfg.layers == (3, 4) and cfg.score_all_at == (300, 600)
    assert cfg.shadow == ("memit_seq",)
    assert cfg.method_settings == {"ft": {"lr": 0.25, "steps": 10}, "ultraedit": {"ridge": 0.5}}
    assert _cli_config(out="o", methods="all").methods == method_names()
    assert _cli_config(out="o").method_settings == bench.BenchConfig(out="o").method_settings
    for bad in ("rlsedit,rome", "", "ft,ft"):
        with pytest.raises(HyperparameterError):
            _cli_config(out="o", methods=bad)
    for flags, match in ((dict(layers="3,x"), "--layers"), (dict(score_all_at="three hundred"), "edit counts"),
                         (dict(ultraedit_lr=0.0), "--ultraedit-lr must be > 0")):
        with pytest.raises(HyperparameterError, match=match):
            _cli_config(out="o", **flags)


def test_bench_config_fields_are_typed_and_checked():
    for bad, match in ((dict(methods="rlsedit,ft"), "tuple of method names"), (dict(layers="3,4"), "tuple of ints"),
                       (dict(score_all_at="300"), "tuple of ints"), (dict(shadow="memit_seq"), "tuple of method"),
                       (dict(methods=("rlsedit", "rome")), "unknown method"),
                       (dict(method_settings={"rome": {}}), "unknown method"),
                       (dict(method_settings={"ft": {"lrr": 1.0}}), "lrr"),
                       (dict(method_settings={"ft": 1.0}), "method_settings"),
                       (dict(save_every=0), "save-every"), (dict(value_steps=2.5), "value-steps"),
                       (dict(time_budget=10.0), "needs --interleave"),
                       (dict(methods=("rlsedit", "memit_seq"), shadow=("memit_seq",)), "needs --interleave"),
                       (dict(methods=("memit_seq",), shadow=("memit_seq",), interleave=True), "needs 'rlsedit'"),
                       (dict(methods=("rlsedit", "ft"), shadow=("ft",), interleave=True), "layer-solver")):
        with pytest.raises(HyperparameterError, match=match):
            bench.BenchConfig(out="o", **bad)
    cfg = bench.BenchConfig(out="o", methods=["memit_seq", "rlsedit", "ft"], shadow=["memit_seq"], interleave=True)
    assert cfg.methods == ("memit_seq", "rlsedit", "ft") and cfg.run_order() == ("rlsedit", "ft", "memit_seq")
    assert dataclasses.replace(cfg, alpha=0.5).method_settings == cfg.method_settings
    with pytest.raises(TypeError):  # the settings cannot be changed in place
        cfg.method_settings["ft"]["lr"] = 1.0


# ----------------------------------------------------------------------------------------------
# Shipped data


def test_load_stream_counterfact_and_zsre():
    cf = data.load_stream("counterfact", 12)
    raw = json.loads((data.data_dir() / "counterfact.json").read_text())
    assert [f.case_id for f in cf] == [r["case_id"] for r in raw[:12]]
    assert cf[0].target_true and len(cf[0].paraphrases) == 2 and len(cf[0].neighbourhood) == 10
    assert cf[0].generation_prompts
    zs = data.load_stream("zsre", 5)
    zraw = json.loads((data.data_dir() / "zsre_eval.json").read_text())
    assert [f.case_id for f in zs] == list(range(5))
    assert zs[0].target == zraw[0]["alt"] and zs[0].neighbourhood_target == zraw[0]["loc_ans"]
    assert zs[0].text() == zraw[0]["src"]
    with pytest.raises(HyperparameterError):
        data.load_stream("zsre", len(zraw) + 1)
    with pytest.raises(HyperparameterError):
        data.load_stream("mquake", 3)


def test_load_stream_counterfact_simple_long_stream():
    """The simplified CounterFact ships whole (21,567 records) for long streams; each record is a
    fact with one rephrase and one locality prompt scored against its own ground truth."""
    raw = json.loads((data.data_dir() / "counterfact_simple.json").read_text())
    assert len(raw) == 21567
    facts = data.load_stream("counterfact_simple", 3000)
    assert len(facts) == 3000 and len({f.case_id for f in facts}) == 3000
    f, r = facts[0], raw[0]
    assert f.text() == r["prompt"] and f.target == r["target_new"] and f.target_true == r["ground_truth"]
    assert f.paraphrases == (r["rephrase_prompt"],) and f.neighbourhood == (r["locality_prompt"],)
    assert f.neighbourhood_target == r["locality_ground_truth"]


def test_counterfact_simple_specificity_uses_the_locality_ground_truth(llama):
    """Specificity compares the locality prompt's own ground truth with the new target."""
    model, tok = llama
    f = Fact("{} is located in", "Toyota", "Paris", target_true="Japan", neighbourhood=("Honda is located in",),
             neighbourhood_target="London")
    (row,) = metrics.counterfact_case_scores(model, tok, [f])
    new, loc = score_targets(model, tok, ["Honda is located in"] * 2, ["Paris", "London"])
    assert row["specificity"] == float(loc.mean_nll < new.mean_nll)
    assert row["specificity_magnitude"] == pytest.approx(math.exp(-loc.mean_nll) - math.exp(-new.mean_nll), abs=1e-6)


def test_shipped_glue_subsets():
    for task, words in metrics.GLUE_TASKS.items():
        items = data.load_glue(task, 200)
        assert len(items) == 200 and {int(it["label"]) for it in items} <= set(range(len(words)))
        assert metrics.glue_prompt(task, items[0]).endswith("Answer:")
    with pytest.raises(HyperparameterError):
        data.load_glue("mnli", 10)


# ----------------------------------------------------------------------------------------------
# Metrics on a tiny model: bookkeeping against direct scoring


def test_score_pairs_equals_score_targets(llama):
    model, tok = llama
    prompts = ["The Eiffel Tower is located in the city of", "Toyota is based in",
               "The Eiffel Tower is located in the city of",
               "Big Ben is in"] * 2
    targets = ["Paris", "Japan", "Rome", "London", "a", "the", "x", "Paris and Rome"]
    got = metrics.score_pairs(model, tok, prompts, targets, batch_size=3)
    want = score_targets(model, tok, prompts, targets)
    lengths = {len(s.token_logprobs) for s in want}
    assert 1 in lengths and max(lengths) > 1  # both paths are exercised
    for g, w in zip(got, want, strict=False):
        assert torch.allclose(g.token_logprobs, w.token_logprobs, atol=1e-5)
        assert torch.equal(g.token_correct, w.token_correct)
    with pytest.raises(HyperparameterError):
        metrics.score_pairs(model, tok, prompts, targets[:-1])


def test_score_pairs_runs_each_prompt_once_per_multi_token_target(llama):
    """CounterFact's two targets of one prompt cost one sequence when at most one is multi-token;
    two distinct multi-token targets of one prompt need two; duplicates are shared."""
    model, tok = llama
    single, multi_a, multi_b = "a", "Paris and Rome", "the city of London"
    assert len(encode_target(tok, single)) == 1 and len(encode_target(tok, multi_a)) > 1
    prompts = ["Toyota is based in"] * 4 + ["Big Ben is in"] * 2 + ["The Eiffel Tower is in"]
    targets = [single, multi_a, multi_a, multi_b, single, "x", single]
    rows = []
    handle = model.get_input_embeddings().register_forward_hook(lambda m, a, o: rows.append(a[0].shape[0]))
    try:
        got = metrics.score_pairs(model, tok, prompts, targets, batch_size=64)
    finally:
        handle.remove()
    assert sum(rows) == 2 + 1 + 1  # Toyota: one per distinct multi-token target; the others once
    want = score_targets(model, tok, prompts, targets)
    for g, w in zip(got, want, strict=False):
        assert torch.allclose(g.token_logprobs, w.token_logprobs, atol=1e-5)
        assert torch.equal(g.token_correct, w.token_correct)


def test_counterfact_case_scores_match_direct_scoring(llama):
    model, tok = llama
    rows = metrics.counterfact_case_scores(model, tok, FACTS[:3], batch_size=4)
    for f, row in zip(FACTS[:3], rows, strict=False):
        def nlls(prompts, target):
            return [s.mean_nll for s in score_targets(model, tok, list(prompts), [target] * len(prompts))]

        new_rw, true_rw = nlls([f.text()], f.target)[0], nlls([f.text()], f.target_true)[0]
        assert row["efficacy"] == float(new_rw < true_rw)
        assert row["efficacy_magnitude"] == pytest.approx(math.exp(-new_rw) - math.exp(-true_rw), abs=1e-6)
        pn, pt = nlls(f.paraphrases, f.target), nlls(f.paraphrases, f.target_true)
        assert row["generalization"] == pytest.approx(sum(a < b for a, b in zip(pn, pt, strict=False)) / len(pn))
        nn, nt = nlls(f.neighbourhood, f.target), nlls(f.neighbourhood, f.target_true)
        assert row["specificity"] == pytest.approx(sum(b < a for a, b in zip(nn, nt, strict=False)) / len(nn))
        assert row["specificity_magnitude"] == pytest.approx(
            sum(math.exp(-b) - math.exp(-a) for a, b in zip(nn, nt, strict=False)) / len(nn), abs=1e-6)
        acc = score_targets(model, tok, [f.text()], [f.target])[0].all_correct
        assert row["efficacy_acc"] == float(acc)
    with pytest.raises(HyperparameterError):
        metrics.counterfact_case_scores(model, tok, [dataclasses.replace(FACTS[0], target_true=None)])


def test_zsre_case_scores_use_token_accuracy_and_question_mark(llama):
    model, tok = llama
    f = Fact("What is the capital of {}", "France", "Rome", case_id=7,
             paraphrases=("Which city is the capital of France",),
             neighbourhood=("nq question: who wrote the book",), neighbourhood_target="a writer")
    (row,) = metrics.zsre_case_scores(model, tok, [f])
    assert row["efficacy"] == pytest.approx(score_targets(model, tok, [f.text()], ["Rome"])[0].accuracy)
    loc = score_targets(model, tok, ["nq question: who wrote the book?"], ["a writer"])[0].accuracy
    assert row["specificity"] == pytest.approx(loc)
    assert metrics.zsre_locality_prompt("q?") == "q?"
    (via_protocol,) = data.case_scores("zsre", model, tok, [f])
    assert via_protocol == row and set(row) == {"case_id", *metrics.ZSRE_METRICS}
    with pytest.raises(HyperparameterError):
        metrics.zsre_case_scores(model, tok, [dataclasses.replace(f, neighbourhood_target=None)])


def test_greedy_generate_batched_equals_one_by_one(llama):
    model, tok = llama
    prompts = ["The Eiffel Tower is located in", "Toyota", "The mother tongue of Danielle Darrieux is French and"]
    batched = metrics.greedy_generate(model, tok, prompts, 6, batch_size=3, stop_at_eos=False)
    single = [metrics.greedy_generate(model, tok, [p], 6, batch_size=1, stop_at_eos=False)[0] for p in prompts]
    assert batched == single and all(len(g) == 6 for g in batched)
    with pytest.raises(HyperparameterError):
        metrics.greedy_generate(model, tok, prompts, 0)


def test_generation_check_detects_the_greedy_continuation(llama):
    model, tok = llama
    f = FACTS[0]
    cont = tok.decode(metrics.greedy_generate(model, tok, [f.text()], 2, stop_at_eos=False)[0]).strip()
    hit = dataclasses.replace(f, target=cont)
    miss = dataclasses.replace(f, target=cont + "zzq")
    assert metrics.generation_check(model, tok, [hit, miss]) == [1.0, 0.0]


def test_glue_fast_path_equals_full_scoring(llama):
    model, tok = llama
    for task in ("sst2", "rte"):
        items = data.load_glue(task, 6)
        fast = metrics.glue_predictions(model, tok, task, items)
        words = metrics.GLUE_TASKS[task]
        prompts = [metrics.glue_prompt(task, it) for it in items]
        slow = []
        for p in prompts:
            lps = [s.logprob for s in score_targets(model, tok, [p] * len(words), list(words))]
            slow.append(max(range(len(words)), key=lps.__getitem__))
        assert fast == slow
        res = metrics.glue_accuracy(model, tok, task, items)
        assert res["accuracy"] == pytest.approx(sum(p == it["label"] for p, it in zip(fast, items, strict=False)) / 6)


def test_fluency_is_entropy_of_prompt_plus_generation(llama):
    model, tok = llama
    prompts = ["The Eiffel Tower is", "Toyota makes"]
    gens = metrics.greedy_generate(model, tok, prompts, 12)
    expected = sum(metrics.ngram_entropy(p + tok.decode(g)) for p, g in zip(prompts, gens, strict=False)) / 2
    assert metrics.fluency(model, tok, prompts, max_new_tokens=12) == pytest.approx(expected)


def test_continuation_nll_is_the_teacher_forced_nll_of_the_text_after_the_prompt(llama):
    model, tok = llama
    prompts = ["The Eiffel Tower is", "Toyota makes", "Paris is"]
    texts = metrics.generate_texts(model, tok, prompts[:2], 8) + [" in France, and"]
    got = metrics.continuation_nll(model, tok, prompts, texts, batch_size=2)  # two batches, padded
    for p, t, nll in zip(prompts, texts, got, strict=False):
        p_ids = encode_prompt(tok, p, bos=needs_bos(model))
        c_ids = tok.encode(t, add_special_tokens=False)
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([p_ids + c_ids])).logits[0].double(), -1)
        want = -logp[torch.arange(len(p_ids) - 1, len(p_ids) + len(c_ids) - 1), torch.tensor(c_ids)].mean()
        assert nll == pytest.approx(float(want), rel=1e-4)
    assert math.isnan(metrics.continuation_nll(model, tok, ["Paris is"], [""])[0])
    with pytest.raises(HyperparameterError, match="continuations"):
        metrics.continuation_nll(model, tok, prompts, texts[:2])


def test_report_prints_the_first_generations_on_one_line_each():
    gens = [{"prompt": "Q1?", "text": "\nA | b\n\nc"}, {"prompt": "Q2?", "text": "\n"}, {"prompt": "Q3?", "text": "x"}]
    settings = results_mod.Results.from_json(json.loads((ASSETS / "cf300" / "results.json").read_text())).settings
    res = results_mod.Results(settings, base=results_mod.BaseScores.from_json({"generations": gens}),
                              methods={"m": results_mod.MethodRecord(final=results_mod.FinalScores())})
    lines = bench_report._generation_samples(res)
    assert lines[-2:] == ["- **unedited**: Q1? → A / b c", "- **unedited**: Q2? → (nothing: it stops at once)"]
    assert bench_report._generation_samples(results_mod.Results(settings, base=results_mod.BaseScores())) == []


def test_score_generations_scores_kept_generations_once(llama):
    model, tok = llama
    prompts = ["The Eiffel Tower is", "Toyota makes"]
    gens = [results_mod.Generation(p, t) for p, t in zip(prompts, [" a tower", ""], strict=True)]
    part = results_mod.FinalScores(generations=gens)
    assert protocol.score_generations(part, model, tok)
    # The empty generation (an immediate EOS) has no tokens to score and is left out of the mean.
    assert part.generation_nll_n == 1
    assert part.generation_nll == pytest.approx(metrics.continuation_nll(model, tok, prompts[:1], [" a tower"])[0])
    part.generation_nll = 123.0
    assert not protocol.score_generations(part, model, tok) and part.generation_nll == 123.0  # never rescored
    assert not protocol.score_generations(results_mod.FinalScores(fluency=5.0), model, tok)


# ----------------------------------------------------------------------------------------------
# Fine-tuning baseline


def test_finetune_lowers_target_nll_and_touches_only_its_layers(llama):
    model, tok = llama
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ft = FineTuneEditor(model, tok, lr=1e-2, steps=8)
    batch = FACTS[:3]
    report = ft.edit(batch)
    assert isinstance(report, EditReport) and len(report.facts) == len(batch)
    assert report.extras["loss_after"] < report.extras["loss_before"]
    assert report.improved > 0  # the target probabilities rose
    edited = {ft.spec_.edit_module_path.format(l) + ".weight" for l in ft.layers_}
    for n, p in model.named_parameters():
        changed = not torch.equal(p, before[n])
        assert changed == (n in edited), n
        assert p.grad is None
    # The differentiable loss agrees with the teacher-forced scorer.
    direct = [s.mean_nll for s in score_targets(model, tok, [f.text() for f in batch], [f.target for f in batch])]
    with torch.no_grad():
        assert float(target_nll(model, tok, [f.text() for f in batch], [f.target for f in batch])) == \
            pytest.approx(sum(direct) / 3, rel=1e-5)


def test_finetune_rejects_bad_facts_untouched_and_round_trips(llama, tmp_path):
    model, tok = llama
    ft = FineTuneEditor(model, tok, lr=1e-2, steps=2)
    snap = {l: W.clone() for l, W in ft.weights().items()}
    with pytest.raises(FactError):
        ft.edit([{"prompt": "no slot here", "subject": "x", "target": "y"}])
    assert all(torch.equal(ft.weights()[l], snap[l]) for l in snap)
    with pytest.raises(HyperparameterError):
        FineTuneEditor(model, tok, lr=-1.0)
    ft.edit(FACTS[:2])
    ft.save(tmp_path / "ft")
    edited = ft.weights()
    for l, W in snap.items():  # back to the base weights, then load the saved stream
        from rlsedit_llm.adapters.spec import write_weight

        write_weight(ft._module(l), W)
    loaded = FineTuneEditor.load(model, tok, tmp_path / "ft")
    assert loaded.n_batches_ == 1 and loaded.n_edits_ == 2
    assert all(torch.equal(loaded.weights()[l], edited[l]) for l in edited)


# ----------------------------------------------------------------------------------------------
# Methods through the Editor: MEMIT-seq = RLSEdit(alpha = 0), and the theory's bounds


def test_memit_seq_equals_rlsedit_alpha0_on_the_llm_layer(tiny, tmp_path):
    """Same facts, same base model, a 3-batch stream: MEMIT-seq's dense re-solve and RLSEdit's
    recursion (alpha = 0) give the same float64 weights; per-batch MEMIT does not."""
    states = {}
    for method in ("rlsedit", "memit_seq", "memit"):
        model, tok = tiny("llama")  # the same seed: the same base model
        editor = Editor(model, tok, _fast_config(tmp_path, method=method, alpha=0.0))
        for b in range(3):
            editor.edit(FACTS[2 * b: 2 * b + 2])
        states[method] = {l: s.W_.clone() for l, s in editor.solvers_.items()}
    for l, W in states["rlsedit"].items():
        W0 = editor.solvers_[l].W0_
        assert torch.linalg.norm(W - W0) > 0
        rel = torch.linalg.norm(W - states["memit_seq"][l]) / torch.linalg.norm(W)
        assert rel < 1e-6, (l, float(rel))
        assert torch.linalg.norm(W - states["memit"][l]) / torch.linalg.norm(W - W0) > 1e-3


def test_runner_deviations_come_from_the_editor_and_respect_t3_bounds(tiny, tmp_path):
    """A layer-solver method's deviation is its editor's (with T3's bounds, which hold); an
    editor-level method's is measured on its weights with the anchor Gram the editors use."""
    from rlsedit_llm.kernel.certificates import weight_deviation

    model, tok = tiny("llama")
    cfg = _fast_config(tmp_path, alpha=0.5)
    runner = protocol.make_runner("rlsedit", model, tok, edit_config=cfg)
    W0 = protocol.snapshot_weights(model, runner.editor.spec_, runner.layers)
    for b in range(3):
        runner.edit(FACTS[2 * b: 2 * b + 2])
    rep = runner.deviations(W0)
    own = runner.editor.deviations()
    assert set(rep) == set(runner.layers) == set(own)
    for layer, row in rep.items():
        assert row.fro == pytest.approx(own[layer].fro) and row.cond == pytest.approx(own[layer].condition)
        assert 0 < row.fro <= row.t3a * (1 + 1e-6)
        assert 0 < row.anchor <= row.t3b * (1 + 1e-6)
    # No bound is claimed for a method that does not minimise the cumulative objective.
    memit = protocol.make_runner("memit", *tiny("llama"), edit_config=cfg)
    memit.edit(FACTS[:2])
    row = next(iter(memit.deviations(W0).values()))
    assert row.t3a is None and row.t3b is None and row.fro > 0
    assert set(results_mod.LayerDeviation.from_json(row.to_json()).to_json()) == {"fro", "anchor"}
    # FT keeps no statistics: its drift is measured with the anchor Gram of the rlsedit editor.
    ft_model, ft_tok = tiny("llama")
    ft = protocol.make_runner("ft", ft_model, ft_tok, edit_config=cfg, method_settings={"ft": {"lr": 1e-2, "steps": 2}})
    ft.edit(FACTS[:2])
    grams = runner.anchor_grams()
    got = ft.deviations(W0, grams)
    for layer, W in ft.weights().items():
        want = weight_deviation(W0[layer], W, grams[layer])
        assert got[layer].fro == pytest.approx(want.fro) and got[layer].anchor == pytest.approx(want.anchor)
        assert want.anchor > 0
        assert got[layer].t3a is None
    assert all(r.anchor is None for r in ft.deviations(W0).values())  # no Gram given: no anchor drift


# ----------------------------------------------------------------------------------------------
# The protocol and the benchmark harness (tiny model, end to end)


def _tiny_stream(n):
    return [dataclasses.replace(FACTS[i % len(FACTS)], case_id=i,
                                subject=FACTS[i % len(FACTS)].subject + (" II" * (i // len(FACTS))))
            for i in range(n)]


def test_a_stream_stopped_at_a_full_checkpoint_reuses_its_scores(tiny, tmp_path, monkeypatch):
    """Stopped (time budget) right after a full checkpoint, the partial final takes that
    checkpoint's scores of every edit instead of scoring all of them a second time."""
    model, tok = tiny("llama")
    facts = _tiny_stream(6)
    cfg = protocol.ProtocolConfig(n_edits=6, batch_size=2, checkpoints=1, fluency_cases=0, wild=False,
                                  retention_fraction=0.3, full_checkpoints=(4,))
    runner = protocol.make_runner("rlsedit", model, tok, edit_config=_fast_config(tmp_path))
    W0 = protocol.snapshot_weights(model, runner.editor.spec_, runner.layers)
    real, scored = protocol.case_scores, []
    monkeypatch.setattr(protocol, "case_scores", lambda ds, m, t, written, **kw: (scored.append(len(written)),
                                                                                   real(ds, m, t, written, **kw))[1])
    rec = protocol.run_method(runner, model, tok, facts, cfg, protocol.new_record(), W0=W0, progress=False,
                              until=2, finish=True)
    point = rec.checkpoints[-1]
    assert point.batch == 2 and point.all.n == 4
    assert rec.final.partial and rec.final.all == point.all and rec.final.retention.n == 2
    assert scored == [2, 2, 2, 2, 4]  # two batches, the retention set at batches 1 and 2, all 4 once
    rec = protocol.run_method(runner, model, tok, facts, cfg, rec, W0=W0, progress=False, until=3, finish=True)
    assert rec.done and scored[-1] == 6  # the end of the stream is scored in full


def test_run_method_records_immediate_retention_and_final(tiny, tmp_path):
    model, tok = tiny("llama")
    facts = _tiny_stream(6)
    cfg = protocol.ProtocolConfig(n_edits=6, batch_size=2, checkpoints=2, fluency_cases=2, fluency_tokens=8,
                                  glue_items=4, retention_fraction=0.3)
    runner = protocol.make_runner("rlsedit", model, tok, edit_config=_fast_config(tmp_path))
    W0 = protocol.snapshot_weights(model, runner.editor.spec_, runner.layers)
    glue = {t: data.load_glue(t, 4) for t in ("sst2", "cola")}
    base = protocol.base_report(model, tok, facts, cfg, glue, n_cases=6)
    assert len(base.cases) == 6 and base.retention.n == cfg.retention_size
    calls = []
    # Stop after one batch and score what was written (a stream cut short by a time budget) ...
    rec = protocol.run_method(runner, model, tok, facts, cfg, protocol.new_record(), W0=W0, glue=glue, base=base,
                              on_batch=lambda r: calls.append(r.batches_done), progress=False, until=1,
                              finish=True)
    assert not rec.done and rec.final.partial and rec.final.edits == 2
    assert rec.final.all.n == 2 and rec.checkpoints[-1].batch == 1
    # ... then continue the same stream to its end.
    rec = protocol.run_method(runner, model, tok, facts, cfg, rec, W0=W0, glue=glue, base=base,
                              on_batch=lambda r: calls.append(r.batches_done), progress=False)
    assert calls == [1, 1, 2, 3, 3]  # after each batch, and after each final scoring
    assert not rec.final.partial
    assert rec.done and rec.edits_done == 6 and [e.edits for e in rec.immediate] == [2, 4, 6]
    assert [p.batch for p in rec.checkpoints] == cfg.checkpoint_batches() == [1, 2, 3]
    assert rec.checkpoints[0].retention.n == cfg.retention_size == 2
    assert rec.final.all.n == 6 and 0 <= rec.final.all.score <= 1
    assert set(rec.final.glue.tasks) == {"sst2", "cola"} and set(rec.final.glue.to_json()) == {"sst2", "cola", "mean"}
    assert 0 <= rec.final.glue.tasks["sst2"].agreement <= 1
    assert rec.final.fluency_n == 1  # of the first two cases only one has a generation prompt
    [gen] = rec.final.generations  # kept, for reading and for the unedited model's NLL
    assert gen.prompt == facts[0].generation_prompts[0]
    assert rec.final.fluency == pytest.approx(metrics.ngram_entropy(gen.prompt + gen.text))
    imm = protocol.immediate_summary(rec)
    assert imm.n == 6
    assert imm.efficacy == pytest.approx(sum(e.scores.efficacy * e.scores.n for e in rec.immediate) / 6, abs=1e-5)
    # Editing raised the efficacy of the stream's facts over the unedited model.
    assert rec.final.all.efficacy_magnitude > base.all.efficacy_magnitude
    # The record's JSON form reads back to the same record.
    assert results_mod.MethodRecord.from_json(rec.to_json()) == rec
    with pytest.raises(HyperparameterError):
        protocol.run_method(runner, model, tok, facts[:4], cfg, protocol.new_record(), W0=W0, progress=False)


def _bench_args(out, **kw):
    """The BenchConfig of `rlsedit bench` with these flags (comma lists as strings)."""
    a = dict(dataset="counterfact", model="tiny", edits=6, batch=2, methods="rlsedit,ft", out=str(out),
             stats_tokens=3000, checkpoints=2, glue=0, fluency_cases=2, fluency_tokens=6, quiet=True,
             cache_dir=str(out.parent / "stats"), ft_steps=2, ft_lr=1e-3)
    a.update(kw)
    return _cli_config(**a)


def _replace(args, **changes):
    """``dataclasses.replace`` with comma lists given as the command line takes them."""
    for name, item in (("methods", str), ("shadow", str), ("score_all_at", int)):
        if isinstance(changes.get(name), str):
            changes[name] = tuple(item(x) for x in changes[name].split(",") if x)
    return dataclasses.replace(args, **changes)


def _interrupted(monkeypatch, runner_cls, args, at: int = 2) -> None:
    """Run the bench with ``args`` until the ``at``-th call of ``runner_cls.edit`` raises
    KeyboardInterrupt (as a user's Ctrl-C would), then put the real ``edit`` back."""
    real_edit = runner_cls.edit
    calls = {"n": 0}

    def flaky(self, facts):
        calls["n"] += 1
        if calls["n"] == at:
            raise KeyboardInterrupt
        return real_edit(self, facts)

    monkeypatch.setattr(runner_cls, "edit", flaky)
    with pytest.raises(KeyboardInterrupt):
        bench.run_bench(args)
    monkeypatch.setattr(runner_cls, "edit", real_edit)


@pytest.fixture
def tiny_bench(tiny, monkeypatch):
    """Run the benchmark on a tiny model and a stream of the hand-made facts."""
    model, tok = tiny("llama")
    pristine = {k: v.clone() for k, v in model.state_dict().items()}

    def load_model(name, **kw):  # each run loads the model afresh, as a new process would
        model.load_state_dict(pristine)
        model.config.__dict__.pop("rlsedit", None)  # an edit stream's mark is not in the files
        return model, tok

    monkeypatch.setattr(bench, "load_model", load_model)
    monkeypatch.setattr(bench, "load_stream", lambda dataset, n, tok=None, **kw: _tiny_stream(n))
    real = protocol.make_runner

    def fast_runner(name, model, tokenizer, *, edit_config=None, **kw):
        cfg = dataclasses.replace(edit_config, n_templates=2, template_length=4, value=FAST_VALUE)
        return real(name, model, tokenizer, edit_config=cfg, **kw)

    monkeypatch.setattr(bench, "make_runner", fast_runner)
    return model, tok


def test_bench_writes_outputs_and_resumes_after_interruption(tiny_bench, tmp_path, monkeypatch):
    model, _ = tiny_bench
    base_weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    ref_out = tmp_path / "ref" / "out"
    ref_out.parent.mkdir()
    assert bench.run_bench(_bench_args(ref_out)) == 0
    ref = bench.read_results(ref_out)
    for name in ("results.json", "summary.csv", "curves.csv", "deviation.csv", "results.md", "scores.png",
                 "retention.png", "deviation.png", "norms.png"):
        assert (ref_out / name).stat().st_size > 0, name
    assert ref["methods"]["rlsedit"]["done"] and ref["methods"]["ft"]["done"]
    # Value-norm instruments per batch (methods with values) and conditioning per checkpoint.
    imm = ref["methods"]["rlsedit"]["immediate"]
    assert all(e["value_norm"] > 0 and e["value_norm_ratio"] > 0 for e in imm)
    assert all(any(k.startswith("layer_value_ratio.") for k in e) for e in imm)
    assert all(r["cond"] >= 1 for p in ref["methods"]["rlsedit"]["checkpoints"] for r in p["deviation"].values())
    assert "value_norm" not in ref["methods"]["ft"]["immediate"][0]
    assert not (ref_out / "state").exists() or not any((ref_out / "state").iterdir())
    md = (ref_out / "results.md").read_text()
    assert "| rlsedit | 6 |" in md and "| ft | 6 |" in md and "| unedited (6 cases) | 0 |" in md
    assert len(ref["base"]["cases"]) == 6  # extended from the retention set to the whole stream
    # The model is left as it was (every method starts from, and ends on, the base weights).
    assert all(torch.equal(p, base_weights[n]) for n, p in model.named_parameters())
    # Every model's fluency generations are kept and scored by the unedited model (the one left).
    tok = tiny_bench[1]
    for part in (ref["base"], ref["methods"]["rlsedit"]["final"], ref["methods"]["ft"]["final"]):
        gens = part["generations"]
        assert len(gens) == part["fluency_n"] == 1
        nll = metrics.continuation_nll(model, tok, [g["prompt"] for g in gens], [g["text"] for g in gens])
        assert part["generation_nll"] == pytest.approx(nll[0], rel=1e-4)
    assert "gen. NLL" in md and f"| {ref['base']['generation_nll']:.2f} |" in md
    assert "fluency generations" in md and f"- **ft**: {ref['base']['generations'][0]['prompt']} →" in md

    # Interrupt the second batch of rlsedit, then rerun the same command.
    out = tmp_path / "run" / "out"
    out.parent.mkdir()
    calls = {"n": 0}
    real_edit = protocol.MethodRunner.edit

    def flaky(self, facts):
        calls["n"] += 1
        if self.name == "rlsedit" and calls["n"] == 2:
            raise KeyboardInterrupt
        return real_edit(self, facts)

    monkeypatch.setattr(protocol.MethodRunner, "edit", flaky)
    with pytest.raises(KeyboardInterrupt):
        bench.run_bench(_bench_args(out))
    partial = bench.read_results(out)
    assert partial["methods"]["rlsedit"]["batches_done"] == 1 and not partial["methods"]["rlsedit"]["done"]
    assert (out / "state" / "rlsedit").exists()
    monkeypatch.setattr(protocol.MethodRunner, "edit", real_edit)
    for n, p in model.named_parameters():  # a fresh process would start from the base model
        with torch.no_grad():
            p.copy_(base_weights[n])
    assert bench.run_bench(_bench_args(out)) == 0
    done = bench.read_results(out)
    assert len(done["sessions"]) == 2
    for method in ("rlsedit", "ft"):
        got, want = done["methods"][method], ref["methods"][method]
        assert [e["edits"] for e in got["immediate"]] == [2, 4, 6]
        for g, w in zip(got["immediate"], want["immediate"], strict=False):
            for k in ("efficacy", "generalization", "specificity", "efficacy_magnitude"):
                assert g[k] == pytest.approx(w[k], abs=1e-4), (method, k)
        for k in ("efficacy", "specificity", "score"):
            assert got["final"]["all"][k] == pytest.approx(want["final"]["all"][k], abs=1e-4)

    # Round robin (--interleave) gives the same streams as one method after the other.
    inter = tmp_path / "inter" / "out"
    inter.parent.mkdir()
    assert bench.run_bench(_bench_args(inter, interleave=True)) == 0
    got = bench.read_results(inter)
    for method in ("rlsedit", "ft"):
        for g, w in zip(got["methods"][method]["immediate"], ref["methods"][method]["immediate"], strict=False):
            assert g["efficacy_magnitude"] == pytest.approx(w["efficacy_magnitude"], rel=1e-4, abs=1e-9)
        assert got["methods"][method]["final"]["all"]["score"] == pytest.approx(
            ref["methods"][method]["final"]["all"]["score"], abs=1e-4)
    assert all(torch.equal(p, base_weights[n]) for n, p in model.named_parameters())

    # Other settings in the same folder are refused; --report-only rebuilds from the JSON.
    with pytest.raises(HyperparameterError):
        bench.run_bench(_bench_args(out, edits=4))
    (out / "results.md").unlink()
    assert bench.run_bench(_bench_args(out, report_only=True)) == 0
    assert (out / "results.md").exists()


# ----------------------------------------------------------------------------------------------
# Real model (CI): a short stream, two methods


@pytest.mark.slow
def test_bench_smollm2_short_stream(smollm2, tmp_path, monkeypatch):
    model, tok = smollm2
    monkeypatch.setattr(bench, "load_model", lambda name, **kw: (model, tok))
    out = tmp_path / "bench"
    args = bench.BenchConfig(dataset="counterfact", model="smollm2", edits=20, batch=10,
                             methods=("rlsedit", "memit_seq"),
                             out=str(out), stats_tokens=6000, checkpoints=1, glue=8, fluency_cases=2,
                             fluency_tokens=10, quiet=True, cache_dir=str(tmp_path / "stats"))
    assert bench.run_bench(args) == 0
    res = bench.read_results(out)
    base = res["base"]["all"]
    for method in ("rlsedit", "memit_seq"):
        final = res["methods"][method]["final"]["all"]
        assert res["methods"][method]["done"] and final["n"] == 20
        assert final["efficacy"] >= 0.8 > base["efficacy"]
        assert final["specificity"] >= 0.5
    # MEMIT-seq and RLSEdit(alpha = 0) are the same update: the same weight deviations.
    pairs = zip(res["methods"]["rlsedit"]["checkpoints"], res["methods"]["memit_seq"]["checkpoints"], strict=True)
    for p_r, p_m in pairs:
        for layer, d in p_r["deviation"].items():
            assert d["fro"] == pytest.approx(p_m["deviation"][layer]["fro"], rel=1e-4)
            assert d["fro"] <= d["t3a"] and d["anchor"] <= d["t3b"] * (1 + 1e-6)  # T3(a) via lambda_min(A)
    for name in ("summary.csv", "results.md", "scores.png", "retention.png", "deviation.png"):
        assert (out / name).exists()


@pytest.mark.slow
def test_bench_smollm2_batch100_stream(smollm2, tmp_path, monkeypatch):
    """The long-stream protocol at its real batch size: 200 simplified-CounterFact edits in two
    batches of 100 on SmolLM2, RLSEdit computing its values and MEMIT as its shadow. The first
    batch stays written after the second, the value-norm instruments are recorded, and the
    deviation respects T3's bound."""
    model, tok = smollm2
    monkeypatch.setattr(bench, "load_model", lambda name, **kw: (model, tok))
    out = tmp_path / "bench"
    args = bench.BenchConfig(dataset="counterfact_simple", model="smollm2", edits=200, batch=100,
                             methods=("rlsedit", "memit"), shadow=("memit",), interleave=True, out=str(out),
                             stats_tokens=6000, checkpoints=2, glue=0, fluency_cases=0, no_wild=True,
                             retention_fraction=0.5,  # the retention set is the first batch
                             quiet=True, cache_dir=str(tmp_path / "stats"))
    assert bench.run_bench(args) == 0
    res = bench.read_results(out)
    rls = res["methods"]["rlsedit"]
    assert rls["done"] and [e["edits"] for e in rls["immediate"]] == [100, 200]
    final, first = rls["final"]["all"], rls["final"]["retention"]
    assert final["n"] == 200 and final["efficacy"] >= 0.85 > res["base"]["all"]["efficacy"]
    assert first["n"] == 100 and first["efficacy"] >= 0.85  # the first batch survives the second
    for entry in rls["immediate"]:
        assert 0.5 < entry["value_norm_ratio"] < 3.0  # written values near the model's own norms
    for point in rls["checkpoints"]:
        for d in point["deviation"].values():
            assert d["fro"] <= d["t3a"] * (1 + 1e-6) and d["anchor"] <= d["t3b"] * (1 + 1e-6)
    memit = res["methods"]["memit"]
    assert memit["done"] and memit["final"]["all"]["n"] == 200
    assert all(p["leader_gap"] is not None for p in memit["checkpoints"])


# ----------------------------------------------------------------------------------------------
# Shadows: one stream of keys and values, two solvers


def test_absorb_replays_a_journal_into_another_solver(tiny, tmp_path):
    """A MEMIT-seq editor fed RLSEdit's journal entries ends on RLSEdit's weights; bad input is
    refused with a typed error and leaves the model and the state untouched."""
    from rlsedit_llm.errors import NonFiniteError, ShapeError

    model, tok = tiny("llama")
    leader = Editor(model, tok, _fast_config(tmp_path, method="rlsedit"))
    for b in range(3):
        leader.edit(FACTS[2 * b: 2 * b + 2])
    model2, tok2 = tiny("llama")  # the same base model
    follower = Editor(model2, tok2, _fast_config(tmp_path, method="memit_seq"))
    for rec in leader.journal_:
        report = follower.absorb(rec.facts, rec.keys, rec.values)
        assert report.seconds["update"] >= 0 and report.edit_id == rec.edit_id
    for l, s in leader.solvers_.items():
        W, Wf = s.W_, follower.solvers_[l].W_
        assert torch.linalg.norm(W - s.W0_) > 0
        assert torch.linalg.norm(W - Wf) / torch.linalg.norm(W - s.W0_) < 1e-6
        module = get_module(model2, follower.spec_.edit_module_path.format(l))
        assert torch.allclose(read_weight(module).double(), Wf, atol=1e-6)  # written into the model
    assert all(torch.equal(a.values[l], b.values[l]) for a, b in zip(leader.journal_, follower.journal_, strict=False)
               for l in leader.layers_)

    rec = leader.journal_[0]
    before = {l: s.W_.clone() for l, s in follower.solvers_.items()}
    params = {n: p.detach().clone() for n, p in model2.named_parameters()}
    n_journal = len(follower.journal_)
    layer = leader.layers_[0]
    bad_inputs = [
        (HyperparameterError, {l: K for l, K in rec.keys.items() if l != layer}, rec.values),
        (ShapeError, {**rec.keys, layer: rec.keys[layer][:, :-1]}, rec.values),
        (NonFiniteError, rec.keys, {**rec.values, layer: rec.values[layer] * float("nan")}),
    ]
    for error, keys, values in bad_inputs:
        with pytest.raises(error):
            follower.absorb(rec.facts, keys, values)
        assert len(follower.journal_) == n_journal
        assert all(torch.equal(follower.solvers_[l].W_, W) for l, W in before.items())
        assert all(torch.equal(p, params[n]) for n, p in model2.named_parameters())
    with pytest.raises(FactError):
        follower.absorb([], rec.keys, rec.values)


def test_shadow_runner_refuses_a_batch_its_leader_has_not_written(tiny, tmp_path):
    model, tok = tiny("llama")
    cfg = _fast_config(tmp_path)
    leader = protocol.make_runner("rlsedit", model, tok, edit_config=cfg)
    shadow = protocol.make_runner("memit_seq", model, tok, edit_config=cfg, leader=leader)
    assert isinstance(shadow, protocol.ShadowRunner)
    shadow.editor.prepare()  # reads W0 now, while the shared model still holds the base weights
    with pytest.raises(HyperparameterError, match="leader first"):
        shadow.edit(FACTS[:2])
    leader.edit(FACTS[:2])
    with pytest.raises(HyperparameterError, match="differs"):
        shadow.edit(FACTS[2:4])
    assert shadow.leader_gap() is None  # at different batches
    # One model, two editors: the shadow writes from its own weights (the bench puts them back).
    protocol.restore_weights(model, shadow.editor.spec_, {l: s.W0_ for l, s in shadow.editor.solvers_.items()})
    shadow.edit(FACTS[:2])
    gap = shadow.leader_gap()
    assert set(gap) == set(leader.layers) and all(g.rel < 1e-6 for g in gap.values())
    shadow.editor.release()
    with pytest.raises(HyperparameterError):
        protocol.make_runner("ft", model, tok, edit_config=cfg, leader=leader)
    with pytest.raises(HyperparameterError):  # a retracting leader's journal is not one stream
        protocol.make_runner("memit_seq", model, tok, leader=protocol.make_runner(
            "rlsedit", model, tok, edit_config=dataclasses.replace(cfg, replace=True)))


def test_bench_shadow_and_full_checkpoints_resume(tiny_bench, tmp_path, monkeypatch):
    """--shadow memit_seq: MEMIT-seq writes RLSEdit's keys and values, stays on its weights, and
    resumes after an interruption; --score-all-at re-scores every edit so far mid-stream."""
    kw = dict(methods="memit_seq,rlsedit", shadow="memit_seq", interleave=True, score_all_at="4")
    ref_out = tmp_path / "ref" / "out"
    ref_out.parent.mkdir()
    assert bench.run_bench(_bench_args(ref_out, **kw)) == 0
    ref = bench.read_results(ref_out)
    assert ref["settings"]["shadow"] == ["memit_seq"] and ref["settings"]["full_checkpoints"] == [4]
    shadow, leader = ref["methods"]["memit_seq"], ref["methods"]["rlsedit"]
    assert shadow["done"] and leader["done"]
    full = [p for p in leader["checkpoints"] if p.get("all")]
    assert [p["edits"] for p in full] == [4] and full[0]["all"]["n"] == 4
    gaps = [g["rel"] for p in shadow["checkpoints"] for g in p["leader_gap"].values()]
    assert gaps and max(gaps) < 1e-6
    for s, l in zip(shadow["immediate"], leader["immediate"], strict=False):
        assert s["efficacy_magnitude"] == pytest.approx(l["efficacy_magnitude"], abs=1e-5)
        assert s["residual_ratio"] is None  # the shadow computes no values of its own
    md = (ref_out / "results.md").read_text()
    assert "shadow of rlsedit" in md and "Every edit so far" in md and "Weight gap of memit_seq" in md

    # Interrupt the shadow's second batch; the rerun resumes both and ends where the reference did.
    out = tmp_path / "run" / "out"
    out.parent.mkdir()
    _interrupted(monkeypatch, protocol.ShadowRunner, _bench_args(out, **kw))
    model, _ = tiny_bench
    assert bench.run_bench(_bench_args(out, **kw)) == 0
    got = bench.read_results(out)
    for method in ("rlsedit", "memit_seq"):
        assert got["methods"][method]["done"]
        assert got["methods"][method]["final"]["all"]["score"] == pytest.approx(
            ref["methods"][method]["final"]["all"]["score"], abs=1e-4)
    # Other full checkpoints are other settings: refused; a malformed list is a typed error.
    with pytest.raises(HyperparameterError):
        bench.run_bench(_bench_args(out, **{**kw, "score_all_at": "2"}))
    with pytest.raises(HyperparameterError, match="edit counts"):
        bench.run_bench(_bench_args(out, **{**kw, "score_all_at": "three hundred"}))


def test_bench_adds_a_shadow_to_a_finished_run_from_the_kept_leader(tiny_bench, tmp_path):
    """A shadow named on a rerun of a finished run writes the kept leader's journal: it ends on the
    leader's weights (MEMIT-seq = RLSEdit at alpha = 0), and the leader is not run again. Without
    a kept state, or turning a method that ran on its own values into a shadow, is refused."""
    out = tmp_path / "run" / "out"
    out.parent.mkdir()
    assert bench.run_bench(_bench_args(out, methods="rlsedit", interleave=True, keep_state=True)) == 0
    first = bench.read_results(out)
    leader_before = first["methods"]["rlsedit"]
    assert bench.run_bench(_bench_args(out, methods="rlsedit,memit_seq", shadow="memit_seq", interleave=True,
                                       keep_state=True)) == 0
    got = bench.read_results(out)
    assert got["settings"]["shadow"] == ["memit_seq"]
    assert got["methods"]["rlsedit"] == leader_before  # not run again
    shadow = got["methods"]["memit_seq"]
    assert shadow["done"] and shadow["edits_done"] == 6
    # The kept leader is at its last batch: the gap is measured there (None before it).
    last = shadow["checkpoints"][-1]
    assert last["batch"] == 3 and max(g["rel"] for g in last["leader_gap"].values()) < 1e-6
    assert all(p["leader_gap"] is None for p in shadow["checkpoints"][:-1])
    assert shadow["final"]["all"]["score"] == pytest.approx(leader_before["final"]["all"]["score"], abs=1e-4)
    # memit_seq has now run as a shadow: it cannot leave the shadow list (nor rlsedit's state be missing).
    with pytest.raises(HyperparameterError, match="shadow"):
        bench.run_bench(_bench_args(out, methods="rlsedit,memit_seq", interleave=True, keep_state=True))

    bare = tmp_path / "bare" / "out"
    bare.parent.mkdir()
    assert bench.run_bench(_bench_args(bare, methods="rlsedit,memit", interleave=True)) == 0
    before = (bare / "results.json").read_text()
    with pytest.raises(HyperparameterError, match="shadow"):  # memit ran on its own values
        bench.run_bench(_bench_args(bare, methods="rlsedit,memit", shadow="memit", interleave=True))
    with pytest.raises(HyperparameterError, match="kept state"):  # no --keep-state the first time
        bench.run_bench(_bench_args(bare, methods="rlsedit,memit,memit_seq", shadow="memit_seq", interleave=True))
    assert (bare / "results.json").read_text() == before  # refused before anything was written


def _tree_bytes(folder: Path) -> dict:
    return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()}


def test_bench_extends_a_finished_run_to_a_longer_stream(tiny_bench, tmp_path):
    """``--extend-from`` continues a finished, kept 6-edit run to 10 edits without writing the
    first 6 again: every method ends where a straight 10-edit run ends (same final scores; the
    shadow still equals its leader), the short run's final scores become the full checkpoint at
    6 edits, and the short run's folder is not touched. A method may leave the longer stream
    (memit_seq here), but not join it or change its role."""
    kw = dict(methods="rlsedit,memit_seq", shadow="memit_seq", interleave=True, keep_state=True)
    straight = tmp_path / "straight" / "out"
    straight.parent.mkdir()
    settings = {**kw, "methods": "rlsedit,memit", "shadow": "memit"}
    assert bench.run_bench(_bench_args(straight, edits=10, **settings)) == 0
    short = tmp_path / "short" / "out"
    short.parent.mkdir()
    assert bench.run_bench(_bench_args(short, **{**kw, "methods": "rlsedit,memit,memit_seq",
                                                 "shadow": "memit,memit_seq"})) == 0
    short_files = _tree_bytes(short)
    short_final = bench.read_results(short)["methods"]["rlsedit"]["final"]

    longer = tmp_path / "short" / "longer"
    args = _bench_args(longer, edits=10, score_all_at="6", extend_from=str(short),
                       **{**kw, "methods": "rlsedit,memit", "shadow": "memit"})
    assert bench.run_bench(args) == 0
    got, ref = bench.read_results(longer), bench.read_results(straight)
    assert got["settings"]["extended_from"] == str(short) and got["settings"]["case_ids"] == ref["settings"]["case_ids"]
    assert _tree_bytes(short) == short_files  # only read
    for name in ("rlsedit", "memit"):
        rec = got["methods"][name]
        assert rec["done"] and rec["edits_done"] == 10
        assert [e["batch"] for e in rec["immediate"]] == [1, 2, 3, 4, 5]
        for k in ("efficacy", "generalization", "specificity"):
            assert rec["final"]["all"][k] == pytest.approx(ref["methods"][name]["final"]["all"][k], abs=1e-6), (name, k)
        want = ref["methods"][name]["immediate"][4]["efficacy"]
        assert rec["immediate"][4]["efficacy"] == pytest.approx(want, abs=1e-6)
    at6 = [p for p in got["methods"]["rlsedit"]["checkpoints"] if p["edits"] == 6][0]
    assert at6["all"] == short_final["all"] and got["methods"]["rlsedit"]["source_final"] == short_final
    assert len(got["base"]["cases"]) == 10
    # Resuming the finished extension needs no source any more and writes nothing new.
    assert bench.run_bench(dataclasses.replace(args, extend_from=None)) == 0
    assert bench.read_results(longer)["methods"]["rlsedit"]["final"] == got["methods"]["rlsedit"]["final"]

    def refused(match, **changes):
        out = tmp_path / "short" / f"refused_{match.split()[0]}"
        with pytest.raises(HyperparameterError, match=match):
            bench.run_bench(_replace(args, out=str(out), **changes))
        assert not out.exists() or not (out / "results.json").exists()

    refused("must exceed", edits=6, score_all_at="")
    refused("other settings", alpha=0.5)
    refused("retention", retention_fraction=0.5)
    refused("falls inside", score_all_at="2")
    refused("did not finish", methods="rlsedit,memit,alphaedit", shadow="memit,alphaedit")
    refused("as a shadow", methods="rlsedit,memit", shadow="")
    refused("no results", extend_from=str(tmp_path / "nowhere"))
    bare = tmp_path / "short" / "bare"
    assert bench.run_bench(_bench_args(bare, methods="rlsedit", interleave=True)) == 0
    refused("kept state", extend_from=str(bare), methods="rlsedit", shadow="")


@pytest.mark.parametrize("family", ["llama", "gpt2", "gptj", "gpt_neox", "qwen2"])
def test_logits_at_equals_the_full_logits(tiny, family):
    """The LM head applied at chosen positions only gives the model's own logits there."""
    from rlsedit_llm.pipeline.scoring import logits_at

    model, tok = tiny(family)
    ids = torch.randint(0, model.config.vocab_size, (3, 7))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # right padding in one row
    rows, pos = torch.tensor([0, 1, 1, 2]), torch.tensor([6, 0, 4, 3])
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask).logits.float()
    got = logits_at(model, ids, mask, rows, pos)
    assert got.shape == (4, model.config.vocab_size)
    assert torch.allclose(got, full[rows, pos], atol=1e-5, rtol=1e-5)


def test_bench_defaults_follow_the_run_size_and_explicit_values_win(tmp_path):
    small = bench.BenchConfig(out=str(tmp_path), edits=10).resolved()
    assert (small.stats_tokens, small.fluency_cases, small.glue) == (20_000, 5, 0)
    large = bench.BenchConfig(out=str(tmp_path), edits=1000).resolved()
    assert (large.stats_tokens, large.fluency_cases, large.glue) == (EditConfig().stats_tokens, 50, 100)
    mine = bench.BenchConfig(out=str(tmp_path), edits=10, stats_tokens=3000, fluency_cases=0, glue=7).resolved()
    assert (mine.stats_tokens, mine.fluency_cases, mine.glue) == (3000, 0, 7)



def test_value_norm_anchoring_and_instruments(tiny, tmp_path):
    """Without anchoring the report carries the instruments; with it every written value z* has
    exactly the norm the model had at that position before the edit (any method with values)."""
    from rlsedit_llm.pipeline.values import anchor_norms

    target, ref = torch.randn(4, 8), torch.randn(4, 8)
    anchored = anchor_norms(target, ref)
    assert torch.allclose(anchored.norm(dim=1), ref.norm(dim=1))
    assert torch.allclose(anchored / anchored.norm(dim=1, keepdim=True), target / target.norm(dim=1, keepdim=True))
    for method in ("rlsedit", "alphaedit", "encore"):  # ENCORE: anchored after its early stop
        for anchor in (False, True):
            model, tok = tiny("llama")
            cfg = dataclasses.replace(_fast_config(tmp_path), method=method, anchor_value_norms=anchor)
            report = Editor(model, tok, cfg).edit(FACTS[:3])
            z, h0 = torch.tensor(report.norms["z"]), torch.tensor(report.norms["h0"])
            assert len(z) == 3 and all(f"V{l}" in report.norms and f"KW0{l}" in report.norms for l in report.layers)
            if anchor:
                assert torch.allclose(z, h0, rtol=1e-5)
            else:
                assert not torch.allclose(z, h0, rtol=1e-3)  # the optimised values moved away


def test_value_norm_anchoring_is_refused_by_methods_without_values(tiny, tmp_path):
    """UltraEdit and FT optimise no value: asking them to anchor one is a typed error, not a
    silently ignored setting; the bench (which sets it for every method) drops it for them."""
    from rlsedit_llm.editing.methods import make_editor

    model, tok = tiny("llama")
    cfg = dataclasses.replace(_fast_config(tmp_path), anchor_value_norms=True)
    for method in ("ultraedit", "ft"):
        with pytest.raises(HyperparameterError, match="no values"):
            make_editor(method, model, tok, cfg)
    runner = protocol.make_runner("ultraedit", model, tok, edit_config=cfg)
    assert runner.editor.layers_ == tuple(cfg.layers or runner.editor.spec_.default_layers)


def test_load_stream_skips_a_question_repeated_inside_its_batch(tmp_path):
    """One target per question per editor call: a record repeating the prompt and subject of an
    earlier record of its batch is skipped; asked again in a later batch it stays (a re-edit)."""
    def rec(i, subject, target):
        return {"case_id": i, "prompt": f"The home of {subject} is", "subject": subject, "target_new": target,
                "ground_truth": "Paris", "rephrase_prompt": f"{subject} lives in", "locality_prompt": "Bob lives in",
                "locality_ground_truth": "Rome"}
    path = tmp_path / "simple.json"
    path.write_text(json.dumps([rec(0, "Ann", "Oslo"), rec(1, "Ann", "Lima"), rec(2, "Bea", "Kyiv"),
                                rec(3, "Ann", "Cairo"), rec(4, "Cid", "Baku")]))
    ids = [f.case_id for f in data.load_stream("counterfact_simple", 4, path=path, batch_size=2)]
    assert ids == [0, 2, 3, 4]  # 1 repeats 0 in batch [0, 2]; 3 repeats 0 in the next batch and stays
    assert [f.case_id for f in data.load_stream("counterfact_simple", 5, path=path)] == [0, 1, 2, 3, 4]


def test_a_run_continues_when_its_stream_changed_only_after_the_written_edits(tiny_bench, tmp_path, monkeypatch):
    model, _ = tiny_bench
    base_weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    out = tmp_path / "run" / "out"
    out.parent.mkdir()
    _interrupted(monkeypatch, protocol.MethodRunner, _bench_args(out, methods="rlsedit"))
    assert bench.read_results(out)["methods"]["rlsedit"]["edits_done"] == 2
    with torch.no_grad():  # a fresh process starts from the base model
        for n, p in model.named_parameters():
            p.copy_(base_weights[n])

    def changed(after):  # the loader now drops the case at position `after` (a later one moves up)
        def load(dataset, n, tok=None, **kw):
            facts = _tiny_stream(n + 1)
            return (facts[:after] + facts[after + 1:])[:n]
        return load

    monkeypatch.setattr(bench, "load_stream", changed(1))  # inside the written edits: refused
    with pytest.raises(HyperparameterError, match="case_ids"):
        bench.run_bench(_bench_args(out, methods="rlsedit"))
    monkeypatch.setattr(bench, "load_stream", changed(3))  # after them: the run goes on
    assert bench.run_bench(_bench_args(out, methods="rlsedit")) == 0
    done = bench.read_results(out)
    assert done["settings"]["case_ids"] == [0, 1, 2, 4, 5, 6]
    assert done["methods"]["rlsedit"]["done"] and done["methods"]["rlsedit"]["edits_done"] == 6
    assert [c["case_id"] for c in done["base"]["cases"]] == [0, 1, 2, 4, 5, 6]


def test_fluency_states_reproduces_the_bench_fluency_of_a_kept_state(tiny_bench, benchmark_script, tmp_path,
                                                                    monkeypatch, capsys):
    """benchmarks/fluency_states.py loads a kept state onto a fresh model and regenerates from the
    bench's own fluency prompts: on the same prompts it gives the bench's recorded fluencies and
    generation NLLs."""
    model, tok = tiny_bench
    base = copy.deepcopy(model)  # the bench edits ``model`` in place

    def stream(dataset, n, tok=None, **kw):  # without generation prompts: fluency on the rewrite prompts
        return [dataclasses.replace(f, generation_prompts=()) for f in _tiny_stream(n)]

    monkeypatch.setattr(bench, "load_stream", stream)
    out = tmp_path / "run"
    args = _bench_args(out, methods="rlsedit", keep_state=True, fluency_cases=3, fluency_protocol="greedy-eos")
    assert bench.run_bench(args) == 0
    rec = bench.read_results(out)
    assert rec["base"]["fluency_n"] == 3
    fluency_states = benchmark_script("fluency_states")
    monkeypatch.setattr(fluency_states, "load_model", lambda name, **kw: (copy.deepcopy(base), tok))
    monkeypatch.setattr(fluency_states, "load_stream", stream)
    fluency_states.main([str(out / "state" / "rlsedit"), "--prompts", "3"])
    text = capsys.readouterr().out
    assert "first 3 prompts" in text
    assert f"| unedited | {100 * rec['base']['fluency']:.1f} | — |" in text
    assert f"| run/rlsedit | {100 * rec['methods']['rlsedit']['final']['fluency']:.1f} |" in text
    # The generations' NLL under the unedited model, as the bench scored them.
    [row] = [line for line in text.splitlines() if line.startswith("| run/rlsedit |")]
    assert f"| {rec['methods']['rlsedit']['final']['generation_nll']:.2f} |" in row
    assert f"| {rec['base']['generation_nll']:.2f} | — |" in text
    # For scale, prose and word salad (a tiny random model cannot tell them apart, so only that
    # both rows are there and finite is checked here).
    scale = {line.split("|")[1].strip(): float(line.split("|")[4]) for line in text.splitlines()
             if line.startswith("| for scale:")}
    assert set(scale) == {"for scale: Wikipedia prose", "for scale: the same words shuffled"}
    assert all(math.isfinite(v) and v > 0 for v in scale.values())
    assert rec["methods"]["rlsedit"]["final"]["fluency"] != rec["base"]["fluency"]  # the state was applied


def test_fluency_states_refuses_states_of_different_streams(benchmark_script, tmp_path):
    fluency_states = benchmark_script("fluency_states")
    states = []
    for name, dataset in (("a", "counterfact_simple"), ("b", "zsre")):
        run = tmp_path / name
        (run / "state" / "rlsedit").mkdir(parents=True)
        settings = {"model": "smollm2", "dataset": dataset, "n_edits": 10, "batch_size": 10, "fluency_tokens": 100}
        (run / "results.json").write_text(json.dumps({"settings": settings}))
        states.append(str(run / "state" / "rlsedit"))
    with pytest.raises(SystemExit, match="different models, data sets"):
        fluency_states.main(states)
    with pytest.raises(SystemExit, match="no bench results.json"):
        fluency_states.main([str(tmp_path)])


def test_bench_value_steps_lengthen_each_methods_own_value_settings(tiny, tmp_path, monkeypatch):
    """``--value-steps`` changes only the step budget of each method's own value settings (ENCORE
    keeps its MPES stop), leaves editor-level methods alone, is recorded in the settings (a resume
    with another budget is refused) and is checked before any model loads."""
    from rlsedit_llm.editing.methods import method_value_config

    model, tok = tiny("llama")
    monkeypatch.setattr(bench, "load_stream", lambda dataset, n, tok=None, **kw: _tiny_stream(n))
    loads = []
    monkeypatch.setattr(bench, "load_model", lambda name, **kw: loads.append(name) or (model, tok))
    built = {}
    real = protocol.make_runner

    def recording_runner(name, model, tokenizer, *, edit_config=None, **kw):
        cfg = dataclasses.replace(edit_config, n_templates=2, template_length=4)  # value settings untouched
        runner = real(name, model, tokenizer, edit_config=cfg, **kw)
        built[name] = runner.editor
        return runner

    monkeypatch.setattr(bench, "make_runner", recording_runner)
    out = tmp_path / "out"
    args = _bench_args(out, edits=2, batch=2, methods="rlsedit,encore,ft", value_steps=3, checkpoints=1)
    assert bench.run_bench(args) == 0
    spec = built["rlsedit"].spec_
    assert built["rlsedit"].value_config_ == method_value_config("rlsedit", spec, steps=3)
    assert built["rlsedit"].value_config_.steps == 3 and not built["rlsedit"].value_config_.stop_when_top1
    assert built["encore"].value_config_.steps == 3 and built["encore"].value_config_.stop_when_top1
    assert built["rlsedit"].value_config_.lr == method_value_config("rlsedit", spec).lr  # only the budget moved
    assert bench.read_results(out)["settings"]["value_steps"] == 3
    with pytest.raises(HyperparameterError, match="value_steps"):
        bench.run_bench(dataclasses.replace(args, value_steps=4))
    with pytest.raises(HyperparameterError, match="optimises no values"):
        method_value_config("ft", spec)
    with pytest.raises(HyperparameterError, match="no field"):
        method_value_config("rlsedit", spec, stepz=3)
    n_loads = len(loads)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(HyperparameterError, match="value-steps"):
            bench.run_bench(_bench_args(tmp_path / f"bad{bad}", value_steps=bad))
    assert len(loads) == n_loads  # refused before the model was loaded


# ----------------------------------------------------------------------------------------------
# Results: typed, versioned, reading every committed run


def _committed_runs() -> list[Path]:
    return sorted(p.parent for p in ASSETS.glob("*/results.json"))


def _as_v2(data: dict) -> dict:
    """What format v2 writes for a v1 run: FT's and UltraEdit's settings under method_settings."""
    data = copy.deepcopy(data)
    settings = data["settings"]
    settings["format"] = results_mod.FORMAT
    ft = {new: settings.pop(old) for old, new in (("ft_lr", "lr"), ("ft_steps", "steps")) if old in settings}
    ultra = {k: v for k, v in (settings.pop("ultraedit", None) or {}).items() if v is not None}
    settings["method_settings"] = {m: s for m, s in (("ft", ft), ("ultraedit", ultra)) if s}
    settings.setdefault("full_checkpoints", [])
    settings.setdefault("shadow", [])
    return data


def test_every_committed_run_loads_round_trips_and_renders_its_report(tmp_path):
    runs = _committed_runs()
    assert len(runs) >= 17
    for i, run in enumerate(runs):
        figures = i in (0, len(runs) - 1)  # the tables of every run, the figures of two (they cost seconds each)
        data = json.loads((run / "results.json").read_text(encoding="utf-8"))
        assert data["settings"]["format"] in results_mod.FORMATS
        res = results_mod.Results.from_json(data)
        assert res.to_json() == _as_v2(data), run.name  # nothing dropped, nothing invented
        assert results_mod.Results.from_json(res.to_json()) == res
        out = tmp_path / run.name
        out.mkdir()
        bench_report.write_report(res, out, figures=figures)
        md = (out / "results.md").read_text(encoding="utf-8")
        for name, rec in res.methods.items():
            assert f"| {name} | {rec.edits_done}" in md, (run.name, name)
        rows = (out / "deviation.csv").read_text().splitlines()
        assert len(rows) == 1 + sum(len(p.deviation) for rec in res.methods.values() for p in rec.checkpoints)
        for name in ("summary.csv", "curves.csv", *(("scores.png", "retention.png", "deviation.png", "norms.png")
                                                     if figures else ())):
            assert (out / name).stat().st_size > 0, (run.name, name)
        assert figures or not (out / "scores.png").exists()


def test_results_keep_unknown_keys_and_refuse_malformed_files():
    data = json.loads((ASSETS / "zsre887o_rlsedit" / "results.json").read_text(encoding="utf-8"))
    data["note"] = "kept"
    rec = data["methods"]["rlsedit"]
    rec["reviewer"] = {"ok": True}
    rec["checkpoints"][0]["deviation"]["4"]["spectral"] = 1.5
    rec["immediate"][0]["new_metric"] = 0.25
    res = results_mod.Results.from_json(data)
    assert res.extra == {"note": "kept"} and res.methods["rlsedit"].extra == {"reviewer": {"ok": True}}
    assert res.methods["rlsedit"].checkpoints[0].deviation[4].extra == {"spectral": 1.5}
    assert res.methods["rlsedit"].immediate[0].scores.get("new_metric") == 0.25
    assert res.to_json() == _as_v2(data)
    from rlsedit_llm.errors import StateMismatchError

    for breaks, match in ((lambda d: d["settings"].update(format="rlsedit-bench-v9"), "format"),
                          (lambda d: d["settings"].pop("format"), "format"),
                          (lambda d: d["methods"]["rlsedit"].update(batches_done="three"), "batches_done"),
                          (lambda d: d["methods"]["rlsedit"]["immediate"].append(7), "expected a JSON object"),
                          (lambda d: d["methods"]["rlsedit"]["checkpoints"][0]["deviation"].update(x={}), "int keys")):
        broken = copy.deepcopy(data)
        breaks(broken)
        with pytest.raises(StateMismatchError, match=match):
            results_mod.Results.from_json(broken)


def test_a_v1_run_in_progress_resumes_under_v2(tiny_bench, tmp_path, monkeypatch):
    """A run written in format v1 (FT's settings as ft_lr/ft_steps) is resumed, not refused, and
    is written back as v2."""
    model, _ = tiny_bench
    base_weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    out = tmp_path / "run" / "out"
    out.parent.mkdir()
    _interrupted(monkeypatch, protocol.MethodRunner, _bench_args(out, methods="rlsedit,ft"))
    with torch.no_grad():  # a fresh process starts from the base model
        for n, p in model.named_parameters():
            p.copy_(base_weights[n])
    data = json.loads((out / "results.json").read_text())
    settings = data["settings"]
    ft = settings.pop("method_settings")["ft"]
    settings.update(format="rlsedit-bench-v1", ft_lr=ft["lr"], ft_steps=ft["steps"])
    (out / "results.json").write_text(json.dumps(data))
    assert bench.run_bench(_bench_args(out, methods="rlsedit,ft")) == 0
    done = bench.load_results(out)
    assert all(rec.done for rec in done.methods.values()) and len(done.sessions) == 2
    assert bench.read_results(out)["settings"]["format"] == results_mod.FORMAT
    assert done.settings.method_settings["ft"] == {"lr": 1e-3, "steps": 2}
    assert done.methods["ft"].settings == {"lr": 1e-3, "steps": 2} and done.methods["rlsedit"].settings is None
