"""The device worker with a fake engine: fan-out, the result-count check, failures, draining."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Sequence

import pytest
from fakes import FAKE_INFO, FakeEngine, wait_until

from engine.types import BatchKey, BatchResult, GenerationRequest
from service.errors import BatchFailed, DeadlineExceeded, ShuttingDown
from service.metrics import ServiceMetrics
from service.models import ServedModel
from service.scheduling.batcher import MicroBatcher
from service.scheduling.worker import DeviceWorker

SIZE = BatchKey(64, 64)


def reqs(n: int, seed: int = 0) -> list[GenerationRequest]:
    return [GenerationRequest("p", seed + i, SIZE.width, SIZE.height) for i in range(n)]


def one_model(engine: FakeEngine, seconds_per_image: float) -> ServedModel:
    """The engine as the only model, its cost model believing each image takes `seconds_per_image`."""
    model = ServedModel(FAKE_INFO.name, engine, 0)
    model.cost.observe(SIZE, 1, seconds_per_image)
    model.cost.observe(SIZE, 4, 4 * seconds_per_image)
    return model


def deadline() -> float:
    return time.monotonic() + 60


def setup(
    engine: FakeEngine, max_batch: int = 4, wait_s: float = 0.0
) -> tuple[MicroBatcher[ServedModel], DeviceWorker, ServedModel]:
    batcher: MicroBatcher[ServedModel] = MicroBatcher(
        max_batch_images=max_batch, max_wait_s=wait_s, capacity_images=64
    )
    worker = DeviceWorker(batcher, ServiceMetrics(max_batch))
    worker.start()
    return batcher, worker, one_model(engine, 0.001)  # fast: a full batch is staged behind the running one


async def test_results_reach_the_right_futures_in_order(engine: FakeEngine) -> None:
    engine.gate.clear()
    batcher, worker, model = setup(engine, wait_s=10.0)
    futures = batcher.submit(model, reqs(1, seed=0), deadline()) + batcher.submit(
        model, reqs(3, seed=10), deadline()
    )
    assert [r.seed for r in await engine.wait_entered()] == [0, 10, 11, 12]  # one batch of 4
    engine.gate.set()
    first, second = await asyncio.wait_for(asyncio.gather(*futures), 5)
    assert [image.seed for image in first.images] == [0]
    assert [image.seed for image in second.images] == [10, 11, 12]
    assert first.batch_id == second.batch_id and first.batch_images == 4
    await worker.stop(5)


async def test_a_failing_batch_fails_all_its_requests_and_only_them(caplog: pytest.LogCaptureFixture) -> None:
    engine = FakeEngine(fail=lambda batch: batch[0].seed == 666)
    engine.gate.clear()
    batcher, worker, model = setup(engine, max_batch=3, wait_s=10.0)
    doomed = [batcher.submit(model, reqs(1, seed=666 + i), deadline())[0] for i in range(3)]
    await engine.wait_entered()
    survivor = batcher.submit(model, reqs(1, seed=1), deadline())[0]
    with caplog.at_level(logging.ERROR, logger="service.scheduling.worker"):
        engine.gate.set()
        outcomes = await asyncio.gather(*doomed, return_exceptions=True)
    assert all(isinstance(outcome, BatchFailed) for outcome in outcomes)
    assert "the fake device caught fire" in caplog.text  # logged once, with its traceback
    batcher.close()  # flush the survivor without waiting for its batch to fill
    result = await asyncio.wait_for(survivor, 5)
    assert [image.seed for image in result.images] == [1]
    await worker.stop(5)


class ShortEngine(FakeEngine):
    """Returns one image too few: the worker must notice instead of handing out misaligned images."""

    def generate(self, requests: Sequence[GenerationRequest]) -> BatchResult:
        result = super().generate(requests)
        return BatchResult(result.images[:-1], result.timings)


async def test_result_count_is_checked(caplog: pytest.LogCaptureFixture) -> None:
    batcher, worker, model = setup(ShortEngine(), max_batch=2, wait_s=10.0)
    with caplog.at_level(logging.ERROR, logger="service.scheduling.worker"):
        futures = batcher.submit(model, reqs(2), deadline())
        with pytest.raises(BatchFailed):
            await asyncio.wait_for(futures[0], 5)
    assert "returned 1 images for 2 requests" in caplog.text
    await worker.stop(5)


async def test_a_result_for_a_request_cancelled_during_its_batch_is_dropped(engine: FakeEngine) -> None:
    engine.gate.clear()
    batcher, worker, model = setup(engine, max_batch=2, wait_s=10.0)
    gone, kept = batcher.submit(model, reqs(1, seed=0), deadline()) + batcher.submit(
        model, reqs(1, seed=1), deadline()
    )
    await engine.wait_entered()
    gone.cancel()
    engine.gate.set()
    result = await asyncio.wait_for(kept, 5)
    assert [image.seed for image in result.images] == [1]
    await worker.stop(5)


async def test_stop_finishes_queued_work_within_the_grace_period(engine: FakeEngine) -> None:
    engine.gate.clear()
    batcher, worker, model = setup(engine, max_batch=1)
    futures = [batcher.submit(model, reqs(1, seed=i), deadline())[0] for i in range(3)]
    await engine.wait_entered()
    stopping = asyncio.create_task(worker.stop(10))
    await asyncio.sleep(0)
    with pytest.raises(ShuttingDown):
        batcher.submit(model, reqs(1), deadline())  # closed at once
    engine.gate.set()
    await asyncio.wait_for(stopping, 5)
    assert [(await f).images[0].seed for f in futures] == [0, 1, 2]


async def test_stop_fails_what_is_left_when_the_grace_period_ends(engine: FakeEngine) -> None:
    engine.gate.clear()
    batcher, worker, model = setup(engine, max_batch=1)
    running, queued = (batcher.submit(model, reqs(1, seed=i), deadline())[0] for i in range(2))
    await engine.wait_entered()
    started = time.monotonic()
    await asyncio.wait_for(worker.stop(0.1), 5)
    assert time.monotonic() - started < 2
    for future in (running, queued):
        with pytest.raises(ShuttingDown):
            future.result()
    engine.gate.set()
    assert len(engine.batches) == 1  # the queued request never reached the device


async def test_the_device_is_only_touched_from_one_thread() -> None:
    threads: set[int] = set()

    class ThreadRecorder(FakeEngine):
        def generate(self, requests: Sequence[GenerationRequest]) -> BatchResult:
            threads.add(threading.get_ident())
            return super().generate(requests)

    batcher, worker, model = setup(ThreadRecorder(), max_batch=1)
    futures = [batcher.submit(model, reqs(1, seed=i), deadline())[0] for i in range(4)]
    await asyncio.wait_for(asyncio.gather(*futures), 5)
    assert len(threads) == 1 and threading.get_ident() not in threads
    await worker.stop(5)


async def test_a_full_batch_is_staged_behind_the_running_one_and_a_partial_one_is_not(
    engine: FakeEngine,
) -> None:
    engine.gate.clear()
    batcher, worker, model = setup(engine, max_batch=4, wait_s=10.0)
    futures = [batcher.submit(model, reqs(1, seed=i), deadline())[0] for i in range(14)]
    assert [r.seed for r in await engine.wait_entered()] == [0, 1, 2, 3]
    await wait_until(lambda: batcher.pending_images == 6)  # 4..7 staged on the device thread's queue
    await asyncio.sleep(0.05)
    assert batcher.pending_images == 6  # only one batch is staged ahead
    engine.gate.set()
    assert [r.seed for r in await engine.wait_entered()] == [4, 5, 6, 7]
    assert [r.seed for r in await engine.wait_entered()] == [8, 9, 10, 11]
    batcher.close()  # 12, 13: a partial batch, flushed on close
    results = await asyncio.wait_for(asyncio.gather(*futures), 5)
    assert [result.images[0].seed for result in results] == list(range(14))
    await worker.stop(5)


async def test_stop_fails_a_staged_batch_too(engine: FakeEngine) -> None:
    engine.gate.clear()
    batcher, worker, model = setup(engine, max_batch=1)
    running, staged = (batcher.submit(model, reqs(1, seed=i), deadline())[0] for i in range(2))
    await engine.wait_entered()
    await wait_until(lambda: batcher.pending_images == 0)  # the second is staged
    await asyncio.wait_for(worker.stop(0.1), 5)
    for future in (running, staged):
        with pytest.raises(ShuttingDown):
            future.result()
    engine.gate.set()


def setup_costed(
    engine: FakeEngine, seconds_per_image: float, max_batch: int = 4
) -> tuple[MicroBatcher[ServedModel], DeviceWorker, ServiceMetrics, ServedModel]:
    """A worker whose model's cost model believes each image takes `seconds_per_image`."""
    batcher: MicroBatcher[ServedModel] = MicroBatcher(
        max_batch_images=max_batch, max_wait_s=0.0, capacity_images=64
    )
    metrics = ServiceMetrics(max_batch)
    worker = DeviceWorker(batcher, metrics)
    worker.start()
    return batcher, worker, metrics, one_model(engine, seconds_per_image)


def counted(metrics: ServiceMetrics, name: str, reason: str) -> float:
    value = metrics.registry.get_sample_value(f"tiue_images_{name}_total", {"reason": reason})
    assert value is not None
    return value


@pytest.mark.parametrize(
    ("seconds_per_image", "staged"),
    [(0.03, True), (0.1, False)],  # a 120 ms batch (the default model on a CPU core) / a 400 ms one
)
async def test_only_a_batch_estimated_short_has_the_next_staged_behind_it(
    engine: FakeEngine, seconds_per_image: float, staged: bool
) -> None:
    engine.gate.clear()
    batcher, worker, _, model = setup_costed(engine, seconds_per_image)
    futures = [
        batcher.submit(model, reqs(1, seed=i), deadline(), cost_s=seconds_per_image)[0] for i in range(8)
    ]
    assert [r.seed for r in await engine.wait_entered()] == [0, 1, 2, 3]
    if staged:
        await wait_until(lambda: batcher.pending_images == 0)  # 4..7 wait on the device thread
    else:
        await asyncio.sleep(0.1)
        assert batcher.pending_images == 4  # still in the fair queue, placed when the device is free
    engine.gate.set()
    await asyncio.wait_for(asyncio.gather(*futures), 5)
    await worker.stop(5)


async def test_a_staged_batch_whose_requests_gave_up_is_never_computed(engine: FakeEngine) -> None:
    engine.gate.clear()
    batcher, worker, metrics, model = setup_costed(engine, seconds_per_image=0.001)
    running = batcher.submit(model, reqs(4, seed=0), deadline())
    staged = batcher.submit(model, reqs(4, seed=10), deadline())  # a full batch: staged behind the first
    await engine.wait_entered()  # the device holds batch 1; batch 2 waits in the device's queue
    for future in staged:
        future.cancel()  # its client hung up while it waited
    engine.gate.set()
    await asyncio.wait_for(asyncio.gather(*running), 5)
    await wait_until(lambda: counted(metrics, "skipped", "cancelled") == 4)
    assert [[r.seed for r in batch] for batch in engine.batches] == [[0, 1, 2, 3]]
    assert counted(metrics, "discarded", "cancelled") == 0
    await worker.stop(5)


async def test_a_request_that_cannot_finish_in_time_is_answered_504_without_computing(
    engine: FakeEngine,
) -> None:
    engine.gate.clear()
    batcher, worker, metrics, model = setup_costed(
        engine, seconds_per_image=1.0
    )  # the model says 1 s an image
    running = batcher.submit(model, reqs(4, seed=0), deadline())
    await engine.wait_entered()
    (late,) = batcher.submit(model, reqs(1, seed=10), time.monotonic() + 0.5)  # needs ~1 s, has 0.5
    keeps = batcher.submit(model, reqs(3, seed=20), deadline())
    engine.gate.set()
    with pytest.raises(DeadlineExceeded, match="not computed"):
        await asyncio.wait_for(late, 5)
    await asyncio.wait_for(asyncio.gather(*running, *keeps), 5)
    assert [r.seed for r in engine.batches[1]] == [20, 21, 22]  # the rest of its batch still ran
    assert counted(metrics, "skipped", "expired") == 1
    await worker.stop(5)


async def test_images_made_for_a_request_that_gave_up_meanwhile_are_counted_as_discarded(
    engine: FakeEngine,
) -> None:
    engine.gate.clear()
    batcher, worker, metrics, model = setup_costed(engine, seconds_per_image=0.001)
    (future,) = batcher.submit(model, reqs(2), deadline())
    await engine.wait_entered()
    future.cancel()  # too late to skip: the device has it
    engine.gate.set()
    await wait_until(lambda: counted(metrics, "discarded", "cancelled") == 2)
    await worker.stop(5)
