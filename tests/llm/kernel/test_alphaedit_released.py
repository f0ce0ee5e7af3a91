"""AlphaEdit at its released settings: the absolute null-space cut on the per-token second moment
``E[kk^T] = gram0 / N`` (released ``nullspace_threshold`` 2e-2) and the ridge ``L2`` = 10, beside
rlsedit's relative cut (the default, so that every state saved with it loads and continues)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from rlsedit_llm import EditConfig, Editor, Fact
from rlsedit_llm.adapters.tiny import tiny_model
from rlsedit_llm.editing import state as state_mod
from rlsedit_llm.editing.methods import make_editor, parse_settings
from rlsedit_llm.editing.statistics import layer_moments
from rlsedit_llm.errors import HyperparameterError
from rlsedit_llm.evaluation.bench_config import BenchConfig, method_variant
from rlsedit_llm.kernel.alphaedit import AlphaEditConfig, NullSpaceLayer, default_mom2_weight
from rlsedit_llm.pipeline.values import ValueConfig
from rlsedit_llm.presets import METHOD_PRESETS
from rlsedit_theory import Problem
from rlsedit_theory.reference import NullSpaceProjection

pytestmark = pytest.mark.usefixtures("one_thread_unless_slow")

FACTS = [Fact("{} lives in", "Alice", "Paris"), Fact("{} plays the", "Bob", "piano")]
_V1 = Path(__file__).parents[1] / "data"


def _config(stats_dir, **changes) -> EditConfig:
    settings = dict(cache_dir=stats_dir, stats_tokens=1000, stats_max_length=128, n_templates=1, method="alphaedit",
                    value=ValueConfig(steps=3), replace=False)
    settings.update(changes)
    return EditConfig(**settings)


def _gram(per_token: list[float], N: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``N Q diag(per_token) Q^T`` with a random orthonormal ``Q`` (float64), and ``Q``."""
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.normal(size=(len(per_token), len(per_token))))
    gram = N * (Q * np.asarray(per_token)) @ Q.T
    return torch.from_numpy((gram + gram.T) / 2), torch.from_numpy(Q)


# Per-token eigenvalues around the released cut 2e-2 (well apart from it next to the rounding).
SPECTRUM = [1e-4, 5e-3, 1.999e-2, 2.001e-2, 0.3, 2.0, 7.0, 9.0]
BELOW = 3  # the first three lie below 2e-2


def test_the_absolute_rule_keeps_exactly_the_directions_below_the_cut():
    N = 250.0
    gram, Q = _gram(SPECTRUM, N)
    W0 = torch.zeros(len(SPECTRUM), 3, dtype=torch.float64)
    solver = NullSpaceLayer(W0, 0.0, 1.0, gram, threshold=2e-2, threshold_rule="absolute", mom2_weight=N)
    expected = Q[:, :BELOW] @ Q[:, :BELOW].T
    assert torch.allclose(solver.P_, expected, atol=1e-10)
    assert round(float(torch.trace(solver.P_))) == BELOW
    # The relative rule with the same number cuts at 2e-2 * lambda_max = 0.18 per token: four directions.
    relative = NullSpaceLayer(W0, 0.0, 1.0, gram, threshold=2e-2)
    assert torch.allclose(relative.P_, Q[:, :4] @ Q[:, :4].T, atol=1e-10)
    # N is divided out: the same spectrum under another N keeps the same directions, while an
    # absolute cut on the Gram itself (N = 1 assumed) would keep all eight.
    other, _ = _gram(SPECTRUM, 40.0)
    assert torch.allclose(NullSpaceLayer(W0, 0, 1, other, threshold=2e-2, threshold_rule="absolute",
                                         mom2_weight=40.0).P_, expected, atol=1e-10)
    wrong_n = NullSpaceLayer(W0, 0, 1, gram, threshold=2e-2, threshold_rule="absolute", mom2_weight=1.0).P_
    assert round(float(torch.trace(wrong_n))) == 0  # every eigenvalue of 250 E[kk^T] is above 2e-2


def test_without_mom2_weight_the_solver_uses_the_editors_default_n():
    d_k = len(SPECTRUM)
    for width in (d_k, 1536, 14336):
        assert default_mom2_weight(width) == EditConfig().resolved_mom2_weight(width)
    gram, Q = _gram(SPECTRUM, default_mom2_weight(d_k), seed=3)
    solver = NullSpaceLayer(torch.zeros(d_k, 2, dtype=torch.float64), 0, 1, gram, threshold=2e-2,
                            threshold_rule="absolute")
    assert torch.allclose(solver.P_, Q[:, :BELOW] @ Q[:, :BELOW].T, atol=1e-10)


def test_the_released_preset_is_the_absolute_cut_and_ridge_ten_and_equals_its_numpy_reference():
    released = AlphaEditConfig.released()
    assert (released.threshold, released.ridge, released.threshold_rule) == (2e-2, 10.0, "absolute")
    assert METHOD_PRESETS["alphaedit"]["released_ridge"].value == 10.0
    assert "L2" in METHOD_PRESETS["alphaedit"]["released_ridge"].source
    assert "nullspace_threshold" in METHOD_PRESETS["alphaedit"]["released_threshold"].source
    assert AlphaEditConfig() == AlphaEditConfig(threshold=1e-2, ridge=1.0, threshold_rule="relative")  # unchanged
    # A stream through the solver at the released settings equals the NumPy reference's.
    rng = np.random.default_rng(7)
    N, d_k, d_v = 30.0, len(SPECTRUM), 4
    gram, _ = _gram(SPECTRUM, N, seed=7)
    W0 = rng.normal(size=(d_k, d_v))
    ref = NullSpaceProjection(Problem(W0, 0.0, 1.0, gram0=gram.numpy()), threshold=2e-2, ridge=10.0,
                              threshold_rule="absolute", scale=N)
    solver = NullSpaceLayer(torch.from_numpy(W0), 0.0, 1.0, gram, **released.replace(mom2_weight=N).to_dict())
    assert solver.ridge == 10.0
    for u in (1, 3, 2):
        K, V = rng.normal(size=(u, d_k)), rng.normal(size=(u, d_v))
        ref.update(K, V)
        solver.update(torch.from_numpy(K), torch.from_numpy(V))
        np.testing.assert_allclose(solver.W_.numpy(), ref.W_, rtol=1e-9, atol=1e-11)
    # The ridge is used, not just stored: from the same state, ridge 1 writes another batch otherwise.
    ten, one = (NullSpaceLayer(torch.from_numpy(W0), 0.0, 1.0, gram, threshold=2e-2, threshold_rule="absolute",
                               mom2_weight=N, ridge=r) for r in (10.0, 1.0))
    K, V = torch.from_numpy(rng.normal(size=(2, d_k))), torch.from_numpy(rng.normal(size=(2, d_v)))
    assert not torch.allclose(ten.propose(K, V).W, one.propose(K, V).W)


@pytest.mark.parametrize("mom2_weight", [None, 37.0])
def test_the_editor_builds_the_released_projector_from_e_kk(stats_dir, mom2_weight):
    """Through the editor: ridge 10 in every solver, and the projector spans the eigenvectors of
    the layer's E[kk^T] below the cut, whatever N the anchor Gram carries (a cut inside the
    tiny model's spectrum, the released rule otherwise)."""
    model, tok = tiny_model("llama")
    config = _config(stats_dir, mom2_weight=mom2_weight)
    probe = Editor(model, tok, config)
    moments = layer_moments(model, tok, probe.spec_, probe.layers_, config, progress=False)
    layer = probe.layers_[0]
    evals, evecs = torch.linalg.eigh(moments[layer].double())
    half = len(evals) // 2
    cut = float(evals[half - 1] + evals[half]) / 2  # between two eigenvalues: keep the lower half
    editor = make_editor("alphaedit", tiny_model("llama")[0], tok, config,
                         **AlphaEditConfig.released(threshold=cut).to_dict())
    editor.prepare()
    assert editor.config.resolved_method_config().mom2_weight == mom2_weight
    keep = evals < cut
    assert int(keep.sum()) == half
    expected = evecs[:, keep] @ evecs[:, keep].T
    solver = editor.solvers_[layer]
    assert solver.ridge == 10.0 and solver.threshold == cut
    assert torch.allclose(solver.P_, expected, atol=1e-8)
    editor.edit(FACTS[:1])  # and it edits


def test_edit_config_fills_in_n_and_refuses_a_second_one():
    config = EditConfig(method="alphaedit", mom2_weight=500.0, method_config=AlphaEditConfig.released())
    config.validate()
    assert config.resolved_method_config() == AlphaEditConfig.released(mom2_weight=500.0)
    assert EditConfig(method="alphaedit").resolved_method_config().mom2_weight is None  # the solver's default N
    with pytest.raises(HyperparameterError, match="set mom2_weight on EditConfig"):
        EditConfig(method="alphaedit", mom2_weight=500.0,
                   method_config=AlphaEditConfig.released(mom2_weight=20.0)).validate()
    with pytest.raises(HyperparameterError, match="set mom2_weight on EditConfig"):
        EditConfig(method="alphaedit", method_config=AlphaEditConfig(mom2_weight=20.0)).validate()


def test_a_bad_rule_is_refused_and_the_rule_is_settable_by_name():
    with pytest.raises(HyperparameterError, match=r"AlphaEditConfig\.threshold_rule must be one of"):
        AlphaEditConfig(threshold_rule="abs")
    with pytest.raises(HyperparameterError, match=r"AlphaEditConfig\.mom2_weight"):
        AlphaEditConfig(mom2_weight=0.0)
    with pytest.raises(HyperparameterError, match="threshold_rule"):
        NullSpaceLayer(torch.zeros(8, 2), 0, 1, torch.eye(8), threshold_rule="Absolute")
    assert parse_settings("alphaedit", ["threshold_rule=absolute", "ridge=10"]) == {"threshold_rule": "absolute",
                                                                                   "ridge": 10.0}


# ----------------------------------------------------------------------------------------------
# saved states


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "editor.json").read_text())


def _rewrite(folder: Path, manifest: dict) -> None:
    manifest["digest"] = state_mod.manifest_digest(manifest)
    (folder / "editor.json").write_text(json.dumps(manifest))


def test_a_version_1_alphaedit_state_loads_with_the_relative_rule():
    from safetensors.torch import load_file

    saved = _V1 / "state_v1_alphaedit"
    old = load_file(saved / "solvers.safetensors")
    model, tok = tiny_model("llama", seed=0)
    editor = Editor.load(model, tok, saved)
    assert editor.config.resolved_method_config().threshold_rule == "relative"
    for layer, solver in editor.solvers_.items():
        assert torch.equal(solver.P_, old[f"layer{layer}.P_"])


def test_a_state_saved_before_the_rule_existed_loads_and_continues(stats_dir, tmp_path):
    model, tok = tiny_model("llama")
    editor = make_editor("alphaedit", model, tok, _config(stats_dir), threshold=0.05)
    editor.edit(FACTS[:1])
    editor.save(tmp_path / "s")
    manifest = _manifest(tmp_path / "s")
    assert manifest["config"]["method_config"]["threshold_rule"] == "relative"
    for name in ("threshold_rule", "mom2_weight"):  # as every save made before these settings existed
        del manifest["config"]["method_config"][name]
    _rewrite(tmp_path / "s", manifest)
    again = Editor.load(tiny_model("llama")[0], tok, tmp_path / "s")
    assert again.config.method_config == AlphaEditConfig(threshold=0.05)
    for layer, solver in again.solvers_.items():
        assert torch.equal(solver.P_, editor.solvers_[layer].P_)
        assert solver.state_dict()["scalars"] == editor.solvers_[layer].state_dict()["scalars"]
    again.edit(FACTS[1:])
    editor.edit(FACTS[1:])
    for layer in editor.layers_:
        assert torch.equal(again.solvers_[layer].W_, editor.solvers_[layer].W_)


def test_the_released_setting_is_saved_and_reloaded(stats_dir, tmp_path):
    model, tok = tiny_model("llama")
    editor = Editor(model, tok, _config(stats_dir, mom2_weight=80.0, method_config=AlphaEditConfig.released()))
    editor.edit(FACTS[:1])
    editor.save(tmp_path / "s")
    again = Editor.load(tiny_model("llama")[0], tok, tmp_path / "s")
    assert again.config.method_config == AlphaEditConfig.released()
    assert again.config.resolved_method_config() == AlphaEditConfig.released(mom2_weight=80.0)
    for layer, solver in again.solvers_.items():
        assert solver.ridge == 10.0 and torch.equal(solver.P_, editor.solvers_[layer].P_)
    # The solvers' ridge is checked against the saved config: a forged ridge is refused.
    manifest = _manifest(tmp_path / "s")
    manifest["config"]["method_config"]["ridge"] = 1.0
    _rewrite(tmp_path / "s", manifest)
    with pytest.raises(Exception, match="solver ridge = 10.0"):
        Editor.load(tiny_model("llama")[0], tok, tmp_path / "s")


# ----------------------------------------------------------------------------------------------
# the bench


def test_the_bench_runs_and_names_the_released_variant(tmp_path):
    args = BenchConfig(out=str(tmp_path), methods=("alphaedit", "alphaedit@released", "alphaedit@released+nas"),
                       method_settings={"alphaedit": {"threshold": 0.05}})
    assert args.settings_of("alphaedit") == {"threshold": 0.05}
    released = {"threshold": 2e-2, "ridge": 10.0, "threshold_rule": "absolute"}
    assert args.settings_of("alphaedit@released") == released  # the preset over the method's settings
    variant = method_variant("alphaedit@released+nas")
    assert (variant.method, variant.preset, variant.nas) == ("alphaedit", "released", True)
    assert variant.record(1000) == {"method": "alphaedit", "preset": "released", "value_norm_anchor": "nas",
                                    "nas_reference_facts": 1000}
    assert method_variant("alphaedit").record(1000) == {}
    assert args.edit_config_of("alphaedit@released").anchor_value_norms is False
    assert args.edit_config_of("alphaedit@released+nas").anchor_value_norms == "nas"
    for bad, message in ((("alphaedit@tuned",), "no preset 'tuned'"), (("memit@released",), "no preset"),
                         (("nosuch",), "unknown method 'nosuch'"), (("ft+nas",), "computes no values"),
                         (("alphaedit", "alphaedit"), "listed twice")):
        with pytest.raises(HyperparameterError, match=message):
            BenchConfig(out=str(tmp_path), methods=bad)
    with pytest.raises(HyperparameterError, match="AlphaEditConfig.ridge"):
        BenchConfig(out=str(tmp_path), methods=("alphaedit@released",),
                    method_settings={"alphaedit@released": {"ridge": -1.0}})
