"""OpenTelemetry traces of a request's path: off, and free, unless the SDK is installed and `OTEL_*` asks.

Spans: the request (`POST /v1/images/generations`, a server span; its parent is the caller's W3C
`traceparent` when sent), and under it `admission`, `queue_wait` and `image_encode`. Each device batch is
a `batch` span of its own trace, linked to the span of every request that rode in it, with one child
span per device stage (`text_encode`, `denoise`, `vae_decode`). The pipeline reports each stage's
duration after the batch; their spans are laid back to back, ending when the batch's call returned.

Configuration is OpenTelemetry's own environment: `OTEL_TRACES_EXPORTER` (otlp, console, none),
`OTEL_EXPORTER_OTLP_ENDPOINT` (setting it alone turns OTLP export on), `OTEL_EXPORTER_OTLP_PROTOCOL`,
`OTEL_SERVICE_NAME`, `OTEL_TRACES_SAMPLER`, `OTEL_BSP_*`, `OTEL_SDK_DISABLED`. Without any of them, or
without the SDK (`pip install 'tiue-serve[otel]'`), every method here returns at once and nothing of
OpenTelemetry is imported; the access line still carries the caller's trace ID.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

from engine.types import DEVICE_STAGES

logger = logging.getLogger(__name__)

TRACER_NAME = "tiue-serve"
_TRACEPARENT = re.compile(r"[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}")
_ZERO_TRACE = "0" * 32
_EXPORTERS = ("otlp", "console")
_NO_SPAN: AbstractContextManager[None] = nullcontext()


def incoming_trace_id(headers: Sequence[tuple[bytes, bytes]]) -> str | None:
    """The trace ID of a valid W3C `traceparent` header, else None."""
    for name, value in headers:
        if name == b"traceparent":
            match = _TRACEPARENT.fullmatch(value.decode("latin-1").strip())
            if match and match.group(1) != _ZERO_TRACE:
                return match.group(1)
            return None
    return None


def wall_ns(monotonic_s: float) -> int:
    """A `time.monotonic()` instant as Unix nanoseconds (what span times are)."""
    return time.time_ns() - int((time.monotonic() - monotonic_s) * 1e9)


@dataclass
class RequestTrace:
    """One HTTP request's span (None when tracing is off) and the trace ID its access line shows."""

    trace_id: str | None
    span: Any = None
    token: Any = None  # the context attached while the request runs

    def finish(self, status: int) -> None:
        if self.span is None:
            return
        from opentelemetry import context
        from opentelemetry.trace import StatusCode

        self.span.set_attribute("http.response.status_code", status)
        if status >= 500:
            self.span.set_status(StatusCode.ERROR)
        self.span.end()
        context.detach(self.token)


class Tracing:
    """The app's tracer, or none (off). Built once by `create_app`, from the environment unless given."""

    def __init__(self, provider: Any = None, *, owned: bool = False):
        self._provider = provider
        self._owned = owned  # built here from OTEL_*: flushed and shut down with the app
        self._tracer = provider.get_tracer(TRACER_NAME) if provider is not None else None

    @property
    def enabled(self) -> bool:
        return self._tracer is not None

    @classmethod
    def from_env(cls) -> Tracing:
        """A tracer provider exporting as `OTEL_*` says; off when nothing asks for traces or the SDK is absent.
        (The exporters read their own `OTEL_EXPORTER_OTLP_*` settings from the process's environment.)"""
        env = os.environ
        exporters = wanted_exporters(env)
        if not exporters:
            return cls()
        try:
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor

            processors = [BatchSpanProcessor(_exporter(name, env)) for name in exporters]
        except ImportError as exc:
            logger.warning(
                "OTEL_* asks for traces but %s is not installed (pip install 'tiue-serve[otel]'); tracing is off",
                exc.name,
            )
            return cls()
        resource = Resource.create()
        if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
            resource = resource.merge(Resource({"service.name": TRACER_NAME}))
        provider = TracerProvider(resource=resource)
        for processor in processors:
            provider.add_span_processor(processor)
        logger.info("tracing on: exporting spans to %s", ", ".join(exporters))
        return cls(provider, owned=True)

    def shutdown(self) -> None:
        """Export what is buffered and stop (only a provider this object built itself)."""
        if self._owned and self._provider is not None:
            self._provider.shutdown()

    def start_request(self, scope: Mapping[str, Any], route: str) -> RequestTrace:
        """The request's server span, child of the caller's `traceparent`, made current until `finish`."""
        if self._tracer is None:
            return RequestTrace(incoming_trace_id(scope["headers"]))
        from opentelemetry import context, propagate, trace
        from opentelemetry.trace import SpanKind

        fields = propagate.get_global_textmap().fields  # traceparent, tracestate, baggage (OTEL_PROPAGATORS)
        carrier = {
            key: value.decode("latin-1")
            for name, value in scope["headers"]
            if (key := name.decode("latin-1")) in fields
        }
        span = self._tracer.start_span(
            f"{scope['method']} {route}",
            context=propagate.extract(carrier),
            kind=SpanKind.SERVER,
            attributes={
                "http.request.method": scope["method"],
                "http.route": route,
                "url.path": scope["path"],
            },
        )
        token = context.attach(trace.set_span_in_context(span))
        return RequestTrace(format(span.get_span_context().trace_id, "032x"), span, token)

    def span(self, name: str, **attributes: Any) -> AbstractContextManager[Any]:
        """A child of the current span for the block (a no-op when off)."""
        if self._tracer is None:
            return _NO_SPAN
        return self._tracer.start_as_current_span(name, attributes=_attributes(attributes))

    def current(self) -> Any:
        """The current span's context, for a batch span to link to (None when off)."""
        if self._tracer is None:
            return None
        from opentelemetry import trace

        return trace.get_current_span().get_span_context()

    def queue_wait(self, parent: Any, enqueued_at: float, formed_at: float, batch_id: int) -> None:
        """A request's wait in the queue (monotonic seconds), as a child of its request's span."""
        if self._tracer is None or parent is None:
            return
        from opentelemetry import trace

        span = self._tracer.start_span(
            "queue_wait",
            context=trace.set_span_in_context(trace.NonRecordingSpan(parent)),
            start_time=wall_ns(enqueued_at),
            attributes={"tiue.batch_id": batch_id},
        )
        span.end(end_time=wall_ns(formed_at))

    def batch(self, record: BatchRecord) -> None:
        """A device batch's span, linked to every request in it, and one child span per device stage."""
        if self._tracer is None:
            return
        from opentelemetry import trace
        from opentelemetry.trace import Link, StatusCode

        end_ns = record.started_ns + int(record.seconds * 1e9)
        span = self._tracer.start_span(
            "batch",
            context=trace.set_span_in_context(trace.INVALID_SPAN),  # a root: it belongs to no one request
            links=[Link(parent) for parent in record.requests if parent is not None],
            start_time=record.started_ns,
            attributes=_attributes(record.attributes),
        )
        if record.error is not None:
            span.record_exception(record.error)
            span.set_status(StatusCode.ERROR, f"{type(record.error).__name__}: {record.error}")
        inside = trace.set_span_in_context(span)
        stages = [(stage, record.timings[stage]) for stage in DEVICE_STAGES if stage in record.timings]
        start_ns = max(record.started_ns, end_ns - int(sum(seconds for _stage, seconds in stages) * 1e9))
        for stage, seconds in stages:
            stage_end = start_ns + int(seconds * 1e9)
            self._tracer.start_span(stage, context=inside, start_time=start_ns).end(end_time=stage_end)
            start_ns = stage_end
        span.end(end_time=end_ns)


@dataclass
class BatchRecord:
    """What the device worker knows of a batch once it ran: when, how long, for whom, and its stages."""

    started_ns: int  # Unix nanoseconds
    seconds: float
    requests: list[Any]  # the span context of each request in it (None: untraced)
    attributes: dict[str, Any]
    timings: Mapping[str, float]  # seconds per device stage
    error: BaseException | None = None


def wanted_exporters(env: Mapping[str, str]) -> list[str]:
    """Which exporters `OTEL_*` asks for: none unless OTEL_TRACES_EXPORTER names one, or an OTLP endpoint
    is set; `OTEL_SDK_DISABLED=true` turns everything off."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    named = [part.strip().lower() for part in env.get("OTEL_TRACES_EXPORTER", "").split(",") if part.strip()]
    if not named:
        endpoints = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        return ["otlp"] if any(env.get(name, "").strip() for name in endpoints) else []
    unknown = [name for name in named if name not in (*_EXPORTERS, "none")]
    if unknown:
        logger.warning(
            "OTEL_TRACES_EXPORTER: %s not supported here (otlp, console, none)", ", ".join(unknown)
        )
    return [name for name in named if name in _EXPORTERS]


def _exporter(name: str, env: Mapping[str, str]) -> Any:
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    protocol = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or ""
    if protocol.strip().lower() == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    else:  # http/protobuf, OpenTelemetry's default
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # type: ignore[assignment]
            OTLPSpanExporter,
        )
    return OTLPSpanExporter()  # endpoint, headers, timeout, compression: from OTEL_EXPORTER_OTLP_*


def _attributes(values: Mapping[str, Any]) -> dict[str, Any]:
    return {f"tiue.{key}": value for key, value in values.items() if value is not None}
