"""The value optimisers (rlsedit_llm.pipeline.values): the published Adam one unchanged bit for
bit, the per-fact L-BFGS one (``ValueConfig(optimizer="lbfgs")``): its result, its per-fact stop,
its settings' validation and its interrupt points."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from rlsedit_llm.adapters.spec import detect_spec
from rlsedit_llm.errors import HyperparameterError
from rlsedit_llm.pipeline import values
from rlsedit_llm.pipeline.facts import Fact, checked_facts
from rlsedit_llm.pipeline.fast_forward import FastForward
from rlsedit_llm.pipeline.tokens import needs_bos, pad_id
from rlsedit_llm.pipeline.values import ValueConfig, compute_values

pytestmark = pytest.mark.usefixtures("one_thread_unless_slow")

FACTS = [
    Fact("The mother tongue of {} is", "Danielle Darrieux", "English", target_true="French"),
    Fact("{} is located in the city of", "The Eiffel Tower", "Rome", target_true="Paris"),
    Fact("{}'s headquarters are in", "Toyota", "the United Kingdom", target_true="Japan"),
]
TEMPLATES = ["{}", "Because of the rain. {}", "I think {{so}}. {}"]


def _published_reference(model, tok, spec, layer, facts, templates, config: ValueConfig):
    """The published optimiser as it was before ``ValueConfig.optimizer`` existed: a frozen copy of
    the Adam loop of ``values._optimise`` (progress bar and interrupt points left out: they do not
    touch the numbers), on the fast forward path. Returns (target, loss_history, nll_history,
    steps_run, final_loss, final_nll)."""
    facts = checked_facts(facts, tok, purpose="compute values for")
    rows = values._build_rows(tok, facts, templates, config, bos=needs_bos(spec))
    u = len(facts)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    forward = FastForward(model, spec, layer, rows, pad_id(tok))
    h_z = forward.h_z
    device = h_z.device
    h0 = h_z[rows.plain_row.to(device), rows.subject[rows.plain_row].to(device)].float()
    h0_norm = h0.norm(dim=1)
    max_norm = config.clamp_norm_factor * h0_norm
    labels = rows.tok_label.to(device)
    tok_row, tok_pos = rows.tok_row.to(device), rows.tok_pos.to(device)
    kl_row, kl_pos = rows.kl_row.to(device), rows.kl_pos.to(device)
    row_fact = rows.fact.to(device)
    tok_fact = row_fact[tok_row]
    n_template_rows = u * rows.n_templates
    tokens_per_row = torch.bincount(tok_row, minlength=n_template_rows).clamp_min(1).float()
    delta = torch.zeros_like(h0, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=config.lr)
    active = torch.ones(u, dtype=torch.bool, device=device)
    last_loss = torch.zeros(u, device=device)
    last_nll = torch.zeros(u, device=device)
    kl_init = None
    loss_history, nll_history, steps_run = [], [], 0
    final_loss = final_nll = None
    with torch.enable_grad():
        for it in range(config.steps):
            opt.zero_grad(set_to_none=True)
            keep = active[tok_fact]
            facts_on = active.nonzero()[:, 0]
            n_tok = int(keep.sum())
            sel_row = torch.cat([tok_row[keep], kl_row[facts_on]])
            sel_pos = torch.cat([tok_pos[keep], kl_pos[facts_on]])
            logp = forward(delta[row_fact], sel_row, sel_pos)
            tok_logp = logp[:n_tok].gather(1, labels[keep][:, None])[:, 0]
            row_nll = torch.zeros(n_template_rows, device=device).index_add(0, tok_row[keep], -tok_logp)
            nll = (row_nll / tokens_per_row).view(u, rows.n_templates).mean(dim=1)[facts_on]
            kl_logp = logp[n_tok:]
            if kl_init is None:
                kl_init = kl_logp.detach()
            kl = (kl_logp.exp() * (kl_logp - kl_init[facts_on])).sum(dim=1)
            decay = config.weight_decay * delta[facts_on].norm(dim=1) / h0_norm[facts_on].pow(2)
            loss = nll + config.kl_factor * kl + decay
            last_loss[facts_on], last_nll[facts_on] = loss.detach(), nll.detach()
            loss_history.append(float(last_loss.mean()))
            nll_history.append(float(last_nll.mean()))
            final_loss, final_nll = last_loss.clone(), last_nll.clone()
            still = ~(loss.detach() < config.early_stop_loss)
            active[facts_on] = still
            if not bool(active.any()) or it == config.steps - 1:
                break
            loss[still].sum().backward()
            before = delta.detach().clone()
            opt.step()
            with torch.no_grad():
                delta[~active] = before[~active]
                norms = delta.norm(dim=1)
                scale = torch.where(norms > max_norm, max_norm / norms.clamp_min(1e-30), torch.ones_like(norms))
                delta.mul_(scale[:, None])
            steps_run += 1
    return (h0 + delta.detach()).float(), loss_history, nll_history, steps_run, final_loss, final_nll


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("early_stop_loss", [0.0, 3.0])  # 3.0: some facts stop early (per-fact freezing)
def test_published_adam_is_unchanged_bit_for_bit(tiny, family, early_stop_loss):
    model, tok = tiny(family, init_std=0.3)
    spec = detect_spec(model)
    config = ValueConfig(lr=0.5, steps=12, early_stop_loss=early_stop_loss)
    assert config.optimizer == "adam"  # the published optimiser stays the default
    got = compute_values(model, tok, spec, 1, FACTS, TEMPLATES, config, progress=False)
    explicit = compute_values(model, tok, spec, 1, FACTS, TEMPLATES, dataclasses.replace(config, optimizer="adam"),
                              progress=False)
    target, loss_history, nll_history, steps_run, final_loss, final_nll = _published_reference(
        model, tok, spec, 1, FACTS, TEMPLATES, config)
    assert got.path == "fast" and got.optimizer == "adam"
    assert got.delta.norm() > 0
    assert torch.equal(got.target, target) and torch.equal(explicit.target, target)
    assert got.loss_history == loss_history and got.nll_history == nll_history
    assert got.steps_run == steps_run
    assert torch.equal(got.final_loss, final_loss) and torch.equal(got.final_nll, final_nll)
    # the per-fact evaluation counts agree with the histories: every fact ran at the first
    # evaluation, and with no early stop every fact ran at every one
    assert got.fact_steps is not None and int(got.fact_steps.max()) == len(loss_history)
    if early_stop_loss == 0.0:
        assert got.fact_steps.tolist() == [len(loss_history)] * len(FACTS)


def _lbfgs(**kw):
    kw.setdefault("optimizer", "lbfgs")
    return ValueConfig(**kw)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_lbfgs_reaches_adams_nll_within_its_budget(tiny, family):
    model, tok = tiny(family, init_std=0.3)
    spec = detect_spec(model)
    common = dict(steps=15, early_stop_loss=0.0, weight_decay=0.0, kl_factor=0.0, clamp_norm_factor=4.0)
    adam = compute_values(model, tok, spec, 1, FACTS, TEMPLATES, ValueConfig(lr=0.5, **common), progress=False)
    lbfgs = compute_values(model, tok, spec, 1, FACTS, TEMPLATES, _lbfgs(stop_nll=0.0, **common), progress=False)
    assert lbfgs.optimizer == "lbfgs" and lbfgs.path == "fast"
    assert lbfgs.final_nll is not None and adam.final_nll is not None
    assert float(lbfgs.final_nll.mean()) < float(adam.nll_history[0]) - 0.3  # it moved
    assert torch.all(lbfgs.final_nll <= adam.final_nll + 1e-3), (lbfgs.final_nll, adam.final_nll)
    assert lbfgs.fact_steps is not None and int(lbfgs.fact_steps.max()) <= 15
    # its histories are of the accepted points: the loss never rises
    assert all(b <= a + 1e-6 for a, b in zip(lbfgs.loss_history, lbfgs.loss_history[1:], strict=False))
    # the clamp holds
    assert torch.all(lbfgs.delta.norm(dim=1) <= 4.0 * lbfgs.initial.norm(dim=1) * (1 + 1e-5))


def test_lbfgs_fast_and_naive_paths_agree(tiny):
    model, tok = tiny("llama", init_std=0.3)
    spec = detect_spec(model)
    cfg = _lbfgs(steps=6, early_stop_loss=0.0, stop_nll=0.0)
    fast = compute_values(model, tok, spec, 1, FACTS, TEMPLATES, cfg, progress=False)
    naive = compute_values(model, tok, spec, 1, FACTS, TEMPLATES, cfg, naive=True, progress=False)
    assert (fast.path, naive.path) == ("fast", "naive")
    assert fast.delta.norm() > 0
    torch.testing.assert_close(fast.target, naive.target, rtol=1e-3, atol=1e-3 * float(naive.initial.norm()))
    assert fast.nll_history == pytest.approx(naive.nll_history, rel=1e-3, abs=1e-4)


class _RecordingForward:
    """Wraps a forward to record which rows every evaluation ran."""

    calls: list[set[int]] = []

    def __init__(self, inner):
        self.inner = inner
        self.h_z = inner.h_z

    def __call__(self, delta_rows, sel_row, sel_pos):
        _RecordingForward.calls.append(set(sel_row.tolist()))
        return self.inner(delta_rows, sel_row, sel_pos)


def test_lbfgs_converged_facts_stop_and_leave_the_forward(tiny, monkeypatch):
    model, tok = tiny("llama", init_std=0.3)
    spec = detect_spec(model)
    first = compute_values(model, tok, spec, 1, FACTS, TEMPLATES, _lbfgs(steps=1), progress=False)
    assert first.final_nll is not None
    nll0 = first.final_nll
    easy = int(nll0.argmin())
    threshold = float(nll0.sort().values[:2].mean())  # between the easiest fact and the next: it is done at once
    monkeypatch.setattr(values, "FastForward", lambda *a, **k: _RecordingForward(FastForward(*a, **k)))
    _RecordingForward.calls = []
    res = compute_values(model, tok, spec, 1, FACTS, TEMPLATES,
                         _lbfgs(steps=8, stop_nll=threshold, early_stop_loss=0.0), progress=False)
    assert res.fact_steps is not None
    assert res.fact_steps[easy] == 1 and int(res.fact_steps.max()) > 1
    assert torch.equal(res.target[easy], res.initial[easy])  # stopped at delta = 0: never moved
    rows = values._build_rows(tok, checked_facts(FACTS, tok, purpose="x"), TEMPLATES, _lbfgs(),
                              bos=needs_bos(spec))
    easy_rows = set((rows.fact == easy).nonzero()[:, 0].tolist())
    assert easy_rows <= _RecordingForward.calls[0]
    assert all(not (easy_rows & c) for c in _RecordingForward.calls[1:])  # its rows no longer run
    assert len(_RecordingForward.calls) == int(res.fact_steps.max())
    # every fact stops at once when the threshold is above every NLL
    done = compute_values(model, tok, spec, 1, FACTS, TEMPLATES, _lbfgs(steps=8, stop_nll=1e9), progress=False)
    assert done.steps_run == 0 and done.fact_steps is not None and done.fact_steps.tolist() == [1, 1, 1]


@pytest.mark.parametrize("optimizer", ["adam", "lbfgs"])
def test_interrupts_are_polled_at_every_evaluation(tiny, monkeypatch, optimizer):
    model, tok = tiny("llama", init_std=0.3)
    spec = detect_spec(model)
    polls = []
    monkeypatch.setattr(values, "poll_interrupts", lambda: polls.append(1))
    res = compute_values(model, tok, spec, 1, FACTS, TEMPLATES,
                         ValueConfig(optimizer=optimizer, steps=7, early_stop_loss=0.0, stop_nll=0.0), progress=False)
    assert len(polls) == len(res.loss_history) == 7

    class Stop(Exception):
        pass

    def stop_at_third():
        polls.append(1)
        if len(polls) == 3:
            raise Stop

    polls.clear()
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    model.train()
    monkeypatch.setattr(values, "poll_interrupts", stop_at_third)
    with pytest.raises(Stop):
        compute_values(model, tok, spec, 1, FACTS, TEMPLATES,
                       ValueConfig(optimizer=optimizer, steps=7, early_stop_loss=0.0, stop_nll=0.0), progress=False)
    assert len(polls) == 3
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads and model.training


@pytest.mark.parametrize("changes", [
    {"optimizer": "sgd"}, {"optimizer": "LBFGS"}, {"optimizer": None},
    {"stop_nll": -0.1}, {"stop_nll": float("nan")}, {"stop_nll": float("inf")}, {"stop_nll": True},
    {"lbfgs_history": 0}, {"lbfgs_history": 101}, {"lbfgs_history": 2.0}, {"lbfgs_history": True},
    {"lbfgs_first_step": 0.0}, {"lbfgs_first_step": 11.0}, {"lbfgs_first_step": "0.2"},
    {"lbfgs_max_step": 0.0}, {"lbfgs_max_step": float("nan")},
])
def test_new_settings_are_validated(tiny, changes):
    with pytest.raises(HyperparameterError, match=next(iter(changes))):
        ValueConfig(**changes).validate()
    model, tok = tiny("llama")
    with pytest.raises(HyperparameterError):
        compute_values(model, tok, detect_spec(model), 1, FACTS, TEMPLATES, ValueConfig(**changes), progress=False)


def test_new_settings_accept_their_ranges():
    for cfg in [ValueConfig(optimizer="lbfgs"), ValueConfig(stop_nll=0.0), ValueConfig(lbfgs_history=1),
                ValueConfig(lbfgs_history=100), ValueConfig(lbfgs_first_step=10.0), ValueConfig(lbfgs_max_step=1e-3)]:
        cfg.validate()


@pytest.mark.parametrize("optimizer", ["adam", "lbfgs"])
@pytest.mark.parametrize("max_batch", [1, 2])
def test_sub_batches_give_the_values_of_one_batch(tiny, optimizer, max_batch):
    """``max_batch`` splits the facts into sub-batches optimised one after the other: each fact's
    problem is its own, so every per-fact result is that of the whole batch (float summation order
    aside), and the histories are the fact-weighted means."""
    model, tok = tiny("llama", init_std=0.3)
    spec = detect_spec(model)
    config = ValueConfig(optimizer=optimizer, lr=0.5, steps=9, early_stop_loss=0.0, stop_nll=0.0)
    whole = compute_values(model, tok, spec, 1, FACTS, TEMPLATES, config, progress=False)
    parts = compute_values(model, tok, spec, 1, FACTS, TEMPLATES, dataclasses.replace(config, max_batch=max_batch),
                           progress=False)
    assert parts.target.shape == whole.target.shape and whole.delta.norm() > 0
    torch.testing.assert_close(parts.target, whole.target, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(parts.initial, whole.initial, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(parts.final_nll, whole.final_nll, rtol=1e-4, atol=1e-4)
    assert parts.fact_steps.tolist() == whole.fact_steps.tolist()
    assert len(parts.loss_history) == len(whole.loss_history)
    assert parts.loss_history[-1] == pytest.approx(whole.loss_history[-1], rel=1e-4, abs=1e-5)


def test_sub_batches_bound_the_rows_run_together(tiny, monkeypatch):
    model, tok = tiny("llama")
    seen = []
    real = values.FastForward

    def recording(model, spec, layer, rows, pad, **kwargs):
        seen.append(len(rows.kl_row))  # facts in this forward
        return real(model, spec, layer, rows, pad, **kwargs)

    monkeypatch.setattr(values, "FastForward", recording)
    compute_values(model, tok, detect_spec(model), 1, FACTS, TEMPLATES, ValueConfig(steps=2, max_batch=2),
                   progress=False)
    assert seen == [2, 1]


@pytest.mark.parametrize("bad", [0, -1, 2.0, True, "8"])
def test_max_batch_is_validated(bad):
    with pytest.raises(HyperparameterError, match="max_batch"):
        ValueConfig(max_batch=bad).validate()


@pytest.mark.parametrize("optimizer", ["adam", "lbfgs"])
def test_bfloat16_evaluations_stay_close_to_float32(tiny, optimizer, monkeypatch):
    """``compute_dtype="bfloat16"``: the first evaluation is the model's own (checked against the full
    pass: still the fast path), the later ones run the upper layers under bfloat16 autocast; the
    values stay near the float32 ones and every later layer call sees bfloat16 activations."""
    model, tok = tiny("llama", init_std=0.3)
    spec = detect_spec(model)
    config = ValueConfig(optimizer=optimizer, lr=0.5, steps=8, early_stop_loss=0.0, stop_nll=0.0)
    ref = compute_values(model, tok, spec, 1, FACTS, TEMPLATES, config, progress=False)
    seen = []
    mlp = model.model.layers[2].mlp
    handle = mlp.register_forward_hook(lambda m, a, out: seen.append(out.dtype))
    try:
        low_config = dataclasses.replace(config, compute_dtype="bfloat16")
        low = compute_values(model, tok, spec, 1, FACTS, TEMPLATES, low_config, progress=False)
    finally:
        handle.remove()
    assert low.path == "fast"
    assert seen[0] == torch.float32 and torch.bfloat16 in seen  # prefix pass in float32, later ones bfloat16
    assert low.target.dtype == torch.float32
    rel = (low.delta - ref.delta).norm() / ref.delta.norm()
    assert float(rel) < 0.15, float(rel)
    assert abs(float(low.final_nll.mean()) - float(ref.final_nll.mean())) < 0.05 + 0.1 * float(ref.final_nll.mean())


def test_compute_dtype_is_validated():
    with pytest.raises(HyperparameterError, match="compute_dtype"):
        ValueConfig(compute_dtype="float16").validate()
