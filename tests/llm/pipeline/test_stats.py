"""Key statistics E[k kᵀ] (rlsedit_llm.pipeline.stats) and text corpora (rlsedit_llm.pipeline.corpus)."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlsedit_llm.adapters import fingerprint
from rlsedit_llm.errors import CorpusError, HyperparameterError, UnsupportedArchitectureError
from rlsedit_llm.pipeline import corpus as corpus_mod
from rlsedit_llm.pipeline import moment_pass, stats, token_stream
from rlsedit_llm.pipeline.corpus import SHIPPED_CORPORA, corpus_fingerprint, load_corpus, split_txt_documents
from rlsedit_llm.pipeline.stats import MomentSum, accumulate_second_moments, model_fingerprint, second_moments

_WORKER_PATH = Path(__file__).with_name("_stats_worker.py")
_spec = importlib.util.spec_from_file_location("_stats_worker", _WORKER_PATH)
W = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(W)

LAYERS = [0, 1, 2, 3]


@pytest.fixture(scope="module")
def tok():
    return W.tiny_tokenizer()


@pytest.fixture(scope="module")
def texts():
    return W.tiny_texts(80)


@pytest.fixture
def llama():
    return W.tiny_model("llama")


def _modules(model, template, layers=LAYERS):
    return {layer: model.get_submodule(template.format(layer)) for layer in layers}


def _count_forwards(model):
    counter = {"n": 0}

    def hook(*_):
        counter["n"] += 1

    model.register_forward_pre_hook(hook)
    return counter


# --------------------------------------------------------------------------------------------
# Reference: run each sequence alone (no padding), rebuild the key from the MLP input by hand.
# --------------------------------------------------------------------------------------------
def _reference_windows(tok, texts, max_tokens, max_length):
    windows, total = [], 0
    for doc in texts:
        ids = tok(doc, add_special_tokens=False)["input_ids"]
        for i in range(0, len(ids), max_length):
            w = ids[i : i + max_length][: max_tokens - total]
            if w:
                windows.append(w)
                total += len(w)
            if total == max_tokens:
                return windows
    raise AssertionError("test corpus too small")


def _manual_second_moments(model, family, tok, texts, layers, max_tokens, max_length):
    keys = {layer: [] for layer in layers}
    handles = []
    for layer in layers:
        if family == "llama":
            mlp = model.model.layers[layer].mlp

            def hook(mlp_mod, args, layer=layer):
                x = args[0]
                keys[layer].append(mlp_mod.act_fn(mlp_mod.gate_proj(x)) * mlp_mod.up_proj(x))

        else:
            mlp = model.transformer.h[layer].mlp

            def hook(mlp_mod, args, layer=layer):
                keys[layer].append(mlp_mod.act(mlp_mod.c_fc(args[0])))

        handles.append(mlp.register_forward_pre_hook(hook))
    model.eval()
    with torch.no_grad():
        for w in _reference_windows(tok, texts, max_tokens, max_length):
            model(input_ids=torch.tensor([w]))
    for h in handles:
        h.remove()
    out = {}
    for layer in layers:
        X = torch.cat([k.reshape(-1, k.shape[-1]) for k in keys[layer]]).double()  # (n, d_k)
        assert X.shape[0] == max_tokens
        out[layer] = X.T @ X / X.shape[0]
    return out


# ============================================================================================
# MomentSum
# ============================================================================================
def test_moment_sum_merge_mean_roundtrip():
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(7, 3, generator=g, dtype=torch.float64)
    a, b = MomentSum(A.T @ A, 5), MomentSum(B.T @ B, 7)
    both = a.merge(b)
    X = torch.cat([A, B])
    assert both.count == 12
    torch.testing.assert_close(both.mean(), X.T @ X / 12, rtol=0, atol=1e-14)
    back = MomentSum.from_tensors(both.to_tensors("p."), "p.")
    assert back.count == 12 and torch.equal(back.total, both.total)
    with pytest.raises(CorpusError):
        MomentSum.zeros(3).mean()
    with pytest.raises(ValueError):
        MomentSum(torch.zeros(3, 4), 0)


# ============================================================================================
# Hooked accumulation
# ============================================================================================
@pytest.mark.parametrize("family,template", [("llama", W.LLAMA_TEMPLATE), ("gpt2", W.GPT2_TEMPLATE)])
def test_hooked_accumulation_equals_manual(family, template, tok, texts):
    model = W.tiny_model(family)
    sums = accumulate_second_moments(
        model, tok, _modules(model, template), texts, max_tokens=700, max_length=32, batch_size=4,
        progress=False,
    )
    ref = _manual_second_moments(model, family, tok, texts, LAYERS, 700, 32)
    for layer in LAYERS:
        assert sums[layer].count == 700
        assert sums[layer].total.dtype == torch.float64
        d_k = 24 if family == "llama" else 64
        assert sums[layer].mean().shape == (d_k, d_k)
        torch.testing.assert_close(sums[layer].mean(), ref[layer], rtol=0, atol=1e-10)


def test_one_pass_equals_per_layer(llama, tok, texts):
    together = accumulate_second_moments(
        llama, tok, _modules(llama, W.LLAMA_TEMPLATE), texts, max_tokens=600, max_length=32, progress=False
    )
    for layer in LAYERS:
        alone = accumulate_second_moments(
            llama, tok, _modules(llama, W.LLAMA_TEMPLATE, [layer]), texts, max_tokens=600, max_length=32,
            progress=False,
        )
        assert alone[layer].count == together[layer].count == 600
        torch.testing.assert_close(alone[layer].total, together[layer].total, rtol=0, atol=1e-10)


def test_layers_above_last_edited_are_not_run(llama, tok, texts):
    top_calls = _count_forwards(llama.model.layers[3].mlp)
    head_calls = _count_forwards(llama.lm_head)
    accumulate_second_moments(
        llama, tok, _modules(llama, W.LLAMA_TEMPLATE, [0, 1]), texts, max_tokens=300, max_length=32, progress=False
    )
    assert top_calls["n"] == 0 and head_calls["n"] == 0
    accumulate_second_moments(
        llama, tok, _modules(llama, W.LLAMA_TEMPLATE, [3]), texts, max_tokens=300, max_length=32, progress=False
    )
    assert top_calls["n"] > 0 and head_calls["n"] == 0


def test_padding_is_masked(llama, tok, texts):
    # Documents of 5..90 words cut into 32-token windows: batches of 4 hold sequences of
    # different lengths, so padding is present and must not count.
    lengths = [len(tok(t, add_special_tokens=False)["input_ids"]) % 32 for t in texts]
    assert len(set(lengths)) > 5
    one = accumulate_second_moments(
        llama, tok, _modules(llama, W.LLAMA_TEMPLATE), texts, max_tokens=900, max_length=32, batch_size=1,
        progress=False,
    )
    four = accumulate_second_moments(
        llama, tok, _modules(llama, W.LLAMA_TEMPLATE), texts, max_tokens=900, max_length=32, batch_size=4,
        progress=False,
    )
    for layer in LAYERS:
        assert one[layer].count == four[layer].count == 900
        torch.testing.assert_close(one[layer].mean(), four[layer].mean(), rtol=0, atol=1e-10)


def test_truncate_mode_keeps_only_first_window(llama, tok, texts):
    short = [t for t in texts if len(t.split()) > 40][:12]
    sums = accumulate_second_moments(
        llama, tok, _modules(llama, W.LLAMA_TEMPLATE, [1]), short, max_tokens=12 * 32, max_length=32,
        overflow="truncate", progress=False,
    )
    firsts = [" ".join(t.split()[:32]) for t in short]  # one token per word
    ref = accumulate_second_moments(
        llama, tok, _modules(llama, W.LLAMA_TEMPLATE, [1]), firsts, max_tokens=12 * 32, max_length=32,
        progress=False,
    )
    torch.testing.assert_close(sums[1].total, ref[1].total, rtol=0, atol=1e-10)
    with pytest.raises(CorpusError, match="fewer than"):
        accumulate_second_moments(
            llama, tok, _modules(llama, W.LLAMA_TEMPLATE, [1]), short, max_tokens=12 * 32 + 1, max_length=32,
            overflow="truncate", progress=False,
        )


def test_start_and_skip_continue_a_run(llama, tok, texts):
    mods = _modules(llama, W.LLAMA_TEMPLATE, [2])
    full = accumulate_second_moments(llama, tok, mods, texts, max_tokens=500, max_length=32, progress=False)
    plan = token_stream.plan_sequences(tok, texts, max_tokens=500, max_length=32, overflow="split",
                                       checkpoint_every=None)
    head = dataclasses.replace(plan, seqs=plan.seqs[:6], checkpoints=[], n_tokens=plan.tokens_before(6))
    first = moment_pass.accumulate(
        llama, mods, head, batch_size=8,
        dtype=torch.float64, progress=False, start=None, skip_sequences=0,
    )
    rest = accumulate_second_moments(
        llama, tok, mods, texts, max_tokens=500, max_length=32, progress=False, start=first, skip_sequences=6
    )
    assert rest[2].count == 500
    torch.testing.assert_close(rest[2].total, full[2].total, rtol=0, atol=1e-10)


def test_model_state_left_untouched(tok, texts):
    model = W.tiny_model("gpt2")
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    n_hooks = sum(len(m._forward_pre_hooks) for m in model.modules())
    accumulate_second_moments(
        model, tok, _modules(model, W.GPT2_TEMPLATE), texts, max_tokens=200, max_length=32, progress=False
    )
    assert model.training and all(m.training for m in model.modules())
    assert sum(len(m._forward_pre_hooks) for m in model.modules()) == n_hooks
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_hooks_removed_after_an_error(llama, tok, texts):
    def boom(*_):
        raise RuntimeError("boom")

    llama.model.layers[0].register_forward_pre_hook(boom)
    with pytest.raises(RuntimeError, match="boom"):
        accumulate_second_moments(
            llama, tok, _modules(llama, W.LLAMA_TEMPLATE), texts, max_tokens=100, max_length=32, progress=False
        )
    assert all(len(llama.get_submodule(W.LLAMA_TEMPLATE.format(l))._forward_pre_hooks) == 0 for l in LAYERS)


def test_typed_errors(llama, tok, texts, tmp_path):
    with pytest.raises(HyperparameterError):
        accumulate_second_moments(llama, tok, {}, texts, max_tokens=10, progress=False)
    with pytest.raises(ValueError):  # no layers is a ValueError
        second_moments(llama, tok, W.LLAMA_TEMPLATE, [], corpus=texts, cache_dir=tmp_path)
    with pytest.raises(CorpusError, match="fewer than"):
        second_moments(llama, tok, W.LLAMA_TEMPLATE, [0], corpus=texts[:2], n_tokens=10_000, cache_dir=tmp_path,
                       progress=False)
    with pytest.raises(CorpusError):
        second_moments(llama, tok, W.LLAMA_TEMPLATE, [0], corpus=["", "   "], n_tokens=5, cache_dir=tmp_path,
                       progress=False)
    with pytest.raises(UnsupportedArchitectureError):
        second_moments(llama, tok, "transformer.h.{}.mlp.c_proj", [0], corpus=texts, n_tokens=5, cache_dir=tmp_path)
    with pytest.raises(UnsupportedArchitectureError):
        second_moments(llama, tok, W.LLAMA_TEMPLATE, [7], corpus=texts, n_tokens=5, cache_dir=tmp_path)
    with pytest.raises(UnsupportedArchitectureError):  # not a Linear/Conv1D
        second_moments(llama, tok, "model.layers.{}.mlp", [0], corpus=texts, n_tokens=5, cache_dir=tmp_path)
    with pytest.raises(HyperparameterError):
        second_moments(llama, tok, "model.layers.0.mlp.down_proj", [0], corpus=texts, cache_dir=tmp_path)
    with pytest.raises(HyperparameterError):
        second_moments(llama, tok, W.LLAMA_TEMPLATE, [0], corpus=texts, dtype=torch.float16, cache_dir=tmp_path)
    with pytest.raises(HyperparameterError):
        second_moments(llama, tok, W.LLAMA_TEMPLATE, [0], corpus=texts, n_tokens=0, cache_dir=tmp_path)
    assert not any(tmp_path.iterdir())  # nothing written for bad input


# ============================================================================================
# second_moments: spec handling, caching, resumption, corruption
# ============================================================================================
def _sm(model, tok, corpus, cache, **kw):
    kw = {"n_tokens": 800, "max_length": 32, "batch_size": 4, "progress": False, "dtype": torch.float64, **kw}
    return second_moments(model, tok, W.LLAMA_TEMPLATE, kw.pop("layers", [1, 3]), corpus=corpus, cache_dir=cache, **kw)


def test_second_moments_matches_accumulation_and_accepts_specs(llama, tok, texts, tmp_path):
    ref = accumulate_second_moments(
        llama, tok, _modules(llama, W.LLAMA_TEMPLATE, [1, 3]), texts, max_tokens=800, max_length=32, progress=False
    )
    out = _sm(llama, tok, texts, tmp_path / "a", dtype=torch.float32)
    for layer in (1, 3):
        assert out[layer].dtype == torch.float32 and out[layer].shape == (24, 24)
        torch.testing.assert_close(out[layer], ref[layer].mean().float(), rtol=0, atol=0)
    spec = types.SimpleNamespace(edit_module_path=W.LLAMA_TEMPLATE)  # a ModelSpec-like object
    via_spec = second_moments(llama, tok, spec, [3], corpus=texts, n_tokens=800, max_length=32, batch_size=4,
                              cache_dir=tmp_path / "b", progress=False, dtype=torch.float64)
    via_dict = second_moments(llama, tok, {3: W.LLAMA_TEMPLATE.format(3)}, [3], corpus=texts, n_tokens=800,
                              max_length=32, batch_size=4, cache_dir=tmp_path / "c", progress=False,
                              dtype=torch.float64)
    torch.testing.assert_close(via_spec[3], ref[3].mean(), rtol=0, atol=1e-10)
    assert torch.equal(via_spec[3], via_dict[3])


def test_cache_hit_and_key(llama, tok, texts, tmp_path):
    calls = _count_forwards(llama)
    first = _sm(llama, tok, texts, tmp_path)
    n_first = calls["n"]
    assert n_first > 0
    files = sorted(p.name for p in tmp_path.rglob("*") if p.is_file())
    assert len([f for f in files if f.endswith(".safetensors")]) == 2
    assert len([f for f in files if f.endswith(".json")]) == 2
    assert not [f for f in files if "partial" in f or f.endswith(".tmp")]
    meta = json.loads(next(tmp_path.rglob("*.json")).read_text())
    assert meta["n_tokens"] == 800 and meta["count"] == 800 and meta["max_length"] == 32
    assert meta["model"] == model_fingerprint(llama)

    again = _sm(llama, tok, texts, tmp_path)
    assert calls["n"] == n_first  # served from the cache
    assert all(torch.equal(first[l], again[l]) for l in (1, 3))

    partly = _sm(llama, tok, texts, tmp_path, layers=[1, 2, 3])  # only layer 2 is computed
    assert calls["n"] > n_first
    assert torch.equal(partly[1], first[1])

    for change in ({"n_tokens": 700}, {"max_length": 16}, {"dtype": torch.float32},
                   {"overflow": "truncate", "n_tokens": 300}):
        before = calls["n"]
        _sm(llama, tok, texts, tmp_path, **change)
        assert calls["n"] > before, change
    before = calls["n"]
    _sm(llama, tok, texts[::-1], tmp_path)  # another corpus
    assert calls["n"] > before
    before = calls["n"]
    with torch.no_grad():
        llama.model.layers[0].mlp.up_proj.weight[0, 0] += 1e-3  # another model
    _sm(llama, tok, texts, tmp_path)
    assert calls["n"] > before


def test_cache_uses_xdg_cache_home(llama, tok, texts, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert stats.default_stats_dir() == tmp_path / "xdg" / "rlsedit" / "stats"
    second_moments(llama, tok, W.LLAMA_TEMPLATE, [0], corpus=texts, n_tokens=50, max_length=32, progress=False)
    assert len(list((tmp_path / "xdg" / "rlsedit" / "stats").rglob("*.safetensors"))) == 1


def test_corpus_source_by_path(llama, tok, texts, tmp_path):
    path = tmp_path / "docs.txt"
    path.write_text("\n\n".join(texts))
    by_path = _sm(llama, tok, str(path), tmp_path / "c1")
    by_list = _sm(llama, tok, texts, tmp_path / "c2")
    by_dataset = _sm(llama, tok, load_corpus(path), tmp_path / "c3")
    assert all(torch.equal(by_path[l], by_list[l]) for l in (1, 3))
    assert all(torch.equal(by_dataset[l], by_list[l]) for l in (1, 3))


class _Interrupt(Exception):
    pass


def test_resume_after_interruption(llama, tok, texts, tmp_path):
    kw = {"n_tokens": 2000, "checkpoint_every": 0.2, "checkpoint_min_seconds": 0.0}
    calls = _count_forwards(llama)
    reference = _sm(llama, tok, texts, tmp_path / "ref", **kw)
    n_full = calls["n"]

    # Crash in the middle of the second segment: the first checkpoint (20 %) is on disk.
    calls["n"] = 0
    plan = token_stream.plan_sequences(tok, texts, max_tokens=2000, max_length=32, overflow="split",
                                       checkpoint_every=0.2)
    first_ckpt = plan.checkpoints[0]
    crash_at = -(-first_ckpt // 4) + 2  # forward passes of segment 1, then two more

    def crash(*_):
        if calls["n"] >= crash_at:
            raise _Interrupt

    handle = llama.register_forward_pre_hook(crash)
    with pytest.raises(_Interrupt):
        _sm(llama, tok, texts, tmp_path / "run", **kw)
    handle.remove()
    partial = list((tmp_path / "run").rglob("*-partial.json"))
    assert len(partial) == 1 and json.loads(partial[0].read_text())["position"] == first_ckpt
    assert not list((tmp_path / "run").rglob("*.tmp"))

    calls["n"] = 0
    resumed = _sm(llama, tok, texts, tmp_path / "run", **kw)
    assert 0 < calls["n"] < n_full
    assert calls["n"] == n_full - -(-first_ckpt // 4)
    for layer in (1, 3):
        assert torch.equal(resumed[layer], reference[layer])  # bit-identical to one pass
    assert not list((tmp_path / "run").rglob("*-partial*"))  # checkpoint removed once done


def test_resume_false_and_corrupt_checkpoint_recompute(llama, tok, texts, tmp_path):
    kw = {"n_tokens": 2000, "checkpoint_every": 0.2, "checkpoint_min_seconds": 0.0}
    reference = _sm(llama, tok, texts, tmp_path / "ref", **kw)
    calls = _count_forwards(llama)
    for mode in ("resume_false", "corrupt"):
        cache = tmp_path / mode
        calls["n"] = 0

        def crash(*_):
            if calls["n"] >= 12:
                raise _Interrupt

        handle = llama.register_forward_pre_hook(crash)
        with pytest.raises(_Interrupt):
            _sm(llama, tok, texts, cache, **kw)
        handle.remove()
        (ckpt,) = cache.rglob("*-partial.safetensors")
        if mode == "corrupt":
            blob = bytearray(ckpt.read_bytes())
            blob[-5] ^= 0xFF  # one flipped byte in the float64 sums
            ckpt.write_bytes(bytes(blob))
        calls["n"] = 0
        out = _sm(llama, tok, texts, cache, resume=(mode != "resume_false"), **kw)
        full = calls["n"]
        calls["n"] = 0
        _sm(llama, tok, texts, tmp_path / f"{mode}-fresh", **kw)
        assert full == calls["n"]  # everything recomputed
        for layer in (1, 3):
            torch.testing.assert_close(out[layer], reference[layer], rtol=0, atol=1e-10)


@pytest.mark.parametrize("damage", ["flip", "truncate", "bad_json", "no_json", "other_key"])
def test_corrupt_cache_is_rebuilt(llama, tok, texts, tmp_path, damage):
    calls = _count_forwards(llama)
    good = _sm(llama, tok, texts, tmp_path, layers=[2])
    (data,) = tmp_path.rglob("*.safetensors")
    meta = data.with_suffix(".json")
    if damage == "flip":
        blob = bytearray(data.read_bytes())
        blob[len(blob) // 2] ^= 0x01  # a single bit inside the tensor data
        data.write_bytes(bytes(blob))
    elif damage == "truncate":
        data.write_bytes(data.read_bytes()[:-100])
    elif damage == "bad_json":
        meta.write_text("{not json")
    elif damage == "no_json":
        meta.unlink()  # a crash between the two atomic writes
    elif damage == "other_key":
        m = json.loads(meta.read_text())
        m["key"] = "0" * 64
        meta.write_text(json.dumps(m))
    (data.parent / f".{data.name}.abc.tmp").write_bytes(b"half-written")  # a leftover temp file
    calls["n"] = 0
    rebuilt = _sm(llama, tok, texts, tmp_path, layers=[2])
    assert calls["n"] > 0  # never trusted
    assert torch.equal(rebuilt[2], good[2])
    calls["n"] = 0
    _sm(llama, tok, texts, tmp_path, layers=[2])
    assert calls["n"] == 0  # the rebuilt entry is valid again


# ============================================================================================
# Fingerprints
# ============================================================================================
def test_model_fingerprint():
    torch.manual_seed(0)
    big = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.LayerNorm(512))  # 1 MiB weight: sampled
    fp = model_fingerprint(big)
    assert fp.startswith("sha256:") and fp == model_fingerprint(big)
    old = big[0].weight[301, 77].item()
    with torch.no_grad():
        big[0].weight[301, 77] = old + 1.0  # a single element, almost surely outside the sampled blocks
    fp2 = model_fingerprint(big)
    assert fp2 != fp
    with torch.no_grad():
        big[0].weight[301, 77] = old
    assert model_fingerprint(big) == fp
    with torch.no_grad():
        big[1].bias[3] = 0.5  # a small tensor, hashed whole
    assert model_fingerprint(big) != fp
    assert model_fingerprint(big.double()) != model_fingerprint(big.float())


def test_fingerprint_word_checksum_is_exact():
    x = torch.randn(1000, dtype=torch.float32)
    words = x.view(torch.int32).to(torch.int64)
    assert fingerprint._word_checksum(fingerprint._tensor_bytes(x)) == int(words.sum())


# ============================================================================================
# Two processes (gloo): sharded sums all-reduced equal the one-process pass
# ============================================================================================
def test_two_process_gloo_equals_single_process(tok, texts, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(texts))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(_WORKER_PATH), str(corpus), str(tmp_path / "cache"), str(out_dir),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    model = W.tiny_model("llama")
    calls = _count_forwards(model)
    single = second_moments(
        model, tok, W.LLAMA_TEMPLATE, [0, 2, 3], corpus=str(corpus), n_tokens=1500, max_length=32,
        dtype=torch.float64, cache_dir=tmp_path / "single", progress=False, distributed=False, batch_size=4,
    )
    ranks = [load_file(out_dir / f"rank{r}.safetensors") for r in (0, 1)]
    for r in ranks:
        assert int(r["world"]) == 2
        assert 0 < int(r["forwards"]) < calls["n"]  # each rank ran only its shard
        for layer in (0, 2, 3):
            torch.testing.assert_close(r[f"mean{layer}"], single[layer], rtol=0, atol=1e-10)
    assert int(ranks[0]["forwards"]) + int(ranks[1]["forwards"]) >= calls["n"]
    # Only rank 0 wrote the cache: one entry per layer, readable by a later single process.
    assert len(list((tmp_path / "cache").rglob("*.safetensors"))) == 3
    calls["n"] = 0
    cached = second_moments(
        model, tok, W.LLAMA_TEMPLATE, [0, 2, 3], corpus=str(corpus), n_tokens=1500, max_length=32,
        dtype=torch.float64, cache_dir=tmp_path / "cache", progress=False, distributed=False,
    )
    assert calls["n"] == 0
    assert all(torch.equal(cached[l], ranks[0][f"mean{l}"]) for l in (0, 2, 3))


# ============================================================================================
# Corpora
# ============================================================================================
def test_shipped_enwiki_sample():
    ds = load_corpus("enwiki_sample")
    assert len(ds) == 97 and ds.column_names == ["title", "text"]
    assert ds[0]["title"] == "Anarchism"
    assert ds[0]["text"].startswith("Anarchism is a political philosophy")
    assert not any(t.startswith("= ") for t in ds["text"])
    assert sum(len(t.split()) for t in ds["text"]) > 300_000
    path = corpus_mod._DATA_DIR / SHIPPED_CORPORA["enwiki_sample"]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == (
        "9d653b38115754cbd391658612d1556ba490f813335f28388d349a482af305c6"
    )
    assert "CC BY-SA 3.0" in (path.parent / "README.md").read_text()
    fp = corpus_fingerprint("enwiki_sample")
    assert fp.startswith("sha256:") and fp == corpus_fingerprint("enwiki_sample")


def test_split_txt_documents_rules():
    assert split_txt_documents("= A =\nx\ny\n= = Sec = =\nz\n= B =\n\n= C =\nw") == [
        ("A", "x\ny\n= = Sec = =\nz"), ("C", "w")]
    assert split_txt_documents("p1 a\np1 b\n\n\np2\n  \n") == [("", "p1 a\np1 b"), ("", "p2")]
    assert split_txt_documents("l1\nl2\n") == [("", "l1"), ("", "l2")]


def test_local_corpus_kinds(tmp_path):
    import datasets

    rows = [{"body": "first doc", "id": 1}, {"body": "second doc", "id": 2}]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "c.json").write_text(json.dumps(rows))
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "c.parquet"))
    hf_cache = tmp_path / "hf"
    for name in ("c.jsonl", "c.json", "c.parquet"):
        ds = load_corpus(tmp_path / name, text_field="body", cache_dir=hf_cache)
        assert ds.column_names == ["text"] and ds["text"] == ["first doc", "second doc"], name
    with pytest.raises(CorpusError, match="no column 'text'"):
        load_corpus(tmp_path / "c.jsonl", cache_dir=hf_cache)
    folder = tmp_path / "dir"
    folder.mkdir()
    (folder / "b.txt").write_text("= B =\nbeta")
    (folder / "a.txt").write_text("= A =\nalpha")
    ds = load_corpus(folder)
    assert ds["title"] == ["A", "B"] and ds["text"] == ["alpha", "beta"]
    fp = corpus_fingerprint(folder)
    (folder / "a.txt").write_text("= A =\nalpha!")
    assert corpus_fingerprint(folder) != fp
    assert corpus_fingerprint(tmp_path / "c.jsonl") != corpus_fingerprint(tmp_path / "c.jsonl", text_field="body")
    (folder / "c.json").write_text("[]")
    with pytest.raises(CorpusError, match="mixes"):
        load_corpus(folder)
    with pytest.raises(CorpusError, match="does not exist"):
        load_corpus(tmp_path / "missing.txt")
    (tmp_path / "e.txt").write_text("\n  \n")
    with pytest.raises(CorpusError, match="no document"):
        load_corpus(tmp_path / "e.txt")
    with pytest.raises(CorpusError, match="single split"):
        load_corpus("enwiki_sample", split="test")


def test_hub_corpus_offline_raises_corpus_error(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'someone/corpus' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(CorpusError, match="local .txt"):
        load_corpus("someone/corpus")
    a = corpus_fingerprint("someone/corpus", revision="abc")
    assert a != corpus_fingerprint("someone/corpus", revision="def")
    assert a != corpus_fingerprint("someone/corpus", revision="abc", split="validation")


# ============================================================================================
# Real SmolLM2 (slow)
# ============================================================================================
@pytest.mark.slow
def test_smollm2_second_moments(tmp_path):
    from rlsedit_llm.adapters.loading import load_model
    from rlsedit_llm.adapters.spec import detect_spec
    model, tokenizer = load_model("smollm2")[:2]
    spec = detect_spec(model)
    layers = list(spec.default_layers)[:2]
    t0 = time.perf_counter()
    means = second_moments(
        model, tokenizer, spec, layers, n_tokens=5000, max_length=512, cache_dir=tmp_path, progress=False
    )
    elapsed = time.perf_counter() - t0
    for layer in layers:
        S = means[layer].double()
        assert S.shape == (spec.d_k, spec.d_k) and means[layer].dtype == torch.float32
        assert torch.isfinite(S).all()
        torch.testing.assert_close(S, S.T, rtol=0, atol=1e-6 * S.abs().max().item())
        eig = torch.linalg.eigvalsh(S)
        assert eig.min() > -1e-5 * eig.max()
        assert eig.max() > 0
    print(f"SmolLM2 second moments: 2 layers, 5000 tokens in {elapsed:.1f} s ({5000 / elapsed:.0f} tokens/s)")


def test_checkpoints_are_skipped_when_the_pass_is_shorter_than_a_write_is_worth(llama, tok, texts, tmp_path):
    """With checkpoint_min_seconds above the pass's length nothing partial is written, and the sums
    are bit-identical to a run that wrote every checkpoint (the batches do not depend on writes)."""
    kw = {"n_tokens": 2000, "checkpoint_every": 0.2}
    written = _sm(llama, tok, texts, tmp_path / "every", checkpoint_min_seconds=0.0, **kw)
    calls = _count_forwards(llama)
    calls["n"] = 0

    def crash(*_):
        if calls["n"] >= 12:  # past the first checkpoint position
            raise _Interrupt

    handle = llama.register_forward_pre_hook(crash)
    with pytest.raises(_Interrupt):
        _sm(llama, tok, texts, tmp_path / "rare", checkpoint_min_seconds=3600.0, **kw)
    handle.remove()
    assert not list((tmp_path / "rare").rglob("*-partial*"))
    rare = _sm(llama, tok, texts, tmp_path / "rare", checkpoint_min_seconds=3600.0, **kw)
    for layer in (1, 3):
        assert torch.equal(rare[layer], written[layer])


@pytest.mark.parametrize("bad", [-1.0, float("nan"), "60"])
def test_checkpoint_min_seconds_must_be_a_number_at_least_zero(llama, tok, texts, tmp_path, bad):
    with pytest.raises(HyperparameterError, match="checkpoint_min_seconds"):
        _sm(llama, tok, texts, tmp_path, checkpoint_min_seconds=bad)
    assert not list(tmp_path.rglob("*.safetensors"))  # nothing computed or written
