"""The device-seconds ledger: estimated device time admitted and not yet done, queued (by client) and
running. The batcher books work in and out as it moves; admission reads it to bound the queue and each
client's share of it, and `Retry-After` is computed from it."""

from __future__ import annotations


class DeviceLedger:
    """Event-loop only, like the batcher that keeps it."""

    def __init__(self) -> None:
        self._queued_s = 0.0  # admitted and not yet handed to the device
        self._running_s = 0.0  # handed to the device and not yet finished
        self._client_s: dict[str, float] = {}  # queued, by client

    def queue(self, client: str, seconds: float) -> None:
        """Work admitted for `client`."""
        self._queued_s += seconds
        self._client_s[client] = self._client_s.get(client, 0.0) + seconds

    def dequeue(self, client: str, seconds: float) -> None:
        """Queued work that left the queue: taken into a batch, cancelled, expired or failed."""
        self._queued_s -= seconds
        left = self._client_s.get(client, 0.0) - seconds
        if left > 1e-12:
            self._client_s[client] = left
        else:
            self._client_s.pop(client, None)

    def start(self, seconds: float) -> None:
        """A batch formed: its work is the device's now."""
        self._running_s += seconds

    def finish(self, seconds: float) -> None:
        """The device is done with a batch (computed, skipped or failed)."""
        self._running_s = max(self._running_s - seconds, 0.0)

    @property
    def running_seconds(self) -> float:
        return max(self._running_s, 0.0)

    @property
    def queued_seconds(self) -> float:
        """Everything admitted and not yet finished: queued and running."""
        return max(self._queued_s, 0.0) + self.running_seconds

    def client_seconds(self, client: str) -> float:
        """What `client` has queued."""
        return max(self._client_s.get(client, 0.0), 0.0)
