"""rlsedit_llm: lifelong RLSEdit on Hugging Face causal language models.

    model, tok = rlsedit_llm.load_model("smollm2")
    report = rlsedit_llm.edit(model, facts, tokenizer=tok)   # later calls continue the stream

Importing the package is cheap: every exported name is imported from its module on first use
(PEP 562 ``__getattr__``), so ``import rlsedit_llm`` and the command line's ``--help`` load
neither torch nor transformers. ``_EXPORTS`` maps each name to its module; the ``TYPE_CHECKING``
block shows the same names to type checkers and IDEs.
"""

from __future__ import annotations

import importlib
import importlib.machinery
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rlsedit_llm.adapters.loading import load_model
    from rlsedit_llm.adapters.spec import ModelSpec, detect_spec
    from rlsedit_llm.editing.config import EditConfig
    from rlsedit_llm.editing.editor import Editor
    from rlsedit_llm.editing.finetune import FTConfig
    from rlsedit_llm.editing.folder_lock import state_lock
    from rlsedit_llm.editing.lifelong import (
        edit,
        editor_of,
        edits_disabled,
        from_pretrained,
        load_model_state,
        save_model_state,
        save_pretrained,
    )
    from rlsedit_llm.editing.methods import load_editor, make_editor
    from rlsedit_llm.editing.packs import apply_edit_pack, remove_edit_pack
    from rlsedit_llm.editing.reports import EditRecord, EditReport, FactReport
    from rlsedit_llm.editing.ultraedit import UltraEditConfig
    from rlsedit_llm.errors import (
        CorpusError,
        EditPackError,
        FactError,
        HyperparameterError,
        InsufficientMemoryError,
        ModelLoadError,
        NonFiniteError,
        NotPositiveDefiniteError,
        OwnershipError,
        PathError,
        RLSEditError,
        ShapeError,
        StateLockedError,
        StateMismatchError,
        StateWriteError,
        StreamError,
        UnknownEditError,
        UnsupportedArchitectureError,
    )
    from rlsedit_llm.kernel import Capabilities, LayerSolver, MethodConfig, capabilities, config_class, method_names
    from rlsedit_llm.kernel.alphaedit import AlphaEditConfig
    from rlsedit_llm.kernel.encore import EncoreConfig
    from rlsedit_llm.kernel.memit import MemitConfig
    from rlsedit_llm.kernel.memit_seq import MemitSeqConfig
    from rlsedit_llm.kernel.rls import LayerRLS, RLSEditConfig
    from rlsedit_llm.pipeline.facts import Fact, as_fact, as_facts, from_easyedit
    from rlsedit_llm.pipeline.values import ValueConfig

#: Exported name -> the module that defines it (imported on first access).
_EXPORTS: dict[str, str] = {
    "load_model": "rlsedit_llm.adapters.loading",
    "ModelSpec": "rlsedit_llm.adapters.spec",
    "detect_spec": "rlsedit_llm.adapters.spec",
    "EditConfig": "rlsedit_llm.editing.config",
    "Editor": "rlsedit_llm.editing.editor",
    "FTConfig": "rlsedit_llm.editing.finetune",
    "state_lock": "rlsedit_llm.editing.folder_lock",
    "edit": "rlsedit_llm.editing.lifelong",
    "editor_of": "rlsedit_llm.editing.lifelong",
    "load_model_state": "rlsedit_llm.editing.lifelong",
    "save_model_state": "rlsedit_llm.editing.lifelong",
    "save_pretrained": "rlsedit_llm.editing.lifelong",
    "from_pretrained": "rlsedit_llm.editing.lifelong",
    "edits_disabled": "rlsedit_llm.editing.lifelong",
    "load_editor": "rlsedit_llm.editing.methods",
    "make_editor": "rlsedit_llm.editing.methods",
    "apply_edit_pack": "rlsedit_llm.editing.packs",
    "remove_edit_pack": "rlsedit_llm.editing.packs",
    "EditRecord": "rlsedit_llm.editing.reports",
    "EditReport": "rlsedit_llm.editing.reports",
    "FactReport": "rlsedit_llm.editing.reports",
    "UltraEditConfig": "rlsedit_llm.editing.ultraedit",
    "CorpusError": "rlsedit_llm.errors",
    "EditPackError": "rlsedit_llm.errors",
    "FactError": "rlsedit_llm.errors",
    "HyperparameterError": "rlsedit_llm.errors",
    "InsufficientMemoryError": "rlsedit_llm.errors",
    "ModelLoadError": "rlsedit_llm.errors",
    "NonFiniteError": "rlsedit_llm.errors",
    "NotPositiveDefiniteError": "rlsedit_llm.errors",
    "OwnershipError": "rlsedit_llm.errors",
    "PathError": "rlsedit_llm.errors",
    "RLSEditError": "rlsedit_llm.errors",
    "ShapeError": "rlsedit_llm.errors",
    "StateLockedError": "rlsedit_llm.errors",
    "StateMismatchError": "rlsedit_llm.errors",
    "StateWriteError": "rlsedit_llm.errors",
    "StreamError": "rlsedit_llm.errors",
    "UnknownEditError": "rlsedit_llm.errors",
    "UnsupportedArchitectureError": "rlsedit_llm.errors",
    "Capabilities": "rlsedit_llm.kernel",
    "LayerSolver": "rlsedit_llm.kernel",
    "MethodConfig": "rlsedit_llm.kernel",
    "capabilities": "rlsedit_llm.kernel",
    "config_class": "rlsedit_llm.kernel",
    "method_names": "rlsedit_llm.kernel",
    "AlphaEditConfig": "rlsedit_llm.kernel.alphaedit",
    "EncoreConfig": "rlsedit_llm.kernel.encore",
    "MemitConfig": "rlsedit_llm.kernel.memit",
    "MemitSeqConfig": "rlsedit_llm.kernel.memit_seq",
    "LayerRLS": "rlsedit_llm.kernel.rls",
    "RLSEditConfig": "rlsedit_llm.kernel.rls",
    "Fact": "rlsedit_llm.pipeline.facts",
    "as_fact": "rlsedit_llm.pipeline.facts",
    "as_facts": "rlsedit_llm.pipeline.facts",
    "from_easyedit": "rlsedit_llm.pipeline.facts",
    "ValueConfig": "rlsedit_llm.pipeline.values",
}

__all__ = [
    "edit",
    "editor_of",
    "make_editor",
    "load_editor",
    "save_model_state",
    "load_model_state",
    "save_pretrained",
    "from_pretrained",
    "edits_disabled",
    "apply_edit_pack",
    "remove_edit_pack",
    "state_lock",
    "method_names",
    "capabilities",
    "config_class",
    "Capabilities",
    "MethodConfig",
    "RLSEditConfig",
    "MemitConfig",
    "MemitSeqConfig",
    "AlphaEditConfig",
    "EncoreConfig",
    "FTConfig",
    "UltraEditConfig",
    "LayerSolver",
    "Editor",
    "EditConfig",
    "EditReport",
    "FactReport",
    "EditRecord",
    "Fact",
    "as_fact",
    "as_facts",
    "from_easyedit",
    "load_model",
    "ModelSpec",
    "detect_spec",
    "LayerRLS",
    "ValueConfig",
    "RLSEditError",
    "FactError",
    "HyperparameterError",
    "ModelLoadError",
    "NonFiniteError",
    "NotPositiveDefiniteError",
    "InsufficientMemoryError",
    "OwnershipError",
    "ShapeError",
    "StateMismatchError",
    "StateLockedError",
    "StateWriteError",
    "StreamError",
    "PathError",
    "EditPackError",
    "UnknownEditError",
    "UnsupportedArchitectureError",
    "CorpusError",
]


def __getattr__(name: str) -> Any:
    """An exported name, imported from its module on first access (then cached in the package);
    a sub-package or module such as ``rlsedit_llm.editing``, imported on first access."""
    module = _EXPORTS.get(name)
    if module is not None:
        value = getattr(importlib.import_module(module), name)
        globals()[name] = value
        return value
    if not name.startswith("_") and importlib.machinery.PathFinder.find_spec(f"{__name__}.{name}", __path__):
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
