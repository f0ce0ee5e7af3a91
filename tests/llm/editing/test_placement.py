"""Where an editor's tensors live: the device and dtype of every layer solver's state, the moves of
keys and values to it, accelerate-dispatched models (``hf_device_map``), and the devices a loaded
state is put on. The CPU-only checks of the "Several GPUs" section of docs/llm/scale.md.

With one CPU there is no second device: where a move between devices is the point, the tests
give the solvers a stand-in device (``cpu:0``, which compares unequal to ``cpu`` but holds CPU
tensors) and check that the editor moves its tensors to *the solver's* device, whatever it is.
"""

from __future__ import annotations

import sys
from collections import Counter
from unittest import mock

import pytest
import torch

import rlsedit_llm
from rlsedit_llm import Editor
from rlsedit_llm.adapters.spec import get_module, read_weight
from rlsedit_llm.editing import persistence
from rlsedit_llm.editing import state as state_io
from rlsedit_llm.kernel.rls import LayerRLS
from tests.helpers import small_config

accelerate = pytest.importorskip("accelerate")

pytestmark = pytest.mark.usefixtures("one_thread_unless_slow")

FACTS = [{"prompt": "we saw {}", "subject": "the old cat", "target": "paris"}]
MORE = [{"prompt": "they sold {}", "subject": "the long table", "target": "wood"}]
STAND_IN = torch.device("cpu", 0)  # != torch.device("cpu"); its tensors are CPU tensors


def _weight(editor: Editor, layer: int) -> torch.nn.Parameter:
    return get_module(editor.model, editor.spec_.edit_module_path.format(layer)).weight


def _state_tensors(editor: Editor):
    for layer, solver in editor.solvers_.items():
        for name, t in solver.state_dict(snapshot=False)["tensors"].items():
            yield layer, name, t


@pytest.mark.parametrize("model_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("state_dtype", ["float64", "float32"])
def test_every_solver_tensor_is_on_its_layers_device_in_the_state_dtype(tiny, stats_dir, model_dtype, state_dtype):
    model, tok = tiny("llama", init_std=0.3, dtype=model_dtype)
    editor = Editor(model, tok, small_config(stats_dir, state_dtype=state_dtype)).prepare()
    dtype = getattr(torch, state_dtype)
    names = set()
    for layer, name, t in _state_tensors(editor):
        names.add(name)
        assert t.device == _weight(editor, layer).device and t.dtype == dtype, (layer, name)
    assert {"W0", "W", "C", "gram0"} <= names
    for layer, solver in editor.solvers_.items():
        assert solver.device == _weight(editor, layer).device and solver.dtype == dtype
        # the model holds the master copy rounded to its own dtype
        assert torch.equal(read_weight(get_module(model, editor.spec_.edit_module_path.format(layer))),
                           solver.W_.to(model_dtype))


def _spy_moves(module_name: str, calls: list):
    """A ``Tensor.to`` that records ``(dtype, shape)`` of the moves to STAND_IN made by
    code of ``module_name``."""
    real_to = torch.Tensor.to

    def to(self, *args, **kwargs):
        device = kwargs.get("device", args[0] if args and isinstance(args[0], (torch.device, str)) else None)
        dtype = kwargs.get("dtype", args[1] if len(args) > 1 else None)
        if device == STAND_IN and sys._getframe(1).f_globals.get("__name__") == module_name:
            calls.append((dtype, tuple(self.shape)))
        return real_to(self, *args, **kwargs)

    return mock.patch.object(torch.Tensor, "to", to)


def test_keys_and_values_are_moved_to_each_solvers_device_and_dtype(tiny, stats_dir):
    """The editor computes keys and the residual share on the model's devices and moves them to
    the solver's device in the state dtype; a retraction moves the journal's CPU rows there too."""
    model, tok = tiny("llama", init_std=0.3)
    editor = Editor(model, tok, small_config(stats_dir)).prepare()
    d_k, d_v = editor.solvers_[editor.layers_[0]].shape
    received: list[tuple[torch.device, torch.dtype, torch.device, torch.dtype]] = []
    real_propose = LayerRLS.propose

    def propose(self, K, V):
        received.append((K.device, K.dtype, V.device, V.dtype))
        return real_propose(self, K, V)

    editor_moves: list = []
    with mock.patch.object(LayerRLS, "device", property(lambda self: STAND_IN)), \
            mock.patch.object(LayerRLS, "propose", propose), _spy_moves("rlsedit_llm.editing.editor", editor_moves):
        report = editor.edit(FACTS)
    n = len(editor.layers_)
    # per layer at least the keys (u, d_k) and the residual share (u, d_model), to the solver's
    # device in the state dtype; nothing goes to the solver's device in another dtype
    per_layer = Counter({(torch.float64, (1, d_k)): n, (torch.float64, (1, d_v)): n})
    assert Counter(editor_moves) >= per_layer and {dtype for dtype, _ in editor_moves} == {torch.float64}
    assert received == [(torch.device("cpu"), torch.float64) * 2] * n
    assert all(r.keys[l].device.type == "cpu" for r in editor.journal_ for l in r.keys)  # the journal: on the CPU

    kernel_moves: list = []
    with mock.patch.object(LayerRLS, "device", property(lambda self: STAND_IN)), \
            _spy_moves("rlsedit_llm.kernel.protocol", kernel_moves):
        editor.undo(report.edit_id)
    assert Counter(kernel_moves) >= per_layer


def _dispatched(tiny, offload: str | None = None, tmp_path=None):
    """A tiny Llama dispatched by accelerate block by block on the CPU (hooks on every block, as
    ``device_map="auto"`` puts them), optionally with one block offloaded to disk."""
    model, tok = tiny("llama", init_std=0.3)
    blocks = ["model.embed_tokens", *[f"model.layers.{i}" for i in range(len(model.model.layers))], "model.norm",
              "model.rotary_emb", "lm_head"]
    device_map = {name: "cpu" for name in blocks}
    kwargs: dict = {"force_hooks": True}
    if offload is not None:
        device_map[offload] = "disk"
        kwargs = {"offload_dir": str(tmp_path / "offload"), "main_device": "cpu"}
    return accelerate.dispatch_model(model, device_map=device_map, **kwargs), tok


def _edited_weights(editor: Editor) -> dict[int, torch.Tensor]:
    return {layer: read_weight(get_module(editor.model, editor.spec_.edit_module_path.format(layer))).clone()
            for layer in editor.layers_}


@pytest.mark.parametrize("offload", [None, "model.layers.3"], ids=["hooks", "unedited-block-on-disk"])
def test_an_accelerate_dispatched_model_edits_saves_and_reloads_like_a_plain_one(tiny, stats_dir, tmp_path, offload):
    model, tok = _dispatched(tiny, offload, tmp_path)
    assert hasattr(model, "hf_device_map") and hasattr(model.model.layers[0], "_hf_hook")
    plain, _ = tiny("llama", init_std=0.3)
    config = small_config(stats_dir)
    editor = Editor(model, tok, config)
    assert offload is None or offload not in {f"model.layers.{l}" for l in editor.layers_}
    got, expected = editor.edit(FACTS), Editor(plain, tok, config).edit(FACTS)
    assert [(r.prob_before, r.prob_after) for r in got.facts] == [(r.prob_before, r.prob_after)
                                                                  for r in expected.facts]
    weights = _edited_weights(editor)
    assert all(torch.equal(weights[l], read_weight(get_module(plain, editor.spec_.edit_module_path.format(l))))
               for l in weights)

    editor.save(tmp_path / "state")
    base, _ = _dispatched(tiny, offload, tmp_path)  # the base model, dispatched the same way
    loaded = Editor.load(base, tok, tmp_path / "state")
    assert all(torch.equal(w, _edited_weights(loaded)[l]) for l, w in weights.items())
    for layer, name, t in _state_tensors(loaded):
        assert t.device == _weight(loaded, layer).device, (layer, name)
    # the loaded stream continues exactly as the original one
    editor.release()
    loaded.edit(MORE)
    other = Editor.load(model, tok, tmp_path / "state", take_over=True)
    other.edit(MORE)
    assert all(torch.equal(_edited_weights(loaded)[l], _edited_weights(other)[l]) for l in weights)


def test_a_loaded_state_is_put_on_each_layers_device(tiny, stats_dir, tmp_path):
    """Saved tensors are read on the CPU; ``rebuild`` hands each layer's solver state the device
    of that layer's weight (here the stand-in for a second GPU), not the device it was saved from."""
    model, tok = tiny("llama", init_std=0.3)
    editor = Editor(model, tok, small_config(stats_dir))
    editor.edit(FACTS)
    editor.save(tmp_path / "state")
    state, _mode = state_io.read_state(tmp_path / "state", model)
    assert all(t.device.type == "cpu" for s in state["solvers"].values() for t in s["tensors"].values())

    asked: list = []
    real_load_state_dict, real_module, real_rebuild = LayerRLS.load_state_dict, Editor._module, persistence.rebuild
    rebuilding: list[bool] = []
    target = editor.layers_[-1]

    def load_state_dict(self, state, *, device=None, share=True):
        asked.append(device)
        real_load_state_dict(self, state, device=device, share=share)

    def module(self, layer):  # while the state is rebuilt, the last edited layer reports the stand-in device
        if rebuilding and layer == target:
            return mock.Mock(weight=mock.Mock(device=STAND_IN))
        return real_module(self, layer)

    def rebuild(*args, **kwargs):
        rebuilding.append(True)
        try:
            return real_rebuild(*args, **kwargs)
        finally:
            rebuilding.pop()

    fresh, _ = tiny("llama", init_std=0.3)
    with mock.patch.object(LayerRLS, "load_state_dict", load_state_dict), \
            mock.patch.object(Editor, "_module", module), mock.patch.object(persistence, "rebuild", rebuild):
        loaded = Editor.load(fresh, tok, tmp_path / "state")
    assert asked == [torch.device("cpu")] * (len(editor.layers_) - 1) + [STAND_IN]
    assert all(torch.equal(w, _edited_weights(loaded)[l]) for l, w in _edited_weights(editor).items())


def test_an_offloaded_edited_layer_is_refused_with_a_typed_error(tiny, stats_dir, tmp_path):
    model, tok = _dispatched(tiny, "model.layers.1", tmp_path)
    editor = Editor(model, tok, small_config(stats_dir))
    assert 1 in editor.layers_
    before = {k: v.clone() for k, v in model.state_dict().items() if v.device.type != "meta"}
    with pytest.raises(rlsedit_llm.HyperparameterError, match=r"layer\(s\) \[1\] are offloaded"):
        editor.edit(FACTS)
    assert not editor.solvers_ and not editor.journal_
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items() if k in before)


def test_memory_is_checked_on_each_device_for_the_layers_it_holds(tiny, stats_dir, monkeypatch):
    """One check per device, with the number of edited layers that device holds (here the CPU
    holds them all); a device without room refuses the edit before any statistics are computed."""
    import rlsedit_llm.editing.editor as editor_module

    model, tok = tiny("llama")
    editor = Editor(model, tok, small_config(stats_dir))
    seen = []
    monkeypatch.setattr(editor_module, "check_fits", lambda plan, device: seen.append((plan.n_edit_layers, device)))
    editor.prepare()
    assert seen == [(len(editor.layers_), torch.device("cpu"))]

    fresh = Editor(*tiny("llama"), small_config(stats_dir))
    monkeypatch.setattr(editor_module, "check_fits", _no_room)
    with pytest.raises(rlsedit_llm.InsufficientMemoryError):
        fresh.prepare()
    assert not fresh.solvers_


def _no_room(plan, device):
    from rlsedit_llm.memory import check_fits

    return check_fits(plan, device, free_bytes=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_edited_layers_on_a_gpu_and_the_cpu_edit_save_and_load_across_devices(tiny, tmp_path):
    """Two real devices on a one-GPU machine: accelerate puts edited layers 0 and 2 on cuda:0 and
    edited layer 1 on the CPU (``main_device="cpu"``: CPU blocks run there, not offloaded). Each
    solver lives on its layer's device; the save loads onto the base model on the CPU alone and
    onto the same split, each layer's state on that model's device for it."""
    from tests.helpers import random_model_config

    def split():
        model, tok = tiny("llama", init_std=0.3)
        device_map = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": "cpu", "model.layers.2": 0,
                      "model.layers.3": "cpu", "model.norm": 0, "model.rotary_emb": 0, "lm_head": 0}
        return accelerate.dispatch_model(model, device_map=device_map, main_device="cpu"), tok

    model, tok = split()
    editor = Editor(model, tok, random_model_config(tmp_path / "stats"))
    assert editor.layers_ == (0, 1, 2)
    report = editor.edit(FACTS)
    assert all(r.prob_after > r.prob_before for r in report.facts)
    devices = {layer: _weight(editor, layer).device for layer in editor.layers_}
    assert devices[0].type == devices[2].type == "cuda" and devices[1].type == "cpu"
    for layer, name, t in _state_tensors(editor):
        assert t.device == devices[layer] and t.dtype == torch.float64, (layer, name)
    editor.save(tmp_path / "state")

    on_cpu, _ = tiny("llama", init_std=0.3)
    loaded = Editor.load(on_cpu, tok, tmp_path / "state")
    for layer, solver in loaded.solvers_.items():
        assert solver.device.type == "cpu" and torch.equal(solver.W_, editor.solvers_[layer].W_.cpu())
    again, _ = split()
    reloaded = Editor.load(again, tok, tmp_path / "state")
    assert {layer: s.device for layer, s in reloaded.solvers_.items()} == devices
    reloaded.edit(MORE)
