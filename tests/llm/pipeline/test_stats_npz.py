"""MEMIT/ROME .npz layer statistics: read and validated, bound to a model by fingerprint, used by
the editor instead of a statistics pass, and ours exported in the same format."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import rlsedit_llm
from rlsedit_llm.adapters.spec import detect_spec
from rlsedit_llm.adapters.tiny import tiny_model
from rlsedit_llm.errors import NonFiniteError, ShapeError, StateMismatchError
from rlsedit_llm.pipeline import stats_npz
from rlsedit_llm.pipeline.moments import MomentSum
from rlsedit_llm.pipeline.stats import second_moments


def _rome_file(path, total: np.ndarray, count, *, combined: bool = True):
    """A file as ROME's layer_stats writes it (CombinedStat of one SecondMoment), by hand."""
    keys = {"mom2.mom2": total, "mom2.count": np.asarray(count), "mom2.constructor": np.asarray("SecondMoment()"),
            "constructor": np.asarray("CombinedStat()")} if combined else {"mom2": total, "count": np.asarray(count)}
    np.savez(path, **keys)


def _sums(d_k, n=500, seed=0):
    rng = np.random.default_rng(seed)
    K = rng.normal(size=(n, d_k))
    return (K.T @ K).astype(np.float32), n


@pytest.fixture
def model_spec():
    model, tok = tiny_model("llama")
    spec = detect_spec(model)
    return model, tok, spec


def test_read_rome_file_both_layouts(tmp_path, model_spec):
    _, _, spec = model_spec
    total, n = _sums(spec.d_k)
    for combined in (True, False):
        path = tmp_path / f"f{combined}.npz"
        _rome_file(path, total, n, combined=combined)
        m = stats_npz.read_layer_stats(path, d_k=spec.d_k)
        assert m.count == n and torch.allclose(m.mean(), torch.from_numpy(total.astype(np.float64)) / n)


@pytest.mark.parametrize("case, error", [
    ("shape", ShapeError), ("count0", ShapeError), ("nan", NonFiniteError), ("asym", StateMismatchError),
    ("neg", StateMismatchError), ("keys", ShapeError), ("ints", ShapeError), ("garbage", ShapeError)])
def test_read_refuses_bad_files(tmp_path, model_spec, case, error):
    _, _, spec = model_spec
    total, n = _sums(spec.d_k)
    path = tmp_path / "bad.npz"
    if case == "shape":
        _rome_file(path, total[:-1, :-1], n)
    elif case == "count0":
        _rome_file(path, total, 0)
    elif case == "nan":
        total[0, 0] = np.nan
        _rome_file(path, total, n)
    elif case == "asym":
        total[0, 1] += 10 * np.abs(total).max()
        _rome_file(path, total, n)
    elif case == "neg":
        _rome_file(path, -total, n)
    elif case == "keys":
        np.savez(path, something=total)
    elif case == "ints":
        _rome_file(path, total.astype(np.int64), n)
    else:
        path.write_bytes(b"not a zip file")
    with pytest.raises(error):
        stats_npz.read_layer_stats(path, d_k=spec.d_k)


def test_bound_stats_drive_the_editor_and_are_refused_for_other_weights(tmp_path, model_spec):
    model, tok, spec = model_spec
    layers = list(spec.default_layers)
    folder = tmp_path / "memit_stats"
    folder.mkdir()
    for layer in layers:  # files in ROME's names, as a MEMIT user has them
        total, n = _sums(spec.d_k, seed=layer)
        _rome_file(folder / stats_npz.stats_file_name(spec.edit_module_path.format(layer), n), total, n)
    cfg = rlsedit_llm.EditConfig(precomputed_stats=str(folder), n_templates=1, template_length=4,
                                 value=rlsedit_llm.ValueConfig(steps=3))
    with pytest.raises(StateMismatchError, match="bind"):  # unbound: refused, nothing changed
        rlsedit_llm.Editor(model, tok, cfg).edit([{"prompt": "{} lives in", "subject": "Alice", "target": "Paris"}])
    stats_npz.bind_stats(model, spec, layers, folder)
    editor = rlsedit_llm.Editor(model, tok, cfg, take_over=True)
    editor.edit([{"prompt": "{} lives in", "subject": "Alice", "target": "Paris"}])
    for layer in layers:  # the anchor Gram is N times the file's mean
        total, n = _sums(spec.d_k, seed=layer)
        want = editor.mom2_weight_ * torch.from_numpy(total.astype(np.float64)) / n
        assert torch.allclose(editor.solvers_[layer].gram0_, want, rtol=1e-6)
    other, _ = tiny_model("llama", seed=3)
    with pytest.raises(StateMismatchError, match="other weights"):
        stats_npz.load_stats(other, spec, layers, folder)
    base, _ = tiny_model("llama")  # the weights the files are bound to (the edited model is not)
    with pytest.raises(StateMismatchError, match="other weights"):
        stats_npz.load_stats(model, spec, layers, folder)
    path = next(folder.glob("*.npz"))
    path.write_bytes(path.read_bytes()[:-8] + b"\0" * 8)  # changed after binding
    with pytest.raises(StateMismatchError, match="changed"):
        stats_npz.load_stats(base, spec, layers, folder)


def test_export_then_load_round_trip(tmp_path, model_spec):
    model, tok, spec = model_spec
    layers = list(spec.default_layers)[:2]
    n = 2000
    means = second_moments(model, tok, spec, layers, corpus="enwiki_sample", n_tokens=n, cache_dir=tmp_path / "c")
    folder = stats_npz.export_stats(model, spec, {l: MomentSum(m.double() * n, n) for l, m in means.items()},
                                    tmp_path / "export", precision="float64")
    names = sorted(p.name for p in folder.glob("*.npz"))
    assert names == sorted(stats_npz.stats_file_name(spec.edit_module_path.format(l), n, "float64") for l in layers)
    with np.load(folder / names[0]) as data:  # ROME's keys, a sum (not a mean)
        assert set(data.files) == {"mom2.mom2", "mom2.count"} and int(data["mom2.count"]) == n
    back = stats_npz.load_stats(model, spec, layers, folder)
    for layer in layers:
        assert torch.allclose(back[layer], means[layer].double(), rtol=1e-10, atol=1e-12)
    assert json.loads((folder / stats_npz.SIDECAR).read_text())["layers"].keys() == {str(l) for l in layers}
