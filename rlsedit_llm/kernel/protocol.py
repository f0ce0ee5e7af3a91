"""The layer-solver protocol every editing method's per-layer rule implements.

A solver owns the edited weights of one layer in row-key orientation ``W (d_k, d_v)`` (float32 or
float64, whatever the model's dtype) and whatever state its rule carries. Writing a batch is two
steps, so that the editor can make a whole multi-layer edit a transaction:

1. ``propose(K, V)`` computes a :class:`Step` for the batch ``K (u, d_k)`` with absolute targets
   ``V (u, d_v)`` and changes nothing: the new weights, new state tensors, and possibly
   symmetric rank-``u`` terms ``(attribute, F, alpha)`` to add in place (``Step.inplace``);
2. ``commit(step)`` adopts it: adds each in-place term ``alpha F F^T`` to its (square,
   symmetric) state tensor with :func:`~rlsedit_llm.kernel.inplace.symmetric_rank_update_`, then
   plain attribute assignments.

Only in-place terms change a state tensor in place (``LayerRLS`` updates its ``d_k x d_k``
``C_`` this way, so an edit holds ``O(d_k u)`` factors per layer instead of a new ``C``). A
tensor someone else may hold (handed out by ``state_dict()``, or adopted by ``load_state_dict``)
is copied before its first in-place change (copy on write), so a ``state_dict()`` stays a valid
snapshot.

A commit never stops half-way. :meth:`LayerSolver.begin_commit` does everything that can fail
(copies, the undo log) and returns a :class:`PendingCommit` whose ``run`` changes the solver: its
in-place terms are resumable (:class:`~rlsedit_llm.kernel.inplace.SymmetricRankUpdate`) and its
assignments set precomputed values, so running it again after an exception at any bytecode
finishes it exactly once. :meth:`LayerSolver.commit` runs it with Ctrl-C deferred and finishes it
before any other exception propagates.

A rollback point is :meth:`LayerSolver.checkpoint`: references to the state tensors (the solver
itself is not changed), plus an undo log (a list the caller owns) that the commits made inside
the transaction are given. :meth:`LayerSolver.rollback` takes the logged commits back, newest
first, and restores the references. A commit's in-place terms are taken back by adding
``-alpha F F^T`` (the state comes back to rounding, not bitwise); a commit with ``exact=True``
first keeps a copy of each tensor it changes (once per log, ``d_k^2`` per tensor), which the
rollback restores bitwise. A solver without in-place terms is restored bitwise either way.

What a method can do is declared by its class in :class:`Capabilities`; callers (editor,
certificates, protocol, bench) read those, never the method's name. Methods are found by name
through :mod:`rlsedit_llm.kernel.registry`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch

from rlsedit_llm.errors import HyperparameterError, NonFiniteError, ShapeError
from rlsedit_llm.interrupts import deferred_interrupts
from rlsedit_llm.kernel.inplace import SymmetricRankUpdate, finish

__all__ = ["Capabilities", "Step", "Checkpoint", "PendingCommit", "LayerSolver", "check_weights", "STATE_DTYPES"]

STATE_DTYPES = (torch.float32, torch.float64)


@dataclass(frozen=True)
class Capabilities:
    """What an editing method can do (declared by the method's class).

    retracts : it can remove an absorbed batch exactly (``undo``, replacing a fact)
    cumulative_objective : its weights are the exact minimiser of the cumulative objective
        ``J_t`` of every batch so far, so the theorems' bounds and the certificates apply
    keeps_inverse : it carries ``C_t = G_t^{-1}`` (drift certificate, Woodbury cost)

    Whether a method writes the shared pipeline's keys and values is its type: a
    :class:`LayerSolver` subclass (see :func:`rlsedit_llm.kernel.registry.is_layer_method`).
    """

    retracts: bool = False
    cumulative_objective: bool = False
    keeps_inverse: bool = False


class Step(NamedTuple):
    """A computed but not yet adopted write (see :meth:`LayerSolver.propose`).

    ``inplace``: terms ``(attribute, F (n, u), alpha)``; commit adds ``alpha F F^T`` to the
    attribute (a square symmetric tensor) in place. A step applies to the state it was proposed
    from: commit it before proposing the next one on the same solver.
    """

    W: torch.Tensor  # the new weights (d_k, d_v)
    state: dict  # attribute name -> new tensor, adopted by commit
    rows: int  # rows added (> 0) or removed (< 0)
    inplace: tuple = ()  # (attribute, F, alpha): attribute += alpha F F^T at commit


class Checkpoint(NamedTuple):
    """A rollback point of one solver (:meth:`LayerSolver.checkpoint`)."""

    state: dict  # state_dict(snapshot=False): references to the state tensors
    shared: frozenset  # the attributes to copy before their next in-place change


class PendingCommit:
    """A step being adopted by one solver (:meth:`LayerSolver.begin_commit`).

    ``run`` makes the change and is resumable: after an exception at any point, running it again
    finishes the change exactly once (the in-place terms are :class:`SymmetricRankUpdate` objects,
    the rest are assignments of values fixed in advance).
    """

    def __init__(self, solver: LayerSolver, updates: list, adopt: dict, scalars: dict, shared: frozenset) -> None:
        self.solver = solver
        self.updates = updates  # SymmetricRankUpdate per in-place term
        self.adopt = adopt  # attribute -> tensor (new weights, new state, copied-on-write targets)
        self.scalars = scalars  # n_updates_, n_rows_ after the step
        self.shared = shared
        self.started = False  # whether run() may have changed anything

    def run(self) -> None:
        self.started = True
        for update in self.updates:
            update.run()
        solver = self.solver
        for attr, value in self.adopt.items():
            setattr(solver, attr, value)
        for attr, value in self.scalars.items():
            setattr(solver, attr, value)
        solver._shared = self.shared


def _take_back(entry, log: list) -> None:
    """Take back one undo-log entry: ``("copy", solver, tensor, saved)``, ``("fresh", solver,
    tensor)`` (a private copy: dropped with the references) or ``("commit", solver, pending)``."""
    kind = entry[0]
    if kind == "copy":
        _, _solver, target, saved = entry
        target.copy_(saved)
    elif kind == "commit":
        pending = entry[2]
        if not pending.started:  # nothing was changed
            return
        pending.run()  # finish it first, so that the terms below are exactly what was added
        restored = {id(e[2]) for e in log if e[0] in ("copy", "fresh")}
        for update in reversed(pending.updates):
            if id(update.C) not in restored:  # a kept copy, or a fresh tensor dropped, restores it anyway
                SymmetricRankUpdate(update.C, update.G, -update.alpha, block=update.block).run()


def check_weights(name: str, value: float) -> float:
    """A regularisation weight: a finite number >= 0."""
    if isinstance(value, bool) or not (isinstance(value, (int, float)) and 0 <= value < float("inf")):
        raise HyperparameterError(f"{name} must be a finite number >= 0; got {value!r}")
    return float(value)


def spd_condition(S: torch.Tensor) -> float:
    """``lambda_max / lambda_min`` of a symmetric positive definite matrix (inf if singular)."""
    evals = torch.linalg.eigvalsh((S + S.mT) / 2)
    return float(evals[-1] / evals[0]) if float(evals[0]) > 0 else float("inf")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class LayerSolver(ABC):
    """Base of every method's per-layer rule (see the module docstring).

    Subclasses set ``name`` (the registry key), ``capabilities``, and the names of their
    tensor and scalar attributes in ``state_tensors`` / ``state_scalars`` (attribute names end
    in ``_`` for learned state, as in scikit-learn); :meth:`state_dict` saves exactly those.

    Common attributes: ``W0_`` (d_k, d_v) pre-edit weights, ``W_`` (d_k, d_v) current weights,
    ``dtype``, ``alpha``, ``beta``, ``n_updates_`` (batches absorbed), ``n_rows_`` (rows absorbed).
    """

    name: ClassVar[str]
    capabilities: ClassVar[Capabilities]
    state_tensors: ClassVar[tuple[str, ...]] = ("W0_", "W_")
    state_scalars: ClassVar[tuple[str, ...]] = ("alpha", "beta", "n_updates_", "n_rows_")
    _shared: frozenset = frozenset()  # tensor attributes others may hold: copied on write

    def _init_common(self, W0: torch.Tensor, alpha, beta, dtype: torch.dtype) -> None:
        if dtype not in STATE_DTYPES:
            raise HyperparameterError(f"state dtype must be float32 or float64; got {dtype}")
        self.alpha, self.beta = check_weights("alpha", alpha), check_weights("beta", beta)
        if not isinstance(W0, torch.Tensor) or W0.ndim != 2:
            raise ShapeError(f"W0 must be a 2-D tensor (d_k, d_v); got {getattr(W0, 'shape', W0)!r}")
        self.dtype = dtype
        # Row-major always (read_weight may return a transposed view): the same BLAS path, hence
        # bitwise the same results, before and after a save/load.
        self.W0_ = W0.detach().to(dtype=dtype).contiguous().clone()  # (d_k, d_v)
        if not torch.isfinite(self.W0_).all():
            raise NonFiniteError("the pre-edit weights W0 contain NaN or infinity")
        self.W_ = self.W0_.clone()
        self.n_updates_ = 0
        self.n_rows_ = 0
        self._shared = frozenset()

    @property
    def device(self) -> torch.device:
        return self.W_.device

    @property
    def shape(self) -> tuple[int, int]:
        """``(d_k, d_v)``."""
        d_k, d_v = self.W_.shape
        return d_k, d_v

    def _check(self, K: torch.Tensor, V: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``K (u, d_k)`` and ``V (u, d_v)`` moved to the state's device and dtype, finite."""
        d_k, d_v = self.shape
        if not isinstance(K, torch.Tensor) or K.ndim != 2 or K.shape[1] != d_k:
            raise ShapeError(f"K must have shape (u, {d_k}); got {tuple(getattr(K, 'shape', ()))}")
        if not isinstance(V, torch.Tensor) or V.ndim != 2 or V.shape != (K.shape[0], d_v):
            raise ShapeError(f"V must have shape ({K.shape[0]}, {d_v}); got {tuple(getattr(V, 'shape', ()))}")
        K = K.detach().to(device=self.device, dtype=self.dtype)
        V = V.detach().to(device=self.device, dtype=self.dtype)
        if not (torch.isfinite(K).all() and torch.isfinite(V).all()):
            raise NonFiniteError("K or V contains NaN or infinity")
        return K, V

    # -- the protocol ------------------------------------------------------------------------
    @abstractmethod
    def propose(self, K: torch.Tensor, V: torch.Tensor) -> Step:
        """The write of the batch ``K (u, d_k)`` with absolute targets ``V (u, d_v)``; changes nothing."""

    def propose_removal(self, K: torch.Tensor, V: torch.Tensor) -> Step:
        """The state without a batch absorbed earlier (only if ``capabilities.retracts``)."""
        raise HyperparameterError(f"method {self.name!r} keeps no exact memory of past batches: it cannot "
                                  "retract one (undo and replace need a method that retracts, e.g. 'rlsedit')")

    def begin_commit(self, step: Step, *, log: list | None = None, exact: bool = False) -> PendingCommit:
        """Prepare the adoption of a step from :meth:`propose` / :meth:`propose_removal` without
        changing the solver: copies on write (and with ``exact`` and a ``log``, a copy of each
        tensor changed in place, once per log, for a bitwise rollback). ``log``: the undo log of
        an open transaction (see :meth:`rollback`); the commit is recorded in it."""
        adopt = dict(step.state)
        adopt["W_"] = step.W
        shared = self._shared
        updates = []
        for attr, factor, alpha in step.inplace:
            target = adopt.get(attr, getattr(self, attr))
            if attr in shared:  # another holder may read it: a private copy, adopted by run()
                target = adopt[attr] = target.clone()
                shared = shared - {attr}
                if log is not None:
                    log.append(("fresh", self, target))
            elif exact and log is not None and not any(e[0] in ("copy", "fresh") and e[2] is target for e in log):
                log.append(("copy", self, target, target.clone()))
            updates.append(SymmetricRankUpdate(target, factor, alpha))
        scalars = {"n_updates_": self.n_updates_ + (1 if step.rows > 0 else -1), "n_rows_": self.n_rows_ + step.rows}
        pending = PendingCommit(self, updates, adopt, scalars, shared)
        if log is not None:
            log.append(("commit", self, pending))
        return pending

    def commit(self, step: Step, *, log: list | None = None, exact: bool = False) -> None:
        """Adopt a step from :meth:`propose` / :meth:`propose_removal`: add its in-place terms,
        then plain assignments. Never stops half-way: Ctrl-C waits until the step is adopted, and
        any other exception is raised after the step was finished (see the module docstring).
        ``log`` and ``exact`` as in :meth:`begin_commit`."""
        finish(self.begin_commit(step, log=log, exact=exact).run)

    def checkpoint(self) -> Checkpoint:
        """A rollback point: references to the state (the solver is not changed). Pass the same
        undo log to every :meth:`commit` until :meth:`rollback` (or until the transaction ends)."""
        return Checkpoint(self.state_dict(snapshot=False), self._shared)

    def rollback(self, point: Checkpoint, log: list) -> None:
        """Return to ``point``: take back this solver's commits recorded in ``log`` since, newest
        first, and restore the state's references and scalars. Ctrl-C waits until it is done."""
        with deferred_interrupts():
            mine = [e for e in log if e[1] is self]
            for entry in reversed(mine):
                _take_back(entry, mine)
            self.load_state_dict(point.state, share=False)
            self._shared = point.shared

    def update(self, K: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
        """Absorb a batch; return the new ``W_``."""
        self.commit(self.propose(K, V))
        return self.W_

    def downdate(self, K: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
        """Remove a batch absorbed earlier with absolute targets ``V``; return the new ``W_``."""
        self.commit(self.propose_removal(K, V))
        return self.W_

    @property
    def identity_weight(self) -> float:
        """The weight of ``||W - W0||_F^2`` in the objective the solver's weights minimise (its
        ``alpha``, unless the method adds its own ridge to it)."""
        return self.alpha

    def condition_number(self) -> float | None:
        """Condition number of the information ``G_t`` the method carries (None if it keeps none)."""
        return None

    # -- persistence -------------------------------------------------------------------------
    def state_dict(self, *, snapshot: bool = True) -> dict:
        """``{"method", "dtype", "tensors": {name: tensor}, "scalars": {name: value}}``.

        Tensors are the solver's own (not copies). ``snapshot=True`` (default): they stay as they
        are, a valid snapshot; the solver copies a tensor before its next in-place change (one
        copy per tensor, at the next commit). ``snapshot=False``: the live tensors, which the
        next in-place commit changes (for a caller that reads them at once, e.g. to save them).
        Names drop the trailing ``_``.
        """
        tensors = {a.rstrip("_"): getattr(self, a) for a in self.state_tensors if getattr(self, a, None) is not None}
        scalars = {a.rstrip("_"): getattr(self, a) for a in self.state_scalars}
        if snapshot:
            self._shared = frozenset(a for a in self.state_tensors if getattr(self, a, None) is not None)
        return {"method": self.name, "dtype": _dtype_name(self.dtype), "tensors": tensors, "scalars": scalars}

    def load_state_dict(self, state: dict, *, device: torch.device | str | None = None, share: bool = True) -> None:
        """Adopt a state from :meth:`state_dict` (moved to ``device`` if given).

        ``share=True`` (default): the tensors adopted as they are may be held elsewhere, so each is
        copied before its first in-place change; ``share=False``: the caller hands them over.
        """
        if state.get("method") != self.name:
            raise HyperparameterError(f"the state is of method {state.get('method')!r}, not {self.name!r}")
        dtype = getattr(torch, state["dtype"])
        if dtype not in STATE_DTYPES:
            raise HyperparameterError(f"state dtype must be float32 or float64; got {state['dtype']!r}")
        self.dtype = dtype
        tensors = state["tensors"]
        shared = set()
        for attr in self.state_tensors:
            t = tensors.get(attr.rstrip("_"))
            value = None if t is None else t.to(device=device or t.device, dtype=dtype).contiguous()
            setattr(self, attr, value)
            if share and value is not None and value is t:
                shared.add(attr)
        for attr in self.state_scalars:
            setattr(self, attr, state["scalars"][attr.rstrip("_")])
        self._shared = frozenset(shared)

    @classmethod
    def from_state_dict(cls, state: dict, *, device: torch.device | str | None = None,
                        share: bool = True) -> LayerSolver:
        """A solver rebuilt from :meth:`state_dict` (on ``device`` if given; ``share`` as in
        :meth:`load_state_dict`)."""
        new = object.__new__(cls)
        new.load_state_dict(state, device=device, share=share)
        return new

    def clone(self) -> LayerSolver:
        """Deep copy."""
        state = self.state_dict(snapshot=False)
        state["tensors"] = {k: v.clone() for k, v in state["tensors"].items()}
        return type(self).from_state_dict(state, share=False)

    def __repr__(self) -> str:
        d_k, d_v = self.shape
        return (f"{type(self).__name__}(d_k={d_k}, d_v={d_v}, alpha={self.alpha:g}, beta={self.beta:g}, "
                f"dtype={self.dtype}, n_updates_={self.n_updates_})")
