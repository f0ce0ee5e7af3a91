"""The 2026 baselines: UltraEdit (editor-level) and ENCORE (a layer solver plus most-probable early
stopping of the value optimisation). Each pins a property its paper states, runs end to end on a
tiny model with save/load, and runs in the benchmark next to RLSEdit."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from rlsedit_llm import EditConfig, Fact
from rlsedit_llm.adapters.spec import detect_spec, get_module
from rlsedit_llm.editing.methods import load_editor, make_editor
from rlsedit_llm.editing.ultraedit import RunningMoments, UltraEditConfig, UltraEditor, ultraedit_shift
from rlsedit_llm.errors import FactError
from rlsedit_llm.evaluation import bench, protocol
from rlsedit_llm.kernel import Capabilities, get_method
from rlsedit_llm.kernel.encore import ENCORE_NORM_WEIGHT, EncoreLayer
from rlsedit_llm.pipeline.facts import encode_target
from rlsedit_llm.pipeline.keys import fact_rows
from rlsedit_llm.pipeline.values import ValueConfig, compute_values
from rlsedit_theory import Problem
from rlsedit_theory.reference import DenseCumulative
from tests.helpers import FAST_VALUE
from tests.helpers import fast_config as _fast_config
from tests.llm.kernel.test_methods import _instance

pytestmark = pytest.mark.usefixtures("one_thread_unless_slow")

FACTS = [
    Fact("{} is located in the city of", "The Eiffel Tower", "Rome", target_true="Paris", case_id=0,
         paraphrases=("The Eiffel Tower stands in",), neighbourhood=("The Louvre is located in the city of",)),
    Fact("The mother tongue of {} is", "Danielle Darrieux", "English", target_true="French", case_id=1,
         paraphrases=("Danielle Darrieux speaks",), neighbourhood=("The mother tongue of Jean Gabin is",)),
    Fact("{} is headquartered in the country of", "Toyota", "Germany", target_true="Japan", case_id=2,
         paraphrases=("Toyota has its head office in",), neighbourhood=("Honda is headquartered in",)),
    Fact("{} is the capital of", "Berlin", "Spain", target_true="Germany", case_id=3,
         paraphrases=("Berlin is a capital city in",), neighbourhood=("Madrid is the capital of",)),
]
# ----------------------------------------------------------------------------------------------
# UltraEdit: lifelong normalisation and the closed form


def test_running_moments_are_the_mean_and_variance_of_everything_seen():
    gen = torch.Generator().manual_seed(0)
    moments = RunningMoments(7)
    seen = []
    for n in (5, 1, 12, 3):  # turns of different sizes, one of a single row
        x = torch.randn(n, 7, generator=gen) * torch.linspace(0.1, 30, 7) + torch.linspace(-5, 100, 7)
        moments.update(x)
        seen.append(x.double())
        all_x = torch.cat(seen)
        assert moments.count_ == all_x.shape[0]
        torch.testing.assert_close(moments.mean, all_x.mean(dim=0), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(moments.var, all_x.var(dim=0), rtol=1e-10, atol=1e-12)  # unbiased
        torch.testing.assert_close(moments.std, all_x.std(dim=0), rtol=1e-10, atol=1e-12)
    # the state is replaced, never written into: a reference snapshot restores it
    snap = moments.state()
    moments.update(torch.randn(4, 7, generator=gen))
    moments.load(snap)
    torch.testing.assert_close(moments.mean, torch.cat(seen).mean(dim=0), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n, d_k", [(6, 20), (30, 8)])  # fewer rows than d_k (push-through) and more
def test_ultraedit_shift_is_the_ridge_solution_on_whitened_pseudo_values(n, d_k):
    gen = torch.Generator().manual_seed(n)
    d_v, lr, ridge = 5, 0.03, 0.7
    moments = RunningMoments(d_k + d_v)
    earlier = torch.randn(9, d_k + d_v, generator=gen, dtype=torch.float64) * 3 + 1
    moments.update(earlier)
    K = torch.randn(n, d_k, generator=gen, dtype=torch.float64)
    G = torch.randn(n, d_v, generator=gen, dtype=torch.float64) * 0.1
    moments.update(torch.cat([K, G], dim=1))
    delta = ultraedit_shift(K, G, moments, lr=lr, ridge=ridge)
    # Directly: whiten with the mean/std of everything seen, pseudo-values, ridge by least squares.
    Z = torch.cat([earlier, torch.cat([K, G], dim=1)])
    z_hat = (torch.cat([K, G], dim=1) - Z.mean(0)) / (Z.std(0) + torch.finfo(torch.float32).eps)
    k_hat, g_hat = z_hat[:, :d_k], z_hat[:, d_k:]
    V = -lr * (k_hat ** 2).sum(1, keepdim=True) * g_hat
    A = torch.cat([K, ridge ** 0.5 * torch.eye(d_k, dtype=torch.float64)])
    B = torch.cat([V, torch.zeros(d_k, d_v, dtype=torch.float64)])
    expected = torch.linalg.lstsq(A, B).solution
    torch.testing.assert_close(delta, expected, rtol=1e-10, atol=1e-12)
    # and the normal equations
    torch.testing.assert_close((K.T @ K + ridge * torch.eye(d_k, dtype=torch.float64)) @ delta, K.T @ V,
                               rtol=1e-9, atol=1e-11)


def test_ultraedit_features_are_module_inputs_and_output_gradients(tiny):
    """K is the edited module's input at the answer positions; G the gradient of the summed target
    NLL at its output (checked by central differences along a random direction)."""
    model, tok = tiny("llama")
    ed = UltraEditor(model, tok, layers=(1, 2))
    fact = FACTS[1]
    K, G = ed.features([fact])
    p = tok(fact.text(), add_special_tokens=False)["input_ids"]
    t = encode_target(tok, fact.target)
    assert K[1].shape == (len(t), ed.spec_.d_k) and G[2].shape == (len(t), ed.spec_.d_model)
    ids = torch.tensor([p + t[:-1]])
    module = get_module(model, ed.spec_.edit_module_path.format(2))
    pos = torch.arange(len(p) - 1, len(p) + len(t) - 1)
    direction = torch.randn(len(t), ed.spec_.d_model, generator=torch.Generator().manual_seed(1))
    seen = {}

    def nll(eps):
        def hook(mod, args, out):
            seen["k"] = args[0][0, pos].detach()
            out = out.clone()
            out[0, pos] += eps * direction
            return out
        h = module.register_forward_hook(hook)
        try:
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=ids).logits[0, pos].double(), -1)
        finally:
            h.remove()
        return -float(logp[torch.arange(len(t)), torch.tensor(t)].sum())

    eps = 1e-3
    fd = (nll(eps) - nll(-eps)) / (2 * eps)
    assert fd == pytest.approx(float((G[2] * direction).sum()), rel=2e-3, abs=1e-6)
    torch.testing.assert_close(K[2], seen["k"].float())


def test_ultraedit_end_to_end_raises_targets_rolls_back_and_round_trips(tiny, tmp_path):
    model, tok = tiny("llama")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    ed = make_editor("ultraedit", model, tok, EditConfig(), lr=1e-3, ridge=1e-3)
    assert isinstance(ed, UltraEditor) and ed.capabilities == Capabilities() and ed.layers_ == (0, 1, 2)
    with pytest.raises(FactError):
        ed.edit([{"prompt": "no slot here", "subject": "x", "target": "y"}])
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters()) and ed.moments_[0].count_ == 0
    report = ed.edit(FACTS[:2])
    assert all(f.prob_after > f.prob_before for f in report.facts), str(report)
    edited = {ed.spec_.edit_module_path.format(l) + ".weight" for l in ed.layers_}
    for n, p in model.named_parameters():
        assert (not torch.equal(p, before[n])) == (n in edited), n
        assert p.requires_grad == flags[n] and p.grad is None
    assert ed.n_batches_ == 1 and ed.moments_[0].count_ == ed.n_rows_ == report.extras["rows"]
    ed.save(tmp_path / "ue")
    fresh, _ = tiny("llama")
    again = load_editor("ultraedit", fresh, tok, tmp_path / "ue")
    assert again.n_batches_ == 1 and again.lr_ == ed.lr_ and again.ridge == ed.ridge
    for l in ed.layers_:
        assert torch.equal(again.weights()[l], ed.weights()[l])
        assert again.moments_[l].count_ == ed.moments_[l].count_
        assert torch.equal(again.moments_[l].m2_, ed.moments_[l].m2_)
    # both continue the stream identically (the statistics carry over)
    ed.edit(FACTS[2:])
    again.edit(FACTS[2:])
    assert all(torch.equal(again.weights()[l], ed.weights()[l]) for l in ed.layers_)
    # a save torn between its two files is refused, not half-loaded
    (tmp_path / "ue" / "ultraedit.safetensors").write_bytes(b"torn")
    with pytest.raises(Exception, match="interrupted"):
        UltraEditor.load(tiny("llama")[0], tok, tmp_path / "ue")


# ----------------------------------------------------------------------------------------------
# ENCORE: the norm-constrained cumulative write


def test_encore_equals_memit_seq_and_rlsedit_with_alpha_plus_lambda():
    W0, gram, edits = _instance(4)
    alpha, beta = 0.3, 1.0
    lam = ENCORE_NORM_WEIGHT
    encore = get_method("encore")(torch.from_numpy(W0), alpha, beta, torch.from_numpy(gram))
    assert isinstance(encore, EncoreLayer) and encore.alpha == alpha and encore.norm_weight == lam
    seq = get_method("memit_seq")(torch.from_numpy(W0), alpha + lam, beta, torch.from_numpy(gram))
    rls = get_method("rlsedit")(torch.from_numpy(W0), alpha + lam, beta, torch.from_numpy(gram))
    ref = DenseCumulative(Problem(W0, alpha + lam, beta, gram0=gram))
    for K, V in edits:
        Kt, Vt = torch.from_numpy(K), torch.from_numpy(V)
        for s in (encore, seq, rls):
            s.update(Kt, Vt)
        ref.update(K, V)
        np.testing.assert_allclose(encore.W_.numpy(), ref.W_, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(encore.W_.numpy(), seq.W_.numpy(), rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(encore.W_.numpy(), rls.W_.numpy(), rtol=1e-10, atol=1e-10)


def test_encore_step_is_the_norm_penalised_ridge_and_its_norm_is_bounded():
    """Each batch solves ``min ||K_t (W + D) - V_t||^2 + D^T (lambda I + beta K0^T K0 + sum_p K_p^T K_p) D``
    (the authors' per-batch problem with the past edits' keys); the total change obeys the norm
    constraint ``||W_t - W0||_F <= ||R0||_F / (2 sqrt(lambda))`` (T3(a) with ``A >= lambda I``)."""
    W0, gram, edits = _instance(5)
    lam = 2.5
    solver = EncoreLayer(torch.from_numpy(W0), 0.0, 1.0, torch.from_numpy(gram), norm_weight=lam)
    metric = lam * np.eye(W0.shape[0]) + gram
    W = W0
    for t, (K, V) in enumerate(edits):
        L = np.linalg.cholesky(metric)  # metric = L L^T, so D^T metric D = ||L^T D||^2
        A = np.vstack([K, L.T])
        B = np.vstack([V - K @ W, np.zeros((W0.shape[0], W0.shape[1]))])
        D = np.linalg.lstsq(A, B, rcond=None)[0]
        solver.update(torch.from_numpy(K), torch.from_numpy(V))
        np.testing.assert_allclose(solver.W_.numpy(), W + D, rtol=1e-10, atol=1e-10)
        W = solver.W_.numpy()
        metric = metric + K.T @ K
        R0 = np.vstack([K_ @ W0 - V_ for K_, V_ in edits[: t + 1]])
        assert np.linalg.norm(W - W0) <= np.linalg.norm(R0) / (2 * np.sqrt(lam)) * (1 + 1e-9)
    state = solver.state_dict()
    assert state["scalars"]["norm_weight"] == lam
    again = EncoreLayer.from_state_dict(solver.clone().state_dict())
    assert again.norm_weight == lam and torch.equal(again.W_, solver.W_)
    assert EncoreLayer.capabilities == Capabilities(cumulative_objective=True)


# ----------------------------------------------------------------------------------------------
# ENCORE: most-probable early stopping (MPES)

MPES_FACTS = [Fact("we saw {}", "the old cat", "Paris"), Fact("they sold {}", "the long table", "Japan"),
              Fact("he met {}", "the tall man", "English")]
MPES_TEMPLATES = ["{}", "The cat. {}", "Because I. {}"]


def _top1_in_every_row(model, tok, spec, layer, fact, delta) -> bool:
    """Independent check: add ``delta`` to the output of decoder layer ``layer`` at the subject's last
    token of every template row and read the teacher-forced argmax at every target position."""
    rows, subj = fact_rows(tok, [fact], MPES_TEMPLATES)
    target = encode_target(tok, fact.target)
    block = get_module(model, spec.layer_path.format(layer))
    for ids, s in zip(rows, subj, strict=True):
        def hook(mod, args, out, s=s):
            h = (out[0] if isinstance(out, tuple) else out).clone()
            h[0, s] += delta.to(h.dtype)
            return (h,) + tuple(out[1:]) if isinstance(out, tuple) else h
        handle = block.register_forward_hook(hook)
        try:
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([ids + target[:-1]])).logits[0]
        finally:
            handle.remove()
        if any(int(logits[len(ids) - 1 + j].argmax()) != tok_id for j, tok_id in enumerate(target)):
            return False
    return True


def test_mpes_stops_each_fact_exactly_when_its_target_is_top1_in_every_context(tiny):
    model, tok = tiny("llama")
    spec, layer = detect_spec(model), 2
    base = dict(lr=0.005, steps=40, early_stop_loss=0.0, clamp_norm_factor=4.0, weight_decay=0.0, kl_factor=0.0)
    mpes = compute_values(model, tok, spec, layer, MPES_FACTS, MPES_TEMPLATES,
                          ValueConfig(**base, stop_when_top1=True))
    assert mpes.top1 is not None and bool(mpes.top1.all()) and mpes.steps_run < 39
    # The same optimisation without MPES, cut after k updates, for k = 0 .. steps_run.
    trajectory = []
    for k in range(mpes.steps_run + 1):
        plain = compute_values(model, tok, spec, layer, MPES_FACTS, MPES_TEMPLATES,
                               ValueConfig(**{**base, "steps": k + 1}))
        assert plain.top1 is None and plain.steps_run == k
        trajectory.append(plain.delta)
    stops = []
    for i, fact in enumerate(MPES_FACTS):
        hits = [_top1_in_every_row(model, tok, spec, layer, fact, d[i]) for d in trajectory]
        first = hits.index(True)  # the first evaluation at which the target is top-1 everywhere ...
        stops.append(first)
        torch.testing.assert_close(mpes.delta[i], trajectory[first][i], rtol=1e-4, atol=1e-6)  # ... is where it stopped
        assert _top1_in_every_row(model, tok, spec, layer, fact, mpes.delta[i])
    assert max(stops) == mpes.steps_run and min(stops) >= 1
    # Off by default, and then bit-identical to a config without the field set.
    assert ValueConfig().stop_when_top1 is False
    with pytest.raises(Exception, match="stop_when_top1"):
        ValueConfig(stop_when_top1=1).validate()


# ----------------------------------------------------------------------------------------------
# ENCORE through the editor


def test_encore_editor_equals_memit_seq_with_alpha_plus_lambda_and_round_trips(tiny, tmp_path):
    value = dataclasses.replace(FAST_VALUE, stop_when_top1=True)
    weights = {}
    for method, alpha in (("encore", 0.0), ("memit_seq", ENCORE_NORM_WEIGHT)):
        model, tok = tiny("llama")
        editor = make_editor(method, model, tok, _fast_config(tmp_path, alpha=alpha, value=value))
        reports = [editor.edit(FACTS[:2]), editor.edit(FACTS[2:])]
        assert all(f.prob_after > f.prob_before for r in reports for f in r.facts)
        weights[method] = {l: s.W_.clone() for l, s in editor.solvers_.items()}
        if method == "encore":
            editor.save(tmp_path / "enc")
            fresh, _ = tiny("llama")
            again = load_editor("encore", fresh, tok, tmp_path / "enc")
            assert all(torch.equal(again.solvers_[l].W_, editor.solvers_[l].W_) for l in editor.layers_)
            assert again.solvers_[0].norm_weight == ENCORE_NORM_WEIGHT
    for l, W in weights["encore"].items():
        rel = torch.linalg.norm(W - weights["memit_seq"][l]) / torch.linalg.norm(W)
        assert rel < 1e-6, (l, float(rel))


def test_make_editor_applies_encores_value_defaults_only_when_value_is_unset(tiny, tmp_path):
    model, tok = tiny("llama")
    editor = make_editor("encore", model, tok, _fast_config(tmp_path, value=None))
    assert editor.value_config_.stop_when_top1 is True
    assert editor.value_config_.lr == 0.5  # otherwise the family's defaults
    explicit = make_editor("encore", *tiny("llama"), _fast_config(tmp_path))
    assert explicit.value_config_ == FAST_VALUE
    implicit = make_editor("memit_seq", *tiny("llama"), _fast_config(tmp_path, value=None))
    assert implicit.value_config_.stop_when_top1 is False


# ----------------------------------------------------------------------------------------------
# The benchmark runs both next to RLSEdit


def test_bench_runs_rlsedit_ultraedit_and_encore_on_a_tiny_model(tiny, tmp_path, monkeypatch):
    model, tok = tiny("llama")
    monkeypatch.setattr(bench, "load_model", lambda name, **kw: (model, tok))
    stream = [dataclasses.replace(FACTS[i % len(FACTS)], case_id=i) for i in range(4)]
    monkeypatch.setattr(bench, "load_stream", lambda dataset, n, tok=None, **kw: stream[:n])
    real = protocol.make_runner

    def fast_runner(name, model, tokenizer, *, edit_config=None, **kw):
        value = dataclasses.replace(FAST_VALUE, stop_when_top1=name == "encore")
        cfg = dataclasses.replace(edit_config, n_templates=2, template_length=4, value=value)
        return real(name, model, tokenizer, edit_config=cfg, **kw)

    monkeypatch.setattr(bench, "make_runner", fast_runner)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    out = tmp_path / "bench"
    args = bench.BenchConfig(dataset="counterfact", model="tiny", edits=4, batch=2,
                             methods=("rlsedit", "ultraedit", "encore"),
                             out=str(out), stats_tokens=3000, checkpoints=2, glue=0, fluency_cases=2,
                             fluency_tokens=6, quiet=True, cache_dir=str(tmp_path / "stats"))
    assert bench.run_bench(args) == 0
    res = bench.read_results(out)
    for name in ("rlsedit", "ultraedit", "encore"):
        rec = res["methods"][name]
        assert rec["done"] and rec["edits_done"] == 4 and rec["final"]["all"]["n"] == 4, name
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters())  # the bench restores the base


def test_bench_passes_ultraedit_settings_and_records_them(tiny, tmp_path, monkeypatch):
    """UltraEdit's settings (--ultraedit-lr/--ultraedit-ridge) reach the UltraEdit editor and the
    run's settings; without them the run records none and UltraEdit keeps its released defaults."""
    model, tok = tiny("llama")
    seen = []
    real = protocol.make_runner

    def spy(name, model, tokenizer, **kw):
        runner = real(name, model, tokenizer, **kw)
        seen.append((runner.editor.lr_, runner.editor.ridge))
        raise KeyboardInterrupt  # stop after the runner is built: only its settings matter

    monkeypatch.setattr(bench, "load_model", lambda name, **kw: (model, tok))
    monkeypatch.setattr(bench, "load_stream", lambda dataset, n, tok=None, **kw: list(FACTS[:n]))
    monkeypatch.setattr(bench, "make_runner", spy)
    for given, recorded in (({}, False), ({"lr": 0.25, "ridge": 0.01}, True)):
        out = tmp_path / f"bench-{recorded}"
        extra = {"method_settings": {"ultraedit": given}} if given else {}
        args = bench.BenchConfig(model="tiny", edits=2, batch=2, methods=("ultraedit",), out=str(out),
                                 stats_tokens=3000, glue=0, fluency_cases=0, quiet=True,
                                 cache_dir=str(tmp_path / "stats"), **extra)
        with pytest.raises(KeyboardInterrupt):
            bench.run_bench(args)
        settings = bench.read_results(out)["settings"]
        if recorded:
            assert seen[-1] == (0.25, 0.01)
            assert settings["method_settings"]["ultraedit"] == {"lr": 0.25, "ridge": 0.01}
        else:
            assert seen[-1][1] == UltraEditConfig().ridge and "ultraedit" not in settings.get("method_settings", {})
