"""Shutdown as docs/api.md describes it, over real TCP: after SIGTERM the server keeps listening and answers
new work 503 with Retry-After while the queue drains; what the grace leaves gets 503 JSON, never a 500."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time

import httpx
import pytest
from fakes import FakeEngine, wait_until
from serving import Served, fake_server_process, tiue_server, wait_for_exit

from service.state import Phase

GOOD = {"prompt": "a red circle"}


async def queue_behind_the_held_device(
    client: httpx.AsyncClient, served: Served, engine: FakeEngine, count: int
) -> list[asyncio.Task[httpx.Response]]:
    """`count` requests: the first on the (held) device, the others admitted to the queue behind it."""
    tasks = [asyncio.create_task(client.post("/generate", json={**GOOD, "seed": 0}))]
    await engine.wait_entered()
    for seed in range(1, count):
        admitted = served.state.batcher.ledger.queued_seconds
        tasks.append(asyncio.create_task(client.post("/generate", json={**GOOD, "seed": seed})))
        await wait_until(lambda admitted=admitted: served.state.batcher.ledger.queued_seconds > admitted)
    return tasks


async def on_the_device(process: subprocess.Popen[str]) -> None:
    """Until tests/service/fake_server.py says a batch reached its (held) device."""
    assert process.stdout is not None
    line = await asyncio.wait_for(asyncio.to_thread(process.stdout.readline), 5)
    assert line.startswith("device "), line


async def wait_queued(client: httpx.AsyncClient, images: int) -> None:
    """Until the server (another process) has `images` admitted and waiting for the device."""
    async with asyncio.timeout(5):
        while (await client.get("/readyz")).json()["queued_images"] != images:
            await asyncio.sleep(0.02)


async def wait_draining(url: httpx.URL) -> None:
    """Until /readyz, asked on new connections (each answer closes its own while draining), says 503."""
    async with asyncio.timeout(5):
        while True:
            async with httpx.AsyncClient(base_url=url, timeout=5) as client:
                if (await client.get("/readyz")).status_code == 503:
                    return
            await asyncio.sleep(0.02)


def assert_shutting_down(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.headers["retry-after"] == "1"
    assert response.json()["error"]["code"] == "not_ready"


@pytest.mark.parametrize("signal_number", [signal.SIGTERM, signal.SIGINT])
async def test_the_signal_starts_a_drain_and_the_server_exits_once_idle(
    engine: FakeEngine, signal_number: int
) -> None:
    async with tiue_server(engine) as served:
        served.server.handle_exit(signal_number, None)  # what the signal handler calls
        assert not served.server.should_exit  # it only schedules: the socket stays open for now
        await asyncio.wait_for(served.task, 2)  # nothing queued: done at once
        assert served.state.phase is Phase.DRAINING


async def test_during_the_grace_new_work_gets_503_and_queued_work_finishes(engine: FakeEngine) -> None:
    engine.gate.clear()
    async with (
        tiue_server(engine, max_batch_size=1, shutdown_grace_s=5) as served,
        httpx.AsyncClient(base_url=served.url, timeout=5) as client,
    ):
        queued = await queue_behind_the_held_device(client, served, engine, 2)
        served.server.handle_exit(signal.SIGTERM, None)
        await wait_until(lambda: served.state.phase is Phase.DRAINING)
        async with httpx.AsyncClient(base_url=served.url, timeout=5) as newcomer:  # a new connection
            refused = await newcomer.post("/generate", json=GOOD)
            ready = await newcomer.get("/readyz")
            live = await newcomer.get("/livez")
        assert not served.task.done()
        started = time.monotonic()
        engine.gate.set()
        finished = await asyncio.gather(*queued)
        await asyncio.wait_for(served.task, 5)
        exited_after = time.monotonic() - started
    assert_shutting_down(refused)
    assert refused.headers["connection"] == "close"  # the client reconnects, to another replica
    assert ready.status_code == 503 and ready.json()["status"] == "draining"
    assert live.status_code == 200
    assert [r.status_code for r in finished] == [200, 200]
    assert exited_after < 2  # the queue was done well before the grace


@pytest.mark.parametrize("grace_s", [0.0, 0.5])
async def test_when_the_grace_runs_out_queued_work_gets_503_json(engine: FakeEngine, grace_s: float) -> None:
    engine.gate.clear()  # the device never finishes the first batch
    async with (
        tiue_server(engine, max_batch_size=1, shutdown_grace_s=grace_s) as served,
        httpx.AsyncClient(base_url=served.url, timeout=5) as client,
    ):
        queued = await queue_behind_the_held_device(client, served, engine, 3)
        started = time.monotonic()
        served.server.handle_exit(signal.SIGTERM, None)
        answers = await asyncio.gather(*queued)
        answered_after = time.monotonic() - started
        await asyncio.wait_for(served.task, 5)
        exited_after = time.monotonic() - started
    for answer in answers:
        assert_shutting_down(answer)
        assert "shut down before" in answer.json()["error"]["message"]
    assert grace_s <= answered_after < grace_s + 1
    assert exited_after < grace_s + 1.5


@pytest.mark.slow  # about 4 s: a process of its own
async def test_sigterm_drains_a_real_process_then_it_exits() -> None:
    with fake_server_process("--hold", max_batch_size=2, shutdown_grace_s=1.5) as (process, port):
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            queued = [asyncio.create_task(client.post("/generate", json={**GOOD, "seed": 1}))]
            await on_the_device(process)
            queued.append(asyncio.create_task(client.post("/generate", json={**GOOD, "seed": 2})))
            await wait_queued(client, 1)  # half a batch waits behind the busy device
            started = time.monotonic()
            process.send_signal(signal.SIGTERM)
            await wait_draining(client.base_url)  # /readyz is 503 while the queue drains
            async with httpx.AsyncClient(base_url=client.base_url, timeout=5) as newcomer:
                refused = await newcomer.post("/generate", json=GOOD)
            answers = await asyncio.gather(*queued)
        _, stderr = await asyncio.to_thread(wait_for_exit, process, 10)
        exited_after = time.monotonic() - started  # from the signal
    assert_shutting_down(refused)
    for answer in answers:
        assert_shutting_down(answer)
    assert process.returncode == 0, stderr
    assert exited_after < 1.5 + 2, stderr
    assert "Traceback" not in stderr and " 500" not in stderr, stderr


@pytest.mark.slow  # about 3 s: a process of its own
async def test_a_second_signal_exits_at_once() -> None:
    with fake_server_process("--hold", shutdown_grace_s=30) as (process, port):
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            held = asyncio.create_task(client.post("/generate", json=GOOD))
            await on_the_device(process)
            process.send_signal(signal.SIGTERM)
            await wait_draining(client.base_url)  # for up to 30 s
            process.send_signal(signal.SIGTERM)
            exited_after, stderr = await asyncio.to_thread(wait_for_exit, process, 10)
            answer = await held
    assert exited_after < 2, stderr
    assert process.returncode == -signal.SIGTERM  # the second signal, re-raised once the server is down
    assert answer.status_code == 503 and answer.json()["error"]["code"] == "not_ready"
