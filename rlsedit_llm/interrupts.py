"""Interrupts held back while a state change cannot be stopped half-way.

An in-place update of a ``d_k x d_k`` inverse cannot be taken back bit for bit without a copy of
it, so the editor makes its last phase (adopting the proposed steps) a point of no return that
always finishes (see :mod:`rlsedit_llm.kernel.protocol`). :func:`deferred_interrupts` keeps
Ctrl-C (``SIGINT``) and ``SIGTERM`` from landing inside that phase: while the block runs, a
signal is only recorded; when the block ends the original handlers are put back and each recorded
signal is delivered to them, in order (the default ``SIGINT`` handler raises
``KeyboardInterrupt`` then, after the change is complete).

An editor call runs whole inside such a block, so that no interrupt can land in its clean-up code
(hooks removed, ``requires_grad`` flags restored, locks released): its long loops (value
optimisation steps, statistics batches) call :func:`poll_interrupts`, which delivers a recorded
Ctrl-C at that safe point, inside the code that a failure rolls back.

Signals reach Python only in the main thread, so outside it the context does nothing (a worker
thread is never interrupted by a signal). Nested blocks defer to the outermost one.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["deferred_interrupts", "poll_interrupts"]

log = logging.getLogger(__name__)

#: The signals a user sends to stop a program.
DEFERRED_SIGNALS = tuple(s for s in (getattr(signal, "SIGINT", None), getattr(signal, "SIGTERM", None))
                         if s is not None)


class _Recorder:
    """The temporary handler: records signals instead of acting on them. ``originals``: the
    handlers it replaced; ``active``: while its block runs."""

    def __init__(self, originals: dict):
        self.received: list[int] = []
        self.originals = originals
        self.active = True

    def __call__(self, signum, frame) -> None:
        self.received.append(signum)


def _current_handlers() -> dict:
    """The installed handlers; a recorder whose block ended without putting the original back (an
    exception inside its clean-up) counts as the handler it replaced."""
    current = {}
    for s in DEFERRED_SIGNALS:
        handler = signal.getsignal(s)
        if isinstance(handler, _Recorder) and not handler.active:
            handler = handler.originals.get(s, signal.default_int_handler)
        current[s] = handler
    return current


@contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Run the block with ``SIGINT``/``SIGTERM`` recorded, then deliver them (see the module
    docstring)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    current = _current_handlers()
    if any(isinstance(h, _Recorder) for h in current.values()):  # an outer block defers already
        yield
        return
    installed = {s: h for s, h in current.items() if h is not None}  # None: installed from C, left alone
    recorder = _Recorder(installed)
    # SIGINT last in, last out: Ctrl-C is recorded from the moment it is deferred until every
    # other handler is back
    order = sorted(installed, key=lambda s: s == signal.SIGINT, reverse=True)
    try:
        for s in order:
            signal.signal(s, recorder)
        yield
    finally:
        recorder.active = False
        for s in reversed(order):
            signal.signal(s, installed[s])
        for s in recorder.received:
            log.warning("signal %d arrived during a state change that cannot stop half-way; delivered after it "
                        "completed", s)
            signal.raise_signal(s)


def poll_interrupts() -> None:
    """Deliver the signals recorded so far by an enclosing :func:`deferred_interrupts` whose
    original handler is a Python function (Ctrl-C's default handler raises ``KeyboardInterrupt``
    here). Other signals wait for the end of the block. A no-op outside such a block."""
    if threading.current_thread() is not threading.main_thread():
        return
    recorder = signal.getsignal(signal.SIGINT)
    if not (isinstance(recorder, _Recorder) and recorder.active and recorder.received):
        return
    for s in list(recorder.received):
        handler = recorder.originals.get(s)
        if callable(handler):
            recorder.received.remove(s)
            handler(s, None)
