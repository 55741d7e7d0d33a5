"""Connection limits uvicorn lacks: a cap on open connections and on those of one address (connections
waiting for a request are closed first to make room), a header timeout, JSON answers to malformed requests,
and accept errors (out of file descriptors) that become one log line per interval, not a traceback each."""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable
from enum import Enum
from http import HTTPStatus
from typing import Any, ClassVar

import h11
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from service.edge.logs import RequestRecord, log_access, request_context
from service.errors import MalformedRequest, Overloaded, RequestTimeout, ShuttingDown, error_response
from service.metrics import ServiceMetrics

logger = logging.getLogger(__name__)

LOG_INTERVAL_S = 10.0
PROBE_SLOTS = 8  # connections over the cap that may still ask for /livez, /readyz or /metrics, once each
PROBE_HEADER_TIMEOUT_S = 1.0  # a probe asks at once; idle connections must not sit in its slots
_OUT_OF_RESOURCES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


class EveryInterval:
    """Counts events; logs the first at once, then their number at most once per interval (flood → a line)."""

    def __init__(self, log: Callable[[int, float], None], interval_s: float = LOG_INTERVAL_S):
        self._log = log
        self.interval_s = interval_s
        self.total = 0
        self._pending = 0
        self._last = -float("inf")

    def note(self) -> None:
        self.total += 1
        self._pending += 1
        self.flush()

    def flush(self) -> None:
        """Log what is pending if the interval is over; the server calls this on every tick."""
        now = time.monotonic()
        if self._pending and now - self._last >= self.interval_s:
            self._log(self._pending, self.interval_s)
            self._pending = 0
            self._last = now


class Slot(Enum):
    """What a new connection gets: served, health routes only (over the cap), or closed at once."""

    SERVE = "serve"
    PROBES_ONLY = "probes_only"
    REFUSE = "refuse"


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class TrustedProxies:
    """TIUE_FORWARDED_ALLOW_IPS: the addresses whose forwarded headers are believed ("*": any, "": none)."""

    def __init__(self, spec: str):
        entries = [part.strip() for part in spec.split(",") if part.strip()]
        self.spec = ",".join(entries)
        self.any = "*" in entries
        self.networks: list[Network] = []
        for entry in entries:
            if entry != "*":
                try:
                    self.networks.append(ipaddress.ip_network(entry, strict=False))
                except ValueError as exc:
                    raise ValueError(
                        f"forwarded_allow_ips: '{entry}' is not an address or CIDR range"
                    ) from exc

    def __contains__(self, host: object) -> bool:
        if self.any:
            return True
        try:
            address = ipaddress.ip_address(str(host))
        except ValueError:
            return False
        return any(address in network for network in self.networks)


class ConnectionGuard:
    """What every connection of one server shares: the counts against the caps (all, and per address),
    timeouts, draining, logs. Connections waiting for a request are closed to make room before any is
    refused; a trusted proxy (TIUE_FORWARDED_ALLOW_IPS) carries many clients and has no per-address cap."""

    def __init__(
        self,
        *,
        max_connections: int,
        header_timeout_s: float,
        probe_paths: frozenset[str],
        metrics: ServiceMetrics,
        max_per_address: int | None = None,
        trusted: TrustedProxies | None = None,
    ):
        self.max_connections = max_connections
        self.max_per_address = max_per_address or max_connections
        self.trusted = trusted or TrustedProxies("")
        self.header_timeout_s = header_timeout_s
        self.probe_paths = probe_paths
        self.metrics = metrics
        self.open = 0  # serving + probes only
        self.probing = 0  # open over the cap, for the health routes only
        self.by_address: Counter[str] = Counter()
        self.connections: dict[GuardedH11Protocol, str] = {}  # counted ones, oldest first
        self.draining = False  # every answer then closes its connection, so clients reconnect elsewhere
        metrics.open_connections.set_function(lambda: self.open)
        self.refusals = EveryInterval(self._log_refusals)
        self.address_refusals = EveryInterval(self._log_address_refusals)
        self.accept_errors = EveryInterval(self._log_accept_errors)

    def admit(self, connection: GuardedH11Protocol, address: str) -> Slot:
        if self.by_address[address] >= self.max_per_address and address not in self.trusted:
            self.metrics.connections_refused_per_address.inc()
            self.address_refusals.note()
            return Slot.REFUSE
        if self.open - self.probing >= self.max_connections:
            self._evict_one_waiting()
        if self.open - self.probing < self.max_connections:
            slot = Slot.SERVE
        elif self.probing < PROBE_SLOTS:
            slot = Slot.PROBES_ONLY
            self.probing += 1
        else:
            self.metrics.connections_refused.inc()
            self.refusals.note()
            return Slot.REFUSE
        self.open += 1
        self.by_address[address] += 1
        self.connections[connection] = address
        return slot

    def release(self, connection: GuardedH11Protocol) -> None:
        address = self.connections.pop(connection, None)
        if address is None:
            return
        self.open -= 1
        self.probing -= connection.probes_only
        self.by_address[address] -= 1
        if not self.by_address[address]:
            del self.by_address[address]

    def _evict_one_waiting(self) -> None:
        """Close the oldest connection that waits for a request (kept alive, or still sending headers),
        from the address that holds the most: the cheapest to lose, and one a client reopens at will."""
        victim = max(
            (c for c in self.connections if not c.probes_only and c.waiting_for_request()),
            key=lambda c: self.by_address[self.connections[c]],
            default=None,
        )
        if victim is not None:
            self.metrics.connections_evicted.inc()
            victim.evict()

    def flush_logs(self) -> None:
        self.refusals.flush()
        self.address_refusals.flush()
        self.accept_errors.flush()

    def exception_handler(
        self, previous: Callable[[asyncio.AbstractEventLoop, dict[str, Any]], object] | None
    ) -> Callable[[asyncio.AbstractEventLoop, dict[str, Any]], None]:
        """An event-loop exception handler that counts accept() failing for lack of file descriptors.

        asyncio (3.11) logs a traceback for each failed accept() and goes on trying the rest of the
        backlog (2048) in the same call, each also scheduling a retry: thousands of tracebacks a second."""

        def handle(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
            exc = context.get("exception")
            retry = getattr(getattr(context.get("handle"), "_callback", None), "__name__", "")
            if isinstance(exc, OSError) and exc.errno in _OUT_OF_RESOURCES and "accept" in context["message"]:
                self.accept_errors.note()
            elif retry == "_start_serving":
                # Each failed accept() above also scheduled a retry; those left when the server closes
                # its socket fail with "Invalid file descriptor", one traceback each. Nothing is lost.
                logger.debug("accept() retry after the listening socket closed: %s", exc)
            elif previous is not None:
                previous(loop, context)
            else:
                loop.default_exception_handler(context)

        return handle

    def _log_refusals(self, count: int, interval_s: float) -> None:
        logger.warning(
            "%d connections refused in the last %.0f s: %d open is the limit (TIUE_MAX_CONNECTIONS)",
            count,
            interval_s,
            self.max_connections,
        )

    def _log_address_refusals(self, count: int, interval_s: float) -> None:
        logger.warning(
            "%d connections refused in the last %.0f s: their address had %d open, the limit for one "
            "address (TIUE_MAX_CONNECTIONS_PER_ADDRESS; behind a proxy, set TIUE_FORWARDED_ALLOW_IPS)",
            count,
            interval_s,
            self.max_per_address,
        )

    def _log_accept_errors(self, count: int, interval_s: float) -> None:
        logger.error(
            "accept() failed %d times in the last %.0f s: out of file descriptors, %d connections open "
            "(raise the open-file limit or lower TIUE_MAX_CONNECTIONS); it retries every second",
            count,
            interval_s,
            self.open,
        )


def _closing(send: Send) -> Send:
    """`send` with `Connection: close` on the answer (h11 then closes the connection after it)."""

    async def send_closing(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
        await send(message)

    return send_closing


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with the guard's cap and a header timeout; `protocol_class` binds a guard."""

    guard: ClassVar[ConnectionGuard]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.app = self._guarded(self.app)
        self._header_timer: asyncio.TimerHandle | None = None
        self._counted = False
        self.probes_only = False  # set before the guard counts it: the guard reads it on release

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        slot = self.guard.admit(self, self.client[0] if self.client else "")
        if slot is Slot.REFUSE:
            transport.abort()  # no FIN handshake to wait for, no buffered bytes to flush
            return
        self._counted = True
        self.probes_only = slot is Slot.PROBES_ONLY
        self._arm_header_timer()

    def waiting_for_request(self) -> bool:
        """No request is being handled: a fresh or kept-alive connection, or one still sending headers."""
        return self.conn.their_state is h11.IDLE and (self.cycle is None or self.cycle.response_complete)

    def evict(self) -> None:
        """Closed to make room: no longer counted from now on (its connection_lost comes later)."""
        self._release()
        self._cancel_header_timer()
        self.transport.close()

    def _release(self) -> None:
        if self._counted:
            self._counted = False
            self.guard.release(self)

    def _header_timeout_s(self) -> float:
        limit = self.guard.header_timeout_s
        return min(limit, PROBE_HEADER_TIMEOUT_S) if self.probes_only else limit

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        self._release()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:
            self._cancel_header_timer()  # the headers are in (or the request was refused)
        elif self._header_timer is None and not self.transport.is_closing():
            self._arm_header_timer()  # the first bytes of the next request on a kept-alive connection

    def send_400_response(self, msg: str) -> None:
        """A request h11 cannot parse (garbage request line, conflicting Content-Length, TE other than
        chunked...): the JSON error every other answer has, with a request ID that its log line carries,
        instead of uvicorn's plain text. Called inside h11's `except`, so the error is at hand."""
        error = sys.exc_info()[1]
        status = getattr(error, "error_status_hint", 400)
        reason = f": {error}" if isinstance(error, h11.RemoteProtocolError) and str(error) else ""
        record = RequestRecord(uuid.uuid4().hex, "-", "-", _peer(self.client), time.perf_counter())
        with request_context(record):
            bad = MalformedRequest(f"the request is not valid HTTP/1.1{reason}", status_code=status)
            response = error_response(bad, self.guard.metrics)
            response.headers["x-request-id"] = record.request_id
            log_access(record, status, time.perf_counter() - record.started)
        self._cancel_header_timer()
        if not self.transport.is_closing():
            self.transport.write(_raw_response(response))
            self.transport.close()

    def _arm_header_timer(self) -> None:
        self._header_timer = self.loop.call_later(self._header_timeout_s(), self._header_timeout)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        self.guard.metrics.connections_timed_out.inc()
        if self.conn.trailing_data[0]:  # part of a request came: say why it is cut off
            slow = RequestTimeout(
                f"the request headers did not arrive within {self._header_timeout_s():g} s "
                "(TIUE_HEADER_TIMEOUT_S)"
            )
            self.transport.write(_raw_response(error_response(slow, self.guard.metrics)))
        self.transport.close()

    def _guarded(self, app: ASGIApp) -> ASGIApp:
        """The app as this connection serves it: probes only over the cap, closing while draining, and a
        503 (never uvicorn's 500) for a request that uvicorn cancels at the end of shutdown."""
        guard = self.guard

        async def guarded(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http":
                await app(scope, receive, send)
                return
            if self.probes_only or guard.draining:
                send = _closing(send)
            if self.probes_only and scope["path"] not in guard.probe_paths:
                busy = Overloaded(f"{guard.max_connections} connections are open (TIUE_MAX_CONNECTIONS)")
                await error_response(busy, guard.metrics)(scope, receive, send)
                return
            started = False

            async def send_tracked(message: Message) -> None:
                nonlocal started
                started = started or message["type"] == "http.response.start"
                await send(message)

            try:
                await app(scope, receive, send_tracked)
            except asyncio.CancelledError:
                if started:
                    raise
                logger.warning(
                    "%s %s was still running when the server stopped", scope["method"], scope["path"]
                )
                gone = ShuttingDown("the server shut down before this request was answered")
                await error_response(gone, guard.metrics)(scope, receive, _closing(send))

        return guarded


def protocol_class(guard: ConnectionGuard) -> type[GuardedH11Protocol]:
    """The protocol class to pass as uvicorn's `Config(http=...)`, its connections bound to `guard`."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"guard": guard})


def _peer(client: tuple[str, int] | None) -> str | None:
    return f"{client[0]}:{client[1]}" if client else None


def _raw_response(response: Response) -> bytes:
    """A starlette Response as HTTP/1.1 bytes, for answers written outside any request cycle."""
    head = [f"HTTP/1.1 {response.status_code} {HTTPStatus(response.status_code).phrase}".encode("ascii")]
    head += [name + b": " + value for name, value in response.raw_headers]
    return b"\r\n".join(head) + b"\r\n\r\n" + bytes(response.body)
