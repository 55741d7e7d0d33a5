"""Admission by estimated device cost, and the fair queue: pure asyncio, no HTTP, no engine."""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial

import pytest

from engine.types import BatchKey, Decoder, GenerationRequest
from service.errors import QueueFull, RateLimited, TooCostly
from service.scheduling.admission import Admission, RateLimiter
from service.scheduling.batcher import MicroBatcher
from service.scheduling.cost import CostModel
from service.settings import Settings

NATIVE = BatchKey(64, 64)
LARGE = BatchKey(128, 128)
MODEL = "model"
FAR = 3600.0


def reqs(n: int, size: tuple[int, int] = NATIVE, seed: int = 0) -> list[GenerationRequest]:
    return [GenerationRequest("p", seed + i, *size) for i in range(n)]


def measured(**per_image: float) -> CostModel:
    cost = CostModel()
    for name, seconds in per_image.items():
        width, height = (int(v) for v in name.removeprefix("s").split("x"))
        cost.observe(BatchKey(width, height), 4, 4 * seconds)
    return cost


def test_an_unseen_size_scales_with_the_fitted_exponent() -> None:
    cost = measured(s64x64=0.1, s128x128=0.8)  # 4x the area, 8x the time: exponent 1.5
    assert cost.seconds_per_image(BatchKey(256, 256)) == pytest.approx(0.8 * 4**1.5)
    assert cost.seconds_per_image(BatchKey(96, 96)) == pytest.approx(0.8 * (96 * 96 / 128**2) ** 1.5)
    assert cost.seconds(NATIVE, 3) == pytest.approx(0.3)


def test_the_exponent_stays_between_area_and_area_squared() -> None:
    assert measured(s64x64=0.1, s128x128=0.1).seconds_per_image(BatchKey(256, 256)) == pytest.approx(0.4)
    assert measured(s64x64=0.1, s128x128=10.0).seconds_per_image(BatchKey(256, 256)) == pytest.approx(160.0)


def test_one_measured_size_extrapolates_conservatively() -> None:
    cost = measured(s64x64=0.05)
    assert cost.seconds_per_image(BatchKey(1024, 1024)) == pytest.approx(0.05 * 256**1.5)  # minutes, not 4 s


def test_a_batch_is_estimated_from_the_closest_measured_batch_not_per_image() -> None:
    cost = CostModel()
    cost.observe(NATIVE, 1, 0.15)  # 50 ms per batch + 100 ms per image
    cost.observe(NATIVE, 4, 0.45)
    assert cost.seconds_per_image(NATIVE) == pytest.approx(0.1125)  # the busy rate, for the queue
    assert cost.batch_seconds(NATIVE, 1) == pytest.approx(0.15)  # not 0.1125: one image alone
    assert cost.batch_seconds(NATIVE, 3) == pytest.approx(0.45)  # no slower than the batch of 4
    assert cost.batch_seconds(NATIVE, 8) == pytest.approx(0.9)
    assert cost.batch_seconds(LARGE, 1) > cost.seconds(LARGE, 1)  # never measured: a margin on top


def test_each_decoder_has_its_own_estimate() -> None:
    full, tiny = BatchKey(64, 64, Decoder.FULL), BatchKey(64, 64, Decoder.TINY)
    cost = CostModel()
    cost.observe(full, 4, 0.8)
    assert cost.seconds_per_image(tiny) == pytest.approx(0.2)  # none of its own yet: the full one's
    cost.observe(tiny, 4, 0.2)
    assert (cost.seconds_per_image(full), cost.seconds_per_image(tiny)) == pytest.approx((0.2, 0.05))
    assert cost.seconds_per_image(BatchKey(128, 128, Decoder.TINY)) == pytest.approx(0.05 * 4**1.5)


def test_batches_refine_the_estimate() -> None:
    cost = measured(s64x64=1.0)
    for _ in range(50):
        cost.observe(NATIVE, 4, 0.4)
    assert cost.seconds_per_image(NATIVE) == pytest.approx(0.1, rel=0.01)


def admission(cost: CostModel, **overrides: object) -> tuple[Callable[..., float], MicroBatcher]:
    """Admission for one model whose cost is `cost`: `admit(client, size, images, deadline, multiple)`."""
    settings = Settings(**{"request_timeout_s": 10.0, "max_request_s": 5.0, **overrides})  # type: ignore[arg-type]
    batcher = MicroBatcher(max_batch_images=4, max_wait_s=FAR, capacity_images=256)
    return partial(Admission(settings, batcher).admit, cost_model=cost), batcher


async def test_a_request_dearer_than_the_limit_is_refused_with_a_way_under_it() -> None:
    admit, _ = admission(measured(s64x64=0.1, s128x128=0.8))
    with pytest.raises(TooCostly) as refused:
        admit("a", LARGE, 8, time.monotonic() + 10, size_multiple=16)
    message = refused.value.message
    assert refused.value.status_code == 422 and refused.value.reason == "too_costly"
    assert "6.4 s of device time" in message and "allows 5 s per request" in message
    assert "at most 6 images at 128x128" in message and "up to 112x112 for 8 images" in message
    assert admit("a", NATIVE, 8, time.monotonic() + 10, size_multiple=16) == pytest.approx(0.8)


async def test_the_queue_is_bounded_in_device_seconds_and_retry_after_follows() -> None:
    admit, batcher = admission(measured(s64x64=1.0), max_queue_s=4.0, client_share=1.0)
    batcher.submit(MODEL, reqs(3), time.monotonic() + FAR, client="a", cost_s=3.0)
    admit("b", NATIVE, 1, time.monotonic() + FAR, 16)  # 3 + 1 fits exactly
    with pytest.raises(QueueFull) as full:
        admit("b", NATIVE, 3, time.monotonic() + FAR, 16)
    assert full.value.headers["Retry-After"] == "2"  # 3 + 3 - 4 s of work must drain first


async def test_one_client_may_hold_only_its_share_of_the_queue() -> None:
    admit, batcher = admission(measured(s64x64=1.0), max_queue_s=8.0, client_share=0.5)
    batcher.submit(MODEL, reqs(4), time.monotonic() + FAR, client="hog", cost_s=4.0)
    with pytest.raises(QueueFull, match="this client already has about 4.0 s"):
        admit("hog", NATIVE, 1, time.monotonic() + FAR, 16)
    assert admit("newcomer", NATIVE, 1, time.monotonic() + FAR, 16) == pytest.approx(1.0)


async def test_a_request_the_queue_would_not_reach_in_time_is_refused_at_once() -> None:
    admit, batcher = admission(measured(s64x64=1.0), max_queue_s=100.0, client_share=1.0)
    batcher.submit(MODEL, reqs(8), time.monotonic() + FAR, client="a", cost_s=8.0)  # two items of 4 s
    with pytest.raises(QueueFull, match="could not finish this request") as late:
        # 8 s ahead, then its images ride in a batch of up to 4 (4 s): done after 12 s > 9 s
        admit("a", NATIVE, 2, time.monotonic() + 9.0, 16)
    assert late.value.headers["Retry-After"] == "4"  # ceil(12 - 8.99...)
    # Another client is behind only "a"'s first item in the fair queue: 4 + 4 s, in time.
    assert admit("b", NATIVE, 2, time.monotonic() + 9.0, 16) == pytest.approx(2.0)


async def test_the_rate_limit_refuses_with_the_time_until_tokens_return() -> None:
    admit, _ = admission(measured(s64x64=0.01), rate_limit_per_minute=60, rate_limit_burst=2)
    admit("a", NATIVE, 2, time.monotonic() + FAR, 16)
    with pytest.raises(RateLimited) as limited:
        admit("a", NATIVE, 1, time.monotonic() + FAR, 16)
    assert limited.value.status_code == 429 and limited.value.headers["Retry-After"] == "1"
    admit("b", NATIVE, 2, time.monotonic() + FAR, 16)  # per client


def test_the_rate_limiter_refills_and_caps_at_the_burst() -> None:
    now = [0.0]
    limiter = RateLimiter(per_minute=60, burst=3, clock=lambda: now[0])
    limiter.take("a", 3)
    assert limiter.wait_s("a", 2) == pytest.approx(2.0)
    now[0] = 100.0
    assert limiter.wait_s("a", 3) == 0.0 and limiter.wait_s("a", 4) == pytest.approx(1.0)


async def test_a_backlog_from_one_client_does_not_hold_back_another() -> None:
    b = MicroBatcher(max_batch_images=2, max_wait_s=0.0, capacity_images=64)
    b.submit(MODEL, reqs(8, seed=0), time.monotonic() + FAR, client="hog", cost_s=8.0)
    b.submit(MODEL, reqs(1, seed=100), time.monotonic() + FAR, client="small", cost_s=1.0)
    seeds = [[r.seed for r in (await b.next_batch()).requests] for _ in range(3)]
    assert seeds[0] == [0, 1]
    assert 100 in seeds[1]  # right after the hog's first batch, not after all four


async def test_fair_order_interleaves_clients_by_their_cost() -> None:
    b = MicroBatcher(max_batch_images=1, max_wait_s=0.0, capacity_images=64)
    for seed in range(3):
        b.submit(MODEL, reqs(1, seed=seed), time.monotonic() + FAR, client="a", cost_s=1.0)
    for seed in range(10, 13):
        b.submit(MODEL, reqs(1, seed=seed), time.monotonic() + FAR, client="b", cost_s=1.0)
    order = [(await b.next_batch()).requests[0].seed for _ in range(6)]
    assert order == [0, 10, 1, 11, 2, 12]


async def test_wait_estimate_counts_running_work_and_what_the_fair_queue_puts_first() -> None:
    b = MicroBatcher(max_batch_images=2, max_wait_s=0.0, capacity_images=64)
    b.submit(MODEL, reqs(4), time.monotonic() + FAR, client="a", cost_s=4.0)
    await b.next_batch()  # 2 s of it on the device
    assert b.ledger.queued_seconds == pytest.approx(4.0)
    assert b.wait_estimate_s("a") == pytest.approx(4.0)  # its own remaining item is ahead of it
    assert b.wait_estimate_s("b") == pytest.approx(2.0)  # only the running batch
