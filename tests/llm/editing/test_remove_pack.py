"""``remove_edit_pack``: the exact inverse of ``apply_edit_pack`` (base weights back bit for bit,
checked by the base fingerprint), typed errors otherwise, the model untouched on any error."""

from __future__ import annotations

import pytest
import torch

import rlsedit_llm
from rlsedit_llm.adapters.fingerprint import model_fingerprint
from rlsedit_llm.adapters.tiny import tiny_model
from rlsedit_llm.editing import packs as packs_mod
from rlsedit_llm.editing.editor import Editor
from rlsedit_llm.editing.guard import guard_of
from rlsedit_llm.editing.packs import apply_edit_pack, remove_edit_pack
from rlsedit_llm.errors import EditPackError, OwnershipError, StateMismatchError
from tests.helpers import STREAM
from tests.helpers import small_config as _config

pytestmark = pytest.mark.usefixtures("one_thread_unless_slow")


def _params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(model, reference) -> bool:
    return all(torch.equal(v.view(torch.int32), reference[k].view(torch.int32)) for k, v in model.state_dict().items())


@pytest.fixture(scope="module")
def pack(stats_dir, tmp_path_factory):
    """An editor (released: it no longer claims its model) and the pack of its three edits."""
    model, tok = tiny_model("llama")
    editor = Editor(model, tok, _config(stats_dir))
    for facts in STREAM[:3]:
        editor.edit(facts)
    folder = tmp_path_factory.mktemp("packs")
    editor.save_edit_pack(folder / "p.safetensors")
    editor.save_edit_pack(folder / "p32.safetensors", dtype=torch.float32)
    editor.release()
    return editor, folder


def test_remove_is_the_exact_inverse_of_apply(pack):
    editor, folder = pack
    model, _ = tiny_model("llama")
    base = _params(model)
    meta = apply_edit_pack(model, folder / "p.safetensors")
    assert model_fingerprint(model) == meta["edited_fingerprint"]
    assert rlsedit_llm.remove_edit_pack(model, folder / "p.safetensors")["edit_ids"] == [0, 1, 2]
    assert _same(model, base) and model_fingerprint(model) == editor.base_fingerprint_
    assert model.__dict__[packs_mod._APPLIED] == {}  # what the removal needed is dropped with it
    apply_edit_pack(model, folder / "p.safetensors")  # and the pack applies again
    remove_edit_pack(model, folder / "p.safetensors")
    assert _same(model, base)


def test_a_reduced_precision_pack_is_removed_exactly_too(pack):
    _, folder = pack
    model, _ = tiny_model("llama")
    base = _params(model)
    apply_edit_pack(model, folder / "p32.safetensors")  # not the packed edited model (rounded deltas)
    remove_edit_pack(model, folder / "p32.safetensors")
    assert _same(model, base)


def test_a_pack_that_is_not_applied_is_refused(pack, tmp_path):
    _, folder = pack
    model, _ = tiny_model("llama")
    base = _params(model)
    with pytest.raises(StateMismatchError, match="not applied"):
        remove_edit_pack(model, folder / "p.safetensors")
    other, _ = tiny_model("llama", seed=1)
    with pytest.raises(StateMismatchError, match="does not hold the pack's base model plus the pack"):
        remove_edit_pack(other, folder / "p.safetensors")
    apply_edit_pack(model, folder / "p.safetensors")
    applied = _params(model)
    with torch.no_grad():
        model.model.embed_tokens.weight[0, 0] += 1.0  # changed since it was applied
    with pytest.raises(StateMismatchError, match="does not hold"):
        remove_edit_pack(model, folder / "p.safetensors")
    with torch.no_grad():
        model.model.embed_tokens.weight[0, 0] -= 1.0
    assert _same(model, applied)
    remove_edit_pack(model, folder / "p.safetensors")
    assert _same(model, base)


def test_a_damaged_pack_or_another_architecture_is_refused_untouched(pack, tmp_path):
    _, folder = pack
    model, _ = tiny_model("llama")
    apply_edit_pack(model, folder / "p.safetensors")
    applied = _params(model)
    data = bytearray((folder / "p.safetensors").read_bytes())
    data[-3] ^= 0xFF
    (tmp_path / "bad.safetensors").write_bytes(bytes(data))
    with pytest.raises(EditPackError, match="digest"):
        remove_edit_pack(model, tmp_path / "bad.safetensors")
    gpt2, _ = tiny_model("gpt2")
    with pytest.raises(StateMismatchError, match="for a model with"):
        remove_edit_pack(gpt2, folder / "p.safetensors")
    assert _same(model, applied)


def test_a_failed_write_puts_the_model_back(pack, monkeypatch):
    _, folder = pack
    model, _ = tiny_model("llama")
    apply_edit_pack(model, folder / "p.safetensors")
    applied = _params(model)
    real, writes = packs_mod.write_weight, []

    def fail_second(module, W):
        writes.append(1)
        if len(writes) == 2:
            raise RuntimeError("device lost")
        real(module, W)

    monkeypatch.setattr(packs_mod, "write_weight", fail_second)
    with pytest.raises(RuntimeError, match="device lost"):
        remove_edit_pack(model, folder / "p.safetensors")
    monkeypatch.setattr(packs_mod, "write_weight", real)
    assert _same(model, applied)
    remove_edit_pack(model, folder / "p.safetensors")  # the record is still there: exact
    assert model_fingerprint(model) == pack[0].base_fingerprint_


def test_a_model_that_got_its_pack_elsewhere_is_restored_only_when_exact(pack):
    """The editor's own model holds base + pack but was never given the pack: ``W - delta`` is the
    only source of the base weights, and it rounds differently on these tiny random weights."""
    editor, folder = pack
    held = _params(editor.model)
    try:
        meta = remove_edit_pack(editor.model, folder / "p.safetensors")
    except StateMismatchError as exc:
        assert "exactly" in str(exc) and "Load the base model again" in str(exc)
        assert _same(editor.model, held)
    else:
        assert model_fingerprint(editor.model) == meta["base_fingerprint"]
        for layer, solver in editor.solvers_.items():  # put the edits back for the other tests
            packs_mod.write_weight(editor._module(layer), solver.W_)


def test_an_owning_editor_keeps_its_model(stats_dir, pack):
    editor, folder = pack
    editor.take_over()  # owns its model again, which holds its state (base + pack)
    try:
        held = _params(editor.model)
        with pytest.raises(OwnershipError, match="owned by another editor"):
            remove_edit_pack(editor.model, folder / "p.safetensors")
        assert _same(editor.model, held)
    finally:
        editor.release()


@pytest.mark.parametrize("kind", ["signal", "exception"])
def test_an_interrupted_removal_removes_all_or_nothing(pack, kind):
    """The sweep of tests/reliability (tests/reliability/injection.py): a real SIGINT or an
    exception at every line the removal runs (first and last pass), every point of the deferral."""
    from tests.reliability.injection import Injector

    editor, folder = pack
    model, _ = tiny_model("llama")
    base = _params(model)
    apply_edit_pack(model, folder / "p.safetensors")
    applied = _params(model)

    def remove():
        remove_edit_pack(model, folder / "p.safetensors")

    def reapply():
        if _same(model, base):
            apply_edit_pack(model, folder / "p.safetensors")

    remove()  # a first run: one-time work (imports, caches) would shift the points of the counting run
    reapply()
    counter = Injector(kind=kind)
    with counter:
        remove()
    reapply()
    points = counter.selection(("interrupts.py",))
    outcomes = set()
    for at in points:
        injector = Injector(at, kind=kind)
        raised = None
        try:
            with injector:
                remove()
        except (Exception, KeyboardInterrupt) as exc:
            raised = exc
        assert injector.fired_in is not None
        if _same(model, applied):
            assert raised is not None, at
            outcomes.add("rolled back")
        else:
            assert _same(model, base), f"point {at} ({injector.fired_in}): neither base + pack nor the base"
            outcomes.add("removed")
        assert not guard_of(model).busy
        reapply()
    assert outcomes == {"rolled back", "removed"} and len(points) > 50
