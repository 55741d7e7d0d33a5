"""The device worker: one thread owns the device; an asyncio task feeds it batches and fans results out."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass
from typing import TypeVar

from engine.types import BatchResult, GenerationRequest
from service.batcher import Batch, BatcherClosed, ItemResult, MicroBatcher
from service.errors import BatchFailed, ShuttingDown
from service.metrics import STAGES, ServiceMetrics
from service.protocol import Pipeline

logger = logging.getLogger(__name__)

T = TypeVar("T")


class EngineContractError(RuntimeError):
    """The engine returned something other than one image per request, in order."""


def check_result(result: BatchResult, requests: Sequence[GenerationRequest]) -> None:
    """One RGB uint8 image of the requested size per request, with the request's seed, in order."""
    if len(result.images) != len(requests):
        raise EngineContractError(f"engine returned {len(result.images)} images for {len(requests)} requests")
    for index, (image, request) in enumerate(zip(result.images, requests, strict=True)):
        if image.seed != request.seed:
            raise EngineContractError(f"image {index} has seed {image.seed}, expected {request.seed}")
        expected = (request.height, request.width, 3)
        if tuple(image.pixels.shape) != expected or image.pixels.dtype.name != "uint8":
            raise EngineContractError(
                f"image {index} is {image.pixels.dtype.name}{tuple(image.pixels.shape)}, expected uint8{expected}"
            )


@dataclass
class _Run:
    batch: Batch
    future: asyncio.Future[tuple[BatchResult, float]]


class DeviceWorker:
    """Runs everything that touches the device (load, warmup, generate) on one thread, one call at a time."""

    def __init__(self, batcher: MicroBatcher, metrics: ServiceMetrics):
        self._batcher = batcher
        self._metrics = metrics
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tiue-device")
        self._task: asyncio.Task[None] | None = None

    async def call(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the device thread without blocking the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    def start(self, pipeline: Pipeline) -> None:
        self._task = asyncio.create_task(self._serve(pipeline), name="tiue-device-worker")

    async def stop(self, timeout_s: float) -> None:
        """Finish what is queued within `timeout_s`; after that, fail what is left with 503 and stop."""
        self._batcher.close()
        task = self._task
        if task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(task), max(timeout_s, 0.0))
            except asyncio.TimeoutError:
                failed = self._batcher.fail_pending(
                    lambda: ShuttingDown("the server shut down before this request reached the device")
                )
                logger.warning(
                    "shutdown grace of %.1f s is over; %d queued requests failed", timeout_s, failed
                )
                task.cancel()
                with suppress(asyncio.CancelledError):
                    await task
        # A batch still on the device thread finishes there; its results go nowhere.
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _serve(self, pipeline: Pipeline) -> None:
        """One batch runs on the device thread; a full one may wait right behind it in the executor's
        queue, so that under load the device goes from batch to batch without a trip through the loop."""
        running: _Run | None = None
        staged: _Run | None = None
        try:
            while True:
                if staged is None:
                    try:
                        running = self._submit(pipeline, await self._batcher.next_batch())
                    except BatcherClosed:
                        return
                else:
                    running, staged = staged, None
                full = self._batcher.full_batch_nowait()  # only a full batch is formed early
                if full is not None:
                    staged = self._submit(pipeline, full)
                await self._finish(running)
                running = None
        except asyncio.CancelledError:
            for run in (running, staged):
                if run is not None:
                    self._fail(
                        run.batch,
                        lambda: ShuttingDown("the server shut down before this request's images were made"),
                    )
            raise

    def _submit(self, pipeline: Pipeline, batch: Batch) -> _Run:
        requests = batch.requests
        for item in batch.items:
            self._metrics.queue_wait.observe(batch.formed_at - item.enqueued_at)
        self._metrics.batch_size.observe(len(requests))

        def run() -> tuple[BatchResult, float]:
            started = time.perf_counter()
            result = pipeline.generate(requests)
            return result, time.perf_counter() - started

        return _Run(batch, asyncio.get_running_loop().run_in_executor(self._executor, run))

    async def _finish(self, run: _Run) -> None:
        batch, requests = run.batch, run.batch.requests
        try:
            result, seconds = await run.future
            check_result(result, requests)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            logger.error(
                "batch %d (%d images, size %s) failed", batch.id, len(requests), batch.key, exc_info=exc
            )
            self._fail(batch, lambda: BatchFailed(batch.id))
            return
        self._batcher.record_throughput(len(requests), seconds)
        self._metrics.images_generated.inc(len(requests))
        for stage, stage_s in result.timings.items():
            if stage in STAGES:
                self._metrics.stage_duration.labels(stage=stage).observe(stage_s)
        offset = 0
        for item in batch.items:
            images = result.images[offset : offset + item.images]
            offset += item.images
            if not item.future.done():
                item.future.set_result(
                    ItemResult(
                        images, batch.id, len(requests), batch.formed_at - item.enqueued_at, result.timings
                    )
                )

    @staticmethod
    def _fail(batch: Batch, make_error: Callable[[], BaseException]) -> None:
        for item in batch.items:
            if not item.future.done():
                item.future.set_exception(make_error())
