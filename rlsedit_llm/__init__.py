"""rlsedit_llm: lifelong RLSEdit on Hugging Face causal language models.

    model, tok = rlsedit_llm.load_model("smollm2")
    report = rlsedit_llm.edit(model, facts, tokenizer=tok)   # later calls continue the stream
"""

from rlsedit_llm.editing.editor import EditConfig, Editor, EditRecord, EditReport, FactReport, edit, editor_of
from rlsedit_llm.errors import (
    CorpusError,
    FactError,
    HyperparameterError,
    ModelLoadError,
    NonFiniteError,
    NotPositiveDefiniteError,
    RLSEditError,
    ShapeError,
    StateMismatchError,
    UnknownEditError,
    UnsupportedArchitectureError,
)
from rlsedit_llm.pipeline.facts import Fact, as_fact, as_facts
from rlsedit_llm.adapters.architectures import ModelSpec, detect_spec, load_model
from rlsedit_llm.kernel.rls import LayerRLS
from rlsedit_llm.pipeline.values import ValueConfig

__all__ = [
    "edit",
    "editor_of",
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
    "ShapeError",
    "StateMismatchError",
    "UnknownEditError",
    "UnsupportedArchitectureError",
    "CorpusError",
]
