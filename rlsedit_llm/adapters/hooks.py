"""Small, always-removed forward hooks: read a module's input or output during a forward pass.

    with capture_inputs({3: module3, 4: module4}) as seen:
        model(input_ids)
    seen[3]   # the first positional input module3 received (last call wins)

Hooks are removed in ``finally`` blocks, so an exception in the forward pass never leaves a hook
behind on the user's model.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["capture_inputs", "capture_outputs", "first_tensor", "set_requires_grad", "restore_requires_grad"]


def first_tensor(value) -> torch.Tensor:
    """A decoder layer returns a tensor (transformers >= 5) or a tuple whose first item is one."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    raise TypeError(f"expected a tensor or a tuple starting with one; got {type(value).__name__}")


@contextmanager
def capture_inputs(modules: dict, *, detach: bool = True):
    """Record the first positional (or ``hidden_states=``) input of each module; yields a dict."""
    seen: dict = {}
    handles = []

    def make(key):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs.get("hidden_states", kwargs.get("input"))
            seen[key] = x.detach() if detach else x

        return hook

    try:
        for key, module in modules.items():
            handles.append(module.register_forward_pre_hook(make(key), with_kwargs=True))
        yield seen
    finally:
        for h in handles:
            h.remove()


@contextmanager
def capture_outputs(modules: dict, *, detach: bool = True):
    """Record the output tensor (first item of a tuple output) of each module; yields a dict."""
    seen: dict = {}
    handles = []

    def make(key):
        def hook(module, args, output):
            x = first_tensor(output)
            seen[key] = x.detach() if detach else x

        return hook

    try:
        for key, module in modules.items():
            handles.append(module.register_forward_hook(make(key)))
        yield seen
    finally:
        for h in handles:
            h.remove()


def set_requires_grad(model: nn.Module, flag: bool) -> dict:
    """Set ``requires_grad`` on every parameter; return the previous flags for :func:`restore_requires_grad`."""
    previous = {}
    for name, p in model.named_parameters():
        previous[name] = p.requires_grad
        p.requires_grad_(flag)
    return previous


def restore_requires_grad(model: nn.Module, previous: dict) -> None:
    for name, p in model.named_parameters():
        if name in previous:
            p.requires_grad_(previous[name])
