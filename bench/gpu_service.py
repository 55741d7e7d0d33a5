"""The whole service on one GPU (not a test): a real `tiue serve` on 127.0.0.1 with the service's GPU
settings, against the engine called directly and against diffusers' own pipeline, in one run.

    python bench/gpu_service.py --out DIR          # on the GPU: diffusers, fastapi, uvicorn importable
    python bench/gpu_service.py --smoke --out DIR  # the CPU, the tiny test-size model, < 2 minutes
    bench/gpu_service.sh                           # the device call: installs the carried wheels first

The model is bench/gpu_fast_path.py's SD2.1-base-sized pipeline (random weights, fp16, 512x512, with a
TAESD-sized tiny decoder). Sections, in this order, each skipped with a note when the time left
(`--budget-s`) is less than it may take:

1. `tiue serve` from nothing (empty compile cache, no built artefacts): start-to-ready;
2. its closed-loop images/s and client p50/p99 at concurrency 1, 8, 32, 64 (raw image bytes, one
   image a request, a new prompt every request), and the time the service adds to each request
   (client latency minus the engine stages of its batch, from Server-Timing);
3. the engine called directly in a fresh process on the compile cache 1 left (its start-to-warmed is
   the warm-cache start), images/s per batch size (the ceiling), and image encoding (PNG, JPEG, WebP)
   timed with service/images.py's encoder at the native size;
4. the peer: diffusers' StableDiffusionPipeline, 4 looped DDIM steps, torch.compile reduce-overhead,
   the same weights and decoder, batch 1 and 8;
5. `tiue build-engines --backend torch` (AOTInductor artefacts), then `tiue serve` with
   TIUE_TORCH_COMPILE=aot on an empty compile cache: start-to-ready from built artefacts.

Engine settings are the service's (`Settings` from the same TIUE_* environment as the server), with
--torch-compile, --prompt-cache-size, --warm-batch-sizes and --set NAME=VALUE passed through as TIUE_*;
unset, the service's defaults apply. The tables (markdown and JSON) are rewritten to --out after every
row, so a run cut short leaves what it measured. --smoke runs the same code on the CPU (the peer
compiles with dynamo's eager backend there): it checks the script, not the speed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.gpu_service_report import MARK, Report  # noqa: E402
from bench.load_service import free_port, percentile, stop_process, wait_ready  # noqa: E402
from engine.types import DEVICE_STAGES  # noqa: E402

CONCURRENCY = (1, 8, 32, 64)
FORMATS = ("png", "jpeg", "webp")


@dataclass
class Plan:
    """What the run measures and how long each part may take (seconds, on the GPU or the CPU)."""

    smoke: bool
    window_s: float  # measured seconds per concurrency
    warm_s: float  # unmeasured seconds before each window
    min_calls: int  # timed direct / peer calls per batch size, at least
    min_s: float  # and at least this many seconds of them
    peer_batches: tuple[int, ...] = (1, 8)

    @property
    def device(self) -> str:
        return "cpu" if self.smoke else "cuda"


def plan_for(args: argparse.Namespace) -> Plan:
    if args.smoke:
        return Plan(True, window_s=1.5, warm_s=0.5, min_calls=2, min_s=0.2, peer_batches=(1,))
    peers = tuple(int(b) for b in args.peer_batches.split(","))
    return Plan(False, window_s=args.window_s, warm_s=1.0, min_calls=20, min_s=1.0, peer_batches=peers)


# -- settings shared by the server, the direct engine and the artefact build ----------------------


def service_env(
    args: argparse.Namespace, plan: Plan, folder: Path, work: Path, **extra: str
) -> dict[str, str]:
    """The server's environment: this process's less any TIUE_*, plus the service's GPU settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIUE_")}
    env.update(
        {
            "PYTHONUNBUFFERED": "1",
            "TIUE_MODEL_DIR": str(folder),
            "TIUE_DEVICE": plan.device,
            "TIUE_PRECISION": "fp32" if plan.smoke else "fp16",
            "TIUE_DECODER": args.decoder,
            "TIUE_MAX_BATCH_SIZE": str(args.max_batch_size),
            "TIUE_QUEUE_SIZE": str(max(256, 4 * max(CONCURRENCY))),  # c=64 must not meet 429 at a full queue
            "TIUE_COMPILE_CACHE_DIR": str(work / "compile"),
            "TIUE_ENGINE_DIR": str(work / "engines"),
            "TIUE_LOG_LEVEL": "info",
        }
    )
    if plan.smoke:  # a shared CPU: OpenMP threads that outnumber the free cores stall each other
        env["TIUE_THREADS"] = "1"
    passed = {
        "TIUE_TORCH_COMPILE": args.torch_compile,
        "TIUE_PROMPT_CACHE_SIZE": args.prompt_cache_size,
        "TIUE_WARM_BATCH_SIZES": args.warm_batch_sizes,
    }
    env.update({k: str(v) for k, v in passed.items() if v is not None})
    for item in args.set:
        name, _, value = item.partition("=")
        env[name if name.startswith("TIUE_") else f"TIUE_{name.upper()}"] = value
    env.update(extra)
    return env


def scrape(url: str) -> dict[str, float]:
    """Counters from /metrics, summed over their label sets."""
    wanted = (
        "tiue_batch_size_images_sum",
        "tiue_batch_size_images_count",
        "tiue_prompt_cache_hits_total",
        "tiue_prompt_cache_misses_total",
    )
    values: dict[str, float] = {}
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
        for line in response.read().decode().splitlines():
            name = line.split("{")[0].split(" ")[0]
            if name in wanted:
                values[name] = values.get(name, 0.0) + float(line.split()[-1])
    return values


# -- the server -------------------------------------------------------------------------------------


class Server:
    """`tiue serve` (python -m service.cli serve) in its own process, its log in a file."""

    def __init__(self, env: dict[str, str], log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        env = {**env, "TIUE_HOST": "127.0.0.1", "TIUE_PORT": str(self.port)}
        self.started = time.monotonic()
        with log.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "service.cli", "serve"], cwd=ROOT, env=env, stdout=out, stderr=out
            )

    def wait_ready(self, timeout: float) -> float:
        wait_ready(self.process, self.url, timeout)
        return time.monotonic() - self.started

    def log_lines(self, pattern: str) -> list[str]:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return [line.strip() for line in text.splitlines() if re.search(pattern, line, re.IGNORECASE)]

    def stop(self) -> None:
        stop_process(self.process, grace_s=15)


async def closed_loop(url: str, concurrency: int, plan: Plan, fmt: str, offset: int) -> dict[str, Any]:
    """Each of `concurrency` clients sends its next request when its last one came back; the window
    opens after plan.warm_s. A new prompt every request, so a prompt cache does not flatter the engine."""
    from bench.overload import Pool

    pool = Pool(url, timeout_s=120)
    done: list[tuple[float, float, float]] = []  # started, finished, engine seconds of its batch
    statuses: dict[str, int] = {}
    begin = time.perf_counter() + plan.warm_s
    end = begin + plan.window_s

    async def client(k: int) -> None:
        i = k
        while time.perf_counter() < end:
            body = {"prompt": f"a photo of object {offset + i}, studio light", "seed": offset + i}
            data = json.dumps({**body, "output_format": fmt}).encode()
            headers = {"Content-Type": "application/json", "Accept": f"image/{fmt}"}
            started = time.perf_counter()
            try:
                code, fields = await pool.post("/generate", data, headers)
            except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError) as exc:
                statuses[type(exc).__name__] = statuses.get(type(exc).__name__, 0) + 1
                i += concurrency
                continue
            finished = time.perf_counter()
            statuses[str(code)] = statuses.get(str(code), 0) + 1
            if code == 200:
                timing = dict(
                    (part.split(";dur=")[0], float(part.split(";dur=")[1]) / 1e3)
                    for part in fields.get("server-timing", "").split(", ")
                    if ";dur=" in part
                )
                done.append((started, finished, sum(timing.get(s, 0.0) for s in DEVICE_STAGES)))
            i += concurrency

    try:
        await asyncio.gather(*(client(k) for k in range(concurrency)))
    finally:
        pool.close()
    # steady state: every answer that came back inside the window (at high concurrency on a slow device a
    # request outlasts a short window, so "started inside" would leave none)
    inside = [(s, f, e) for s, f, e in done if begin <= f <= end]
    return {
        "images_s": len(inside) / plan.window_s,
        "latencies": [f - s for s, f, _ in inside],
        "added": [f - s - e for s, f, e in inside],
        "engine": [e for _, _, e in inside],
        "statuses": statuses,
    }


def service_rows(
    report: Report, server: Server, plan: Plan, args: argparse.Namespace, deadline: float
) -> None:
    for n, concurrency in enumerate(CONCURRENCY):
        if deadline - time.monotonic() < plan.warm_s + plan.window_s + 15:
            report.note(f"service at concurrency {concurrency}: skipped, out of time")
            continue
        before = scrape(server.url)
        result = asyncio.run(closed_loop(server.url, concurrency, plan, args.format, offset=n * 1_000_000))
        after = scrape(server.url)
        batches = after.get("tiue_batch_size_images_count", 0) - before.get("tiue_batch_size_images_count", 0)
        images = after.get("tiue_batch_size_images_sum", 0) - before.get("tiue_batch_size_images_sum", 0)
        hits = after.get("tiue_prompt_cache_hits_total")
        misses = after.get("tiue_prompt_cache_misses_total")
        lat, added, engine = result["latencies"], result["added"], result["engine"]
        report.add(
            "service",
            {
                "concurrency": concurrency,
                "format": args.format,
                "images_s": result["images_s"],
                "p50_ms": 1e3 * percentile(lat, 0.5),
                "p99_ms": 1e3 * percentile(lat, 0.99),
                "engine_p50_ms": 1e3 * percentile(engine, 0.5),
                "added_p50_ms": 1e3 * percentile(added, 0.5),
                "mean_batch": images / batches if batches else float("nan"),
                "requests": len(lat),
                "statuses": result["statuses"],
                "prompt_cache": None
                if hits is None or misses is None
                else {"hits": hits - before.get("tiue_prompt_cache_hits_total", 0), "misses": misses},
            },
        )


# -- children: the direct engine and the diffusers peer, each in a fresh process --------------------


def run_child(kind: str, spec: dict[str, Any], env: dict[str, str], report: Report, deadline: float) -> bool:
    """Run `--child KIND` to completion or the deadline; its records go into the report as they come."""
    child = subprocess.Popen(
        [sys.executable, __file__, "--child", kind, json.dumps(spec)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    try:
        for line in child.stdout:
            if line.startswith(MARK):
                record = json.loads(line[len(MARK) :])
                section = record.pop("section")
                report.note(record["text"]) if section == "note" else report.add(section, record)
            else:
                sys.stdout.write(line)
            if time.monotonic() > deadline:
                raise TimeoutError
        child.wait(timeout=max(1.0, deadline - time.monotonic()))
    except (TimeoutError, subprocess.TimeoutExpired):
        stop_process(child, grace_s=5)
        report.note(f"{kind}: cut at the time budget; its rows so far are above")
        return False
    if child.returncode:
        report.note(f"{kind}: FAILED (exit {child.returncode}); see the log above")
    return child.returncode == 0


def direct_child(spec: dict[str, Any]) -> int:
    """The engine as the server builds it (`Settings()` from the same TIUE_* environment)."""
    from bench.gpu_service_engine import direct

    return direct(spec)


def peer_child(spec: dict[str, Any]) -> int:
    from bench.gpu_service_engine import peer

    return peer(spec)


# -- the run ----------------------------------------------------------------------------------------


def section_cold_service(
    report: Report, args: argparse.Namespace, plan: Plan, env: dict[str, str], work: Path, deadline: float
) -> None:
    server = Server(env, work / "server-cold.log")
    try:
        try:
            ready = server.wait_ready(max(10.0, deadline - time.monotonic() - 30))
        except (RuntimeError, TimeoutError) as exc:
            report.note(f"tiue serve (empty compile cache): not ready: {exc}; log tail: {tail(server.log)}")
            return
        report.add("starts", start_record("tiue serve", "none; empty compile cache", ready, server))
        service_rows(report, server, plan, args, deadline)
    finally:
        server.stop()
        append_log(args.out, server.log)


def section_artefacts(
    report: Report, args: argparse.Namespace, plan: Plan, env: dict[str, str], work: Path, deadline: float
) -> None:
    build_env = {**env, "TIUE_COMPILE_CACHE_DIR": str(work / "compile-build")}
    command = [sys.executable, "-m", "service.cli", "build-engines", "--backend", "torch"]
    started = time.monotonic()
    try:
        build = subprocess.run(
            command,
            cwd=ROOT,
            env=build_env,
            capture_output=True,
            text=True,
            timeout=max(1.0, deadline - time.monotonic() - (3 if plan.smoke else 20)),
        )
    except subprocess.TimeoutExpired as exc:
        output = "".join(
            o.decode(errors="replace") if isinstance(o, bytes) else o or "" for o in (exc.stdout, exc.stderr)
        )
        packages = len(re.findall(r"compiled \S+\.pt2 in", output))
        report.note(
            f"tiue build-engines --backend torch: cut at the time budget after {time.monotonic() - started:.0f}s, "
            f"{packages} packages compiled by then"
        )
        return
    built_s = time.monotonic() - started
    if build.returncode:
        reason = (build.stderr.strip().splitlines() or ["no message"])[-1]
        report.note(
            f"built artefacts: skipped, tiue build-engines --backend torch exited {build.returncode}: {reason}"
        )
        return
    size_mb = sum(f.stat().st_size for f in (work / "engines").rglob("*") if f.is_file()) / 1e6
    packages = len(list((work / "engines").rglob("*.pt2")))
    report.note(
        f"tiue build-engines --backend torch: {built_s:.0f}s, {packages} packages, {size_mb:.0f} MB in the engine dir"
    )
    # The service's own mode unless --torch-compile says otherwise: `auto` loads built packages on CUDA.
    # On the CPU `auto` is eager and ignores them, so the smoke run asks for `aot` to load them.
    mode = args.torch_compile or ("aot" if plan.smoke else None)
    server_env = {**env, "TIUE_COMPILE_CACHE_DIR": str(work / "compile-empty")}
    if mode is not None:
        server_env["TIUE_TORCH_COMPILE"] = mode
    server = Server(server_env, work / "server-artefacts.log")
    try:
        try:
            ready = server.wait_ready(max(5.0, deadline - time.monotonic() - 5))
        except (RuntimeError, TimeoutError) as exc:
            report.note(f"tiue serve (built artefacts): not ready: {exc}; log tail: {tail(server.log)}")
            return
        what = f"tiue serve (TIUE_TORCH_COMPILE={mode or 'its default'})"
        record = start_record(what, "built artefacts; empty compile cache", ready, server)
        report.add("starts", {**record, "build_s": built_s})
        for line in server.log_lines(r"AOTInductor|artefact|instead")[:6]:
            report.note(f"artefact server log: {line[:300]}")
    finally:
        server.stop()
        append_log(args.out, server.log)


def start_record(what: str, cache: str, ready_s: float, server: Server) -> dict[str, Any]:
    warm = [
        m.group(0)
        for line in server.log_lines(r"warmed up in")
        if (m := re.search(r"warmed up in \S+ s", line))
    ]
    return {"what": what, "artefacts": cache, "ready_s": ready_s, "log": f"log: {warm[-1]}" if warm else ""}


def direct_batches(max_batch_size: int) -> list[int]:
    """The batch sizes of the ceiling: powers of two up to the largest batch, and the largest batch."""
    return sorted({2**i for i in range(8) if 2**i <= max_batch_size} | {max_batch_size})


def tail(log: Path, lines: int = 5) -> str:
    text = log.read_text(errors="replace").strip().splitlines() if log.exists() else []
    return " | ".join(text[-lines:])[-800:]


def append_log(out: Path | None, log: Path) -> None:
    if out is not None and log.exists():
        with (out / "gpu_service_servers.log").open("a") as sink:
            sink.write(f"===== {log.name}\n{log.read_text(errors='replace')}\n")


def children(
    report: Report,
    args: argparse.Namespace,
    plan: Plan,
    env: dict[str, str],
    folder: Path,
    cold_s: float,
    skip: set[str],
    deadline: float,
) -> None:
    """The direct engine (on the compile cache the server left) and the peer, each in a new process."""
    spec = {
        "smoke": plan.smoke,
        "min_calls": plan.min_calls,
        "min_s": plan.min_s,
        "folder": str(folder),
        "decoder": args.decoder,
        "cache": "warm compile cache (the server's)" if "service" not in skip else "empty compile cache",
    }
    # the GPU's warm start took ~30 % of its cold one (docs/benchmarks.md); the peer compiles two batch sizes
    peer_s = 75.0 * len(plan.peer_batches)
    estimates = {"direct": 10.0 if plan.smoke else 40 + 0.5 * cold_s, "peer": 15.0 if plan.smoke else peer_s}
    batches = {"direct": direct_batches(args.max_batch_size), "peer": list(plan.peer_batches)}
    for kind in ("direct", "peer"):
        left = deadline - time.monotonic()
        if kind in skip:
            report.note(f"{kind}: skipped (--skip)")
        elif left < estimates[kind]:
            report.note(f"{kind}: skipped, {left:.0f}s left and it may take {estimates[kind]:.0f}s")
        else:
            child_spec = {**spec, "batches": batches[kind], "started": time.monotonic()}
            # the smoke run keeps time for the artefact section, so that its code runs too
            run_child(kind, child_spec, env, report, deadline - (30 if plan.smoke else 0))


def parent(args: argparse.Namespace) -> int:
    import torch

    plan = plan_for(args)
    started = time.monotonic()
    deadline = started + args.budget_s
    if not plan.smoke and not torch.cuda.is_available():
        sys.stderr.write("no CUDA GPU visible to torch (--smoke checks the script on the CPU)\n")
        return 2
    name = torch.cuda.get_device_name() if not plan.smoke else "CPU (smoke: tiny test-size model)"
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
    report = Report(
        args.out, f"{name}; torch {torch.__version__}; decoder {args.decoder}; {args.format} responses"
    )
    work = Path(tempfile.mkdtemp(prefix="tiue-gpu-service-"))
    skip = set(filter(None, args.skip.split(",")))
    try:
        from bench.gpu_fast_path import build_model

        t = time.monotonic()
        folder = build_model(work / "model", plan.device, plan.smoke)
        report.note(f"model folder built and saved in {time.monotonic() - t:.0f}s")
        env = service_env(args, plan, folder, work)
        report.settings = {k: v for k, v in env.items() if k.startswith("TIUE_") and k != "TIUE_MODEL_DIR"}
        cold_s = 0.0
        if "service" not in skip:
            t = time.monotonic()
            section_cold_service(report, args, plan, env, work, deadline)
            cold_s = time.monotonic() - t
        children(report, args, plan, env, folder, cold_s, skip, deadline)
        left = deadline - time.monotonic()
        if "artefacts" in skip:
            report.note("built artefacts: skipped (--skip)")
        elif left < (240 if not plan.smoke else 5):
            report.note(f"built artefacts: skipped, {left:.0f}s left")
        else:
            section_artefacts(report, args, plan, env, work, deadline)
        report.note(f"total {time.monotonic() - started:.0f}s (budget {args.budget_s:.0f}s)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("\n" + report.render(), flush=True)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="the tiny test-size model on the CPU")
    parser.add_argument(
        "--out", type=Path, default=None, help="folder for gpu_service.md/.json (rewritten per row)"
    )
    parser.add_argument("--budget-s", type=float, default=None, help="default 420 (smoke 110)")
    parser.add_argument("--peer-batches", default="1,8", help="the peer's batch sizes (GPU), e.g. 1")
    parser.add_argument("--skip", default="", help="sections to skip: service,direct,peer,artefacts")
    parser.add_argument(
        "--decoder", choices=("full", "tiny"), default="tiny", help="TIUE_DECODER (default tiny)"
    )
    parser.add_argument("--format", choices=FORMATS, default="jpeg", help="the service rows' response format")
    parser.add_argument("--max-batch-size", type=int, default=None, help="TIUE_MAX_BATCH_SIZE (16; smoke 4)")
    parser.add_argument("--window-s", type=float, default=6.0, help="measured seconds per concurrency (GPU)")
    parser.add_argument(
        "--torch-compile", default=None, help="TIUE_TORCH_COMPILE (unset: the service's default)"
    )
    parser.add_argument("--prompt-cache-size", type=int, default=None, help="TIUE_PROMPT_CACHE_SIZE")
    parser.add_argument("--warm-batch-sizes", default=None, help="TIUE_WARM_BATCH_SIZES, e.g. 1,2,4,8,16")
    parser.add_argument(
        "--set", action="append", default=[], metavar="NAME=VALUE", help="any other TIUE_* setting"
    )
    parser.add_argument("--child", nargs=2, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        kind, spec = args.child
        return (direct_child if kind == "direct" else peer_child)(json.loads(spec))
    args.budget_s = args.budget_s or (110.0 if args.smoke else 420.0)
    args.max_batch_size = args.max_batch_size or (4 if args.smoke else 16)
    return parent(args)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
