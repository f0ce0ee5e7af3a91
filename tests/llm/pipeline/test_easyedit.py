"""EasyEdit's call form and record keys (rlsedit_llm.pipeline.facts.from_easyedit, as_fact), the
new Fact fields that keep what EasyEdit carries, the one-call API's EasyEdit keywords, and the
portability figure (rlsedit_llm.pipeline.easyedit)."""

from __future__ import annotations

import dataclasses
import json
import logging
import math

import pytest
import torch

import rlsedit_llm
from rlsedit_llm.adapters.spec import get_module, read_weight
from rlsedit_llm.adapters.tiny import tiny_model
from rlsedit_llm.errors import FactError
from rlsedit_llm.pipeline.easyedit import pair_accuracies, portability_accuracy
from rlsedit_llm.pipeline.facts import Fact, as_fact, as_facts, encode_target, from_easyedit, validate_facts
from rlsedit_llm.pipeline.tokens import encode_prompt, needs_bos
from tests.helpers import small_config

pytestmark = pytest.mark.usefixtures("one_thread_unless_slow")

LOGGER = "rlsedit_llm.pipeline.facts"

# EasyEdit's README example, with a second locality group and a portability group.
CALL = dict(
    prompts=["Ray Charles, the", "Grant Hill is a professional"],
    target_new=["violin", "soccer"],
    subject=["Ray Charles", "Grant Hill"],
    ground_truth=["piano", "basketball"],
    rephrase_prompts=["Ray Charles is known for playing the", None],
    locality_inputs={
        "neighborhood": {"prompt": ["Joseph Fischhof, the", "Larry Bird is a professional"],
                         "ground_truth": ["piano", "basketball"]},
        "distracting": {"prompt": [None, ["Michael Jordan plays", "Tiger Woods plays"]],
                        "ground_truth": [None, ["basketball", "golf"]]},
    },
    portability_inputs={
        "subject_aliasing": {"prompt": ["The Genius plays the", ""], "ground_truth": ["violin", ""]},
    },
)


@pytest.fixture(scope="module")
def tok():
    return tiny_model("llama")[1]


# --------------------------------------------------------------------------------------------
# from_easyedit
# --------------------------------------------------------------------------------------------
def test_from_easyedit_keeps_everything_easyedit_carries():
    ray, grant = from_easyedit(**CALL)
    assert (ray.prompt, ray.subject, ray.target, ray.target_true) == ("{}, the", "Ray Charles", "violin", "piano")
    assert ray.text() == "Ray Charles, the"
    assert ray.paraphrases == ("Ray Charles is known for playing the",)
    assert ray.neighbourhood == ("Joseph Fischhof, the",)  # the None entry of the second group: nothing
    assert ray.neighbourhood_targets == ("piano",) and ray.neighbourhood_target == "piano"
    assert ray.portability == (("The Genius plays the", "violin"),)
    assert grant.prompt == "{} is a professional" and grant.paraphrases == ()
    # groups in order; several ground truths: per prompt, and no single neighbourhood_target
    assert grant.neighbourhood == ("Larry Bird is a professional", "Michael Jordan plays", "Tiger Woods plays")
    assert grant.neighbourhood_targets == ("basketball", "basketball", "golf")
    assert grant.neighbourhood_target is None
    assert grant.neighbourhood_answers() == ("basketball", "basketball", "golf")
    assert grant.portability == ()  # KnowEdit's "" placeholder: no entry


def test_from_easyedit_single_strings_and_defaults():
    (f,) = from_easyedit("The Eiffel Tower is in", "Rome", "The Eiffel Tower",
                         locality_inputs={"n": {"prompt": "The Louvre is in", "ground_truth": "Paris"}})
    assert f == Fact("{} is in", "The Eiffel Tower", "Rome")
    assert f.target_true is None and f.neighbourhood == ("The Louvre is in",) and f.neighbourhood_target == "Paris"


@pytest.mark.parametrize("changes, message", [
    (dict(target_new=["violin"]), "target_new holds 1 entries for 2 prompt"),
    (dict(subject=["Ray Charles"]), "subject holds 1 entries"),
    (dict(ground_truth=["piano", "basketball", "x"]), "ground_truth holds 3 entries"),
    (dict(rephrase_prompts=["a"]), "rephrase_prompts holds 1 entries"),
    (dict(subject=["Ray Charles", "Kobe"]), "subject 'Kobe' does not occur in prompt"),
    (dict(prompts=["{} plays the", "Grant Hill is a professional"]), "already holds '{}'"),
    (dict(prompts=[]), "prompts holds 0 entries|prompts is empty"),
    (dict(target_new=["violin", ["soccer", "football"]]), "has 2 answers"),
    (dict(locality_inputs={"n": {"prompt": ["a", "b", "c"], "ground_truth": ["x", "y", "z"]}}),
     r"locality_inputs\['n'\]\['prompt'\] holds 3 entries for 2"),
    (dict(locality_inputs={"n": {"prompt": ["a", "b"]}}), "with 'prompt' and 'ground_truth'"),
    (dict(locality_inputs={"n": {"prompt": ["a", "b"], "ground_truth": ["x", "y"], "weight": 2}}),
     r"unknown key\(s\) \['weight'\]"),
    (dict(locality_inputs={"n": {"prompt": ["a", "b"], "ground_truth": [["x", "x2"], "y"]}}),
     "aliases are not kept"),
    (dict(locality_inputs={"n": {"prompt": [["a", "b"], "c"], "ground_truth": [["x"], "y"]}}),
     "need a list of as many answers"),
    (dict(portability_inputs={"p": {"prompt": [None, "q"], "ground_truth": ["orphan", "a"]}}),
     "without a prompt"),
    (dict(portability_inputs={"p": {"prompt": ["q", "r"], "ground_truth": ["", "a"]}}), "non-empty string"),
    (dict(portability_inputs=[("q", "a")]), "must be a dict"),
    (dict(subject=None), "subject= is required"),
])
def test_from_easyedit_refuses_what_is_malformed_or_ambiguous(changes, message):
    with pytest.raises(FactError, match=message):
        from_easyedit(**{**CALL, **changes})


def test_from_easyedit_names_unknown_keyword_arguments():
    with pytest.raises(FactError, match=r"'sequential_edit', 'tokenzer'.*sequential_edit: rlsedit always edits "
                                        r"sequentially"):
        from_easyedit(**CALL, tokenzer=None, sequential_edit=True)


# --------------------------------------------------------------------------------------------
# Records: synonyms must agree, EasyEdit's keys are read, other keys are reported
# --------------------------------------------------------------------------------------------
def test_target_and_target_new_must_agree():
    with pytest.raises(FactError, match=r"target='Rome' and target_new='Paris' disagree"):
        as_fact({"prompt": "{} is in", "subject": "The Louvre", "target": "Rome", "target_new": "Paris"})
    same = as_fact({"prompt": "{} is in", "subject": "The Louvre", "target": "Rome", "target_new": " Rome"})
    assert same.target == "Rome"
    with pytest.raises(FactError, match=r"target_true='Paris' and ground_truth='Lyon' disagree"):
        as_fact({"prompt": "{} is in", "subject": "The Louvre", "target": "Rome", "target_true": "Paris",
                 "ground_truth": "Lyon"})
    with pytest.raises(FactError, match="prompt=.* and prompts=.* disagree"):
        as_fact({"prompt": "{} is in", "prompts": ["{} lies in"], "subject": "The Louvre", "target": "Rome"})


def test_an_easyedit_request_record_keeps_locality_portability_and_rephrases():
    """A request as EasyEdit's ``_prepare_requests`` builds it (one fact)."""
    rec = {"prompt": "Ray Charles, the", "target_new": "violin", "ground_truth": "piano", "subject": "Ray Charles",
           "rephrase_prompt": "Ray Charles is known for playing the",
           "locality": {"neighborhood": {"prompt": "Joseph Fischhof, the", "ground_truth": "piano"},
                        "other": {"prompt": ["Tiger Woods plays", "Larry Bird plays"],
                                  "ground_truth": ["golf", "basketball"]}},
           "portability": {"alias": {"prompt": "The Genius plays the", "ground_truth": "violin"}}}
    f = as_fact(rec)
    assert (f.prompt, f.target, f.target_true) == ("{}, the", "violin", "piano")
    assert f.paraphrases == ("Ray Charles is known for playing the",)
    assert f.neighbourhood == ("Joseph Fischhof, the", "Tiger Woods plays", "Larry Bird plays")
    assert f.neighbourhood_targets == ("piano", "golf", "basketball") and f.neighbourhood_target is None
    assert f.portability == (("The Genius plays the", "violin"),)


def test_a_knowedit_record_reads_its_grouped_lists():
    """KnowEdit stores each group as a list of {prompt, ground_truth} with nested answer lists."""
    rec = {"subject": "Lahti Town Hall", "prompt": "The architect of Lahti Town Hall is",
           "target_new": "Aki Kaurismaki", "ground_truth": "Eliel Saarinen",
           "locality": {"Relation_Specificity": [{"prompt": "The place of birth of Eliel Saarinen is",
                                                  "ground_truth": [["Rantasalmi"]]}]},
           "portability": {"Reasoning": [{"prompt": "The architect of Lahti Town Hall was born in",
                                          "ground_truth": [["Helsinki"]]}],
                           "Subject_Aliasing": [{"prompt": "The architect of Lahti City Hall is",
                                                 "ground_truth": ["Aki Kaurismaki"]}]}}
    f = as_fact(rec)
    assert f.neighbourhood == ("The place of birth of Eliel Saarinen is",) and f.neighbourhood_target == "Rantasalmi"
    assert f.portability == (("The architect of Lahti Town Hall was born in", "Helsinki"),
                             ("The architect of Lahti City Hall is", "Aki Kaurismaki"))
    with pytest.raises(FactError, match="aliases are not kept"):
        as_fact({**rec, "portability": {"R": [{"prompt": "q", "ground_truth": [["Helsinki", "Helsingfors"]]}]}})


def test_plural_record_keys_and_locality_lists():
    rec = {"prompts": ["The mother tongue of Danielle Darrieux is"], "subject": "Danielle Darrieux",
           "target_news": ["English"], "ground_truth": ["French"],
           "rephrase_prompts": ["Danielle Darrieux speaks", "Danielle Darrieux was born speaking"],
           "locality_prompt": ["Michel Rocard is a native speaker of", "Angela Merkel speaks"],
           "locality_ground_truth": ["French", "German"]}
    f = as_fact(rec)
    assert (f.prompt, f.target, f.target_true) == ("The mother tongue of {} is", "English", "French")
    assert f.paraphrases == ("Danielle Darrieux speaks", "Danielle Darrieux was born speaking")
    assert f.neighbourhood_targets == ("French", "German") and f.neighbourhood_target is None
    with pytest.raises(FactError, match=r"'target_news' holds 2 values"):
        as_fact({**rec, "target_news": ["English", "German"]})
    with pytest.raises(FactError, match="need a list of as many answers"):
        as_fact({**rec, "locality_ground_truth": ["French"]})


def test_prompt_lists_under_several_keys_are_all_kept():
    f = as_fact({"prompt": "{} is in", "subject": "The Louvre", "target": "Rome", "target_true": "Paris",
                 "paraphrases": ["a"], "rephrase_prompt": "b", "neighbourhood": ["c"],
                 "locality": {"g": {"prompt": "d", "ground_truth": "Berlin"}},
                 "attribute_prompts": ["e"], "generation_prompts": ["f"]})
    assert f.paraphrases == ("a", "b") and (f.attribute_prompts, f.generation_prompts) == (("e",), ("f",))
    # "c" has no answer of its own: it keeps target_true, "d" keeps its own
    assert f.neighbourhood == ("c", "d") and f.neighbourhood_targets == ("Paris", "Berlin")
    with pytest.raises(FactError, match="have no answer while other locality prompts have one"):
        as_fact({"prompt": "{} is in", "subject": "The Louvre", "target": "Rome", "neighbourhood": ["c"],
                 "locality": {"g": {"prompt": "d", "ground_truth": "Berlin"}}})
    with pytest.raises(FactError, match="contradicts the locality answers"):
        as_fact({"prompt": "{} is in", "subject": "The Louvre", "target": "Rome", "neighbourhood_target": "Paris",
                 "locality": {"g": {"prompt": "d", "ground_truth": "Berlin"}}})


def test_call_form_dicts():
    facts = as_facts(CALL)  # a dict of EasyEdit's keyword arguments: its facts
    assert facts == from_easyedit(**CALL)
    with pytest.raises(FactError, match="call form with 2 facts"):
        as_fact(CALL)
    one = {k: (v[:1] if isinstance(v, list) else v) for k, v in CALL.items() if k in ("prompts", "target_new",
                                                                                      "subject")}
    one["locality_inputs"] = {"n": {"prompt": ["Joseph Fischhof, the"], "ground_truth": ["piano"]}}
    assert as_fact(one).neighbourhood_targets == ("piano",)


def test_unknown_record_keys_are_warned_once_per_call(caplog):
    recs = [{"prompt": "{} is in", "subject": "The Louvre", "target": "Rome", "taget_true": "Paris", "note": 1},
            {"prompt": "{} is in", "subject": "The Colosseum", "target": "Paris", "note": 2,
             "locality": {"g": [{"prompt": "q", "ground_truth": "a", "cond": "x"}]}}]
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        facts = as_facts(recs)
    warnings = [r for r in caplog.records if r.name == LOGGER]
    assert len(facts) == 2 and len(warnings) == 1
    message = warnings[0].getMessage()
    assert "'note' (2 records)" in message and "'taget_true' (1 record)" in message
    assert "'locality.g.cond' (1 record)" in message
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        as_fact(recs[0])
        as_facts([{"case_id": 0, "prompt": "The mother tongue of Danielle Darrieux is", "target_new": "English",
                   "subject": "Danielle Darrieux", "ground_truth": "French", "rephrase_prompt": "x",
                   "locality_prompt": "Michel Rocard is a native speaker of", "locality_ground_truth": "French"}])
    assert [r.getMessage().count("'note'") for r in caplog.records if r.name == LOGGER] == [1]  # simplified CF: none


# --------------------------------------------------------------------------------------------
# The new Fact fields
# --------------------------------------------------------------------------------------------
def test_new_fact_fields_are_checked_and_survive_json():
    f = Fact("{} is in", "The Louvre", "Rome", neighbourhood=["a", "b"], neighbourhood_targets=["x", "y"],
             portability=[["q", "r"]])
    assert f.neighbourhood_targets == ("x", "y") and f.portability == (("q", "r"),)
    assert f == Fact("{} is in", "The Louvre", "Rome")  # not part of identity
    again = Fact(**json.loads(json.dumps(dataclasses.asdict(f))))  # the journal's round trip
    assert dataclasses.asdict(again) == dataclasses.asdict(f) and again.portability == (("q", "r"),)
    assert as_fact(dataclasses.asdict(f)).neighbourhood_targets == ("x", "y")
    assert Fact("{} is", "A", "B", target_true="C", neighbourhood=["a"]).neighbourhood_answers() == ("C",)
    with pytest.raises(FactError, match="holds 1 answer"):
        Fact("{} is", "A", "B", neighbourhood=["a", "b"], neighbourhood_targets=["x"])
    with pytest.raises(FactError, match="contradicts"):
        Fact("{} is", "A", "B", neighbourhood=["a"], neighbourhood_target="y", neighbourhood_targets=["x"])
    with pytest.raises(FactError, match=r"\(prompt, answer\) pairs"):
        Fact("{} is", "A", "B", portability=[("q", "r", "s")])
    with pytest.raises(FactError, match=r"\(prompt, answer\) pairs"):
        Fact("{} is", "A", "B", portability="q")


def test_validation_checks_the_new_fields(tok):
    validate_facts(from_easyedit(**CALL), tok)
    with pytest.raises(FactError, match="portability must hold"):
        validate_facts([Fact("{} is", "A", "B", portability=[("q", 3)])], tok)
    with pytest.raises(FactError, match="neighbourhood_targets holds an invalid character"):
        validate_facts([Fact("{} is", "A", "B", neighbourhood=["a"], neighbourhood_targets=["x\ud800"])], tok)


# --------------------------------------------------------------------------------------------
# The one-call API
# --------------------------------------------------------------------------------------------
TINY_CALL = dict(prompts=["we saw the old cat", "they sold the long table"], target_new=["paris", "wood"],
                 subject=["the old cat", "the long table"], ground_truth=["rome", "glass"],
                 locality_inputs={"n": {"prompt": ["we saw the dog", "they sold a car"],
                                        "ground_truth": ["here", "there"]}},
                 portability_inputs={"p": {"prompt": ["the old cat was seen in", None],
                                           "ground_truth": ["paris", None]}})


def _edited(model, editor):
    return {l: read_weight(get_module(model, editor.spec_.edit_module_path.format(l))).clone() for l in editor.layers_}


def test_edit_takes_easyedit_keywords_like_the_facts_they_convert_to(tiny, stats_dir, tmp_path):
    model, tok = tiny("llama", init_std=0.3)
    twin, _ = tiny("llama", init_std=0.3)
    config = small_config(stats_dir)
    report = rlsedit_llm.edit(model, tokenizer=tok, config=config, **TINY_CALL)
    expected = rlsedit_llm.edit(twin, from_easyedit(**TINY_CALL), tokenizer=tok, config=config)
    editor = rlsedit_llm.editor_of(model)
    assert [r.fact for r in report.facts] == [r.fact for r in expected.facts] == from_easyedit(**TINY_CALL)
    mine, theirs = _edited(model, editor), _edited(twin, rlsedit_llm.editor_of(twin))
    assert all(torch.equal(mine[l], theirs[l]) for l in mine)
    journalled = editor.journal_[0].facts[0]
    assert journalled.portability == (("the old cat was seen in", "paris"),)
    assert journalled.neighbourhood_targets == ("here",)
    editor.save(tmp_path / "state")  # the new fields go through the saved journal
    model2, _ = tiny("llama", init_std=0.3)
    loaded = rlsedit_llm.Editor.load(model2, tok, tmp_path / "state")
    assert dataclasses.asdict(loaded.journal_[0].facts[1]) == dataclasses.asdict(editor.journal_[0].facts[1])


@pytest.mark.parametrize("call, message", [
    (dict(facts=[{"prompt": "{} is", "subject": "we", "target": "paris"}], **TINY_CALL), "not both"),
    (dict(prompts=["we saw the old cat"], target_new=["paris"]), "missing: subject"),
    ({}, "no facts given"),
    (dict(facts=[{"prompt": "{} is", "subject": "we", "target": "paris"}], tokenzer=None),
     r"unknown keyword argument\(s\) 'tokenzer' for rlsedit_llm.edit"),
    (dict(**TINY_CALL, sequential_edit=True), "rlsedit always edits sequentially"),
])
def test_edit_refuses_an_ambiguous_call_before_any_model_work(tiny, stats_dir, call, message):
    model, tok = tiny("llama", init_std=0.3)
    before = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(FactError, match=message):
        rlsedit_llm.edit(model, tokenizer=tok, config=small_config(stats_dir), **call)
    assert rlsedit_llm.editor_of(model) is None
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


# --------------------------------------------------------------------------------------------
# Portability accuracy
# --------------------------------------------------------------------------------------------
def _argmax_accuracy(model, tok, prompt: str, answer: str) -> float:
    """An independent reading: the full forward pass over prompt + answer tokens, argmax per position."""
    p = encode_prompt(tok, prompt, bos=needs_bos(model))
    a = encode_target(tok, answer)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([p + a])).logits[0]
    predicted = logits[len(p) - 1:len(p) + len(a) - 1].argmax(-1).tolist()
    return sum(x == y for x, y in zip(predicted, a, strict=True)) / len(a)


def test_portability_accuracy_is_easyedits_teacher_forced_token_accuracy(tiny):
    model, tok = tiny("llama", init_std=0.3)
    pairs = [("we saw the old cat in", "paris and rome"), ("the capital of France is", "Paris"),
             ("I think you should read the", "book")]
    facts = [Fact("we saw {}", "the old cat", "paris", portability=pairs[:2]), Fact("{} is", "B", "c"),
             Fact("they sold {}", "the long table", "wood", portability=pairs[2:])]
    expected = [_argmax_accuracy(model, tok, p, a) for p, a in pairs]
    assert pair_accuracies(model, tok, pairs, batch_size=2) == pytest.approx(expected)
    got = portability_accuracy(model, tok, facts)
    assert got[0] == pytest.approx((expected[0] + expected[1]) / 2) and math.isnan(got[1])
    assert got[2] == pytest.approx(expected[2])
    assert pair_accuracies(model, tok, []) == []
    with pytest.raises(FactError, match="is empty"):
        pair_accuracies(model, tok, [("q", " ")])
