"""The method protocol and registry: every layer solver equals its NumPy reference, declares its
capabilities, round-trips its state, and a new method needs one class and its registration."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch

import rlsedit_llm
from rlsedit_llm import EditConfig, Editor, Fact
from rlsedit_llm.editing.methods import load_editor, make_editor
from rlsedit_llm.errors import HyperparameterError
from rlsedit_llm.kernel import (
    Capabilities,
    LayerSolver,
    MethodConfig,
    Step,
    get_method,
    method_names,
    register,
    unregister,
)
from rlsedit_llm.kernel.rls import RLSEditConfig, woodbury_downdate, woodbury_update
from rlsedit_llm.pipeline.values import ValueConfig
from rlsedit_theory import Problem
from rlsedit_theory import recursive as np_recursive
from rlsedit_theory.reference import DenseCumulative, NullSpaceProjection, PerBatchReset

REFERENCES = {"memit": PerBatchReset, "memit_seq": DenseCumulative, "alphaedit": NullSpaceProjection}


def _instance(seed, d_k=10, d_v=4, n0=40, batches=(1, 3, 6, 2)):
    rng = np.random.default_rng(seed)
    W0 = rng.normal(size=(d_k, d_v))
    K0 = rng.normal(size=(n0, d_k)) * rng.uniform(0.05, 3, size=d_k)
    edits = [(rng.normal(size=(u, d_k)), rng.normal(size=(u, d_v))) for u in batches]
    return W0, K0.T @ K0, edits


def test_kernel_functions_mirror_the_theory_functions():
    W0, gram, edits = _instance(0)
    problem = Problem(W0, 0.3, 1.0, gram0=gram)
    C, W = problem.solve_metric(np.eye(W0.shape[0])), W0
    Ct, Wt = torch.from_numpy(C), torch.from_numpy(W0)
    for K, V in edits:
        C, W, _ = np_recursive.woodbury_update(C, W, K, V)
        Ct, Wt = woodbury_update(Ct, Wt, torch.from_numpy(K), torch.from_numpy(V))
        np.testing.assert_allclose(Ct.numpy(), C, rtol=1e-10, atol=1e-13)
        np.testing.assert_allclose(Wt.numpy(), W, rtol=1e-10, atol=1e-12)
    K, V = edits[1]
    C2, W2, _ = np_recursive.woodbury_downdate(C, W, K, V)
    Ct2, Wt2 = woodbury_downdate(Ct, Wt, torch.from_numpy(K), torch.from_numpy(V))
    np.testing.assert_allclose(Wt2.numpy(), W2, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(Ct2.numpy(), C2, rtol=1e-9, atol=1e-13)


@pytest.mark.parametrize("method", sorted(REFERENCES))
def test_each_baseline_equals_its_numpy_reference(method):
    W0, gram, edits = _instance(1)
    alpha, beta = 0.0, 1.0
    ref = REFERENCES[method](Problem(W0, alpha, beta, gram0=gram))
    solver = get_method(method)(torch.from_numpy(W0), alpha, beta, torch.from_numpy(gram))
    for K, V in edits:
        ref.update(K, V)
        solver.update(torch.from_numpy(K), torch.from_numpy(V))
        np.testing.assert_allclose(solver.W_.numpy(), ref.W_, rtol=1e-8, atol=1e-10)
    assert solver.n_updates_ == len(edits) and solver.n_rows_ == sum(K.shape[0] for K, _ in edits)


@pytest.mark.parametrize("method", ["rlsedit", "memit", "memit_seq", "alphaedit"])
def test_state_dict_round_trip_and_proposals_change_nothing(method):
    W0, gram, edits = _instance(2)
    a = get_method(method)(torch.from_numpy(W0), 0.1, 1.0, torch.from_numpy(gram))
    a.update(*(torch.from_numpy(x) for x in edits[0]))
    snapshot = {k: v.clone() for k, v in a.state_dict()["tensors"].items()}
    a.propose(*(torch.from_numpy(x) for x in edits[1]))  # computed, not committed
    assert all(torch.equal(v, snapshot[k]) for k, v in a.state_dict()["tensors"].items())
    b = type(a).from_state_dict(a.clone().state_dict())
    for K, V in edits[1:]:
        a.update(torch.from_numpy(K), torch.from_numpy(V))
        b.update(torch.from_numpy(K), torch.from_numpy(V))
    assert torch.equal(a.W_, b.W_)
    assert a.state_dict()["scalars"] == b.state_dict()["scalars"]


def test_capabilities_are_declared_by_the_classes():
    assert rlsedit_llm.capabilities("rlsedit") == Capabilities(retracts=True, cumulative_objective=True,
                                                               keeps_inverse=True)
    assert rlsedit_llm.capabilities("memit_seq").cumulative_objective
    assert not rlsedit_llm.capabilities("memit_seq").keeps_inverse
    for name in ("memit", "alphaedit", "ft"):
        assert rlsedit_llm.capabilities(name) == Capabilities()
    assert set(method_names()) >= {"rlsedit", "memit", "memit_seq", "alphaedit", "ft"}


def test_unknown_method_and_removal_without_retraction_are_typed_errors():
    with pytest.raises(HyperparameterError, match="choose one of"):
        get_method("romeo")
    with pytest.raises(HyperparameterError, match="choose one of"):
        EditConfig(method="romeo").validate()
    W0, gram, edits = _instance(3)
    solver = get_method("memit")(torch.from_numpy(W0), 0.0, 1.0, torch.from_numpy(gram))
    solver.update(*(torch.from_numpy(x) for x in edits[0]))
    with pytest.raises(HyperparameterError, match="cannot retract"):
        solver.downdate(*(torch.from_numpy(x) for x in edits[0]))
    with pytest.raises(TypeError):
        register("nameless", type("Nameless", (), {}), RLSEditConfig)


@dataclass(frozen=True)
class _HalfStepConfig(MethodConfig):
    method = "half_step_test"
    fraction: float = 0.5

    def validate(self) -> None:
        if not 0 < self.fraction <= 1:
            raise HyperparameterError(f"_HalfStepConfig.fraction must lie in (0, 1]; got {self.fraction!r}")


class _HalfStep(LayerSolver):
    """A toy method for the test: moves half-way to the least-norm fit of each batch."""

    name = "half_step_test"
    capabilities = Capabilities()

    state_scalars = LayerSolver.state_scalars + ("fraction",)

    def __init__(self, W0, alpha, beta, gram0=None, *, dtype=torch.float64, track_information=False,
                 fraction: float = 0.5):
        self._init_common(W0, alpha, beta, dtype)
        self.fraction = fraction

    def propose(self, K, V) -> Step:
        K, V = self._check(K, V)
        return Step(self.W_ + self.fraction * torch.linalg.pinv(K) @ (V - K @ self.W_), {}, K.shape[0])


def test_a_new_method_is_one_class_plus_its_registration(tiny, tmp_path):
    register("half_step_test", _HalfStep, _HalfStepConfig)
    try:
        assert "half_step_test" in method_names()
        model, tok = tiny("llama")
        cfg = EditConfig(method="half_step_test", stats_tokens=2000, n_templates=2, template_length=4,
                         cache_dir=str(tmp_path / "stats"), value=ValueConfig(steps=4))
        editor = make_editor("half_step_test", model, tok, cfg, fraction=0.25)
        assert isinstance(editor, Editor) and not editor.capabilities.retracts
        assert editor.config.method_config == _HalfStepConfig(fraction=0.25)
        report = editor.edit([Fact("{} lives in", "Alice", "Paris")])
        assert report.facts[0].residual_after < report.facts[0].residual_before
        editor.save(tmp_path / "s")
        fresh, _ = tiny("llama")
        again = load_editor("half_step_test", fresh, tok, tmp_path / "s")
        assert all(torch.equal(again.solvers_[l].W_, editor.solvers_[l].W_) for l in editor.layers_)
        assert again.config.method_config == _HalfStepConfig(fraction=0.25)
        assert all(s.fraction == 0.25 for s in editor.solvers_.values())
        with pytest.raises(HyperparameterError, match="retracts"):
            editor.undo(report.edit_id)
    finally:
        unregister("half_step_test")
    assert "half_step_test" not in method_names()


def test_editor_level_method_cannot_run_inside_editor(tiny):
    model, tok = tiny("llama")
    with pytest.raises(HyperparameterError, match="make_editor"):
        Editor(model, tok, EditConfig(method="ft"))
    ft = make_editor("ft", model, tok, EditConfig(layers=(1,)), lr=1e-3, steps=1)
    assert ft.layers_ == (1,) and ft.capabilities == Capabilities()
    with pytest.raises(HyperparameterError, match=r"RLSEditConfig has no setting\(s\) \['lr'\]"):
        make_editor("rlsedit", model, tok, lr=1.0)
