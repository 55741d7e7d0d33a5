"""Prometheus metrics, one registry per app so tests can build many apps in one process."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from engine.types import DEVICE_STAGES, ModelInfo

REJECT_REASONS = (
    "queue_full",
    "rate_limited",
    "too_costly",
    "timeout",
    "invalid",
    "unauthorized",
    "cancelled",
    "not_ready",
    "overloaded",
    "request_timeout",
    "model_not_found",
    "content_policy_violation",
)
IMAGE_ENCODE = "image_encode"  # on the event loop's encode pool, once per image
STAGES = (*DEVICE_STAGES, IMAGE_ENCODE)  # every stage a request's timings and the metrics report
WASTE_REASONS = ("cancelled", "expired")
NO_MODEL = ""  # the model label of a request refused before a model was chosen (or one with none)

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_WAIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_STAGE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ServiceMetrics:
    """Every metric the service exports; names are part of the deployment contract (dashboards, alerts)."""

    def __init__(self, max_batch_size: int):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.request_duration = Histogram(
            "tiue_request_duration_seconds",
            "Time from the request's arrival to its answer, by route, HTTP status and model.",
            ["route", "status", "model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "tiue_queue_wait_seconds",
            "Time a request waited in the queue before its batch went to the device.",
            ["model"],
            buckets=_WAIT_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "tiue_batch_size_images",
            "Images per engine call.",
            ["model"],
            buckets=tuple(float(b) for b in _batch_buckets(max_batch_size)),
            registry=r,
        )
        self.stage_duration = Histogram(
            "tiue_stage_duration_seconds",
            "Device stages once per batch; image_encode once per image.",
            ["stage", "model"],
            buckets=_STAGE_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge("tiue_queue_depth", "Images waiting for the device.", registry=r)
        # The limits the alert rules compare against (deploy/prometheus/alerts.yml): set once, from settings.
        self.queue_capacity = Gauge(
            "tiue_queue_capacity_images", "Images the queue holds (TIUE_QUEUE_SIZE); beyond, 429.", registry=r
        )
        self.request_timeout = Gauge(
            "tiue_request_timeout_seconds",
            "TIUE_REQUEST_TIMEOUT_S: a request not answered by then gets 504.",
            registry=r,
        )
        self.device_busy = Counter(
            "tiue_device_busy_seconds",
            "Seconds the device thread spent running batches (failed ones too): its rate is the utilisation.",
            ["model"],
            registry=r,
        )
        self.in_flight = Gauge(
            "tiue_in_flight_requests",
            "Generation requests being handled (queued, running or encoding).",
            registry=r,
        )
        self.images_generated = Counter(
            "tiue_images_generated", "Images the engine produced.", ["model"], registry=r
        )
        self.images_flagged = Counter(
            "tiue_images_flagged",
            "Images the safety checker flagged; they are withheld, never returned.",
            ["model"],
            registry=r,
        )
        self.images_discarded = Counter(
            "tiue_images_discarded",
            "Images the engine produced for requests that had already given up (cancelled) or timed out (expired).",
            ["reason"],
            registry=r,
        )
        self.images_skipped = Counter(
            "tiue_images_skipped",
            "Images dropped from a formed batch just before it ran: their request gave up, or could not finish "
            "before its deadline.",
            ["reason"],
            registry=r,
        )
        self.rejected = Counter(
            "tiue_requests_rejected",
            "Requests answered without images, by reason and model (empty: refused before a model was chosen).",
            ["reason", "model"],
            registry=r,
        )
        self.prompts_truncated = Counter(
            "tiue_prompts_truncated", "Prompts longer than the text encoder's window, cut to fit.", registry=r
        )
        self.model_info = Gauge(
            "tiue_model_info",
            "One series per loaded model; always 1.",
            ["model", "backend", "precision", "device"],
            registry=r,
        )
        self.ready = Gauge("tiue_ready", "1 when every model is loaded, warmed and taking work.", registry=r)
        self.warmup_seconds = Gauge(
            "tiue_warmup_seconds",
            "How long the model's warm-up took (with torch.compile: compiling every warmed batch size and size).",
            ["model"],
            registry=r,
        )
        # Connections (service.edge.connections): how close the server is to TIUE_MAX_CONNECTIONS, what it sheds.
        self.open_connections = Gauge("tiue_open_connections", "TCP connections open now.", registry=r)
        self.connections_refused = Counter(
            "tiue_connections_refused",
            "Connections closed as soon as accepted, because TIUE_MAX_CONNECTIONS were open.",
            registry=r,
        )
        self.connections_refused_per_address = Counter(
            "tiue_connections_refused_per_address",
            "Connections closed as soon as accepted, because their address had "
            "TIUE_MAX_CONNECTIONS_PER_ADDRESS open.",
            registry=r,
        )
        self.connections_evicted = Counter(
            "tiue_connections_evicted",
            "Connections waiting for a request (idle or still sending headers) closed to make room for a new one.",
            registry=r,
        )
        self.connections_timed_out = Counter(
            "tiue_connections_timed_out",
            "Connections closed because a request's headers took longer than TIUE_HEADER_TIMEOUT_S.",
            registry=r,
        )
        self.prompt_cache = _PromptCacheCollector()
        r.register(self.prompt_cache)
        for reason in REJECT_REASONS:
            self.rejected.labels(reason=reason, model=NO_MODEL)
        for reason in WASTE_REASONS:
            self.images_discarded.labels(reason=reason)
            self.images_skipped.labels(reason=reason)

    def add_model(self, name: str, info: ModelInfo) -> None:
        """A loaded model: its info series, and its zero series so that rates exist before traffic."""
        self.model_info.labels(
            model=name, backend=info.backend, precision=info.precision, device=info.device
        ).set(1)
        self.images_generated.labels(model=name)
        self.device_busy.labels(model=name)
        self.images_flagged.labels(model=name)
        self.queue_wait.labels(model=name)
        self.batch_size.labels(model=name)
        for reason in REJECT_REASONS:
            self.rejected.labels(reason=reason, model=name)
        for stage in STAGES:
            self.stage_duration.labels(stage=stage, model=name)

    def set_limits(self, queue_images: int, request_timeout_s: float) -> None:
        self.queue_capacity.set(queue_images)
        self.request_timeout.set(request_timeout_s)

    def track_prompt_cache(self, model: str, stats: Callable[[], tuple[int, int]]) -> None:
        """A model's prompt-embedding cache: `stats()` gives its (hits, misses), read at each scrape."""
        self.prompt_cache.models[model] = stats

    def track_queue_depth(self, depth: Callable[[], float]) -> None:
        self.queue_depth.set_function(depth)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _PromptCacheCollector(Collector):
    """tiue_prompt_cache_{hits,misses}_total{model}: the engine counts (engine.prompt_cache), we export."""

    def __init__(self) -> None:
        self.models: dict[str, Callable[[], tuple[int, int]]] = {}

    def describe(self) -> list[CounterMetricFamily]:
        return list(self._families())

    def collect(self) -> Iterator[CounterMetricFamily]:
        yield from self._families()

    def _families(self) -> Iterator[CounterMetricFamily]:
        hits = CounterMetricFamily(
            "tiue_prompt_cache_hits",
            "Distinct prompts of a batch whose text-encoder output was cached.",
            labels=["model"],
        )
        misses = CounterMetricFamily(
            "tiue_prompt_cache_misses",
            "Distinct prompts of a batch the text encoder ran for.",
            labels=["model"],
        )
        for model, stats in self.models.items():
            hit, miss = stats()
            hits.add_metric([model], hit)
            misses.add_metric([model], miss)
        yield hits
        yield misses


def _batch_buckets(max_batch_size: int) -> list[int]:
    """Every size up to 16, then powers of two, so the histogram shows the exact size of small batches."""
    sizes = list(range(1, min(max_batch_size, 16) + 1))
    size = 32
    while sizes[-1] < max_batch_size:
        sizes.append(min(size, max_batch_size))
        size *= 2
    return sizes
