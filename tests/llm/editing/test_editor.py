"""End-to-end edits: every family, the lifelong stream across calls, dtypes, and real SmolLM2."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import rlsedit_llm
from rlsedit_llm import Editor
from rlsedit_llm.adapters.spec import SUPPORTED_FAMILIES, get_module, read_weight
from rlsedit_llm.pipeline.facts import encode_target
from rlsedit_theory import Problem, closed_form
from tests.helpers import random_model_config as _config
from tests.llm.conftest import counterfact_stream

# Random tiny models carry little through attention, so the subject ends the prompt here.
TINY_FACTS = [
    {"prompt": "we saw {}", "subject": "the old cat", "target": "paris"},
    {"prompt": "they sold {}", "subject": "the long table", "target": "wood"},
]
FAMILIES = ["gpt2", "gptj", "gpt_neox", "llama", "mistral", "qwen2"]


def _top1(model, tok, fact) -> bool:
    """Whether the first target token is the argmax next token after the prompt."""
    ids = tok(fact.text(), add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, -1]
    return int(logits.argmax()) == encode_target(tok, fact.target)[0]


@pytest.mark.usefixtures("one_thread_unless_slow")
@pytest.mark.parametrize("family", FAMILIES)
def test_edit_makes_target_top1_on_every_family(family, tiny, tmp_path):
    assert family in SUPPORTED_FAMILIES
    model, tok = tiny(family, init_std=0.3)
    facts = rlsedit_llm.as_facts(TINY_FACTS)
    assert not any(_top1(model, tok, f) for f in facts)
    report = rlsedit_llm.edit(model, facts, tokenizer=tok, config=_config(tmp_path))
    assert all(_top1(model, tok, f) for f in facts), str(report)
    assert all(r.residual_after < 0.5 * r.residual_before for r in report.facts)


@pytest.mark.usefixtures("one_thread_unless_slow")
def test_later_calls_continue_the_same_recursion(tiny, tmp_path):
    """The state persists across rlsedit_llm.edit calls, and after every call each layer's weights
    are the exact minimiser of the cumulative objective over all journalled (K, V)."""
    model, tok = tiny("llama", init_std=0.3)
    cfg = _config(tmp_path, alpha=0.05)
    rlsedit_llm.edit(model, TINY_FACTS[:1], tokenizer=tok, config=cfg)
    editor = rlsedit_llm.editor_of(model)
    rlsedit_llm.edit(model, TINY_FACTS[1:])
    assert rlsedit_llm.editor_of(model) is editor and len(editor.journal_) == 2
    for layer, solver in editor.solvers_.items():
        assert solver.n_updates_ == 2
        problem = Problem(solver.W0_.numpy(), solver.alpha, solver.beta, gram0=solver.gram0_.numpy())
        edits = [(r.keys[layer].numpy(), r.values[layer].numpy()) for r in editor.journal_]
        exact = closed_form(problem, edits)
        np.testing.assert_allclose(solver.W_.numpy(), exact, rtol=1e-8, atol=1e-10)
        written = read_weight(get_module(model, editor.spec_.edit_module_path.format(layer)))
        np.testing.assert_allclose(written.double().numpy(), exact, rtol=1e-6, atol=1e-7)


@pytest.mark.usefixtures("one_thread_unless_slow")
def test_innovation_is_the_residual_share_not_an_absolute_value(tiny, tmp_path):
    """Defect 1 of the authors' code: the stored value is K W_prev + R, so the innovation the
    recursion sees is exactly the layer's share of the residual (W_prev does not leak in)."""
    model, tok = tiny("gpt2", init_std=0.3)
    editor = Editor(model, tok, _config(tmp_path))
    before = {l: read_weight(get_module(model, editor.spec_.edit_module_path.format(l))).double()
              for l in editor.layers_}
    editor.edit(TINY_FACTS)
    record = editor.journal_[0]
    last = editor.layers_[-1]
    K, V = record.keys[last], record.values[last]
    # At the last layer the share is 1 / 1 of what is left: ||R|| <= ||z* - h0||.
    R = V - K @ before[last]
    assert torch.isfinite(R).all() and R.norm() > 0
    # Had the residual been used as an absolute value, V would be R itself.
    assert (V - R).norm() > 1e-3 * V.norm()


def test_model_dtypes_keep_a_float64_state(tiny, tmp_path):
    model, tok = tiny("llama", init_std=0.3, dtype=torch.bfloat16)
    editor = Editor(model, tok, _config(tmp_path))
    editor.edit(TINY_FACTS[:1])
    layer = editor.layers_[0]
    module = get_module(model, editor.spec_.edit_module_path.format(layer))
    assert module.weight.dtype == torch.bfloat16
    assert editor.solvers_[layer].C_.dtype == torch.float64
    # The model holds the master copy rounded to bf16, not a drifted re-read.
    diff = module.weight.detach().T.double() - editor.solvers_[layer].W_
    assert float(diff.abs().max()) <= 1e-2 * float(editor.solvers_[layer].W_.abs().max())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_edit_keeps_state_on_the_layer_device(tiny, tmp_path, dtype):
    model, tok = tiny("llama", init_std=0.3)
    model = model.to("cuda", dtype=dtype)
    editor = Editor(model, tok, _config(tmp_path))
    report = editor.edit(TINY_FACTS)
    for _layer, solver in editor.solvers_.items():
        assert solver.C_.device.type == "cuda" and solver.C_.dtype == torch.float64
    assert all(r.prob_after > r.prob_before for r in report.facts)


@pytest.mark.slow
def test_smollm2_counterfact_stream(smollm2, counterfact, tmp_path):
    """20 CounterFact edits in 4 sequential calls of 5: efficacy >= 0.9, first call retained."""
    model, tok = smollm2
    before, final, first = counterfact_stream(model, tok, rlsedit_llm.as_facts(counterfact[:20]), tmp_path)
    print(f"SmolLM2 CounterFact: efficacy {final:.2f} over 20, first call retained {first:.2f}")
    assert before <= 0.2  # the model believes the true facts first
    assert final >= 0.9
    assert first == 1.0
