"""The device worker: one thread owns the device; an asyncio task feeds it batches and fans results out."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass
from typing import Any, TypeVar

from engine.types import DEVICE_STAGES, BatchResult, GenerationRequest
from service.errors import BatchFailed, DeadlineExceeded, ShuttingDown
from service.metrics import ServiceMetrics
from service.models import ServedModel
from service.scheduling.batcher import Batch, BatcherClosed, ItemResult, MicroBatcher, WorkItem
from service.tracing import BatchRecord, Tracing

logger = logging.getLogger(__name__)
# A batch may run this much slower than its estimate on a busy CPU: an item that would then miss its
# deadline is skipped (costs nothing) rather than computed for nobody.
LATE_MARGIN = 1.25

T = TypeVar("T")

# Estimated device seconds of the running batch below which a full next batch is staged behind it.
# Without staging the device waits for the event loop between batches, and under a refusal flood the
# loop (at a lower priority) is slow to come back: the default model on a CPU core (about 75 ms a batch)
# was busy 89 % of a retry storm unstaged, 97 % staged. The price is fairness within one short batch:
# a request that arrives meanwhile may wait one more batch.
STAGE_BELOW_S = 0.15


class EngineContractError(RuntimeError):
    """The engine returned something other than one image per request, in order."""


ModelBatch = Batch[ServedModel]
ModelItem = WorkItem[ServedModel]


def _size(batch: ModelBatch) -> str:
    width, height = batch.size
    return f"{width}x{height}"


def _request_ids(items: Sequence[ModelItem]) -> str:
    return ",".join(item.request_id or "-" for item in items)


def _fields(batch: ModelBatch, items: Sequence[ModelItem], **more: Any) -> dict[str, Any]:
    """`extra=` for a batch's log line: which requests rode in it, as structured fields."""
    images = sum(item.images for item in items)
    ids = [item.request_id for item in items if item.request_id]
    return {
        "fields": {
            "batch_id": batch.id,
            "model": batch.model.name,
            "images": images,
            "size": _size(batch),
            "request_ids": ids,
            **more,
        }
    }


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
class _Done:
    """What the device thread did with a batch: the items it computed (none: all skipped) and how long."""

    live: list[ModelItem]
    result: BatchResult | None
    seconds: float
    started_ns: int = 0  # Unix nanoseconds: when the device call began (for its trace span)


@dataclass
class _Run:
    batch: ModelBatch
    future: asyncio.Future[_Done]


class DeviceWorker:
    """Runs everything that touches the device (load, warmup, generate) on one thread, one call at a time."""

    def __init__(
        self, batcher: MicroBatcher[ServedModel], metrics: ServiceMetrics, tracing: Tracing | None = None
    ):
        self._batcher = batcher
        self._metrics = metrics
        self._tracing = tracing or Tracing()
        self.busy_since: float | None = None  # monotonic start of the device call in progress
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tiue-device")
        self._task: asyncio.Task[None] | None = None

    async def call(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the device thread without blocking the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    def start(self) -> None:
        """Serve batches, each on the pipeline of the model it carries."""
        self._task = asyncio.create_task(self._serve(), name="tiue-device-worker")

    async def stop(self, timeout_s: float) -> None:
        """Finish what is queued within `timeout_s`; after that, fail what is left with 503 and stop.
        Safe to call again (the server drains first, the lifespan's shutdown calls it once more)."""
        self._batcher.close()
        task = self._task
        if task is not None and not task.done():
            await asyncio.wait({task}, timeout=max(timeout_s, 0.0))  # neither cancels nor raises
            if not task.done():
                failed = self.abandon()
                logger.warning(
                    "shutdown grace of %.1f s is over; %d queued requests failed", timeout_s, failed
                )
                with suppress(asyncio.CancelledError):
                    await task
        # A batch still on the device thread finishes there; its results go nowhere.
        self._executor.shutdown(wait=False, cancel_futures=True)

    def abandon(self) -> int:
        """Answer everything still waiting 503 now, the batches on the device included, and stop feeding
        the device; returns how many queued items were failed."""
        failed = self._batcher.fail_pending(
            lambda: ShuttingDown("the server shut down before this request reached the device")
        )
        if self._task is not None:
            self._task.cancel()  # _serve fails its running and staged batches
        return failed

    async def _serve(self) -> None:
        """One batch runs on the device thread; behind a short one, a full one may wait in the executor's
        queue, so that under load the device goes from batch to batch without a trip through the loop.
        Behind a long batch nothing is staged: the fair queue decides when the device is free, so a
        request that arrives meanwhile from another client is not put behind a batch formed before it."""
        running: _Run | None = None
        staged: _Run | None = None
        try:
            while True:
                if staged is None:
                    try:
                        running = self._submit(await self._batcher.next_batch())
                    except BatcherClosed:
                        return
                else:
                    running, staged = staged, None
                if running.batch.cost_s <= STAGE_BELOW_S:
                    full = self._batcher.full_batch_nowait()  # only a full batch is formed early
                    if full is not None:
                        staged = self._submit(full)
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

    def _submit(self, batch: ModelBatch) -> _Run:
        model = batch.model
        pipeline, cost, key = model.pipeline, model.cost, batch.key
        for item in batch.items:
            self._metrics.queue_wait.labels(model=model.name).observe(batch.formed_at - item.enqueued_at)
            self._tracing.queue_wait(item.trace, item.enqueued_at, batch.formed_at, batch.id)

        def seconds_for(images: int) -> float:
            return cost.batch_seconds(key, images) * LATE_MARGIN

        def run() -> _Done:
            # On the device thread, just before it runs: a staged batch may have waited behind another.
            live = batch.live_items(time.monotonic(), seconds_for)
            if not live:
                return _Done(live, None, 0.0)
            requests = [request for item in live for request in item.requests]
            self.busy_since = time.monotonic()
            started, started_ns = time.perf_counter(), time.time_ns()
            try:
                result = pipeline.generate(requests)
            except Exception as exc:
                self._trace(batch, live, started_ns, time.perf_counter() - started, {}, exc)
                raise
            finally:
                self.busy_since = None
                seconds = time.perf_counter() - started
                self._metrics.device_busy.labels(model=model.name).inc(seconds)
            return _Done(live, result, seconds, started_ns)

        return _Run(batch, asyncio.get_running_loop().run_in_executor(self._executor, run))

    async def _finish(self, run: _Run) -> None:
        batch = run.batch
        try:
            done = await run.future
            if done.result is not None:
                check_result(done.result, [r for item in done.live for r in item.requests])
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            logger.error(
                "batch %d (%d images, size %s, requests %s) failed",
                batch.id,
                batch.images,
                _size(batch),
                _request_ids(batch.items),
                exc_info=exc,
                extra=_fields(batch, batch.items),
            )
            self._fail(batch, lambda: BatchFailed(batch.id))
            return
        finally:
            self._batcher.finished(batch)
        self._skip(batch, done.live)
        if done.result is None:
            logger.info("batch %d skipped: every request in it gave up or could not finish in time", batch.id)
            return
        self._deliver(batch, done)

    def _skip(self, batch: ModelBatch, live: list[ModelItem]) -> None:
        """Items dropped just before the batch ran: never computed, so never wasted."""
        now = time.monotonic()
        for item in batch.items:
            if any(item is other for other in live):
                continue
            if item.future.done():
                self._metrics.images_skipped.labels(reason="cancelled").inc(item.images)
            else:
                self._metrics.images_skipped.labels(reason="expired").inc(item.images)
                item.future.set_exception(
                    DeadlineExceeded(
                        f"the request would not finish before its deadline (after {now - item.enqueued_at:.1f} s "
                        "in the queue); it was not computed"
                    )
                )

    def _deliver(self, batch: ModelBatch, done: _Done) -> None:
        assert done.result is not None
        result, requests = done.result, [r for item in done.live for r in item.requests]
        model = batch.model
        model.cost.observe(batch.key, len(requests), done.seconds)
        self._metrics.images_generated.labels(model=model.name).inc(len(requests))
        flagged = sum(image.flagged for image in result.images)
        if flagged:
            self._metrics.images_flagged.labels(model=model.name).inc(flagged)
        self._metrics.batch_size.labels(model=model.name).observe(len(requests))
        for stage, stage_s in result.timings.items():
            if stage in DEVICE_STAGES:
                self._metrics.stage_duration.labels(stage=stage, model=model.name).observe(stage_s)
        logger.info(
            "batch %d: %d images of %s at %s in %.3f s for requests %s",
            batch.id,
            len(requests),
            model.name,
            _size(batch),
            done.seconds,
            _request_ids(done.live),
            extra=_fields(batch, done.live, device_s=round(done.seconds, 4)),
        )
        self._trace(batch, done.live, done.started_ns, done.seconds, result.timings)
        offset = 0
        now = time.monotonic()
        for item in done.live:
            images = result.images[offset : offset + item.images]
            offset += item.images
            if item.future.done():  # gave up while its images were being made
                reason = "expired" if now >= item.deadline else "cancelled"
                self._metrics.images_discarded.labels(reason=reason).inc(item.images)
                continue
            item.future.set_result(
                ItemResult(
                    images, batch.id, len(requests), batch.formed_at - item.enqueued_at, result.timings
                )
            )

    def _trace(
        self,
        batch: ModelBatch,
        live: list[ModelItem],
        started_ns: int,
        seconds: float,
        timings: dict[str, float],
        error: BaseException | None = None,
    ) -> None:
        if not self._tracing.enabled:
            return
        attributes = _fields(batch, live)["fields"]
        record = BatchRecord(started_ns, seconds, [item.trace for item in live], attributes, timings, error)
        self._tracing.batch(record)

    @staticmethod
    def _fail(batch: ModelBatch, make_error: Callable[[], BaseException]) -> None:
        for item in batch.items:
            if not item.future.done():
                item.future.set_exception(make_error())
