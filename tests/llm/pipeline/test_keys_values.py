"""Context templates, keys (rlsedit_llm.pipeline.keys) and values z* (rlsedit_llm.pipeline.values)."""

from __future__ import annotations

import logging

import pytest
import torch

from rlsedit_llm.adapters.spec import SUPPORTED_FAMILIES, detect_spec, get_module, needs_bos
from rlsedit_llm.errors import FactError, HyperparameterError
from rlsedit_llm.pipeline import fast_forward
from rlsedit_llm.pipeline.facts import Fact, as_facts, encode_target
from rlsedit_llm.pipeline.keys import (
    TEMPLATE_STARTS,
    compute_keys,
    compute_keys_multi,
    encode_with_subject,
    fact_rows,
    generate_templates,
    subject_hidden_states,
    template_parts,
)
from rlsedit_llm.pipeline.values import ValueConfig, compute_values, default_value_config

pytestmark = pytest.mark.usefixtures("one_thread_unless_slow")

FACTS = [
    Fact("The mother tongue of {} is", "Danielle Darrieux", "English", target_true="French"),
    Fact("{} is located in the city of", "The Eiffel Tower", "Rome", target_true="Paris"),
    Fact("{}'s headquarters are in", "Toyota", "the United Kingdom", target_true="Japan"),
]
# Fixed templates for the tiny-model tests (one plain, two prefixed, one with a literal brace).
TEMPLATES = ["{}", "Because of the rain. {}", "I think {{so}}. {}"]


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_state(model, before):
    after = model.state_dict()
    return before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


# --------------------------------------------------------------------------------------------
# Templates
# --------------------------------------------------------------------------------------------
def test_template_parts():
    assert template_parts("{}") == ("", "")
    assert template_parts("I think {{so}}. {}") == ("I think {so}. ", "")
    assert template_parts("a {} b") == ("a ", " b")
    for bad in ["no slot", "{} and {}", "{0}", "{x}", "{:>3}", "unbalanced { {}", 7]:
        with pytest.raises(HyperparameterError):
            template_parts(bad)


def test_generate_templates_is_seeded_and_well_formed(tiny):
    model, tok = tiny("llama")
    rng = torch.get_rng_state()
    a = generate_templates(model, tok, seed=0, n=7, length=6)
    assert torch.equal(rng, torch.get_rng_state())  # the global RNG is not consumed
    assert a == generate_templates(model, tok, seed=0, n=7, length=6)
    assert a != generate_templates(model, tok, seed=1, n=7, length=6)
    assert a[0] == "{}" and len(a) == 8
    for j, t in enumerate(a[1:]):
        before, after = template_parts(t)  # exactly one slot
        assert after == "" and before.endswith(". ")
        assert before.startswith(TEMPLATE_STARTS[j % 5])
    assert generate_templates(model, tok, seed=0, n=0) == ["{}"]
    with pytest.raises(HyperparameterError):
        generate_templates(model, tok, seed=0, n=-1)
    with pytest.raises(HyperparameterError):
        generate_templates(model, tok, seed=0, length=0)


def test_generated_braces_are_escaped(tiny):
    model, tok = tiny("gptj")  # GPT-J's LM head has a bias: make "{" the only likely token
    brace = tok.convert_tokens_to_ids("{")
    with torch.no_grad():
        model.lm_head.bias[brace] = 1e4
    templates = generate_templates(model, tok, seed=0, n=2, length=3)
    assert templates[1] == "The{{{{{{. {}"
    assert template_parts(templates[1]) == ("The{{{. ", "")


def test_generate_templates_restores_training_mode(tiny):
    model, tok = tiny("gpt2")
    model.train()
    generate_templates(model, tok, seed=0, n=1, length=2)
    assert model.training


# --------------------------------------------------------------------------------------------
# Subject positions
# --------------------------------------------------------------------------------------------
class _SlowView:
    """The same tokenizer seen as a slow one (no offsets): exercises MEMIT's prefix rule."""

    is_fast = False

    def __init__(self, tok):
        self._tok = tok

    def __call__(self, text, **kwargs):
        kwargs.pop("return_offsets_mapping", None)
        return self._tok(text, **kwargs)


@pytest.mark.parametrize("text,subject", [
    ("The mother tongue of Danielle Darrieux is", "Danielle Darrieux"),
    ("Toyota's headquarters are in", "Toyota"),
    ("Toyota", "Toyota"),
    ("I think so. The Eiffel Tower is located in", "The Eiffel Tower"),
    ("Where is Zürichberg? In", "Zürichberg"),
])
def test_subject_last_token(tiny, text, subject):
    _, tok = tiny("llama")
    start = text.index(subject)
    ids, idx = encode_with_subject(tok, text, start, start + len(subject))
    assert ids == tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids[: idx + 1]).endswith(subject)  # the token holding the subject's last character
    assert not tok.decode(ids[:idx]).endswith(subject)
    assert encode_with_subject(_SlowView(tok), text, start, start + len(subject)) == (ids, idx)


def test_fast_and_prefix_rules_agree_on_counterfact(tiny, counterfact):
    _, tok = tiny("llama")
    facts = as_facts(counterfact[:150])
    assert fact_rows(tok, facts, TEMPLATES) == fact_rows(_SlowView(tok), facts, TEMPLATES)


# --------------------------------------------------------------------------------------------
# Keys
# --------------------------------------------------------------------------------------------
def _manual_keys(model, tok, spec, layer, facts, templates):
    """One unpadded forward per (fact, template); subject position by MEMIT's prefix rule;
    1/2 plain + 1/2 mean of the prefixed templates."""
    module = get_module(model, spec.edit_module_path.format(layer))
    out = []
    for f in facts:
        per_template = []
        for t in templates:
            before, after = template_parts(t)
            p_before, p_after = f.prompt.split("{}")
            text = before + p_before + f.subject + p_after + after
            shift = 1 if needs_bos(spec) else 0  # Gemma: BOS first
            pos = len(tok(before + p_before + f.subject, add_special_tokens=False)["input_ids"]) - 1 + shift
            ids = [tok.bos_token_id] * shift + tok(text, add_special_tokens=False)["input_ids"]
            seen = {}
            h = module.register_forward_pre_hook(lambda m, a, seen=seen: seen.__setitem__("x", a[0]))
            try:
                with torch.no_grad():
                    model(torch.tensor([ids]))
            finally:
                h.remove()
            per_template.append(seen["x"].reshape(len(ids), -1)[pos])  # OPT: (seq, d_k) flat
        plain = [k for k, t in zip(per_template, templates, strict=True) if t == "{}"]
        prefixed = [k for k, t in zip(per_template, templates, strict=True) if t != "{}"]
        if plain and prefixed:
            out.append(0.5 * torch.stack(plain).mean(0) + 0.5 * torch.stack(prefixed).mean(0))
        else:
            out.append(torch.stack(per_template).mean(0))
    return torch.stack(out)


@pytest.mark.parametrize("family", SUPPORTED_FAMILIES)
def test_keys_match_manual_type_weighted_average(tiny, family):
    model, tok = tiny(family)
    spec = detect_spec(model)
    K = compute_keys(model, tok, spec, 1, FACTS, TEMPLATES)
    assert K.shape == (len(FACTS), spec.d_k) and K.dtype == torch.float32
    torch.testing.assert_close(K, _manual_keys(model, tok, spec, 1, FACTS, TEMPLATES), rtol=1e-5, atol=1e-6)
    # a flat mean over the three templates would differ
    flat = torch.stack([_manual_keys(model, tok, spec, 1, FACTS, [t]) for t in TEMPLATES]).mean(0)
    assert not torch.allclose(K, flat, rtol=1e-3, atol=1e-5)


def test_keys_single_type_and_batching(tiny):
    model, tok = tiny("llama")
    spec = detect_spec(model)
    only_plain = compute_keys(model, tok, spec, 2, FACTS, ["{}"])
    torch.testing.assert_close(only_plain, _manual_keys(model, tok, spec, 2, FACTS, ["{}"]), rtol=1e-5, atol=1e-6)
    only_prefixed = compute_keys(model, tok, spec, 2, FACTS, TEMPLATES[1:])
    torch.testing.assert_close(only_prefixed, _manual_keys(model, tok, spec, 2, FACTS, TEMPLATES[1:]),
                               rtol=1e-5, atol=1e-6)
    a = compute_keys(model, tok, spec, 2, FACTS, TEMPLATES)
    b = compute_keys(model, tok, spec, 2, FACTS, TEMPLATES, batch_size=1)  # no padding at all
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert torch.equal(a, compute_keys(model, tok, spec, 2, FACTS, TEMPLATES))  # deterministic
    # a fact's key does not depend on the other facts of the batch
    torch.testing.assert_close(a[1:2], compute_keys(model, tok, spec, 2, FACTS[1:2], TEMPLATES), rtol=1e-5, atol=1e-6)


def test_keys_multi_equals_single_layers(tiny):
    model, tok = tiny("gpt2", n_layers=5)
    spec = detect_spec(model)
    multi = compute_keys_multi(model, tok, spec, [3, 0, 2], FACTS, TEMPLATES)
    assert sorted(multi) == [0, 2, 3]
    for layer, K in multi.items():
        torch.testing.assert_close(K, compute_keys(model, tok, spec, layer, FACTS, TEMPLATES), rtol=1e-6, atol=1e-7)


def test_keys_half_precision_model_returns_float32(tiny):
    model, tok = tiny("llama", init_std=0.1)
    spec = detect_spec(model)
    ref = compute_keys(model, tok, spec, 1, FACTS, TEMPLATES)
    K = compute_keys(model.to(torch.bfloat16), tok, spec, 1, FACTS, TEMPLATES)
    assert K.dtype == torch.float32 and torch.isfinite(K).all()
    assert (K - ref).norm() / ref.norm() < 0.05


def test_keys_reject_bad_input(tiny):
    model, tok = tiny("llama")
    spec = detect_spec(model)
    with pytest.raises(FactError):
        compute_keys(model, tok, spec, 1, [], TEMPLATES)
    with pytest.raises(FactError):
        compute_keys(model, tok, spec, 1, [Fact("no slot", "X", "Y")], TEMPLATES)
    with pytest.raises(HyperparameterError):
        compute_keys(model, tok, spec, 1, FACTS, ["{} {}"])
    with pytest.raises(HyperparameterError):
        compute_keys(model, tok, spec, 1, FACTS, [])
    with pytest.raises(HyperparameterError):
        compute_keys(model, tok, spec, spec.n_layers, FACTS, TEMPLATES)


def test_subject_hidden_states_is_the_layer_output_at_the_subject(tiny):
    model, tok = tiny("qwen2")
    spec = detect_spec(model)
    h = subject_hidden_states(model, tok, spec, 2, FACTS)
    assert h.shape == (len(FACTS), spec.d_model) and h.dtype == torch.float32
    for i, f in enumerate(FACTS):
        ids = tok(f.text(), add_special_tokens=False)["input_ids"]
        pos = len(tok(f.prompt.split("{}")[0] + f.subject, add_special_tokens=False)["input_ids"]) - 1
        with torch.no_grad():
            hs = model(torch.tensor([ids]), output_hidden_states=True).hidden_states[3]  # after layer 2
        torch.testing.assert_close(h[i], hs[0, pos], rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Values
# --------------------------------------------------------------------------------------------
def _cfg(**kw):
    kw.setdefault("lr", 0.5)
    kw.setdefault("steps", 6)
    kw.setdefault("early_stop_loss", 0.0)
    return ValueConfig(**kw)


@pytest.mark.parametrize("family", SUPPORTED_FAMILIES)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_fast_path_equals_naive_path(tiny, family, attn):
    if family == "gemma2" and attn == "sdpa":
        pytest.skip("transformers has no SDPA attention for Gemma 2 (soft-capped attention logits)")
    # A window that bites (the prefix region is longer) but leaves every target within reach of
    # the subject through the two layers above: a fact with no gradient path would make Adam's
    # first, sign-like step amplify rounding noise and the comparison meaningless.
    extra = {"sliding_window": 14} if family in ("mistral", "qwen2") else {}
    if family == "qwen2":
        extra["use_sliding_window"] = True
    model, tok = tiny(family, init_std=0.3, attn_implementation=attn, **extra)
    spec = detect_spec(model)
    fast = compute_values(model, tok, spec, 1, FACTS, TEMPLATES, _cfg())
    naive = compute_values(model, tok, spec, 1, FACTS, TEMPLATES, _cfg(), naive=True)
    assert (fast.path, naive.path) == ("fast", "naive")
    assert fast.steps_run == naive.steps_run == 5
    assert fast.delta.norm() > 0
    torch.testing.assert_close(fast.initial, naive.initial, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast.target, naive.target, rtol=1e-4, atol=1e-4 * float(naive.initial.norm()))
    assert fast.loss_history == pytest.approx(naive.loss_history, rel=1e-4, abs=1e-5)
    assert fast.nll_history == pytest.approx(naive.nll_history, rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("layer", [0, 3])
def test_fast_path_at_the_first_and_last_layer(tiny, layer):
    model, tok = tiny("llama", init_std=0.3)  # layer 3 is the last: no layers above it
    spec = detect_spec(model)
    fast = compute_values(model, tok, spec, layer, FACTS, TEMPLATES, _cfg(steps=4))
    naive = compute_values(model, tok, spec, layer, FACTS, TEMPLATES, _cfg(steps=4), naive=True)
    assert fast.path == "fast"
    torch.testing.assert_close(fast.target, naive.target, rtol=1e-4, atol=1e-4 * float(naive.initial.norm()))


def test_values_initial_is_the_unedited_hidden_state(tiny):
    model, tok = tiny("gpt_neox", init_std=0.3)
    spec = detect_spec(model)
    res = compute_values(model, tok, spec, 2, FACTS, TEMPLATES, _cfg(steps=2))
    torch.testing.assert_close(res.initial, subject_hidden_states(model, tok, spec, 2, FACTS), rtol=1e-5, atol=1e-5)
    assert res.target.shape == res.initial.shape == (len(FACTS), spec.d_model)
    assert res.target.dtype == torch.float32


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_loss_decreases_and_step_zero_has_no_kl_or_decay(tiny, family):
    model, tok = tiny(family, init_std=0.3)
    spec = detect_spec(model)
    res = compute_values(model, tok, spec, 1, FACTS, TEMPLATES, _cfg(steps=15))
    assert res.loss_history[0] == pytest.approx(res.nll_history[0], rel=1e-6)  # delta = 0: KL = decay = 0
    assert res.loss_history[-1] < res.loss_history[0] - 0.3
    assert res.nll_history[-1] < res.nll_history[0] - 0.3
    assert len(res.loss_history) == 15 and res.steps_run == 14


def test_target_nll_matches_a_direct_computation(tiny):
    """final_nll is the mean over templated prompts of the per-token target NLL with the final
    delta added after layer 1 at the subject's last token (full model, one unpadded row at a time)."""
    model, tok = tiny("llama", init_std=0.3)
    spec = detect_spec(model)
    res = compute_values(model, tok, spec, 1, FACTS, TEMPLATES, _cfg(steps=5))
    layer_module = get_module(model, spec.layer_path.format(1))
    for i, f in enumerate(FACTS):
        target = encode_target(tok, f.target)
        nlls = []
        for t in TEMPLATES:
            (ids,), (pos,) = fact_rows(tok, [f], [t])
            full = torch.tensor([ids + target[:-1]])

            def put(m, a, out, pos=pos, i=i):
                out = out.clone()
                out[0, pos] += res.delta[i]
                return out

            h = layer_module.register_forward_hook(put)
            try:
                with torch.no_grad():
                    logp = torch.log_softmax(model(full).logits[0].float(), -1)
            finally:
                h.remove()
            nlls.append(-torch.stack([logp[len(ids) - 1 + k, tok_id] for k, tok_id in enumerate(target)]).mean())
        assert float(torch.stack(nlls).mean()) == pytest.approx(float(res.final_nll[i]), rel=1e-4)


def test_clamp_is_respected(tiny):
    model, tok = tiny("gpt2", init_std=0.3)
    spec = detect_spec(model)
    res = compute_values(model, tok, spec, 1, FACTS, TEMPLATES, _cfg(clamp_norm_factor=0.05, steps=5))
    ratio = res.delta.norm(dim=1) / res.initial.norm(dim=1)
    assert torch.all(ratio <= 0.05 * (1 + 1e-5))
    assert torch.all(ratio >= 0.05 * (1 - 1e-3))  # lr 0.5 pushes every delta onto the bound


def test_early_stop_and_step_count(tiny):
    model, tok = tiny("llama", init_std=0.3)
    spec = detect_spec(model)
    done = compute_values(model, tok, spec, 1, FACTS, TEMPLATES, _cfg(early_stop_loss=1e9))
    assert done.steps_run == 0 and len(done.loss_history) == 1
    assert torch.equal(done.target, done.initial)
    one = compute_values(model, tok, spec, 1, FACTS, TEMPLATES, _cfg(steps=1))
    assert one.steps_run == 0 and torch.equal(one.target, one.initial)
    # a per-fact stop: the threshold between the facts' losses freezes only the easy ones
    free = compute_values(model, tok, spec, 1, FACTS, TEMPLATES, _cfg(steps=2))
    cut = float(free.final_loss.median())
    part = compute_values(model, tok, spec, 1, FACTS, TEMPLATES, _cfg(steps=2, early_stop_loss=cut + 1e-6))
    frozen = free.final_loss <= cut + 1e-6
    assert torch.equal(part.delta[~frozen], free.delta[~frozen])


def test_batched_facts_are_optimised_independently(tiny):
    model, tok = tiny("qwen2", init_std=0.3)
    spec = detect_spec(model)
    both = compute_values(model, tok, spec, 1, FACTS, TEMPLATES, _cfg())
    for i, f in enumerate(FACTS):
        alone = compute_values(model, tok, spec, 1, [f], TEMPLATES, _cfg())
        torch.testing.assert_close(both.target[i:i + 1], alone.target, rtol=1e-4,
                                   atol=1e-4 * float(alone.initial.norm()))


def test_finished_facts_are_not_run_and_do_not_change_the_others(tiny, monkeypatch):
    model, tok = tiny("llama", init_std=0.3)
    spec = detect_spec(model)
    free = compute_values(model, tok, spec, 1, FACTS, TEMPLATES, _cfg(steps=3))
    low = free.final_loss.sort().values
    cut = float(low[:2].mean())  # between two facts' losses: some stop early, some never
    runs = []
    real_run = fast_forward.FastForward._run
    monkeypatch.setattr(fast_forward.FastForward, "_run",
                        lambda self, group, n, delta: runs.append(len(group)) or real_run(self, group, n, delta))
    cfg = _cfg(steps=8, early_stop_loss=cut)
    both = compute_values(model, tok, spec, 1, FACTS, TEMPLATES, cfg)
    assert both.path == "fast"
    rows_per_call = len(TEMPLATES) + 1
    # every evaluation runs only the rows of facts still active: fewer rows once one has stopped
    assert runs[0] == len(FACTS) * rows_per_call or sum(runs[:3]) >= len(FACTS) * rows_per_call
    assert min(runs) < len(FACTS) * rows_per_call
    for i, f in enumerate(FACTS):
        alone = compute_values(model, tok, spec, 1, [f], TEMPLATES, cfg)
        torch.testing.assert_close(both.target[i:i + 1], alone.target, rtol=1e-4,
                                   atol=1e-4 * float(alone.initial.norm()))
        assert float(both.final_loss[i]) == pytest.approx(float(alone.final_loss[0]), rel=1e-4, abs=1e-5)
    naive = compute_values(model, tok, spec, 1, FACTS, TEMPLATES, cfg, naive=True)
    torch.testing.assert_close(both.target, naive.target, rtol=1e-4, atol=1e-4 * float(naive.initial.norm()))


def test_length_groups_partition_rows_at_least_cost():
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        n = int(torch.randint(1, 30, (1,), generator=gen))
        length = torch.randint(1, 9, (40,), generator=gen)
        rows = torch.randperm(40, generator=gen)[:n]
        groups = fast_forward.length_groups(rows, length, overhead=5)
        assert sorted(torch.cat(groups).tolist()) == sorted(rows.tolist())  # each row exactly once
        spans = [(int(length[g].min()), int(length[g].max())) for g in groups]
        assert all(a[1] < b[0] for a, b in zip(spans, spans[1:], strict=False))  # disjoint length ranges, ascending
        cost = sum(len(g) * int(length[g].max()) + 5 for g in groups)
        assert cost <= len(rows) * int(length[rows].max()) + 5  # never worse than one padded batch
        # against every split of the sorted distinct lengths (brute force)
        vals = sorted(set(length[rows].tolist()))
        best = float("inf")
        for mask in range(1 << (len(vals) - 1)):
            bounds = [0] + [i + 1 for i in range(len(vals) - 1) if mask >> i & 1] + [len(vals)]
            c = 0
            for a, b in zip(bounds, bounds[1:], strict=False):
                members = [r for r in rows.tolist() if vals[a] <= int(length[r]) <= vals[b - 1]]
                c += len(members) * vals[b - 1] + 5
            best = min(best, c)
        assert cost == best


def test_kl_position_option(tiny):
    model, tok = tiny("llama", init_std=0.3)
    spec = detect_spec(model)
    cfg = _cfg(kl_factor=10.0, kl_position="prompt_last")
    fast = compute_values(model, tok, spec, 1, FACTS, TEMPLATES, cfg)
    naive = compute_values(model, tok, spec, 1, FACTS, TEMPLATES, cfg, naive=True)
    torch.testing.assert_close(fast.target, naive.target, rtol=1e-4, atol=1e-4 * float(naive.initial.norm()))
    default = compute_values(model, tok, spec, 1, FACTS, TEMPLATES, _cfg(kl_factor=10.0))
    assert not torch.allclose(default.target, fast.target)


def test_model_left_untouched(tiny):
    model, tok = tiny("gpt2", init_std=0.3)  # GPT-2 has dropout: train mode must not leak into the loss
    spec = detect_spec(model)
    ref = compute_values(model, tok, spec, 1, FACTS, TEMPLATES, _cfg())
    before = _state(model)
    model.transformer.h[0].mlp.c_fc.weight.requires_grad_(False)  # a mixed set of flags
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    model.train()
    res = compute_values(model, tok, spec, 1, FACTS, TEMPLATES, _cfg())
    naive = compute_values(model, tok, spec, 1, FACTS, TEMPLATES, _cfg(), naive=True)
    assert model.training
    assert _same_state(model, before)
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(res.target, ref.target)
    torch.testing.assert_close(naive.target, ref.target, rtol=1e-4, atol=1e-4 * float(ref.initial.norm()))


def test_bfloat16_model(tiny):
    model, tok = tiny("llama", init_std=0.3, dtype=torch.bfloat16)
    spec = detect_spec(model)
    before = _state(model)
    res = compute_values(model, tok, spec, 1, FACTS, TEMPLATES, _cfg())
    assert res.path == "fast"
    assert res.target.dtype == torch.float32 and torch.isfinite(res.target).all()
    assert res.loss_history[-1] < res.loss_history[0]
    assert _same_state(model, before)


def test_fallback_to_naive_path_is_logged(tiny, monkeypatch, caplog):
    model, tok = tiny("llama", init_std=0.3)
    spec = detect_spec(model)
    ref = compute_values(model, tok, spec, 1, FACTS, TEMPLATES, _cfg())
    monkeypatch.setattr(fast_forward, "SUPPORTED_ATTENTION", ())
    with caplog.at_level(logging.WARNING, logger="rlsedit_llm.pipeline.values"):
        res = compute_values(model, tok, spec, 1, FACTS, TEMPLATES, _cfg())
    assert res.path == "naive" and "fast value path unavailable" in caplog.text
    torch.testing.assert_close(res.target, ref.target, rtol=1e-4, atol=1e-4 * float(ref.initial.norm()))


def test_self_check_catches_a_wrong_fast_path(tiny, monkeypatch, caplog):
    """Break the sliced attention mask on purpose: the step-0 self-check must notice and the
    result must still be the correct (naive) one."""
    model, tok = tiny("llama", init_std=0.3)
    spec = detect_spec(model)
    ref = compute_values(model, tok, spec, 1, FACTS, TEMPLATES, _cfg(), naive=True)
    original = fast_forward.FastForward._slice_mask

    def all_visible(self, m):
        out = original(self, m)
        return torch.ones_like(out) if out.dtype == torch.bool else torch.zeros_like(out)

    monkeypatch.setattr(fast_forward.FastForward, "_slice_mask", all_visible)
    with caplog.at_level(logging.WARNING, logger="rlsedit_llm.pipeline.values"):
        res = compute_values(model, tok, spec, 1, FACTS, TEMPLATES, _cfg())
    assert res.path == "naive" and "self-check failed" in caplog.text
    torch.testing.assert_close(res.target, ref.target, rtol=1e-5, atol=1e-5)


def test_values_reject_bad_input_and_leave_model_untouched(tiny):
    model, tok = tiny("llama")
    spec = detect_spec(model)
    before = _state(model)
    for cfg in [ValueConfig(lr=0), ValueConfig(steps=0), ValueConfig(kl_factor=-1), ValueConfig(kl_prompt="is a"),
                ValueConfig(kl_position="middle"), ValueConfig(clamp_norm_factor=float("nan"))]:
        with pytest.raises(HyperparameterError):
            compute_values(model, tok, spec, 1, FACTS, TEMPLATES, cfg)
    with pytest.raises(HyperparameterError, match="bare"):
        compute_values(model, tok, spec, 1, FACTS, TEMPLATES[1:], _cfg())
    with pytest.raises(HyperparameterError):
        compute_values(model, tok, spec, 4, FACTS, TEMPLATES, _cfg())
    with pytest.raises(HyperparameterError):
        compute_values(model, tok, spec, 1, FACTS, TEMPLATES, config={"lr": 0.1})
    with pytest.raises(FactError):
        compute_values(model, tok, spec, 1, FACTS + [FACTS[0]], TEMPLATES, _cfg())
    assert _same_state(model, before)


def test_default_value_config(tiny):
    spec_gpt2 = detect_spec(tiny("gpt2")[0])
    assert (default_value_config(spec_gpt2).lr, default_value_config(spec_gpt2).steps) == (0.5, 20)
    big = detect_spec(tiny("qwen2", d_model=1024, n_heads=8, n_layers=2, d_ff=16)[0])
    assert default_value_config(big).lr == 0.1 and default_value_config(big).steps == 25
    for cfg in (default_value_config(spec_gpt2), default_value_config(big)):
        cfg.validate()
        assert (cfg.weight_decay, cfg.clamp_norm_factor, cfg.kl_factor) == (0.5, 0.75, 0.0625)


# --------------------------------------------------------------------------------------------
# Real SmolLM2
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smol_templates(smollm2):
    model, tok = smollm2
    return generate_templates(model, tok, seed=0)


@pytest.mark.slow
def test_smollm2_keys_for_the_eiffel_tower(smollm2, smol_templates):
    model, tok = smollm2
    spec = detect_spec(model)
    fact = Fact("{} is located in the city of", "The Eiffel Tower", "Rome", target_true="Paris")
    (ids,), (pos,) = fact_rows(tok, [fact], ["{}"])
    assert tok.decode(ids[pos]).strip() == "Tower"
    assert len(smol_templates) == 6 and smol_templates == generate_templates(model, tok, seed=0)
    keys = compute_keys_multi(model, tok, spec, [3, 7], [fact], smol_templates)
    for layer in (3, 7):
        assert keys[layer].shape == (1, 1536) and torch.isfinite(keys[layer]).all()
    torch.testing.assert_close(keys[7], _manual_keys(model, tok, spec, 7, [fact], smol_templates), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_smollm2_values_reach_low_nll(smollm2, smol_templates, counterfact):
    model, tok = smollm2
    spec = detect_spec(model)
    before = _state(model)
    facts = as_facts(counterfact[:2])
    res = compute_values(model, tok, spec, spec.default_layers[-1], facts, smol_templates, default_value_config(spec))
    assert res.path == "fast"
    assert res.nll_history[0] > 3.0  # the new targets start unlikely
    assert float(res.final_nll.max()) < 0.5
    ratio = res.delta.norm(dim=1) / res.initial.norm(dim=1)
    assert torch.all(ratio <= 0.75 * (1 + 1e-5))
    assert _same_state(model, before)


@pytest.mark.slow
def test_smollm2_fast_equals_naive(smollm2, smol_templates, counterfact):
    model, tok = smollm2
    spec = detect_spec(model)
    facts = as_facts(counterfact[2:3])
    cfg = ValueConfig(lr=0.5, steps=3, early_stop_loss=0.0)
    fast = compute_values(model, tok, spec, 7, facts, smol_templates, cfg)
    naive = compute_values(model, tok, spec, 7, facts, smol_templates, cfg, naive=True)
    assert fast.path == "fast"
    torch.testing.assert_close(fast.target, naive.target, rtol=1e-4, atol=1e-4 * float(naive.initial.norm()))
    assert fast.loss_history == pytest.approx(naive.loss_history, rel=1e-4)
