"""Connection limits over real TCP (service.edge.server on 127.0.0.1): slow and idle clients are cut off, the
connection and in-flight caps hold, and running out of file descriptors is one log line, not a flood."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import time

import httpx
import pytest
from fakes import FakeEngine, wait_until
from serving import fake_server_process, get, raw_connection, read_until_closed, tiue_server, wait_for_exit

from service.edge.connections import PROBE_SLOTS

GOOD = {"prompt": "a red circle"}


def error_code(response: bytes) -> str:
    code: str = json.loads(response.split(b"\r\n\r\n", 1)[1])["error"]["code"]
    return code


async def test_headers_trickled_slower_than_the_header_timeout_are_cut_off(engine: FakeEngine) -> None:
    async with tiue_server(engine, header_timeout_s=0.5) as served:
        reader, writer = await raw_connection(served.port)
        started = time.monotonic()
        writer.write(b"GET /livez HTTP/1.1\r\nHost: t\r\n")
        closed = asyncio.create_task(read_until_closed(reader, timeout=3))
        while not closed.done():  # a header line every 0.1 s: always progress, never done
            writer.write(b"X-Slow: 1\r\n")
            await asyncio.sleep(0.1)
        answer = await closed
        elapsed = time.monotonic() - started
        writer.close()
        metrics = (await httpx.AsyncClient().get(f"{served.url}/metrics")).text
    assert 0.45 < elapsed < 1.5
    assert answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    assert b"content-type: application/json" in answer and b"connection: close" in answer
    assert error_code(answer) == "request_timeout"
    assert "tiue_connections_timed_out_total 1.0" in metrics


async def test_a_connection_that_sends_nothing_is_closed_at_the_header_timeout(engine: FakeEngine) -> None:
    async with tiue_server(engine, header_timeout_s=0.3) as served:
        reader, writer = await raw_connection(served.port)
        started = time.monotonic()
        answer = await read_until_closed(reader, timeout=3)
        elapsed = time.monotonic() - started
        writer.close()
        await wait_until(lambda: served.server.guard.open == 0)
    assert answer == b""  # nothing was asked, so nothing is answered
    assert 0.25 < elapsed < 1.2


async def test_kept_alive_connections_wait_for_the_keep_alive_timeout_not_the_header_one(
    engine: FakeEngine,
) -> None:
    async with tiue_server(engine, header_timeout_s=0.3, keep_alive_timeout_s=1.0) as served:
        reader, writer = await raw_connection(served.port)
        assert b" 200 " in await get(reader, writer, "/livez")
        await asyncio.sleep(0.5)  # idle longer than the header timeout, within keep-alive
        assert b" 200 " in await get(reader, writer, "/livez")
        started = time.monotonic()
        answer = await read_until_closed(reader, timeout=3)
        elapsed = time.monotonic() - started
        writer.close()
    assert answer == b""
    assert 0.9 < elapsed < 1.6


async def test_connections_over_the_cap_are_refused_and_probes_still_answer(engine: FakeEngine) -> None:
    async with tiue_server(
        engine, max_connections=3, max_connections_per_address=20, header_timeout_s=5
    ) as served:
        guard = served.server.guard
        # Three connections busy sending a body: none is waiting for a request, so none can make room.
        body = json.dumps(GOOD).encode()
        head = (
            "POST /generate HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        busy = [await raw_connection(served.port) for _ in range(3)]
        for _, writer in busy:
            writer.write(head + body[:-1])
        first, others = busy[0], busy[1:]
        await wait_until(lambda: served.state.metrics.in_flight._value.get() == 3)  # their headers are in
        # Over the cap, a few connections may still probe; anything else gets 503 and the door.
        probes = [await raw_connection(served.port) for _ in range(PROBE_SLOTS)]
        await wait_until(lambda: guard.open == 3 + PROBE_SLOTS)
        probe_answer = await get(*probes[0], "/livez")
        probes[1][1].write(b"GET /readyz HTTP/1.1\r\nHost: t\r\n\r\n")
        ready_answer = await read_until_closed(probes[1][0], timeout=3)
        probes[2][1].write(b"POST /generate HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\n{}")
        busy_answer = await read_until_closed(probes[2][0], timeout=3)
        await wait_until(lambda: guard.open == 3 + PROBE_SLOTS - 3)  # each answer closed its connection
        for _ in range(3):
            probes.append(await raw_connection(served.port))
        await wait_until(lambda: guard.open == 3 + PROBE_SLOTS)
        refused = [await raw_connection(served.port) for _ in range(3)]
        refused_answers = [await read_until_closed(reader, timeout=2) for reader, _ in refused]
        # The connections inside the cap are untouched.
        first[1].write(body[-1:])
        first_answer = await first[0].readuntil(b"\r\n\r\n")
        for _, writer in [*others, *probes, *refused]:
            writer.close()
        await wait_until(lambda: guard.open == 1)
        async with httpx.AsyncClient(base_url=served.url, timeout=5) as client:
            generated = await client.post("/generate", json=GOOD)
            metrics = (await client.get("/metrics")).text
        first[1].close()
    assert first_answer.startswith(b"HTTP/1.1 200 ")
    assert b"connection: close" in probe_answer and b'"alive"' in probe_answer
    assert ready_answer.startswith(b"HTTP/1.1 200 ")
    assert busy_answer.startswith(b"HTTP/1.1 503 ") and error_code(busy_answer) == "overloaded"
    assert b"retry-after: 1" in busy_answer
    assert refused_answers == [b"", b"", b""]
    assert generated.status_code == 200
    assert "tiue_connections_refused_total 3.0" in metrics
    assert "tiue_connections_evicted_total 0.0" in metrics
    assert "tiue_open_connections 2.0" in metrics  # `first` and the client's own


async def test_generation_requests_over_max_in_flight_get_503(engine: FakeEngine) -> None:
    engine.gate.clear()
    async with (
        tiue_server(engine, max_in_flight=2, max_batch_size=1) as served,
        httpx.AsyncClient(base_url=served.url, timeout=5) as client,
    ):
        held = [asyncio.create_task(client.post("/generate", json={**GOOD, "seed": i})) for i in range(2)]
        await engine.wait_entered()
        await wait_until(lambda: served.state.metrics.in_flight._value.get() == 2)
        refused = await client.post("/generate", json=GOOD)
        live = await client.get("/livez")
        engine.gate.set()
        done = await asyncio.gather(*held)
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["code"] == "overloaded"
    assert "TIUE_MAX_IN_FLIGHT" in refused.json()["error"]["message"]
    assert live.status_code == 200
    assert [r.status_code for r in done] == [200, 200]


async def test_a_body_that_stalls_gets_408_at_the_body_timeout(engine: FakeEngine) -> None:
    async with tiue_server(engine, body_timeout_s=0.5) as served:
        reader, writer = await raw_connection(served.port)
        writer.write(
            b"POST /generate HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\n\r\n" + b'{"prompt": '
        )
        started = time.monotonic()
        answer = await read_until_closed(reader, timeout=3)
        elapsed = time.monotonic() - started
        writer.close()
    assert 0.45 < elapsed < 1.5
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert b"connection: close" in answer and error_code(answer) == "request_timeout"


@pytest.mark.slow  # about 6 s: a process of its own, and 3 s out of descriptors
def test_running_out_of_file_descriptors_logs_a_line_per_interval_and_recovers() -> None:
    with fake_server_process("--open-files", "256", "--leave-fds", "8", header_timeout_s=30) as (
        process,
        port,
    ):
        clients = []
        for _ in range(40):  # more than the free descriptors: the rest wait in the listen backlog
            client = socket.create_connection(("127.0.0.1", port), timeout=2)
            clients.append(client)
        time.sleep(3)  # asyncio retries accept() every second, failing every time
        for client in clients:
            client.close()
        deadline = time.monotonic() + 5
        while True:  # the backlog is accepted (and found closed), then new connections are served
            try:
                if httpx.get(f"http://127.0.0.1:{port}/livez", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "never recovered"
                time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        _, stderr = wait_for_exit(process, timeout=10)
    lines = stderr.splitlines()
    fd_lines = [line for line in lines if "out of file descriptors" in line]
    assert 1 <= len(fd_lines) <= 2, stderr
    assert "Traceback" not in stderr and len(lines) < 20, stderr
