"""The size of a save: symmetric matrices stored as their packed triangle (bitwise), the bytes
predicted by ``state_size`` / ``Editor.state_bytes`` against the bytes written, older unpacked
saves still read."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from rlsedit_llm.adapters.tiny import tiny_model
from rlsedit_llm.editing import state as state_mod
from rlsedit_llm.editing.editor import Editor
from rlsedit_llm.editing.state import is_bitwise_symmetric, pack_symmetric, packed_size, state_size, unpack_symmetric
from rlsedit_llm.errors import StateMismatchError
from rlsedit_llm.files import sha256_file
from tests.helpers import STREAM
from tests.helpers import small_config as _config

pytestmark = pytest.mark.usefixtures("one_thread_unless_slow")


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()])


def _data_bytes(path: Path) -> int:
    """The bytes of a safetensors file's tensors (the file less its 8-byte length and JSON header)."""
    raw = path.read_bytes()
    (header,) = struct.unpack("<Q", raw[:8])
    return len(raw) - 8 - header


@pytest.fixture(scope="module")
def saved(stats_dir, tmp_path_factory):
    model, tok = tiny_model("llama")
    editor = Editor(model, tok, _config(stats_dir))
    for facts in STREAM[:2]:
        editor.edit(facts)
    directory = tmp_path_factory.mktemp("size") / "state"
    editor.save(directory)
    return editor, directory


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_a_packed_triangle_gives_the_matrix_back_bit_for_bit(dtype):
    generator = torch.Generator().manual_seed(0)
    for n in range(1, 12):
        X = torch.randn(n, n, generator=generator, dtype=torch.float64).to(dtype)
        A = X + X.mT
        A[0, n - 1] = A[n - 1, 0] = -0.0  # a signed zero survives too
        R = pack_symmetric(A)
        assert R.ndim == 2 and R.numel() == n * (n + 1) // 2 and packed_size(tuple(R.shape)) == n
        assert torch.equal(_bits(unpack_symmetric(R)), _bits(A))
    B = torch.ones(3, 3, dtype=torch.float64)
    B[0, 1] = -0.0
    B[1, 0] = 0.0
    assert torch.equal(B, B.mT) and not is_bitwise_symmetric(B)  # stored whole: not exactly symmetric
    assert packed_size((4, 2)) is None and packed_size((5, 4)) is None


def test_a_save_stores_the_symmetric_matrices_packed_and_loads_them_bitwise(saved):
    editor, directory = saved
    manifest = json.loads((directory / "editor.json").read_text())
    assert manifest["version"] == state_mod.VERSION == 4
    d_k, d_v = editor.spec_.d_k, editor.spec_.d_model
    tensors = load_file(directory / "solvers.safetensors")
    for layer in editor.layers_:
        assert manifest["solvers"][str(layer)]["packed"] == ["C", "gram0"]
        for name in ("C", "gram0"):
            assert tuple(tensors[f"layer{layer}.{name}"].shape) == (2 * (d_k // 2) + 1, d_k - d_k // 2)
        assert tuple(tensors[f"layer{layer}.W0"].shape) == (d_k, d_v)  # W0 and W whole
    loaded = Editor.load(*tiny_model("llama"), directory)
    assert "packed" not in loaded.state_dict()["solvers"][editor.layers_[0]]
    for layer in editor.layers_:
        for name in ("W0_", "W_", "C_", "gram0_"):
            ours, saved = getattr(loaded.solvers_[layer], name), getattr(editor.solvers_[layer], name)
            assert torch.equal(_bits(ours), _bits(saved))


def test_state_bytes_is_the_formula_and_the_bytes_written(saved):
    editor, directory = saved
    d_k, d_v, n_layers = editor.spec_.d_k, editor.spec_.d_model, len(editor.layers_)
    rows = sum(len(r.facts) for r in editor.journal_)
    predicted = state_size(d_k, d_v, n_layers, rows=rows)
    assert predicted == n_layers * 8 * (2 * d_k * d_v + d_k * (d_k + 1) + rows * (d_k + d_v))
    assert editor.state_bytes() == predicted
    files = [directory / "solvers.safetensors", directory / "journal.safetensors"]
    assert sum(_data_bytes(f) for f in files) == predicted  # the tensors exactly
    written = sum(p.stat().st_size for p in directory.iterdir())
    assert 0 < written - predicted < 16_000  # headers and the manifest: a few KB
    unpacked = n_layers * 8 * (2 * d_k * d_v + 2 * d_k * d_k + rows * (d_k + d_v))
    assert predicted < unpacked


def test_state_bytes_before_the_first_edit_predicts_the_first_save(stats_dir, tmp_path):
    model, tok = tiny_model("llama")
    editor = Editor(model, tok, _config(stats_dir))
    spec = editor.spec_
    assert editor.state_bytes() == state_size(spec.d_k, spec.d_model, len(editor.layers_))
    editor.prepare()
    assert editor.state_bytes() == state_size(spec.d_k, spec.d_model, len(editor.layers_))
    tracked = Editor(*tiny_model("llama"), _config(stats_dir, track_information=True))
    assert tracked.state_bytes() == state_size(spec.d_k, spec.d_model, len(editor.layers_), track_information=True)


def test_the_smollm2_figures_of_the_docs():
    assert state_size(1536, 576, 5) == 165_212_160  # 157.6 MiB, from 259,522,560 (247.5 MiB) unpacked
    assert state_size(1536, 576, 5, rows=3) - state_size(1536, 576, 5) == 253_440  # the journal of 3 facts
    assert state_size(1536, 576, 5, dtype=torch.float32) == 165_212_160 // 2


def _as_version_3(src: Path, dst: Path) -> Path:
    """The save rewritten as rlsedit 0.2 wrote it: whole matrices, no ``packed`` fields, version 3."""
    shutil.copytree(src, dst)
    meta = json.loads((dst / "editor.json").read_text())
    tensors = {k: v.clone() for k, v in load_file(dst / "solvers.safetensors").items()}
    for key, solver in meta["solvers"].items():
        for name in solver.pop("packed", []):
            tensors[f"layer{key}.{name}"] = unpack_symmetric(tensors[f"layer{key}.{name}"]).contiguous()
    save_file(tensors, dst / "solvers.safetensors", metadata={"format": state_mod.FORMAT})
    meta["files"]["solvers.safetensors"] = sha256_file(dst / "solvers.safetensors")
    meta["version"] = 3
    meta.pop("stream", None)
    meta["digest"] = state_mod.manifest_digest(meta)
    (dst / "editor.json").write_text(json.dumps(meta))
    return dst


def test_a_version_3_save_with_whole_matrices_is_still_read(saved, tmp_path):
    editor, directory = saved
    old = _as_version_3(directory, tmp_path / "v3")
    loaded = Editor.load(*tiny_model("llama"), old)
    for layer in editor.layers_:
        for name in ("W0_", "W_", "C_", "gram0_"):
            assert torch.equal(getattr(loaded.solvers_[layer], name), getattr(editor.solvers_[layer], name))
    loaded.save(tmp_path / "again")  # written back packed, as version 4
    assert json.loads((tmp_path / "again" / "editor.json").read_text())["version"] == 4
    assert _data_bytes(tmp_path / "again" / "solvers.safetensors") < _data_bytes(old / "solvers.safetensors")


def _forge_manifest(src: Path, dst: Path, change) -> Path:
    shutil.copytree(src, dst)
    meta = json.loads((dst / "editor.json").read_text())
    change(meta)
    meta["digest"] = state_mod.manifest_digest(meta)
    (dst / "editor.json").write_text(json.dumps(meta))
    return dst


@pytest.mark.parametrize("change", [
    lambda m: m["solvers"]["0"].__setitem__("packed", ["C", "W"]),  # W is whole
    lambda m: m["solvers"]["0"].__setitem__("packed", ["C", "C"]),
    lambda m: m["solvers"]["0"].__setitem__("packed", "C"),
    lambda m: m["solvers"]["0"].__setitem__("packed", ["C", "Evil"]),
    lambda m: m["solvers"]["0"].__setitem__("packed", ["gram0"]),  # C then has a packed shape, unread
    lambda m: m.__setitem__("version", 3),  # packed matrices in a version that had none
], ids=["whole tensor", "twice", "not a list", "missing tensor", "C not listed", "version 3"])
def test_a_forged_packed_field_is_refused(saved, tmp_path, change):
    _, directory = saved
    forged = _forge_manifest(directory, tmp_path / "forged", change)
    model, tok = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(StateMismatchError, match="damaged or forged"):
        Editor.load(model, tok, forged)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_matrix_that_is_not_exactly_symmetric_is_stored_whole(stats_dir, tmp_path):
    editor = Editor(*tiny_model("llama"), _config(stats_dir, method="alphaedit"))
    editor.edit(STREAM[0])
    editor.save(tmp_path / "s")
    manifest = json.loads((tmp_path / "s" / "editor.json").read_text())
    layer = editor.layers_[0]
    packed = manifest["solvers"][str(layer)].get("packed", [])
    P = editor.solvers_[layer].P_
    assert ("P" in packed) == is_bitwise_symmetric(P)
    assert editor.state_bytes() == sum(_data_bytes(tmp_path / "s" / n) for n in ("solvers.safetensors",
                                                                                  "journal.safetensors"))
    loaded = Editor.load(*tiny_model("llama"), tmp_path / "s")
    assert torch.equal(_bits(loaded.solvers_[layer].P_), _bits(P))
