"""The micro-batcher: a bounded queue of pending work that hands the device worker one batch at a time.

A batch holds items of one key (same output size), at most `max_batch_images` images, and closes
- when it is full;
- when its oldest item has waited `max_wait_s` counted from when the device was free to take it
  (the window opens at `next_batch()`, as in Ray Serve): items that queued behind a running batch
  still get a window for company, so closed-loop clients settle into full batches, not halves;
- at once when as many requests are queued as the server has lately had in flight at once
  (`expected_requests`, the recent peak): nobody else is likely to join, and waiting would only
  add latency -- a lone client would pay the window on every request. Four closed-loop clients
  still get batches of four: the peak remembers the fourth while its answer travels.
Items whose future is done (the client went away) or whose deadline passed are dropped before they
reach the device.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from functools import partial

from engine.types import GeneratedImage, GenerationRequest
from service.errors import DeadlineExceeded, QueueFull, ShuttingDown


@dataclass
class ItemResult:
    """What one work item gets back: its images, and how the batch it rode in went."""

    images: list[GeneratedImage]
    batch_id: int
    batch_images: int
    queue_wait_s: float
    timings: dict[str, float] = field(default_factory=dict)  # seconds, for the whole batch


@dataclass(eq=False)
class _Ticket:
    """One submitted request: queued while any of its items is."""

    pending_items: int


@dataclass(eq=False)
class WorkItem:
    key: Hashable
    requests: Sequence[GenerationRequest]
    future: asyncio.Future[ItemResult]
    enqueued_at: float  # monotonic
    deadline: float  # monotonic
    ticket: _Ticket = field(default_factory=lambda: _Ticket(1))
    released: bool = False  # no longer counted against the queue's capacity

    @property
    def images(self) -> int:
        return len(self.requests)


@dataclass
class Batch:
    id: int
    key: Hashable
    items: list[WorkItem]
    formed_at: float  # monotonic

    @property
    def requests(self) -> list[GenerationRequest]:
        return [request for item in self.items for request in item.requests]

    @property
    def images(self) -> int:
        return sum(item.images for item in self.items)


class BatcherClosed(Exception):
    """`next_batch` after `close()` once nothing is left: the worker's signal to stop."""


class MicroBatcher:
    """Bounded (in images, not items) queue of work items with futures; see the module docstring."""

    def __init__(
        self,
        *,
        max_batch_images: int,
        max_wait_s: float,
        capacity_images: int,
        expected_requests: Callable[[], int] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        """`expected_requests`: how many requests could be waiting together (the recent peak of
        requests in flight); None disables the early close. `clock` is for tests; deadlines passed to submit() must use it."""
        if max_batch_images < 1 or capacity_images < 1:
            raise ValueError("max_batch_images and capacity_images must be at least 1")
        self.max_batch_images = max_batch_images
        self.max_wait_s = max_wait_s
        self.capacity_images = capacity_images
        self._clock = clock
        self._expected_requests = expected_requests
        self._images_per_s: float | None = None  # device throughput, smoothed; for Retry-After
        # asyncio.Queue bounds items; the bound that protects the device is in images, kept by submit().
        self._queue: asyncio.Queue[WorkItem | None] = asyncio.Queue()
        self._groups: dict[Hashable, deque[WorkItem]] = {}
        self._pending_images = 0
        self._pending_requests = 0
        self._closed = False
        self._batch_ids = itertools.count(1)

    @property
    def pending_images(self) -> int:
        """Images admitted and not yet handed to the device (cancelled and expired ones excluded)."""
        return self._pending_images

    @property
    def closed(self) -> bool:
        return self._closed

    def record_throughput(self, images: int, seconds: float) -> None:
        """The worker reports each batch, so a 429 can say when the queue should have room again."""
        if seconds > 0:
            rate = images / seconds
            self._images_per_s = rate if self._images_per_s is None else 0.8 * self._images_per_s + 0.2 * rate

    def estimated_wait_s(self) -> float:
        """Time for the device to work through what is queued now (1 s before any batch has run)."""
        if not self._images_per_s:
            return 1.0
        return self._pending_images / self._images_per_s

    def submit(
        self, key: Hashable, requests: Sequence[GenerationRequest], deadline: float
    ) -> list[asyncio.Future[ItemResult]]:
        """Admit all of `requests` or none (QueueFull / ShuttingDown), split into items of at most one batch."""
        if self._closed:
            raise ShuttingDown("the server is shutting down and takes no new work")
        if not requests:
            raise ValueError("submit() needs at least one request")
        if self._pending_images + len(requests) > self.capacity_images:
            raise QueueFull(
                f"the queue is full ({self._pending_images} of {self.capacity_images} images waiting); "
                "retry after the time in the Retry-After header",
                retry_after_s=self.estimated_wait_s(),
            )
        loop = asyncio.get_running_loop()
        now = self._clock()
        futures: list[asyncio.Future[ItemResult]] = []
        ticket = _Ticket(pending_items=-(-len(requests) // self.max_batch_images))
        self._pending_requests += 1
        for start in range(0, len(requests), self.max_batch_images):
            chunk = list(requests[start : start + self.max_batch_images])
            item = WorkItem(key, chunk, loop.create_future(), now, deadline, ticket)
            self._pending_images += item.images
            item.future.add_done_callback(partial(self._on_done, item))
            self._queue.put_nowait(item)
            futures.append(item.future)
        return futures

    async def process(
        self, key: Hashable, requests: Sequence[GenerationRequest], deadline: float
    ) -> list[ItemResult]:
        """Submit and wait for every item; if this is cancelled or one item fails, the rest are cancelled."""
        futures = self.submit(key, requests, deadline)
        try:
            return list(await asyncio.gather(*futures))
        finally:
            for future in futures:
                future.cancel()

    async def next_batch(self) -> Batch:
        """The next batch to run; never empty. Raises BatcherClosed once closed and drained."""
        window_opens = self._clock()
        while True:
            self._move_queued_to_groups()
            now = self._clock()
            self._prune(now)
            key = self._ready_key(now, window_opens)
            if key is not None:
                return self._take(key, now)
            if not self._groups:
                if self._closed:
                    raise BatcherClosed
                self._accept(await self._queue.get())
                continue
            oldest = min(group[0].enqueued_at for group in self._groups.values())
            timeout = max(oldest, window_opens) + self.max_wait_s - now
            with suppress(asyncio.TimeoutError):
                self._accept(await asyncio.wait_for(self._queue.get(), max(timeout, 0.0)))

    def full_batch_nowait(self) -> Batch | None:
        """A full batch if one is waiting right now (the oldest first), else None; never waits."""
        self._move_queued_to_groups()
        now = self._clock()
        self._prune(now)
        full = [
            (group[0].enqueued_at, key)
            for key, group in self._groups.items()
            if sum(item.images for item in group) >= self.max_batch_images
        ]
        return self._take(min(full, key=lambda pair: pair[0])[1], now) if full else None

    def close(self) -> None:
        """Take no new work; what is queued still comes out of next_batch, without waiting to fill."""
        if not self._closed:
            self._closed = True
            self._queue.put_nowait(None)  # wakes a next_batch() waiting on an empty queue

    def fail_pending(self, make_error: Callable[[], BaseException]) -> int:
        """Fail every item not yet handed to the device; returns how many items were failed."""
        self._move_queued_to_groups()
        failed = 0
        for group in self._groups.values():
            for item in group:
                if not item.future.done():
                    item.future.set_exception(make_error())
                    failed += 1
                self._release(item)
        self._groups.clear()
        return failed

    def _on_done(self, item: WorkItem, _future: asyncio.Future[ItemResult]) -> None:
        self._release(item)  # a cancelled or expired item stops counting against capacity at once

    def _release(self, item: WorkItem) -> None:
        if not item.released:
            item.released = True
            self._pending_images -= item.images
            item.ticket.pending_items -= 1
            if item.ticket.pending_items == 0:
                self._pending_requests -= 1

    def _accept(self, item: WorkItem | None) -> None:
        if item is not None:
            self._groups.setdefault(item.key, deque()).append(item)

    def _move_queued_to_groups(self) -> None:
        while not self._queue.empty():
            self._accept(self._queue.get_nowait())

    def _prune(self, now: float) -> None:
        for key in list(self._groups):
            live: deque[WorkItem] = deque()
            for item in self._groups[key]:
                if item.future.done():
                    continue
                if now >= item.deadline:
                    waited = now - item.enqueued_at
                    item.future.set_exception(
                        DeadlineExceeded(f"the request timed out after {waited:.1f} s in the queue")
                    )
                    self._release(item)
                    continue
                live.append(item)
            if live:
                self._groups[key] = live
            else:
                del self._groups[key]

    def _ready_key(self, now: float, window_opens: float) -> Hashable | None:
        """The ready group (full, window over, nothing else to wait for, or closing) with the oldest head."""
        no_wait = self._closed or self._nobody_else_expected()
        best: tuple[float, Hashable] | None = None
        for key, group in self._groups.items():
            head = group[0].enqueued_at
            full = sum(item.images for item in group) >= self.max_batch_images
            waited = now - max(head, window_opens) >= self.max_wait_s
            if (full or no_wait or waited) and (best is None or head < best[0]):
                best = (head, key)
        return None if best is None else best[1]

    def _nobody_else_expected(self) -> bool:
        return self._expected_requests is not None and self._expected_requests() <= self._pending_requests

    def _take(self, key: Hashable, now: float) -> Batch:
        """Oldest first; later items that still fit may join, so a large item never blocks small ones."""
        taken: list[WorkItem] = []
        rest: deque[WorkItem] = deque()
        images = 0
        for item in self._groups.pop(key):
            if images + item.images <= self.max_batch_images:
                taken.append(item)
                images += item.images
                self._release(item)
            else:
                rest.append(item)
        if rest:
            self._groups[key] = rest
        return Batch(next(self._batch_ids), key, taken, now)
