"""Fixtures of the engine tests."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

import depeche_nb
from depeche_nb.tools import PydanticMessageSerializer
from tests.engine.support import Env, ModuloPartitioner
from tests.support import AnyMessage


@pytest.fixture
def env(engine: sa.Engine, unique_name: str) -> Env:
    store = depeche_nb.MessageStore(
        name=unique_name, engine=engine, serializer=PydanticMessageSerializer(AnyMessage)
    )
    stream = store.aggregated_stream(
        name=f"{unique_name}_agg", partitioner=ModuloPartitioner(3), stream_wildcards=["s-%"]
    )
    return Env(engine, unique_name, store, stream)
