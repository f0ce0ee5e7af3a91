"""Architecture detection, weight orientation, tiny models and model loading
(rlsedit_llm.adapters: spec, loading, tiny)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from torch import nn

from rlsedit_llm.adapters.loading import _write_cache, load_model
from rlsedit_llm.adapters.spec import (
    SUPPORTED_FAMILIES,
    ModelSpec,
    default_layers,
    detect_spec,
    get_module,
    read_weight,
    write_weight,
)
from rlsedit_llm.adapters.tiny import tiny_model
from rlsedit_llm.errors import ModelLoadError, NonFiniteError, ShapeError, UnsupportedArchitectureError

pytestmark = pytest.mark.usefixtures("one_thread_unless_slow")

EDIT_MODULES = {
    "gpt2": ("transformer.h.{}.mlp.c_proj", "Conv1D"),
    "gptj": ("transformer.h.{}.mlp.fc_out", "Linear"),
    "gpt_neox": ("gpt_neox.layers.{}.mlp.dense_4h_to_h", "Linear"),
    "llama": ("model.layers.{}.mlp.down_proj", "Linear"),
    "mistral": ("model.layers.{}.mlp.down_proj", "Linear"),
    "qwen2": ("model.layers.{}.mlp.down_proj", "Linear"),
    "qwen3": ("model.layers.{}.mlp.down_proj", "Linear"),
    "phi3": ("model.layers.{}.mlp.down_proj", "Linear"),
    "gemma2": ("model.layers.{}.mlp.down_proj", "Linear"),
    "gemma3_text": ("model.layers.{}.mlp.down_proj", "Linear"),
    "olmo2": ("model.layers.{}.mlp.down_proj", "Linear"),
    "opt": ("model.decoder.layers.{}.fc2", "Linear"),
    "falcon": ("transformer.h.{}.mlp.dense_4h_to_h", "FalconLinear"),  # an nn.Linear subclass
    "granite": ("model.layers.{}.mlp.down_proj", "Linear"),
    "stablelm": ("model.layers.{}.mlp.down_proj", "Linear"),
}


# --------------------------------------------------------------------------------------------
# detect_spec
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", SUPPORTED_FAMILIES)
def test_detect_spec_every_family(tiny, family):
    model, tok = tiny(family, n_layers=6, d_model=32, d_ff=48)
    spec = detect_spec(model)
    assert isinstance(spec, ModelSpec)
    assert spec.family == family
    assert spec.n_layers == 6
    assert (spec.d_k, spec.d_model) == (48, 32)
    path, kind = EDIT_MODULES[family]
    assert spec.edit_module_path == path
    for layer in range(spec.n_layers):
        assert type(get_module(model, spec.edit_module_path.format(layer))).__name__ == kind
        assert get_module(model, spec.layer_path.format(layer)) is not None
    assert get_module(model, spec.lm_head_path) is model.get_output_embeddings()
    assert get_module(model, spec.final_norm_path) is not None
    assert spec.default_layers == (0, 1, 2, 3, 4)
    with pytest.raises(Exception):  # frozen
        spec.family = "other"


def test_default_layers_follow_published_placements():
    assert default_layers("llama", 32) == (4, 5, 6, 7, 8)  # Llama-2/3 7-8B
    assert default_layers("gpt2", 48) == (13, 14, 15, 16, 17)  # GPT2-XL
    assert default_layers("qwen2", 28) == (7, 8, 9, 10, 11)  # Qwen2.5-7B
    assert default_layers("llama", 30) == (3, 4, 5, 6, 7)  # SmolLM2-135M
    assert default_layers("gptj", 28) == (3, 4, 5, 6, 7)
    # tiny models: the block shrinks and always leaves a layer above it
    assert default_layers("llama", 4) == (0, 1, 2)
    assert default_layers("gpt2", 3) == (0, 1)
    assert default_layers("qwen2", 2) == (0,)
    assert default_layers("llama", 1) == (0,)
    for family in SUPPORTED_FAMILIES:
        for n in range(2, 80):
            layers = default_layers(family, n)
            assert layers == tuple(range(layers[0], layers[0] + len(layers)))
            assert len(layers) == min(5, n - 1) and layers[0] >= 0 and layers[-1] <= n - 2


def test_detect_spec_rejects_unsupported_architectures():
    from transformers import AutoModelForCausalLM, BloomConfig

    bloom = AutoModelForCausalLM.from_config(BloomConfig(vocab_size=50, hidden_size=16, n_layer=2, n_head=2))
    with pytest.raises(UnsupportedArchitectureError, match="supported families: gpt2, gptj, gpt_neox, llama"):
        detect_spec(bloom)
    with pytest.raises(UnsupportedArchitectureError, match="not supported"):
        detect_spec(nn.Linear(3, 3))


def test_detect_spec_needs_an_lm_head(tiny):
    model, _ = tiny("llama")
    with pytest.raises(UnsupportedArchitectureError):
        detect_spec(model.model)  # the bare decoder has no config.model_type layout match / no head


def test_get_module_names_the_missing_path(tiny):
    model, _ = tiny("llama")
    with pytest.raises(UnsupportedArchitectureError, match="model.layers.99"):
        get_module(model, "model.layers.99.mlp.down_proj")


# --------------------------------------------------------------------------------------------
# Orientation: read_weight / write_weight
# --------------------------------------------------------------------------------------------
def _apply(module, x):
    with torch.no_grad():
        return module(x)


@pytest.mark.parametrize("family,d_ff", [("gpt2", 48), ("gpt2", 32), ("llama", 48), ("llama", 32),
                                          ("gptj", 32), ("gpt_neox", 48)])
def test_read_weight_is_row_key_convention(tiny, family, d_ff):
    """module(k) == k @ W (+ bias) with W = read_weight(module) of shape (d_k, d_v); d_ff = 32
    makes the edited matrix square, where guessing the orientation from shapes is impossible."""
    model, _ = tiny(family, d_model=32, d_ff=d_ff)
    spec = detect_spec(model)
    module = get_module(model, spec.edit_module_path.format(1))
    W = read_weight(module)
    assert W.shape == (spec.d_k, spec.d_model) == (d_ff, 32)
    x = torch.randn(5, spec.d_k)
    bias = module.bias if getattr(module, "bias", None) is not None else torch.zeros(spec.d_model)
    torch.testing.assert_close(_apply(module, x), x @ W + bias, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family,d_ff", [("gpt2", 32), ("llama", 32), ("gpt2", 64), ("qwen2", 64)])
def test_write_weight_round_trip_and_semantics(tiny, family, d_ff):
    model, _ = tiny(family, d_model=32, d_ff=d_ff)
    spec = detect_spec(model)
    module = get_module(model, spec.edit_module_path.format(2))
    W = read_weight(module)
    gen = torch.Generator().manual_seed(0)
    W_new = W + 0.1 * torch.randn(W.shape, generator=gen)  # not symmetric, even when square
    if W.shape[0] == W.shape[1]:
        assert not torch.allclose(W_new, W_new.T)
    write_weight(module, W_new)
    torch.testing.assert_close(read_weight(module), W_new)
    x = torch.randn(4, spec.d_k, generator=gen)
    bias = module.bias if getattr(module, "bias", None) is not None else torch.zeros(spec.d_model)
    torch.testing.assert_close(_apply(module, x), x @ W_new + bias, rtol=1e-5, atol=1e-6)


def test_read_weight_returns_a_detached_copy(tiny):
    model, _ = tiny("gpt2")
    module = get_module(model, detect_spec(model).edit_module_path.format(0))
    before = module.weight.detach().clone()
    W = read_weight(module)
    W.add_(1.0)
    assert torch.equal(module.weight, before)
    assert not W.requires_grad


def test_write_weight_keeps_module_dtype_and_device(tiny):
    model, _ = tiny("llama", dtype=torch.bfloat16)
    module = get_module(model, detect_spec(model).edit_module_path.format(0))
    W = read_weight(module).float() * 2
    write_weight(module, W)
    assert module.weight.dtype == torch.bfloat16
    torch.testing.assert_close(read_weight(module).float(), W, rtol=1e-2, atol=1e-2)


def test_write_weight_rejects_bad_input_and_leaves_module_untouched(tiny):
    model, _ = tiny("gpt2", d_model=32, d_ff=64)
    module = get_module(model, detect_spec(model).edit_module_path.format(0))
    before = module.weight.detach().clone()
    W = read_weight(module)
    with pytest.raises(ShapeError, match=r"\(64, 32\)"):
        write_weight(module, W.T.contiguous())  # the module's own [out, in]-style layout is refused
    bad = W.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(NonFiniteError):
        write_weight(module, bad)
    with pytest.raises(UnsupportedArchitectureError):
        write_weight(nn.Embedding(3, 3), torch.zeros(3, 3))
    with pytest.raises(UnsupportedArchitectureError):
        read_weight(nn.LayerNorm(3))
    assert torch.equal(module.weight, before)


# --------------------------------------------------------------------------------------------
# Tiny models
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", SUPPORTED_FAMILIES)
def test_tiny_model_is_deterministic_and_consistent(family):
    m1, tok = tiny_model(family, seed=3)
    m2, _ = tiny_model(family, seed=3)
    m3, _ = tiny_model(family, seed=4)
    p1, p2, p3 = (torch.cat([p.flatten() for p in m.parameters()]) for m in (m1, m2, m3))
    assert torch.equal(p1, p2) and not torch.equal(p1, p3)
    assert m1.config.vocab_size == len(tok)
    assert not m1.training
    ids = tok("The Eiffel Tower is in Paris", add_special_tokens=False, return_tensors="pt").input_ids
    assert int(ids.max()) < m1.config.vocab_size
    with torch.no_grad():
        logits = m1(ids).logits
    assert logits.shape == (1, ids.shape[1], len(tok)) and torch.isfinite(logits).all()


def test_tiny_tokenizer_encodes_any_text_and_round_trips():
    _, tok = tiny_model("llama")
    for text in ["The mother tongue of Danielle Darrieux is", " Zürich {braces} 東京", "a\nb"]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert ids and tok.decode(ids) == text
    assert tok.pad_token is not None and tok.eos_token_id is not None
    assert len(tok(" Paris", add_special_tokens=False)["input_ids"]) == 1  # leading-space words are tokens


def test_tiny_model_rejects_unknown_family():
    with pytest.raises(UnsupportedArchitectureError, match="supported families"):
        tiny_model("bert")
    assert tiny_model("gemma3")[0].config.model_type == "gemma3_text"  # alias


# --------------------------------------------------------------------------------------------
# load_model
# --------------------------------------------------------------------------------------------
def test_load_model_from_a_local_folder(tiny, tmp_path):
    model, tok = tiny("qwen2")
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, ltok = load_model(str(tmp_path))
    assert not loaded.training
    assert detect_spec(loaded).family == "qwen2"
    ids = tok("The Louvre", add_special_tokens=False, return_tensors="pt").input_ids
    assert ltok("The Louvre", add_special_tokens=False, return_tensors="pt").input_ids.tolist() == ids.tolist()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


def test_load_model_unknown_name_raises_model_load_error(tmp_path):
    with pytest.raises(ModelLoadError, match="could not load model"):
        load_model(str(tmp_path / "no-such-model"))
    with pytest.raises(ModelLoadError):
        load_model(42)


def test_cache_write_is_atomic(tiny, tmp_path, monkeypatch):
    model, tok = tiny("llama")
    target = tmp_path / "cache" / "m"
    fingerprint = {"source": "x", "size": 1}

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(tok, "save_pretrained", broken)
    _write_cache(model, tok, target, fingerprint)  # logs a warning, never raises
    assert not target.exists()
    assert list((tmp_path / "cache").iterdir()) == []  # no half-written temporary folder left
    monkeypatch.undo()

    _write_cache(model, tok, target, fingerprint)
    assert json.loads((target / "rlsedit_cache.json").read_text()) == fingerprint
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["m"]
    reloaded, _ = load_model(str(target))
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits)


@pytest.mark.slow
def test_smollm2_loads_offline_and_knows_paris(smollm2):
    model, tok = smollm2
    spec = detect_spec(model)
    assert (spec.family, spec.n_layers, spec.d_k, spec.d_model) == ("llama", 30, 1536, 576)
    assert spec.default_layers == (3, 4, 5, 6, 7)
    assert next(model.parameters()).dtype == torch.float32 and not model.training
    assert tok.pad_token is not None
    ids = tok("The Eiffel Tower is located in the city of", add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        top = model(ids).logits[0, -1].argmax()
    assert tok.decode(top).strip() == "Paris"


@pytest.mark.slow
def test_smollm2_cache_reload_equals_gguf_load(smollm2, tmp_path):
    """A fresh cache directory: the first call dequantises the GGUF and writes the cache, the
    second reads it; both give the session model's logits exactly."""
    model, tok = smollm2
    try:
        m1, t1 = load_model("smollm2", cache_dir=tmp_path / "c")
        assert (tmp_path / "c" / "rlsedit_cache.json").is_file()
        assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]
        m2, t2 = load_model("smollm2", cache_dir=tmp_path / "c")
        text = "The mother tongue of Danielle Darrieux is"
        ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids
        for m, t in ((m1, t1), (m2, t2)):
            assert t(text, add_special_tokens=False, return_tensors="pt").input_ids.tolist() == ids.tolist()
            with torch.no_grad():
                assert torch.equal(m(ids).logits, model(ids).logits)
    finally:
        shutil.rmtree(tmp_path / "c", ignore_errors=True)  # 540 MB: do not leave it in pytest's temp dirs
