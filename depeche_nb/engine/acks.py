"""Acknowledgements: how a handled message's position gets stored."""

from __future__ import annotations

from typing import Any

from depeche_nb.core.errors import AckRolledback
from depeche_nb.core.interfaces import SubscriptionStateProvider


class AckOp:
    """`SubscriptionMessage.ack`: store this message's position, optionally in the caller's
    transaction (`ack.execute(conn=conn)`), so side effects and the ack commit together."""

    def __init__(
        self,
        subscription_name: str,
        partition: int,
        position: int,
        state_provider: SubscriptionStateProvider,
        *,
        token: int | None = None,
    ) -> None:
        self.subscription_name = subscription_name
        self.partition = partition
        self.position = position
        self._state_provider = state_provider
        # The claim's fencing token: when set, the ack is refused (PartitionLostError)
        # once another runner took the partition over.
        self._token = token
        self.executed = False
        self.in_caller_transaction = False
        self._rolled_back = False

    @property
    def name(self) -> str:
        """The subscription's name (Depeche DB's attribute name)."""
        return self.subscription_name

    def rollback(self) -> None:
        """Called by a handler: do not acknowledge this message; the runner stops the batch
        here and the message is delivered again."""
        self._rolled_back = True

    @property
    def rolled_back(self) -> bool:
        return self._rolled_back

    def execute(self, **kwargs: Any) -> None:
        provider: Any = self._state_provider.session(**kwargs) if kwargs else self._state_provider
        if self._token is not None:
            provider.store_fenced(self.subscription_name, self.partition, self.position, self._token)
        else:
            provider.store(self.subscription_name, self.partition, self.position)
        self.executed = True
        self.in_caller_transaction = bool(kwargs)

    def verify(self) -> None:
        """After a caller-transaction ack: raise `AckRolledback` unless it committed."""
        stored = self._state_provider.read(self.subscription_name).positions.get(self.partition, -1)
        if stored != self.position:
            raise AckRolledback(
                f"the ack of partition {self.partition} position {self.position} did not commit"
            )


class BatchAck:
    """Messages of a batched-ack runner are acknowledged per batch, not one by one."""

    def execute(self, **kwargs: Any) -> None:
        raise RuntimeError(
            "this subscription acknowledges per batch (AckStrategy.BATCHED); "
            "use AckStrategy.SINGLE to acknowledge inside the handler's transaction"
        )
