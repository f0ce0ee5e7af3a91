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
snapshot. A rollback point is :meth:`LayerSolver.checkpoint`: references to the state tensors
plus an undo log that every later commit appends to while the checkpoint is open.
:meth:`LayerSolver.rollback` undoes the logged terms, newest first, and restores the
references; :meth:`LayerSolver.release` closes the log. A logged term is undone by adding
``-alpha F F^T`` (the state comes back to rounding, not bitwise); a commit with ``exact=True``
first keeps a copy of each tensor it changes (once per checkpoint, ``d_k^2`` per tensor), which
the rollback restores bitwise. A solver without in-place terms is restored bitwise either way.

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
from rlsedit_llm.kernel.inplace import symmetric_rank_update_

__all__ = ["Capabilities", "Step", "Checkpoint", "LayerSolver", "check_weights", "STATE_DTYPES"]

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
    mark: int  # length of the undo log when the checkpoint was taken
    outer: bool  # this checkpoint opened the log (and closes it)
    shared: frozenset  # the attributes to copy before their next in-place change


def _undo(entry) -> None:
    """Take back one undo-log entry."""
    if entry[0] == "fresh":  # a copy made during the checkpoint: the checkpoint holds the original
        return
    if entry[0] == "copy":
        _, target, saved = entry
        target.copy_(saved)
    else:
        _, target, factor, alpha = entry
        symmetric_rank_update_(target, factor, -alpha)


def check_weights(name: str, value) -> float:
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
    _undo_log = None  # a list while a checkpoint is open (an instance attribute only then)
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
        return tuple(self.W_.shape)

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

    def commit(self, step: Step, *, exact: bool = False) -> None:
        """Adopt a step from :meth:`propose` / :meth:`propose_removal`: add its in-place terms,
        then plain assignments.

        While a checkpoint is open every in-place term is logged (``O(d_k u)``); with
        ``exact=True`` a copy of each changed tensor is kept first (once per checkpoint), so that
        :meth:`rollback` restores it bitwise. If a term fails, the terms of this step already
        added are taken back (to rounding) and nothing else changes.
        """
        log = self._undo_log
        added, cloned = [], {}
        try:
            for attr, factor, alpha in step.inplace:
                target = getattr(self, attr)
                if attr in self._shared:  # another holder may read it: copy on write
                    cloned[attr] = target
                    target = target.clone()
                    setattr(self, attr, target)
                    self._shared = self._shared - {attr}
                    if log is not None:
                        log.append(("fresh", target))
                elif exact and log is not None and not any(e[0] in ("copy", "fresh") and e[1] is target for e in log):
                    log.append(("copy", target, target.clone()))
                symmetric_rank_update_(target, factor, alpha)
                added.append(("term", target, factor, alpha))
                if log is not None:
                    log.append(added[-1])
        except BaseException:
            for entry in reversed(added):
                _undo(entry)
                if log is not None:  # taken back already: not again at a rollback
                    del log[next(i for i in range(len(log) - 1, -1, -1) if log[i] is entry)]
            for attr, original in cloned.items():
                setattr(self, attr, original)
                self._shared = self._shared | {attr}
            raise
        for attr, value in step.state.items():
            setattr(self, attr, value)
        self.W_ = step.W
        self.n_updates_ += 1 if step.rows > 0 else -1
        self.n_rows_ += step.rows

    def checkpoint(self) -> Checkpoint:
        """A rollback point (see the module docstring); close it with :meth:`rollback` or
        :meth:`release`."""
        outer = self._undo_log is None
        if outer:
            self._undo_log = []
        return Checkpoint(self.state_dict(snapshot=False), len(self._undo_log), outer, self._shared)

    def rollback(self, point: Checkpoint) -> None:
        """Return to ``point``: undo the in-place terms committed since, newest first, and
        restore the state's references and scalars."""
        log = self._undo_log or []
        while len(log) > point.mark:
            _undo(log.pop())
        self.load_state_dict(point.state, share=False)
        self._shared = point.shared
        if point.outer:
            self.release(point)

    def release(self, point: Checkpoint) -> None:
        """Close ``point`` without rolling back (the commits since are kept)."""
        if point.outer:
            self.__dict__.pop("_undo_log", None)

    def update(self, K: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
        """Absorb a batch; return the new ``W_``."""
        self.commit(self.propose(K, V))
        return self.W_

    def downdate(self, K: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
        """Remove a batch absorbed earlier with absolute targets ``V``; return the new ``W_``."""
        self.commit(self.propose_removal(K, V))
        return self.W_

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

    def load_state_dict(self, state: dict, *, device=None, share: bool = True) -> None:
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
    def from_state_dict(cls, state: dict, *, device=None, share: bool = True) -> "LayerSolver":
        """A solver rebuilt from :meth:`state_dict` (on ``device`` if given; ``share`` as in
        :meth:`load_state_dict`)."""
        new = object.__new__(cls)
        new.load_state_dict(state, device=device, share=share)
        return new

    def clone(self) -> "LayerSolver":
        """Deep copy."""
        state = self.state_dict(snapshot=False)
        state["tensors"] = {k: v.clone() for k, v in state["tensors"].items()}
        return type(self).from_state_dict(state, share=False)

    def __repr__(self) -> str:
        d_k, d_v = self.shape
        return (f"{type(self).__name__}(d_k={d_k}, d_v={d_v}, alpha={self.alpha:g}, beta={self.beta:g}, "
                f"dtype={self.dtype}, n_updates_={self.n_updates_})")
