"""Norm anchors (NAS, Liu et al., arXiv 2602.02543) as the released code does them: the MLP value
``v* = z* - h0 + v0`` at the last edited layer rescaled to the reference norm ``rho`` (the
upper-trimmed mean of ``||v*||`` over CounterFact rewrites solved on the unedited model), a fact
with ``||v*|| > 2 rho`` dropped; for every method that solves values. And rlsedit's earlier h0
rule, kept as ``anchor_value_norms="h0"`` / ``True``."""

from __future__ import annotations

import argparse
import dataclasses
import math
import shutil

import pytest
import torch

from rlsedit_llm import EditConfig, Editor, Fact
from rlsedit_llm.adapters.spec import get_module
from rlsedit_llm.adapters.tiny import tiny_model
from rlsedit_llm.editing import norm_anchors
from rlsedit_llm.editing.methods import make_editor
from rlsedit_llm.editing.norm_anchors import (
    NAS_REFERENCE_FACTS,
    branch_values,
    upper_trimmed_mean,
    value_norm_reference,
)
from rlsedit_llm.errors import HyperparameterError
from rlsedit_llm.pipeline.keys import fact_rows
from rlsedit_llm.pipeline.tokens import needs_bos
from rlsedit_llm.pipeline.values import ValueConfig, anchor_norms, compute_values

pytestmark = pytest.mark.usefixtures("one_thread_unless_slow")

FACTS = [Fact("{} lives in", "Alice", "Paris"), Fact("{} plays the", "Bob", "piano"),
         Fact("The capital of {} is", "Italy", "Madrid")]
N_REF = 8  # a small reference sample: the tests need its maths, not the released 1000 rewrites


def _config(tmp_path, **changes) -> EditConfig:
    settings = dict(cache_dir=str(tmp_path / "stats"), stats_tokens=3000, stats_max_length=128, n_templates=2,
                    template_length=4, value=ValueConfig(lr=0.5, steps=6), replace=False, anchor_value_norms="nas",
                    nas_reference_facts=N_REF)
    settings.update(changes)
    return EditConfig(**settings)


@pytest.fixture
def fresh_caches(tmp_path):
    """No reference norm kept from another test: each test's statistics (and NAS) cache is its own
    ``tmp_path`` (the library keeps no reference in the process)."""
    return tmp_path


def _written(monkeypatch) -> list[torch.Tensor]:
    """The values ``z*`` every edit of this test hands to the per-layer writes."""
    seen: list[torch.Tensor] = []
    real = Editor._write_layers

    def spy(self, facts, weights, z_star, norms, seconds):
        seen.append(z_star.detach().clone())
        return real(self, facts, weights, z_star, norms, seconds)

    monkeypatch.setattr(Editor, "_write_layers", spy)
    return seen


# ----------------------------------------------------------------------------------------------
# the maths


def test_nas_rescaling_equals_the_formula_on_a_hand_example():
    h0 = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    v0 = torch.tensor([[0.5, 0.0], [0.5, 0.0], [0.0, 1.0]], dtype=torch.float64)
    z = torch.tensor([[1.0, 2.0], [1.0, 4.0], [0.0, 1.0]], dtype=torch.float64)
    # v* = z - h0 + v0: (0.5, 2) of norm sqrt(4.25); (0.5, 4) of norm sqrt(16.25) > 2 * 1.5; (0, 0)
    out = anchor_norms(z, h0, branch=v0, reference_norm=1.5)
    s = 1.5 / math.sqrt(4.25)
    expected = torch.tensor([[1.0 - 0.5 + 0.5 * s, 2.0 * s],  # h0 - v0 + rho v*/||v*||
                             [1.0, 0.0],  # ||v*|| > 2 rho: the change is dropped, z = h0
                             [0.0, 1.0]], dtype=torch.float64)  # v* = 0: nothing to rescale, z kept
    assert torch.allclose(out, expected, atol=1e-12)
    assert out[0].sub(h0[0]).add(v0[0]).norm().item() == pytest.approx(1.5, rel=1e-12)
    # the released factor 2 is the default; another is honoured
    assert torch.allclose(anchor_norms(z, h0, branch=v0, reference_norm=1.5, drop_factor=3.0)[1],
                          h0[1] - v0[1] + 1.5 * torch.tensor([0.5, 4.0]).double() / math.sqrt(16.25))
    assert torch.equal(anchor_norms(z, h0, branch=v0, reference_norm=0.0), z)  # no reference: unchanged


def test_the_h0_rule_is_kept_and_the_arguments_are_checked():
    target, ref = torch.randn(4, 8), torch.randn(4, 8)
    anchored = anchor_norms(target, ref)  # rlsedit's earlier rule: z* rescaled to ||h0||
    assert torch.allclose(anchored.norm(dim=1), ref.norm(dim=1))
    assert torch.allclose(anchored / anchored.norm(dim=1, keepdim=True), target / target.norm(dim=1, keepdim=True))
    with pytest.raises(HyperparameterError, match="branch and reference_norm together"):
        anchor_norms(target, ref, branch=ref)
    with pytest.raises(HyperparameterError, match=r"must all be \(u, d\)"):
        anchor_norms(target, ref, branch=ref[:2], reference_norm=1.0)
    with pytest.raises(HyperparameterError, match="finite"):
        anchor_norms(target, ref, branch=ref, reference_norm=float("nan"))


def test_the_reference_is_an_upper_trimmed_mean():
    assert upper_trimmed_mean(torch.arange(1.0, 21.0)) == pytest.approx(10.0)  # drops 20: mean of 1..19
    assert upper_trimmed_mean(torch.arange(1.0, 41.0)) == pytest.approx(19.5)  # drops 39 and 40
    assert upper_trimmed_mean(torch.arange(1.0, 11.0)) == pytest.approx(5.5)  # floor(0.5) = 0 dropped
    assert upper_trimmed_mean(torch.tensor([1.0, 1e6] + [1.0] * 18)) == pytest.approx(1.0)  # the outlier goes
    with pytest.raises(HyperparameterError, match="non-empty"):
        upper_trimmed_mean(torch.tensor([]))


def test_the_options_are_checked_and_saved():
    for value in (False, True, "nas", "h0"):
        EditConfig(anchor_value_norms=value).validate()
    assert [EditConfig(anchor_value_norms=v).value_norm_rule for v in (False, True, "h0", "nas")] == \
        [None, "h0", "h0", "nas"]
    with pytest.raises(HyperparameterError, match="anchor_value_norms must be False, 'nas'"):
        EditConfig(anchor_value_norms="NAS").validate()
    for bad in (0, True, 2.5):
        with pytest.raises(HyperparameterError, match="nas_reference_facts must be an int >= 1"):
            EditConfig(nas_reference_facts=bad).validate()
    config = EditConfig(anchor_value_norms="nas", nas_reference_facts=50)
    assert EditConfig.from_dict(config.to_dict()) == config
    old = {k: v for k, v in EditConfig(anchor_value_norms=True).to_dict().items() if k != "nas_reference_facts"}
    again = EditConfig.from_dict(old)  # a config saved before NAS existed: True, the h0 rule
    assert again.value_norm_rule == "h0" and again.nas_reference_facts == NAS_REFERENCE_FACTS


# ----------------------------------------------------------------------------------------------
# the model side: v0 and rho


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # nn.Linear; Conv1D with a bias
def test_branch_values_are_what_the_mlp_adds_to_the_residual_stream(family):
    model, tok = tiny_model(family)
    from rlsedit_llm.adapters.spec import detect_spec

    spec = detect_spec(model)
    layer = spec.default_layers[-1]
    v0 = branch_values(model, tok, spec, layer, FACTS)
    # The MLP block's output at the subject's last token of the bare prompt, read by a hook.
    mlp = get_module(model, spec.layer_path.format(layer) + (".mlp"))
    rows, positions = fact_rows(tok, FACTS, ["{}"], bos=needs_bos(spec))
    seen = []
    handle = mlp.register_forward_hook(lambda m, i, o: seen.append(o.detach()))
    try:
        for row, pos in zip(rows, positions, strict=True):
            with torch.no_grad():
                model(input_ids=torch.tensor([row]))
            seen[-1] = seen[-1][0, pos]
    finally:
        handle.remove()
    assert torch.allclose(v0, torch.stack(seen).float(), atol=1e-5)


def test_the_reference_norm_is_the_trimmed_mean_of_the_reference_values_and_is_cached(tmp_path, fresh_caches,
                                                                                      monkeypatch):
    model, tok = tiny_model("llama")
    from rlsedit_llm.adapters.spec import detect_spec

    spec = detect_spec(model)
    layer, value = spec.default_layers[-1], ValueConfig(lr=0.5, steps=6)
    rho = value_norm_reference(model, tok, spec, layer, value, n_facts=N_REF, cache_dir=tmp_path)
    # by hand: the sampled rewrites solved on their bare prompts, ||z* - h0 + v0||, trimmed mean
    facts, _ = norm_anchors._reference_facts(tok, N_REF, 0)
    assert len(facts) == N_REF and len({f.subject for f in facts}) == N_REF
    values = compute_values(model, tok, spec, layer, facts, ["{}"], value)
    norms = (values.target - values.initial + branch_values(model, tok, spec, layer, facts)).norm(dim=1)
    assert rho == pytest.approx(upper_trimmed_mean(norms), rel=1e-5)
    assert rho > 0
    # Cached on disk: asked again, it is read, not solved ...
    monkeypatch.setattr("rlsedit_llm.pipeline.values.compute_values",
                        lambda *a, **k: pytest.fail("the cached reference was solved again"))
    assert value_norm_reference(model, tok, spec, layer, value, n_facts=N_REF, cache_dir=tmp_path) == rho
    # ... under a key that names the value settings: other settings are another reference
    with pytest.raises(pytest.fail.Exception, match="solved again"):
        value_norm_reference(model, tok, spec, layer, dataclasses.replace(value, steps=7), n_facts=N_REF,
                             cache_dir=tmp_path)


# ----------------------------------------------------------------------------------------------
# edits


def test_an_edit_with_nas_writes_values_of_the_anchored_norm(tmp_path, fresh_caches, monkeypatch):
    written = _written(monkeypatch)
    model, tok = tiny_model("llama")
    editor = Editor(model, tok, _config(tmp_path))
    report = editor.edit(FACTS)
    (z_written,) = written
    # Everything again, independently, on an identical unedited model.
    twin, _ = tiny_model("llama")
    spec, layer = editor.spec_, editor.layers_[-1]
    values = compute_values(twin, tok, spec, layer, FACTS, editor.templates_, editor.value_config_)
    v0 = branch_values(twin, tok, spec, layer, FACTS)
    rho = value_norm_reference(twin, tok, spec, layer, editor.value_config_, n_facts=N_REF,
                               cache_dir=tmp_path / "elsewhere")
    v_star = values.target - values.initial + v0
    assert not torch.allclose(z_written, values.target, rtol=1e-3)  # NAS changed the values
    for i in range(len(FACTS)):
        if v_star[i].norm() > 2 * rho:
            assert torch.allclose(z_written[i], values.initial[i], atol=1e-6)
        else:
            v_written = z_written[i] - values.initial[i] + v0[i]
            assert v_written.norm().item() == pytest.approx(rho, rel=1e-4)  # the anchored norm
            assert torch.allclose(v_written / v_written.norm(), v_star[i] / v_star[i].norm(), atol=1e-5)
    assert (v_star.norm(dim=1) <= 2 * rho).any()  # at least one fact was rescaled, not dropped
    assert torch.allclose(torch.tensor(report.norms["z"], dtype=torch.float64), z_written.norm(dim=1).double(),
                          rtol=1e-6)
    editor.check_model()  # the reference measurement put the edited layers back


def test_a_fact_whose_value_is_too_large_is_dropped(tmp_path, fresh_caches, monkeypatch):
    """With rho between half the two facts' value norms, NAS writes h0 (no change) for the larger
    one and rescales the other."""
    written = _written(monkeypatch)
    model, tok = tiny_model("llama")
    twin, _ = tiny_model("llama")
    editor = Editor(model, tok, _config(tmp_path))
    editor.prepare()
    spec, layer = editor.spec_, editor.layers_[-1]
    values = compute_values(twin, tok, spec, layer, FACTS[:2], editor.templates_, editor.value_config_)
    v0 = branch_values(twin, tok, spec, layer, FACTS[:2])
    norms = (values.target - values.initial + v0).norm(dim=1)
    small, large = int(norms.argmin()), int(norms.argmax())
    rho = float(norms[small] + norms[large]) / 4  # 2 rho lies between the two norms
    assert norms[small] < 2 * rho < norms[large]
    monkeypatch.setattr(norm_anchors, "editor_reference", lambda ed: rho)
    editor.edit(FACTS[:2])
    (z,) = written
    assert torch.allclose(z[large], values.initial[large], atol=1e-6)  # dropped
    assert (z[small] - values.initial[small] + v0[small]).norm().item() == pytest.approx(rho, rel=1e-4)


def test_the_reference_is_measured_on_the_base_model_after_edits_and_reloads(tmp_path, fresh_caches):
    model, tok = tiny_model("llama")
    editor = Editor(model, tok, _config(tmp_path))
    editor.edit(FACTS[:1])
    rho = norm_anchors.editor_reference(editor)
    editor.save(tmp_path / "s")
    loaded = Editor.load(tiny_model("llama")[0], tok, tmp_path / "s")  # the edited weights, the stream continues
    # measure again: the new editor keeps no reference yet, and none is left on disk
    for folder in (tmp_path / "stats").glob("*/nas"):
        shutil.rmtree(folder)
    assert norm_anchors.editor_reference(loaded) == pytest.approx(rho, rel=1e-6)  # W0, not the edited weights
    assert any((tmp_path / "stats").glob("*/nas/*.safetensors"))  # measured again, and kept
    loaded.check_model()  # and the edited weights are back
    loaded.edit(FACTS[1:2])


@pytest.mark.parametrize("method", ["rlsedit", "memit", "memit_seq", "alphaedit", "encore"])
def test_nas_applies_to_every_method_that_solves_values(method, tmp_path, fresh_caches, monkeypatch):
    written = _written(monkeypatch)
    model, tok = tiny_model("llama")
    editor = make_editor(method, model, tok, _config(tmp_path))
    editor.edit(FACTS[:2])
    twin, _ = tiny_model("llama")
    spec, layer = editor.spec_, editor.layers_[-1]
    h0 = compute_values(twin, tok, spec, layer, FACTS[:2], ["{}"], ValueConfig(steps=1)).initial
    v0 = branch_values(twin, tok, spec, layer, FACTS[:2])
    rho = norm_anchors.editor_reference(editor)
    for z, h, v in zip(written[0], h0, v0, strict=True):
        anchored = (z - h + v).norm().item()
        assert torch.allclose(z, h, atol=1e-6) or anchored == pytest.approx(rho, rel=1e-4)


@pytest.mark.parametrize("method", ["ft", "ultraedit"])
def test_methods_without_values_refuse_nas(method, tmp_path):
    with pytest.raises(HyperparameterError, match="computes no values"):
        make_editor(method, *tiny_model("llama"), _config(tmp_path))


# ----------------------------------------------------------------------------------------------
# the bench


def test_the_bench_runs_the_nas_variants_and_records_them(tmp_path, fresh_caches, monkeypatch):
    from rlsedit_llm import cli
    from rlsedit_llm.evaluation import bench, protocol

    model, tok = tiny_model("llama")
    pristine = {k: v.clone() for k, v in model.state_dict().items()}

    def load_model(name, **kw):
        model.load_state_dict(pristine)
        model.config.__dict__.pop("rlsedit", None)
        return model, tok

    truths = {"Paris": "Rome", "piano": "guitar", "Madrid": "Rome"}
    stream = [dataclasses.replace(FACTS[i % 3], subject=FACTS[i % 3].subject + " II" * (i // 3), case_id=i,
                                  target_true=truths[FACTS[i % 3].target],
                                  paraphrases=(FACTS[i % 3].prompt.replace("{}", "Carol"),))
              for i in range(4)]
    monkeypatch.setattr(bench, "load_model", load_model)
    monkeypatch.setattr(bench, "load_stream", lambda dataset, n, tok=None, **kw: stream[:n])
    real = protocol.make_runner

    built = []  # what each runner was built with: method, anchoring, method settings

    def fast_runner(name, model, tokenizer, *, edit_config=None, **kw):
        cfg = dataclasses.replace(edit_config, n_templates=2, template_length=4, value=ValueConfig(lr=0.5, steps=4))
        built.append((name, cfg.anchor_value_norms, dict(kw["method_settings"].get(name, {}))))
        return real(name, model, tokenizer, edit_config=cfg, **kw)

    monkeypatch.setattr(bench, "make_runner", fast_runner)
    flags = dict(out=str(tmp_path / "out"), model="tiny", edits=4, batch=2, stats_tokens=3000, checkpoints=1, glue=0,
                 fluency_cases=0, no_wild=True, quiet=True, cache_dir=str(tmp_path / "stats"),
                 methods="rlsedit+nas,memit+nas,alphaedit+nas,alphaedit@released")
    args = dataclasses.replace(cli._bench_config(argparse.Namespace(**flags)), nas_reference_facts=N_REF)
    assert args.methods == ("rlsedit+nas", "memit+nas", "alphaedit+nas", "alphaedit@released")
    assert bench.run_bench(args) == 0
    results = bench.read_results(tmp_path / "out")
    records = results["methods"]
    assert set(records) == set(args.methods) and all(r["done"] for r in records.values())
    for name in ("rlsedit+nas", "memit+nas", "alphaedit+nas"):
        assert records[name]["method"] == name.split("+")[0]  # the record's extra, at its top level
        assert records[name]["value_norm_anchor"] == "nas" and records[name]["nas_reference_facts"] == N_REF
    released = records["alphaedit@released"]
    assert released["method"] == "alphaedit" and released["preset"] == "released"
    assert released["settings"] == {"threshold": 2e-2, "ridge": 10.0, "threshold_rule": "absolute"}
    assert "value_norm_anchor" not in released
    assert results["settings"]["nas_reference_facts"] == N_REF  # not the released 1000: recorded with the run
    assert "| rlsedit+nas |" in (tmp_path / "out" / "results.md").read_text()
    released_settings = {"threshold": 2e-2, "ridge": 10.0, "threshold_rule": "absolute"}
    assert built == [("rlsedit", "nas", {}), ("memit", "nas", {}), ("alphaedit", "nas", {}),
                     ("alphaedit", False, released_settings)]
