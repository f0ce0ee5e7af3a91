"""The one registry of editing methods: name -> the class that implements it and its config class.

Layer-solver methods (:class:`~rlsedit_llm.kernel.protocol.LayerSolver` subclasses) run inside
:class:`~rlsedit_llm.Editor`; editor-level methods (fine-tuning, UltraEdit) implement the editor
protocol themselves. Every class declares its ``name`` and ``capabilities``; callers ask this
module. Methods are added explicitly with :func:`register` (importing a method's module registers
nothing); the built-in methods are registered, in order, by :mod:`rlsedit_llm.editing.catalog`
when :mod:`rlsedit_llm.editing` is imported, which this module's functions do on their first call
(so the registry is never seen empty, whatever was imported first).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import sys
from typing import Any

from rlsedit_llm.errors import HyperparameterError
from rlsedit_llm.kernel.method_config import MethodConfig
from rlsedit_llm.kernel.protocol import Capabilities, LayerSolver

__all__ = ["register", "unregister", "get_method", "solver_class", "config_class", "method_names", "capabilities",
           "is_layer_method"]

_METHODS: dict[str, tuple[type, type[MethodConfig]]] = {}

# What a layer solver's constructor takes before its config's fields.
_SOLVER_ARGS = ("W0", "alpha", "beta", "gram0", "dtype", "track_information")


def _with_builtins() -> dict[str, tuple[type, type[MethodConfig]]]:
    """The registry, the built-in methods in it. Importing :mod:`rlsedit_llm.editing` registers
    them (its catalog); a lazy import, since the editors are built on this kernel. Once the package
    is in ``sys.modules`` (even half-imported, i.e. while it registers them) nothing is done."""
    if "rlsedit_llm.editing" not in sys.modules:
        importlib.import_module("rlsedit_llm.editing")
    return _METHODS


def register(name: str, method_cls: type, config_cls: type[MethodConfig]) -> None:
    """Add method ``name``, implemented by ``method_cls`` and configured by ``config_cls``.

    ``method_cls`` declares ``name`` (the same) and ``capabilities``; ``config_cls`` is a frozen
    :class:`MethodConfig` dataclass whose ``method`` is ``name``. A layer solver must take every
    field of its config as a keyword argument. A name already registered is refused.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"a method name must be a non-empty str; got {name!r}")
    if not isinstance(method_cls, type) or getattr(method_cls, "name", None) != name \
            or not isinstance(getattr(method_cls, "capabilities", None), Capabilities):
        raise TypeError(f"{getattr(method_cls, '__name__', method_cls)!r} must be a class declaring "
                        f"name = {name!r} and capabilities: Capabilities")
    if not (isinstance(config_cls, type) and issubclass(config_cls, MethodConfig)
            # set by @dataclass on every subclass; typeshed does not declare it
            and config_cls.__dataclass_params__.frozen  # type: ignore[attr-defined]
            and config_cls.method == name):
        raise TypeError(f"{getattr(config_cls, '__name__', config_cls)!r} must be a frozen MethodConfig dataclass "
                        f"with method = {name!r}")
    if issubclass(method_cls, LayerSolver):
        _check_solver_takes(method_cls, config_cls)
    if name in _with_builtins():
        raise HyperparameterError(f"method {name!r} is already registered (by {_METHODS[name][0].__qualname__}); "
                                  f"choose another name or unregister({name!r}) first")
    _METHODS[name] = (method_cls, config_cls)


def _check_solver_takes(solver_cls: type, config_cls: type[MethodConfig]) -> None:
    """The solver's constructor must accept each config field by keyword (how the editor passes them)."""
    params = inspect.signature(solver_cls).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    missing = [f.name for f in dataclasses.fields(config_cls) if f.name not in params or f.name in _SOLVER_ARGS]
    if missing:
        raise TypeError(f"{solver_cls.__qualname__}.__init__ must take the settings {missing} of "
                        f"{config_cls.__name__} as keyword arguments")


def unregister(name: str) -> None:
    """Remove method ``name`` (a method added for a test or a session); unknown names are refused."""
    get_method(name)
    del _METHODS[name]


def get_method(name: str) -> type:
    """The class registered as ``name``; :class:`HyperparameterError` listing the choices otherwise."""
    try:
        return _with_builtins()[name][0]
    except (KeyError, TypeError):
        raise HyperparameterError(f"unknown method {name!r}; choose one of {sorted(_METHODS)}") from None


def solver_class(name: str) -> type[LayerSolver]:
    """The :class:`LayerSolver` subclass registered as ``name``.

    :class:`HyperparameterError` for an unknown name (listing the choices, as :func:`get_method`)
    and for an editor-level method, which has no layer solver.
    """
    method_cls = get_method(name)
    if not issubclass(method_cls, LayerSolver):
        raise HyperparameterError(f"method {name!r} is not a layer-solver method and runs its own editor; "
                                  "it has no layer solver")
    return method_cls


def config_class(name: str) -> type[MethodConfig]:
    """The config dataclass of method ``name`` (its fields are the method's own settings)."""
    get_method(name)
    return _METHODS[name][1]


def method_names() -> tuple[str, ...]:
    """Every registered method, in registration order."""
    return tuple(_with_builtins())


def capabilities(name: str) -> Capabilities:
    """What method ``name`` can do."""
    method_cls: Any = get_method(name)
    return method_cls.capabilities


def is_layer_method(name: str) -> bool:
    """Whether ``name`` is a layer-solver method (run by :class:`~rlsedit_llm.Editor`)."""
    return issubclass(get_method(name), LayerSolver)
