"""Stored definitions (DESIGN invariant 8): a name reused for something else is an error that
names the change, checked before anything of the name is created or written.

An aggregated stream records its store, wildcards and partitioner; a subscription its
aggregated stream. The first definition of a name is recorded, including names created
before definitions were recorded and streams adopted from Depeche DB (which kept none).
"""

from __future__ import annotations

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


def check_aggregated_stream(
    engine: sa.Engine, name: str, store: str, wildcards: list[str], partitioner: object, *, rebuild: bool
) -> bool:
    """Record or compare the stream's definition; True when `rebuild` replaced a different
    one (the caller then re-projects)."""
    definition = {"wildcards": sorted(wildcards), "partitioner": describe_partitioner(partitioner)}
    owner, recorded = definitions_table.claim(engine, AGGREGATED_STREAM, name, store, definition)
    changes = []
    if owner != store:
        changes.append(f"its store is {owner!r}, not {store!r}")
    for key, what in (("wildcards", "wildcards"), ("partitioner", "partitioner")):
        if recorded.get(key) != definition[key]:
            changes.append(f"its {what} are {_show(recorded.get(key))}, not {_show(definition[key])}")
    if not changes:
        return False
    if not rebuild:
        error = NameInUseError if owner != store else DefinitionChangedError
        raise error(
            f"aggregated stream {name!r} is already defined differently: {'; '.join(changes)}. "
            "Use another name, or pass rebuild=True to record this definition and re-project the "
            "stream from scratch (then reset its subscriptions). Nothing was changed"
        )
    definitions_table.replace(engine, AGGREGATED_STREAM, name, store, definition)
    return True


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
