"""The torch twin LayerRLS equals the verified NumPy recursion on the same K, V."""

import numpy as np
import pytest
import torch

from rlsedit_llm.errors import HyperparameterError, NotPositiveDefiniteError, ShapeError
from rlsedit_llm.kernel.rls import LayerRLS
from rlsedit_theory import Problem, RecursiveLS, closed_form


def _instance(seed, d_k=12, d_v=5, n0=40, batches=(1, 3, 20, 2)):
    rng = np.random.default_rng(seed)
    W0 = rng.normal(size=(d_k, d_v))
    K0 = rng.normal(size=(n0, d_k)) * rng.uniform(0.1, 3, size=d_k)
    edits = [(rng.normal(size=(u, d_k)), rng.normal(size=(u, d_v))) for u in batches]
    return W0, K0.T @ K0 / n0, edits


@pytest.mark.parametrize("alpha,beta", [(0.0, 2.0), (0.3, 0.0), (1.5, 15.0)])
@pytest.mark.parametrize("seed", [0, 1])
def test_layer_rls_equals_numpy_recursion(alpha, beta, seed):
    W0, gram, edits = _instance(seed)
    ref = RecursiveLS(Problem(W0, alpha, beta, gram0=gram))
    twin = LayerRLS(torch.from_numpy(W0), alpha, beta, torch.from_numpy(gram), track_information=True)
    for K, V in edits:
        ref.update(K, V)
        twin.update(torch.from_numpy(K), torch.from_numpy(V))
        np.testing.assert_allclose(twin.W_.numpy(), ref.W_, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(twin.C_.numpy(), ref.C_, rtol=1e-10, atol=1e-13)
    assert twin.drift() < 1e-10
    assert torch.equal(twin.C_, twin.C_.mT)


def test_update_and_downdate_match_closed_form():
    W0, gram, edits = _instance(3)
    problem = Problem(W0, 0.5, 3.0, gram0=gram)
    twin = LayerRLS(torch.from_numpy(W0), 0.5, 3.0, torch.from_numpy(gram))
    for K, V in edits:
        twin.update(torch.from_numpy(K), torch.from_numpy(V))
    np.testing.assert_allclose(twin.W_.numpy(), closed_form(problem, edits), rtol=1e-10)
    twin.downdate(*(torch.from_numpy(x) for x in edits[2]))
    rest = edits[:2] + edits[3:]
    np.testing.assert_allclose(twin.W_.numpy(), closed_form(problem, rest), rtol=1e-9)


def test_float32_state_close_to_float64():
    W0, gram, edits = _instance(4)
    t64 = LayerRLS(torch.from_numpy(W0), 1.0, 5.0, torch.from_numpy(gram))
    t32 = LayerRLS(torch.from_numpy(W0), 1.0, 5.0, torch.from_numpy(gram), dtype=torch.float32)
    for K, V in edits:
        t64.update(torch.from_numpy(K), torch.from_numpy(V))
        t32.update(torch.from_numpy(K), torch.from_numpy(V))
    assert t32.W_.dtype == torch.float32
    rel = torch.linalg.norm(t32.W_.double() - t64.W_) / torch.linalg.norm(t64.W_)
    assert rel < 1e-4


def test_state_dict_round_trip_continues_the_same_recursion():
    W0, gram, edits = _instance(5)
    a = LayerRLS(torch.from_numpy(W0), 0.1, 1.0, torch.from_numpy(gram))
    a.update(*(torch.from_numpy(x) for x in edits[0]))
    b = LayerRLS.from_state_dict(a.state_dict())
    for K, V in edits[1:]:
        a.update(torch.from_numpy(K), torch.from_numpy(V))
        b.update(torch.from_numpy(K), torch.from_numpy(V))
    assert torch.equal(a.W_, b.W_) and torch.equal(a.C_, b.C_)


def test_typed_errors_leave_state_untouched():
    W0, gram, edits = _instance(6)
    with pytest.raises(HyperparameterError):
        LayerRLS(torch.from_numpy(W0), -1.0, 1.0, torch.from_numpy(gram))
    with pytest.raises(NotPositiveDefiniteError):
        LayerRLS(torch.from_numpy(W0), 0.0, 1.0, torch.zeros(12, 12, dtype=torch.float64))
    s = LayerRLS(torch.from_numpy(W0), 0.1, 1.0, torch.from_numpy(gram))
    s.update(*(torch.from_numpy(x) for x in edits[0]))
    before = s.state_dict()["tensors"]
    before = {k: v.clone() for k, v in before.items()}
    with pytest.raises(ShapeError):
        s.update(torch.zeros(2, 11, dtype=torch.float64), torch.zeros(2, 5, dtype=torch.float64))
    with pytest.raises(NotPositiveDefiniteError):  # never added: I - K C K^T not PD
        s.downdate(torch.from_numpy(edits[2][0][:1]) * 1e3, torch.zeros(1, 5, dtype=torch.float64))
    for k, v in s.state_dict()["tensors"].items():
        assert torch.equal(v, before[k])


@pytest.mark.parametrize("track", [False, True])
def test_commit_updates_c_in_place_as_the_pure_woodbury_functions(track):
    """propose holds only O(d_k u) factors; commit updates C (and G) in place; the result equals
    the pure woodbury_update / woodbury_downdate (which mirror the theory) to rounding."""
    from rlsedit_llm.kernel.rls import woodbury_downdate, woodbury_update

    W0, gram, edits = _instance(6, d_k=40, batches=(3, 7, 1))
    s = LayerRLS(torch.from_numpy(W0), 0.2, 2.0, torch.from_numpy(gram), track_information=track)
    C, W = s.C_.clone(), s.W_.clone()
    c_id = s.C_
    for K, V in edits:
        K, V = torch.from_numpy(K), torch.from_numpy(V)
        step = s.propose(K, V)
        assert not step.state and all(F.shape == (40, K.shape[0]) for _, F, _ in step.inplace)
        s.commit(step)
        C, W = woodbury_update(C, W, K, V)
    K, V = (torch.from_numpy(x) for x in edits[1])
    s.downdate(K, V)
    C, W = woodbury_downdate(C, W, K, V)
    assert s.C_ is c_id and torch.equal(s.C_, s.C_.mT)
    assert float((s.C_ - C).abs().max()) <= 1e-11 * float(C.abs().max())
    assert float((s.W_ - W).abs().max()) <= 1e-11 * float(W.abs().max())
    if track:
        assert s.drift() < 1e-10


@pytest.mark.parametrize("exact", [False, True])
def test_checkpoint_rollback_takes_in_place_commits_back(exact):
    W0, gram, edits = _instance(7, d_k=30)
    s = LayerRLS(torch.from_numpy(W0), 0.2, 2.0, torch.from_numpy(gram), track_information=True)
    s.update(*(torch.from_numpy(x) for x in edits[0]))
    before = {k: v.clone() for k, v in s.state_dict(snapshot=False)["tensors"].items()}
    scalars = dict(s.state_dict(snapshot=False)["scalars"])
    point, log = s.checkpoint(), []
    for K, V in edits[1:]:
        s.commit(s.propose(torch.from_numpy(K), torch.from_numpy(V)), log=log, exact=exact)
    s.rollback(point, log)
    assert s.state_dict(snapshot=False)["scalars"] == scalars
    for name, value in s.state_dict(snapshot=False)["tensors"].items():
        if exact or name not in ("C", "G"):
            assert torch.equal(value, before[name]), name  # a kept copy: bitwise
        else:
            assert float((value - before[name]).abs().max()) <= 1e-12 * float(before[name].abs().max()), name


def test_a_borrowed_state_is_copied_before_it_is_changed():
    W0, gram, edits = _instance(8, d_k=20)
    a = LayerRLS(torch.from_numpy(W0), 0.2, 2.0, torch.from_numpy(gram))
    b = LayerRLS.from_state_dict(a.state_dict())  # shares a's tensors
    C0 = a.C_.clone()
    a.update(*(torch.from_numpy(x) for x in edits[0]))
    assert torch.equal(b.C_, C0)  # a copied before changing in place
    b.update(*(torch.from_numpy(x) for x in edits[0]))
    assert torch.equal(a.C_, b.C_) and a.C_ is not b.C_


def test_a_commit_interrupted_in_its_second_term_is_finished_then_rolled_back_bitwise(monkeypatch):
    """A failure inside a commit's in-place terms does not leave them half-applied: the commit is
    finished before the exception propagates, and a rollback restores the kept copies bitwise."""
    from rlsedit_llm.kernel.inplace import SymmetricRankUpdate

    W0, gram, edits = _instance(9, d_k=24)
    s = LayerRLS(torch.from_numpy(W0), 0.2, 2.0, torch.from_numpy(gram), track_information=True)
    s.update(*(torch.from_numpy(x) for x in edits[0]))
    before = {k: v.clone() for k, v in s.state_dict(snapshot=False)["tensors"].items()}
    scalars = dict(s.state_dict(snapshot=False)["scalars"])
    step = s.propose(*(torch.from_numpy(x) for x in edits[1]))
    assert [attr for attr, _, _ in step.inplace] == ["C_", "G_"]
    finished = s.clone()  # the same commit, uninterrupted
    finished.commit(step)
    real_run, calls = SymmetricRankUpdate.run, []

    def failing(update):
        calls.append(update.C is s.G_)
        if update.C is s.G_ and calls.count(True) == 1:  # the G_ term's first run only
            raise MemoryError("simulated")
        return real_run(update)

    point, log = s.checkpoint(), []
    monkeypatch.setattr(SymmetricRankUpdate, "run", failing)
    with pytest.raises(MemoryError):
        s.commit(step, log=log, exact=True)
    monkeypatch.undo()
    for name, value in s.state_dict(snapshot=False)["tensors"].items():  # finished, not half-applied
        assert torch.equal(value, finished.state_dict(snapshot=False)["tensors"][name]), name
    assert [e[0] for e in log] == ["copy", "copy", "commit"]
    s.rollback(point, log)  # restores the kept copies: bitwise
    assert s.state_dict(snapshot=False)["scalars"] == scalars
    for name, value in s.state_dict(snapshot=False)["tensors"].items():
        assert torch.equal(value, before[name]), name
