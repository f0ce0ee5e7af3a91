"""Damaged or forged edit packs, weights that overflow the model's dtype, regularisers the state
cannot carry, the float32 certificate, pickles in fine-tuning saves and value settings: each is
refused with a typed error before anything changes (or, for the certificate, judged by the
state's own precision)."""

from __future__ import annotations

import json
import logging
import math
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from rlsedit_llm.adapters.fingerprint import model_fingerprint
from rlsedit_llm.adapters.spec import detect_spec, get_module, read_weight, write_weight
from rlsedit_llm.adapters.tiny import tiny_model
from rlsedit_llm.editing import finetune as finetune_mod
from rlsedit_llm.editing.config import EditConfig
from rlsedit_llm.editing.editor import Editor
from rlsedit_llm.editing.finetune import FineTuneEditor
from rlsedit_llm.editing.packs import EditPackError, apply_edit_pack, pack_digest, write_edit_pack
from rlsedit_llm.errors import (
    HyperparameterError,
    NonFiniteError,
    RLSEditError,
    ShapeError,
    StateMismatchError,
)
from rlsedit_llm.kernel.rls import LayerRLS, max_condition
from rlsedit_llm.pipeline.values import ValueConfig, compute_values, default_value_config
from tests.helpers import FIRST, NEXT
from tests.helpers import small_config as config

from .conftest import assert_same, assert_same_params, fresh_editor, params, snapshot


@pytest.fixture(scope="module")
def pack(stats_dir, tmp_path_factory):
    """An edit pack of a tiny llama edited twice, and that editor."""
    editor = fresh_editor(stats_dir, n_edits=2)
    path = tmp_path_factory.mktemp("pack") / "edits.safetensors"
    editor.save_edit_pack(path)
    return path, editor


def _load(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())


def _forge(path, out, *, tensors=None, metadata=None, sign=True):
    """A copy of the pack at ``path`` with some tensors / metadata fields replaced (``None``
    removes a field), re-signed like a forger would (or with its digest removed)."""
    old_tensors, old_meta = _load(path)
    new_tensors = {**old_tensors, **(tensors or {})}
    meta = {**old_meta, **(metadata or {})}
    meta = {k: v for k, v in meta.items() if v is not None}
    meta.pop("digest", None)
    if sign:
        meta["digest"] = pack_digest(new_tensors, meta)
    save_file({k: v.contiguous() for k, v in new_tensors.items()}, str(out), metadata=meta)
    return out


def _refused(path, error, match=None):
    """Applying ``path`` to a fresh base model raises ``error`` and leaves the model as it was."""
    model, _ = tiny_model("llama")
    before = params(model)
    with pytest.raises(error, match=match):
        apply_edit_pack(model, path)
    assert_same_params(model, before)


# ---------------------------------------------------------------------------------------------
# Edit packs
# ---------------------------------------------------------------------------------------------
def test_a_signed_pack_round_trips_exactly(pack):
    path, editor = pack
    tensors, meta = _load(path)
    assert meta["digest"] == pack_digest(tensors, meta)
    assert meta["base_fingerprint"] == editor.base_fingerprint_
    model, _ = tiny_model("llama")
    applied = apply_edit_pack(model, path)
    assert_same_params(model, params(editor.model))
    assert applied["layers"] == list(editor.layers_) and applied["edit_ids"] == [0, 1]


def _unsigned_change(path, out, **fields):
    """The pack with metadata fields changed but its old digest kept (what damage looks like)."""
    tensors, meta = _load(path)
    save_file(tensors, str(out), metadata={**meta, **fields})
    return out


def test_the_digest_binds_the_base_fingerprint(pack, tmp_path):
    path, _ = pack
    tensors, meta = _load(path)
    other = "sha256:" + "0" * 64
    assert pack_digest(tensors, {**meta, "base_fingerprint": other}) != meta["digest"]
    # Re-pointing the pack at another base model without re-signing it is damage.
    _refused(_unsigned_change(path, tmp_path / "p.safetensors", base_fingerprint=other), EditPackError, "digest")


def test_a_flipped_exponent_bit_is_refused_before_any_write(pack, tmp_path):
    path, _ = pack
    data = bytearray(path.read_bytes())
    header_len = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + header_len])
    name = min(k for k in header if k != "__metadata__")
    entry = header[name]
    assert entry["dtype"] == "F64"
    tensors, _ = _load(path)
    index = int(tensors[name].abs().argmax())  # a nonzero entry: flipping its exponent makes it huge
    top_byte = 8 + header_len + entry["data_offsets"][0] + 8 * index + 7  # little-endian: sign + exponent
    data[top_byte] ^= 0x40  # the exponent's highest bit: |x| < 1 becomes about x * 2^1024
    damaged = tmp_path / "flipped.safetensors"
    damaged.write_bytes(bytes(data))
    assert not torch.isfinite(_load(damaged)[0][name].float()).all()  # in the model's dtype: inf
    _refused(damaged, EditPackError, "digest")


def test_a_resigned_row_delta_is_a_shape_error(pack, tmp_path):
    path, editor = pack
    layer = editor.layers_[0]
    d_v = editor.solvers_[layer].shape[1]
    forged = _forge(path, tmp_path / "row.safetensors",
                    tensors={f"layer{layer}": torch.full((1, d_v), 1e-3, dtype=torch.float64)})
    _refused(forged, ShapeError, r"\(d_k, d_v\)")


def test_a_resigned_transposed_delta_is_a_shape_error(pack, tmp_path):
    path, editor = pack
    layer = editor.layers_[0]
    tensors, _ = _load(path)
    forged = _forge(path, tmp_path / "t.safetensors", tensors={f"layer{layer}": tensors[f"layer{layer}"].T})
    _refused(forged, ShapeError, "row-key")


@pytest.mark.parametrize("value", [float("inf"), float("nan"), 1e39])  # 1e39: finite in float64, inf in float32
def test_a_resigned_non_finite_delta_is_refused(pack, tmp_path, value):
    path, editor = pack
    layer = editor.layers_[-1]
    delta = _load(path)[0][f"layer{layer}"].clone()
    delta[0, 0] = value
    forged = _forge(path, tmp_path / "nf.safetensors", tensors={f"layer{layer}": delta})
    _refused(forged, NonFiniteError)


def test_a_resigned_integer_delta_is_refused(pack, tmp_path):
    path, editor = pack
    layer = editor.layers_[0]
    shape = editor.solvers_[layer].shape
    forged = _forge(path, tmp_path / "int.safetensors",
                    tensors={f"layer{layer}": torch.zeros(shape, dtype=torch.int64)})
    _refused(forged, EditPackError, "floating")


@pytest.mark.parametrize("fields", [
    {"origin": "somewhere"},  # unknown field
    {"facts": None},  # missing field
    {"layers": "[1, 2"},  # not JSON
    {"layers": "[1, 99]"},  # out of range
    {"layers": "[true]"},  # bools are not layer indices
    {"layers": "[2, 1]"},  # not ascending
    {"edit_ids": '["a"]'},
    {"facts": '"Toyota"'},
    {"base_fingerprint": "abc"},
    {"spec": "{}"},
])
def test_resigned_bad_metadata_is_a_typed_error(pack, tmp_path, fields):
    path, _ = pack
    forged = _forge(path, tmp_path / "meta.safetensors", metadata=fields)
    _refused(forged, EditPackError)


def test_a_tensor_the_metadata_does_not_name_is_refused(pack, tmp_path):
    path, editor = pack
    shape = editor.solvers_[editor.layers_[0]].shape
    unedited = next(l for l in range(editor.spec_.n_layers) if l not in editor.layers_)
    forged = _forge(path, tmp_path / "extra.safetensors",
                    tensors={f"layer{unedited}": torch.zeros(shape, dtype=torch.float64)})
    _refused(forged, EditPackError, "do not match the layers")


def test_a_pack_for_another_base_model_is_a_state_mismatch(pack):
    path, _ = pack
    other, _ = tiny_model("llama", seed=1)
    before = params(other)
    with pytest.raises(StateMismatchError, match="not the base model"):
        apply_edit_pack(other, path)
    assert_same_params(other, before)


def test_an_unreadable_file_is_a_typed_error(tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    _refused(junk, EditPackError, "not a readable")


def test_an_unsigned_pack_is_still_applied_with_a_warning(pack, tmp_path, caplog):
    """Packs written before the digest existed stay readable (and are still validated)."""
    path, editor = pack
    unsigned = _forge(path, tmp_path / "old.safetensors", sign=False)
    assert "digest" not in _load(unsigned)[1]
    model, _ = tiny_model("llama")
    with caplog.at_level(logging.WARNING, logger="rlsedit_llm.editing.packs"):
        apply_edit_pack(model, unsigned)
    assert "carries no digest" in caplog.text
    assert_same_params(model, params(editor.model))

    layer = editor.layers_[0]
    d_v = editor.solvers_[layer].shape[1]
    forged = _forge(path, tmp_path / "old_row.safetensors", sign=False,
                    tensors={f"layer{layer}": torch.zeros(1, d_v, dtype=torch.float64)})
    _refused(forged, ShapeError)


def test_a_pack_that_overflows_a_float16_model_is_refused(tmp_path):
    model, _ = tiny_model("llama", dtype=torch.float16)
    spec = detect_spec(model)
    layer = spec.default_layers[0]
    W = read_weight(get_module(model, spec.edit_module_path.format(layer)))
    deltas = {layer: torch.full(W.shape, 1e5, dtype=torch.float64)}  # finite in float64, inf in float16
    fingerprint = model_fingerprint(model)
    path = write_edit_pack(tmp_path / "big.safetensors", deltas, spec=spec, base_fingerprint=fingerprint,
                           edited_fingerprint=fingerprint, edit_ids=[0], facts=[])
    before = params(model)
    with pytest.raises(NonFiniteError, match="float16"):
        apply_edit_pack(model, path)
    assert_same_params(model, before)


def test_writing_a_pack_refuses_deltas_that_overflow_its_dtype(tmp_path):
    model, _ = tiny_model("llama")
    spec = detect_spec(model)
    fingerprint = model_fingerprint(model)
    d_k, d_v = spec.d_k, spec.d_model
    with pytest.raises(NonFiniteError):
        write_edit_pack(tmp_path / "p.safetensors", {1: torch.full((d_k, d_v), 1e6, dtype=torch.float64)},
                        spec=spec, base_fingerprint=fingerprint, edited_fingerprint=fingerprint, edit_ids=[0],
                        facts=[], dtype=torch.float16)
    assert not (tmp_path / "p.safetensors").exists()


# ---------------------------------------------------------------------------------------------
# Finite in the model's dtype, not only in float64
# ---------------------------------------------------------------------------------------------
def test_write_weight_refuses_what_overflows_the_modules_dtype():
    module = nn.Linear(4, 3).half()
    before = module.weight.detach().clone()
    W = torch.full((4, 3), 1e5, dtype=torch.float64)  # (d_k, d_v); float16 tops out at 65504
    with pytest.raises(NonFiniteError, match="overflows the model's dtype torch.float16"):
        write_weight(module, W)
    assert torch.equal(module.weight, before)
    write_weight(module, torch.full((4, 3), 6e4, dtype=torch.float64))  # in range: written
    assert torch.equal(module.weight, torch.full((3, 4), 6e4, dtype=torch.float16))


def test_an_edit_that_overflows_a_float16_model_changes_nothing(stats_dir):
    model, tok = tiny_model("llama", dtype=torch.float16)
    editor = Editor(model, tok, config(stats_dir))
    editor.prepare()
    before = snapshot(editor)
    d_k, d_v = editor.solvers_[editor.layers_[0]].shape
    gen = torch.Generator().manual_seed(0)
    keys = {l: torch.randn(len(FIRST), d_k, generator=gen) for l in editor.layers_}
    values = {l: torch.full((len(FIRST), d_v), 1e9) for l in editor.layers_}  # weights far beyond 65504
    with pytest.raises(NonFiniteError, match="float16"):
        editor.absorb(FIRST, keys, values)
    assert_same(before, snapshot(editor))
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# Regularisers the state dtype cannot carry
# ---------------------------------------------------------------------------------------------
def test_a_negligible_regulariser_is_refused_before_the_first_edit(stats_dir):
    model, tok = tiny_model("llama")
    pristine = params(model)
    editor = Editor(model, tok, config(stats_dir, alpha=1e-300, mom2_weight=1e-300))
    with pytest.raises(HyperparameterError, match="too weak"):
        editor.edit(FIRST)
    assert editor.journal_ == [] and editor.solvers_ == {}
    assert_same_params(model, pristine)


def test_a_batch_next_to_which_the_regulariser_is_negligible_is_refused_by_the_solver():
    """The solver's own check, for a state built without the editor's: nothing is changed."""
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(64, 12, generator=gen, dtype=torch.float64)
    solver = LayerRLS(torch.randn(12, 5, generator=gen, dtype=torch.float64), 1e-300, 1e-300, X.mT @ X)
    before = solver.clone()
    K = 1e3 * torch.randn(4, 12, generator=gen, dtype=torch.float64)
    with pytest.raises(HyperparameterError, match="raise alpha or the anchor weight"):
        solver.update(K, torch.randn(4, 5, generator=gen, dtype=torch.float64))
    assert torch.equal(solver.C_, before.C_) and torch.equal(solver.W_, before.W_) and solver.n_updates_ == 0


def test_a_rank_deficient_anchor_with_a_negligible_alpha_is_refused():
    gen = torch.Generator().manual_seed(0)
    X = 100 * torch.randn(3, 12, generator=gen, dtype=torch.float64)  # 3 tokens for d_k = 12: rank 3
    W0 = torch.randn(12, 5, generator=gen, dtype=torch.float64)
    # cond(A) ~ 1e5 / 1e-8 = 1e13: factorisable, but beyond what float64 carries (4.5e12)
    with pytest.raises(HyperparameterError, match="Raise alpha to at least"):
        LayerRLS(W0, 1e-8, 1.0, X.mT @ X)
    with pytest.raises(RLSEditError, match="(?i)raise alpha"):  # not even factorisable
        LayerRLS(W0, 1e-300, 1.0, X.mT @ X)
    LayerRLS(W0, 1e-3, 1.0, X.mT @ X)  # a real alpha fixes it


@pytest.mark.parametrize("kw", [dict(mom2_weight=1e-14), dict(beta=1e-20),
                                dict(mom2_weight=1e-5, state_dtype="float32")])
def test_alpha_zero_with_a_negligible_anchor_is_refused_by_the_config(kw):
    with pytest.raises(HyperparameterError, match="beta \\* mom2_weight"):
        EditConfig(alpha=0.0, **kw).validate()
    EditConfig(alpha=1e-3, **kw).validate()  # alpha > 0 depends on the keys: decided by the kernel


def test_the_published_settings_still_pass(stats_dir):
    for kw in ({}, dict(mom2_weight=15000.0), dict(state_dtype="float32"), dict(alpha=0.5)):
        EditConfig(**kw).validate()
    editor = fresh_editor(stats_dir, n_edits=2)  # alpha = 0, beta = 1, N scaled to d_k
    editor.undo(0)
    assert editor.certificate().holds()
    assert max_condition(torch.float64) == pytest.approx(1 / (1e3 * torch.finfo(torch.float64).eps))


# ---------------------------------------------------------------------------------------------
# The certificate judged by the state's own precision
# ---------------------------------------------------------------------------------------------
def test_a_float32_state_is_certified_after_an_ordinary_edit(stats_dir):
    editor = fresh_editor(stats_dir, state_dtype="float32")
    cert = editor.certificate()
    assert cert.holds(), str(cert)
    for layer in cert.layers:
        eps = torch.finfo(torch.float32).eps
        assert 1e-8 < layer.tolerance <= 1e-3 and layer.tolerance == pytest.approx(10 * eps * layer.condition)


def test_a_corrupted_float32_state_is_not_certified(stats_dir):
    editor = fresh_editor(stats_dir, state_dtype="float32")
    solver = editor.solvers_[editor.layers_[0]]
    with torch.no_grad():
        solver.C_.mul_(1 + 1e-2)  # C off by 1e-2, relative
    cert = editor.certificate()
    assert not cert.holds()
    assert cert.layers[0].drift > cert.layers[0].tolerance


def test_the_float64_tolerance_is_unchanged(stats_dir):
    cert = fresh_editor(stats_dir).certificate()
    assert all(layer.tolerance == 1e-8 for layer in cert.layers) and cert.holds()


# ---------------------------------------------------------------------------------------------
# Fine-tuning saves are loaded as tensors only
# ---------------------------------------------------------------------------------------------
class _Payload:
    """Stands for any object a pickle could smuggle in."""

    def __init__(self, weight):
        self.weight = weight


def _finetune_save(tmp_path):
    model, tok = tiny_model("llama")
    editor = FineTuneEditor(model, tok, layers=(1,), lr=1e-3, steps=1)
    editor.save(tmp_path)
    return editor


def test_finetune_load_asks_torch_for_tensors_only(tmp_path, monkeypatch):
    _finetune_save(tmp_path)
    seen = []
    real = torch.load

    def recording(*args, **kwargs):
        seen.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(finetune_mod.torch, "load", recording)
    model, tok = tiny_model("llama")
    FineTuneEditor.load(model, tok, tmp_path)
    assert seen and all(kw.get("weights_only") is True for kw in seen)


def test_finetune_load_refuses_pickled_objects(tmp_path):
    editor = _finetune_save(tmp_path)
    torch.save({1: _Payload(editor.W0_[1])}, tmp_path / "weights.pt")
    model, tok = tiny_model("llama")
    before = params(model)
    with pytest.raises(StateMismatchError, match="objects other than tensors"):
        FineTuneEditor.load(model, tok, tmp_path)
    assert_same_params(model, before)


# ---------------------------------------------------------------------------------------------
# Value settings
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw,field", [
    (dict(steps=True), "steps"), (dict(steps=0), "steps"), (dict(steps=10**9), "steps"), (dict(steps=2.0), "steps"),
    (dict(lr=float("inf")), "lr"), (dict(lr=1e9), "lr"), (dict(lr=float("nan")), "lr"), (dict(lr=True), "lr"),
    (dict(lr=0), "lr"), (dict(weight_decay=-1.0), "weight_decay"), (dict(weight_decay=float("inf")), "weight_decay"),
    (dict(clamp_norm_factor=float("inf")), "clamp_norm_factor"), (dict(kl_factor=float("nan")), "kl_factor"),
    (dict(early_stop_loss=-0.1), "early_stop_loss"),
])
def test_bad_value_settings_are_refused_naming_the_field(kw, field):
    bad = ValueConfig(**kw)
    with pytest.raises(HyperparameterError, match=rf"ValueConfig\.{field} must be"):
        bad.validate()
    with pytest.raises(HyperparameterError, match=rf"ValueConfig\.{field}"):  # so an Editor refuses it when built
        EditConfig(value=bad).validate()


def test_the_value_settings_in_use_still_pass():
    model, _ = tiny_model("llama")
    spec = detect_spec(model)
    for cfg in (ValueConfig(), default_value_config(spec), ValueConfig(steps=3), ValueConfig(lr=0.005, steps=40),
                ValueConfig(lr=0.5, steps=40, clamp_norm_factor=4.0),
                ValueConfig(early_stop_loss=0.0, weight_decay=0.0, kl_factor=0.0), ValueConfig(steps=10_000)):
        cfg.validate()
        EditConfig(value=cfg).validate()


def test_values_that_do_not_move_are_reported(caplog):
    model, tok = tiny_model("llama")
    spec = detect_spec(model)
    with caplog.at_level(logging.WARNING, logger="rlsedit_llm.pipeline.values"):
        result = compute_values(model, tok, spec, spec.default_layers[-1], NEXT, ["{}"],
                                ValueConfig(steps=1, early_stop_loss=0.0))
    assert result.steps_run == 0 and torch.equal(result.target, result.initial)
    assert "did not lower the target's NLL" in caplog.text and "takes no update" in caplog.text


def test_every_error_here_is_an_rlsedit_error():
    for cls in (EditPackError, ShapeError, NonFiniteError, HyperparameterError, StateMismatchError):
        assert issubclass(cls, RLSEditError)
    assert math.isfinite(max_condition(torch.float32))
