"""The verified kernel: per-layer solvers of every editing method, their registry, certificates.

The layer-solver methods (``rlsedit``, ``memit``, ``memit_seq``, ``alphaedit``, ``encore``) are
:class:`~rlsedit_llm.kernel.protocol.LayerSolver` subclasses, each beside its config dataclass;
importing them registers nothing. :mod:`rlsedit_llm.editing.catalog` registers the built-in
methods, in order, when :mod:`rlsedit_llm.editing` is imported, which the registry's functions do
on their first call.
"""

from __future__ import annotations

from rlsedit_llm.kernel.method_config import MethodConfig
from rlsedit_llm.kernel.protocol import Capabilities, LayerSolver, Step
from rlsedit_llm.kernel.registry import (
    capabilities,
    config_class,
    get_method,
    is_layer_method,
    method_names,
    register,
    unregister,
)

__all__ = ["Capabilities", "LayerSolver", "Step", "MethodConfig", "register", "unregister", "get_method",
           "config_class", "method_names", "capabilities", "is_layer_method"]
