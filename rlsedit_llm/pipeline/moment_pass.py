"""The hooked forward pass that sums the keys ``k kᵀ`` of every edited module over a token stream.

Sequences of a :class:`~rlsedit_llm.pipeline.token_stream.Plan` are batched with right padding
and an attention mask; a forward pre-hook on each edited module takes its input
``x (B, T, d_k)`` (or ``(B·T, d_k)``: OPT runs its MLP on flattened tokens), keeps the rows of
real tokens ``a (n, d_k)`` and adds ``aᵀa`` to a float64 sum on the module's device. For families
whose prompts start with BOS (Gemma, :func:`~rlsedit_llm.adapters.spec.needs_bos`) every sequence
is run with ``Plan.bos`` in front and that position is not summed. Once every edited module has
seen the batch, the forward pass is stopped: layers above the last edited one and the LM head are
never run.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from rlsedit_llm.adapters.hooks import on_inputs, run_until_stopped
from rlsedit_llm.errors import HyperparameterError, ShapeError, UnsupportedArchitectureError
from rlsedit_llm.interrupts import poll_interrupts
from rlsedit_llm.pipeline.moments import MomentSum
from rlsedit_llm.pipeline.token_stream import Plan
from rlsedit_llm.pipeline.tokens import input_device, needs_bos, right_pad

__all__ = ["check_modules", "input_width", "module_device", "accumulate", "progress_bar"]


def progress_bar(progress: bool = True, **kwargs: Any) -> tqdm:
    """A tqdm bar (``kwargs`` are tqdm's), switched off by ``progress=False`` or by the
    ``TQDM_DISABLE`` environment variable (any non-empty value, as tqdm reads it; read at each call,
    so setting it after tqdm was imported counts too). Otherwise ``disable`` is left to tqdm, never
    forced on: a bar that passed ``disable=False`` would override ``TQDM_DISABLE``."""
    if not progress or os.environ.get("TQDM_DISABLE"):
        kwargs["disable"] = True
    return tqdm(**kwargs)


def input_width(module: nn.Module, layer: int) -> int:
    """``d_k``: the input width of an edited module, decided by module type (never by shape)."""
    if isinstance(module, nn.Linear):
        return int(module.in_features)
    from transformers.pytorch_utils import Conv1D  # GPT-2 family: weight stored (in, out)

    if isinstance(module, Conv1D):
        return int(module.weight.shape[0])
    raise UnsupportedArchitectureError(
        f"edited module of layer {layer} is a {type(module).__name__}; key statistics support "
        "torch.nn.Linear and transformers Conv1D modules"
    )


def module_device(module: nn.Module) -> torch.device:
    """Where a module's sums live: its parameters' device (the CPU for meta or mps weights)."""
    for p in module.parameters():
        return torch.device("cpu") if p.device.type in ("meta", "mps") else p.device
    return torch.device("cpu")


def check_modules(modules: Mapping[int, nn.Module]) -> dict[int, nn.Module]:
    """The edited modules sorted by layer; :class:`HyperparameterError` for none, a repeated
    module or something that is not an ``nn.Module``."""
    if not isinstance(modules, Mapping) or len(modules) == 0:
        raise HyperparameterError("no layers given: pass at least one edited layer")
    if len({id(m) for m in modules.values()}) != len(modules):
        raise HyperparameterError("two layers name the same module object")
    for layer, module in modules.items():
        if not isinstance(module, nn.Module):
            raise HyperparameterError(f"layer {layer}: expected a torch.nn.Module, got {type(module).__name__}")
    return dict(sorted(modules.items()))


def accumulate(
    model: nn.Module,
    modules: dict[int, nn.Module],
    plan: Plan,
    *,
    batch_size: int,
    dtype: torch.dtype,
    progress: bool,
    start: Mapping[int, MomentSum] | None,
    skip_sequences: int,
    shard: tuple[int, int] = (0, 1),
    on_checkpoint: Callable[[int, dict[int, MomentSum]], object] | None = None,
) -> dict[int, MomentSum]:
    """Run this shard's sequences of ``plan[skip_sequences:]`` and return the running sums.

    ``on_checkpoint(position, sums)`` is called (on every rank, in the same order) each time the
    global stream reaches a checkpoint: ``position`` sequences are then covered by the sums of
    all ranks together.
    """
    rank, world = shard
    keys = _KeySums(_start_sums(modules, start, dtype), dtype)
    # Segments of the global stream end at checkpoints; batches never straddle one, so a resumed
    # run adds exactly the same batches in the same order as an uninterrupted one.
    bounds = [skip_sequences] + [c for c in plan.checkpoints if c > skip_sequences] + [len(plan.seqs)]
    todo = [i for i in range(skip_sequences, len(plan.seqs)) if i % world == rank]
    bar = progress_bar(
        progress and rank == 0,
        total=sum(int(plan.seqs[i].numel()) for i in todo),
        unit="tok",
        desc="key statistics (computed once, then cached)",
    )
    device = input_device(model)
    bos = _bos_token(model, plan)
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with on_inputs(modules, keys.add, stop=True), torch.no_grad():
            for seg_start, seg_stop in itertools.pairwise(bounds):
                mine = [i for i in range(seg_start, seg_stop) if i % world == rank]
                for b in range(0, len(mine), batch_size):
                    poll_interrupts()  # a safe point: Ctrl-C stops the pass between batches
                    ids, mask, summed = _batch(plan, mine[b : b + batch_size], bos)
                    keys.start_batch(summed)
                    run_until_stopped(
                        model, input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False
                    )
                    keys.check_all_called(modules)
                    bar.update(int(summed.sum()))
                if on_checkpoint is not None and seg_stop < len(plan.seqs):
                    on_checkpoint(seg_stop, keys.sums)
    finally:
        for m, training in modes:
            m.training = training
        keys.masks.clear()
        bar.close()
    return keys.sums


def _start_sums(
    modules: dict[int, nn.Module], start: Mapping[int, MomentSum] | None, dtype: torch.dtype
) -> dict[int, MomentSum]:
    """Per layer the sum to add to: a copy of ``start``'s on the module's device, else zeros."""
    sums: dict[int, MomentSum] = {}
    for layer, module in modules.items():
        d_k, device = input_width(module, layer), module_device(module)
        if start is not None and layer in start:
            s = start[layer]
            if s.d_k != d_k:
                raise ShapeError(f"start sum of layer {layer} has width {s.d_k}, the module takes {d_k}")
            sums[layer] = MomentSum(s.total.to(device=device, dtype=dtype).clone(), s.count)
        else:
            sums[layer] = MomentSum.zeros(d_k, device=device, dtype=dtype)
    return sums


def _bos_token(model: nn.Module, plan: Plan) -> int | None:
    """The token put in front of every sequence (``None``: the family needs none)."""
    bos = plan.bos if needs_bos(model) else None
    if needs_bos(model) and bos is None:
        raise UnsupportedArchitectureError("this model family needs a BOS token in front of every sequence, "
                                           "but the tokenizer has no bos_token_id")
    return bos


def _batch(plan: Plan, rows: list[int], bos: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The sequences ``rows`` of ``plan`` right-padded: ``(ids, attention mask, summed)``, each
    ``(B, T)``; with ``bos`` that token leads every row, attended to but not summed."""
    ids, mask = right_pad([plan.seqs[i] for i in rows], plan.pad)  # (B, T)
    summed = mask.bool()
    if bos is not None:
        ids = torch.cat([torch.full_like(ids[:, :1], bos), ids], dim=1)
        mask = torch.cat([torch.ones_like(mask[:, :1]), mask], dim=1)
        summed = torch.cat([torch.zeros_like(summed[:, :1]), summed], dim=1)
    return ids, mask, summed


class _KeySums:
    """The pre-hook's side of the pass: adds each edited module's input rows at the summed tokens
    of the current batch to its layer's running sum, once per forward pass."""

    def __init__(self, sums: dict[int, MomentSum], dtype: torch.dtype) -> None:
        self.sums, self.dtype = sums, dtype
        self.masks: dict[torch.device, torch.Tensor] = {}  # device -> (B, T) bool of the current batch
        self.seen: set[int] = set()  # layers summed in the current forward pass

    def start_batch(self, summed: torch.Tensor) -> None:
        """Sum the tokens where ``summed`` (B, T) is true in the next forward pass."""
        self.masks.clear()
        self.masks[torch.device("cpu")] = summed
        self.seen.clear()

    def add(self, layer: int, x: torch.Tensor) -> None:  # x (B, T, d_k), or (B * T, d_k) for OPT
        """Add ``aᵀa`` of the summed rows ``a`` of ``x`` to the sum of ``layer``."""
        if layer in self.seen:
            raise UnsupportedArchitectureError(
                f"the edited module of layer {layer} is called more than once per forward pass"
            )
        acc = self.sums[layer]
        shape = self.masks[torch.device("cpu")].shape  # (B, T)
        if x.dim() == 2 and x.shape[0] == shape[0] * shape[1]:
            x = x.view(shape[0], shape[1], x.shape[-1])
        if x.dim() != 3 or tuple(x.shape[:2]) != tuple(shape):
            raise UnsupportedArchitectureError(
                f"the edited module of layer {layer} received an input of shape {tuple(x.shape)}; expected "
                f"(batch, seq, d_k) = ({shape[0]}, {shape[1]}, d_k) or flattened (batch * seq, d_k)")
        if x.device not in self.masks:
            self.masks[x.device] = self.masks[torch.device("cpu")].to(x.device)
        a = x[self.masks[x.device]].to(device=acc.total.device, dtype=self.dtype)  # (n, d_k), real tokens only
        acc.total.addmm_(a.mT, a)  # += aᵀa
        acc.count += a.shape[0]
        self.seen.add(layer)

    def check_all_called(self, modules: Mapping[int, nn.Module]) -> None:
        """Refuse a forward pass that did not reach every edited module."""
        if len(self.seen) != len(modules):
            missing = sorted(set(modules) - self.seen)
            raise UnsupportedArchitectureError(
                f"the edited modules of layers {missing} were not called in the forward pass"
            )
