"""Dataclasses as JSON objects: fields by name, nested records, unknown keys kept.

A :class:`JsonRecord` subclass is a dataclass whose fields are read from and written to a JSON
object by name, converted by their annotations (``int``, ``float``, ``str``, ``bool``, ``X | None``,
``list[X]``, ``tuple[X, ...]``, ``dict[str, X]``, ``dict[int, X]`` with string keys in JSON, and
nested records). Keys the class does not know go to its ``extra`` dict and are written back
unchanged, so a file from another version loses nothing on a round trip. Fields at None are left
out of the JSON unless the class lists them in ``_always`` (a key that is present as null); fields in
``_derived`` are not JSON keys.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Mapping
from dataclasses import fields
from typing import Any, ClassVar, TypeVar

from rlsedit_llm.errors import StateMismatchError

__all__ = ["JsonRecord", "decode", "encode", "require_object"]

R = TypeVar("R", bound="JsonRecord")


class JsonRecord:
    """Mixin of a dataclass with an ``extra: dict`` field: ``from_json`` / ``to_json``."""

    _always: ClassVar[frozenset[str]] = frozenset()
    _derived: ClassVar[frozenset[str]] = frozenset()  # fields that are not JSON keys
    extra: dict[str, Any]

    @classmethod
    def from_json(cls: type[R], data: Mapping[str, Any], **given: Any) -> R:
        """The record of the JSON object ``data`` (a typed error names the field that is wrong);
        ``given``: values of fields that are not read from ``data``."""
        require_object(cls, data)
        hints = _hints(cls)
        kwargs: dict[str, Any] = dict(given)
        extra: dict[str, Any] = {}
        for key, value in data.items():
            if key in hints and key != "extra" and key not in cls._derived:
                kwargs[key] = decode(hints[key], value, f"{cls.__name__}.{key}")
            else:
                extra[key] = value
        try:
            return cls(**kwargs, extra=extra)  # type: ignore[call-arg]
        except TypeError as exc:  # a required field is missing
            raise StateMismatchError(f"{cls.__name__}: {exc}") from None

    def to_json(self) -> dict[str, Any]:
        """The JSON object of this record (its ``extra`` keys last)."""
        out: dict[str, Any] = {}
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if f.name == "extra" or f.name in self._derived or (value is None and f.name not in self._always):
                continue
            out[f.name] = encode(value)
        out.update(self.extra)
        return out


def require_object(cls: type, data: Any) -> None:
    """Refuse ``data`` that is not a JSON object, naming the record it should have been."""
    if not isinstance(data, Mapping):
        raise StateMismatchError(f"{cls.__name__}: expected a JSON object; got {type(data).__name__}")


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def decode(tp: Any, value: Any, where: str) -> Any:
    """``value`` read from JSON as type ``tp`` (see the module's docstring)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return decode(inner[0], value, where) if len(inner) == 1 else value
    if tp is Any or tp is object:
        return value
    if isinstance(tp, type) and issubclass(tp, JsonRecord):
        return tp.from_json(value)
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise StateMismatchError(f"{where}: expected a list; got {type(value).__name__}")
        item = args[0] if args else Any
        items = [decode(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, Mapping):
            raise StateMismatchError(f"{where}: expected a JSON object; got {type(value).__name__}")
        key_type, item = args if args else (str, Any)
        try:
            keys = [key_type(k) for k in value]
        except ValueError:
            raise StateMismatchError(f"{where}: expected {key_type.__name__} keys; got {list(value)}") from None
        return {key: decode(item, v, f"{where}.{k}") for key, (k, v) in zip(keys, value.items(), strict=False)}
    if tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, tp)
    if not ok:
        raise StateMismatchError(f"{where}: expected {getattr(tp, '__name__', tp)}; got {value!r}")
    return value


def encode(value: Any) -> Any:
    """The JSON form of a field's value."""
    if isinstance(value, JsonRecord):
        return value.to_json()
    if isinstance(value, (list, tuple)):
        return [encode(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): encode(v) for k, v in value.items()}
    return value
