"""Pure ASGI middleware (no BaseHTTPMiddleware, so disconnects and cancellation pass through untouched)."""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import Callable
from contextlib import AbstractContextManager, suppress
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.edge.logs import RequestRecord, log_access, request_context
from service.edge.paths import RoutePaths
from service.errors import MalformedRequest, Overloaded, PayloadTooLarge, RequestTimeout, error_response
from service.metrics import ServiceMetrics
from service.tracing import Tracing


class RequestMetricsMiddleware:
    """Outermost: gives each HTTP request its ID, log context and trace span (service.tracing), times it
    by route and status, answers a plain 500 for anything unhandled, and writes the request's one access
    line (with its trace ID), whatever became of it."""

    def __init__(
        self,
        app: ASGIApp,
        metrics: ServiceMetrics,
        routes: RoutePaths,
        quiet: frozenset[str] = frozenset(),
        tracing: Tracing | None = None,
    ):
        self.app = app
        self.metrics = metrics
        self.routes = routes  # known paths; anything else is labelled "other" to bound cardinality
        self.quiet = quiet  # probe and scrape paths: their access lines go out at debug, untraced
        self.tracing = tracing or Tracing()
        self._untraced = Tracing()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        record = _new_record(scope, self.routes)
        route = self.routes.match(scope["path"]) or "other"
        quiet = scope["path"] in self.quiet
        trace = (self._untraced if quiet else self.tracing).start_request(scope, route)
        if trace.trace_id is not None:
            record.fields["trace_id"] = trace.trace_id
        id_header = (REQUEST_ID_HEADER, record.request_id.encode("ascii"))
        status = 499  # nginx's "client closed request": what we record if no answer was started
        response_started = False

        async def send_and_record(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                status = message["status"]
                response_started = True
                message = {**message, "headers": [*message.get("headers", ()), id_header]}
            await send(message)

        with request_context(record):
            try:
                malformed = framing_error(scope["headers"])
                if malformed is not None:
                    await error_response(malformed, self.metrics)(scope, receive, send_and_record)
                    return
                await self.app(scope, receive, send_and_record)
            except Exception as exc:
                if response_started:
                    raise
                await error_response(exc, self.metrics)(scope, receive, send_and_record)
            finally:
                trace.finish(status)
                duration = time.perf_counter() - record.started
                self.metrics.request_duration.labels(
                    route=route, status=str(status), model=record.model
                ).observe(duration)
                log_access(record, status, duration, quiet=quiet)


_ONCE = (b"authorization", b"content-type")  # a second one: which would a proxy have read?


def framing_error(headers: list[tuple[bytes, bytes]]) -> MalformedRequest | None:
    """What h11 lets through but a proxy in front may read otherwise (request smuggling): a body framed both
    by Content-Length and Transfer-Encoding, or a header that must come once given twice."""
    names = [name for name, _ in headers]
    if b"content-length" in names and b"transfer-encoding" in names:
        return MalformedRequest("send either Content-Length or Transfer-Encoding, not both")
    for name in _ONCE:
        if names.count(name) > 1:
            return MalformedRequest(f"the {name.decode().title()} header is given {names.count(name)} times")
    return None


REQUEST_ID_HEADER = b"x-request-id"
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def _new_record(scope: Scope, routes: RoutePaths) -> RequestRecord:
    """The caller's X-Request-ID when it is a sane token (it reaches logs and headers), else a new one."""
    given = next((value for name, value in scope["headers"] if name == REQUEST_ID_HEADER), b"")
    text = given.decode("latin-1")
    rid = text if _REQUEST_ID.fullmatch(text) else uuid.uuid4().hex
    path = scope["path"]
    if path not in routes:  # the raw form: percent-escaped, so no newline can reach a text log
        raw = scope.get("raw_path") or path.encode("utf-8", "backslashreplace")
        path = raw.decode("ascii", "backslashreplace")[:200]
    client = scope.get("client")
    return RequestRecord(
        request_id=rid,
        method=scope["method"],
        route=path,
        client=f"{client[0]}:{client[1]}" if client else None,
        started=time.perf_counter(),
    )


class InFlightMiddleware:
    """Counts generation requests from their arrival (before the body is read) to their answer, and
    answers 503 with Retry-After beyond `limit` of them.

    Counting this early lets the batcher see a burst that has arrived but not yet been parsed.
    """

    def __init__(
        self,
        app: ASGIApp,
        track: Callable[[], AbstractContextManager[None]],
        paths: frozenset[str],
        limit: int,
        metrics: ServiceMetrics,
    ):
        self.app = app
        self.track = track
        self.paths = paths
        self.limit = limit
        self.metrics = metrics
        self.active = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in self.paths:
            await self.app(scope, receive, send)
            return
        if self.active >= self.limit:
            busy = Overloaded(f"the server is handling {self.limit} generation requests (TIUE_MAX_IN_FLIGHT)")
            await error_response(busy, self.metrics)(scope, receive, send)
            return
        self.active += 1
        try:
            with self.track():
                await self.app(scope, receive, send)
        finally:
            self.active -= 1


DISCARD_BYTES = 16 * 2**20  # of a body over the limit, read and dropped so that the 413 can be read


class BodyLimitMiddleware:
    """413 for a body over `max_bytes`, whether announced by Content-Length or streamed; never buffers more.
    408 for a body not received whole within `timeout_s` (a stalled client holds nothing for longer)."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics, max_bytes: int, timeout_s: float):
        self.app = app
        self.metrics = metrics
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            # Read and drop a body of up to DISCARD_BYTES first: closing with unread bytes resets the
            # connection, and the client would never read the 413. One that asked before sending
            # (Expect: 100-continue) or is larger gets the answer at once.
            if int(length) <= DISCARD_BYTES and headers.get(b"expect", b"").lower() != b"100-continue":
                await self._discard(receive)
            await error_response(self._too_large(), self.metrics)(scope, receive, send)
            return
        try:
            body = await asyncio.wait_for(self._read(receive), self.timeout_s)
        except PayloadTooLarge as exc:
            await self._discard(receive)
            await error_response(exc, self.metrics)(scope, receive, send)
            return
        except asyncio.TimeoutError:
            slow = RequestTimeout(
                f"the request body did not arrive within {self.timeout_s:g} s (TIUE_BODY_TIMEOUT_S)"
            )
            await error_response(slow, self.metrics)(scope, receive, send)
            return
        if body is not None:  # None: the client hung up
            await self.app(scope, _replay(body, receive), send)

    async def _read(self, receive: Receive) -> bytes | None:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                raise self._too_large()
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _discard(self, receive: Receive) -> None:
        """Read and drop the rest of the body, up to DISCARD_BYTES and the body timeout."""
        dropped = 0

        async def drop() -> None:
            nonlocal dropped
            while dropped <= DISCARD_BYTES:
                message = await receive()
                dropped += len(message.get("body", b""))
                if message["type"] != "http.request" or not message.get("more_body", False):
                    return

        with suppress(asyncio.TimeoutError):
            await asyncio.wait_for(drop(), self.timeout_s)

    def _too_large(self) -> PayloadTooLarge:
        return PayloadTooLarge(f"the request body is larger than {self.max_bytes} bytes")


def _replay(body: bytes, receive: Receive) -> Receive:
    """The body as one message, then the real receive (which later reports the client's disconnect)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


# CORS (TIUE_CORS_ORIGINS): what a page on an allowed origin may send and read. Bearer keys, not cookies,
# so no credentials; the preflight is answered before auth and the body limit (service.app).
CORS_HEADERS = ["Authorization", "Content-Type", "Accept", "X-Request-ID", "traceparent", "tracestate"]
CORS_EXPOSED = ["X-Request-ID", "X-Warning", "X-Seed", "X-Model", "X-Decoder", "Retry-After", "Server-Timing"]


def cors_options(origins: list[str]) -> dict[str, Any]:
    """Starlette's CORSMiddleware arguments for `origins` ("*": any origin)."""
    return {
        "allow_origins": origins,
        "allow_methods": ["GET", "POST"],
        "allow_headers": CORS_HEADERS,
        "expose_headers": CORS_EXPOSED,
        "max_age": 600,
    }
