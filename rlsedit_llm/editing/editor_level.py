"""The base of the editor-level methods (``ft``, ``ultraedit``): the editor protocol's plumbing.

An editor-level method computes no keys or values and runs its own loop, but speaks the same
protocol as :class:`~rlsedit_llm.Editor`: ``edit(facts) -> EditReport``, ``weights()``,
``save``/``load``, ``layers_``, ``n_batches_``. This class holds what they share: the edited
layers (:func:`resolve_layers`), the pre-edit weights, the counters, the method's config, and
the save/load skeleton (the method's tensors, then one JSON file whose top level holds the
layers, the config's fields and the counters). A subclass writes ``edit`` and its tensor files.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Generic, NoReturn, TypeVar, overload

import torch

from rlsedit_llm.adapters.spec import ModelSpec, detect_spec, get_module, read_weight
from rlsedit_llm.editing.config import EditConfig
from rlsedit_llm.errors import HyperparameterError, StateMismatchError
from rlsedit_llm.files import atomic_write_text
from rlsedit_llm.kernel.method_config import MethodConfig
from rlsedit_llm.kernel.protocol import Capabilities

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["ConfigSetting", "EditorLevelMethod", "resolve_layers"]

_E = TypeVar("_E", bound="EditorLevelMethod")
_T = TypeVar("_T")


def resolve_layers(spec: ModelSpec, layers: Any) -> tuple[int, ...]:
    """The edited layers: ``layers`` checked against the model (distinct ascending ints in range),
    or the family's default block when None."""
    layers = tuple(layers) if layers is not None else tuple(spec.default_layers)
    if not layers or any(isinstance(l, bool) or not isinstance(l, int) or not 0 <= l < spec.n_layers for l in layers) \
            or sorted(set(layers)) != list(layers):
        raise HyperparameterError(f"layers must be distinct ascending ints in [0, {spec.n_layers}); got {layers}")
    return layers


class ConfigSetting(Generic[_T]):
    """A read-only attribute of an editor: the field of the same name of its ``method_config``,
    converted by ``kind`` (``None`` stays ``None``)."""

    def __init__(self, kind: Callable[[Any], _T]) -> None:
        self.kind, self.name = kind, ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, obj: None, owner: type | None = None) -> ConfigSetting[_T]: ...

    @overload
    def __get__(self, obj: object, owner: type | None = None) -> _T: ...

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return self
        value = getattr(obj.method_config, self.name)
        return value if value is None else self.kind(value)

    def __set__(self, obj: object, value: Any) -> NoReturn:
        raise AttributeError(f"{self.name} is a setting of the editor's method_config and cannot be set")


class EditorLevelMethod:
    """Shared plumbing of an editor-level method (see the module docstring).

    Subclasses set ``name``, ``capabilities``, ``config_cls`` (their :class:`MethodConfig`),
    ``state_file`` (the JSON file of a save), and implement ``edit``, ``_save_tensors`` and
    ``_load_tensors``; ``_save_meta`` / ``_load_meta`` add fields of their own.

    A subclass takes ``model, tokenizer`` (the causal LM to edit in place, and its tokenizer),
    ``layers`` (tuple of int or None: the edited layers; None: the family's default block, the
    same layers as :class:`~rlsedit_llm.Editor`), then the fields of its config as keywords.

    Attributes: ``method_config`` (the config), ``spec_``, ``layers_``, ``W0_`` (layer -> (d_k, d_v)
    pre-edit weights, CPU), ``n_edits_``, ``n_batches_``.
    """

    name: ClassVar[str]
    capabilities: ClassVar[Capabilities]
    config_cls: ClassVar[type[MethodConfig]]
    state_file: ClassVar[str]

    def __init__(self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, layers: Any,
                 config: MethodConfig) -> None:
        if not isinstance(config, self.config_cls):
            raise HyperparameterError(f"{self.name} takes a {self.config_cls.__name__}; got {type(config).__name__}")
        config.validate()
        self.model, self.tokenizer, self.method_config = model, tokenizer, config
        self.spec_ = detect_spec(model)
        self.layers_ = resolve_layers(self.spec_, layers)
        self.W0_ = {l: read_weight(self._module(l)).cpu() for l in self.layers_}
        self.n_edits_ = 0
        self.n_batches_ = 0
        self.report_accuracies = True  # score the prompts a fact carries in its report (EditConfig's field)

    @classmethod
    def from_config(cls: type[_E], model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase,
                    config: EditConfig) -> _E:
        """The editor on ``config.layers`` with ``config.method_config`` (None: the defaults); the
        other fields of ``config`` do not apply (no statistics, no values), except ``report_accuracies``."""
        settings = config.method_config.to_dict() if config.method_config is not None else {}
        editor = cls(model, tokenizer, layers=config.layers, **settings)
        editor.report_accuracies = config.report_accuracies
        return editor

    def _module(self, layer: int) -> torch.nn.Module:
        return get_module(self.model, self.spec_.edit_module_path.format(layer))

    def weights(self) -> dict[int, torch.Tensor]:
        """Current weights of the edited modules, ``(d_k, d_v)`` per layer."""
        return {l: read_weight(self._module(l)) for l in self.layers_}

    # -- persistence ---------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike[str]) -> None:
        """Write the method's tensors, then ``state_file`` (layers, settings, counters), each atomically."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        extra = self._save_tensors(directory)
        meta = {"layers": list(self.layers_), **self.method_config.to_dict(),
                "n_edits": self.n_edits_, "n_batches": self.n_batches_, **extra}
        atomic_write_text(directory / self.state_file, json.dumps(meta))

    @classmethod
    def load(cls: type[_E], model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase,
             directory: str | os.PathLike[str]) -> _E:
        """Restore a saved stream onto a pristine copy of the model (all or nothing)."""
        directory = Path(directory)
        try:
            meta = json.loads((directory / cls.state_file).read_text())
            settings = {k: meta[k] for k in cls.config_cls.field_names()}
            layers = meta["layers"]
        except (KeyError, TypeError, ValueError) as exc:
            raise StateMismatchError(f"{directory / cls.state_file} is not a {cls.name} state ({exc!r})") from None
        cls._check_meta(directory, meta)
        new = cls(model, tokenizer, layers=layers, **settings)
        new._load_tensors(directory, meta)
        new.n_edits_, new.n_batches_ = int(meta["n_edits"]), int(meta["n_batches"])
        return new

    @classmethod
    def _check_meta(cls, directory: Path, meta: dict) -> None:
        """Refuse a ``state_file`` this method cannot read, before anything is built."""

    def _save_tensors(self, directory: Path) -> dict:
        """Write the method's tensor file(s); return extra fields for ``state_file``."""
        raise NotImplementedError

    def _load_tensors(self, directory: Path, meta: dict) -> None:
        """Check the saved tensors against this model, then write them (all or nothing)."""
        raise NotImplementedError
