"""The micro-batcher on its own: pure asyncio, no HTTP, no engine."""

from __future__ import annotations

import asyncio
import time

import pytest

from engine.types import BatchKey, GenerationRequest
from service.errors import DeadlineExceeded, QueueFull, ShuttingDown
from service.scheduling.batcher import Batch, BatcherClosed, ItemResult, MicroBatcher, RecentPeak

SMALL = BatchKey(64, 64)
WIDE = BatchKey(128, 64)
MODEL = "model"  # the batcher groups by model too, and treats it as opaque
FAR = 3600.0  # a deadline nobody reaches


def reqs(n: int = 1, size: tuple[int, int] = SMALL, seed: int = 0) -> list[GenerationRequest]:
    return [GenerationRequest("p", seed + i, size[0], size[1]) for i in range(n)]


def batcher(max_batch: int = 4, wait_s: float = 10.0, capacity: int = 64) -> MicroBatcher:
    return MicroBatcher(max_batch_images=max_batch, max_wait_s=wait_s, capacity_images=capacity)


def submit(
    b: MicroBatcher, n: int = 1, size: tuple[int, int] = SMALL, seed: int = 0, deadline: float | None = None
):
    return b.submit(MODEL, reqs(n, size, seed), time.monotonic() + FAR if deadline is None else deadline)


async def next_batch(b: MicroBatcher, timeout: float = 2.0) -> Batch:
    return await asyncio.wait_for(b.next_batch(), timeout)


async def test_batch_closes_as_soon_as_it_is_full() -> None:
    b = batcher(max_batch=4, wait_s=FAR)
    for seed in range(5):
        submit(b, seed=seed)
    batch = await next_batch(b)  # would hang for an hour if a full batch waited for max_wait
    assert batch.images == 4
    assert [r.seed for r in batch.requests] == [0, 1, 2, 3]
    assert b.pending_images == 1


async def test_images_not_requests_fill_a_batch() -> None:
    b = batcher(max_batch=4, wait_s=FAR)
    submit(b, n=4)
    batch = await next_batch(b)
    assert len(batch.items) == 1 and batch.images == 4


async def test_batch_closes_when_oldest_item_waited_max_wait() -> None:
    b = batcher(max_batch=4, wait_s=0.05)
    submit(b)
    started = time.monotonic()
    batch = await next_batch(b)
    assert batch.images == 1
    assert time.monotonic() - started >= 0.05 - 1e-3


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_window_opens_when_the_device_is_free_to_take_the_batch() -> None:
    clock = FakeClock()
    b = MicroBatcher(max_batch_images=4, max_wait_s=10.0, capacity_images=64, clock=clock)
    b.submit(MODEL, reqs(), clock.now + FAR)
    clock.now += 60.0  # queued behind a long batch: far past max_wait when next_batch() is called
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(b.next_batch(), 0.05)  # the clock stands still: a fresh window, not over


def expecting(requests: int, max_batch: int = 4) -> MicroBatcher:
    """A batcher that has seen `requests` in flight at once (as the app's arrival() tracks them)."""
    b = MicroBatcher(max_batch_images=max_batch, max_wait_s=FAR, capacity_images=64, early_close=True)
    assert b.in_flight is not None
    for _ in range(requests):
        b.in_flight.enter()
    return b


async def test_closes_at_once_when_as_many_requests_are_queued_as_are_expected() -> None:
    b = expecting(2)
    submit(b, seed=0)
    submit(b, n=2, seed=10)
    assert (await next_batch(b)).images == 3  # nobody else expected: no hour-long wait


async def test_waits_while_more_requests_are_expected() -> None:
    b = expecting(2)
    submit(b, n=2)  # another client was recently in flight: its next request is worth waiting for
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(b.next_batch(), 0.05)


async def test_a_request_split_over_batches_counts_as_queued_until_its_last_item_is_taken() -> None:
    b = expecting(2, max_batch=2)
    submit(b, n=3, seed=0)  # items of 2 + 1
    submit(b, seed=10)
    first = await next_batch(b)  # full
    assert first.images == 2
    second = await next_batch(b)  # both requests still queued: nobody else expected, close at once
    assert [r.seed for r in second.requests] == [2, 10]


async def test_items_arriving_during_the_wait_join_the_batch() -> None:
    b = batcher(max_batch=4, wait_s=FAR)
    submit(b, seed=0)
    task = asyncio.create_task(b.next_batch())
    await asyncio.sleep(0)  # let it start waiting on the queue
    assert not task.done()
    submit(b, n=3, seed=1)
    batch = await asyncio.wait_for(task, 2)
    assert [r.seed for r in batch.requests] == [0, 1, 2, 3]


async def test_never_mixes_sizes() -> None:
    b = batcher(max_batch=4, wait_s=0.0)
    for i in range(6):
        submit(b, size=SMALL if i % 2 == 0 else WIDE, seed=i)
    b.close()
    batches = []
    with pytest.raises(BatcherClosed):
        while True:
            batches.append(await next_batch(b))
    assert all(len({r.shape_key for r in batch.requests}) == 1 for batch in batches)
    assert sorted(r.seed for batch in batches for r in batch.requests) == list(range(6))
    assert [batch.key for batch in batches] == [SMALL, WIDE]  # the oldest group goes first


async def test_request_larger_than_a_batch_is_split_and_admitted_whole() -> None:
    b = batcher(max_batch=4, wait_s=0.0)
    futures = submit(b, n=6)
    assert len(futures) == 2 and b.pending_images == 6
    first, second = await next_batch(b), await next_batch(b)
    assert (first.images, second.images) == (4, 2)
    assert [r.seed for r in first.requests + second.requests] == list(range(6))


async def test_an_item_that_does_not_fit_does_not_hold_back_smaller_ones() -> None:
    b = batcher(max_batch=4, wait_s=0.0)
    submit(b, n=3, seed=0)
    submit(b, n=3, seed=10)
    submit(b, n=1, seed=20)
    first = await next_batch(b)
    assert [item.images for item in first.items] == [3, 1]
    second = await next_batch(b)
    assert [r.seed for r in second.requests] == [10, 11, 12]


async def test_expired_items_fail_with_504_and_never_reach_a_batch() -> None:
    b = batcher(max_batch=4, wait_s=0.0)
    (expired,) = submit(b, seed=0, deadline=time.monotonic() - 0.001)
    (live,) = submit(b, seed=1)
    batch = await next_batch(b)
    assert [r.seed for r in batch.requests] == [1]
    assert batch.items[0].future is live
    with pytest.raises(DeadlineExceeded):
        expired.result()


async def test_cancelled_items_are_skipped_and_free_their_capacity_at_once() -> None:
    b = batcher(max_batch=4, wait_s=0.0)
    (gone,) = submit(b, n=2, seed=0)
    submit(b, seed=10)
    gone.cancel()
    await asyncio.sleep(0)  # done-callbacks run on the next loop iteration
    assert b.pending_images == 1
    batch = await next_batch(b)
    assert [r.seed for r in batch.requests] == [10]


async def test_next_batch_never_returns_empty() -> None:
    b = batcher(max_batch=4, wait_s=0.0)
    (gone,) = submit(b, seed=0)
    gone.cancel()
    task = asyncio.create_task(b.next_batch())
    await asyncio.sleep(0.01)
    assert not task.done()  # only a cancelled item: nothing to run yet
    submit(b, seed=1)
    batch = await asyncio.wait_for(task, 2)
    assert [r.seed for r in batch.requests] == [1]


async def test_full_queue_refuses_the_whole_request_with_a_retry_hint() -> None:
    b = batcher(max_batch=4, capacity=4)
    (first,) = submit(b, n=3)
    with pytest.raises(QueueFull) as info:
        submit(b, n=2)
    assert int(info.value.headers["Retry-After"]) >= 1
    assert b.pending_images == 3  # nothing of the refused request was admitted
    first.cancel()
    await asyncio.sleep(0)
    submit(b, n=2)
    assert b.pending_images == 2


async def test_retry_after_is_the_queued_device_time() -> None:
    b = batcher(max_batch=4, capacity=8)
    b.submit(MODEL, reqs(8), time.monotonic() + FAR, cost_s=4.0)  # 8 images estimated at 0.5 s each
    with pytest.raises(QueueFull) as info:
        submit(b)
    assert info.value.headers["Retry-After"] == "4"


async def test_close_refuses_new_work_and_flushes_queued_work_without_waiting() -> None:
    b = batcher(max_batch=4, wait_s=FAR)
    submit(b, seed=0)
    b.close()
    with pytest.raises(ShuttingDown):
        submit(b)
    batch = await next_batch(b)  # max_wait is an hour; closing must not wait for it
    assert [r.seed for r in batch.requests] == [0]
    with pytest.raises(BatcherClosed):
        await next_batch(b)


async def test_close_wakes_a_worker_waiting_on_an_empty_queue() -> None:
    b = batcher()
    task = asyncio.create_task(b.next_batch())
    await asyncio.sleep(0)
    b.close()
    with pytest.raises(BatcherClosed):
        await asyncio.wait_for(task, 2)


async def test_fail_pending_fails_every_waiting_item() -> None:
    b = batcher(wait_s=FAR)
    futures = submit(b, seed=0) + submit(b, size=WIDE, seed=1)
    assert b.fail_pending(lambda: ShuttingDown("bye")) == 2
    for future in futures:
        with pytest.raises(ShuttingDown):
            future.result()
    assert b.pending_images == 0


async def test_process_cancels_sibling_items_when_its_caller_is_cancelled() -> None:
    b = batcher(max_batch=2, wait_s=FAR)
    task = asyncio.create_task(b.results(b.submit(MODEL, reqs(4), time.monotonic() + FAR)))
    await asyncio.sleep(0)
    assert b.pending_images == 4
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0)
    assert b.pending_images == 0


async def test_process_returns_results_in_submission_order() -> None:
    b = batcher(max_batch=2, wait_s=0.0)
    task = asyncio.create_task(b.results(b.submit(MODEL, reqs(3), time.monotonic() + FAR)))
    for _ in range(2):
        batch = await next_batch(b)
        for item in reversed(batch.items):  # resolve out of order on purpose
            item.future.set_result(ItemResult([], batch.id, batch.images, 0.0))
    results = await asyncio.wait_for(task, 2)
    assert [result.batch_images for result in results] == [2, 1]


def test_recent_peak_remembers_how_many_were_in_flight_together() -> None:
    clock = FakeClock()
    peak = RecentPeak(window_s=5.0, clock=clock)
    for _ in range(4):
        peak.enter()
    peak.leave()  # one answer on its way back to its client
    assert (peak.current, peak.peak()) == (3, 4)
    clock.now += 6.0  # next window: the previous one's peak still counts
    assert peak.peak() == 4
    for _ in range(3):
        peak.leave()
    clock.now += 6.0
    assert peak.peak() == 3  # the window that just ended began with 3 in flight
    clock.now += 6.0
    assert peak.peak() == 0  # then a whole window without traffic: forgotten
    peak.enter()
    assert peak.peak() == 1
