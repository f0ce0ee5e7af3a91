"""Fact records, the data set parsers and validation (rlsedit_llm.pipeline.facts)."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from rlsedit_llm.adapters.tiny import tiny_model
from rlsedit_llm.errors import FactError
from rlsedit_llm.pipeline.facts import Fact, as_fact, as_facts, encode_target, validate_facts

pytestmark = pytest.mark.usefixtures("one_thread_unless_slow")

# Two records of the simplified CounterFact file (EasyEdit's simplification of CounterFact,
# MIT, Copyright (c) 2022 Kevin Meng), kept here so the parser test runs without the data folder.
CF_SIMPLE = [
    {"case_id": 0, "prompt": "The mother tongue of Danielle Darrieux is", "target_new": "English",
     "subject": "Danielle Darrieux", "ground_truth": "French",
     "rephrase_prompt": "Where Danielle Darrieux is from, people speak the language of",
     "locality_prompt": "Michel Rocard is a native speaker of", "locality_ground_truth": "French"},
    {"case_id": 21352, "prompt": "Lilyhammer premiered on", "target_new": "NBC", "subject": "Lilyhammer",
     "ground_truth": "Netflix",
     "rephrase_prompt": "A Death in November: America in Vietnam, 1963. Lilyhammer premieres on",
     "locality_prompt": "Manifest premiered on", "locality_ground_truth": "Netflix"},
]


@pytest.fixture(scope="module")
def tok():
    return tiny_model("llama")[1]


@pytest.fixture(scope="module")
def word_tok():
    """A word-level tokenizer that cannot encode unknown words (they become [UNK])."""
    vocab = {"[UNK]": 0, "[PAD]": 1}
    for w in "the mother tongue of is english french paris rome".split():
        vocab[w] = len(vocab)
    t = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=t, unk_token="[UNK]", pad_token="[PAD]")


# --------------------------------------------------------------------------------------------
# Fact
# --------------------------------------------------------------------------------------------
def test_fact_text_and_identity():
    f = Fact("The mother tongue of {} is", "Danielle Darrieux", "English", target_true="French")
    assert f.text() == "The mother tongue of Danielle Darrieux is"
    g = Fact("The mother tongue of {} is", "Danielle Darrieux", "English", target_true="French",
             paraphrases=["x"])  # lists become tuples; evaluation prompts do not change identity
    assert g.paraphrases == ("x",) and f == g and hash(f) == hash(g)
    with pytest.raises(Exception):
        f.target = "German"


# --------------------------------------------------------------------------------------------
# Parsers on real records
# --------------------------------------------------------------------------------------------
def test_counterfact_record(counterfact):
    f = as_fact(counterfact[0])
    assert f.prompt == "The mother tongue of {} is"
    assert (f.subject, f.target, f.target_true) == ("Danielle Darrieux", "English", "French")
    assert (f.case_id, f.relation_id) == (0, "P103")
    assert f.paraphrases == tuple(counterfact[0]["paraphrase_prompts"])
    assert f.neighbourhood == tuple(counterfact[0]["neighborhood_prompts"])
    assert f.attribute_prompts == tuple(counterfact[0]["attribute_prompts"])
    assert f.generation_prompts == tuple(counterfact[0]["generation_prompts"])
    assert f.neighbourhood_target is None  # CounterFact neighbours keep target_true


def test_every_counterfact_record_parses_and_validates(counterfact, tok):
    facts = as_facts(counterfact)
    assert len(facts) == len(counterfact)
    for f, rec in zip(facts, counterfact, strict=True):
        assert f.prompt.count("{}") == 1 and f.subject in f.text()
        assert f.target == rec["requested_rewrite"]["target_new"]["str"]
    validate_facts(facts[:200], tok)


@pytest.mark.parametrize("rec", CF_SIMPLE)
def test_counterfact_simple_record(rec):
    f = as_fact(rec)
    assert f.text() == rec["prompt"]
    assert f.prompt.count("{}") == 1
    assert (f.subject, f.target, f.target_true) == (rec["subject"], rec["target_new"], rec["ground_truth"])
    assert f.paraphrases == (rec["rephrase_prompt"],)
    assert f.neighbourhood == (rec["locality_prompt"],)
    assert f.neighbourhood_target == rec["locality_ground_truth"]
    assert f.case_id == rec["case_id"]


def test_first_counterfact_simple_record_matches_counterfact(counterfact):
    full, simple = as_fact(counterfact[0]), as_fact(CF_SIMPLE[0])
    assert (full.prompt, full.subject, full.target, full.target_true) == (
        simple.prompt, simple.subject, simple.target, simple.target_true)


def test_every_counterfact_simple_record_parses(counterfact_simple):
    facts = as_facts(counterfact_simple)
    assert len(facts) == len(counterfact_simple)
    assert all(f.text() == rec["prompt"] for f, rec in zip(facts, counterfact_simple, strict=True))


def test_zsre_record(zsre):
    rec = zsre[0]
    f = as_fact(rec)
    assert f.prompt == "When was the inception of {}?"
    assert f.text() == rec["src"]
    assert (f.subject, f.target, f.target_true) == (rec["subject"], rec["alt"], rec["answers"][0])
    assert f.paraphrases == (rec["rephrase"],)
    assert f.neighbourhood == (rec["loc"],) and f.neighbourhood_target == rec["loc_ans"]


def test_every_zsre_record_parses(zsre, tok):
    facts = as_facts(zsre)
    assert all(f.text() == rec["src"] and f.target == rec["alt"] for f, rec in zip(facts, zsre, strict=True))
    validate_facts(facts[:200], tok)


def test_plain_dict_forms():
    a = as_fact({"prompt": "{} is in", "subject": "The Louvre", "target": "Rome"})
    b = as_fact({"prompt": "{} is in", "subject": "The Louvre", "target_new": "Rome"})
    c = as_fact({"prompt": "{} is in", "subject": "The Louvre", "target_new": {"str": "Rome", "id": "Q220"},
                 "target_true": {"str": "Paris"}})
    assert a == b and a.target == c.target == "Rome" and c.target_true == "Paris"
    assert as_facts(a) == [a]  # a single fact is wrapped
    assert as_facts({"prompt": "{} is in", "subject": "The Louvre", "target": "Rome"}) == [a]
    assert as_fact(a) is a


def test_unreadable_records_raise_fact_error():
    with pytest.raises(FactError, match="expected prompt/subject/target"):
        as_fact({"question": "?"})
    with pytest.raises(FactError, match="no 'target'"):
        as_fact({"prompt": "{} is in", "subject": "X"})
    with pytest.raises(FactError, match="does not occur"):
        as_fact({"src": "Who founded Apple?", "subject": "Microsoft", "alt": "Bill", "answers": ["Steve"]})
    with pytest.raises(FactError, match="does not occur"):
        as_fact({"prompt": "Lilyhammer premiered on", "subject": "Manifest", "target_new": "NBC", "ground_truth": "x"})
    with pytest.raises(FactError, match="missing field 'subject'"):
        as_fact({"requested_rewrite": {"prompt": "{} is", "target_new": {"str": "x"}}})
    with pytest.raises(FactError, match="Fact or a dict"):
        as_fact("The Eiffel Tower is in Rome")
    with pytest.raises(FactError):
        as_facts("not facts")


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------
def test_encode_target_adds_a_leading_space(tok):
    assert encode_target(tok, "Paris") == tok(" Paris", add_special_tokens=False)["input_ids"]
    assert encode_target(tok, " Paris") == encode_target(tok, "Paris")


# Targets with edge whitespace, as hand-written data and EasyEdit-style records carry them.
EDGE_WHITESPACE_TARGETS = ["Paris", " Paris", "Paris ", "  Paris", "Paris\n", " New York "]


@pytest.mark.parametrize("target", EDGE_WHITESPACE_TARGETS)
def test_value_path_and_scorer_tokenise_a_target_identically(tok, target):
    """The value optimisation trains on the tokens the scorer (edit report, metrics, fine-tuning)
    reads: one rule for a target's edge whitespace, whichever module the caller imports it from."""
    from rlsedit_llm.pipeline import scoring, values

    fact = Fact("{} is in", "The Louvre", target)
    rows = values._build_rows(tok, [fact], ["{}"], values.ValueConfig())
    trained = rows.tok_label.tolist()  # the target tokens the value loss scores
    assert trained == scoring.encode_target(tok, target)
    assert trained == encode_target(tok, target)
    assert trained == encode_target(tok, target.strip())  # edge whitespace never changes the tokens


def test_valid_facts_pass(tok):
    validate_facts([Fact("The mother tongue of {} is", "Danielle Darrieux", "English"),
                    Fact("{} is in", "The Louvre", "Rome")], tok)


@pytest.mark.parametrize("fact,message", [
    (Fact("The mother tongue of is", "Danielle Darrieux", "English"), "exactly one '{}'.*found 0"),
    (Fact("{} and {} speak", "Danielle Darrieux", "English"), "exactly one '{}'.*found 2"),
    (Fact("The mother tongue of {} is", "  ", "English"), "subject is empty"),
    (Fact("The mother tongue of {} is", "Danielle Darrieux", " "), "target is empty"),
    (Fact("The mother tongue of {} is", "Danielle Darrieux", 5), "target must be a string"),
    (Fact(None, "Danielle Darrieux", "English"), "prompt must be a string"),
    (Fact("The mother tongue of {} is", "Danielle Darrieux", "English", target_true=3), "target_true"),
    (Fact("The mother tongue of {} is", "Danielle Darrieux", "English", paraphrases=(1,)), "paraphrases"),
])
def test_each_validation_error_names_fact_and_fix(tok, fact, message):
    with pytest.raises(FactError, match=message):
        validate_facts([Fact("{} is in", "The Louvre", "Rome"), fact], tok)
    with pytest.raises(FactError, match="fact #1"):
        validate_facts([Fact("{} is in", "The Louvre", "Rome"), fact], tok)


def test_target_the_tokenizer_cannot_represent(word_tok):
    validate_facts([Fact("the mother tongue of {} is", "paris", "english")], word_tok)
    with pytest.raises(FactError, match="cannot represent the target.*decodes back as '\\[UNK\\]'"):
        validate_facts([Fact("the mother tongue of {} is", "paris", "Klingon")], word_tok)


def test_duplicate_fact_in_a_batch(tok):
    facts = [Fact("{} is in", "The Louvre", "Rome"), Fact("{} is in", "The Colosseum", "Paris"),
             Fact("{} is in", "The Louvre", "Berlin")]
    with pytest.raises(FactError, match="fact #2.*same prompt and subject as fact #0"):
        validate_facts(facts, tok)
    validate_facts(facts[:2], tok)
