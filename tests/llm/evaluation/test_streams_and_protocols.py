"""The bench's streams (seeds), zsRE target and fluency protocols (ROME's sampled one beside the
greedy one), and what results record of them."""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import torch

from rlsedit_llm import Fact
from rlsedit_llm.errors import HyperparameterError
from rlsedit_llm.evaluation import bench, data, metrics, protocol
from rlsedit_llm.evaluation import report as bench_report
from rlsedit_llm.evaluation.protocol_config import ProtocolConfig
from rlsedit_llm.evaluation.results import Results, load_results
from rlsedit_llm.pipeline.facts import as_fact
from rlsedit_llm.pipeline.tokens import encode_prompt, needs_bos

pytestmark = pytest.mark.usefixtures("one_thread_unless_slow")

ASSETS = Path(__file__).resolve().parents[3] / "docs" / "assets" / "bench"


# ----------------------------------------------------------------------------------------------
# Streams


def _records(dataset: str) -> list[dict]:
    return json.loads((data.data_dir() / data._FILES[dataset]).read_text(encoding="utf-8"))


def test_stream_0_is_the_file_order_every_committed_run_used():
    records = _records("counterfact_simple")
    facts = data.load_stream("counterfact_simple", 40)
    assert facts == [as_fact(r) for r in records[:40]]
    assert [f.case_id for f in data.load_stream("zsre", 12, stream=0)] == list(range(12))
    # the committed 1,000-edit run's case ids (with the in-batch repeat skip) are stream 0's
    run = load_results(ASSETS / "smol1000s")
    ids = [f.case_id for f in data.load_stream("counterfact_simple", 1000, batch_size=100)]
    assert tuple(ids) == run.settings.case_ids and run.settings.stream.stream_seed == 0


def test_seeds_give_different_reproducible_streams():
    n = 60
    first = [f.case_id for f in data.load_stream("counterfact_simple", n, stream=1)]
    assert first == [f.case_id for f in data.load_stream("counterfact_simple", n, stream=1)]  # reproducible
    second = [f.case_id for f in data.load_stream("counterfact_simple", n, stream=2)]
    file_order = [f.case_id for f in data.load_stream("counterfact_simple", n)]
    assert len(set(first)) == n and first != sorted(first)  # other records, in a shuffled order
    assert len(set(first) & set(second)) < n // 4 and len(set(first) & set(file_order)) < n // 4
    assert data.stream_order(10, 0) == list(range(10))
    order = data.stream_order(1000, 3)
    assert sorted(order) == list(range(1000)) and order[:50] != data.stream_order(1000, 4)[:50]
    # the order of n records is a prefix-free permutation: a record's rank does not depend on the others
    small = data.stream_order(100, 3)
    assert [i for i in order if i < 100] == small
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(HyperparameterError, match="stream"):
            data.load_stream("zsre", 3, stream=bad)


def test_zsre_target_answer_is_memits_first_answer():
    records = _records("zsre")
    alt = data.load_stream("zsre", 30, stream=2)
    answer = data.load_stream("zsre", 30, stream=2, zsre_target="answer")
    assert [f.case_id for f in alt] == [f.case_id for f in answer]
    for a, b in zip(alt, answer, strict=True):
        rec = records[a.case_id]
        assert a.target == rec["alt"] and b.target == rec["answers"][0]
        assert (a.prompt, a.subject, a.paraphrases, a.neighbourhood_target) == \
               (b.prompt, b.subject, b.paraphrases, b.neighbourhood_target)
    assert sum(a.target != b.target for a, b in zip(alt, answer, strict=True)) > 20
    with pytest.raises(HyperparameterError, match="zsre_target"):
        data.load_stream("zsre", 3, zsre_target="pred")


# ----------------------------------------------------------------------------------------------
# Settings and results


def test_protocol_settings_are_checked_and_left_out_at_their_legacy_values():
    cfg = ProtocolConfig()
    assert (cfg.stream_seed, cfg.fluency_protocol, cfg.zsre_target) == (0, "greedy-eos", "alt")
    assert not {"stream_seed", "fluency_protocol", "zsre_target"} & set(cfg.to_dict())
    new = ProtocolConfig(dataset="zsre", stream_seed=2, fluency_protocol="rome", zsre_target="answer")
    assert {k: new.to_dict()[k] for k in ("stream_seed", "fluency_protocol", "zsre_target")} == \
           {"stream_seed": 2, "fluency_protocol": "rome", "zsre_target": "answer"}
    for bad, match in (({"stream_seed": -1}, "stream_seed"), ({"fluency_protocol": "beam"}, "fluency_protocol"),
                       ({"zsre_target": "pred"}, "zsre_target")):
        with pytest.raises(HyperparameterError, match=match):
            ProtocolConfig(**bad).validate()
    for bad, match in (({"stream": -2}, "--stream"), ({"fluency_protocol": "top5"}, "--fluency-protocol"),
                       ({"zsre_target": "answers"}, "--zsre-target")):
        with pytest.raises(HyperparameterError, match=match):
            bench.BenchConfig(out="o", **bad)
    resolved = bench.BenchConfig(out="o", stream=3, zsre_target="answer").resolved().protocol()
    assert (resolved.stream_seed, resolved.zsre_target, resolved.fluency_protocol) == (3, "answer", "rome")


def test_committed_runs_load_as_greedy_eos_and_their_report_names_it(tmp_path):
    raw = json.loads((ASSETS / "zsre887" / "results.json").read_text(encoding="utf-8"))
    assert "fluency_protocol" not in raw["settings"]
    res = Results.from_json(raw)
    cfg = res.settings.stream
    assert (cfg.fluency_protocol, cfg.stream_seed, cfg.zsre_target) == ("greedy-eos", 0, "alt")
    assert "fluency_protocol" not in res.to_json()["settings"]  # nothing invented on a round trip
    bench_report.write_report(res, tmp_path, figures=False)
    md = (tmp_path / "results.md").read_text(encoding="utf-8")
    assert "Protocol: stream 0 (the data set's file order); fluency greedy-eos" in md
    assert "zsRE target alt (EasyEdit's)" in md


def test_the_fluency_protocol_of_a_run_is_the_given_one_else_the_recorded_one_else_romes(tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    (old / "results.json").write_bytes((ASSETS / "cf300" / "results.json").read_bytes())
    config = bench.BenchConfig(out=str(old)).resolved()
    assert bench._with_fluency_protocol(config, old).fluency_protocol == "greedy-eos"  # resumed: its own
    restart = bench.BenchConfig(out=str(old), restart=True).resolved()
    assert bench._with_fluency_protocol(restart, old).fluency_protocol == "rome"
    new = tmp_path / "new"
    assert bench._with_fluency_protocol(bench.BenchConfig(out=str(new)), new).fluency_protocol == "rome"
    extended = bench.BenchConfig(out=str(new), extend_from=str(old))
    assert bench._with_fluency_protocol(extended, new).fluency_protocol == "greedy-eos"
    given = bench.BenchConfig(out=str(old), fluency_protocol="rome")
    assert bench._with_fluency_protocol(given, old).fluency_protocol == "rome"


# ----------------------------------------------------------------------------------------------
# Fluency: ROME's protocol


def test_treebank_words_follow_the_penn_treebank_conventions():
    text = 'He said "don\'t go to the U.S. now." It cost 1,000 dollars... John\'s car (blue) -- ok?'
    assert metrics.treebank_words(text) == [
        "He", "said", "``", "do", "n't", "go", "to", "the", "U.S.", "now", ".", "''", "It", "cost", "1,000",
        "dollars", "...", "John", "'s", "car", "(", "blue", ")", "--", "ok", "?"]
    # one text, two splitters: the regular expression cuts "1,000" and "n't" apart, so more bigrams
    repeated = "I can't pay 1,000. " * 3
    assert metrics.ngram_entropy(repeated, words="treebank") < metrics.ngram_entropy(repeated)
    with pytest.raises(HyperparameterError, match="words"):
        metrics.ngram_entropy("a b c", words="nltk")


def test_rome_fluency_statistic_is_treebank_entropy_of_the_normalised_text():
    prompt, cont = "Caf\u00e9 life", " is good.\n\nIt is good. It is good."
    want = metrics.ngram_entropy(unicodedata.normalize("NFKD", prompt + cont).replace("\n\n", " "), words="treebank")
    assert metrics.fluency_entropy(prompt, cont, "rome") == pytest.approx(want)
    assert metrics.fluency_entropy(prompt, cont, "greedy-eos") == pytest.approx(metrics.ngram_entropy(prompt + cont))
    assert metrics.rome_text("e\u0301\n\nx") == "e\u0301 x" and metrics.rome_text("\u00e9") == "e\u0301"
    with pytest.raises(HyperparameterError, match="fluency protocol"):
        metrics.fluency_entropy(prompt, cont, "beam")


PROMPTS = ["The Eiffel Tower is", "Danielle Darrieux's mother tongue is", "Toyota", "Where is Big Ben? It stands in"]


def _reference_sample(model, tok, prompt: str, length: int, uniforms: np.ndarray, top_k: int) -> list[int]:
    """One prompt, no cache, no padding: the full forward at every step, top-k inverse CDF."""
    ids = encode_prompt(tok, prompt, bos=needs_bos(model))
    out = []
    for u in uniforms[:max(0, length - len(ids))]:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids + out])).logits[0, -1].double()
        p, i = torch.softmax(logits, -1).topk(top_k)
        cdf = (p / p.sum()).cumsum(0)
        out.append(int(i[min(int((cdf < u).sum()), top_k - 1)]))
    return out


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_sample_generate_is_top_k_sampling_to_a_fixed_length_seeded_and_batch_independent(tiny, family):
    model, tok = tiny(family)
    length = 14
    got = metrics.sample_generate(model, tok, PROMPTS, length, rng=np.random.default_rng(5), batch_size=4)
    lengths = [len(encode_prompt(tok, p, bos=needs_bos(model))) for p in PROMPTS]
    assert [len(g) for g in got] == [max(0, length - n) for n in lengths]  # fixed total length
    # the per-prompt draws: what a reference sampler (no cache, no batch) makes of the same uniforms
    seeds = np.random.default_rng(5).integers(0, 2**63 - 1, size=len(PROMPTS))
    for prompt, seed, g in zip(PROMPTS, seeds, got, strict=True):
        assert g == _reference_sample(model, tok, prompt, length, np.random.default_rng(int(seed)).random(64), 5)
    assert got == metrics.sample_generate(model, tok, PROMPTS, length, rng=np.random.default_rng(5), batch_size=1)
    other = metrics.sample_generate(model, tok, PROMPTS, length, rng=np.random.default_rng(6), batch_size=4)
    assert other != got
    # top_k=1 is greedy decoding without the early stop
    greedy = metrics.greedy_generate(model, tok, PROMPTS, 8, stop_at_eos=False)
    top1 = metrics.sample_generate(model, tok, PROMPTS, 8 + min(lengths), rng=np.random.default_rng(0), top_k=1)
    assert all(t == g[:len(t)] for t, g in zip(top1, greedy, strict=True))


def test_rome_protocol_does_not_stop_at_end_of_sequence(tiny):
    model, tok = tiny("llama")
    def eos_first(module, args, logits):  # EOS becomes the most likely next token everywhere
        logits[..., tok.eos_token_id] += 1e4
        return logits

    model.lm_head.register_forward_hook(eos_first)
    prompts = PROMPTS[:2]
    assert metrics.greedy_generate(model, tok, prompts, 10) == [[], []]  # ours: stops at once
    sampled = metrics.sample_generate(model, tok, prompts, 20, rng=np.random.default_rng(0))
    n_prompt = [len(encode_prompt(tok, p, bos=False)) for p in prompts]
    assert [len(s) for s in sampled] == [20 - n for n in n_prompt] and all(s for s in sampled)
    assert metrics.fluency_texts(model, tok, prompts, "rome", 20) == [tok.decode(s, skip_special_tokens=True)
                                                                       for s in sampled]
    with pytest.raises(HyperparameterError, match="numpy Generator"):
        metrics.sample_generate(model, tok, prompts, 20, rng=0)
    with pytest.raises(HyperparameterError, match="top_k"):
        metrics.sample_generate(model, tok, prompts, 20, rng=np.random.default_rng(0), top_k=0)


def test_rome_fluency_uses_every_generation_prompt_and_means_per_case(tiny, monkeypatch):
    facts = [Fact("{} is in", "The tower", "Rome", target_true="Paris", case_id=0,
                  generation_prompts=("The tower is", "The tower was", "The tower")),
             Fact("{} speaks", "Jean", "English", target_true="French", case_id=1, generation_prompts=("Jean is",))]
    assert protocol.fluency_prompt_groups(facts, 2, "rome") == [list(facts[0].generation_prompts), ["Jean is"]]
    assert protocol.fluency_prompt_groups(facts, 2, "greedy-eos") == [["The tower is"], ["Jean is"]]
    model, tok = tiny("llama")
    entropy = iter([1.0, 2.0, 3.0, 10.0])  # per generation, in prompt order
    monkeypatch.setattr(metrics, "fluency_entropy", lambda p, t, proto: next(entropy))
    part = protocol.BaseScores()
    cfg = ProtocolConfig(n_edits=2, batch_size=2, fluency_cases=2, fluency_tokens=12, fluency_protocol="rome")
    protocol._add_extras(part, model, tok, facts, cfg, {}, None)
    assert part.fluency == pytest.approx((2.0 + 10.0) / 2)  # the mean of the cases' means, as ROME's summary
    assert part.fluency_n == 4 and [g.prompt for g in part.generations] == [*facts[0].generation_prompts, "Jean is"]


# ----------------------------------------------------------------------------------------------
# A new bench run records its stream, protocol and per-fact rows


def test_a_new_bench_run_records_its_stream_protocol_and_per_fact_rows(tiny, tmp_path, monkeypatch):
    model, tok = tiny("llama")
    facts = [Fact("{} is located in", f"Place {i}", "Rome", target_true="Paris", case_id=100 + i,
                  paraphrases=(f"Place {i} lies in",), neighbourhood=("Big Ben is located in",),
                  generation_prompts=(f"Place {i} is",)) for i in range(4)]
    asked = {}

    def load_stream(dataset, n, tok=None, **kw):
        asked.update(kw)
        return facts[:n]

    monkeypatch.setattr(bench, "load_model", lambda name, **kw: (model, tok))
    monkeypatch.setattr(bench, "load_stream", load_stream)
    out = tmp_path / "run"
    config = bench.BenchConfig(out=str(out), model="tiny", edits=4, batch=2, methods=("ft",), stream=7,
                               checkpoints=1, glue=0, fluency_cases=2, fluency_tokens=12, quiet=True,
                               method_settings={"ft": {"lr": 1e-3, "steps": 1}}, cache_dir=str(tmp_path / "stats"))
    assert bench.run_bench(config) == 0
    assert asked["stream"] == 7 and asked["zsre_target"] == "alt"
    raw = json.loads((out / "results.json").read_text())
    assert raw["settings"]["stream_seed"] == 7 and raw["settings"]["fluency_protocol"] == "rome"
    assert raw["settings"]["case_ids"] == [100, 101, 102, 103]
    final = load_results(out).methods["ft"].final
    assert [r["case_id"] for r in final.cases] == [100, 101, 102, 103]
    means = {k: np.mean([r[k] for r in final.cases]) for k in ("efficacy", "generalization", "specificity")}
    assert means == pytest.approx({k: final.all.get(k) for k in means}, abs=1e-5)
    assert "fluency rome (top-5 sampling" in (out / "results.md").read_text()
