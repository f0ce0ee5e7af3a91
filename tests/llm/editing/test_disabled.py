"""``Editor.disabled()`` / ``rlsedit_llm.edits_disabled(model)``: the block runs on the base model,
the edits come back bit for bit on exit (exception and Ctrl-C included), and no edit runs
meanwhile (refused in the block's thread, waits in another)."""

from __future__ import annotations

import contextlib
import signal
import threading
import time

import pytest
import torch

import rlsedit_llm
from rlsedit_llm.adapters.tiny import tiny_model
from rlsedit_llm.editing import guard as guard_mod
from rlsedit_llm.editing.editor import Editor
from rlsedit_llm.editing.guard import guard_of
from rlsedit_llm.errors import OwnershipError, RLSEditError, StateMismatchError
from tests.helpers import STREAM
from tests.helpers import small_config as _config

pytestmark = pytest.mark.usefixtures("one_thread_unless_slow")


def _bits(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().view(torch.int32) for k, v in model.state_dict().items()}


def _same(model, reference) -> bool:
    return all(torch.equal(v.detach().view(torch.int32), reference[k]) for k, v in model.state_dict().items())


@pytest.fixture
def editor(stats_dir) -> Editor:
    model, tok = tiny_model("llama")
    editor = Editor(model, tok, _config(stats_dir))
    for facts in STREAM[:2]:
        editor.edit(facts)
    return editor


def _greedy(model, tok, prompt="The capital of Italy is") -> list[int]:
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.eos_token_id)[0].tolist()


def test_the_block_runs_on_the_base_model_and_the_edits_come_back_bitwise(editor):
    base, tok = tiny_model("llama")  # the same pre-trained weights, never edited
    edited = _bits(editor.model)
    assert not _same(editor.model, _bits(base))
    with editor.disabled() as model:
        assert model is editor.model
        assert _same(model, _bits(base))  # every parameter: the edited layers hold W0
        assert _greedy(model, tok) == _greedy(base, tok)
    assert _same(editor.model, edited)
    editor.check_model()
    assert editor.edit(STREAM[2]).edit_id == 2  # editing goes on


def test_an_exception_in_the_block_puts_the_edits_back(editor):
    edited = _bits(editor.model)
    with pytest.raises(ValueError, match="boom"), editor.disabled():
        raise ValueError("boom")
    assert _same(editor.model, edited)
    assert not guard_of(editor.model).busy and guard_of(editor.model).activity is None


def test_ctrl_c_in_the_block_puts_the_edits_back(editor):
    edited = _bits(editor.model)
    with pytest.raises(KeyboardInterrupt), editor.disabled():
        signal.raise_signal(signal.SIGINT)  # a real Ctrl-C: the block stays interruptible
        time.sleep(1)
    assert _same(editor.model, edited)
    editor.edit(STREAM[2])


def test_ctrl_c_landing_before_the_restore_is_deferred_still_restores(editor, monkeypatch):
    edited = _bits(editor.model)
    real = guard_mod._put_back
    calls = []

    def interrupted_once(*args):
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt  # as if Ctrl-C arrived just before the deferral took over
        real(*args)

    monkeypatch.setattr(guard_mod, "_put_back", interrupted_once)
    with pytest.raises(KeyboardInterrupt), editor.disabled():
        pass
    assert len(calls) == 2 and _same(editor.model, edited)
    assert not guard_of(editor.model).busy and guard_of(editor.model).activity is None


def _lock_is_free(guard) -> bool:
    """Whether another thread can take the model's lock (it was released)."""
    free = []

    def take():
        if guard.lock.acquire(timeout=5):
            guard.lock.release()
            free.append(True)

    worker = threading.Thread(target=take)
    worker.start()
    worker.join()
    return free == [True]


def test_an_interrupt_at_any_point_switches_back_or_changes_nothing(editor):
    """The sweep of tests/reliability (tests/reliability/injection.py): a real SIGINT or an
    exception at every line of the switch off and back on (every point of guard.py and the
    deferral, the first and last pass of every other line). As in those sweeps the block itself
    does not fail: a second fault in the clean-up of a failing block is the kind of point the
    injector leaves out (a real signal cannot land there)."""
    from tests.reliability.injection import Injector

    edited = _bits(editor.model)
    guard = guard_of(editor.model)

    def run():
        with editor.disabled():
            pass

    for kind in ("signal", "exception"):
        counter = Injector(kind=kind)
        with counter:
            run()
        points = counter.selection(("editing/guard.py", "interrupts.py"))
        assert len(points) > 20
        for at in points:
            injector = Injector(at, kind=kind)
            with contextlib.suppress(Exception, KeyboardInterrupt), injector:
                run()
            assert injector.fired_in is not None
            where = (kind, at, injector.fired_in)
            assert _same(editor.model, edited), where
            assert not guard.busy and guard.activity is None, where
            assert _lock_is_free(guard), where
            assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    editor.edit(STREAM[2])


def test_a_failure_while_switching_off_changes_nothing(editor, monkeypatch):
    edited = _bits(editor.model)
    real = guard_mod.write_weight
    writes = []

    def fail_second(module, W):
        writes.append(1)
        if len(writes) == 2:
            raise RuntimeError("device lost")
        real(module, W)

    monkeypatch.setattr(guard_mod, "write_weight", fail_second)
    with pytest.raises(RuntimeError, match="device lost"), editor.disabled():
        pytest.fail("the block must not run")
    monkeypatch.setattr(guard_mod, "write_weight", real)
    assert _same(editor.model, edited) and not guard_of(editor.model).busy
    editor.edit(STREAM[2])


def test_an_edit_from_the_block_is_refused_and_one_from_another_thread_waits(editor):
    edited = _bits(editor.model)
    done = threading.Event()
    errors: list[BaseException] = []

    def other_thread():
        try:
            editor.check_model()  # takes the model's lock: waits for the block
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        done.set()

    with editor.disabled():
        with pytest.raises(OwnershipError, match="switched off"):
            editor.edit(STREAM[2])
        with pytest.raises(OwnershipError, match="switched off"):
            editor.undo(0)
        with pytest.raises(OwnershipError, match="switched off"):
            rlsedit_llm.edit(editor.model, STREAM[2], tokenizer=editor.tokenizer, config=editor.config)
        with pytest.raises(OwnershipError, match="switched off"), editor.disabled():
            pass
        worker = threading.Thread(target=other_thread)
        worker.start()
        assert not done.wait(0.3)  # still waiting for the lock
    worker.join(10)
    assert done.is_set() and errors == []  # ran after the block, on the edited model again
    assert _same(editor.model, edited) and [r.edit_id for r in editor.journal_] == [0, 1]


def test_a_model_that_does_not_hold_the_editor_state_is_refused(editor):
    with torch.no_grad():
        editor._module(editor.layers_[0]).weight[0, 0] += 1.0
    changed = _bits(editor.model)
    with pytest.raises(StateMismatchError), editor.disabled():
        pytest.fail("the block must not run")
    assert _same(editor.model, changed) and not guard_of(editor.model).busy


def test_the_function_form_for_the_one_call_api(stats_dir):
    model, tok = tiny_model("llama")
    with pytest.raises(RLSEditError, match="no lifelong editor"):
        rlsedit_llm.edits_disabled(model)
    base = _bits(model)
    rlsedit_llm.edit(model, STREAM[0], tokenizer=tok, config=_config(stats_dir))
    edited = _bits(model)
    with rlsedit_llm.edits_disabled(model):
        assert _same(model, base)
    assert _same(model, edited)


def test_an_unprepared_editor_has_nothing_to_switch(stats_dir):
    model, tok = tiny_model("llama")
    editor = Editor(model, tok, _config(stats_dir))
    before = _bits(model)
    with editor.disabled():
        assert _same(model, before)
    assert _same(model, before)
