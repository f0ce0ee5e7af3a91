"""The base of every method's configuration: a frozen dataclass of the method's own hyperparameters.

Each registered method has one config class (``register(name, method_cls, config_cls)``): the
settings that belong to that method alone, e.g. AlphaEdit's null-space ``threshold`` and
``ridge``. The settings every layer-solver method shares (``alpha``, ``beta``, the anchor
statistics, the value optimisation) stay in :class:`~rlsedit_llm.EditConfig`. A layer solver takes
its config's fields as keyword arguments after ``track_information``.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from rlsedit_llm.errors import HyperparameterError

__all__ = ["MethodConfig", "check_number", "check_count", "parse_value"]

_C = TypeVar("_C", bound="MethodConfig")

#: The number checks a field can declare in :attr:`MethodConfig.checks` (``"count"`` is the other).
_NUMBER_CHECKS: dict[str, dict[str, bool]] = {
    "number": {},  # a finite number >= 0
    "positive": {"positive": True},  # a finite number > 0
    "positive or None": {"positive": True, "optional": True},
}


def check_number(owner: str, name: str, value: Any, *, positive: bool = False, optional: bool = False) -> None:
    """Refuse a setting that is not a finite real number ``>= 0`` (``> 0`` with ``positive``;
    ``None`` allowed with ``optional``), naming ``owner.name``."""
    if optional and value is None:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (positive and value == 0):
        bound = "> 0" if positive else ">= 0"
        raise HyperparameterError(f"{owner}.{name} must be a finite number {bound}"
                                  f"{' or None' if optional else ''}; got {value!r}")


def check_count(owner: str, name: str, value: Any) -> None:
    """Refuse a setting that is not an int ``>= 1``, naming ``owner.name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise HyperparameterError(f"{owner}.{name} must be an int >= 1; got {value!r}")


@dataclass(frozen=True)
class MethodConfig:
    """Base of a method's frozen config dataclass (no fields of its own).

    A subclass lists its hyperparameters as fields with their published defaults and declares
    their :attr:`checks` (or overrides :meth:`validate`); the helpers below read the fields, so
    nothing else is needed.
    """

    #: The registered method this config belongs to (set by each subclass).
    method: ClassVar[str] = ""
    #: Field -> its check, run in this order by :meth:`validate`: ``"number"`` (a finite number
    #: >= 0), ``"positive"`` (> 0), ``"positive or None"`` or ``"count"`` (an int >= 1).
    checks: ClassVar[Mapping[str, str]] = {}

    def validate(self) -> None:
        """Raise :class:`HyperparameterError` naming the first field that fails its :attr:`checks`."""
        owner = type(self).__name__
        for name, check in self.checks.items():
            if check == "count":
                check_count(owner, name, getattr(self, name))
            else:
                check_number(owner, name, getattr(self, name), **_NUMBER_CHECKS[check])

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """The settings this method has, in declaration order."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def build(cls: type[_C], **settings: Any) -> _C:
        """The config with ``settings`` over the defaults, validated; unknown names are refused
        with a :class:`HyperparameterError` listing the valid ones."""
        return cls._checked_names(settings)(**settings)

    def replace(self: _C, **settings: Any) -> _C:
        """A copy with ``settings`` changed, validated (unknown names refused as in :meth:`build`)."""
        self._checked_names(settings)
        return dataclasses.replace(self, **settings)

    @classmethod
    def _checked_names(cls, settings: dict) -> type:
        unknown = sorted(set(settings) - set(cls.field_names()))
        if unknown:
            valid = ", ".join(cls.field_names()) or "none"
            raise HyperparameterError(f"{cls.__name__} has no setting(s) {unknown}; "
                                      f"{cls.method or cls.__name__}'s settings: {valid}")
        return cls

    def __post_init__(self) -> None:
        self.validate()

    def to_dict(self) -> dict[str, Any]:
        """The fields as plain JSON values."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls: type[_C], data: dict[str, Any]) -> _C:
        """The config of :meth:`to_dict` (validated; unknown names refused)."""
        if not isinstance(data, dict):
            raise HyperparameterError(f"{cls.__name__} must be given as a mapping of settings; got {data!r}"[:300])
        return cls.build(**data)

    @classmethod
    def parse(cls, name: str, text: str) -> Any:
        """``text`` read as the type of field ``name`` (``"threshold", "0.02"`` -> ``0.02``)."""
        cls._checked_names({name: None})
        hints = typing.get_type_hints(cls)
        return parse_value(f"{cls.__name__}.{name}", hints[name], text)


def parse_value(what: str, annotation: Any, text: str) -> Any:
    """``text`` as a value of ``annotation`` (bool, int, float, str, or one of them ``| None``);
    :class:`HyperparameterError` naming ``what`` otherwise."""
    options = typing.get_args(annotation) if isinstance(annotation, types.UnionType) or \
        typing.get_origin(annotation) is typing.Union else (annotation,)
    if type(None) in options and text.strip().lower() in ("none", "null"):
        return None
    for kind in (bool, int, float, str):
        if kind not in options:
            continue
        if kind is bool:
            low = text.strip().lower()
            if low in ("true", "1", "yes", "on"):
                return True
            if low in ("false", "0", "no", "off"):
                return False
            continue
        try:
            return kind(text.strip()) if kind is not str else text
        except ValueError:
            continue
    names = " or ".join(getattr(o, "__name__", str(o)) for o in options)
    raise HyperparameterError(f"{what} must be {names}; got {text!r}")
