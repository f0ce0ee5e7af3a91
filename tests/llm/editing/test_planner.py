"""The stream planner (rlsedit_llm.editing.planner) and EditConfig.for_stream.

The forecast runs on tiny random models (fast, offline); the rule is checked on forecasts built by
hand, so that its decisions (keep the defaults for short streams, widen for longer ones, which
neighbour, when to stop) are tested apart from any model; the docs page is checked against the
committed raw file.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from rlsedit_llm.adapters.spec import detect_spec
from rlsedit_llm.editing import planner as P
from rlsedit_llm.editing.config import EditConfig
from rlsedit_llm.errors import HyperparameterError
from rlsedit_llm.pipeline.keys import compute_keys, subject_hidden_states

pytestmark = pytest.mark.usefixtures("one_thread_unless_slow")

ROOT = Path(__file__).resolve().parents[3]


def _config(tmp_path, **changes) -> EditConfig:
    """Cheap statistics and templates for tiny models (a temporary cache)."""
    settings: dict[str, Any] = dict(stats_tokens=2000, stats_max_length=64, cache_dir=str(tmp_path), n_templates=2,
                                    template_length=4)
    settings.update(changes)
    return EditConfig(**settings)


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(model, before) -> bool:
    return all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_forecast_on_a_tiny_model_is_fast_sane_and_leaves_the_weights_unchanged(tiny, tmp_path):
    model, tok = tiny("llama", n_layers=8, init_std=0.3)
    spec = detect_spec(model)
    before = _weights(model)
    tic = time.perf_counter()
    facts = P.sample_facts(tok, 40, seed=0)
    sample = P.sample_keys(model, tok, facts, spec.default_layers, config=_config(tmp_path), batch=10)
    f = P.forecast_stream(model, tok, sample, layers=spec.default_layers, edits=[10, 50, 200, 1000],
                          config=_config(tmp_path), batch=10)
    assert time.perf_counter() - tic < 60
    assert _same(model, before)
    assert f.positions == [0, 10, 50, 200, 1000] and f.layers == tuple(spec.default_layers)
    residual = np.array(f.residual_share)
    assert np.all((residual > 0) & (residual <= 1)) and np.all(np.diff(residual) > 0)
    assert f.retained[0] == pytest.approx(1.0) and f.retained[1] == pytest.approx(1.0)  # t <= one batch
    assert np.all(np.diff(f.retained[1:]) < 0) and 0 < f.retained[-1] < 1
    for layer, lf in f.per_layer.items():
        assert lf.layer == layer and 0 <= lf.shrinkage <= 1
        assert np.all(np.diff(lf.share) > 0) and lf.share[0] == pytest.approx(lf.start_share)
    assert f.at(1000, "residual_share") == pytest.approx(residual[-1])
    assert f.at(125) == pytest.approx(np.interp(125, f.positions, f.retained))
    with pytest.raises(HyperparameterError):
        f.at(5000)
    d = f.to_dict()
    assert set(d["per_layer"]) == {str(l) for l in f.layers} and "key_models" not in d


def test_emulated_write_puts_the_weights_back_even_when_it_fails(tiny, tmp_path):
    model, tok = tiny("llama", n_layers=6, init_std=0.3)
    spec = detect_spec(model)
    layers = list(spec.default_layers)
    sample = P.sample_keys(model, tok, P.sample_facts(tok, 10, seed=2), layers, config=_config(tmp_path), batch=10)
    before = _weights(model)
    d_k = spec.d_k
    states = {l: np.eye(d_k) for l in layers}
    keys, bare, share = P.emulate_batch(model, tok, sample, slice(0, 10), layers, states, clamp=0.75, spec=spec)
    assert _same(model, before) and 0 < share < 1
    assert set(keys) == set(layers) and all(k.shape == (10, d_k) for k in keys.values())
    np.testing.assert_array_equal(keys[layers[0]], sample.keys[layers[0]][:10])  # the first layer: unedited
    np.testing.assert_array_equal(bare[layers[0]], sample.bare[layers[0]][:10])
    states[layers[-1]] = np.eye(d_k + 1)  # the last layer fails after the lower ones were written
    with pytest.raises(RuntimeError):
        P.emulate_batch(model, tok, sample, slice(0, 10), layers, states, clamp=0.75, spec=spec)
    assert _same(model, before)


def test_bare_pass_reads_what_the_pipeline_reads(tiny):
    model, tok = tiny("llama", n_layers=6, init_std=0.3)
    spec = detect_spec(model)
    facts = P.sample_facts(tok, 7, seed=3)
    key, h = P._bare_pass(model, tok, spec, 2, 4, facts)
    torch.testing.assert_close(key, compute_keys(model, tok, spec, 2, facts, ["{}"]).double(), rtol=0, atol=0)
    torch.testing.assert_close(h, subject_hidden_states(model, tok, spec, 4, facts).double(), rtol=0, atol=0)
    none, h_only = P._bare_pass(model, tok, spec, None, 4, facts)
    assert none is None and torch.equal(h_only, h)


def test_sample_facts_is_seeded_distinct_and_excludes(tiny):
    _, tok = tiny("llama")
    first = P.sample_facts(tok, 30, seed=1)
    assert [f.case_id for f in P.sample_facts(tok, 30, seed=1)] == [f.case_id for f in first]
    assert len({(f.prompt, f.subject) for f in first}) == 30
    kept = P.sample_facts(tok, 30, seed=1, exclude=[f.case_id for f in first[:10]])
    assert not {f.case_id for f in kept} & {f.case_id for f in first[:10]}
    with pytest.raises(HyperparameterError):
        P.sample_facts(tok, 0)


def test_candidate_windows_grow_the_default_block_contiguously():
    windows = P.candidate_windows((3, 4, 5, 6, 7), 30, max_layers=9)
    assert windows[0] == (3, 4, 5, 6, 7)
    for w in windows:
        assert list(w) == list(range(w[0], w[-1] + 1)) and w[0] >= 1 and w[-1] <= 28
        assert set(range(3, 8)) <= set(w) and len(w) <= 9
    assert (2, 3, 4, 5, 6, 7) in windows and (3, 4, 5, 6, 7, 8) in windows and (1, 2, 3, 4, 5, 6, 7, 8, 9) in windows
    assert all(w[0] >= 1 for w in P.candidate_windows((1, 2, 3), 6, max_layers=5))  # never layer 0
    assert all(w[-1] <= 4 for w in P.candidate_windows((1, 2, 3), 6, max_layers=5))  # one layer left above


# ----------------------------------------------------------------------------------------------
# The rule, on forecasts built by hand


def _forecast(window, plasticity, positions) -> P.StreamForecast:
    residual = [1.0 - plasticity(window, t) for t in positions]
    return P.StreamForecast(tuple(window), 0.0, 1.0, 1.0, 10, list(positions), residual, [1.0] * len(positions), {},
                            0.5, residual[0], 40, 0.0)


def _plasticity(window, t) -> float:
    """Falls with the stream; +0.02 per layer beyond five, +0.005 more for each layer below 3."""
    below = max(0, 3 - window[0])
    return 0.8 / (1 + t / 100) + 0.02 * (len(window) - 5) + 0.005 * below


def _plan(model, expected, **kw):
    spec = detect_spec(model)
    config = EditConfig(layers=(3, 4, 5, 6, 7))
    positions = sorted({0, 10, round(0.7 * spec.d_k), 50, 500, 5000})
    windows = P.candidate_windows(config.layers, spec.n_layers, max_layers=9)
    forecasts = {w: _forecast(w, _plasticity, positions) for w in windows}
    return P.plan_stream(model, expected, config=config, batch=10, forecasts=forecasts, **kw)


def test_planner_keeps_the_defaults_up_to_the_reference_length(tiny):
    model, _ = tiny("llama", n_layers=12)
    reference = round(0.7 * detect_spec(model).d_k)
    plan = _plan(model, reference)
    assert plan.config == EditConfig(layers=(3, 4, 5, 6, 7)) and plan.met
    assert plan.reference_edits == reference and plan.target == pytest.approx(_plasticity((3, 4, 5, 6, 7), reference))
    assert plan.plasticity >= plan.target
    plan.config.validate()


def test_planner_widens_the_window_for_longer_streams(tiny):
    model, _ = tiny("llama", n_layers=12)
    sizes = []
    for expected in (50, 500, 5000):
        plan = _plan(model, expected)
        plan.config.validate()
        sizes.append(len(plan.config.layers))
        assert set(range(3, 8)) <= set(plan.config.layers)
    assert sizes[0] == 6 and sizes[0] < sizes[1] <= sizes[2] == 9
    assert _plan(model, 50).config.layers == (2, 3, 4, 5, 6, 7)  # the better neighbour (below) first
    assert _plan(model, 50).met and not _plan(model, 500).met  # out of reach: widest window, said so
    assert _plan(model, 500).config.layers == (1, 2, 3, 4, 5, 6, 7, 8, 9)
    summary = _plan(model, 500).summary()
    assert summary["layers"] == list(range(1, 10)) and summary["met"] is False and summary["candidates"]


def test_planner_stops_when_a_layer_gains_too_little(tiny):
    model, _ = tiny("llama", n_layers=12)
    plan = _plan(model, 500, min_gain=0.05)  # each layer gains 0.02-0.025 here
    assert plan.config.layers == (3, 4, 5, 6, 7) and not plan.met
    assert len(_plan(model, 500, max_layers=7).config.layers) == 7


def test_planner_refuses_bad_arguments(tiny):
    model, _ = tiny("llama", n_layers=12)
    with pytest.raises(HyperparameterError):
        _plan(model, 0)
    with pytest.raises(HyperparameterError):
        _plan(model, 50, min_gain=-1.0)
    with pytest.raises(HyperparameterError):  # a forecast is needed and there is no tokenizer
        P.plan_stream(model, 50, config=EditConfig(layers=(3, 4, 5, 6, 7)))


# ----------------------------------------------------------------------------------------------
# End to end on a tiny model, and the docs page


def test_for_stream_on_a_tiny_model_returns_a_valid_config(tiny, tmp_path):
    model, tok = tiny("llama", n_layers=10, init_std=0.3)
    cfg = _config(tmp_path)
    tic = time.perf_counter()
    short = EditConfig.for_stream(model, 20, tok, config=cfg, n_facts=20, batch=10)
    assert short == cfg  # a short stream keeps the given configuration exactly
    long = EditConfig.for_stream(model, 2000, tok, config=cfg, n_facts=20, batch=10)
    long.validate()
    assert time.perf_counter() - tic < 120
    default = detect_spec(model).default_layers
    assert long.layers is None or set(default) <= set(long.layers)
    assert (long.alpha, long.beta, long.mom2_weight) == (cfg.alpha, cfg.beta, cfg.mom2_weight)


def test_capacity_page_holds_what_the_script_renders(benchmark_script):
    if not (ROOT / "docs" / "assets" / "capacity" / "forecast.json").is_file():
        pytest.skip("no committed forecast.json")
    assert benchmark_script("capacity_forecast").main(["--check"]) == 0


@pytest.mark.parametrize("family", ["gemma3", "gpt2"])
def test_emulated_write_on_other_families_restores_the_weights(family, tiny, tmp_path):
    """A family with a norm after the MLP (Gemma 3: the targets go through module_target's
    projection) and one with Conv1D weights (GPT-2)."""
    model, tok = tiny(family, n_layers=6, init_std=0.3)
    spec = detect_spec(model)
    layers = list(spec.default_layers)
    sample = P.sample_keys(model, tok, P.sample_facts(tok, 10, seed=4), layers, config=_config(tmp_path), batch=10)
    before = _weights(model)
    states = {l: np.eye(spec.d_k) for l in layers}
    keys, _, share = P.emulate_batch(model, tok, sample, slice(0, 10), layers, states, clamp=0.75, spec=spec)
    assert _same(model, before) and np.isfinite(share) and share >= 0
    assert all(np.all(np.isfinite(k)) for k in keys.values())
