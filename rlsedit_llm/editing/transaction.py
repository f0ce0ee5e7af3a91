"""All or nothing for every state-changing call of an :class:`~rlsedit_llm.Editor`.

A call runs in two phases inside one :class:`Transaction`:

1. **Proposal.** Everything that can fail: facts, values, keys, the layer solvers' proposed steps
   (which change nothing), and the new weights written into the model (the edit's own scores need
   them). A replacement (``EditConfig(replace=True)``) also commits its retractions here, each
   keeping a copy of what it changes in place. If anything fails or is interrupted in this phase,
   the transaction restores the edited weights from copies, every solver from its checkpoint and
   undo log, and the journal: bit for bit.
2. **Adoption** (:meth:`Transaction.adopt`), the point of no return: the solvers adopt their steps
   (``LayerRLS`` updates its inverse in place) and the journal takes the record. Ctrl-C waits
   until it is done, and if any exception arrives inside it, the transaction finishes it before
   the exception propagates (:class:`Adoption` is resumable, like the commits it runs). The call
   then raises, but its change is complete and consistent: the edit is in the journal.

So whatever exception or signal arrives at any bytecode, the weights, every solver's state and the
journal are either exactly as before the call or exactly as after it. Should finishing an
adoption fail again (a persistent error, e.g. out of memory twice), the editor is marked broken
and refuses every later call with :class:`~rlsedit_llm.errors.StateMismatchError` (reload it from
its last save).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from rlsedit_llm.adapters.spec import read_weight, write_weight
from rlsedit_llm.interrupts import deferred_interrupts
from rlsedit_llm.kernel.protocol import PendingCommit, Step

if TYPE_CHECKING:
    from rlsedit_llm.editing.editor import Editor

__all__ = ["Transaction", "Adoption"]

log = logging.getLogger(__name__)


class Adoption:
    """The last phase of a call: every layer's pending commit, then the journal and the edit
    counter (values fixed in advance). ``run`` is resumable and idempotent."""

    def __init__(self, editor: Editor, pending: list[PendingCommit], journal: list, next_id: int) -> None:
        self.editor = editor
        self.pending = pending
        self.journal = journal
        self.next_id = next_id

    def run(self) -> None:
        with deferred_interrupts():
            for commit in self.pending:
                commit.run()
            self.editor.journal_ = self.journal
            self.editor.next_id_ = self.next_id


class Transaction:
    """Context of one state-changing call of ``editor`` (see the module docstring).

    ``undo_log`` is passed to the commits made in the proposal phase (replacements);
    :meth:`adopt` ends the proposal phase.
    """

    def __init__(self, editor: Editor) -> None:
        self.editor = editor
        self.undo_log: list = []
        self.adoption: Adoption | None = None

    def __enter__(self) -> Transaction:
        editor = self.editor
        self.weights = {layer: read_weight(editor._module(layer)) for layer in editor.layers_}  # copies
        self.points = {layer: solver.checkpoint() for layer, solver in editor.solvers_.items()}
        self.journal = list(editor.journal_)
        self.next_id = editor.next_id_
        return self

    def adopt(self, steps: dict[int, Step], journal: list, next_id: int) -> None:
        """Adopt every layer's step and make ``journal`` / ``next_id`` the editor's: the point of no
        return (from here on a failure finishes the call instead of undoing it)."""
        solvers = self.editor.solvers_
        pending = [solvers[layer].begin_commit(step) for layer, step in steps.items()]  # changes nothing
        adoption = Adoption(self.editor, pending, journal, next_id)
        self.adoption = adoption
        adoption.run()

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            return
        if self.adoption is not None:
            self._finish(self.adoption, exc_type)
        else:
            self._roll_back(exc_type)

    def _finish(self, adoption: Adoption, exc_type) -> None:
        try:
            adoption.run()
        except BaseException as again:
            self.editor.ownership.broken = (f"a {exc_type.__name__} interrupted the adoption of a change and "
                                            f"finishing it failed too ({type(again).__name__}: {again})")
            raise
        log.warning("%s arrived while the change was being adopted: the change was completed first (edit ids "
                    "up to %d are in the journal)", exc_type.__name__, adoption.next_id - 1)

    def _roll_back(self, exc_type) -> None:
        editor = self.editor
        with deferred_interrupts():
            for layer, W in self.weights.items():
                write_weight(editor._module(layer), W)
            for layer, point in self.points.items():
                editor.solvers_[layer].rollback(point, self.undo_log)
            editor.journal_, editor.next_id_ = self.journal, self.next_id
        log.warning("call rolled back after %s: model and state restored", exc_type.__name__)
