"""Every state-changing call completes or leaves everything bit-identical, whatever exception or
signal arrives at any point of the library's code.

Each sweep first runs the call uninterrupted (the "after" state), then once per chosen point with
an interrupt injected there (:mod:`tests.reliability.injection`): a real ``SIGINT`` (Ctrl-C) or
an arbitrary exception. After each run the model's parameters, the editor's state (weights, every
solver's tensors and scalars) and its journal must equal either the state before the call or the
uninterrupted "after" state, bit for bit; no hook may be left on the model, no parameter's
``requires_grad`` changed, the model's lock free, its owner consistent; and the editor must accept
the next call.

The default sweeps inject at every point of the transaction and solver code and at the first and
last pass of every other line the call runs; the ``slow`` sweep injects at every line event of the
call, and at every bytecode of the transaction and solver code.
"""

from __future__ import annotations

import shutil
import signal

import pytest
import torch

from rlsedit_llm.adapters.tiny import tiny_model
from rlsedit_llm.editing.editor import Editor
from rlsedit_llm.editing.guard import guard_of
from rlsedit_llm.pipeline.facts import Fact
from tests.helpers import FIRST, NEXT, OTHER
from tests.helpers import small_config as config

from .conftest import copied, params
from .injection import Injected, Injector

#: The code that changes state: every point of it is interrupted.
CRITICAL = ("editing/transaction.py", "editing/editor.py", "kernel/protocol.py", "kernel/inplace.py",
            "kernel/rls.py", "interrupts.py")

#: The transaction and commit machinery: every point of it is interrupted even in the short sweeps.
COMMIT = ("editing/transaction.py", "kernel/protocol.py", "kernel/inplace.py", "interrupts.py")

REPLACING = [Fact("{} is located in", "Toyota", "France", relation_id="P17")]  # replaces FIRST[0]


def _absorb(editor: Editor):
    record = editor.journal_[0]
    return editor.absorb(OTHER, {l: record.keys[l][:1] for l in editor.layers_},
                         {l: record.values[l][:1] for l in editor.layers_})


CALLS = {
    "edit": lambda editor: editor.edit(NEXT),
    "edit_replacing": lambda editor: editor.edit(REPLACING),
    "absorb": _absorb,
    "undo": lambda editor: editor.undo(editor.journal_[0].edit_id),
}


def _state(editor: Editor) -> dict:
    """The model's parameters and the editor's state, copied (journal times left out)."""
    state = editor.state_dict()
    for entry in state["journal"]:
        entry.pop("created")
    return {"params": params(editor.model), "state": copied(state)}


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_equal(u, v) for u, v in zip(a, b, strict=True))
    return a == b


def _hooks(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


class Sweep:
    """A model, the saved state before the call, and the uninterrupted result of the call."""

    def __init__(self, stats_dir: str, call: str):
        self.model, self.tok = tiny_model("llama")
        editor = Editor(self.model, self.tok, config(stats_dir))
        editor.edit(FIRST)
        if call == "undo":
            editor.edit(NEXT)
        self.base = editor.state_dict()
        self.call = CALLS[call]
        self.grads = {n: p.requires_grad for n, p in self.model.named_parameters()}
        self.before = _state(editor)
        self.call(editor)
        self.after = _state(editor)
        assert not _equal(self.before, self.after)

    def fresh(self) -> Editor:
        return Editor.from_state_dict(self.model, self.tok, self.base, take_over=True)

    def count(self, kind: str = "signal", *, opcodes: bool = False) -> Injector:
        counter = Injector(kind=kind, opcodes=opcodes)
        editor = self.fresh()
        with counter:
            self.call(editor)
        assert _equal(_state(editor), self.after)
        return counter

    def interrupt(self, at: int, kind: str, *, opcodes: bool = False) -> str:
        """Run the call interrupted at point ``at``; check the guarantees; return the outcome."""
        editor = self.fresh()
        injector = Injector(at, kind=kind, opcodes=opcodes)
        raised = None
        try:
            with injector:
                self.call(editor)
        except (Injected, KeyboardInterrupt) as exc:
            raised = exc
        where = f"point {at} ({injector.fired_in}, {kind})"
        assert injector.fired_in is not None, where
        state = _state(editor)
        if _equal(state, self.before):
            outcome = "rolled back"
            assert raised is not None, f"{where}: the call returned without its change"
        else:
            assert _equal(state, self.after), f"{where}: neither the state before nor the state after the call"
            outcome = "completed"
        guard = guard_of(self.model)
        assert _hooks(self.model) == 0, f"{where}: a hook was left on the model"
        assert {n: p.requires_grad for n, p in self.model.named_parameters()} == self.grads, where
        assert not guard.busy and not guard.lock._is_owned(), f"{where}: the model's lock is held"
        assert guard.owner is editor, f"{where}: ownership changed"
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler, f"{where}: Ctrl-C handler not restored"
        editor.check_model()  # the model holds exactly the editor's state
        return outcome


@pytest.fixture(autouse=True)
def _default_sigint_handler():
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.fixture(scope="module")
def sweeps(stats_dir):
    return {}


def _sweep(sweeps, stats_dir, call) -> Sweep:
    if call not in sweeps:
        sweeps[call] = Sweep(stats_dir, call)
    return sweeps[call]


@pytest.mark.parametrize("kind", ["signal", "exception"])
@pytest.mark.parametrize("call", ["absorb", "undo", "edit_replacing"])
def test_an_interrupt_at_any_point_completes_the_call_or_changes_nothing(sweeps, stats_dir, call, kind):
    """absorb and undo: every line event of the library's code the call passes. An edit (with a
    replacement, so the retraction inside it too): the first and last pass of every line of the
    editor, commit and solver code (the rest of an edit, mostly the value optimisation, changes
    nothing)."""
    sweep = _sweep(sweeps, stats_dir, call)
    counter = sweep.count(kind)
    if call == "edit_replacing":
        points = counter.selection((), within=CRITICAL)
    else:
        points = sorted(set(range(counter.count)) - counter.cleanup)
    assert len(points) > 300
    outcomes = [sweep.interrupt(at, kind) for at in points]
    assert "rolled back" in outcomes and "completed" in outcomes  # both sides of the point of no return
    editor = sweep.fresh()  # still editable after all that
    editor.edit(OTHER)


#: The functions of the point of no return.
NO_RETURN = ("Transaction.adopt", "Transaction.__exit__", "Transaction._finish", "Adoption.run", "PendingCommit.run",
             "SymmetricRankUpdate.run", "LayerSolver.begin_commit", "_mirror_panel_")


@pytest.mark.slow
def test_an_exception_at_every_bytecode_of_the_point_of_no_return(sweeps, stats_dir):
    """An undo's adoption, bytecode by bytecode (signals are deferred there: the line sweeps cover
    them)."""
    sweep = _sweep(sweeps, stats_dir, "undo")
    kind = "exception"
    counter = sweep.count(kind, opcodes=True)
    points = [at for at, name in enumerate(counter.functions) if name in NO_RETURN and at not in counter.cleanup]
    assert len(points) > 100
    for at in points:
        sweep.interrupt(at, kind, opcodes=True)


def test_a_signal_inside_the_adoption_is_delivered_after_it_completed(stats_dir, caplog):
    """A real Ctrl-C in the middle of the in-place update: the edit completes, then the interrupt."""
    sweep = Sweep(stats_dir, "edit")
    counter = sweep.count()
    inside = [i for i, ((file, _line), name) in enumerate(zip(counter.points, counter.functions, strict=True))
              if file == "kernel/inplace.py" and name.split(".")[-1] == "run"]  # SymmetricRankUpdate.run
    assert inside
    editor = sweep.fresh()
    with pytest.raises(KeyboardInterrupt), Injector(inside[len(inside) // 2], kind="signal"):
        editor.edit(NEXT)
    assert _equal(_state(editor), sweep.after)
    assert "arrived during a state change" in caplog.text


def test_a_failed_first_edit_leaves_no_owner(stats_dir, monkeypatch):
    """A first rlsedit_llm.edit that fails inside the call must not lock a corrected retry out."""
    import rlsedit_llm
    import rlsedit_llm.editing.editor as editor_module
    from rlsedit_llm.errors import NonFiniteError

    model, tok = tiny_model("llama")
    real = editor_module.compute_values

    def bad_values(*args, **kwargs):
        raise NonFiniteError("simulated: value optimisation produced NaN")

    monkeypatch.setattr(editor_module, "compute_values", bad_values)
    with pytest.raises(NonFiniteError):
        rlsedit_llm.edit(model, FIRST, tokenizer=tok, config=config(stats_dir))
    assert guard_of(model).owner is None
    monkeypatch.setattr(editor_module, "compute_values", real)
    report = rlsedit_llm.edit(model, FIRST, tokenizer=tok, config=config(stats_dir))  # not refused
    assert report.edit_id == 0


def test_an_adoption_that_cannot_finish_marks_the_editor_broken(stats_dir, monkeypatch):
    """If the adoption fails and finishing it fails too, every later call is refused."""
    from rlsedit_llm.errors import StateMismatchError
    from rlsedit_llm.kernel.inplace import SymmetricRankUpdate

    model, tok = tiny_model("llama")
    editor = Editor(model, tok, config(stats_dir))
    editor.edit(FIRST)
    real = SymmetricRankUpdate.run

    def failing(update):
        raise MemoryError("simulated")

    monkeypatch.setattr(SymmetricRankUpdate, "run", failing)
    with pytest.raises(MemoryError):
        editor.edit(NEXT)
    monkeypatch.setattr(SymmetricRankUpdate, "run", real)
    with pytest.raises(StateMismatchError, match="can no longer be trusted"):
        editor.edit(OTHER)


# -- load, save and edit packs ------------------------------------------------------------------
#: The code that reads and writes saves and packs: the first and last pass of each of its lines.
FILES = ("editing/state.py", "editing/folder_lock.py", "editing/folder_swap.py", "editing/save_paths.py",
         "editing/packs.py", "files.py", "editing/guard.py")


def _points(run, kind: str, reset=lambda: None) -> list[int]:
    """Every point of the editor's code and of the interrupt deferral, and the first and last pass
    of each line of the file code, in a run of ``run`` (after a first run: the first call on a
    model does one-time work). The validation of a loaded state only reads: left out."""
    reset()
    run()
    reset()
    counter = Injector(kind=kind)
    with counter:
        run()
    return counter.selection(("editing/editor.py", "interrupts.py"), within=FILES)


def _interrupted(run, at: int, kind: str) -> BaseException | None:
    injector = Injector(at, kind=kind)
    try:
        with injector:
            run()
    except (Exception, KeyboardInterrupt) as exc:  # an injected one, or the typed error it became
        return exc
    finally:
        assert injector.fired_in is not None, f"point {at} not reached: the run passed {injector.count} points"
    return None


@pytest.mark.parametrize("kind", ["signal", "exception"])
def test_an_interrupted_load_leaves_the_model_as_it_was_or_loads_completely(stats_dir, tmp_path, kind):
    editor = Editor(*tiny_model("llama"), config(stats_dir))
    editor.edit(FIRST)
    editor.save(tmp_path / "s")
    edited = params(editor.model)
    model, tok = tiny_model("llama")  # the base model the save loads onto
    base = params(model)

    def load():
        Editor.load(model, tok, tmp_path / "s", take_over=True)

    def reset():  # back to the base model, no owner
        for name, value in base.items():
            model.state_dict()[name].copy_(value)
        guard_of(model).owner = None

    points = _points(load, kind, reset)
    outcomes = []
    for at in points:
        reset()
        raised = _interrupted(load, at, kind)
        now, owner = params(model), guard_of(model).owner
        if _equal(now, base):
            assert owner is None and raised is not None, at
            outcomes.append("rolled back")
        else:
            assert _equal(now, edited), f"point {at}: the model is neither the base nor the loaded one"
            assert owner is not None and owner._mismatch() is None, at
            outcomes.append("completed")
        assert _hooks(model) == 0 and not guard_of(model).busy
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert "rolled back" in outcomes and len(points) > 50


@pytest.mark.parametrize("kind", ["signal", "exception"])
def test_an_interrupted_save_keeps_the_previous_save_or_the_new_one_and_changes_nothing(stats_dir, tmp_path, kind):
    from rlsedit_llm.editing.state import read_manifest
    from rlsedit_llm.files import sha256_file

    editor = Editor(*tiny_model("llama"), config(stats_dir))
    editor.edit(FIRST)
    folder = tmp_path / "saves"
    target = folder / "s"
    editor.save(target)
    shutil.copytree(target, tmp_path / "old")  # to put the old save back after a run that completed
    old_ids = [e["edit_id"] for e in read_manifest(target)["journal"]]
    editor.edit(NEXT)
    before = _state(editor)
    new_ids = [r.edit_id for r in editor.journal_]

    def put_old_back():
        shutil.rmtree(target)
        shutil.copytree(tmp_path / "old", target)
        # a completed save may leave its (unlocked) lock file, which the next save reuses: removed so
        # that every run passes the same points
        (folder / "s.rlsedit-lock").unlink(missing_ok=True)

    points = _points(lambda: editor.save(target), kind, put_old_back)
    outcomes = []
    for at in points:
        (folder / "s.rlsedit-lock").unlink(missing_ok=True)  # as in put_old_back
        _interrupted(lambda: editor.save(target), at, kind)
        assert _equal(_state(editor), before), at  # a save changes neither the model nor the editor
        manifest = read_manifest(target)  # a complete save (its digest), old or new
        assert all(sha256_file(target / name) == digest for name, digest in manifest["files"].items()), at
        ids = [e["edit_id"] for e in manifest["journal"]]
        assert ids in (old_ids, new_ids), at
        leftovers = sorted(p.name for p in folder.iterdir() if p.name != "s" and not p.name.endswith("-lock"))
        assert leftovers == [], f"point {at}: {leftovers}"
        outcomes.append("new" if ids == new_ids else "old")
        if ids == new_ids:
            put_old_back()
    Editor.load(*tiny_model("llama"), target)  # and the last one loads (fingerprints)
    assert "old" in outcomes and "new" in outcomes


@pytest.mark.parametrize("kind", ["signal", "exception"])
def test_an_interrupted_pack_application_applies_all_or_nothing(stats_dir, tmp_path, kind):
    from rlsedit_llm.editing.packs import apply_edit_pack

    editor = Editor(*tiny_model("llama"), config(stats_dir))
    editor.edit(FIRST)
    editor.save_edit_pack(tmp_path / "p.safetensors")
    edited = params(editor.model)
    model, _tok = tiny_model("llama")
    base = params(model)

    def apply():
        apply_edit_pack(model, tmp_path / "p.safetensors")

    def reset():
        for name, value in base.items():
            model.state_dict()[name].copy_(value)

    points = _points(apply, kind, reset)
    outcomes = []
    for at in points:
        reset()
        raised = _interrupted(apply, at, kind)
        now = params(model)
        if _equal(now, base):
            assert raised is not None, at
            outcomes.append("rolled back")
        else:
            assert _equal(now, edited), f"point {at}: the model is neither the base nor the one with the pack"
            outcomes.append("completed")
    assert "rolled back" in outcomes and "completed" in outcomes


def test_a_refused_load_puts_back_the_models_own_weights(stats_dir, tmp_path):
    """A save whose weights do not reproduce its edited model is refused after they were written:
    the model gets its own weights back (not the save's W0, which may differ from them)."""
    from rlsedit_llm.errors import StateMismatchError

    from .test_persistence_hardening import _every_layer, _forge

    editor = Editor(*tiny_model("llama"), config(stats_dir))
    editor.edit(FIRST)
    editor.save(tmp_path / "s")
    shifted = _every_layer("W0", lambda t: t + 1e-3)
    both = _every_layer("W", lambda t: t + 1e-3)
    forged = _forge(tmp_path / "s", tmp_path / "forged", solvers=lambda ts: (shifted(ts), both(ts)))
    model, tok = tiny_model("llama")
    before = params(model)
    with pytest.raises(StateMismatchError, match="does not match the saved edited model"):
        Editor.load(model, tok, forged)
    assert _equal(params(model), before)
    assert guard_of(model).owner is None


def test_what_is_not_a_model_is_refused_with_a_typed_error():
    import rlsedit_llm
    from rlsedit_llm.errors import UnsupportedArchitectureError

    _model, tok = tiny_model("llama")
    for call in (lambda: Editor(None, tok), lambda: Editor(42, tok),
                 lambda: rlsedit_llm.edit(None, FIRST, tokenizer=tok)):
        with pytest.raises(UnsupportedArchitectureError, match="must be a Hugging Face causal LM"):
            call()


def test_a_regulariser_too_weak_for_undo_is_refused_before_the_first_edit(stats_dir):
    """alpha = 0 with a tiny anchor weight: every edit absorbed almost exactly, and a later undo's
    downdate cancels to rounding. Refused at the first edit, nothing changed."""
    from rlsedit_llm.errors import HyperparameterError

    model, tok = tiny_model("llama")
    before = params(model)
    editor = Editor(model, tok, config(stats_dir, alpha=0.0, mom2_weight=1e-9))
    with pytest.raises(HyperparameterError, match="too weak"):
        editor.edit(FIRST)
    assert _equal(params(model), before) and editor.journal_ == []


def test_real_sigint_at_random_moments_never_leaves_a_commit_half_done():
    """Ctrl-C from another thread (os.kill) at random moments of an in-place commit at d_k = 768:
    the inverse is always either untouched or exactly the uninterrupted result."""
    import os
    import random
    import threading
    import time

    from rlsedit_llm.kernel.rls import LayerRLS

    gen = torch.Generator().manual_seed(0)
    d_k, d_v, u = 768, 32, 64
    X = torch.randn(4 * d_k, d_k, generator=gen, dtype=torch.float64)
    solver = LayerRLS(torch.randn(d_k, d_v, generator=gen, dtype=torch.float64), 0.1, 1.0, X.mT @ X / len(X))
    K = torch.randn(u, d_k, generator=gen, dtype=torch.float64)
    step = solver.propose(K, torch.randn(u, d_v, generator=gen, dtype=torch.float64))
    reference = solver.clone()
    tic = time.perf_counter()
    reference.commit(step)
    seconds = time.perf_counter() - tic
    rng = random.Random(0)
    outcomes = []
    for _trial in range(30):
        trial = solver.clone()
        timer = threading.Timer(rng.uniform(0, 1.2 * seconds), os.kill, (os.getpid(), signal.SIGINT))
        try:
            timer.start()  # inside the try: the signal may land right after it
            trial.commit(step)
            timer.join()
            time.sleep(0.01)  # a signal sent after the commit lands here
        except KeyboardInterrupt:
            timer.join()
        if torch.equal(trial.C_, solver.C_):
            assert torch.equal(trial.W_, solver.W_) and trial.n_updates_ == solver.n_updates_
            outcomes.append("untouched")
        else:
            assert torch.equal(trial.C_, reference.C_) and torch.equal(trial.W_, reference.W_)
            assert trial.n_updates_ == reference.n_updates_
            outcomes.append("complete")
    assert "complete" in outcomes
