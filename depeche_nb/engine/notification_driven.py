"""What projectors and runners share as `RunOnNotification` handlers for the executor."""

from __future__ import annotations

from typing import Any


class NotificationDriven:
    """Runs whenever its channel is notified; wants every notification; `stop()` ends a run early.

    Subclasses set `_keep_running = True` at the start of each run, so a handler
    stopped by one executor still works when run again.
    """

    _keep_running: bool = True

    def interested_in_notification(self, notification: dict[str, Any]) -> bool:
        # Our notifications carry no payload worth filtering on: any wake-up may mean work.
        return True

    def take_notification_hint(self, notification: dict[str, Any]) -> None:
        return None

    def stop(self) -> None:
        self._keep_running = False
