"""The state one app holds: its settings, metrics, batcher, worker, and where it is in its life."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from enum import Enum
from typing import TypeVar

from engine.types import BatchKey
from service.edge.auth import ApiKeys
from service.edge.caller import Caller
from service.errors import ModelNotFound, NotReady, ShuttingDown
from service.metrics import ServiceMetrics
from service.models import Models, ModelSpec, ServedModel
from service.scheduling.admission import Admission, device_deadline
from service.scheduling.batcher import MicroBatcher
from service.scheduling.worker import DeviceWorker
from service.settings import Settings
from service.tracing import Tracing

logger = logging.getLogger(__name__)

T = TypeVar("T")


class Phase(str, Enum):
    LOADING = "loading"
    READY = "ready"
    DRAINING = "draining"
    FAILED = "failed"


class ServiceState:
    """Built by `create_app`; started and stopped by its lifespan. One app serves one lifespan."""

    def __init__(
        self,
        settings: Settings,
        on_fatal: Callable[[BaseException], None] | None = None,
        tracing: Tracing | None = None,
    ):
        self.settings = settings
        self.tracing = tracing or Tracing()
        self.metrics = ServiceMetrics(settings.engine.max_batch_size)
        self.api_keys = ApiKeys(key.get_secret_value() for key in settings.api_keys)
        self.batcher: MicroBatcher[ServedModel] = MicroBatcher(
            max_batch_images=settings.engine.max_batch_size,
            max_wait_s=settings.max_wait_s,
            capacity_images=settings.queue_size,
            early_close=True,
        )
        self.models = Models(settings.default_model, settings.model_aliases)
        self.model_phases: dict[str, Phase] = {}  # each configured model, by name, as it loads (for /readyz)
        self.admission = Admission(settings, self.batcher)
        self.worker = DeviceWorker(self.batcher, self.metrics, self.tracing)
        self.metrics.track_queue_depth(lambda: self.batcher.pending_images)
        self.metrics.set_limits(settings.queue_size, settings.request_timeout_s)
        self.phase = Phase.LOADING
        self.failure: str | None = None
        self.ready = asyncio.Event()  # set once every model is loaded and warmed; tests wait on it
        self._drain_deadline: float | None = None
        self._in_flight = 0  # generation requests being handled
        self._idle = asyncio.Event()  # no generation request is being handled
        self._idle.set()
        self._on_fatal = on_fatal
        self._encode_pool = ThreadPoolExecutor(settings.encode_threads, thread_name_prefix="tiue-encode")

    def require_model(self, name: str | None) -> ServedModel:
        """The model called `name` (None: the default) when taking work; otherwise 503 (loading, failed,
        or shutting down), or 404 for a name this server does not serve."""
        self.require_ready()
        return self.models.get(name)

    def refuse_early(self, caller: Caller) -> None:
        """Before a generation request's body is read: the 503 or 429 it would get whatever it asks for."""
        self.require_ready()
        settings = self.settings
        deadline = device_deadline(caller.arrived, settings.request_timeout_s)
        key = BatchKey(settings.min_size, settings.min_size)
        self.admission.refuse_early(caller.client, deadline, [model.cost for model in self.models], key)

    def require_ready(self) -> None:
        if self.phase is Phase.READY:
            return
        if self.phase is Phase.DRAINING:
            raise ShuttingDown("the server is shutting down and takes no new work")
        if self.phase is Phase.FAILED:
            raise NotReady("a model failed to load; see the server log")
        raise NotReady("the models are still loading", retry_after_s=5)

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

    async def load(self, specs: Sequence[ModelSpec]) -> None:
        """Load and warm each model in order on the device thread; the event loop (and /livez) stays
        responsive. One that fails fails the start, named."""
        started = time.perf_counter()
        self.model_phases.update((spec.name, Phase.LOADING) for spec in specs if spec.name is not None)
        for spec in specs:
            try:
                model = await self._load_one(spec)
            except Exception as exc:
                name = spec.name or "the model"
                if spec.name is not None:
                    self.model_phases[spec.name] = Phase.FAILED
                self.phase = Phase.FAILED
                reason = f"{type(exc).__name__}: {exc}"
                self.failure = reason if spec.name is None else f"{spec.name}: {reason}"
                logger.error("%s failed to load", name, exc_info=exc)
                if self._on_fatal is not None:
                    self._on_fatal(exc)
                return
            if self.phase is Phase.DRAINING:
                return
            self.models.add(model)
            self.model_phases[model.name] = Phase.READY
            self.metrics.add_model(model.name, model.info)
            cache = getattr(model.pipeline, "prompt_cache", None)  # engine pipelines have one; fakes need not
            if cache is not None:
                self.metrics.track_prompt_cache(model.name, cache.stats)
        try:
            self.models.get(None)
        except ModelNotFound as exc:  # a default_model that names no model (known only once loaded)
            self._fail_start(f"default_model: {exc.message}", exc)
            return
        try:
            self.models.check_aliases()
        except ValueError as exc:  # an alias of a model that is not served (its name known only once loaded)
            self._fail_start(str(exc), exc)
            return
        self.worker.start()
        self.phase = Phase.READY
        self.metrics.ready.set(1)
        self.ready.set()
        logger.info("ready in %.1f s: %s", time.perf_counter() - started, ", ".join(self.models.names))

    def _fail_start(self, reason: str, exc: BaseException) -> None:
        self.phase = Phase.FAILED
        self.failure = reason
        logger.error("%s", reason)
        if self._on_fatal is not None:
            self._on_fatal(exc)

    async def _load_one(self, spec: ModelSpec) -> ServedModel:
        pipeline = await self.worker.call(spec.factory)
        info = pipeline.info
        model = ServedModel(spec.name or info.name, pipeline, int(time.time()))
        logger.info(
            "model %s loaded (%s, %s, %s, %s); warming up",
            model.name,
            info.name,
            info.backend,
            info.precision,
            info.device,
        )
        warm_started = time.perf_counter()
        await self.worker.call(pipeline.warmup)  # with torch.compile: compiles every bucket, or loads it
        warm_s = time.perf_counter() - warm_started
        self.metrics.warmup_seconds.labels(model=model.name).set(warm_s)
        logger.info("model %s warmed up in %.1f s", model.name, warm_s)
        await self.worker.call(lambda: self._calibrate(model))
        return model

    @staticmethod
    def _calibrate(model: ServedModel) -> None:
        """Seed the model's cost on the device thread: a second, timed warm-up (one image at the native
        size) once the first has paid for lazy initialisation. Every batch refines it from then on."""
        size = model.info.default_size
        started = time.perf_counter()
        model.pipeline.warmup(batch_sizes=(1,), sizes=((size, size),))
        model.cost.observe(BatchKey(size, size, model.info.default_decoder), 1, time.perf_counter() - started)
        logger.info("%s: device seconds per image by size: %s", model.name, model.cost.measured())

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
        if self.ready.is_set():  # the worker runs once loaded; a load in progress is shutdown()'s
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
