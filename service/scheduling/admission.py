"""Who may queue what: every admission rule in one place, counted in estimated device seconds.

A request is refused at once -- never accepted only to time out later -- when
- it alone would cost more than `max_request_s` (422 too_costly, saying how to stay under);
- its client is over the optional per-client rate limit (429 rate_limited);
- the queue holds `max_queue_s` of work or `queue_size` images, or the client already holds its share of
  the work (429 queue_full);
- the fair queue would not reach it before its deadline (429 queue_full).
Every 429 carries a `Retry-After` computed from the same estimates. `refuse_early` applies the same rules
to the cheapest request there is, before a request's body is read, so that most refusals cost no parsing.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from engine.types import BatchKey
from service.errors import QueueFull, RateLimited, TooCostly
from service.scheduling.batcher import MicroBatcher
from service.scheduling.cost import CostModel
from service.settings import Settings

ANSWER_MARGIN = 0.1  # of the timeout (at most 1 s), kept for encoding and sending the images
_MAX_BUCKETS = 10_000  # clients remembered by the rate limiter; the least recently seen go first


@dataclass
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    """A token bucket of images per client: `per_minute` refill, `burst` capacity."""

    def __init__(self, per_minute: float, burst: int, clock: Callable[[], float] = time.monotonic):
        self.rate_s = per_minute / 60.0
        self.burst = burst
        self._clock = clock
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def wait_s(self, client: str, images: int) -> float:
        """0 when `images` may go now; else the seconds until they may."""
        bucket = self._bucket(client)
        return 0.0 if bucket.tokens >= images else (images - bucket.tokens) / self.rate_s

    def take(self, client: str, images: int) -> None:
        self._bucket(client).tokens -= images

    def _bucket(self, client: str) -> _Bucket:
        now = self._clock()
        bucket = self._buckets.pop(client, None) or _Bucket(float(self.burst), now)
        bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.updated) * self.rate_s)
        bucket.updated = now
        self._buckets[client] = bucket
        while len(self._buckets) > _MAX_BUCKETS:
            self._buckets.popitem(last=False)
        return bucket


class Admission:
    def __init__(
        self, settings: Settings, batcher: MicroBatcher, clock: Callable[[], float] = time.monotonic
    ):
        self.settings = settings
        self.batcher = batcher
        self._clock = clock
        burst = settings.rate_limit_burst or settings.max_n
        self.rate = (
            RateLimiter(settings.rate_limit_per_minute, burst, clock)
            if settings.rate_limit_per_minute
            else None
        )

    def admit(
        self,
        client: str,
        key: BatchKey,
        images: int,
        deadline: float,
        size_multiple: int,
        *,
        cost_model: CostModel,
    ) -> float:
        """The request's estimated device seconds by its model's own `cost_model`, once it may be queued; else
        the refusal, raised. The queue bound counts every model's work in the same device seconds."""
        cost = cost_model.seconds(key, images)
        limit = min(self.settings.max_request_s, self.settings.request_timeout_s)
        if cost > limit:
            raise TooCostly(_too_costly(cost_model, key, images, cost, limit, size_multiple))
        # Its images are done when the batches they ride in are: count each part as a full batch.
        batch = self.settings.engine.max_batch_size
        finish = -(-images // batch) * cost_model.batch_seconds(key, batch)
        self._check(client, images, cost, finish, deadline)
        if self.rate is not None:
            self.rate.take(client, images)
        return cost

    def refuse_early(
        self, client: str, deadline: float, cheapest: Sequence[CostModel], key: BatchKey
    ) -> None:
        """Before the body is read or tokenized: raise the refusal that any request from `client` would get
        now, whatever it asks for -- priced as the cheapest there is, one image at `key`'s size (the smallest
        served) on the cheapest of the models' `cheapest` costs. Changes nothing."""
        if not cheapest:
            return
        cost = min(model.seconds(key, 1) for model in cheapest)
        finish = min(model.batch_seconds(key, self.settings.engine.max_batch_size) for model in cheapest)
        self._check(client, 1, cost, finish, deadline)

    def _check(self, client: str, images: int, cost: float, finish: float, deadline: float) -> None:
        """The refusals, in order: rate, queue (device seconds, then images), client share, deadline."""
        if self.rate is not None:
            wait = self.rate.wait_s(client, images)
            if wait > 0:
                raise RateLimited(
                    f"this client may ask for {self.settings.rate_limit_per_minute:g} images a minute "
                    f"(bursts of {self.rate.burst}); retry after the time in the Retry-After header",
                    retry_after_s=wait,
                )
        queue_limit = self.settings.queue_limit_s
        queued = self.batcher.ledger.queued_seconds
        if queued + cost > queue_limit:
            raise QueueFull(
                f"the queue holds about {queued:.1f} s of device work, and this request adds {cost:.2f} s "
                f"over the {queue_limit:g} s this server queues; retry after the time in the Retry-After header",
                retry_after_s=queued + cost - queue_limit,
            )
        self.batcher.check_room(images)
        share = self.settings.client_share * queue_limit
        mine = self.batcher.ledger.client_seconds(client)
        if mine + cost > share:
            raise QueueFull(
                f"this client already has about {mine:.1f} s of device work queued, and may hold {share:g} s; "
                "retry after the time in the Retry-After header",
                retry_after_s=mine + cost - share,
            )
        left = deadline - self._clock()
        wait = self.batcher.wait_estimate_s(client)
        # With nothing ahead it goes at once: an estimate that grew stale under load must not refuse
        # every request for ever (no batch would run to correct it).
        if wait > 0 and wait + finish > left:
            raise QueueFull(
                f"the device could not finish this request within the {self.settings.request_timeout_s:g} s "
                f"timeout (about {wait:.1f} s of work is ahead of it); retry after the time in the "
                "Retry-After header",
                retry_after_s=wait + finish - left,
            )


def device_deadline(arrived: float, timeout_s: float) -> float:
    """When a request's images must be made, so that they can still be encoded and sent in its timeout."""
    return arrived + timeout_s - min(ANSWER_MARGIN * timeout_s, 1.0)


def _too_costly(
    model: CostModel, key: BatchKey, images: int, cost: float, limit: float, multiple: int
) -> str:
    width, height = key.width, key.height
    each = cost / images
    fits = model.largest_images(key, limit)
    side = model.largest_square(key, images, limit, multiple, max(width, height))
    ways = []
    if fits >= 1:
        ways.append(f"ask for at most {fits} image{'s' if fits > 1 else ''} at {width}x{height}")
    if side is not None:
        ways.append(f"a size up to {side}x{side} for {images} image{'s' if images > 1 else ''}")
    how = " or ".join(ways) if ways else "ask for a smaller size"
    return (
        f"this request needs about {cost:.1f} s of device time ({images} x {width}x{height} at about "
        f"{each:.2f} s each); this server allows {limit:g} s per request: {how}"
    )
