"""The micro-batcher: a bounded queue of pending work that hands the device worker one batch at a time.

A batch holds items of one model and one `engine.types.BatchKey` (the size and decoder its requests
share), at most `max_batch_images` images, and closes
- when it is full;
- when its oldest item has waited `max_wait_s` counted from when the device was free to take it
  (the window opens at `next_batch()`, as in Ray Serve): items that queued behind a running batch
  still get a window for company, so closed-loop clients settle into full batches, not halves;
- at once when as many requests are queued as the server has lately had in flight at once
  (`RecentPeak`, fed by `arrival()` from the moment a request arrives): nobody else is likely to
  join, and waiting would only add latency -- a lone client would pay the window on every request.
  Four closed-loop clients still get batches of four: the peak remembers the fourth while its answer
  travels.
Items whose future is done (the client went away) or whose deadline passed are dropped before they
reach the device; the device worker looks again just before a formed batch runs (`Batch.live_items`).

Fair queueing across clients (start-time fair queueing, in estimated device seconds): an item's start
tag is `max(virtual time, its client's last finish tag)`, and its cost moves the client's finish tag
on, so one client's backlog is interleaved with everyone else's work instead of running ahead of it.
A batch comes from the ready group whose head has the smallest tag and fills in tag order.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import time
from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from functools import partial
from typing import Generic, TypeVar

from engine.types import BatchKey, GeneratedImage, GenerationRequest
from service.errors import DeadlineExceeded, QueueFull, ShuttingDown
from service.scheduling.ledger import DeviceLedger

M = TypeVar("M", bound=Hashable)  # the model a work item is for; the batcher only groups by it

PEAK_WINDOW_S = 5.0  # how long the batcher remembers that N requests were in flight at once


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
class WorkItem(Generic[M]):
    model: M  # what makes its images (the service's ServedModel; opaque here)
    requests: Sequence[GenerationRequest]
    future: asyncio.Future[ItemResult]
    enqueued_at: float  # monotonic
    deadline: float  # monotonic
    ticket: _Ticket = field(default_factory=lambda: _Ticket(1))
    client: str = ""
    request_id: str = ""
    cost_s: float = 0.0  # estimated device seconds for this item's images
    tag: float = 0.0  # fair-queue start tag
    released: bool = False  # no longer counted against the queue's capacity
    abandoned: bool = False  # its future is done; set on the event loop, read on the device thread
    trace: object = None  # its request's span context, for the batch span's links (service.tracing)

    @property
    def images(self) -> int:
        return len(self.requests)

    @property
    def group(self) -> tuple[M, BatchKey]:
        """Items of one group may share a batch: one model, one size and decoder."""
        return self.model, self.requests[0].batch_key


@dataclass
class Batch(Generic[M]):
    id: int
    model: M
    key: BatchKey  # what its requests share: size and decoder
    items: list[WorkItem[M]]
    formed_at: float  # monotonic

    @property
    def requests(self) -> list[GenerationRequest]:
        return [request for item in self.items for request in item.requests]

    @property
    def images(self) -> int:
        return sum(item.images for item in self.items)

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of its images."""
        return self.key.width, self.key.height

    @property
    def cost_s(self) -> float:
        return sum(item.cost_s for item in self.items)

    def live_items(self, now: float, seconds_for: Callable[[int], float]) -> list[WorkItem[M]]:
        """The items still worth computing: not abandoned, and able to finish before their deadline
        if the batch starts now (`seconds_for(images)` estimates the batch). Safe on the device thread."""
        # future.done() is a plain read of its state: current even before its callbacks (which set
        # `abandoned`) have run on the loop.
        live = [
            item for item in self.items if not (item.abandoned or item.future.done()) and item.deadline > now
        ]
        finish = now + seconds_for(sum(item.images for item in live)) if live else now
        return [item for item in live if item.deadline >= finish]


class BatcherClosed(Exception):
    """`next_batch` after `close()` once nothing is left: the worker's signal to stop."""


class RecentPeak:
    """Requests in flight now, and the most at once over the last one to two windows."""

    def __init__(self, window_s: float, clock: Callable[[], float] = time.monotonic):
        self.window_s = window_s
        self._clock = clock
        self.current = 0
        self._peak = 0  # in the window that began at _since
        self._previous_peak = 0  # in the window before it
        self._since = clock()

    def enter(self) -> None:
        self._roll()
        self.current += 1
        self._peak = max(self._peak, self.current)

    def leave(self) -> None:
        self._roll()
        self.current -= 1

    def peak(self) -> int:
        self._roll()
        return max(self._peak, self._previous_peak)

    def _roll(self) -> None:
        elapsed = self._clock() - self._since
        if elapsed >= self.window_s:
            self._previous_peak = self._peak if elapsed < 2 * self.window_s else self.current
            self._peak = self.current
            self._since = self._clock()


class MicroBatcher(Generic[M]):
    """Bounded (in images, not items) queue of work items with futures; see the module docstring."""

    def __init__(
        self,
        *,
        max_batch_images: int,
        max_wait_s: float,
        capacity_images: int,
        early_close: bool = False,
        clock: Callable[[], float] = time.monotonic,
        ledger: DeviceLedger | None = None,
    ):
        """`early_close`: close a batch as soon as the recent peak of requests in flight is queued
        (see `arrival()`). `clock` is for tests; deadlines passed to submit() must use it. `ledger`
        hears of every item's estimated device seconds as it is queued, taken, and done."""
        if max_batch_images < 1 or capacity_images < 1:
            raise ValueError("max_batch_images and capacity_images must be at least 1")
        self.max_batch_images = max_batch_images
        self.max_wait_s = max_wait_s
        self.capacity_images = capacity_images
        self._clock = clock
        self.in_flight = RecentPeak(PEAK_WINDOW_S, clock) if early_close else None
        # asyncio.Queue bounds items; the bound that protects the device is in images, kept by submit().
        self._queue: asyncio.Queue[WorkItem[M] | None] = asyncio.Queue()
        self._groups: dict[tuple[M, BatchKey], list[WorkItem[M]]] = {}
        self._pending_images = 0
        self._pending_requests = 0
        self.ledger = ledger or DeviceLedger()
        self._virtual = 0.0  # fair-queue virtual time: the start tag of the latest batch's head
        self._finish: dict[str, float] = {}  # each client's last finish tag
        self._closed = False
        self._batch_ids = itertools.count(1)

    @property
    def pending_images(self) -> int:
        """Images admitted and not yet handed to the device (cancelled and expired ones excluded)."""
        return self._pending_images

    def wait_estimate_s(self, client: str) -> float:
        """Estimated device seconds before a new item from `client` would start: the running batches
        and every queued item the fair queue would take first."""
        start = max(self._virtual, self._finish.get(client, self._virtual))
        ahead = sum(item.cost_s for item in self._queued_items() if item.tag <= start)
        return self.ledger.running_seconds + ahead

    def check_room(self, images: int) -> None:
        """QueueFull unless `images` more fit within the queue's capacity."""
        if self._pending_images + images > self.capacity_images:
            raise QueueFull(
                f"the queue is full ({self._pending_images} of {self.capacity_images} images waiting); "
                "retry after the time in the Retry-After header",
                retry_after_s=self.ledger.queued_seconds,
            )

    @contextmanager
    def arrival(self) -> Iterator[None]:
        """A generation request from its arrival (before its body is read) to its answer."""
        if self.in_flight is None:
            yield
            return
        self.in_flight.enter()
        try:
            yield
        finally:
            self.in_flight.leave()

    def submit(
        self,
        model: M,
        requests: Sequence[GenerationRequest],
        deadline: float,
        *,
        client: str = "",
        request_id: str = "",
        cost_s: float = 0.0,
        trace: object = None,
    ) -> list[asyncio.Future[ItemResult]]:
        """Admit all of `requests` or none (QueueFull / ShuttingDown), split into items of at most one batch.

        The requests share everything a batch must (`batch_key`: one request's images); `model` makes them.
        `cost_s` is the whole request's estimated device time, shared among its items by images."""
        if self._closed:
            raise ShuttingDown("the server is shutting down and takes no new work")
        if not requests:
            raise ValueError("submit() needs at least one request")
        if len({request.batch_key for request in requests}) != 1:
            raise ValueError("submit() takes requests that may share a batch (one batch_key)")
        self.check_room(len(requests))
        loop = asyncio.get_running_loop()
        now = self._clock()
        futures: list[asyncio.Future[ItemResult]] = []
        ticket = _Ticket(pending_items=-(-len(requests) // self.max_batch_images))
        self._pending_requests += 1
        tag = max(self._virtual, self._finish.get(client, self._virtual))
        for start in range(0, len(requests), self.max_batch_images):
            chunk = list(requests[start : start + self.max_batch_images])
            item_cost = cost_s * len(chunk) / len(requests)
            item = WorkItem(
                model, chunk, loop.create_future(), now, deadline, ticket, client, request_id, item_cost, tag
            )
            item.trace = trace
            tag += item_cost
            self._pending_images += item.images
            self.ledger.queue(client, item_cost)
            item.future.add_done_callback(partial(self._on_done, item))
            self._queue.put_nowait(item)
            futures.append(item.future)
        self._finish[client] = tag
        return futures

    @staticmethod
    async def results(futures: Sequence[asyncio.Future[ItemResult]]) -> list[ItemResult]:
        """Wait for every item `submit` made of one request; if this is cancelled or one item fails, the
        rest are cancelled (so those still queued are never computed)."""
        try:
            return list(await asyncio.gather(*futures))
        finally:
            for future in futures:
                future.cancel()

    async def next_batch(self) -> Batch[M]:
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
            oldest = min(item.enqueued_at for group in self._groups.values() for item in group)
            timeout = max(oldest, window_opens) + self.max_wait_s - now
            with suppress(asyncio.TimeoutError):
                self._accept(await asyncio.wait_for(self._queue.get(), max(timeout, 0.0)))

    def full_batch_nowait(self) -> Batch[M] | None:
        """A full batch if one is waiting right now (the fair queue's first), else None; never waits."""
        self._move_queued_to_groups()
        now = self._clock()
        self._prune(now)
        full = [
            (group[0].tag, key)
            for key, group in self._groups.items()
            if sum(item.images for item in group) >= self.max_batch_images
        ]
        return self._take(min(full, key=lambda pair: pair[0])[1], now) if full else None

    def finished(self, batch: Batch[M]) -> None:
        """The worker is done with `batch` (computed, skipped or failed): its cost leaves the estimate."""
        self.ledger.finish(batch.cost_s)

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

    def _queued_items(self) -> Iterator[WorkItem[M]]:
        for group in self._groups.values():
            yield from group
        # Items still in the asyncio queue (submitted since the last look) count too.
        yield from (item for item in self._queue._queue if item is not None)  # type: ignore[attr-defined]

    def _on_done(self, item: WorkItem[M], _future: asyncio.Future[ItemResult]) -> None:
        item.abandoned = True
        self._release(item)  # a cancelled or expired item stops counting against capacity at once

    def _release(self, item: WorkItem[M]) -> None:
        if not item.released:
            item.released = True
            self._pending_images -= item.images
            self.ledger.dequeue(item.client, item.cost_s)
            item.ticket.pending_items -= 1
            if item.ticket.pending_items == 0:
                self._pending_requests -= 1

    def _accept(self, item: WorkItem[M] | None) -> None:
        if item is not None:
            group = self._groups.setdefault(item.group, [])
            bisect.insort(group, item, key=lambda i: i.tag)

    def _move_queued_to_groups(self) -> None:
        while not self._queue.empty():
            self._accept(self._queue.get_nowait())

    def _prune(self, now: float) -> None:
        for key in list(self._groups):
            live: list[WorkItem[M]] = []
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

    def _ready_key(self, now: float, window_opens: float) -> tuple[M, BatchKey] | None:
        """The ready group (full, window over, nothing else to wait for, or closing) first in the fair queue."""
        no_wait = self._closed or self._nobody_else_expected()
        best: tuple[float, tuple[M, BatchKey]] | None = None
        for key, group in self._groups.items():
            oldest = min(item.enqueued_at for item in group)
            full = sum(item.images for item in group) >= self.max_batch_images
            waited = now - max(oldest, window_opens) >= self.max_wait_s
            if (full or no_wait or waited) and (best is None or group[0].tag < best[0]):
                best = (group[0].tag, key)
        return None if best is None else best[1]

    def _nobody_else_expected(self) -> bool:
        return self.in_flight is not None and self.in_flight.peak() <= self._pending_requests

    def _take(self, group: tuple[M, BatchKey], now: float) -> Batch[M]:
        """Fair-queue order; later items that still fit may join, so a large item never blocks small ones."""
        taken: list[WorkItem[M]] = []
        rest: list[WorkItem[M]] = []
        images = 0
        for item in self._groups.pop(group):
            if images + item.images <= self.max_batch_images:
                taken.append(item)
                images += item.images
                self._release(item)
            else:
                rest.append(item)
        if rest:
            self._groups[group] = rest
        model, key = group
        batch = Batch(next(self._batch_ids), model, key, taken, now)
        self.ledger.start(batch.cost_s)
        self._virtual = max(self._virtual, taken[0].tag)
        self._finish = {client: tag for client, tag in self._finish.items() if tag > self._virtual}
        return batch
