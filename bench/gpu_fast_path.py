"""The fast path on one GPU, through the service's own code (`load_pipeline`, `warmup`, `generate`):
eager vs torch.compile vs torch.compile + CUDA graphs, each with the full VAE and the tiny decoder, TiUE
one-pass vs the looped 4-step student, at 512x512 (SD2.1-base-sized random weights, fp16), batch 1/4/8:
images/s, ms per stage, peak GPU memory; and the cold start (process start to warmed) with an empty and
with a warm compile cache.

Each configuration runs in a process of its own (a cold start is a process start), in this order, each
skipped with a note when it would overrun `--budget-s`:
  1. eager                                          (TiUE and looped)
  2. compiled, empty cache         -> cold start, empty cache
  3. compiled, the cache 2 left    -> cold start, warm cache
  4. compiled + CUDA graphs (reduce-overhead), the same cache
  5. the looped student compiled, if time is left
The tables are rewritten to --out after every row, so a run cut short leaves what it measured.

    python bench/gpu_fast_path.py --out gpu_fast_path.md            # on the GPU (diffusers importable)
    python bench/gpu_fast_path.py --smoke                           # the CPU, tiny models, < 2 minutes

--smoke runs the same cells on the CPU with tiny models; compiling there uses dynamo's `eager` backend
(inductor on a CPU takes minutes a graph) and no CUDA graphs, so it checks the script, not the speed.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MARK = "@@ "  # a child's result lines start with this; everything else is its log
TIUE, LOOPED = "TiUE one-pass", "looped 4-step"


@dataclass
class Cell:
    name: str
    mode: str  # TIUE_TORCH_COMPILE
    cache: str  # what the compile cache holds when the cell starts
    tiue: bool = True
    looped: bool = False
    rows: bool = True  # throughput rows (a warm-cache start only times its warm-up: the rows would repeat)
    estimate_s: float = 60.0  # on the GPU: what it may take, to skip it rather than be cut mid-way


def cells(smoke: bool) -> list[Cell]:
    scale = 0.15 if smoke else 1.0  # GPU estimates from the H100 runs in docs/backends.md
    cuda_graphs = "default" if smoke else "reduce-overhead"
    return [
        Cell("eager", "off", "-", looped=True, estimate_s=60 * scale),
        Cell("compiled", "default", "empty", estimate_s=330 * scale),
        Cell("compiled", "default", "warm", rows=False, estimate_s=60 * scale),
        Cell("compiled + CUDA graphs", cuda_graphs, "warm (default mode's)", estimate_s=150 * scale),
        Cell("compiled", "default", "warm (TiUE's)", tiue=False, looped=True, estimate_s=200 * scale),
    ]


# -- the parent ------------------------------------------------------------------------------------


@dataclass
class Report:
    out: Path | None
    header: list[str]
    rows: list[dict[str, Any]] = field(default_factory=list)
    starts: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, record: dict[str, Any]) -> None:
        (self.starts if record["kind"] == "start" else self.rows).append(record)
        self.save()

    def note(self, text: str) -> None:
        print(f"- {text}", flush=True)
        self.notes.append(text)
        self.save()

    def save(self) -> None:
        text = self.render()
        if self.out is not None:
            self.out.write_text(text)

    def render(self) -> str:
        lines = [*self.header, "", "### Throughput and stages (median per call; stages synchronised)", ""]
        lines += [
            "| configuration | compile cache | decoder | denoiser | batch | text ms | denoise ms | decode ms | total ms | images/s | peak GiB |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in self.rows:
            lines.append(
                f"| {r['cell']} | {r['cache']} | {r['decoder']} | {r['denoiser']} | {r['batch']} | {r['text_encode']:.1f} | "
                f"{r['denoise']:.1f} | {r['vae_decode']:.1f} | {r['total']:.1f} | {r['images_s']:.1f} | "
                f"{r['peak_gib']:.2f} |"
            )
        lines += ["", "### Cold start: process start to warmed (every bucket compiled or loaded)", ""]
        lines += [
            "| configuration | compile cache | denoiser | start to ready s | load s | warm-up s | cache MB after |",
            "|---|---|---|---|---|---|---|",
        ]
        for s in self.starts:
            lines.append(
                f"| {s['cell']} | {s['cache']} | {s['denoiser']} | {s['ready_s']:.1f} | {s['load_s']:.1f} | "
                f"{s['warm_s']:.1f} | {s['cache_mb']:.0f} |"
            )
        return "\n".join([*lines, "", *[f"- {n}" for n in self.notes], ""])


def run_cell(
    cell: Cell, args: argparse.Namespace, folder: Path, cache: Path, deadline: float, report: Report
) -> None:
    spec = {
        "cell": cell.name,
        "mode": cell.mode,
        "cache_state": cell.cache,
        "folder": str(folder),
        "cache": str(cache),
        "tiue": cell.tiue,
        "looped": cell.looped,
        "rows": cell.rows,
        "batches": [int(b) for b in args.batches.split(",")],
        "iters": args.iters,
        "smoke": args.smoke,
        "deadline": deadline,
        "started": time.monotonic(),
    }
    child = subprocess.Popen(
        [sys.executable, __file__, "--child", json.dumps(spec)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert child.stdout is not None
    try:
        for line in child.stdout:
            if line.startswith(MARK):
                record = json.loads(line[len(MARK) :])
                if record["kind"] == "note":
                    report.note(record["text"])
                else:
                    report.add(record)
                    print(line[len(MARK) :].strip(), flush=True)
            else:
                sys.stdout.write(line)
            if time.monotonic() > deadline:
                raise TimeoutError
        child.wait(timeout=max(1.0, deadline - time.monotonic()))
    except (TimeoutError, subprocess.TimeoutExpired):
        child.kill()
        child.wait()
        report.note(
            f"{cell.name} ({cell.mode}, cache {cell.cache}): cut at the time budget; its rows so far are above"
        )
        return
    if child.returncode:
        report.note(
            f"{cell.name} ({cell.mode}, cache {cell.cache}): FAILED (exit {child.returncode}); see the log"
        )


def parent(args: argparse.Namespace) -> int:
    import torch

    started = time.monotonic()
    deadline = started + args.budget_s
    device = "cpu" if args.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        sys.stderr.write("no CUDA GPU visible to torch (--smoke checks the script on the CPU)\n")
        return 2
    name = (
        torch.cuda.get_device_name() if device == "cuda" else "CPU (smoke: tiny models, dynamo eager backend)"
    )
    header = [
        f"## The fast path: {name}; torch {torch.__version__}",
        "",
        "SD2.1-base-sized pipeline (random weights: 865M UNet, 23-layer 1024-wide CLIP, SD VAE; TAESD-sized "
        "tiny decoder), fp16, 512x512, through `load_pipeline` / `warmup` / `generate`."
        if not args.smoke
        else "Smoke run: tiny models at 64x64, fp32, on the CPU.",
    ]
    report = Report(args.out, header)
    work = Path(tempfile.mkdtemp(prefix="tiue-fast-path-"))
    try:
        t = time.monotonic()
        folder = build_model(work / "model", device, args.smoke)
        report.note(f"model folder built and saved in {time.monotonic() - t:.0f}s")
        cache = work / "compile-cache"
        for cell in cells(args.smoke):
            if {cell.name, cell.mode} & set(args.skip.split(",")):
                report.note(f"{cell.name} ({cell.mode}, cache {cell.cache}): skipped (--skip)")
                continue
            left = deadline - time.monotonic()
            if left < cell.estimate_s:
                report.note(
                    f"{cell.name} ({cell.mode}, cache {cell.cache}{', looped' if not cell.tiue else ''}): skipped, "
                    f"{left:.0f}s left of the budget and it may take {cell.estimate_s:.0f}s"
                )
                continue
            run_cell(cell, args, folder, cache, deadline, report)
        report.note(f"total {time.monotonic() - started:.0f}s (budget {args.budget_s:.0f}s)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("\n" + report.render(), flush=True)
    return 0


def build_model(folder: Path, device: str, smoke: bool) -> Path:
    """bench/gpu_pipeline.py's SD2.1-base-sized pipeline, plus a random TAESD-sized tiny decoder in
    `vae_tiny/` when the engine has the tiny decoder (engine.loading.TINY_DECODER)."""
    import torch

    from bench.gpu_pipeline import build_sd21_sized
    from engine import loading

    build_sd21_sized(folder, device, smoke)
    tiny = getattr(loading, "TINY_DECODER", None)
    if tiny is not None:  # the tiny decoder (Decoder.TINY) has landed in the engine
        from diffusers import AutoencoderTiny

        with torch.device(device):
            vae_tiny = AutoencoderTiny()  # TAESD's layout: 4 latent channels, 8x upsampling
        dtype = torch.float32 if smoke else torch.float16
        vae_tiny.to(dtype).save_pretrained(folder / tiny, safe_serialization=True)
    return folder


# -- the child: one configuration in a fresh process -----------------------------------------------


def emit(record: dict[str, Any]) -> None:
    print(MARK + json.dumps(record), flush=True)


def child(spec: dict[str, Any]) -> int:
    import logging

    import torch

    logging.basicConfig(level=logging.INFO, format="  %(name)s: %(message)s")
    for noisy in ("httpx", "diffusers", "transformers", "torch"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from engine import compiling
    from engine.config import EngineConfig
    from engine.pipeline import load_pipeline
    from engine.types import Precision, TorchCompile

    smoke = spec["smoke"]
    device = "cpu" if smoke else "cuda"
    if smoke:
        torch.set_num_threads(1)
        # inductor on a CPU takes minutes a graph: the smoke run compiles with dynamo alone
        compiling.compile_module = lambda m, mode: torch.compile(m, backend="eager", dynamic=False)  # type: ignore[assignment,return-value]
    batches = sorted(spec["batches"])
    config = EngineConfig(
        Path(spec["folder"]),
        device=device,
        precision=Precision.FP32 if smoke else Precision.FP16,
        torch_compile=TorchCompile(spec["mode"]),
        compile_cache_dir=Path(spec["cache"]),
        max_batch_size=max(batches),
        warm_batch_sizes=tuple(batches),
        prompt_cache_size=0,  # the text encoder's time is measured, not skipped
    )
    kinds = ([TIUE] if spec["tiue"] else []) + ([LOOPED] if spec["looped"] else [])
    for kind in kinds:
        if kind == LOOPED and spec["tiue"] and spec["deadline"] - time.monotonic() < (20 if smoke else 120):
            emit(
                {"kind": "note", "text": f"{spec['cell']}: the looped student skipped, too little time left"}
            )
            continue
        t = time.monotonic()
        pipe = load_pipeline(config, backend_factory=looped_backend if kind == LOOPED else _default_factory())
        load_s = time.monotonic() - t
        t = time.monotonic()
        pipe.warmup()
        warm_s = time.monotonic() - t
        cache = Path(spec["cache"])
        cache_mb = (
            sum(f.stat().st_size for f in cache.rglob("*") if f.is_file()) / 1e6 if cache.exists() else 0.0
        )
        emit(
            {
                "kind": "start",
                "cell": spec["cell"],
                "cache": spec["cache_state"],
                "denoiser": kind,
                "ready_s": time.monotonic() - spec["started"],
                "load_s": load_s,
                "warm_s": warm_s,
                "cache_mb": cache_mb,
            }
        )
        for decoder in getattr(pipe.info, "decoders", (None,)) if spec["rows"] else ():
            for batch in batches:
                row = time_batch(pipe, decoder, batch, spec["iters"])
                emit(
                    {
                        "kind": "row",
                        "cell": spec["cell"],
                        "cache": spec["cache_state"],
                        "denoiser": kind,
                        **row,
                    }
                )
        del pipe
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
        spec["started"] = time.monotonic()  # a second pipeline's start is not a process start
    return 0


def _default_factory() -> Any:
    from engine.backends import create_backend

    return create_backend


def looped_backend(components: Any, config: Any) -> Any:
    """The torch backend running a looped 4-step DDIM student (one UNet call a step) instead of TiUE."""
    from bench.gpu_check import Looped
    from engine.backends.torch_backend import TorchBackend

    denoiser = Looped(components.unet, components.scheduler_config, config.steps)
    return TorchBackend(components, config, None, denoiser=denoiser)


def time_batch(pipe: Any, decoder: Any, batch: int, iters: int) -> dict[str, Any]:
    import torch

    from engine.types import GenerationRequest

    size = pipe.info.default_size
    extra = {"decoder": decoder} if decoder is not None else {}
    requests = [GenerationRequest(f"a photo number {i}", i, size, size, **extra) for i in range(batch)]
    cuda = pipe.backend.device.type == "cuda"
    pipe.generate(requests)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    runs = []
    for _ in range(iters):
        t = time.perf_counter()
        result = pipe.generate(requests)
        runs.append({"total": time.perf_counter() - t, **result.timings})
    row = {k: statistics.median(r[k] for r in runs) * 1e3 for k in runs[0]}
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
    name = decoder.value if decoder is not None else "full"
    return {"decoder": name, "batch": batch, **row, "images_s": batch / row["total"] * 1e3, "peak_gib": peak}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="tiny models on the CPU: checks the script")
    parser.add_argument("--batches", default=None, help="default 1,4,8 (smoke: 1,2)")
    parser.add_argument("--iters", type=int, default=None, help="timed calls per row (default 8; smoke 2)")
    parser.add_argument("--budget-s", type=float, default=None, help="default 470 (smoke 110)")
    parser.add_argument(
        "--skip", default="", help="configurations to skip, by name or mode: eager,default,..."
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="the tables (markdown), rewritten as they fill"
    )
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        return child(json.loads(args.child))
    args.batches = args.batches or ("1,2" if args.smoke else "1,4,8")
    args.iters = args.iters or (2 if args.smoke else 8)
    args.budget_s = args.budget_s or (110.0 if args.smoke else 470.0)
    return parent(args)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
