"""Did the edit take? Per-fact success (top-1, teacher forced), the warning for facts that did not
take, honest summary numbers, per-fact weights (weighted least squares by row scaling) and the
in-call retry, on tiny random models."""

from __future__ import annotations

import dataclasses
import logging
import math

import numpy as np
import pytest
import torch

from rlsedit_llm.editing import editor as editor_module
from rlsedit_llm.editing.config import EditConfig
from rlsedit_llm.editing.editor import Editor
from rlsedit_llm.editing.finetune import FineTuneEditor, target_nll
from rlsedit_llm.editing.reports import EditReport, FactReport
from rlsedit_llm.editing.ultraedit import RunningMoments, UltraEditor, ultraedit_shift
from rlsedit_llm.errors import FactError, HyperparameterError
from rlsedit_llm.pipeline import scoring
from rlsedit_llm.pipeline.facts import Fact, as_fact, encode_target
from rlsedit_llm.pipeline.tokens import encode_prompt, needs_bos
from rlsedit_theory import Problem, closed_form
from tests.helpers import random_model_config

pytestmark = pytest.mark.usefixtures("one_thread_unless_slow")

# Random tiny models carry little through attention, so the subject ends the prompt here. The
# targets of FACTS are single tokens of the tiny tokenizer; MULTI's is two tokens long (success
# needs every one to be the argmax), and on the tiny llama its value never gets there.
FACTS = [
    Fact("we saw {}", "the old cat", "Paris"),
    Fact("we met {}", "the tall man", "Japan"),
]
MULTI = Fact("they sold {}", "the long table", "Tokyo")


def _strong(stats_dir, **changes) -> EditConfig:
    """Edits that take on a tiny random model (light anchor N = 1, many value steps)."""
    return random_model_config(stats_dir, **changes)


def _weak(stats_dir, **changes) -> EditConfig:
    """Edits that move the targets but leave them short of the top: a heavier anchor (N = 300)
    absorbs little of each key (the write leaves most of the residual)."""
    return random_model_config(stats_dir, mom2_weight=300.0, **changes)


def _hand_argmax(model, tok, prompt: str, target: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(argmax tokens, target tokens) at the target's positions after the filled ``prompt``: one
    plain forward of prompt + target, teacher forced, computed here without the library's scorer."""
    p = encode_prompt(tok, prompt, bos=needs_bos(model))
    t = encode_target(tok, target)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([p + t])).logits[0]
    return logits[len(p) - 1: len(p) + len(t) - 1].argmax(-1), torch.tensor(t)


def _state(editor: Editor) -> dict:
    """The model's parameters and the editor's solver state and journal, copied."""
    return {"params": {n: p.detach().clone() for n, p in editor.model.named_parameters()},
            "solvers": {l: {k: v.clone() for k, v in s.state_dict(snapshot=False)["tensors"].items()}
                        for l, s in editor.solvers_.items()},
            "journal": [(r.edit_id, list(r.facts)) for r in editor.journal_], "next": editor.next_id_}


def _same(a: dict, b: dict) -> bool:
    return (a["journal"] == b["journal"] and a["next"] == b["next"]
            and all(torch.equal(a["params"][n], b["params"][n]) for n in a["params"])
            and a["solvers"].keys() == b["solvers"].keys()
            and all(torch.equal(a["solvers"][l][k], b["solvers"][l][k]) for l in a["solvers"] for k in a["solvers"][l]))


@pytest.fixture
def primed(tiny, stats_dir):
    """A tiny llama with one weak edit already in the stream, and that state (to edit from it again)."""
    def make(config: EditConfig):
        model, tok = tiny("llama", init_std=0.3)
        editor = Editor(model, tok, config)
        editor.edit([Fact("we found {}", "the red door", "Germany")])
        return model, tok, editor, editor.state_dict()
    return make


# -- success, the summary numbers and the warning ------------------------------------------------

def test_success_is_the_teacher_forced_argmax_of_every_target_token(tiny, stats_dir):
    """Against a hand-computed argmax, for edits that take and edits that do not, single- and
    multi-token targets."""
    verdicts = []
    for config in (_strong(stats_dir), _weak(stats_dir)):
        model, tok = tiny("llama", init_std=0.3)
        assert len(encode_target(tok, MULTI.target)) > 1
        report = Editor(model, tok, config).edit([*FACTS, MULTI])
        for r in report.facts:
            argmax, target = _hand_argmax(model, tok, r.fact.text(), r.fact.target)
            assert r.success == bool((argmax == target).all()), str(report)
            assert r.rewrite_acc == pytest.approx(float((argmax == target).float().mean()))
            assert r.rephrase_acc is None and r.locality_acc is None  # plain facts: not computed
            assert r.residual_share == pytest.approx(r.residual_after / r.residual_before)
            verdicts.append(r.success)
        assert report.success_rate == sum(r.success for r in report.facts) / 3
        assert report.failed == [r for r in report.facts if not r.success]
    assert True in verdicts and False in verdicts  # both verdicts were checked


def test_a_fact_that_does_not_take_is_warned_about_and_listed(tiny, stats_dir, caplog):
    model, tok = tiny("llama", init_std=0.3)
    with caplog.at_level(logging.WARNING, logger="rlsedit_llm.editing.editor"):
        report = Editor(model, tok, _weak(stats_dir)).edit(FACTS)
    assert report.failed, str(report)
    warnings = [r for r in caplog.records if r.name == "rlsedit_llm.editing.editor" and r.levelno == logging.WARNING]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    for r in report.failed:
        assert repr(r.fact.text()) in message and repr(r.fact.target) in message
    assert "did not take" in message and "weight" in message and "value steps" in message and "spelling" in message
    assert str(report).count("DID NOT TAKE") == len(report.failed)
    assert "success" in str(report) and "share" in str(report)


def test_the_warning_points_at_a_subject_that_is_the_prompts_first_token(tiny, stats_dir, caplog):
    """Without BOS, a one-token subject at the start of the prompt is read at position 0 (on
    SmolLM2 such an edit does not take in that prompt whatever its weight,
    benchmarks/hard_edits.py): the warning says so for that fact only."""
    model, tok = tiny("llama", init_std=0.3)
    first = Fact("{} saw the old cat", "I", "Paris")
    with caplog.at_level(logging.WARNING, logger="rlsedit_llm.editing.editor"):
        report = Editor(model, tok, _weak(stats_dir)).edit([first, FACTS[1]])
    assert len(report.failed) == 2, str(report)
    message = next(r.getMessage() for r in caplog.records if r.name == "rlsedit_llm.editing.editor")
    assert message.count("the subject is the prompt's first token") == 1
    assert message.index("the subject is the prompt's first token") < message.index(repr(FACTS[1].text()))
    assert "put words before the subject" in message


def test_no_warning_when_every_fact_takes(tiny, stats_dir, caplog):
    model, tok = tiny("llama", init_std=0.3)
    with caplog.at_level(logging.WARNING, logger="rlsedit_llm.editing.editor"):
        report = Editor(model, tok, _strong(stats_dir)).edit(FACTS)
    assert report.success_rate == 1.0 and report.failed == [], str(report)
    assert not [r for r in caplog.records if r.name == "rlsedit_llm.editing.editor" and r.levelno >= logging.WARNING]


def test_improved_is_not_success(tiny, stats_dir):
    """A weak edit raises every target's probability without making it the top-1: ``improved``
    (the old ``efficacy``) says 1, ``success_rate`` says 0."""
    model, tok = tiny("llama", init_std=0.3)
    report = Editor(model, tok, _weak(stats_dir)).edit(FACTS)
    assert all(r.prob_after > r.prob_before for r in report.facts), str(report)
    assert report.improved == 1.0
    assert report.success_rate == 0.0 and len(report.failed) == len(FACTS), str(report)


def test_efficacy_is_a_deprecated_alias_of_improved():
    facts = [FactReport(FACTS[0], 0.1, 0.2, 1.0, 0.5, success=False),
             FactReport(FACTS[1], 0.3, 0.2, 1.0, 0.5, success=True)]
    report = EditReport(0, (1,), facts)
    assert report.improved == 0.5 and report.success_rate == 0.5 and report.failed == [facts[0]]
    with pytest.warns(DeprecationWarning, match="improved"):
        assert report.efficacy == report.improved


def test_easyedit_accuracies_only_for_facts_that_carry_their_prompts(tiny, stats_dir, monkeypatch):
    """rephrase / locality accuracy by hand; a plain fact costs one scoring pass before and one
    after the write, of its rewrite prompt alone."""
    model, tok = tiny("llama", init_std=0.3)
    rich = dataclasses.replace(FACTS[0], paraphrases=("we once saw the old cat", "you saw the old cat"),
                               neighbourhood=("we saw the young dog", "they sold the chair"),
                               neighbourhood_target="Tokyo")
    nb_tokens = encode_target(tok, "Tokyo")
    base = {p: _hand_argmax(model, tok, p, "Tokyo")[0] for p in rich.neighbourhood}
    calls = []
    real = scoring.score_targets

    def counting(model_, tok_, prompts, targets, **kw):
        calls.append(len(prompts))
        return real(model_, tok_, prompts, targets, **kw)

    monkeypatch.setattr(editor_module, "score_targets", counting)
    editor = Editor(model, tok, _strong(stats_dir))
    report = editor.edit([rich, FACTS[1]])
    assert calls == [1 + 2 + 1, 1 + 2 + 2 + 1]  # before: rewrites + neighbourhood; after: + paraphrases
    r_rich, r_plain = report.facts
    assert r_plain.rephrase_acc is None and r_plain.locality_acc is None
    accs = []
    for p in rich.paraphrases:
        argmax, target = _hand_argmax(model, tok, p, rich.target)
        accs.append(float((argmax == target).float().mean()))
    assert r_rich.rephrase_acc == pytest.approx(sum(accs) / len(accs))
    same = total = 0
    for p in rich.neighbourhood:
        after = _hand_argmax(model, tok, p, "Tokyo")[0]
        same += int((after == base[p]).sum())
        total += len(nb_tokens)
    assert r_rich.locality_acc == pytest.approx(same / total)

    calls.clear()
    editor.edit([Fact("we found {}", "the red door", "Germany")])
    assert calls == [1, 1]  # a plain fact: nothing but its rewrite prompt, before and after



def test_portability_accuracy_by_hand_and_accuracies_can_be_switched_off(tiny, stats_dir, monkeypatch):
    """A fact's portability pairs are scored after the write (EasyEdit's token accuracy, by hand);
    with ``report_accuracies=False`` only the rewrite prompts are scored, before and after."""
    model, tok = tiny("llama", init_std=0.3)
    rich = dataclasses.replace(FACTS[0], paraphrases=("we once saw the old cat",),
                               neighbourhood=("we saw the young dog",), neighbourhood_target="Tokyo",
                               portability=(("they met the old cat in", "Paris"), ("we sold the old cat to", "Japan")))
    editor = Editor(model, tok, _strong(stats_dir))
    report = editor.edit([rich])
    accs = []
    for prompt, answer in rich.portability:
        argmax, target = _hand_argmax(model, tok, prompt, answer)
        accs.append(float((argmax == target).float().mean()))
    assert report.facts[0].portability_acc == pytest.approx(sum(accs) / len(accs))
    assert "portability acc" in str(report)

    calls = []
    real = scoring.score_targets

    def counting(model_, tok_, prompts, targets, **kw):
        calls.append(len(prompts))
        return real(model_, tok_, prompts, targets, **kw)

    monkeypatch.setattr(editor_module, "score_targets", counting)
    quiet = Editor(*tiny("llama", init_std=0.3), _strong(stats_dir, report_accuracies=False))
    r = quiet.edit([rich, FACTS[1]]).facts[0]
    assert calls == [2, 2]  # the two rewrite prompts, before and after; nothing else
    assert r.rephrase_acc is None and r.locality_acc is None and r.portability_acc is None
    with pytest.raises(HyperparameterError, match="report_accuracies"):
        Editor(*tiny("llama"), _strong(stats_dir, report_accuracies="no"))


# -- weights -------------------------------------------------------------------------------------

@pytest.mark.parametrize("weight", [0, -1.0, float("nan"), float("inf"), True, "2", None])
def test_bad_weights_are_refused_and_change_nothing(primed, stats_dir, weight):
    model, tok, editor, _ = primed(_weak(stats_dir))
    before = _state(editor)
    with pytest.raises(FactError, match="weight"):
        editor.edit([dataclasses.replace(FACTS[0], weight=weight)])
    with pytest.raises(FactError, match="weight"):
        editor.edit([{"prompt": "we saw {}", "subject": "the old cat", "target": "Paris", "weight": weight}])
    assert _same(before, _state(editor))
    assert as_fact({"prompt": "we saw {}", "subject": "x", "target": "y", "weight": 2.5}).weight == 2.5
    assert as_fact({"src": "Who is x?", "subject": "x", "alt": "y", "weight": 3}).weight == 3


@pytest.mark.parametrize("value", [1, 1.0, 0.5, 0, -2, float("nan"), float("inf"), True, "5"])
def test_bad_retry_weights_are_refused(stats_dir, value):
    with pytest.raises(HyperparameterError, match="retry_weight"):
        EditConfig(retry_weight=value).validate()
    EditConfig(retry_weight=1.5).validate()


def test_weight_lowers_the_facts_residual_and_scales_its_rows(primed, stats_dir):
    """Same model, same state: the fact's post-write residual falls as its weight grows; the
    journal holds its rows scaled by sqrt(weight), and the weights are the exact minimiser of the
    weighted cumulative objective (the closed form over the journal's rows)."""
    model, tok, editor, base = primed(_weak(stats_dir))
    reports, records = {}, {}
    for w in (1.0, 10.0):
        ed = Editor.from_state_dict(model, tok, base, take_over=True)
        reports[w] = ed.edit([dataclasses.replace(FACTS[0], weight=w), FACTS[1]])
        records[w] = ed.journal_[-1]
        assert ed.journal_[-1].facts[0].weight == w and reports[w].facts[0].weight == w
        for layer, s in ed.solvers_.items():
            problem = Problem(s.W0_.numpy(), s.alpha, s.beta, gram0=s.gram0_.numpy())
            exact = closed_form(problem, [(r.keys[layer].numpy(), r.values[layer].numpy()) for r in ed.journal_])
            np.testing.assert_allclose(s.W_.numpy(), exact, rtol=0, atol=1e-8 * float(s.W_.abs().max()))
    light, heavy = reports[1.0].facts[0], reports[10.0].facts[0]
    assert heavy.residual_before == pytest.approx(light.residual_before)
    assert heavy.residual_after < 0.8 * light.residual_after, (str(reports[1.0]), str(reports[10.0]))
    assert heavy.prob_after > light.prob_after
    first = editor.layers_[0]  # keys of the first layer are read before any write: the same up to the scale
    torch.testing.assert_close(records[10.0].keys[first][0], math.sqrt(10.0) * records[1.0].keys[first][0])
    torch.testing.assert_close(records[10.0].keys[first][1], records[1.0].keys[first][1])


def test_weights_survive_save_and_load_and_undo_stays_exact(primed, stats_dir, tmp_path):
    model, tok, editor, _ = primed(_weak(stats_dir))
    after_first = {l: (s.W_.clone(), s.C_.clone()) for l, s in editor.solvers_.items()}
    report = editor.edit([dataclasses.replace(FACTS[0], weight=7.0)])
    editor.save(tmp_path / "state")
    loaded = Editor.load(model, tok, tmp_path / "state", take_over=True)
    assert loaded.journal_[-1].facts[0].weight == 7.0
    for layer in loaded.layers_:
        assert torch.equal(loaded.journal_[-1].keys[layer], editor.journal_[-1].keys[layer])
    loaded.undo(report.edit_id)
    for layer, s in loaded.solvers_.items():
        W, C = after_first[layer]
        torch.testing.assert_close(s.W_, W, rtol=0, atol=1e-9 * float(W.abs().max()))
        torch.testing.assert_close(s.C_, C, rtol=0, atol=1e-9 * float(C.abs().max()))


@pytest.mark.parametrize("method", ["memit", "memit_seq", "alphaedit", "encore"])
def test_every_layer_solver_gets_the_scaled_rows(primed, stats_dir, method):
    """Each method's write with a weighted fact equals its write of the rows scaled by hand."""
    model, tok, _, _ = primed(_weak(stats_dir))
    config = _weak(stats_dir, method=method)
    ed = Editor(model, tok, config, take_over=True)
    ed.prepare()
    base = ed.state_dict()
    heavy = ed.edit([dataclasses.replace(FACTS[0], weight=9.0)])
    rows = ed.journal_[-1]
    W_weighted = {l: s.W_.clone() for l, s in ed.solvers_.items()}
    plain = Editor.from_state_dict(model, tok, base, take_over=True)
    plain.edit([FACTS[0]])
    assert heavy.facts[0].weight == 9.0
    first = plain.layers_[0]
    torch.testing.assert_close(rows.keys[first], 3.0 * plain.journal_[-1].keys[first])
    # the write of the scaled rows, replayed through absorb on the base state, is the weighted write
    again = Editor.from_state_dict(model, tok, base, take_over=True)
    again.absorb([FACTS[0]], rows.keys, rows.values)
    for l, s in again.solvers_.items():
        torch.testing.assert_close(s.W_, W_weighted[l], rtol=0, atol=1e-9 * float(s.W_.abs().max()))


# -- retry ---------------------------------------------------------------------------------------

def test_retry_resolves_the_failed_facts_with_a_higher_weight_in_the_same_call(primed, stats_dir):
    """The retried facts are marked, carry weight x retry_weight, and the call's result equals an
    edit made with those weights from the same state (one write, one journal entry)."""
    model, tok, editor, base = primed(_weak(stats_dir))
    first = editor.edit(FACTS)  # without retry: which facts fail
    failed = [j for j, r in enumerate(first.facts) if not r.success]
    assert failed, str(first)

    ed = Editor.from_state_dict(model, tok, base, take_over=True)
    ed.config = dataclasses.replace(ed.config, retry_weight=50.0)
    n_journal = len(ed.journal_)
    report = ed.edit(FACTS)
    assert [r.retried for r in report.facts] == [j in failed for j in range(len(FACTS))]
    assert [r.weight for r in report.facts] == [50.0 if j in failed else 1.0 for j in range(len(FACTS))]
    assert [f.weight for f in ed.journal_[-1].facts] == [r.weight for r in report.facts]
    assert len(ed.journal_) == n_journal + 1 and report.edit_id == first.edit_id
    assert sum(r.success for r in report.facts) > sum(r.success for r in first.facts), str(report)
    assert "retried" in str(report)

    direct = Editor.from_state_dict(model, tok, base, take_over=True)
    direct.edit([dataclasses.replace(f, weight=50.0) if j in failed else f for j, f in enumerate(FACTS)])
    for layer, s in ed.solvers_.items():
        torch.testing.assert_close(s.W_, direct.solvers_[layer].W_, rtol=0, atol=1e-12 * float(s.W_.abs().max()))
        torch.testing.assert_close(s.C_, direct.solvers_[layer].C_, rtol=0, atol=1e-12 * float(s.C_.abs().max()))


def test_a_failure_during_the_retry_changes_nothing(primed, stats_dir, monkeypatch):
    model, tok, editor, _ = primed(_weak(stats_dir, retry_weight=50.0))
    before = _state(editor)
    real = Editor._outcome
    seen = []

    def second_fails(self, *args, **kwargs):
        seen.append(1)
        if len(seen) == 2:  # the retry's outcome
            raise RuntimeError("injected")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Editor, "_outcome", second_fails)
    with pytest.raises(RuntimeError, match="injected"):
        editor.edit(FACTS)
    assert len(seen) == 2 and _same(before, _state(editor))
    monkeypatch.setattr(Editor, "_outcome", real)
    editor.check_model()
    assert editor.edit(FACTS).edit_id == before["next"]


# -- editor-level methods ------------------------------------------------------------------------

def test_finetuning_weighs_each_facts_loss(tiny):
    model, tok = tiny("llama", init_std=0.3)
    prompts, targets = [f.text() for f in FACTS], [f.target for f in FACTS]
    with torch.no_grad():
        each = [float(target_nll(model, tok, [p], [t])) for p, t in zip(prompts, targets, strict=True)]
        assert float(target_nll(model, tok, prompts, targets, [3.0, 0.5])) == \
            pytest.approx((3.0 * each[0] + 0.5 * each[1]) / 2, rel=1e-5)
    saved = {n: p.detach().clone() for n, p in model.named_parameters()}

    def run(weights):
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(saved[n])
        ft = FineTuneEditor(model, tok, lr=1e-2, steps=4)
        report = ft.edit([dataclasses.replace(f, weight=w) for f, w in zip(FACTS, weights, strict=True)])
        return report, {l: W.clone() for l, W in ft.weights().items()}

    plain, W_plain = run((1.0, 1.0))
    heavy, W_heavy = run((20.0, 1.0))
    assert [r.weight for r in heavy.facts] == [20.0, 1.0]
    assert any(not torch.equal(W_plain[l], W_heavy[l]) for l in W_plain)
    assert heavy.facts[0].prob_after > plain.facts[0].prob_after
    assert heavy.facts[1].prob_after < plain.facts[1].prob_after
    assert all(isinstance(r.success, bool) for r in heavy.facts) and math.isnan(heavy.facts[0].residual_share)


def test_ultraedit_weighs_each_facts_rows(tiny):
    torch.manual_seed(0)
    K, G = torch.randn(5, 8, dtype=torch.float64), torch.randn(5, 6, dtype=torch.float64)
    moments = RunningMoments(14)
    moments.update(torch.cat([K, G], dim=1))
    w = torch.tensor([1.0, 4.0, 4.0, 0.5, 1.0], dtype=torch.float64)
    delta = ultraedit_shift(K, G, moments, lr=0.1, ridge=1.0, weights=w)
    z = moments.normalise(torch.cat([K, G], dim=1))
    V = -0.1 * z[:, :8].square().sum(1, keepdim=True) * z[:, 8:]
    expected = torch.linalg.solve(K.mT @ torch.diag(w) @ K + torch.eye(8, dtype=K.dtype), K.mT @ torch.diag(w) @ V)
    torch.testing.assert_close(delta, expected)
    assert torch.equal(ultraedit_shift(K, G, moments, lr=0.1, ridge=1.0, weights=torch.ones(5, dtype=K.dtype)),
                       ultraedit_shift(K, G, moments, lr=0.1, ridge=1.0))

    model, tok = tiny("llama", init_std=0.3)
    saved = {n: p.detach().clone() for n, p in model.named_parameters()}

    def run(weights):
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(saved[n])
        ue = UltraEditor(model, tok, lr=1e-2)
        report = ue.edit([dataclasses.replace(f, weight=w) for f, w in zip(FACTS, weights, strict=True)])
        return report, {l: W.clone() for l, W in ue.weights().items()}

    plain, W_plain = run((1.0, 1.0))
    heavy, W_heavy = run((25.0, 1.0))
    assert [r.weight for r in heavy.facts] == [25.0, 1.0]
    assert any(not torch.equal(W_plain[l], W_heavy[l]) for l in W_plain)
    assert heavy.facts[0].prob_after > plain.facts[0].prob_after


def test_an_exception_anywhere_in_an_edit_with_a_retry_completes_it_or_changes_nothing(stats_dir):
    """The reliability sweep (tests/reliability) on the retry path: an exception injected at the
    first and last pass of every line of the editor and transaction code that an edit with a retry
    runs leaves the state exactly as before the call or exactly as after it."""
    from tests.helpers import FIRST, NEXT, small_config
    from tests.reliability.conftest import copied
    from tests.reliability.injection import Injected, Injector

    def state(ed):
        s = ed.state_dict()
        for entry in s["journal"]:
            entry.pop("created")
        return {"params": {n: p.detach().clone() for n, p in ed.model.named_parameters()}, "state": copied(s)}

    def equal(a, b) -> bool:
        if isinstance(a, torch.Tensor):
            return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
        if isinstance(a, dict):
            return isinstance(b, dict) and a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)
        if isinstance(a, (list, tuple)):
            return type(a) is type(b) and len(a) == len(b) and all(equal(u, v) for u, v in zip(a, b, strict=True))
        return a == b

    from rlsedit_llm.adapters.tiny import tiny_model

    model, tok = tiny_model("llama")
    editor = Editor(model, tok, small_config(stats_dir, retry_weight=50.0))
    editor.edit(FIRST)
    base, before = editor.state_dict(), state(editor)
    report = editor.edit(NEXT)
    assert any(r.retried for r in report.facts), str(report)  # the retry path runs
    after = state(editor)

    counter = Injector(kind="exception", files=("editing/editor.py", "editing/transaction.py"))
    ed = Editor.from_state_dict(model, tok, base, take_over=True)
    with counter:
        ed.edit(NEXT)
    assert equal(state(ed), after)
    points = counter.selection(("editing/transaction.py",))
    assert len(points) > 100
    outcomes = set()
    for at in points:
        ed = Editor.from_state_dict(model, tok, base, take_over=True)
        try:
            with Injector(at, kind="exception", files=("editing/editor.py", "editing/transaction.py")):
                ed.edit(NEXT)
        except Injected:
            pass
        now = state(ed)
        if equal(now, before):
            outcomes.add("rolled back")
        else:
            assert equal(now, after), f"point {at} ({counter.points[at]}): neither before nor after the call"
            outcomes.add("completed")
        ed.check_model()
    assert outcomes == {"rolled back", "completed"}
