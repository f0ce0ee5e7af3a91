"""Small, always-removed forward hooks: read a module's input or output during a forward pass,
and stop the pass once everything needed has been read.

    with capture_inputs({3: module3, 4: module4}, stop=True) as seen:
        run_until_stopped(model, input_ids=input_ids)
    seen[3]   # the first positional input module3 received (last call wins)

``stop=True`` raises :class:`StopForward` from the hook that completes the set, so the layers
above the last captured module and the LM head never run; :func:`run_until_stopped` swallows it.
:func:`on_inputs` / :func:`on_outputs` hand each tensor to a callback instead of storing it (for
reductions such as the key statistics). Hooks are removed in ``finally`` blocks, so an exception
in the forward pass never leaves a hook behind on the user's model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

__all__ = [
    "StopForward",
    "run_until_stopped",
    "capture_inputs",
    "capture_outputs",
    "on_inputs",
    "on_outputs",
    "first_tensor",
    "requires_grad_set",
    "restore_requires_grad",
]


class StopForward(Exception):
    """Raised from a hook once everything needed has been read: the rest of the pass is skipped."""


def run_until_stopped(forward: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
    """``forward(*args, **kwargs)``; ``None`` instead of its output when a hook raised :class:`StopForward`."""
    try:
        return forward(*args, **kwargs)
    except StopForward:
        return None


def first_tensor(value: object) -> torch.Tensor:
    """A decoder layer returns a tensor (transformers >= 5) or a tuple whose first item is one."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    raise TypeError(f"expected a tensor or a tuple starting with one; got {type(value).__name__}")


def _first_input(args, kwargs) -> torch.Tensor:
    """The first positional input, else ``hidden_states=`` / ``input=``, else the first keyword tensor."""
    if args:
        return args[0]
    for name in ("hidden_states", "input"):
        if name in kwargs:
            return kwargs[name]
    return next(v for v in kwargs.values() if isinstance(v, torch.Tensor))


@contextmanager
def _hooked(modules: dict, fn, *, inputs: bool, stop: bool):
    """Call ``fn(key, tensor)`` from a hook on each module; with ``stop``, raise
    :class:`StopForward` once every key has been handed over since the last stop."""
    done: set = set()
    handles = []

    def make(key):
        def handle(x):
            fn(key, x)
            done.add(key)
            if stop and len(done) == len(modules):
                done.clear()  # the next forward pass starts a new set
                raise StopForward

        if inputs:
            return lambda module, args, kwargs: handle(_first_input(args, kwargs))
        return lambda module, args, output: handle(first_tensor(output))

    try:
        for key, module in modules.items():
            if inputs:
                handles.append(module.register_forward_pre_hook(make(key), with_kwargs=True))
            else:
                handles.append(module.register_forward_hook(make(key)))
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def on_inputs(modules: dict, fn: Callable[[Any, torch.Tensor], object], *, stop: bool = False) -> Iterator[None]:
    """Call ``fn(key, x)`` with the first positional (or ``hidden_states=``) input of each module
    ``modules[key]`` as it is called; ``stop``: see the module docstring."""
    with _hooked(modules, fn, inputs=True, stop=stop):
        yield


@contextmanager
def on_outputs(modules: dict, fn: Callable[[Any, torch.Tensor], object], *, stop: bool = False) -> Iterator[None]:
    """Call ``fn(key, y)`` with the output tensor (first item of a tuple output) of each module."""
    with _hooked(modules, fn, inputs=False, stop=stop):
        yield


@contextmanager
def capture_inputs(modules: dict, *, detach: bool = True, stop: bool = False) -> Iterator[dict]:
    """Record the first positional (or ``hidden_states=``) input of each module; yields a dict."""
    seen: dict = {}
    with on_inputs(modules, lambda key, x: seen.__setitem__(key, x.detach() if detach else x), stop=stop):
        yield seen


@contextmanager
def capture_outputs(modules: dict, *, detach: bool = True, stop: bool = False) -> Iterator[dict]:
    """Record the output tensor (first item of a tuple output) of each module; yields a dict."""
    seen: dict = {}
    with on_outputs(modules, lambda key, y: seen.__setitem__(key, y.detach() if detach else y), stop=stop):
        yield seen


@contextmanager
def requires_grad_set(model: nn.Module, flag: bool) -> Iterator[None]:
    """Set ``requires_grad`` on every parameter for the block, and put every flag back after it.
    Each flag is recorded before it is changed, inside the ``try``, so an exception at any point
    restores exactly the flags that were changed."""
    previous: dict = {}
    try:
        for name, p in model.named_parameters():
            previous[name] = p.requires_grad
            p.requires_grad_(flag)
        yield
    finally:
        restore_requires_grad(model, previous)


def restore_requires_grad(model: nn.Module, previous: dict) -> None:
    for name, p in model.named_parameters():
        if name in previous:
            p.requires_grad_(previous[name])
