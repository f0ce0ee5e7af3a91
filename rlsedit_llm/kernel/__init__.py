"""The verified kernel: per-layer solvers of every editing method, their registry, certificates.

Importing this package registers the layer-solver methods (``rlsedit``, ``memit``,
``memit_seq``, ``alphaedit``, ``encore``); adding one is a new module here with a registered
:class:`~rlsedit_llm.kernel.protocol.LayerSolver` subclass, imported below.
"""

# Importing the modules registers their methods, in this order (the order of "all" and of plots).
from rlsedit_llm.kernel import rls  # noqa: F401,I001
from rlsedit_llm.kernel import memit, memit_seq, alphaedit, encore  # noqa: F401,I001
from rlsedit_llm.kernel.protocol import Capabilities, LayerSolver, Step
from rlsedit_llm.kernel.registry import capabilities, get_method, is_layer_method, method_names, register

__all__ = ["Capabilities", "LayerSolver", "Step", "register", "get_method", "method_names", "capabilities",
           "is_layer_method"]
