"""Builds a Depeche DB 0.13 database with the *published* library (run by
tests/engine/test_adopt_depeche_db.py with a virtual environment's Python, never imported by
depeche-nb's tests).

Environment: DDB_DSN (a postgresql+psycopg2:// URL), DDB_OUT (a JSON file to write).

What it leaves behind:

* store `shop` with messages in `order-1` .. `order-5`, `audit-1`, `misc-1`;
* aggregated stream `shop_orders` over `order-%` (partitioner: number % 3), fully
  projected; aggregated stream `shop_audit` over `audit-%` (StreamNamePartitioner),
  fully projected;
* subscription `shop_mailer` on `shop_orders` (DbSubscriptionStateProvider named like
  it), half consumed: a few batches handled and acknowledged, one partition stopped
  in the middle;
* then more messages in `order-2`, `order-6` (a new stream) and `audit-1`, written but
  NOT projected;
* store `billing` with aggregated stream `billing_invoices` (StreamNamePartitioner) and
  no subscription, everything projected.

DDB_OUT receives what was handled (partition, position, message id) and the ids of the
unprojected messages.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import uuid

import pydantic
import sqlalchemy as sa
from depeche_db import MessageStore, StoredMessage
from depeche_db.tools import PydanticMessageSerializer, StreamNamePartitioner


class OrderEvent(pydantic.BaseModel):
    number: int
    text: str = ""
    message_id: uuid.UUID = pydantic.Field(default_factory=uuid.uuid4)
    occurred_at: dt.datetime = pydantic.Field(default_factory=lambda: dt.datetime.now(dt.timezone.utc))

    def get_message_id(self) -> uuid.UUID:
        return self.message_id

    def get_message_time(self) -> dt.datetime:
        return self.occurred_at


class NumberPartitioner:
    def get_partition(self, message: StoredMessage[OrderEvent]) -> int:
        return message.message.number % 3


def main() -> None:
    engine = sa.create_engine(os.environ["DDB_DSN"])
    shop = MessageStore[OrderEvent](
        name="shop", engine=engine, serializer=PydanticMessageSerializer(OrderEvent)
    )
    number = 0
    for round_ in range(6):
        for stream in ("order-1", "order-2", "order-3", "order-4", "order-5"):
            number += 1
            shop.write(stream=stream, message=OrderEvent(number=number, text=f"{stream} round {round_}"))
        if round_ % 2 == 0:
            number += 1
            shop.write(stream="audit-1", message=OrderEvent(number=number, text="audit"))
            number += 1
            shop.write(stream="misc-1", message=OrderEvent(number=number, text="never projected"))
    orders = shop.aggregated_stream(
        name="shop_orders", partitioner=NumberPartitioner(), stream_wildcards=["order-%"]
    )
    audit = shop.aggregated_stream(
        name="shop_audit", partitioner=StreamNamePartitioner(), stream_wildcards=["audit-%"]
    )
    orders.projector.update_full()
    audit.projector.update_full()

    mailer = orders.subscription(name="shop_mailer")
    handled = []
    for _ in range(4):
        for message in mailer.get_next_messages(count=4):
            handled.append(
                {
                    "partition": message.partition,
                    "position": message.position,
                    "message_id": str(message.stored_message.message_id),
                }
            )
    # One more partition stopped half-way: take two of a batch and stop.
    for i, message in enumerate(mailer.get_next_messages(count=4)):
        if i == 2:
            break
        handled.append(
            {
                "partition": message.partition,
                "position": message.position,
                "message_id": str(message.stored_message.message_id),
            }
        )

    unprojected = []
    for stream in ("order-2", "order-6", "order-2", "audit-1"):
        number += 1
        position = shop.write(stream=stream, message=OrderEvent(number=number, text="late"))
        unprojected.append(position.global_position)

    billing = MessageStore[OrderEvent](
        name="billing", engine=engine, serializer=PydanticMessageSerializer(OrderEvent)
    )
    for i in range(5):
        billing.write(stream=f"invoice-{i % 2}", message=OrderEvent(number=1000 + i))
    invoices = billing.aggregated_stream(
        name="billing_invoices", partitioner=StreamNamePartitioner(), stream_wildcards=["invoice-%"]
    )
    invoices.projector.update_full()

    with open(os.environ["DDB_OUT"], "w") as out:
        json.dump({"handled": handled, "unprojected_global_positions": unprojected}, out)
    engine.dispose()


if __name__ == "__main__":
    main()
