"""The state one app holds: its settings, metrics, batcher, worker, and where it is in its life."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from enum import Enum
from typing import TypeVar

from service.admission import Admission
from service.auth import ApiKeys
from service.batcher import MicroBatcher
from service.cost import CostModel
from service.errors import NotReady, ShuttingDown
from service.metrics import ServiceMetrics
from service.protocol import Pipeline, PipelineFactory
from service.settings import Settings
from service.worker import DeviceWorker

logger = logging.getLogger(__name__)

T = TypeVar("T")


class Phase(str, Enum):
    LOADING = "loading"
    READY = "ready"
    DRAINING = "draining"
    FAILED = "failed"


class ServiceState:
    """Built by `create_app`; started and stopped by its lifespan. One app serves one lifespan."""

    def __init__(self, settings: Settings, on_fatal: Callable[[BaseException], None] | None = None):
        self.settings = settings
        self.metrics = ServiceMetrics(settings.max_batch_size)
        self.api_keys = ApiKeys(key.get_secret_value() for key in settings.api_keys)
        self.batcher = MicroBatcher(
            max_batch_images=settings.max_batch_size,
            max_wait_s=settings.max_wait_s,
            capacity_images=settings.queue_size,
            early_close=True,
        )
        self.cost = CostModel()
        self.admission = Admission(settings, self.batcher, self.cost)
        self.worker = DeviceWorker(self.batcher, self.metrics, self.cost)
        self.metrics.track_queue_depth(lambda: self.batcher.pending_images)
        self.phase = Phase.LOADING
        self.failure: str | None = None
        self.pipeline: Pipeline | None = None
        self.ready = asyncio.Event()  # set once the model is loaded and warmed; tests wait on it
        self._drain_deadline: float | None = None
        self._in_flight = 0  # generation requests being handled
        self._idle = asyncio.Event()  # no generation request is being handled
        self._idle.set()
        self._on_fatal = on_fatal
        self._encode_pool = ThreadPoolExecutor(settings.encode_threads, thread_name_prefix="tiue-encode")

    def require_pipeline(self) -> Pipeline:
        """The pipeline when taking work; otherwise 503 (loading, failed, or shutting down)."""
        if self.phase is Phase.READY and self.pipeline is not None:
            return self.pipeline
        if self.phase is Phase.DRAINING:
            raise ShuttingDown("the server is shutting down and takes no new work")
        if self.phase is Phase.FAILED:
            raise NotReady("the model failed to load; see the server log")
        raise NotReady("the model is still loading", retry_after_s=5)

    @contextmanager
    def request_scope(self) -> Iterator[None]:
        """A generation request from its arrival to its answer: for the gauge, the batcher, draining."""
        self._in_flight += 1
        self._idle.clear()
        self.metrics.in_flight.inc()
        try:
            with self.batcher.arrival():
                yield
        finally:
            self._in_flight -= 1
            self.metrics.in_flight.dec()
            if self._in_flight == 0:
                self._idle.set()

    async def run_encode(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._encode_pool, fn)

    async def load(self, factory: PipelineFactory) -> None:
        """Load and warm the model on the device thread; the event loop (and /livez) stays responsive."""
        started = time.perf_counter()
        try:
            pipeline = await self.worker.call(factory)
            info = pipeline.info
            logger.info(
                "model %s loaded (%s, %s, %s); warming up",
                info.name,
                info.backend,
                info.precision,
                info.device,
            )
            await self.worker.call(pipeline.warmup)
            await self.worker.call(lambda: self._calibrate(pipeline))
        except Exception as exc:
            self.phase = Phase.FAILED
            self.failure = f"{type(exc).__name__}: {exc}"
            logger.error("the model failed to load", exc_info=exc)
            if self._on_fatal is not None:
                self._on_fatal(exc)
            return
        if self.phase is Phase.DRAINING:
            return
        self.pipeline = pipeline
        self.metrics.model_info.labels(
            model=info.name, backend=info.backend, precision=info.precision, device=info.device
        ).set(1)
        self.worker.start(pipeline)
        self.phase = Phase.READY
        self.metrics.ready.set(1)
        self.ready.set()
        logger.info("ready in %.1f s", time.perf_counter() - started)

    def _calibrate(self, pipeline: Pipeline) -> None:
        """Seed the cost model on the device thread: a second, timed warm-up (one image at the native
        size) once the first has paid for lazy initialisation. Every batch refines it from then on."""
        started = time.perf_counter()
        pipeline.warmup()
        size = pipeline.info.default_size
        self.cost.observe((size, size), 1, time.perf_counter() - started)
        logger.info("device seconds per image by size: %s", self.cost.measured())

    def begin_drain(self) -> None:
        """SIGTERM: stop being ready and stop admitting work at once; queued work goes on."""
        if self.phase is Phase.DRAINING:
            return
        logger.info(
            "draining: taking no new work, finishing what is queued (%d images)", self.batcher.pending_images
        )
        self.phase = Phase.DRAINING
        self.metrics.ready.set(0)
        self.batcher.close()
        self._drain_deadline = time.monotonic() + self.settings.shutdown_grace_s

    async def drain(self) -> None:
        """The server's drain after SIGTERM, while it still answers: queued and running work may finish
        within the grace; then whatever is left is answered 503 (ShuttingDown) and the device let go."""
        self.begin_drain()
        assert self._drain_deadline is not None
        if self.pipeline is not None:  # the worker runs once loaded; a load in progress is shutdown()'s
            await self.worker.stop(self._drain_deadline - time.monotonic())
        with suppress(asyncio.TimeoutError):  # requests whose images are made may still be encoding them
            await asyncio.wait_for(self._idle.wait(), max(self._drain_deadline - time.monotonic(), 0.0))
        logger.info("queue drained; the server closes its connections")

    async def shutdown(self) -> None:
        """Finish queued work within what is left of the grace period, then release the threads."""
        self.begin_drain()
        assert self._drain_deadline is not None
        await self.worker.stop(self._drain_deadline - time.monotonic())
        with suppress(asyncio.TimeoutError):  # requests whose images are made may still be encoding them
            await asyncio.wait_for(self._idle.wait(), max(self._drain_deadline - time.monotonic(), 0.0))
        self._encode_pool.shutdown(wait=False)
        logger.info("drained")
