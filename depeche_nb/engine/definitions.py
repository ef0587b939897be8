"""Stored definitions (DESIGN invariant 8): a name reused for something else is an error that
names the change, checked before anything of the name is created or written.

An aggregated stream records its store, wildcards and partitioner; a subscription its
aggregated stream. The first definition of a name is recorded, including names created
before definitions were recorded and streams adopted from Depeche DB (which kept none).
"""

from __future__ import annotations

import json
from typing import Any

import sqlalchemy as sa

from depeche_nb.core.errors import DefinitionChangedError, NameInUseError
from depeche_nb.postgres import definitions_table

AGGREGATED_STREAM = "aggregated stream"
SUBSCRIPTION = "subscription"
_SIMPLE = (str, int, float, bool, type(None))


def describe_partitioner(partitioner: object) -> dict[str, Any]:
    """The partitioner's class and its simple attributes: what identifies it across kernel
    restarts (a repr may hold a memory address). The class by its qualified name without the
    module: a notebook defines it in `__main__`, a worker process imports it from a module."""
    cls = type(partitioner)
    params = {
        key: value
        for key, value in sorted(getattr(partitioner, "__dict__", {}).items())
        if not key.startswith("_") and isinstance(value, _SIMPLE)
    }
    return {"class": cls.__qualname__, "params": params}


def stream_definition(wildcards: list[str], partitioner: object) -> dict[str, Any]:
    """What an aggregated stream's projection depends on; wildcards are a set."""
    return {"wildcards": sorted(wildcards), "partitioner": describe_partitioner(partitioner)}


def definition_text(wildcards: list[str], partitioner: object) -> str:
    """`stream_definition` as canonical JSON, the form a projection's checkpoint records."""
    return json.dumps(stream_definition(wildcards, partitioner), sort_keys=True)


def describe_definition(text: str) -> str:
    """A recorded definition (`definition_text`) for error messages."""
    try:
        definition = json.loads(text)
        return f"wildcards {definition['wildcards']!r}, partitioner {_show(definition['partitioner'])}"
    except (ValueError, KeyError, TypeError):
        return text


def check_aggregated_stream(
    engine: sa.Engine, name: str, store: str, wildcards: list[str], partitioner: object, *, rebuild: bool
) -> str | None:
    """Record or compare the stream's definition. When it differs and `rebuild` was given,
    the recorded owner (store): the caller rebuilds, which records the new definition when
    it switches to the new projection; None when nothing differs."""
    definition = stream_definition(wildcards, partitioner)
    owner, recorded = definitions_table.claim(engine, AGGREGATED_STREAM, name, store, definition)
    changes = []
    if owner != store:
        changes.append(f"its store is {owner!r}, not {store!r}")
    for key, what in (("wildcards", "wildcards are"), ("partitioner", "partitioner is")):
        if recorded.get(key) != definition[key]:
            changes.append(f"its {what} {_show(recorded.get(key))}, not {_show(definition[key])}")
    if not changes:
        return None
    if not rebuild:
        error = NameInUseError if owner != store else DefinitionChangedError
        raise error(
            f"aggregated stream {name!r} is already defined differently: {'; '.join(changes)}. "
            "Use another name, or pass rebuild=True to re-project the stream under this "
            "definition (its subscriptions move along). Nothing was changed"
        )
    return owner


def check_subscription(engine: sa.Engine, name: str, stream: str, *, rebuild: bool) -> bool:
    """Record or compare the subscription's stream; True when `rebuild` replaced another
    one (the caller then resets the positions)."""
    owner, _ = definitions_table.claim(engine, SUBSCRIPTION, name, stream, {})
    if owner == stream:
        return False
    if not rebuild:
        raise NameInUseError(
            f"subscription {name!r} already reads aggregated stream {owner!r}, not {stream!r}: "
            "its positions and parked messages belong to that stream. Use another subscription "
            "name, or pass rebuild=True to move it to this stream and start it over. Nothing was "
            "changed"
        )
    definitions_table.replace(engine, SUBSCRIPTION, name, stream, {})
    return True


def _show(value: object) -> str:
    if isinstance(value, dict) and "class" in value:
        params = ", ".join(f"{k}={v!r}" for k, v in value.get("params", {}).items())
        return f"{value['class']}({params})"
    return repr(value)
