"""OpenTelemetry traces over a real uvicorn: the caller's traceparent, the spans of a request's path, a batch
span linked to both requests batched together, its stage spans; off by default; OTLP export over HTTP."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from fakes import FakeEngine, make_settings, wait_until
from serving import uvicorn_app

from service.app import create_app
from service.edge.logs import LogFormat, make_handler
from service.tracing import Tracing, incoming_trace_id, wanted_exporters

otel_sdk = pytest.importorskip(
    "opentelemetry.sdk.trace", reason="pip install -e '.[dev]' (opentelemetry-sdk)"
)
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402
from opentelemetry.trace import SpanKind  # noqa: E402

ROUTE = "/v1/images/generations"
TRACES = ["0af7651916cd43dd8448eb211c80319c", "4bf92f3577b34da6a3ce929d0e0e4736"]
PARENTS = ["b7ad6b7169203331", "00f067aa0ba902b7"]
ROOT = Path(__file__).parents[2]


def traceparent(index: int) -> str:
    return f"00-{TRACES[index]}-{PARENTS[index]}-01"


@pytest.fixture
def exported() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def access_records() -> Iterator[list[logging.LogRecord]]:
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("tiue.access")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@asynccontextmanager
async def traced_server(engine: FakeEngine, tracing: Tracing | None) -> AsyncIterator[tuple[str, Any]]:
    app = create_app(make_settings(max_batch_size=4), pipeline_factory=lambda: engine, tracing=tracing)
    try:
        async with uvicorn_app(app) as url:
            yield url, app
    finally:
        engine.gate.set()


def by_name(spans: list[ReadableSpan], name: str) -> list[ReadableSpan]:
    return [span for span in spans if span.name == name]


async def two_requests_batched_together(url: str, app: Any, engine: FakeEngine) -> list[httpx.Response]:
    """A first request holds the device; the two traced ones queue meanwhile and then share a batch."""
    engine.gate.clear()
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        first = asyncio.create_task(client.post(ROUTE, json={"prompt": "hold", "seed": 1}))
        await engine.wait_entered()
        traced = [
            asyncio.create_task(
                client.post(
                    ROUTE,
                    json={"prompt": "a red circle", "seed": 10 + i},
                    headers={"traceparent": traceparent(i)},
                )
            )
            for i in range(2)
        ]
        await wait_until(lambda: app.state.tiue.batcher.pending_images == 2, timeout=10)
        engine.gate.set()
        responses = await asyncio.gather(first, *traced)
    assert [len(batch) for batch in engine.batches] == [1, 2]
    return responses[1:]


async def test_a_traced_request_and_its_batch(
    engine: FakeEngine, exported: InMemorySpanExporter, access_records: list[logging.LogRecord]
) -> None:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exported))
    engine.compute_s = 0.02  # longer than the stage timings the fake reports (7 ms in all)
    async with traced_server(engine, Tracing(provider)) as (url, app):
        responses = await two_requests_batched_together(url, app, engine)
    assert all(response.status_code == 200 for response in responses), [r.text for r in responses]
    spans = list(exported.get_finished_spans())

    requests = []
    for trace_hex, parent_hex in zip(TRACES, PARENTS, strict=True):
        (request,) = [
            s for s in by_name(spans, f"POST {ROUTE}") if format(s.context.trace_id, "032x") == trace_hex
        ]
        assert request.kind is SpanKind.SERVER
        assert request.parent is not None and format(request.parent.span_id, "016x") == parent_hex
        assert request.attributes is not None and request.attributes["http.response.status_code"] == 200
        children = [s for s in spans if s.parent is not None and s.parent.span_id == request.context.span_id]
        assert sorted(s.name for s in children) == ["admission", "image_encode", "queue_wait"]
        assert all(s.context.trace_id == request.context.trace_id for s in children)
        requests.append(request)

    batches = by_name(spans, "batch")
    assert len(batches) == 2  # the holding request's, then the traced pair's
    (pair,) = [b for b in batches if b.attributes is not None and b.attributes["tiue.images"] == 2]
    assert pair.parent is None  # a batch belongs to no one request: it links to each
    assert {link.context.span_id for link in pair.links} == {r.context.span_id for r in requests}
    assert {link.context.trace_id for link in pair.links} == {r.context.trace_id for r in requests}

    stages = sorted(
        (s for s in spans if s.parent is not None and s.parent.span_id == pair.context.span_id),
        key=lambda s: s.start_time or 0,
    )
    assert [s.name for s in stages] == ["text_encode", "denoise", "vae_decode"]
    for before, after in zip(stages, stages[1:], strict=False):
        assert before.end_time == after.start_time  # back to back
    assert pair.start_time is not None and stages[0].start_time is not None
    assert pair.start_time <= stages[0].start_time and stages[-1].end_time == pair.end_time
    durations = [((s.end_time or 0) - (s.start_time or 0)) / 1e9 for s in stages]
    assert durations == pytest.approx([0.001, 0.004, 0.002], abs=2e-9)  # the fake engine's timings

    # The access line carries the trace ID, in both log formats.
    lines = [r for r in access_records if r.getMessage().startswith(f"POST {ROUTE} 200")]
    traced = [r for r in lines if r.fields.get("trace_id") in TRACES]  # type: ignore[attr-defined]
    assert len(traced) == 2
    assert TRACES[0] in {json.loads(make_handler(LogFormat.JSON).format(r))["trace_id"] for r in traced}
    assert any(f"trace_id={TRACES[0]}" in make_handler(LogFormat.TEXT).format(r) for r in traced)


@pytest.fixture
def no_otel_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [name for name in os.environ if name.startswith("OTEL_")]:
        monkeypatch.delenv(name)


@pytest.mark.usefixtures("no_otel_env")
async def test_off_tracing_still_logs_the_callers_trace_id(
    engine: FakeEngine, access_records: list[logging.LogRecord]
) -> None:
    assert not Tracing.from_env().enabled
    async with traced_server(engine, None) as (url, app), httpx.AsyncClient(base_url=url) as client:
        assert not app.state.tiue.tracing.enabled
        given = await client.post(ROUTE, json={"prompt": "x"}, headers={"traceparent": traceparent(0)})
        bad = await client.post(ROUTE, json={"prompt": "x"}, headers={"traceparent": "00-nothex-01"})
    assert given.status_code == bad.status_code == 200
    fields = [r.fields for r in access_records if r.getMessage().startswith("POST")]  # type: ignore[attr-defined]
    assert [f.get("trace_id") for f in fields] == [TRACES[0], None]


@pytest.mark.parametrize(
    ("env", "exporters"),
    [
        ({}, []),
        ({"OTEL_SERVICE_NAME": "x"}, []),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, ["otlp"]),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, ["otlp"]),
        ({"OTEL_TRACES_EXPORTER": "console"}, ["console"]),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, []),
        ({"OTEL_TRACES_EXPORTER": "otlp,zipkin"}, ["otlp"]),
        ({"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "otlp"}, []),
    ],
)
def test_only_otel_variables_turn_tracing_on(env: dict[str, str], exporters: list[str]) -> None:
    assert wanted_exporters(env) == exporters


def test_without_the_sdk_tracing_is_off_and_says_why(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
    monkeypatch.setitem(sys.modules, "opentelemetry.sdk.trace", None)  # as if not installed
    with caplog.at_level(logging.WARNING, logger="service.tracing"):
        assert not Tracing.from_env().enabled
    assert "opentelemetry.sdk.trace is not installed (pip install 'tiue-serve[otel]')" in caplog.text


@pytest.mark.parametrize(
    ("header", "trace_id"),
    [
        (traceparent(1), TRACES[1]),
        (f"00-{'0' * 32}-{PARENTS[0]}-01", None),  # the all-zero trace ID is invalid
        (traceparent(1).upper(), None),
        ("00-abc-def-01", None),
    ],
)
def test_incoming_trace_ids(header: str, trace_id: str | None) -> None:
    assert incoming_trace_id([(b"accept", b"*/*"), (b"traceparent", header.encode())]) == trace_id


class _Receiver(BaseHTTPRequestHandler):
    received: list[tuple[str, str, bytes]] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.received.append((self.path, self.headers["Content-Type"], body))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def test_otlp_export_over_http_to_a_local_collector(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("opentelemetry.exporter.otlp.proto.http", reason="pip install -e '.[dev]'")
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    _Receiver.received = []
    collector = ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    thread = threading.Thread(target=collector.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{collector.server_port}")
        tracing = Tracing.from_env()
        assert tracing.enabled
        scope = {"method": "POST", "path": ROUTE, "headers": [(b"traceparent", traceparent(0).encode())]}
        trace = tracing.start_request(scope, ROUTE)
        trace.finish(200)
        tracing.shutdown()  # flushes the batch processor
    finally:
        collector.shutdown()
        thread.join()
    ((path, media, body),) = _Receiver.received
    assert path == "/v1/traces" and media == "application/x-protobuf"
    export = ExportTraceServiceRequest.FromString(body)
    (resource,) = export.resource_spans
    service = {a.key: a.value.string_value for a in resource.resource.attributes}["service.name"]
    (span,) = [s for scoped in resource.scope_spans for s in scoped.spans]
    assert service == "tiue-serve" and span.name == f"POST {ROUTE}"
    assert span.trace_id.hex() == TRACES[0] and span.parent_span_id.hex() == PARENTS[0]


def test_the_engine_knows_nothing_of_tracing() -> None:
    sources = [path for path in (ROOT / "engine").rglob("*.py") if "opentelemetry" in path.read_text()]
    assert sources == []
