"""Where a new subscription starts reading."""

from __future__ import annotations

import datetime as _dt
from typing import Any

from depeche_nb.core.interfaces import SubscriptionStartPoint, SubscriptionStateProvider


class StartAtBeginning(SubscriptionStartPoint):
    """Every partition from position 0 (the default)."""

    def init_state(
        self, subscription_name: str, stream: Any, state_provider: SubscriptionStateProvider
    ) -> None:
        return None

    def __repr__(self) -> str:
        return "StartAtBeginning()"


class StartAtNextMessage(SubscriptionStartPoint):
    """Only messages projected after the subscription starts."""

    def init_state(
        self, subscription_name: str, stream: Any, state_provider: SubscriptionStateProvider
    ) -> None:
        for partition, head in stream.get_max_aggregated_stream_positions().items():
            state_provider.store(subscription_name, partition, head)

    def __repr__(self) -> str:
        return "StartAtNextMessage()"


class StartAtPointInTime(SubscriptionStartPoint):
    """Messages that occurred at or after `point_in_time` (timezone-aware)."""

    def __init__(self, point_in_time: _dt.datetime) -> None:
        if not isinstance(point_in_time, _dt.datetime):
            raise TypeError(f"point_in_time must be a datetime, got {type(point_in_time).__name__}")
        if point_in_time.tzinfo is None:
            raise ValueError("point_in_time must be timezone-aware (e.g. datetime.now(timezone.utc))")
        self.point_in_time = point_in_time

    def init_state(
        self, subscription_name: str, stream: Any, state_provider: SubscriptionStateProvider
    ) -> None:
        for partition, position in stream.time_to_positions(self.point_in_time).items():
            if position > 0:
                state_provider.store(subscription_name, partition, position - 1)

    def __repr__(self) -> str:
        return f"StartAtPointInTime({self.point_in_time.isoformat()})"
