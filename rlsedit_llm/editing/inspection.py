"""What an :class:`~rlsedit_llm.Editor` can tell about its state without changing it: the memory
plan, the anchor Grams, the deviations from ``W0`` next to the bounds, and the certificate.

Functions of an editor, which its methods of the same names call; the per-layer algebra is the kernel's
(:mod:`rlsedit_llm.kernel.certificates`), which sees solvers and tensors, never the editor.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from rlsedit_llm.editing.guard import guard_of
from rlsedit_llm.errors import HyperparameterError
from rlsedit_llm.kernel.certificates import Certificate, Deviation, layer_certificate, layer_deviation
from rlsedit_llm.memory import MemoryPlan, plan

if TYPE_CHECKING:
    from rlsedit_llm.editing.editor import Editor

__all__ = ["memory_plan", "layer_rows", "anchor_grams", "deviations", "certificate"]


def memory_plan(editor: Editor, *, batch: int = 100, inplace: bool = True, replacing: bool = False,
                n_layers: int | None = None) -> MemoryPlan:
    """The :class:`~rlsedit_llm.memory.MemoryPlan` of this editor (its spec, layers, config and
    model size) for edits of ``batch`` facts; ``n_layers``: for that many of its layers (those one
    device holds) instead of all."""
    model_bytes = sum(p.numel() * p.element_size() for p in editor.model.parameters())
    n_layers = len(editor.layers_) if n_layers is None else n_layers
    return plan(editor.spec_.d_model, editor.spec_.d_k, n_layers, editor.config.state_dtype, batch=batch,
                model_bytes=model_bytes, track_information=editor.config.track_information, inplace=inplace,
                replacing=replacing)

def layer_rows(editor: Editor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every row the solver of ``layer`` holds: stacked keys ``(n, d_k)`` and absolute values
    ``(n, d_v)`` from the journal, in the state dtype on the CPU."""
    d_k, d_v = editor.solvers_[layer].shape
    dtype = editor.solvers_[layer].dtype
    Ks = [r.keys[layer] for r in editor.journal_ if layer in r.keys]
    Vs = [r.values[layer] for r in editor.journal_ if layer in r.values]
    if not Ks:
        return torch.zeros(0, d_k, dtype=dtype), torch.zeros(0, d_v, dtype=dtype)
    return torch.cat(Ks).to("cpu", dtype), torch.cat(Vs).to("cpu", dtype)

def anchor_grams(editor: Editor) -> dict[int, torch.Tensor]:
    """The anchor Gram ``N E[k k^T]`` (d_k, d_k) of every edited layer whose solver keeps one
    (all but ``alphaedit``, which keeps its projector instead), as the solver holds it.
    Prepares the editor (statistics, cached) if no edit has done so yet."""
    if not editor.solvers_:
        editor.prepare()
    return {layer: gram for layer, s in editor.solvers_.items()
            if (gram := getattr(s, "gram0_", None)) is not None}

def deviations(editor: Editor) -> dict[int, Deviation]:
    """Per edited layer, how far the weights moved from ``W0`` next to the T3 bounds
    (:func:`~rlsedit_llm.kernel.certificates.layer_deviation`; the bounds for methods that
    minimise ``J_t``). Changes nothing; ``cond(G_t)`` costs one ``d_k^3`` eigensolve per layer."""
    with guard_of(editor.model).lock:
        return {layer: layer_deviation(solver, *layer_rows(editor, layer)) for layer, solver in editor.solvers_.items()}

def certificate(editor: Editor, *, n_probes: int = 8, seed: int = 0) -> Certificate:
    """Per-layer optimality and drift certificate with the theorems' bounds
    (:mod:`rlsedit_llm.kernel.certificates`). Needs a method that minimises ``J_t``, keeps
    ``C_t`` and retracts (``rlsedit``); its capabilities say so. Changes nothing."""
    caps = editor.capabilities
    if not (caps.cumulative_objective and caps.keeps_inverse and caps.retracts):
        raise HyperparameterError(
            f"certificates need a method that minimises J_t, keeps C_t = G_t^(-1) and retracts (e.g. 'rlsedit'); "
            f"this editor uses {editor.config.method!r}")
    if isinstance(n_probes, bool) or not (isinstance(n_probes, int) and n_probes >= 1):
        raise HyperparameterError(f"n_probes must be an int >= 1; got {n_probes!r}")
    with guard_of(editor.model).lock:
        notes = [] if editor.solvers_ else ["the editor has not been prepared (no edit yet): nothing to certify"]
        held = editor.held_weights()
        layers = []
        for layer in sorted(editor.solvers_):
            solver = editor.solvers_[layer]
            if getattr(solver, "gram0_", None) is None and solver.beta > 0:
                notes.append(f"layer {layer}: the solver keeps no anchor Gram; T3b and the gradient omit the anchor")
            last = next((r for r in reversed(editor.journal_) if layer in r.keys), None)
            layers.append(layer_certificate(
                solver, *layer_rows(editor, layer), held[layer], layer=layer, n_probes=n_probes, seed=seed,
                last=None if last is None else (last.keys[layer], last.values[layer], last.edit_id)))
    return Certificate(layers, len(editor.journal_), editor.config.alpha, editor.config.beta,
                       editor.config.state_dtype, n_probes, notes)
