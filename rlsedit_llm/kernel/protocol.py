"""The layer-solver protocol every editing method's per-layer rule implements.

A solver owns the edited weights of one layer in row-key orientation ``W (d_k, d_v)`` (float32 or
float64, whatever the model's dtype) and whatever state its rule carries. Writing a batch is two
steps, so that the editor can make a whole multi-layer edit a transaction:

1. ``propose(K, V)`` computes a :class:`Step` (the new weights and new state tensors) for the batch
   ``K (u, d_k)`` with absolute targets ``V (u, d_v)`` and changes nothing;
2. ``commit(step)`` adopts it with plain attribute assignments (it cannot fail half-way).

Solvers never modify a state tensor in place: a reference snapshot (``state_dict()``) is
therefore a valid rollback point, and ``load_state_dict`` restores it without copies.

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

__all__ = ["Capabilities", "Step", "LayerSolver", "check_weights", "STATE_DTYPES"]

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
    """A computed but not yet adopted write (see :meth:`LayerSolver.propose`)."""

    W: torch.Tensor  # the new weights (d_k, d_v)
    state: dict  # attribute name -> new tensor, adopted by commit
    rows: int  # rows added (> 0) or removed (< 0)


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

    def commit(self, step: Step) -> None:
        """Adopt a step from :meth:`propose` / :meth:`propose_removal` (plain assignments)."""
        for attr, value in step.state.items():
            setattr(self, attr, value)
        self.W_ = step.W
        self.n_updates_ += 1 if step.rows > 0 else -1
        self.n_rows_ += step.rows

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
    def state_dict(self) -> dict:
        """``{"method", "dtype", "tensors": {name: tensor}, "scalars": {name: value}}``.

        Tensors are the solver's own (not copies): a valid rollback point, since solvers never
        write into a state tensor in place. Names drop the trailing ``_``.
        """
        tensors = {a.rstrip("_"): getattr(self, a) for a in self.state_tensors if getattr(self, a, None) is not None}
        scalars = {a.rstrip("_"): getattr(self, a) for a in self.state_scalars}
        return {"method": self.name, "dtype": _dtype_name(self.dtype), "tensors": tensors, "scalars": scalars}

    def load_state_dict(self, state: dict, *, device=None) -> None:
        """Adopt a state from :meth:`state_dict` (moved to ``device`` if given)."""
        if state.get("method") != self.name:
            raise HyperparameterError(f"the state is of method {state.get('method')!r}, not {self.name!r}")
        dtype = getattr(torch, state["dtype"])
        if dtype not in STATE_DTYPES:
            raise HyperparameterError(f"state dtype must be float32 or float64; got {state['dtype']!r}")
        self.dtype = dtype
        tensors = state["tensors"]
        for attr in self.state_tensors:
            t = tensors.get(attr.rstrip("_"))
            setattr(self, attr, None if t is None else t.to(device=device or t.device, dtype=dtype).contiguous())
        for attr in self.state_scalars:
            setattr(self, attr, state["scalars"][attr.rstrip("_")])

    @classmethod
    def from_state_dict(cls, state: dict, *, device=None) -> "LayerSolver":
        """A solver rebuilt from :meth:`state_dict` (on ``device`` if given)."""
        new = object.__new__(cls)
        new.load_state_dict(state, device=device)
        return new

    def clone(self) -> "LayerSolver":
        """Deep copy."""
        state = self.state_dict()
        state["tensors"] = {k: v.clone() for k, v in state["tensors"].items()}
        return type(self).from_state_dict(state)

    def __repr__(self) -> str:
        d_k, d_v = self.shape
        return (f"{type(self).__name__}(d_k={d_k}, d_v={d_v}, alpha={self.alpha:g}, beta={self.beta:g}, "
                f"dtype={self.dtype}, n_updates_={self.n_updates_})")
