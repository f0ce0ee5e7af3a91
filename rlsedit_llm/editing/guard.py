"""One owner per model: the lock every editor call on a model holds, the owning editor
(:class:`ModelGuard`, kept on the model), each editor's claim on its model (:class:`Ownership`:
the checks every state-changing call makes, take-over and release), the per-tensor digests
that let every call check cheaply that the model still holds what its editor wrote (see
:meth:`rlsedit_llm.Editor.check_model`), and :func:`disable_edits`, the block that switches an
editor's edits off while holding the lock (:meth:`rlsedit_llm.Editor.disabled`)."""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Container, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import TYPE_CHECKING, Any, TypeAlias

import torch

from rlsedit_llm.adapters.fingerprint import model_fingerprint
from rlsedit_llm.adapters.spec import read_weight, write_weight
from rlsedit_llm.errors import OwnershipError, StateMismatchError, UnsupportedArchitectureError
from rlsedit_llm.interrupts import deferred_interrupts

if TYPE_CHECKING:
    from rlsedit_llm.editing.editor import Editor

__all__ = ["EditsDisabled", "disable_edits", "ModelGuard", "Ownership", "guard_of", "named_tensors", "tensor_digests"]

_GUARD = "_rlsedit_guard"  # the per-model lock, owner and digest cache (see ModelGuard)

class ModelGuard:
    """Kept on the model object: the lock every editor call on the model holds, the owning editor
    (a weak reference) and the cache of per-tensor digests.

    A copy of the model (``copy.deepcopy``, pickling) gets a fresh guard with no owner."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self._owner: weakref.ref[Editor] | None = None
        # held while a state-changing call runs (only ever taken with ``lock`` held, so when it is
        # locked the caller's own thread is inside a call: a re-entrant call from a hook). A lock,
        # not a flag: ``with`` releases it in C, so no interrupt can leave it set.
        self.call = threading.Lock()
        self.activity: str | None = None  # what holds ``call`` when it is not an editor call (messages)
        self.cache: dict[str, tuple[tuple, str]] = {}  # name -> (token, digest)

    @property
    def busy(self) -> bool:
        """Whether a state-changing call on the model is running (in the thread that holds ``lock``)."""
        return self.call.locked()

    @property
    def owner(self) -> Editor | None:
        return self._owner() if self._owner is not None else None

    @owner.setter
    def owner(self, editor: Editor | None) -> None:
        self._owner = weakref.ref(editor) if editor is not None else None

    def __deepcopy__(self, memo):
        return ModelGuard()

    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self.__init__()


def guard_of(model: torch.nn.Module) -> ModelGuard:
    """The model's guard, created on first use. No lock: ``dict.setdefault`` is atomic, so
    threads racing on a fresh model all get the same guard (and an interrupt cannot leave a lock
    held here)."""
    if not isinstance(model, torch.nn.Module):
        raise UnsupportedArchitectureError(f"the model must be a Hugging Face causal LM (a torch.nn.Module); got "
                                           f"{type(model).__name__} (load one with rlsedit_llm.load_model)")
    guard = model.__dict__.get(_GUARD)
    if not isinstance(guard, ModelGuard):
        fresh = ModelGuard()
        guard = model.__dict__.setdefault(_GUARD, fresh)
        if not isinstance(guard, ModelGuard):  # something else under the name: replace it
            model.__dict__[_GUARD] = guard = fresh
    return guard


class Ownership:
    """One editor's claim on its model.

    ``describe()`` names the editor in messages; ``mismatch()`` is None when the model holds
    exactly the editor's state (else what differs); ``journal()`` identifies its journal, so that
    a call that changed nothing can give ownership back. ``displaced``: another editor took the
    model over explicitly (this one may no longer change it until :meth:`take_over`); ``broken``:
    why the editor's state can no longer be trusted (set when finishing a change failed).
    """

    def __init__(self, model: torch.nn.Module, editor: Any, mismatch: Callable[[], str | None],
                 describe: Callable[[], str], journal: Callable[[], list]) -> None:
        self.model, self.mismatch, self.describe, self.journal = model, mismatch, describe, journal
        self._editor = weakref.ref(editor)
        self.displaced = False
        self.broken: str | None = None

    @property
    def guard(self) -> ModelGuard:
        return guard_of(self.model)

    @property
    def owns(self) -> bool:
        """Whether the editor currently owns its model."""
        return self.guard.owner is self._editor()

    def hand_over(self, displace: bool) -> None:
        """Make the editor the owner; with ``displace`` (an explicit take-over) a different
        previous owner is refused from now on."""
        guard, editor = self.guard, self._editor()
        previous = guard.owner
        if displace and previous is not None and previous is not editor:
            previous.ownership.displaced = True
        self.displaced = False
        guard.owner = editor

    def refuse_if_owned(self, take_over: bool, action: str) -> None:
        """OwnershipError if another editor owns the model and its edits are still in it."""
        refuse_foreign_owner(self.guard, self._editor(), take_over, action)

    @contextmanager
    def call(self, action: str, *, claim: bool = True, check: Callable[[], None]) -> Iterator[None]:
        """Hold the model's lock, refuse re-entry, a displaced or broken editor, run ``check``
        (the model against the state), and (``claim``) make the editor the model's owner for the
        block. Signals are deferred for the whole block: Ctrl-C is delivered at the call's safe
        points (:func:`~rlsedit_llm.interrupts.poll_interrupts`) or when it ends."""
        guard = self.guard
        with deferred_interrupts(), guard.lock:
            refuse_reentry(guard, action)
            if self.displaced:
                raise OwnershipError(f"cannot {action}: another editor took this model over (take_over=True); "
                                     f"this editor may no longer change it. Call its take_over() to take the "
                                     f"model back (checked against this editor's state)")
            if self.broken:
                raise StateMismatchError(f"cannot {action}: {self.broken}; this editor's state can no longer be "
                                         f"trusted. Load the last save onto the base model (Editor.load)")
            check()
            previous, journal = guard.owner, [id(r) for r in self.journal()]
            with guard.call:
                try:
                    if claim:
                        guard.owner = self._editor()
                    yield
                except BaseException:
                    # a call that changed nothing (rolled back) leaves ownership as it was: a failed
                    # first edit must not lock a corrected retry out
                    if claim and [id(r) for r in self.journal()] == journal:
                        guard.owner = previous
                    raise

    def release(self) -> None:
        """Give up ownership of the model (another editor may then take it, if it matches)."""
        guard = self.guard
        with guard.lock:
            if guard.owner is self._editor():
                guard.owner = None


def refuse_reentry(guard: ModelGuard, action: str) -> None:
    """OwnershipError if a state-changing call on the model is already running in this thread."""
    if guard.busy:
        if guard.activity is not None:
            raise OwnershipError(f"cannot {action}: {guard.activity} in this thread; call it after that block")
        raise OwnershipError(f"cannot {action}: another editor call on this model is running in this "
                             f"thread (a re-entrant call from a hook or callback); call it afterwards")


def refuse_foreign_owner(guard: ModelGuard, editor: Any, take_over: bool, action: str, *, hint: str = "") -> None:
    """OwnershipError if an editor other than ``editor`` (None: any) owns the model and the model
    still holds its state, unless ``take_over``. ``hint`` adds a likely cause to the message."""
    owner = guard.owner
    if owner is None or owner is editor or take_over or owner.ownership.mismatch() is not None:
        return
    raise OwnershipError(
        f"cannot {action}: this model is owned by another editor ({owner.ownership.describe()}) whose state "
        f"the model holds{hint}; two editors on one model overwrite each other's writes. Continue with that "
        f"editor (rlsedit_llm.editor_of(model) for the one rlsedit_llm.edit keeps), call its release(), or take "
        f"the model over explicitly (take_over=True)")


class _OneTensor(torch.nn.Module):
    """A module holding one tensor, so that :func:`model_fingerprint` digests a single tensor."""

    def __init__(self, tensor: torch.Tensor):
        super().__init__()
        self.register_buffer("t", tensor.detach(), persistent=True)


def named_tensors(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Parameters and persistent buffers by name (what :func:`model_fingerprint` covers)."""
    persistent = set(model.state_dict(keep_vars=True))
    yield from model.named_parameters()
    for name, b in model.named_buffers():
        if name in persistent:
            yield name, b


def _token(t: torch.Tensor) -> tuple:
    """What identifies a tensor's contents without reading them: storage, offset, version counter,
    layout. In-place writes bump the version counter (writes through ``.data`` do not: the
    uncached check of :meth:`Editor.save` catches those)."""
    return (t.data_ptr(), t._version, t.dtype, tuple(t.shape), tuple(t.stride()), str(t.device))


def tensor_digests(model: torch.nn.Module, *, skip: Container[int] = frozenset(),
                   fresh: bool = False) -> dict[str, str]:
    """Per parameter and persistent buffer of ``model`` (except those whose ``id`` is in ``skip``)
    its :func:`model_fingerprint` digest, recomputed only for tensors whose storage pointer,
    version counter or layout changed since the last call (``fresh=True``: all of them)."""
    cache = guard_of(model).cache
    out = {}
    for name, t in named_tensors(model):
        if id(t) in skip:
            continue
        token = _token(t)
        hit = cache.get(name)
        if fresh or hit is None or hit[0] != token:
            hit = (token, model_fingerprint(_OneTensor(t)))
            cache[name] = hit
        out[name] = hit[1]
    return out


#: What :meth:`rlsedit_llm.Editor.disabled` returns (see :func:`disable_edits`).
EditsDisabled: TypeAlias = AbstractContextManager[torch.nn.Module]


def _put_back(guard: ModelGuard, modules: dict, held: dict[int, torch.Tensor]) -> None:
    """Write the copies ``held`` back into the edited modules (signals deferred); idempotent."""
    with deferred_interrupts():
        for layer, W in held.items():
            write_weight(modules[layer], W)
        guard.activity = None


@contextmanager
def disable_edits(editor: Editor) -> Iterator[torch.nn.Module]:
    """``with editor.disabled():`` the block runs on the base model: the edited layers hold the
    editor's pre-edit weights ``W0``; afterwards they hold exactly (bit for bit) the weights they
    held before the block, whatever exception or Ctrl-C ends it. The block's value is the model.

    On entry the model's lock is taken; re-entry, a displaced or broken editor and a model that
    does not hold the editor's state are refused (:meth:`~rlsedit_llm.Editor.check_model`), nothing
    changed; the edited layers' weights are copied and ``W0`` written, signals deferred (all or
    nothing). The lock is held for the whole block, so no edit runs meanwhile: an editor call on the
    model from another thread *waits* for the block to end; one from the block's own thread (any
    editor, ``rlsedit_llm.edit`` too) is *refused* with :class:`OwnershipError`. The block itself
    stays interruptible (Ctrl-C raises ``KeyboardInterrupt`` in it as usual). On exit the copies are
    written back with signals deferred, a second time if anything (a Ctrl-C that landed before the
    deferral took over, a failed write) interrupted the first, and the exception is raised after
    that; the locks are released by ``with`` statements, and should the exit itself be skipped, the
    generator's clean-up (its ``finally``, run when it is closed) puts the weights back all the same."""
    guard = guard_of(editor.model)
    with guard.lock:
        refuse_reentry(guard, "switch the edits off")
        if editor.ownership.displaced:
            raise OwnershipError("cannot switch the edits off: another editor took this model over "
                                 "(take_over=True); call this editor's take_over() first")
        if editor.ownership.broken:
            raise StateMismatchError(f"cannot switch the edits off: {editor.ownership.broken}")
        editor.check_model()
        modules = {layer: editor._module(layer) for layer in editor.solvers_}
        held = {layer: read_weight(module) for layer, module in modules.items()}  # copies
        with guard.call:  # re-entry refused until the block ends
            guard.activity = "the edits of this model are switched off (a `with editor.disabled():` block runs)"
            try:
                with deferred_interrupts():
                    for layer, module in modules.items():
                        write_weight(module, editor.solvers_[layer].W0_)
                yield editor.model
            finally:
                try:
                    _put_back(guard, modules, held)
                except BaseException:
                    try:
                        _put_back(guard, modules, held)  # once more; a no-op rewrite if the first completed
                    finally:
                        guard.activity = None
                    raise
