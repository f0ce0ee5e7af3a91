"""The editor's parts: facts checked once at the door, ownership as an object, and the read-only
questions (anchor Grams, deviations next to the T3 bounds, certificate) answered from the
solvers' own state."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rlsedit_llm.editing.config import EditConfig
from rlsedit_llm.editing.editor import Editor
from rlsedit_llm.editing.guard import Ownership
from rlsedit_llm.editing.statistics import layer_moments
from rlsedit_llm.errors import FactError, OwnershipError
from rlsedit_llm.kernel.certificates import Deviation, weight_deviation
from rlsedit_llm.pipeline import facts as facts_module
from rlsedit_theory import bounds
from rlsedit_theory.problem import Problem

FACTS = [{"prompt": "{} lives in", "subject": "Alice", "target": "Paris"},
         {"prompt": "{} works for", "subject": "Bob", "target": "Apple"}]
MORE = [{"prompt": "{} plays", "subject": "Carol", "target": "chess"}]


def _config(tmp_path, **changes) -> EditConfig:
    settings = dict(alpha=1e-2, mom2_weight=1.0, stats_tokens=500, stats_max_length=32, cache_dir=str(tmp_path),
                    n_templates=1, template_length=3, layers=(1, 2))
    settings.update(changes)
    return EditConfig(**settings)


def test_an_edit_checks_its_facts_once(tiny, tmp_path, monkeypatch):
    model, tok = tiny("llama", init_std=0.3)
    editor = Editor(model, tok, _config(tmp_path)).prepare()
    calls = []
    real = facts_module.validate_facts
    monkeypatch.setattr(facts_module, "validate_facts",
                        lambda facts, tokenizer: calls.append(1) or real(facts, tokenizer))
    editor.edit(FACTS)
    assert len(calls) == 1  # at the door; values, keys and hidden states trust the FactBatch
    with pytest.raises(FactError, match="exactly one"):
        editor.edit([facts_module.Fact("{} and {} live in", "Alice", "Paris")])
    assert len(calls) == 2 and len(editor.journal_) == 1


def test_a_fact_batch_of_another_tokenizer_is_checked_again(tiny):
    _, tok = tiny("llama")
    _, other = tiny("gpt2")
    batch = facts_module.checked_facts(FACTS, tok)
    assert facts_module.checked_facts(batch, tok) is batch
    again = facts_module.checked_facts(batch, other)
    assert again is not batch and again.tokenizer is other and list(again) == list(batch)


def test_ownership_is_an_object_that_names_the_owner(tiny, tmp_path):
    model, tok = tiny("llama", init_std=0.3)
    first = Editor(model, tok, _config(tmp_path))
    first.edit(FACTS)
    assert isinstance(first.ownership, Ownership) and first.ownership.owns and first.owns_model
    with pytest.raises(OwnershipError, match=r"rlsedit, 1 edit\(s\) in its journal"):
        Editor(model, tok, _config(tmp_path))
    second = Editor(model, tok, _config(tmp_path), take_over=True)
    assert first.ownership.displaced and not first.owns_model and second.owns_model
    with pytest.raises(OwnershipError, match="took this model over"):
        first.edit(MORE)
    second.release()
    assert not second.ownership.owns


def test_anchor_grams_are_the_statistics_the_solvers_were_built_from(tiny, tmp_path):
    model, tok = tiny("llama", init_std=0.3)
    config = _config(tmp_path)
    editor = Editor(model, tok, config)
    grams = editor.anchor_grams()  # prepares the editor
    moments = layer_moments(model, tok, editor.spec_, editor.layers_, config, progress=False)
    assert sorted(grams) == list(editor.layers_)
    for layer, gram in grams.items():
        expected = config.resolved_mom2_weight(editor.spec_.d_k) * moments[layer].double()
        torch.testing.assert_close(gram, (expected + expected.mT) / 2, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", ["rlsedit", "memit_seq", "encore", "memit"])
def test_deviations_match_the_theory_bounds(tiny, tmp_path, method):
    model, tok = tiny("llama", init_std=0.3)
    config = _config(tmp_path, method=method, beta=0.5)
    editor = Editor(model, tok, config)
    editor.edit(FACTS)
    editor.edit(MORE)
    deviations = editor.deviations()
    assert sorted(deviations) == list(editor.layers_)
    for layer, dev in deviations.items():
        solver = editor.solvers_[layer]
        W0, W = solver.W0_.numpy(), solver.W_.numpy()
        gram = solver.gram0_.numpy()
        D = W - W0
        assert isinstance(dev, Deviation)
        assert dev.fro == pytest.approx(float(np.linalg.norm(D)), rel=1e-12)
        assert dev.anchor == pytest.approx(math.sqrt(float(np.sum(D * (gram @ D)))), rel=1e-10)
        if method == "memit":  # one batch at a time: no cumulative objective, no bounds
            assert dev.t3a is None and dev.t3b is None
            continue
        K = torch.cat([r.keys[layer] for r in editor.journal_]).numpy()
        V = torch.cat([r.values[layer] for r in editor.journal_]).numpy()
        problem = Problem(W0, solver.identity_weight, config.beta, gram0=gram)  # encore: alpha + its ridge
        t3a = bounds.t3a_deviation_bound(problem, [(K, V)], W)
        t3b = bounds.t3b_anchor_bound(problem, [(K, V)], W)
        assert dev.t3a == pytest.approx(t3a.rhs, rel=1e-10) and dev.fro <= dev.t3a
        assert dev.t3b == pytest.approx(t3b.rhs, rel=1e-10) and dev.anchor <= dev.t3b * (1 + 1e-9)
        if solver.capabilities.keeps_inverse:
            assert dev.condition is not None and dev.condition >= 1


def test_weight_deviation_without_a_solver():
    g = torch.Generator().manual_seed(0)
    W0 = torch.randn(6, 4, generator=g, dtype=torch.float64)
    W = W0 + 0.1 * torch.randn(6, 4, generator=g, dtype=torch.float64)
    X = torch.randn(6, 6, generator=g, dtype=torch.float64)
    gram = X @ X.mT
    dev = weight_deviation(W0, W.float(), gram)
    D = (W.float().double() - W0).numpy()
    assert dev.fro == pytest.approx(float(np.linalg.norm(D)), rel=1e-12)
    assert dev.anchor == pytest.approx(math.sqrt(float(np.sum(D * (gram.numpy() @ D)))), rel=1e-10)
    assert dev.t3a is None and dev.t3b is None and dev.condition is None
    assert weight_deviation(W0, W).anchor is None


def test_the_certificate_is_built_from_solver_level_inputs(tiny, tmp_path):
    model, tok = tiny("llama", init_std=0.3)
    editor = Editor(model, tok, _config(tmp_path))
    assert "not been prepared" in str(editor.certificate())
    editor.edit(FACTS)
    editor.edit(MORE)
    cert = editor.certificate(n_probes=3)
    assert cert.holds() and cert.n_edits == 2 and cert.n_probes == 3
    assert [c.layer for c in cert.layers] == list(editor.layers_)
    assert all(c.n_rows == 3 and c.last_edit_id == 1 for c in cert.layers)
