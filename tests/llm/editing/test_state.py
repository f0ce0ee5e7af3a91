"""Saving and loading the lifelong edit state (atomic, crash-safe, fingerprint-checked) and edit packs."""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch

from rlsedit_llm.adapters.tiny import tiny_model
from rlsedit_llm.editing import folder_swap
from rlsedit_llm.editing import packs as packs_mod
from rlsedit_llm.editing import state as state_mod
from rlsedit_llm.editing.editor import Editor
from rlsedit_llm.editing.lifelong import edit, editor_of, load_model_state, save_model_state
from rlsedit_llm.editing.packs import apply_edit_pack
from rlsedit_llm.errors import OwnershipError, RLSEditError, StateMismatchError
from rlsedit_llm.pipeline.facts import Fact
from rlsedit_llm.pipeline.stats import model_fingerprint
from tests.helpers import STREAM
from tests.helpers import small_config as _config

FACTS = STREAM[:3]


def _params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_params(model, reference: dict[str, torch.Tensor]):
    current = model.state_dict()
    assert current.keys() == reference.keys()
    for name, value in reference.items():
        assert torch.equal(current[name], value), name


def _assert_same_state(a: Editor, b: Editor, *, exact: bool = True, same_created: bool = True):
    assert a.layers_ == b.layers_ and a.next_id_ == b.next_id_ and a.templates_ == b.templates_
    assert a.config == b.config and a.value_config_ == b.value_config_
    assert a.base_fingerprint_ == b.base_fingerprint_
    for layer in a.layers_:
        sa, sb = a.solvers_[layer], b.solvers_[layer]
        assert (sa.n_updates_, sa.n_rows_, sa.alpha, sa.beta, sa.dtype) == \
            (sb.n_updates_, sb.n_rows_, sb.alpha, sb.beta, sb.dtype)
        for name in ("W0_", "W_", "C_", "gram0_"):
            x, y = getattr(sa, name), getattr(sb, name)
            if exact:
                assert torch.equal(x, y), (layer, name)
            else:
                torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12 * float(x.abs().max()))
    assert [r.edit_id for r in a.journal_] == [r.edit_id for r in b.journal_]
    for ra, rb in zip(a.journal_, b.journal_, strict=True):
        assert ra.facts == rb.facts
        assert ra.created == rb.created or not same_created  # an edit made after the save has its own time
        for layer in ra.keys:
            assert torch.equal(ra.keys[layer], rb.keys[layer]) and torch.equal(ra.values[layer], rb.values[layer])


def _edited(stats_dir, n_edits=2, family="llama", **kw):
    model, tok = tiny_model(family)
    editor = Editor(model, tok, _config(stats_dir, **kw))
    for facts in FACTS[:n_edits]:
        editor.edit(facts)
    return editor


def test_save_load_restores_weights_and_continues_the_same_recursion(stats_dir, tmp_path):
    editor = _edited(stats_dir)
    editor.save(tmp_path / "state")
    manifest = json.loads((tmp_path / "state" / "editor.json").read_text())
    assert manifest["next_id"] == 2 and [e["edit_id"] for e in manifest["journal"]] == [0, 1]
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == ["editor.json", "journal.safetensors",
                                                                      "solvers.safetensors"]
    fresh, tok = tiny_model("llama")
    assert manifest["base_fingerprint"] == model_fingerprint(fresh)

    loaded = Editor.load(fresh, tok, tmp_path / "state")
    _assert_same_params(fresh, _params(editor.model))  # every parameter, bitwise
    _assert_same_state(editor, loaded)

    # A third edit on both: the same recursion, as if the editor had never been saved.
    editor.edit(FACTS[2])
    loaded.edit(FACTS[2])
    _assert_same_params(fresh, _params(editor.model))
    _assert_same_state(editor, loaded, exact=True, same_created=False)  # bitwise


def test_load_onto_the_already_edited_model_writes_nothing(stats_dir, tmp_path):
    editor = _edited(stats_dir)
    editor.save(tmp_path / "s")
    before = _params(editor.model)
    with pytest.raises(OwnershipError, match="take_over=True"):  # the saving editor still owns the model
        Editor.load(editor.model, editor.tokenizer, tmp_path / "s")
    again = Editor.load(editor.model, editor.tokenizer, tmp_path / "s", take_over=True)
    _assert_same_params(editor.model, before)
    _assert_same_state(editor, again)
    assert again.owns_model and not editor.owns_model


def test_load_refuses_a_model_the_state_was_not_saved_for(stats_dir, tmp_path):
    editor = _edited(stats_dir)
    editor.save(tmp_path / "s")
    other, tok = tiny_model("llama", seed=1)  # same architecture, other weights
    before = _params(other)
    with pytest.raises(StateMismatchError, match="match neither the base model"):
        Editor.load(other, tok, tmp_path / "s")
    _assert_same_params(other, before)

    gpt2, gtok = tiny_model("gpt2")  # another architecture
    with pytest.raises(StateMismatchError, match="llama"):
        Editor.load(gpt2, gtok, tmp_path / "s")

    base, tok = tiny_model("llama")  # the base model with one weight nudged
    with torch.no_grad():
        base.model.embed_tokens.weight[3, 3] += 1e-3
    with pytest.raises(StateMismatchError):
        Editor.load(base, tok, tmp_path / "s")

    with pytest.raises(StateMismatchError, match="does not exist"):
        Editor.load(other, tok, tmp_path / "nothing-here")


def test_save_refuses_weights_changed_outside_the_editor(stats_dir, tmp_path):
    editor = _edited(stats_dir, n_edits=1)
    editor.save(tmp_path / "s")
    saved = (tmp_path / "s" / "editor.json").read_bytes()
    module = editor._module(editor.layers_[0])
    with torch.no_grad():
        module.weight[0, 0] += 1.0
    with pytest.raises(StateMismatchError, match="changed outside the editor"):
        editor.save(tmp_path / "s")
    assert (tmp_path / "s" / "editor.json").read_bytes() == saved


def test_damaged_save_is_refused(stats_dir, tmp_path):
    editor = _edited(stats_dir, n_edits=1)
    editor.save(tmp_path / "s")
    path = tmp_path / "s" / "solvers.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    fresh, tok = tiny_model("llama")
    before = _params(fresh)
    with pytest.raises(StateMismatchError, match="solvers.safetensors is missing or damaged"):
        Editor.load(fresh, tok, tmp_path / "s")
    _assert_same_params(fresh, before)


def test_unprepared_editor_round_trip(stats_dir, tmp_path):
    model, tok = tiny_model("llama")
    editor = Editor(model, tok, _config(stats_dir))
    editor.save(tmp_path / "s")
    fresh, _ = tiny_model("llama")
    loaded = Editor.load(fresh, tok, tmp_path / "s")
    assert loaded.solvers_ == {} and loaded.journal_ == [] and loaded.templates_ is None
    editor.edit(FACTS[0])
    loaded.edit(FACTS[0])
    _assert_same_params(fresh, _params(model))


def test_retractions_survive_save_and_load(stats_dir, tmp_path):
    editor = _edited(stats_dir, n_edits=2)
    # Replaces one of the two facts of edit 1: that record keeps one row.
    editor.edit([Fact("{} is located in", "Toyota", "Japan", relation_id="P17")])
    assert [len(r.facts) for r in editor.journal_] == [1, 1, 1]
    editor.save(tmp_path / "s")
    fresh, tok = tiny_model("llama")
    loaded = Editor.load(fresh, tok, tmp_path / "s")
    _assert_same_state(editor, loaded)
    editor.undo(1)
    loaded.undo(1)
    _assert_same_params(fresh, _params(editor.model))
    _assert_same_state(editor, loaded)


def test_model_state_of_rlsedit_edit(stats_dir, tmp_path):
    model, tok = tiny_model("llama")
    with pytest.raises(RLSEditError, match="no edit state"):
        save_model_state(model, tmp_path / "s")
    config = _config(stats_dir)
    edit(model, FACTS[0], tokenizer=tok, config=config)
    save_model_state(model, tmp_path / "s")

    fresh, _ = tiny_model("llama")
    editor = load_model_state(fresh, tok, tmp_path / "s")
    assert editor_of(fresh) is editor and editor.model is fresh
    edit(model, FACTS[1])  # both continue the same stream
    edit(fresh, FACTS[1])
    _assert_same_params(fresh, _params(model))
    _assert_same_state(editor_of(model), editor_of(fresh), exact=True, same_created=False)


@pytest.mark.parametrize("method,setting,saved,forged", [("alphaedit", "threshold", 0.02, 0.05),
                                                         ("encore", "norm_weight", 10.0, 20.0)])
def test_a_method_setting_is_saved_and_checked_against_the_solvers(stats_dir, tmp_path, method, setting, saved,
                                                                     forged):
    """A method's own setting (AlphaEdit's threshold, ENCORE's norm weight) is saved with the
    config and each solver; a save whose config and solvers disagree on it is refused."""
    from rlsedit_llm.editing.methods import make_editor

    model, tok = tiny_model("llama")
    editor = make_editor(method, model, tok, _config(stats_dir, alpha=0.1), **{setting: saved})
    editor.edit(FACTS[0])
    editor.save(tmp_path / "s")
    loaded = Editor.load(tiny_model("llama")[0], tok, tmp_path / "s")
    assert getattr(loaded.config.method_config, setting) == saved
    assert all(getattr(s, setting) == saved for s in loaded.solvers_.values())
    manifest = json.loads((tmp_path / "s" / "editor.json").read_text())
    manifest["config"]["method_config"][setting] = forged  # the solvers still say `saved`
    manifest["digest"] = state_mod.manifest_digest(manifest)
    (tmp_path / "s" / "editor.json").write_text(json.dumps(manifest))
    fresh = tiny_model("llama")[0]
    with pytest.raises(StateMismatchError, match=f"solver {setting} = {saved!r}, the method config's {setting}"):
        Editor.load(fresh, tok, tmp_path / "s")


# ---------------------------------------------------------------------------------------------
# Edit packs
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "gpt2"])  # nn.Linear and Conv1D orientation
def test_edit_pack_turns_a_fresh_base_model_into_the_edited_one(stats_dir, tmp_path, family):
    editor = _edited(stats_dir, family=family)
    path = tmp_path / "edits.safetensors"
    editor.save_edit_pack(path)
    editor.save(tmp_path / "state")
    assert path.stat().st_size < (tmp_path / "state" / "solvers.safetensors").stat().st_size / 2

    fresh, tok = tiny_model(family)
    meta = apply_edit_pack(fresh, path)
    _assert_same_params(fresh, _params(editor.model))
    assert meta["layers"] == list(editor.layers_) and meta["edit_ids"] == [0, 1]
    assert [f["subject"] for f in meta["facts"]] == ["Danielle Darrieux", "Toyota", "Italy"]

    with pytest.raises(StateMismatchError, match="already applied"):
        apply_edit_pack(fresh, path)
    other, _ = tiny_model(family, seed=1)
    before = _params(other)
    with pytest.raises(StateMismatchError, match="not the base model"):
        apply_edit_pack(other, path)
    _assert_same_params(other, before)


def test_reduced_precision_edit_pack(stats_dir, tmp_path):
    editor = _edited(stats_dir)
    editor.save_edit_pack(tmp_path / "p32.safetensors", dtype=torch.float32)
    fresh, _ = tiny_model("llama")
    apply_edit_pack(fresh, tmp_path / "p32.safetensors")
    for layer in editor.layers_:
        got = editor._module(layer).weight
        want = fresh.get_submodule(editor.spec_.edit_module_path.format(layer)).weight
        torch.testing.assert_close(want, got, rtol=0, atol=1e-6)


def test_edit_pack_application_is_all_or_nothing(stats_dir, tmp_path, monkeypatch):
    editor = _edited(stats_dir, n_edits=1)
    editor.save_edit_pack(tmp_path / "p.safetensors")
    fresh, _ = tiny_model("llama")
    before = _params(fresh)
    calls = {"n": 0}
    real = packs_mod.write_weight

    def failing(module, W):
        calls["n"] += 1
        if calls["n"] == 2:
            raise MemoryError("simulated")
        real(module, W)

    monkeypatch.setattr(packs_mod, "write_weight", failing)
    with pytest.raises(MemoryError):
        apply_edit_pack(fresh, tmp_path / "p.safetensors")
    _assert_same_params(fresh, before)


# ---------------------------------------------------------------------------------------------
# Crash safety: a saving process killed at any moment leaves a complete save behind
# ---------------------------------------------------------------------------------------------
def _save_loop(editors, directory, conn, use_exchange, slow, seed):
    """Child process: save the editors in turn, forever, with slowed-down writes."""
    torch.set_num_threads(1)  # a forked child must not reuse the parent's OpenMP pool
    rng = random.Random(seed)
    real_save_file = state_mod.save_file

    def slow_save_file(tensors, path, metadata=None):
        time.sleep(rng.uniform(0, slow))
        real_save_file(tensors, path, metadata=metadata)
        time.sleep(rng.uniform(0, slow))

    state_mod.save_file = slow_save_file
    if not use_exchange:
        folder_swap._exchange = lambda a, b: False
    conn.send("started")
    i = 0
    while True:
        editors[i % len(editors)].save(directory)
        i += 1


def _stop_in_the_rename_window(editor, directory, conn):
    """Child process: save by two renames and stop right after the first (old save moved away)."""
    torch.set_num_threads(1)
    real_rename = os.rename

    def rename(a, b):
        real_rename(a, b)
        if ".old-" in str(b):
            conn.send("window")
            time.sleep(600)

    folder_swap._exchange = lambda a, b: False
    os.rename = rename
    editor.save(directory)


def _fork_context():
    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("needs the fork start method")
    return multiprocessing.get_context("fork")


def _check_complete_save(directory, candidates: dict[tuple, Editor]):
    """The save at ``directory`` loads onto a fresh base model and is exactly one of ``candidates``."""
    fresh, tok = tiny_model("llama")
    loaded = Editor.load(fresh, tok, directory)
    ids = tuple(r.edit_id for r in loaded.journal_)
    assert ids in candidates, ids
    _assert_same_params(fresh, _params(candidates[ids].model))
    _assert_same_state(candidates[ids], loaded)


def _two_states(stats_dir, tmp_path):
    """Editor ``a`` (two edits) saved in ``tmp_path/state``, and ``b``: that save loaded with edit 0
    undone; the two states a killed save must leave one of."""
    a = _edited(stats_dir, n_edits=2)
    directory = tmp_path / "state"
    a.save(directory)
    b = Editor.load(tiny_model("llama")[0], a.tokenizer, directory)
    b.undo(0)
    return a, b, directory


@pytest.mark.parametrize("use_exchange", [True, False], ids=["renameat2-exchange", "two-renames"])
def test_killing_a_saving_process_leaves_the_previous_or_the_new_save(stats_dir, tmp_path, use_exchange):
    ctx = _fork_context()
    a, b, directory = _two_states(stats_dir, tmp_path)
    candidates = {(0, 1): a, (1,): b}

    rng = random.Random(1234)
    interrupted = 0
    for round_ in range(5):
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_save_loop, args=([a, b], directory, child, use_exchange, 0.08, round_))
        proc.start()
        assert parent.poll(60) and parent.recv() == "started"
        time.sleep(rng.uniform(0.05, 0.6))
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(30)
        assert proc.exitcode == -signal.SIGKILL
        leftovers = [p for p in tmp_path.iterdir() if p.name != "state"]
        interrupted += bool(leftovers)
        _check_complete_save(directory, candidates)
    assert interrupted >= 1  # at least one kill landed in the middle of a save

    a.save(directory)  # a later save clears what the killed ones left behind
    assert [p.name for p in tmp_path.iterdir()] == ["state"]
    _check_complete_save(directory, candidates)


def test_kill_between_the_two_renames_recovers_the_previous_save(stats_dir, tmp_path):
    ctx = _fork_context()
    a, b, directory = _two_states(stats_dir, tmp_path)

    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_stop_in_the_rename_window, args=(b, directory, child))
    proc.start()
    assert parent.poll(60) and parent.recv() == "window"
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(30)
    assert not directory.exists()  # the moment the old save is moved away and the new one not yet in
    assert any(".old-" in p.name for p in tmp_path.iterdir())
    assert any(".tmp-" in p.name for p in tmp_path.iterdir())

    _check_complete_save(directory, {(0, 1): a})  # recovered: the previous complete save
    assert directory.is_dir()


def test_interrupted_first_save_leaves_nothing_loadable(stats_dir, tmp_path, monkeypatch):
    editor = _edited(stats_dir, n_edits=1)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(folder_swap, "swap_in", crash)
    with pytest.raises(KeyboardInterrupt):
        editor.save(tmp_path / "s")
    assert list(tmp_path.iterdir()) == []  # the temporary folder was removed
    with pytest.raises(StateMismatchError):
        Editor.load(*tiny_model("llama"), tmp_path / "s")


# ---------------------------------------------------------------------------------------------
# Certificates
# ---------------------------------------------------------------------------------------------
def _problem_and_edits(editor, layer):
    import numpy as np  # noqa: F401

    from rlsedit_theory import Problem

    s = editor.solvers_[layer]
    problem = Problem(s.W0_.numpy(), s.alpha, s.beta, gram0=s.gram0_.numpy())
    edits = [(r.keys[layer].numpy(), r.values[layer].numpy()) for r in editor.journal_]
    return problem, edits


def test_certificate_agrees_with_the_theory_module(stats_dir):
    from rlsedit_llm.kernel.rls import LayerRLS
    from rlsedit_theory.bounds import deviation_certificate, step_certificate

    editor = _edited(stats_dir, n_edits=3, alpha=0.5)
    cert = editor.certificate()
    assert [c.layer for c in cert.layers] == list(editor.layers_) and cert.n_edits == 3
    assert cert.holds() and cert.gradient < 1e-12 and cert.drift < 1e-10
    for c in cert.layers:
        assert c.weights_match and c.gradient_model < 1e-5 and c.n_rows == 4 and c.last_edit_id == 2
        assert c.energy.relative_error < 1e-10
        problem, edits = _problem_and_edits(editor, c.layer)
        W = editor.solvers_[c.layer].W_.numpy()
        ref = deviation_certificate(problem, edits, W)
        for mine, theirs in ((c.metric, ref["metric"]), (c.anchor, ref["anchor_drift"])):
            assert mine.lhs == pytest.approx(theirs.lhs, rel=1e-9) and mine.rhs == pytest.approx(theirs.rhs, rel=1e-9)
        # T3(a) in its alpha form is looser than the lambda_min(A) form of the theory module.
        assert c.deviation.lhs == pytest.approx(ref["from_preservation_state"].lhs, rel=1e-9)
        assert c.deviation.rhs >= ref["from_preservation_state"].rhs * (1 - 1e-12)
        # The last step, against a replay without the last journal entry.
        s = editor.solvers_[c.layer]
        prev = LayerRLS(s.W0_, s.alpha, s.beta, s.gram0_)
        for K, V in edits[:-1]:
            prev.update(torch.from_numpy(K), torch.from_numpy(V))
        K, V = edits[-1]
        steps = step_certificate(K, V, prev.W_.numpy(), W, prev.C_.numpy())
        for mine, key in ((c.step_metric, "step_metric"), (c.step, "step_crude"), (c.adherence, "adherence")):
            assert mine.lhs == pytest.approx(steps[key].lhs, rel=1e-7)
            assert mine.rhs == pytest.approx(steps[key].rhs, rel=1e-7)
    text = str(cert)
    assert "layer 0" in text and "T3b" in text and "T4c" in text and "optimality" in text


def test_certificate_detects_what_it_certifies(stats_dir):
    editor = _edited(stats_dir, n_edits=2)  # published setting alpha = 0
    cert = editor.certificate()
    assert all(c.deviation is None for c in cert.layers) and "vacuous (alpha = 0)" in str(cert)
    assert cert.gradient < 1e-12 and cert.drift < 1e-10

    layer = editor.layers_[0]
    s = editor.solvers_[layer]
    W, C = s.W_, s.C_
    s.W_ = s.W0_.clone()  # weights that are not the minimiser of J_t
    assert editor.certificate().layers[0].gradient > 1e-4
    s.W_, s.C_ = W, C * 1.01  # a drifted inverse
    assert editor.certificate().drift == pytest.approx(0.01, rel=1e-3)
    s.C_ = C
    with torch.no_grad():  # the model's weights changed behind the editor's back
        editor._module(layer).weight[0, 0] += 0.1
    bad = editor.certificate().layers[0]
    assert not bad.weights_match and bad.gradient_model > 1e-4 and "DIFFER" in str(editor.certificate())


def test_certificate_needs_rlsedit(stats_dir):
    from rlsedit_llm.errors import HyperparameterError

    editor = _edited(stats_dir, n_edits=1, method="memit_seq")
    with pytest.raises(HyperparameterError, match="rlsedit"):
        editor.certificate()


def test_save_never_replaces_a_folder_that_is_not_a_save(stats_dir, tmp_path):
    editor = _edited(stats_dir, n_edits=1)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a saved editor state"):
        editor.save(tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    (tmp_path / "empty").mkdir()
    editor.save(tmp_path / "empty")  # an empty folder is fine
    assert (tmp_path / "empty" / "editor.json").is_file()


# ============================================================================================
# A state saved by rlsedit 0.1.0 (format version 1) still loads
# ============================================================================================
_V1 = Path(__file__).parents[1] / "data"


@pytest.mark.parametrize("method", ["rlsedit", "alphaedit"])
def test_version_1_state_loads_and_continues(method, tmp_path):
    """tests/llm/data/state_v1_<method> was written by the release before the method protocol
    (tiny llama, seed 0, two edits of 2 and 1 facts)."""
    from safetensors.torch import load_file

    saved = _V1 / f"state_v1_{method}"
    assert json.loads((saved / "editor.json").read_text())["version"] == 1
    old_tensors = load_file(saved / "solvers.safetensors")
    model, tok = tiny_model("llama", seed=0)
    editor = Editor.load(model, tok, saved)
    assert editor.config.method == method and [r.edit_id for r in editor.journal_] == [0, 1]
    assert [f.subject for r in editor.journal_ for f in r.facts] == ["Alice", "Bob", "Carol"]
    for layer, solver in editor.solvers_.items():
        assert torch.equal(solver.W_, old_tensors[f"layer{layer}.W_"])
        assert solver.n_rows_ == 3 and solver.n_updates_ == 2
    editor.check_model()
    if method == "rlsedit":
        assert editor.certificate().holds()
        editor.undo(0)
        assert [r.edit_id for r in editor.journal_] == [1]
    editor.save(tmp_path / "v2")
    assert json.loads((tmp_path / "v2" / "editor.json").read_text())["version"] == state_mod.VERSION
    again = Editor.load(tiny_model("llama", seed=0)[0], tok, tmp_path / "v2")
    for layer, solver in again.solvers_.items():
        assert torch.equal(solver.W_, editor.solvers_[layer].W_)
        assert again.solvers_[layer].state_dict()["scalars"] == solver.state_dict()["scalars"] or method == "alphaedit"
