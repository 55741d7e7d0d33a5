"""Test helpers for the server as deployed (service.edge.server on 127.0.0.1): in this process, or in its own."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn
from fakes import FakeEngine, make_settings, wait_until
from fastapi import FastAPI

from service.app import create_app
from service.edge.server import TiueServer, build_server
from service.state import ServiceState


@dataclass
class Served:
    url: str
    port: int
    app: FastAPI
    server: TiueServer
    task: asyncio.Task[None]

    @property
    def state(self) -> ServiceState:
        state: ServiceState = self.app.state.tiue
        return state


@asynccontextmanager
async def tiue_server(engine: FakeEngine, **settings: Any) -> AsyncIterator[Served]:
    """`build_server`'s server in this event loop, on a free port, ready; stopped on exit."""
    app = create_app(make_settings(**settings), pipeline_factory=lambda: engine)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = build_server(app, app.state.tiue.settings)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        await wait_until(lambda: server.started or task.done(), timeout=10)
        await asyncio.wait_for(app.state.tiue.ready.wait(), 10)
        yield Served(f"http://127.0.0.1:{port}", port, app, server, task)
    finally:
        engine.gate.set()
        server.should_exit = True
        await asyncio.wait_for(task, 10)
        sock.close()


@asynccontextmanager
async def uvicorn_app(app: FastAPI) -> AsyncIterator[str]:
    """A plain uvicorn serving `app` on a free port of 127.0.0.1, ready; yields its URL, stops on exit."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))  # a free port, held from here on: no race with other processes
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, lifespan="on"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        await wait_until(lambda: server.started or task.done(), timeout=10)
        await asyncio.wait_for(app.state.tiue.ready.wait(), 120)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)
        sock.close()


@asynccontextmanager
async def fake_engine_app(engine: FakeEngine, **settings: Any) -> AsyncIterator[tuple[str, FastAPI]]:
    """The app on `engine` under a real uvicorn; yields its URL and the app; opens the engine's gate on exit."""
    app = create_app(make_settings(**settings), pipeline_factory=lambda: engine)
    try:
        async with uvicorn_app(app) as url:
            yield url, app
    finally:
        engine.gate.set()


async def raw_connection(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


async def read_until_closed(reader: asyncio.StreamReader, timeout: float) -> bytes:
    """Everything the server sends until it closes the connection (a reset counts as closed)."""
    chunks: list[bytes] = []
    async with asyncio.timeout(timeout):
        while True:
            try:
                chunk = await reader.read(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


async def get(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str, timeout: float = 3
) -> bytes:
    """One GET on a kept-alive raw connection; the response's head and body."""
    writer.write(f"GET {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
    async with asyncio.timeout(timeout):
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            int(line.split(b":")[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length")
        )
        return head + await reader.readexactly(length)


@contextmanager
def fake_server_process(*args: str, **settings: Any) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """tests/service/fake_server.py in its own process; yields it and its port once it is ready."""
    env = {**os.environ, **{f"TIUE_{name.upper()}": str(value) for name, value in settings.items()}}
    env.setdefault("TIUE_MAX_WAIT_MS", "5")
    script = Path(__file__).with_name("fake_server.py")
    process = subprocess.Popen(
        [sys.executable, str(script), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()  # blocks until ready, or the process died
        assert line.startswith("port "), process.communicate(timeout=10)[1]
        yield process, int(line.split()[1])
    finally:
        if process.poll() is None:
            process.kill()
        with suppress(subprocess.TimeoutExpired):
            process.communicate(timeout=10)


def wait_for_exit(process: subprocess.Popen[str], timeout: float) -> tuple[float, str]:
    """Seconds until the process exited, and its stderr."""
    started = time.monotonic()
    _, stderr = process.communicate(timeout=timeout)
    return time.monotonic() - started, stderr
