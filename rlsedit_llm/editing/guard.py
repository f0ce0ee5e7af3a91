"""One owner per model: the lock every editor call on a model holds, the owning editor, and the
per-tensor digests that let every state-changing call check cheaply that the model still holds
what its editor wrote (see :meth:`rlsedit_llm.Editor.check_model`)."""

from __future__ import annotations

import threading
import weakref

import torch

from rlsedit_llm.adapters.fingerprint import model_fingerprint
from rlsedit_llm.errors import UnsupportedArchitectureError

__all__ = ["ModelGuard", "guard_of", "hand_over", "named_tensors", "tensor_digests"]

_GUARD = "_rlsedit_guard"  # the per-model lock, owner and digest cache (see ModelGuard)

class ModelGuard:
    """Kept on the model object: the lock every editor call on the model holds, the owning editor
    (a weak reference) and the cache of per-tensor digests.

    A copy of the model (``copy.deepcopy``, pickling) gets a fresh guard with no owner."""

    def __init__(self):
        self.lock = threading.RLock()
        self._owner = None
        # held while a state-changing call runs (only ever taken with ``lock`` held, so when it is
        # locked the caller's own thread is inside a call: a re-entrant call from a hook). A lock,
        # not a flag: ``with`` releases it in C, so no interrupt can leave it set.
        self.call = threading.Lock()
        self.cache: dict[str, tuple[tuple, str]] = {}  # name -> (token, digest)

    @property
    def busy(self) -> bool:
        """Whether a state-changing call on the model is running (in the thread that holds ``lock``)."""
        return self.call.locked()

    @property
    def owner(self):
        return self._owner() if self._owner is not None else None

    @owner.setter
    def owner(self, editor) -> None:
        self._owner = weakref.ref(editor) if editor is not None else None

    def __deepcopy__(self, memo):
        return ModelGuard()

    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self.__init__()


def hand_over(guard: ModelGuard, editor, displace: bool) -> None:
    """Make ``editor`` the owner; with ``displace`` (an explicit take-over) a different previous
    owner is refused from now on."""
    previous = guard.owner
    if displace and previous is not None and previous is not editor:
        previous._displaced = True
    editor._displaced = False
    guard.owner = editor


def guard_of(model) -> ModelGuard:
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


class _OneTensor(torch.nn.Module):
    """A module holding one tensor, so that :func:`model_fingerprint` digests a single tensor."""

    def __init__(self, tensor: torch.Tensor):
        super().__init__()
        self.register_buffer("t", tensor.detach(), persistent=True)


def named_tensors(model):
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


def tensor_digests(model, *, skip=frozenset(), fresh: bool = False) -> dict[str, str]:
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
