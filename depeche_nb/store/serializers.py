"""Serializers between message objects and the JSON payload stored per message."""

from __future__ import annotations

import datetime as _dt
import json
import math
import types
import typing
from typing import Any, Generic, TypeVar

import pydantic
import pydantic_core

from depeche_nb.core.errors import (
    MessageSerializationError,
    MissingMessageTypeError,
    UnknownMessageTypeError,
    UnstorablePayloadError,
)
from depeche_nb.core.messages import redefines

E = TypeVar("E")

TYPE_KEY = "__typename__"
_TYPE_KEY_IN_TEXT = '"__typename__": '


def _type_in_text(text: str) -> str | None:
    """The type name in a payload's JSON text if `"__typename__": "Name"` occurs exactly once,
    not after a backslash (then it is a key), with a name free of quotes and backslashes;
    else None. str.find, where a regex cost more than pydantic's parse of a small payload."""
    start = text.find(_TYPE_KEY_IN_TEXT)
    if start < 0 or text.find(_TYPE_KEY_IN_TEXT, start + 1) >= 0:
        return None
    if start > 0 and text[start - 1] == "\\":
        return None  # inside a string value, escaped
    value = start + len(_TYPE_KEY_IN_TEXT)
    if text[value : value + 1] != '"':
        return None
    end = text.find('"', value + 1)
    if end < 0:
        return None
    name = text[value + 1 : end]
    return None if "\\" in name else name


def _union_members(message_type: Any) -> tuple[type[pydantic.BaseModel], ...]:
    origin = typing.get_origin(message_type)
    if origin is typing.Union or origin is types.UnionType:
        members: list[type[pydantic.BaseModel]] = []
        for arg in typing.get_args(message_type):
            members.extend(_union_members(arg))
        return tuple(members)
    if isinstance(message_type, type) and issubclass(message_type, pydantic.BaseModel):
        return (message_type,)
    raise TypeError(
        f"PydanticMessageSerializer needs a pydantic model or a Union of models, got {message_type!r}"
    )


# pydantic's datetime types that are not `datetime` subclasses (they validate into one).
_PYDANTIC_DATETIMES = (
    pydantic.AwareDatetime,
    pydantic.NaiveDatetime,
    pydantic.PastDatetime,
    pydantic.FutureDatetime,
)


def _is_datetime(annotation: Any) -> bool:
    """A field annotation that holds a datetime (or None): `datetime`, `datetime | None`,
    pydantic's AwareDatetime and friends."""
    origin = typing.get_origin(annotation)
    if origin is typing.Union or origin is types.UnionType:
        members = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        return bool(members) and all(_is_datetime(member) for member in members)
    return isinstance(annotation, type) and (
        issubclass(annotation, _dt.datetime) or issubclass(annotation, _PYDANTIC_DATETIMES)
    )


def _has_none(value: object) -> bool:
    if value is None:
        return True
    if isinstance(value, dict):
        return any(_has_none(item) for item in value.values())
    if isinstance(value, list):
        return any(_has_none(item) for item in value)
    return False


def _non_finite_in(value: object, path: str) -> str | None:
    """`path` of the first NaN or infinite float under `value` (a Python dump), described."""
    if isinstance(value, float):
        return None if math.isfinite(value) else f"{path} is {value!r}"
    items: Any = ()
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, (list, tuple, set, frozenset)):
        items = enumerate(value)
    for key, item in items:
        found = _non_finite_in(item, f"{path}[{key!r}]")
        if found is not None:
            return found
    return None


class PydanticMessageSerializer(Generic[E]):
    """Stores pydantic messages as their JSON dump plus a `__typename__` discriminator.

    `message_type` may be one model or a `Union` of models; the class name is
    the discriminator, so two models of one union must not share a name.
    """

    def __init__(self, message_type: Any, aliases: dict[str, type[Any]] | None = None) -> None:
        members = _union_members(message_type)
        self.message_type = message_type
        self._by_name: dict[str, type[pydantic.BaseModel]] = {}
        for model in members:
            name = model.__name__
            if name in self._by_name and self._by_name[name] is not model:
                raise ValueError(f"two message types are both named {name!r}; names must differ")
            self._by_name[name] = model
        self._models = tuple(self._by_name.values())
        # Old type names still found in stored payloads, for renamed classes.
        self._aliases: dict[str, type[pydantic.BaseModel]] = {}
        for alias, model in (aliases or {}).items():
            if alias in self._by_name:
                raise ValueError(f"alias {alias!r} is already the name of a message type")
            if model not in self._models:
                raise ValueError(f"alias {alias!r} maps to {model!r}, which this serializer does not handle")
            self._aliases[alias] = model
        self.message_types = set(self._by_name)

    @property
    def type_names(self) -> list[str]:
        return sorted(self._by_name)

    def datetime_fields(self) -> dict[str, frozenset[str]]:
        """Stored type name (aliases too) -> the payload keys its model types as a datetime,
        so DataFrame views can give those columns a datetime dtype instead of ISO strings."""
        found: dict[str, frozenset[str]] = {}
        for name, model in (*self._by_name.items(), *self._aliases.items()):
            # serialize() dumps by field name unless the model asks for its aliases.
            by_alias = bool(model.model_config.get("serialize_by_alias"))
            found[name] = frozenset(
                (field.serialization_alias or field.alias or key) if by_alias else key
                for key, field in model.model_fields.items()
                if _is_datetime(field.annotation)
            )
        return found

    def _adopt_redefinition(self, cls: type) -> bool:
        """A re-run notebook cell defined `cls` again: from now on it is the class this
        serializer writes and reads under that name (aliases follow it)."""
        old = self._by_name.get(cls.__name__)
        if old is None or not issubclass(cls, pydantic.BaseModel) or not redefines(cls, old):
            return False
        self._by_name[cls.__name__] = cls
        self._models = tuple(self._by_name.values())
        self._aliases = {alias: cls if model is old else model for alias, model in self._aliases.items()}
        return True

    def serialize(self, message: E) -> dict[str, Any]:
        if not isinstance(message, pydantic.BaseModel) or (
            not isinstance(message, self._models) and not self._adopt_redefinition(type(message))
        ):
            raise MessageSerializationError(
                f"cannot serialise {type(message).__module__}.{type(message).__qualname__}: this "
                f"serializer handles {', '.join(self._qualified_names())}"
            )
        try:
            payload = message.model_dump(mode="json")
        except UnicodeEncodeError as exc:  # pydantic encodes keys: a lone surrogate fails here
            raise UnstorablePayloadError(f"cannot serialise {type(message).__name__}: {exc}") from exc
        except (pydantic_core.PydanticSerializationError, ValueError, TypeError) as exc:
            raise MessageSerializationError(f"cannot serialise {type(message).__name__}: {exc}") from exc
        if _has_none(payload):
            # pydantic's JSON mode writes NaN and Infinity of untyped fields as null; only
            # the Python dump still shows them.
            found = _non_finite_in(message.model_dump(), "payload")
            if found is not None:
                raise UnstorablePayloadError(
                    f"cannot serialise {type(message).__name__}: {found}, which JSON cannot "
                    "represent (pydantic would store it as null)"
                )
        if TYPE_KEY in payload:
            raise MessageSerializationError(
                f"{type(message).__name__} has a field named {TYPE_KEY!r}, which is reserved"
            )
        payload[TYPE_KEY] = type(message).__name__
        return payload

    def _qualified_names(self) -> list[str]:
        return sorted(f"{model.__module__}.{model.__qualname__}" for model in self._models)

    def deserialize_text(self, text: str) -> E:
        """Deserialize the payload's JSON text with pydantic's own parser (no dict in between).

        The type name is found in the text; PostgreSQL prints jsonb as
        `"key": value`, and a quote inside a string value is always escaped,
        so an unescaped `"__typename__": "X"` is a key. When it is not unique
        (a nested dict may have such a key) the generic path decides.
        """
        name = _type_in_text(text)
        if name is not None:
            model = self._by_name.get(name) or self._aliases.get(name)
            if model is not None and model.model_config.get("extra") != "forbid":
                try:
                    return typing.cast(E, model.model_validate_json(text))
                except pydantic.ValidationError as exc:
                    # pydantic's JSON parser stops at 200 levels of nesting, while its
                    # serialiser writes 255: such a stored payload is valid JSON, read generically.
                    if exc.errors()[0]["type"] != "json_invalid":
                        raise
        return self.deserialize(json.loads(text))

    def deserialize(self, message: dict[str, Any]) -> E:
        payload = dict(message)
        name = payload.pop(TYPE_KEY, None)
        if name is None:
            raise MissingMessageTypeError(
                f"stored payload has no {TYPE_KEY!r} key; cannot tell its message type"
            )
        model = self._by_name.get(name) or self._aliases.get(name)
        if model is None:
            raise UnknownMessageTypeError(
                f"unknown message type {name!r}; this serializer knows {', '.join(self.type_names)}"
            )
        return typing.cast(E, model.model_validate(payload))
