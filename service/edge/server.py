"""Running the app under uvicorn: connection limits (service.edge.connections), the open-file limit, and the
shutdown docs/api.md promises: keep serving 503s while queued work drains, then 503 JSON, never a 500."""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import socket
import threading
from types import FrameType

import uvicorn
from fastapi import FastAPI

from service.edge.connections import ConnectionGuard, TrustedProxies, protocol_class
from service.routes import health
from service.settings import FD_RESERVE, Settings
from service.state import ServiceState

logger = logging.getLogger(__name__)

# After the drain, uvicorn's own graceful timeout: for the last answers (503s among them) to be written
# before it cancels what is left. terminationGracePeriodSeconds covers preStop + the grace + this.
WRITE_OUT_S = 3.0


class TiueServer(uvicorn.Server):
    """The first SIGTERM/SIGINT drains (the socket stays open; /readyz and new work get 503) and exits when
    the queue is done or the grace is over; a second signal exits at once."""

    def __init__(self, config: uvicorn.Config, state: ServiceState, guard: ConnectionGuard):
        super().__init__(config)
        self.state = state
        self.guard = guard
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_requested = False
        self._drain_task: asyncio.Task[None] | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = loop = asyncio.get_running_loop()
        previous = loop.get_exception_handler()
        loop.set_exception_handler(self.guard.exception_handler(previous))
        yielding = loop.create_task(self._yield_to_device(), name="tiue-nice")
        try:
            await super().serve(sockets)
        finally:
            yielding.cancel()
            loop.set_exception_handler(previous)
            self.guard.flush_logs()

    async def _yield_to_device(self) -> None:
        """Once ready (the device thread exists, at nice 0), lower this thread's priority by
        TIUE_EVENT_LOOP_NICE: on a busy CPU, answering (and refusing) requests must not take the device's
        time. Threads started from here later (image encoding) inherit it. Linux only; never raised back."""
        nice = self.state.settings.event_loop_nice
        if not nice:
            return
        await self.state.ready.wait()
        tid = threading.get_native_id()
        try:
            os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + nice)
        except (AttributeError, OSError) as exc:
            logger.info("the event loop keeps its priority (TIUE_EVENT_LOOP_NICE=%d: %s)", nice, exc)

    async def on_tick(self, counter: int) -> bool:
        self.guard.flush_logs()  # a count held back by the log interval goes out within 0.1 s of its end
        return await super().on_tick(counter)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """Called in the signal handler: it must not touch loop state, only schedule."""
        loop = self._loop
        if self._drain_requested or loop is None or loop.is_closed():
            super().handle_exit(sig, frame)
            if self._drain_requested and loop is not None and not loop.is_closed():  # the second signal
                self.force_exit = True
                loop.call_soon_threadsafe(self.state.worker.abandon)  # 503s, written as uvicorn closes
            return
        self._drain_requested = True
        loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        self.guard.draining = True
        self._drain_task = asyncio.get_running_loop().create_task(self._drain(), name="tiue-drain")

    async def _drain(self) -> None:
        try:
            await self.state.drain()
        except Exception:
            logger.exception("draining failed; stopping now")
        finally:
            self.should_exit = True


def raise_open_file_limit() -> int:
    """Raise the soft open-file limit to the hard one (any process may); returns the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:  # e.g. an unlimited hard limit above the kernel's nr_open
            logger.info("open-file limit stays at %d (could not raise it to %d: %s)", soft, hard, exc)
        else:
            soft = hard
    return soft


def connection_limit(settings: Settings, open_files: int) -> int:
    """TIUE_MAX_CONNECTIONS, lowered to what the open-file limit allows (every connection is a file;
    FD_RESERVE covers the rest, the probe slots over the cap included)."""
    if open_files == resource.RLIM_INFINITY:
        return settings.max_connections
    usable = max(1, open_files - FD_RESERVE)
    if settings.max_connections > usable:
        logger.warning(
            "TIUE_MAX_CONNECTIONS=%d is more than an open-file limit of %d allows; serving at most %d",
            settings.max_connections,
            open_files,
            usable,
        )
        return usable
    return settings.max_connections


def build_server(app: FastAPI, settings: Settings) -> TiueServer:
    """The uvicorn server for `app` (from `create_app`), with the connection limits and the drain."""
    state: ServiceState = app.state.tiue
    max_connections = connection_limit(settings, raise_open_file_limit())
    trusted = TrustedProxies(settings.forwarded_allow_ips)
    guard = ConnectionGuard(
        max_connections=max_connections,
        header_timeout_s=settings.header_timeout_s,
        probe_paths=frozenset(getattr(route, "path", "") for route in health.router.routes),
        metrics=state.metrics,
        max_per_address=settings.per_address_limit(max_connections),
        trusted=trusted,
    )
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        lifespan="on",
        log_config=None,
        log_level=settings.log_level.value,
        access_log=False,  # the service writes its own access line, with the request ID (service.edge.logs)
        http=protocol_class(guard),
        # X-Forwarded-For/-Proto only from TIUE_FORWARDED_ALLOW_IPS (uvicorn alone trusts 127.0.0.1, and a
        # spoofed address would be a new client to the fair queue and the rate limiter).
        proxy_headers=bool(trusted.spec),
        forwarded_allow_ips=trusted.spec or "",
        ws="none",  # no websocket routes; an upgraded connection would leave the guard's count
        # Both only reach loop.call_later / asyncio.wait_for, which take float seconds (0.5 stays 0.5).
        timeout_keep_alive=settings.keep_alive_timeout_s,  # type: ignore[arg-type]
        timeout_graceful_shutdown=WRITE_OUT_S,  # type: ignore[arg-type]
    )
    return TiueServer(config, state, guard)
