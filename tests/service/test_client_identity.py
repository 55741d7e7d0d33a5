"""Who a client is, over real TCP from several loopback addresses (127.0.0.2, 127.0.0.3, ...): forwarded
headers count only from trusted proxies, and one address cannot hold the server's connections."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest
from fakes import FakeEngine, wait_until
from serving import fake_server_process, tiue_server

from service.edge.connections import PROBE_SLOTS

GOOD = {"prompt": "a red circle"}
ONE_IMAGE_A_DAY = {"rate_limit_per_minute": 1 / 1440, "rate_limit_burst": 1}


def client_from(address: str, url: str) -> httpx.AsyncClient:
    """An HTTP client whose connections leave from `address` (any of 127.0.0.0/8 reaches 127.0.0.1)."""
    transport = httpx.AsyncHTTPTransport(local_address=address)
    return httpx.AsyncClient(base_url=url, transport=transport, timeout=10)


async def forwarded_statuses(url: str, source: str, forwarded: list[str]) -> list[int]:
    """POST /generate once per X-Forwarded-For value, from `source`."""
    async with client_from(source, url) as client:
        return [
            (await client.post("/generate", json=GOOD, headers={"X-Forwarded-For": value})).status_code
            for value in forwarded
        ]


async def test_forwarded_headers_are_ignored_unless_the_proxy_is_trusted(engine: FakeEngine) -> None:
    # One image a day per client: a second request from the same client is a 429, from another a 200.
    async with tiue_server(engine, **ONE_IMAGE_A_DAY) as served:
        spoofed = await forwarded_statuses(served.url, "127.0.0.1", ["10.0.0.1", "10.0.0.2", "10.0.0.3"])
    assert spoofed == [200, 429, 429]  # one client: 127.0.0.1, whatever it claims


async def test_a_trusted_proxy_names_its_clients_and_no_one_else_can(engine: FakeEngine) -> None:
    async with tiue_server(engine, forwarded_allow_ips="127.0.0.1, 10.0.0.0/8", **ONE_IMAGE_A_DAY) as served:
        proxied = await forwarded_statuses(served.url, "127.0.0.1", ["192.0.2.1", "192.0.2.2", "192.0.2.1"])
        untrusted = await forwarded_statuses(served.url, "127.0.0.2", ["192.0.2.9", "192.0.2.10"])
    assert proxied == [200, 200, 429]  # two clients behind the proxy, each with its own budget
    assert untrusted == [200, 429]  # 127.0.0.2 is not a proxy: its claims are ignored


@asynccontextmanager
async def idle_connections(port: int, source: str, count: int) -> AsyncIterator[list[socket.socket]]:
    """`count` connections from `source` that never send a byte (those the server refuses are kept too)."""
    loop = asyncio.get_running_loop()
    held: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            sock.bind((source, 0))
            held.append(sock)
            await loop.sock_connect(sock, ("127.0.0.1", port))
        yield held
    finally:
        for sock in held:
            sock.close()


async def test_an_idle_flood_from_one_address_leaves_room_for_others(engine: FakeEngine) -> None:
    cap = 16  # an eighth of it (2) per address by default
    async with tiue_server(engine, max_connections=cap, header_timeout_s=30) as served:
        guard = served.server.guard
        async with idle_connections(served.port, "127.0.0.2", cap + PROBE_SLOTS):
            await wait_until(
                lambda: (
                    served.state.metrics.connections_refused_per_address._value.get() == cap + PROBE_SLOTS - 2
                )
            )
            assert guard.by_address["127.0.0.2"] == 2
            async with client_from("127.0.0.3", served.url) as client:
                generated = await client.post("/generate", json=GOOD)
                started = time.monotonic()
                live = await client.get("/livez")
                live_s = time.monotonic() - started
    assert generated.status_code == 200 and len(generated.json()["data"]) == 1
    assert live.status_code == 200 and live_s < 1.0


async def test_at_the_cap_a_connection_waiting_for_a_request_is_closed_to_make_room(
    engine: FakeEngine,
) -> None:
    async with tiue_server(
        engine, max_connections=8, max_connections_per_address=4, header_timeout_s=30
    ) as served:
        guard = served.server.guard
        async with (
            idle_connections(served.port, "127.0.0.2", 4),
            idle_connections(served.port, "127.0.0.4", 4),
        ):
            await wait_until(lambda: guard.open == 8)
            async with client_from("127.0.0.3", served.url) as client:
                generated = await client.post("/generate", json=GOOD)
                live = await client.get("/livez")  # the same kept-alive connection
            evicted = served.state.metrics.connections_evicted._value.get()
    assert generated.status_code == 200 and live.status_code == 200
    assert evicted == 1
    assert served.state.metrics.connections_refused._value.get() == 0


@pytest.mark.slow
def test_a_1100_connection_idle_flood_does_not_deny_service() -> None:
    """The flood as reported: 1,100 idle connections from one address against a server whose open-file limit
    is 1,024 (896 connections); meanwhile another address gets its images and /livez answers within 1 s."""
    with fake_server_process("--open-files", "1024", header_timeout_s=30) as (_process, port):

        async def scenario() -> tuple[int, int, float]:
            url = f"http://127.0.0.1:{port}"
            async with idle_connections(port, "127.0.0.2", 1100):
                await asyncio.sleep(0.5)  # the server accepts (and refuses) the backlog
                async with client_from("127.0.0.3", url) as client:
                    generated = await client.post("/generate", json=GOOD)
                    started = time.monotonic()
                    live = await client.get("/livez")
                    return generated.status_code, live.status_code, time.monotonic() - started

        generated, live, live_s = asyncio.run(scenario())
    assert (generated, live) == (200, 200)
    assert live_s < 1.0
