"""The built-in editing methods, in the order of ``method_names()`` (and of the benchmark's "all").

The one place that registers them: :func:`register_builtins` runs when :mod:`rlsedit_llm.editing`
is imported, which the registry's functions do on their first call (so the registry is never seen
empty). Importing a method's own module registers nothing. It lives on the editing floor because
the list holds the editor-level methods too; the kernel imports it only lazily, from the registry.
"""

from __future__ import annotations

from rlsedit_llm.editing.finetune import FineTuneEditor, FTConfig
from rlsedit_llm.editing.ultraedit import UltraEditConfig, UltraEditor
from rlsedit_llm.kernel.alphaedit import AlphaEditConfig, NullSpaceLayer
from rlsedit_llm.kernel.encore import EncoreConfig, EncoreLayer
from rlsedit_llm.kernel.memit import MemitConfig, PerBatchLayer
from rlsedit_llm.kernel.memit_seq import DenseCumulativeLayer, MemitSeqConfig
from rlsedit_llm.kernel.method_config import MethodConfig
from rlsedit_llm.kernel.registry import method_names, register
from rlsedit_llm.kernel.rls import LayerRLS, RLSEditConfig

__all__ = ["BUILTIN_METHODS", "register_builtins"]

#: ``(name, method class, config class)`` of every built-in method: the layer solvers, then the
#: editor-level methods.
BUILTIN_METHODS: tuple[tuple[str, type, type[MethodConfig]], ...] = (
    ("rlsedit", LayerRLS, RLSEditConfig),
    ("memit", PerBatchLayer, MemitConfig),
    ("memit_seq", DenseCumulativeLayer, MemitSeqConfig),
    ("alphaedit", NullSpaceLayer, AlphaEditConfig),
    ("encore", EncoreLayer, EncoreConfig),
    ("ft", FineTuneEditor, FTConfig),
    ("ultraedit", UltraEditor, UltraEditConfig),
)


def register_builtins() -> None:
    """Register every built-in method not registered yet, in :data:`BUILTIN_METHODS` order."""
    present = set(method_names())
    for name, method_cls, config_cls in BUILTIN_METHODS:
        if name not in present:
            register(name, method_cls, config_cls)
