"""Load benchmark for the HTTP service (not a test): images/s and latency at several concurrencies,
with batching on and off, against calling the engine directly at the same batch size.

    python bench/load_service.py --engine fake                 # pure service overhead (sleep "device")
    python bench/load_service.py --engine tiny                 # the tiny random-init model, real compute
    python bench/load_service.py --model DIR [--size 256x256]  # any diffusers pipeline folder (mid-size)
    python bench/load_service.py --build-mid DIR               # build a mid-size random-init model, then run

The server runs in its own process (`tiue serve`'s app on 127.0.0.1, access log off); the load
generator is closed-loop: each of C clients sends its next request when the last one came back.
Overhead per request is measured in place: client latency minus the engine's own stage times for
the batch the request rode in (from the response's `timings`), so drift in machine load between
runs does not leak into it. Throughput is compared with back-to-back `pipeline.generate` calls in
this process at the batch size the service could at best form, min(C, max_batch_size), in paired
slices (direct, then service, repeated) so that background load on a shared host hits both alike;
the fraction reported is the median of the per-pair ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine.types import DEVICE_STAGES  # noqa: E402

PROMPTS = ["a red circle on a blue square", "a small green star", "a large yellow ring", "a purple triangle"]


class SleepEngine:
    """A fake device: each generate() costs batch_ms + image_ms per image, spent sleeping (no CPU)."""

    def __init__(self, batch_ms: float, image_ms: float, size: int = 64):
        from engine.types import ModelInfo

        self.batch_s, self.image_s = batch_ms / 1000, image_ms / 1000
        self.info = ModelInfo("sleep-engine", "fake", "fp32", "none", 4, 77, 16, size)
        self._images: dict[tuple[int, int], Any] = {}

    def validate(self, request: Any) -> None:
        pass

    def count_tokens(self, prompt: str) -> int:
        return len(prompt.split()) + 2

    def generate(self, requests: Sequence[Any]) -> Any:
        import numpy as np

        from engine.types import BatchResult, GeneratedImage

        started = time.perf_counter()
        threading.Event().wait(self.batch_s + self.image_s * len(requests))
        key = requests[0].shape_key
        if key not in self._images:  # smooth gradient + mild noise: compresses like a real image, roughly
            w, h = key
            grad = np.linspace(0, 255, w * h * 3).reshape(h, w, 3)
            noise = np.random.default_rng(0).integers(0, 16, (h, w, 3))
            self._images[key] = (grad + noise).clip(0, 255).astype(np.uint8)
        images = [GeneratedImage(self._images[key], r.seed) for r in requests]
        return BatchResult(images, {"denoise": time.perf_counter() - started})

    def warmup(self, batch_sizes: Any = None, sizes: Any = None) -> None:
        pass


def make_engine(cfg: dict[str, Any]) -> Any:
    if cfg.get("torch_threads"):
        import torch

        torch.set_num_threads(cfg["torch_threads"])
    if cfg["engine"] == "fake":
        return SleepEngine(cfg["fake_batch_ms"], cfg["fake_image_ms"])
    from engine.config import EngineConfig
    from engine.pipeline import load_pipeline

    return load_pipeline(EngineConfig(model_dir=Path(cfg["model_dir"]), max_batch_size=cfg["max_batch_size"]))


# -- the server child ---------------------------------------------------------------------------


def serve_child(cfg: dict[str, Any]) -> None:
    import logging

    import uvicorn

    from service.app import create_app
    from service.settings import Settings

    logging.basicConfig(level=logging.WARNING)
    settings = Settings.model_validate(  # engine fields (max_batch_size) are taken at the top level too
        {
            "max_batch_size": cfg["max_batch_size"],
            "max_wait_ms": cfg["max_wait_ms"],
            "queue_size": max(256, cfg["max_batch_size"]),
            "max_size": 4096,
            "port": cfg["port"],
        }
    )
    app = create_app(settings, pipeline_factory=lambda: make_engine(cfg))
    uvicorn.run(app, host="127.0.0.1", port=cfg["port"], log_level="warning", access_log=False)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def stop_process(process: subprocess.Popen[Any], grace_s: float = 30) -> None:
    """SIGTERM (the server drains), then SIGKILL if it is still there after `grace_s`."""
    process.terminate()
    try:
        process.wait(grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def wait_ready(process: subprocess.Popen[Any], url: str, timeout: float = 300) -> None:
    """Until the server process at `url` answers /readyz 200; an error if it exits or takes too long."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)  # another process: nothing to await
    raise TimeoutError("the server did not become ready")


class ServerProcess:
    def __init__(self, cfg: dict[str, Any]):
        self.cfg = {**cfg, "port": free_port()}
        self.url = f"http://127.0.0.1:{self.cfg['port']}"
        self.process = subprocess.Popen([sys.executable, __file__, "--child", json.dumps(self.cfg)], cwd=ROOT)

    def wait_ready(self, timeout: float = 300) -> None:
        wait_ready(self.process, self.url, timeout)

    def stop(self) -> None:
        stop_process(self.process)


# -- measurements -------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else float("nan")


def measure_direct(pipeline: Any, batch: int, size: tuple[int, int], seconds: float) -> dict[str, float]:
    """Back-to-back generate() calls at one batch size, as a caller without the service would make them."""
    from engine.types import GenerationRequest

    def requests(start: int) -> list[Any]:
        return [GenerationRequest(PROMPTS[i % len(PROMPTS)], i, *size) for i in range(start, start + batch)]

    pipeline.generate(requests(0))
    times: list[float] = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(times) < 3:
        started = time.perf_counter()
        pipeline.generate(requests(len(times) * batch))
        times.append(time.perf_counter() - started)
    return {
        "batch": batch,
        "images_per_s": batch * len(times) / sum(times),
        "p50_ms": 1000 * statistics.median(times),
    }


def scrape(url: str) -> dict[str, float]:
    """Batch counts and the device's busy seconds (the sum of its stage times) so far, summed over every
    label set (Prometheus' own parser, as the container smoke reads them)."""
    import httpx

    from deploy.smoke_checks import parse_metrics

    metrics = parse_metrics(httpx.get(f"{url}/metrics", timeout=10).text)
    return {
        "tiue_batch_size_images_sum": metrics.total("tiue_batch_size_images_sum"),
        "tiue_batch_size_images_count": metrics.total("tiue_batch_size_images_count"),
        "busy_s": metrics.total(
            "tiue_stage_duration_seconds_sum", lambda labels: labels.get("stage") != "image_encode"
        ),
    }


async def run_load(
    url: str, concurrency: int, seconds: float, warmup: float, size: str, raw: bool, min_requests: int
) -> dict[str, Any]:
    """Closed loop: each client sends its next request when its last one came back. The measured
    window opens after `warmup` and lasts `seconds`, longer (up to 4x) until `min_requests` fit in it."""
    import httpx

    done: list[tuple[float, float, float]] = []  # (started, finished, engine seconds of its batch)
    errors = 0
    stop = asyncio.Event()
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    headers = {"Accept": "image/png"} if raw else {}
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        begin = time.perf_counter() + warmup

        async def client_loop(k: int) -> None:
            nonlocal errors
            i = k
            while not stop.is_set():
                body = {"prompt": PROMPTS[i % len(PROMPTS)], "seed": i, "size": size}
                started = time.perf_counter()
                response = await client.post("/generate", json=body, headers=headers)
                finished = time.perf_counter()
                i += concurrency
                if response.status_code != 200:
                    errors += 1
                    continue
                timings = _timings(response, raw)
                done.append((started, finished, sum(timings.get(s, 0.0) for s in DEVICE_STAGES)))

        async def window() -> float:
            await asyncio.sleep(begin + seconds - time.perf_counter())
            while time.perf_counter() < begin + 4 * seconds:
                if sum(1 for started, finished, _ in done if started >= begin) >= min_requests:
                    break
                await asyncio.sleep(0.05)
            end = time.perf_counter()
            stop.set()
            return end

        clients = [asyncio.create_task(client_loop(k)) for k in range(concurrency)]
        end = await window()
        await asyncio.gather(*clients)

    inside = [(s, f, e) for s, f, e in done if begin <= f <= end]
    measured = [(s, f, e) for s, f, e in inside if s >= begin]
    return {
        "images_per_s": len(inside) / (end - begin),
        "window_s": end - begin,
        "latencies": [f - s for s, f, _ in measured],
        "overheads": [f - s - e for s, f, e in measured],
        "errors": errors,
    }


def _timings(response: Any, raw: bool) -> dict[str, float]:
    if raw:  # Server-Timing: name;dur=ms, ...
        parts = (item.split(";dur=") for item in response.headers["server-timing"].split(", "))
        return {name: float(ms) / 1000 for name, ms in parts}
    timings: dict[str, float] = response.json()["timings"]
    return timings


# -- the run ------------------------------------------------------------------------------------


def build_mid(out_dir: Path) -> Path:
    """A mid-size random-init SD1.5-layout pipeline (40M-parameter UNet, 256 px), for CPU-sized runs."""
    from tests.support.tiny_model import MID_256, build_tiny_pipeline

    return build_tiny_pipeline(out_dir, "sd15", seed=0, size=MID_256)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--engine", choices=["fake", "tiny", "model"], default="tiny")
    parser.add_argument("--model", type=Path, help="a diffusers pipeline folder (implies --engine model)")
    parser.add_argument("--build-mid", type=Path, help="build a mid-size model into this folder and use it")
    parser.add_argument("--size", help="WxH (default: the model's default size)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--max-batch-size", type=int, default=4)
    parser.add_argument("--max-wait-ms", type=float, default=10.0)
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds per slice")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each slice")
    parser.add_argument("--repeats", type=int, default=3, help="paired direct/service slices per cell")
    parser.add_argument("--min-requests", type=int, default=10, help="extend a slice (up to 4x) to this many")
    parser.add_argument("--fake-batch-ms", type=float, default=40.0)
    parser.add_argument("--fake-image-ms", type=float, default=10.0)
    parser.add_argument("--raw", action="store_true", help="ask for raw PNG bytes instead of JSON/base64")
    parser.add_argument(
        "--torch-threads",
        type=int,
        help="intra-op threads for the engine, the same in the server and for the direct calls; on a "
        "shared CPU, 1 avoids OpenMP threads stalling each other when one is descheduled",
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)

    if args.build_mid:
        args.model = build_mid(args.build_mid)
    if args.model:
        args.engine = "model"
    cfg: dict[str, Any] = {
        "engine": args.engine,
        "fake_batch_ms": args.fake_batch_ms,
        "fake_image_ms": args.fake_image_ms,
        "max_batch_size": args.max_batch_size,
        "max_wait_ms": args.max_wait_ms,
        "torch_threads": args.torch_threads,
    }
    if args.engine == "tiny":
        from tests.support.tiny_model import build_tiny_pipeline

        cfg["model_dir"] = str(
            build_tiny_pipeline(Path(tempfile.mkdtemp(prefix="tiue-bench-")), "sd15", seed=0)
        )
    elif args.engine == "model":
        cfg["model_dir"] = str(args.model)

    pipeline = make_engine(cfg)
    default = pipeline.info.default_size
    size = args.size or f"{default}x{default}"
    width, height = (int(v) for v in size.lower().split("x"))
    print(
        f"engine {cfg['engine']} {cfg.get('model_dir', '')} at {size}; {os.cpu_count()} cores; "
        f"load average {os.getloadavg()[0]:.1f}; {args.repeats} paired slices of {args.duration:g} s per cell",
        flush=True,
    )
    rows = []
    for max_batch in (args.max_batch_size, 1):
        server = ServerProcess({**cfg, "max_batch_size": max_batch})
        try:
            server.wait_ready()
            for c in args.concurrency:
                rows.append(measure_cell(args, server, pipeline, c, max_batch, size, (width, height)))
                print_row(rows[-1])
        finally:
            server.stop()
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps({"config": cfg, "size": size, "rows": rows}, indent=2))
    return 0


def measure_cell(
    args: argparse.Namespace,
    server: ServerProcess,
    pipeline: Any,
    concurrency: int,
    max_batch: int,
    size: str,
    shape: tuple[int, int],
) -> dict[str, Any]:
    """Alternate direct and service slices, so that background load on a shared host hits both alike;
    the fraction is the median of the per-pair ratios."""
    batch = min(concurrency, max_batch)
    direct, service, latencies, overheads = [], [], [], []
    busy = wall = 0.0
    images = batches = errors = 0.0
    for _ in range(args.repeats):
        direct.append(measure_direct(pipeline, batch, shape, args.duration)["images_per_s"])
        before, t0 = scrape(server.url), time.perf_counter()
        result = asyncio.run(
            run_load(server.url, concurrency, args.duration, args.warmup, size, args.raw, args.min_requests)
        )
        after, t1 = scrape(server.url), time.perf_counter()
        service.append(result["images_per_s"])
        latencies += result["latencies"]
        overheads += result["overheads"]
        errors += result["errors"]
        busy += after["busy_s"] - before["busy_s"]
        wall += t1 - t0
        batches += after["tiue_batch_size_images_count"] - before["tiue_batch_size_images_count"]
        images += after["tiue_batch_size_images_sum"] - before["tiue_batch_size_images_sum"]
    return {
        "max_batch_size": max_batch,
        "concurrency": concurrency,
        "images_per_s": statistics.median(service),
        "p50_ms": 1000 * percentile(latencies, 0.5),
        "p99_ms": 1000 * percentile(latencies, 0.99),
        "overhead_p50_ms": 1000 * percentile(overheads, 0.5),
        "requests": len(latencies),
        "errors": int(errors),
        "mean_batch": images / batches if batches else float("nan"),
        "device_busy": busy / wall,
        "direct_batch": batch,
        "direct_images_per_s": statistics.median(direct),
        "fraction_of_direct": statistics.median(s / d for s, d in zip(service, direct, strict=True)),
        "fractions": [s / d for s, d in zip(service, direct, strict=True)],
        "load_average": os.getloadavg()[0],
    }


def print_row(row: dict[str, Any]) -> None:
    print(
        f"  max_batch={row['max_batch_size']} c={row['concurrency']}: {row['images_per_s']:.2f} img/s "
        f"p50 {row['p50_ms']:.1f} ms p99 {row['p99_ms']:.1f} ms, latency - engine p50 {row['overhead_p50_ms']:.1f} ms, "
        f"mean batch {row['mean_batch']:.2f}, device busy {100 * row['device_busy']:.0f} % "
        f"({row['requests']} requests, {row['errors']} errors, load {row['load_average']:.1f}, "
        f"pair ratios {' '.join(f'{100 * f:.0f}%' for f in row['fractions'])})",
        flush=True,
    )


def print_table(rows: list[dict[str, Any]]) -> None:
    print()
    print(
        "| max batch | concurrency | images/s | p50 ms | p99 ms | latency − engine p50 ms | mean batch "
        "| device busy | direct images/s (batch) | service / direct |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['max_batch_size']} | {r['concurrency']} | {r['images_per_s']:.2f} | {r['p50_ms']:.1f} | "
            f"{r['p99_ms']:.1f} | {r['overhead_p50_ms']:.1f} | {r['mean_batch']:.2f} | {100 * r['device_busy']:.0f} % | "
            f"{r['direct_images_per_s']:.2f} ({r['direct_batch']}) | {100 * r['fraction_of_direct']:.0f} % |"
        )


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        serve_child(json.loads(sys.argv[2]))
    else:
        sys.exit(main())
