"""The one registry of editing methods: name -> the class that implements it.

Layer-solver methods (:class:`~rlsedit_llm.kernel.protocol.LayerSolver` subclasses) run inside
:class:`~rlsedit_llm.Editor`; editor-level methods (fine-tuning) implement the editor protocol
themselves. Every class declares its ``name`` and ``capabilities``; callers ask this module.
"""

from __future__ import annotations

from rlsedit_llm.errors import HyperparameterError
from rlsedit_llm.kernel.protocol import Capabilities, LayerSolver

__all__ = ["register", "get_method", "method_names", "capabilities", "is_layer_method"]

_METHODS: dict[str, type] = {}


def register(cls: type) -> type:
    """Class decorator: add a method under its declared ``name``."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name or not isinstance(getattr(cls, "capabilities", None), Capabilities):
        raise TypeError(f"{cls.__name__} must declare a str `name` and `capabilities: Capabilities`")
    if name in _METHODS and _METHODS[name] is not cls:
        raise ValueError(f"method {name!r} is already registered by {_METHODS[name].__qualname__}")
    _METHODS[name] = cls
    return cls


def get_method(name: str) -> type:
    """The class registered as ``name``; :class:`HyperparameterError` listing the choices otherwise."""
    try:
        return _METHODS[name]
    except (KeyError, TypeError):
        raise HyperparameterError(f"unknown method {name!r}; choose one of {sorted(_METHODS)}") from None


def method_names() -> tuple[str, ...]:
    """Every registered method, in registration order."""
    return tuple(_METHODS)


def capabilities(name: str) -> Capabilities:
    """What method ``name`` can do."""
    return get_method(name).capabilities


def is_layer_method(name: str) -> bool:
    """Whether ``name`` is a layer-solver method (run by :class:`~rlsedit_llm.Editor`)."""
    return issubclass(get_method(name), LayerSolver)
