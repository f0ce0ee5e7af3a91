"""Model inputs (rlsedit_llm.pipeline.tokens) and the stop-early capture hooks (rlsedit_llm.adapters.hooks)."""

from __future__ import annotations

import types

import pytest
import torch
from torch import nn

from rlsedit_llm.adapters.hooks import capture_inputs, on_inputs, run_until_stopped
from rlsedit_llm.adapters.spec import detect_spec, get_module
from rlsedit_llm.pipeline.tokens import input_device, pad_id, right_pad

pytestmark = pytest.mark.usefixtures("one_thread_unless_slow")


def test_pad_id_falls_back_to_eos_then_zero():
    assert pad_id(types.SimpleNamespace(pad_token_id=3, eos_token_id=7)) == 3
    assert pad_id(types.SimpleNamespace(pad_token_id=None, eos_token_id=7)) == 7
    assert pad_id(types.SimpleNamespace(pad_token_id=None, eos_token_id=None)) == 0


def test_right_pad_lists_and_tensors():
    ids, mask = right_pad([[5, 6, 7], torch.tensor([8])], 0, extra=1)
    assert ids.tolist() == [[5, 6, 7, 0], [8, 0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]
    assert ids.dtype == mask.dtype == torch.long


def test_input_device_is_the_embedding_device_and_cpu_for_meta(tiny):
    model, _ = tiny("llama")
    assert input_device(model) == torch.device("cpu")
    with torch.device("meta"):
        meta = nn.Linear(2, 2)
    assert input_device(meta) == torch.device("cpu")  # no input embedding, meta weights


def test_capture_with_stop_skips_the_layers_above(tiny):
    model, tok = tiny("llama", n_layers=4)
    spec = detect_spec(model)
    layers = {l: get_module(model, spec.edit_module_path.format(l)) for l in (0, 1)}
    calls = []
    with on_inputs({"top": get_module(model, spec.layer_path.format(3))}, lambda key, x: calls.append(key)):
        for _ in range(2):  # the stop resets: every pass stops again
            with capture_inputs(layers, stop=True) as seen:
                out = run_until_stopped(model, input_ids=torch.tensor([[1, 2, 3]]))
            assert out is None and set(seen) == {0, 1} and seen[1].shape == (1, 3, spec.d_k)
        assert calls == []  # layer 3 never ran
        assert run_until_stopped(model, input_ids=torch.tensor([[1, 2, 3]])) is not None  # stop hooks removed
        assert calls == ["top"]
    assert all(not m._forward_pre_hooks for m in model.modules())  # every hook removed
