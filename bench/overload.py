"""Overload benchmark for the HTTP service (not a test): what the server delivers when offered more
than it can do, and when its clients retry every refusal at once.

    python bench/overload.py                         # `python -m service.cli serve`, the embedded model
    python bench/overload.py --loads "" --out storm.md   # capacity and the retry storm only
    python bench/overload.py --fake                  # a fake engine of fixed compute time per image
    python bench/overload.py --refusal-cost          # server CPU per refused request (needs `hey`)

The server and the load generator run on different cores (`taskset`; by default the server on CPU 0 with
TIUE_THREADS=1, the load generator's processes on CPU 1; `--server-cpus ""` turns pinning off), so that
neither steals the other's CPU. The load comes from `--client-processes` processes (default 4), each with
its share of the clients or of the arrival rate, so that one event loop does not queue its own requests.

Each scenario gets a fresh server in a subprocess on 127.0.0.1 (so its counters start at zero):
1. capacity: closed loop, 2 x max_batch_size clients sending n=1, so every batch is full;
2. open loop at 0.5, 1, 2 and 4 x capacity: Poisson arrivals, each request n=1 at the native size;
3. retry storm: 64 clients that resend at once on 429 or 503, against queue_size 8 and
   request_timeout_s 1.
Goodput counts images answered 200 within the request timeout, twice: by the client's clock (from
sending to the last byte) and by the server's (its `tiue_request_duration_seconds` histogram, from
arrival to answer), each over the client's window. Capacity is measured the same two ways, and each
row's share of capacity is by the same clock. Images discarded are read from
`tiue_images_discarded_total` (work done for requests that had given up or expired). Each client
sends its own API key (the server is started with one per client), so a server that tells clients apart
can; `--no-keys` sends none, so every request comes from one address, as from behind a load balancer.

`--refusal-cost` measures what a refusal costs the server: a fake device that never finishes holds one
request and queues one more (queue_size 1), then `hey` sends `--refusals` requests, all refused with 429;
the server's CPU time (utime + stime from /proc) over the flood, divided by the refusals.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import multiprocessing
import os
import random
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.load_service import free_port, stop_process, wait_ready  # noqa: E402

STORM_CLIENTS = 64
KEYS = [f"bench-key-{i}" for i in range(STORM_CLIENTS)]
PROMPTS = ["a red circle on a blue square", "a small green star", "a large yellow ring", "a purple triangle"]


class FixedCostEngine:
    """A fake device: a batch costs batch_ms plus image_ms per image, spent waiting (no CPU)."""

    def __init__(self, batch_ms: float, image_ms: float, size: int = 64):
        from engine.types import ModelInfo

        self.batch_s, self.image_s = batch_ms / 1000, image_ms / 1000
        self.info = ModelInfo("fixed-cost", "fake", "fp32", "none", 4, 77, 16, size)

    def validate(self, request: Any) -> None:
        pass

    def count_tokens(self, prompt: str) -> int:
        return len(prompt.split()) + 2

    def generate(self, requests: Sequence[Any]) -> Any:
        import numpy as np

        from engine.types import BatchResult, GeneratedImage

        seconds = self.batch_s + self.image_s * len(requests)
        threading.Event().wait(seconds)
        w, h = requests[0].shape_key
        images = [GeneratedImage(np.full((h, w, 3), r.seed % 251, np.uint8), r.seed) for r in requests]
        return BatchResult(images, {"denoise": seconds})

    def warmup(self, batch_sizes: Any = None, sizes: Any = None) -> None:
        pass


# -- the server child ---------------------------------------------------------------------------


def serve_child(cfg: dict[str, Any]) -> None:
    """The fake-engine server: the same app and server `tiue serve` runs, with the engine replaced."""
    import logging

    from service.app import create_app
    from service.settings import Settings

    logging.basicConfig(level=logging.WARNING)
    settings = Settings(**{**cfg["settings"], "log_level": "warning"})
    engine = FixedCostEngine(cfg["batch_ms"], cfg["image_ms"])
    app = create_app(settings, pipeline_factory=lambda: engine)
    try:
        from service.edge.server import build_server  # connection limits and drain, where the code has them
    except ImportError:
        import uvicorn

        uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning", access_log=False)
    else:
        build_server(app, settings).run()


class Server:
    """One server process for one scenario."""

    def __init__(self, args: argparse.Namespace, fake: bool = False, **settings: Any):
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        env = {**os.environ, "TIUE_LOG_LEVEL": "warning"}
        keys = "" if args.no_keys else ",".join(KEYS)
        all_settings = {"port": port, "max_batch_size": args.max_batch_size, "api_keys": keys}
        all_settings.update(settings)
        if args.server_cpus:
            all_settings.setdefault("threads", len(cpu_list(args.server_cpus)))
        if args.fake or fake:
            cfg = {"settings": all_settings, "batch_ms": args.batch_ms, "image_ms": args.image_ms}
            command = [sys.executable, __file__, "--child", json.dumps(cfg)]
        else:
            env.update({f"TIUE_{name.upper()}": str(value) for name, value in all_settings.items()})
            command = [sys.executable, "-m", "service.cli", "serve"]
        if args.server_cpus:
            command = ["taskset", "-c", args.server_cpus, *command]  # taskset execs: the pid is the server's
        self.process = subprocess.Popen(command, cwd=ROOT, env=env)

    def cpu_seconds(self) -> float:
        """The server process's CPU time so far (user + system), from /proc."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def wait_ready(self, timeout: float = 300) -> None:
        wait_ready(self.process, self.url, timeout)

    def metrics(self) -> str:
        return httpx.get(f"{self.url}/metrics", timeout=10).text

    def stop(self) -> None:
        stop_process(self.process)


# -- load ---------------------------------------------------------------------------------------


@dataclass
class Tally:
    """What one scenario's clients saw."""

    timeout_s: float
    statuses: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)  # of 200 answers, seconds, as the client saw them
    server_latencies: list[float] = field(default_factory=list)  # the same answers' Server-Timing total
    good_images: int = 0  # answered 200 within the timeout
    delivered: int = 0  # answered 200 at all
    sent: int = 0
    started: float = field(default_factory=time.perf_counter)
    last_answer: float = 0.0

    @property
    def elapsed_s(self) -> float:
        """From the first request to the last answer: work answered after the load stops counts, in its time."""
        return max(self.last_answer - self.started, 1e-9)

    @classmethod
    def merged(cls, tallies: Sequence[Tally]) -> Tally:
        """The tallies of the load generator's processes as one (perf_counter is system-wide on Linux)."""
        out = cls(tallies[0].timeout_s, started=min(t.started for t in tallies))
        for t in tallies:
            out.statuses.update(t.statuses)
            out.latencies += t.latencies
            out.server_latencies += t.server_latencies
            out.good_images += t.good_images
            out.delivered += t.delivered
            out.sent += t.sent
            out.last_answer = max(out.last_answer, t.last_answer)
        return out

    def record(self, status: str, latency: float, server_s: float | None = None) -> None:
        self.last_answer = time.perf_counter()
        self.statuses[status] += 1
        if status == "200":
            self.delivered += 1
            self.latencies.append(latency)
            if server_s is not None:
                self.server_latencies.append(server_s)
            if latency <= self.timeout_s:
                self.good_images += 1


def source_address(key: str | None) -> str:
    """Each client's own loopback address (127.0.1.N by its key), as users behind no proxy each have
    theirs: the server's per-address connection cap then limits one client, not the whole load."""
    return "127.0.0.1" if key is None else f"127.0.1.{KEYS.index(key) + 1}"


class Pool:
    """Kept-alive HTTP/1.1 connections over asyncio streams, per client: a few lines of parsing cost far
    less CPU per request than a full client, so on a small machine the load generator does not starve
    the server."""

    def __init__(self, url: str, timeout_s: float):
        host, port = url.removeprefix("http://").split(":")
        self.host, self.port = host, int(port)
        self.timeout_s = max(10.0, 3 * timeout_s)
        self.idle: dict[str, list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]] = {}

    async def post(
        self, path: str, body: bytes, headers: dict[str, str], source: str = "127.0.0.1"
    ) -> tuple[int, dict[str, str]]:
        """(status, headers); the body is read and dropped. Raises OSError/TimeoutError on failure."""
        lines = [f"POST {path} HTTP/1.1", f"Host: {self.host}", f"Content-Length: {len(body)}"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        request = ("\r\n".join(lines) + "\r\n\r\n").encode() + body
        idle = self.idle.setdefault(source, [])
        while idle:  # a kept-alive connection the server closed meanwhile: try the next, then a new one
            try:
                return await self._exchange(*idle.pop(), request, idle)
            except (asyncio.IncompleteReadError, ConnectionError):
                continue
        connection = await asyncio.open_connection(self.host, self.port, local_addr=(source, 0))
        return await self._exchange(*connection, request, idle)

    async def _exchange(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        request: bytes,
        idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]],
    ) -> tuple[int, dict[str, str]]:
        try:
            writer.write(request)
            status, fields = await asyncio.wait_for(_read_answer(reader), self.timeout_s)
        except BaseException:
            writer.close()
            raise
        if fields.get("connection", "").lower() == "close":
            writer.close()
        else:
            idle.append((reader, writer))
        return status, fields

    def close(self) -> None:
        for connections in self.idle.values():
            for _reader, writer in connections:
                writer.close()
        self.idle.clear()


async def _read_answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    fields = {name.lower(): value for name, _, value in (line.partition(": ") for line in head[1:]) if value}
    await reader.readexactly(int(fields.get("content-length", "0")))
    return int(head[0].split(" ")[1]), fields


async def send(pool: Pool, key: str | None, tally: Tally) -> str:
    body = json.dumps({"prompt": random.choice(PROMPTS), "n": 1, "output_format": "jpeg"}).encode()
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    started = time.perf_counter()
    tally.sent += 1
    server_s = None
    try:
        code, fields = await pool.post("/generate", body, headers, source_address(key))
        status = str(code)
        total = _SERVER_TOTAL.search(fields.get("server-timing", ""))
        server_s = float(total.group(1)) / 1000 if total else None
    except asyncio.TimeoutError:
        status = "client timeout"
    except (OSError, asyncio.IncompleteReadError, ValueError):
        status = "connection error"
    tally.record(status, time.perf_counter() - started, server_s)
    return status


_SERVER_TOTAL = re.compile(r"\btotal;dur=([0-9.]+)")


@asynccontextmanager
async def _client(url: str, timeout_s: float) -> AsyncIterator[Pool]:
    pool = Pool(url, timeout_s)
    try:
        yield pool
    finally:
        pool.close()


async def closed_loop(
    url: str,
    keys: Sequence[str | None],
    clients: int,
    duration_s: float,
    timeout_s: float,
    part: int = 0,
    parts: int = 1,
) -> Tally:
    """Each client sends its next request as soon as it has an answer, whatever the answer: at capacity,
    full batches; in the retry storm, a 429 or 503 resent at once (Retry-After ignored). This process runs
    clients part, part + parts, ... of them."""
    tally = Tally(timeout_s)
    stop = time.perf_counter() + duration_s

    async def one(i: int) -> None:
        while time.perf_counter() < stop:
            await send(client, keys[i % len(keys)], tally)

    async with _client(url, timeout_s) as client:
        await asyncio.gather(*(one(i) for i in range(part, clients, parts)))
    return tally


async def open_loop(
    url: str,
    keys: Sequence[str | None],
    rate: float,
    duration_s: float,
    timeout_s: float,
    seed: int,
    part: int = 0,
    parts: int = 1,
) -> Tally:
    """Poisson arrivals at `rate` requests/s, whatever the server answers (users do not wait for each other);
    this process sends its share, rate / parts."""
    tally = Tally(timeout_s)
    rate /= parts
    rng = random.Random(seed * 1000 + part)
    tasks: set[asyncio.Task[str]] = set()
    async with _client(url, timeout_s) as client:
        started = time.perf_counter()
        next_at = started
        while True:
            next_at += rng.expovariate(rate)
            if next_at - started > duration_s:
                break
            await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
            task = asyncio.create_task(send(client, rng.choice(keys), tally))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.gather(*tasks)
    return tally


# -- the report ---------------------------------------------------------------------------------


def metric_sum(text: str, name: str) -> float | None:
    """The sum over all label sets of `name`, or None when the server does not export it."""
    values = re.findall(rf"^{re.escape(name)}(?:\{{[^}}]*\}})? (\S+)$", text, re.MULTILINE)
    return sum(float(v) for v in values) if values else None


def discarded(text: str, tally: Tally) -> str:
    """Images made for nobody: by reason when the server exports it, else generated minus delivered.
    Images the server dropped from a batch before running it (`tiue_images_skipped_total`) cost nothing
    and are listed apart."""
    found = _by_reason(text, "tiue_images_discarded_total")
    if not found:
        generated = metric_sum(text, "tiue_images_generated_total") or 0.0
        return f"{generated - tally.delivered:.0f} (generated - delivered)"
    cell = f"{sum(found.values()):.0f}" + _reasons(found)
    skipped = _by_reason(text, "tiue_images_skipped_total")
    if sum(skipped.values()):
        cell += f"; skipped before running: {sum(skipped.values()):.0f}" + _reasons(skipped)
    return cell


def _by_reason(text: str, name: str) -> dict[str, float]:
    found = re.findall(rf'^{re.escape(name)}\{{reason="([^"]*)"\}} (\S+)$', text, re.MULTILINE)
    return {reason: float(value) for reason, value in found}


def _reasons(counts: dict[str, float]) -> str:
    listed = ", ".join(f"{reason} {value:.0f}" for reason, value in counts.items() if value)
    return f" ({listed})" if listed else ""


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class Row:
    scenario: str
    settings: str
    offered: str
    tally: Tally
    capacity: float  # by the client's clock
    discarded: str
    server_good: float | None = None  # images answered 200 within the timeout by the server's clock
    server_capacity: float | None = None
    device_busy_s: float | None = None  # tiue_device_busy_seconds_total at the end of the run
    generated: float | None = None  # tiue_images_generated_total at the end of the run

    @property
    def server_goodput(self) -> float | None:
        return None if self.server_good is None else self.server_good / self.tally.elapsed_s

    def _busy(self) -> str:
        """The device's share of the run, and its seconds per image made: idle time between batches
        shows in the first, CPU taken from a running batch in the second."""
        if self.device_busy_s is None:
            return "-"
        cell = f"{100 * self.device_busy_s / self.tally.elapsed_s:.0f} %"
        if self.generated:
            cell += f", {1000 * self.device_busy_s / self.generated:.1f} ms/img"
        return cell

    def cells(self) -> list[str]:
        t = self.tally
        goodput = t.good_images / t.elapsed_s
        others = {k: v for k, v in t.statuses.items() if k not in ("200", "429", "503", "504")}
        other = str(sum(others.values())) + _reasons(dict(sorted(others.items())))
        p50, p99 = percentile(t.latencies, 0.5), percentile(t.latencies, 0.99)
        server_p99 = percentile(t.server_latencies, 0.99)
        ms = lambda v: "-" if v is None else f"{v * 1000:.0f}"  # noqa: E731
        served = self.server_goodput
        return [
            self.scenario,
            self.settings,
            self.offered,
            "-" if served is None else f"{served:.1f}",
            "-"
            if served is None or not self.server_capacity
            else f"{100 * served / self.server_capacity:.0f} %",
            f"{goodput:.1f}",
            f"{100 * goodput / self.capacity:.0f} %",
            *(str(t.statuses.get(s, 0)) for s in ("200", "429", "503", "504")),
            other,
            ms(p50),
            ms(p99),
            ms(server_p99),
            self._busy(),
            self.discarded,
        ]


HEADER = [
    "scenario",
    "server settings",
    "offered",
    "goodput img/s (server clock)",
    "% of capacity (server)",
    "goodput img/s (client clock)",
    "% of capacity (client)",
    "200",
    "429",
    "503",
    "504",
    "other",
    "p50 ms",
    "p99 ms",
    "server p99 ms",
    "device busy",
    "images discarded",
]


def table(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(row.cells()) + " |" for row in rows]
    return "\n".join(lines)


Load = Callable[..., Coroutine[Any, Any, Tally]]


def _run_part(load: Load, url: str, part: int, parts: int) -> Tally:
    return asyncio.run(load(url, part=part, parts=parts))


def generate_load(load: Load, url: str, processes: int) -> Tally:
    """`load` split over `processes` processes (forked: they inherit the load generator's CPU affinity)."""
    if processes <= 1:
        return asyncio.run(load(url))
    with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("fork")) as pool:
        futures = [pool.submit(_run_part, load, url, part, processes) for part in range(processes)]
        return Tally.merged([future.result() for future in futures])


def run_scenario(args: argparse.Namespace, settings: dict[str, Any], load: Load) -> tuple[Tally, str]:
    server = Server(args, **settings)
    try:
        server.wait_ready()
        tally = generate_load(load, server.url, args.client_processes)
        text = server.metrics()
    finally:
        server.stop()
    return tally, text


def server_good(text: str, timeout_s: float) -> float | None:
    """Generation requests answered 200 within `timeout_s` by the server's own clock (its request
    histogram; every request here is n = 1), or None when `timeout_s` is not one of its buckets."""
    total, found = 0.0, False
    for labels, value in re.findall(
        r"^tiue_request_duration_seconds_bucket\{([^}]*)\} (\S+)$", text, re.MULTILINE
    ):
        fields = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        if (
            fields.get("status") == "200"
            and fields.get("route") == "/generate"
            and fields.get("le") != "+Inf"
        ) and float(fields["le"]) == timeout_s:
            total += float(value)
            found = True
    return total if found else None


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--fake", action="store_true", help="a fake engine of fixed compute time per image")
    parser.add_argument("--batch-ms", type=float, default=50.0, help="fake engine: fixed cost per batch")
    parser.add_argument("--image-ms", type=float, default=100.0, help="fake engine: cost per image")
    parser.add_argument("--max-batch-size", type=int, default=4)
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per load scenario")
    parser.add_argument("--capacity-duration", type=float, default=10.0)
    parser.add_argument("--capacity", type=float, help="images/s: skip measuring it")
    parser.add_argument("--timeout", type=float, default=5.0, help="request_timeout_s for the open-loop runs")
    parser.add_argument("--loads", default="0.5,1,2,4", help="open-loop rates, as multiples of capacity")
    parser.add_argument("--no-storm", action="store_true", help="skip the retry storm")
    parser.add_argument("--no-keys", action="store_true", help="no API keys: every client is one address")
    parser.add_argument("--out", type=Path, help="also write the markdown here")
    parser.add_argument("--seed", type=int, default=0)
    pinned = (os.cpu_count() or 1) >= 2
    parser.add_argument(
        "--server-cpus",
        default="0" if pinned else "",
        help="taskset CPU list for the server (TIUE_THREADS follows); '' = no pinning",
    )
    parser.add_argument(
        "--client-cpus", default="1" if pinned else "", help="CPU list for the load generator"
    )
    parser.add_argument("--client-processes", type=int, default=4, help="load generator processes")
    parser.add_argument("--refusal-cost", action="store_true", help="only measure server CPU per refusal")
    parser.add_argument("--refusals", type=int, default=5000, help="requests `hey` sends for --refusal-cost")
    return parser.parse_args(argv)


def cpu_list(spec: str) -> set[int]:
    """taskset's CPU list syntax: '0', '0,2', '0-3'."""
    cpus: set[int] = set()
    for part in spec.split(","):
        first, _, last = part.partition("-")
        cpus.update(range(int(first), int(last or first) + 1))
    return cpus


def refusal_cost(args: argparse.Namespace) -> str:
    """Server CPU per refused request: the device held by a request that never finishes, one more queued,
    then `hey` sends `--refusals` requests over 16 connections, every one refused with 429 queue_full."""
    hey = shutil.which("hey")
    if hey is None:
        raise SystemExit("--refusal-cost needs `hey` (apt-get install hey)")
    args.batch_ms = 3_600_000.0  # the device never finishes within the run
    settings = {"max_batch_size": 1, "queue_size": 1, "max_n": 1, "request_timeout_s": 600.0, "api_keys": ""}
    server = Server(args, fake=True, **settings)
    body = json.dumps({"prompt": PROMPTS[0], "n": 1, "output_format": "jpeg"})
    held: list[subprocess.Popen[bytes]] = []
    try:
        server.wait_ready()
        for _ in range(2):  # one on the device, one queued: the queue is full from here on
            curl = ["curl", "-s", "-o", "/dev/null", "-H", "Content-Type: application/json", "-d", body]
            held.append(subprocess.Popen([*curl, f"{server.url}/generate"]))
        time.sleep(2)
        before = server.cpu_seconds()
        started = time.perf_counter()
        command = [
            hey,
            "-n",
            str(args.refusals),
            "-c",
            "16",
            "-m",
            "POST",
            "-T",
            "application/json",
            "-d",
            body,
        ]
        result = subprocess.run(
            [*command, f"{server.url}/generate"], capture_output=True, text=True, check=True
        )
        wall = time.perf_counter() - started
        cpu = server.cpu_seconds() - before
        statuses = re.findall(r"\[(\d+)\]\s+(\d+) responses", result.stdout)
    finally:
        for process in held:
            process.kill()
        server.stop()
    refused = sum(int(count) for status, count in statuses if status == "429")
    return (
        f"{args.refusals} requests in {wall:.1f} s, status counts {dict(statuses)}; server CPU {cpu:.2f} s = "
        f"{1000 * cpu / max(refused, 1):.3f} ms per refusal ({refused / wall:.0f} refusals/s)"
    )


def scenarios(args: argparse.Namespace) -> list[Row]:
    """Capacity (unless given), the open-loop rates, the storm; each row also printed as it is done."""
    rows: list[Row] = []
    keys: list[str | None] = [None] if args.no_keys else list(KEYS)
    capacity: float | None = args.capacity

    server_capacity: float | None = args.capacity

    def run(name: str, settings: dict[str, Any], load: Any, offered: str) -> None:
        nonlocal capacity, server_capacity
        tally, text = run_scenario(args, settings, load)
        good = server_good(text, settings["request_timeout_s"])
        if capacity is None:  # the first scenario measures it
            capacity = tally.good_images / tally.elapsed_s
            server_capacity = None if good is None else good / tally.elapsed_s
        if "{rate}" in offered:
            offered = offered.format(rate=f"{tally.sent / tally.elapsed_s:.0f}")
        described = ", ".join(f"{key} {value:g}" for key, value in settings.items())
        busy = metric_sum(text, "tiue_device_busy_seconds_total")
        made = metric_sum(text, "tiue_images_generated_total")
        row = Row(
            name,
            described,
            offered,
            tally,
            capacity,
            discarded(text, tally),
            good,
            server_capacity,
            busy,
            made,
        )
        rows.append(row)
        print(" | ".join(row.cells()), file=sys.stderr, flush=True)

    timeout_s = args.timeout
    open_settings = {"request_timeout_s": timeout_s}
    if capacity is None:
        n = 2 * args.max_batch_size
        load = partial(
            closed_loop, keys=keys, clients=n, duration_s=args.capacity_duration, timeout_s=timeout_s
        )
        run("capacity (closed loop)", open_settings, load, f"{n} clients")
    assert capacity is not None
    for multiple in (float(m) for m in args.loads.split(",") if m):
        rate = multiple * capacity
        load = partial(
            open_loop, keys=keys, rate=rate, duration_s=args.duration, timeout_s=timeout_s, seed=args.seed
        )
        run(f"open loop {multiple:g}x", open_settings, load, f"{rate:.1f} req/s")
    if not args.no_storm:
        storm = {"queue_size": 8, "request_timeout_s": 1.0}
        n = STORM_CLIENTS
        load = partial(closed_loop, keys=keys, clients=n, duration_s=args.duration, timeout_s=1.0)
        run("retry storm", storm, load, f"{n} clients, {{rate}} req/s")
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        serve_child(json.loads(args.child))
        return 0
    if args.client_cpus:
        os.sched_setaffinity(0, cpu_list(args.client_cpus))  # hey, curl and the load processes inherit it
    if args.refusal_cost:
        line = refusal_cost(args)
        command = "python bench/overload.py " + shlex.join(sys.argv[1:] if argv is None else argv)
        print(f"`{command}` — load average {os.getloadavg()[0]:.1f}: {line}")
        return 0
    rows = scenarios(args)
    engine = (
        f"fake engine, {args.batch_ms:g} ms per batch + {args.image_ms:g} ms per image"
        if args.fake
        else "the embedded default model"
    )
    command = "python bench/overload.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    report = (
        f"`{command}` — {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {engine}, "
        f"max_batch_size {args.max_batch_size}, {os.cpu_count()} CPUs, server on CPUs "
        f"{args.server_cpus or 'any'}, load from {args.client_processes} processes on CPUs "
        f"{args.client_cpus or 'any'} (load average {os.getloadavg()[0]:.1f} at the end)\n\n{table(rows)}\n"
    )
    print(report)
    if args.out:
        args.out.write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
