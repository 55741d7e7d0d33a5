"""Refusals that cost little, over real TCP (service.edge.server on 127.0.0.1): a request that will be refused
whatever it asks for is answered before its body is read, and no refused request is tokenized."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path

import httpx
from fakes import FakeEngine, wait_until
from serving import fake_server_process, raw_connection, tiue_server

from engine.types import BatchKey
from service.scheduling.cost import CostModel

GOOD = {"prompt": "a red circle"}


class CountingEngine(FakeEngine):
    """Counts the prompts it is asked to tokenize."""

    def __init__(self) -> None:
        super().__init__()
        self.counted: list[str] = []

    def count_tokens(self, prompt: str) -> int:
        self.counted.append(prompt)
        return super().count_tokens(prompt)


async def answer_without_body(port: int, *headers: str) -> tuple[bytes, float]:
    """Send a generation request's headers announcing a body, never the body; the answer's head and the
    seconds it took (a server that waits for the body answers only at its body timeout)."""
    reader, writer = await raw_connection(port)
    head = ["POST /generate HTTP/1.1", "Host: t", "Content-Type: application/json", "Content-Length: 1000"]
    writer.write(("\r\n".join([*head, *headers]) + "\r\n\r\n").encode())
    started = time.monotonic()
    try:
        async with asyncio.timeout(5):
            answer = await reader.readuntil(b"\r\n\r\n")
            length = int(
                next(
                    v
                    for k, _, v in (line.partition(b": ") for line in answer.split(b"\r\n"))
                    if k == b"content-length"
                )
            )
            answer += await reader.readexactly(length)
    finally:
        writer.close()
    return answer, time.monotonic() - started


def code_of(answer: bytes) -> str:
    code: str = json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["code"]
    return code


async def test_a_full_queue_refuses_before_the_body_is_read() -> None:
    engine = CountingEngine()
    engine.gate.clear()
    async with (
        tiue_server(engine, max_batch_size=1, queue_size=1, max_n=1, body_timeout_s=10) as served,
        httpx.AsyncClient(base_url=served.url, timeout=10) as client,
    ):
        running = asyncio.create_task(client.post("/generate", json={**GOOD, "seed": 1}))
        await engine.wait_entered()
        queued = asyncio.create_task(client.post("/generate", json={**GOOD, "seed": 2}))
        await wait_until(lambda: served.state.batcher.pending_images == 1)
        answer, seconds = await answer_without_body(served.port)
        refused = await client.post("/generate", json={"prompt": "never tokenized"})
        engine.gate.set()
        statuses = [(await running).status_code, (await queued).status_code]
    assert answer.startswith(b"HTTP/1.1 429 ") and code_of(answer) == "queue_full"
    assert b"retry-after: " in answer and seconds < 1.0
    assert refused.status_code == 429
    assert statuses == [200, 200]
    assert engine.counted == [GOOD["prompt"]] * 2  # only the admitted requests were tokenized


async def test_a_rate_limited_client_is_refused_before_its_body_is_read(engine: FakeEngine) -> None:
    async with tiue_server(engine, rate_limit_per_minute=1 / 1440, rate_limit_burst=1) as served:
        async with httpx.AsyncClient(base_url=served.url, timeout=10) as client:
            first = await client.post("/generate", json=GOOD)
        answer, seconds = await answer_without_body(served.port)
    assert first.status_code == 200
    assert answer.startswith(b"HTTP/1.1 429 ") and code_of(answer) == "rate_limited" and seconds < 1.0


async def test_a_request_over_its_clients_share_is_refused_before_it_is_tokenized() -> None:
    """Only this request's own size can tell (n = 5 is over the share, n = 1 would not be): refused after
    the body is parsed, but still before its prompt is tokenized."""
    engine = CountingEngine()
    engine.gate.clear()
    async with (
        tiue_server(engine, max_batch_size=1, queue_size=16, client_share=0.5, max_queue_s=1) as served,
        httpx.AsyncClient(base_url=served.url, timeout=10) as client,
    ):
        model = served.state.models.get(None)
        model.cost = CostModel()
        model.cost.observe(BatchKey(64, 64), 1, 0.1)  # 0.1 s an image: the client may hold 0.5 s, 5 images
        running = asyncio.create_task(client.post("/generate", json={**GOOD, "seed": 1}))
        await engine.wait_entered()
        queued = asyncio.create_task(client.post("/generate", json={**GOOD, "seed": 2}))
        await wait_until(lambda: served.state.batcher.pending_images == 1)
        over = await client.post("/generate", json={"prompt": "too many at once", "n": 5})
        engine.gate.set()
        assert [(await running).status_code, (await queued).status_code] == [200, 200]
    assert over.status_code == 429, over.text
    assert "too many at once" not in engine.counted
    assert "may hold" in over.json()["error"]["message"]


def thread_nice(pid: int) -> dict[int, int]:
    """Each thread's nice value by thread ID, from /proc (field 19 of stat)."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        out[int(task.name)] = int(fields[16])
    return out


def test_once_ready_the_event_loop_yields_the_cpu_to_the_device_thread() -> None:
    with fake_server_process() as (process, _port):
        deadline = time.monotonic() + 5  # ready is announced as the priority is lowered: poll a little
        while thread_nice(process.pid)[process.pid] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        nice = thread_nice(process.pid)
    main = nice.pop(process.pid)  # the event loop's thread
    # The device thread, started before, kept 0 (threads started from the loop afterwards inherit 10).
    assert main == 10 and 0 in nice.values(), nice


async def test_an_answered_request_costs_no_thread_pool_hop(engine: FakeEngine) -> None:
    """FastAPI runs a plain `def` dependency in AnyIO's worker threads: a thread hop per request that the
    event loop and the device thread pay for on a busy core. Every route here resolves on the loop."""
    before = {thread.ident for thread in threading.enumerate()}
    async with (
        tiue_server(engine) as served,
        httpx.AsyncClient(base_url=served.url, timeout=10) as client,
    ):
        answers = [
            await client.post("/generate", json=GOOD),
            await client.post("/v1/images/generations", json=GOOD),
            await client.get("/v1/models"),
        ]
        started = [t.name for t in threading.enumerate() if t.ident not in before]
    assert [a.status_code for a in answers] == [200, 200, 200], [a.text for a in answers]
    assert not [name for name in started if name.startswith("AnyIO worker")], started
