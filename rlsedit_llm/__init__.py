"""rlsedit_llm: lifelong RLSEdit on Hugging Face causal language models.

    model, tok = rlsedit_llm.load_model("smollm2")
    report = rlsedit_llm.edit(model, facts, tokenizer=tok)   # later calls continue the stream
"""

from __future__ import annotations

from rlsedit_llm.adapters.loading import load_model
from rlsedit_llm.adapters.spec import ModelSpec, detect_spec
from rlsedit_llm.editing.config import EditConfig
from rlsedit_llm.editing.editor import Editor
from rlsedit_llm.editing.finetune import FTConfig
from rlsedit_llm.editing.folder_lock import state_lock
from rlsedit_llm.editing.lifelong import edit, editor_of, load_model_state, save_model_state
from rlsedit_llm.editing.methods import load_editor, make_editor
from rlsedit_llm.editing.packs import apply_edit_pack
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
    UnknownEditError,
    UnsupportedArchitectureError,
)
from rlsedit_llm.kernel import Capabilities, LayerSolver, MethodConfig, capabilities, config_class, method_names
from rlsedit_llm.kernel.alphaedit import AlphaEditConfig
from rlsedit_llm.kernel.encore import EncoreConfig
from rlsedit_llm.kernel.memit import MemitConfig
from rlsedit_llm.kernel.memit_seq import MemitSeqConfig
from rlsedit_llm.kernel.rls import LayerRLS, RLSEditConfig
from rlsedit_llm.pipeline.facts import Fact, as_fact, as_facts
from rlsedit_llm.pipeline.values import ValueConfig

__all__ = [
    "edit",
    "editor_of",
    "make_editor",
    "load_editor",
    "save_model_state",
    "load_model_state",
    "apply_edit_pack",
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
    "PathError",
    "EditPackError",
    "UnknownEditError",
    "UnsupportedArchitectureError",
    "CorpusError",
]
