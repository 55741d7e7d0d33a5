"""Eager torch vs ONNX Runtime on the CPU, for the whole pipeline (text encoder, TiUE denoiser, VAE).

Two random-init models in SD layout: the test suite's tiny one (64 px) and a mid-size one (UNet
channels 64/128/256, 128 px). Prints per-stage medians and the torch/ORT ratio (> 1: ORT is faster).

    python bench/cpu_backends.py                      # both models, batch 1 and 4, 2 threads
    python bench/cpu_backends.py --models mid --batches 1 --repeats 5
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.config import EngineConfig  # noqa: E402
from engine.pipeline import TiUEPipeline, load_pipeline  # noqa: E402
from engine.types import DEVICE_STAGES as STAGES  # noqa: E402
from engine.types import BackendName, GenerationRequest  # noqa: E402
from tests.support.tiny_model import MID_128, build_tiny_pipeline  # noqa: E402


def time_backends(
    pipelines: dict[BackendName, TiUEPipeline], batch: int, repeats: int
) -> dict[BackendName, dict[str, float]]:
    """Median seconds per stage and in total, runs of the backends interleaved so that both see the
    same background load (this machine is shared), after one warm-up each."""
    size = next(iter(pipelines.values())).info.default_size
    requests = [GenerationRequest("a red circle on a blue background", i, size, size) for i in range(batch)]
    runs: dict[BackendName, list[dict[str, float]]] = {b: [] for b in pipelines}
    for pipeline in pipelines.values():
        pipeline.generate(requests)
    for _ in range(repeats):
        for backend, pipeline in pipelines.items():
            started = time.perf_counter()
            timings = pipeline.generate(requests).timings
            runs[backend].append({**timings, "total": time.perf_counter() - started})
    return {
        b: {k: statistics.median(r.get(k, 0.0) for r in rs) for k in (*STAGES, "total")}
        for b, rs in runs.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="tiny,mid")
    parser.add_argument("--batches", default="1,4")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    with tempfile.TemporaryDirectory(prefix="tiue-cpu-bench-") as tmp:
        run(args.models.split(","), batches, args.repeats, args.threads, Path(tmp))


def run(models: list[str], batches: list[int], repeats: int, threads: int, work: Path) -> None:
    builders = {
        "tiny": lambda p: build_tiny_pipeline(p, "sd15"),
        "mid": lambda p: build_tiny_pipeline(p, "sd15", size=MID_128),
    }
    load = os.getloadavg()[0]
    print(
        f"torch {torch.__version__}, {threads} threads, load average {load:.1f}; median of {repeats} runs; ms per batch"
    )
    print("| model | params (UNet) | px | batch | backend | text | denoise | vae | total | torch/ORT |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in models:
        model_dir = builders[name](work / name)
        pipelines = {
            backend: load_pipeline(
                EngineConfig(
                    model_dir=model_dir,
                    backend=backend,
                    engine_dir=work / "engines",
                    build_engines=True,
                    max_batch_size=max(batches),
                    prompt_cache_size=0,  # the text encoder's time is measured, not skipped
                )
            )
            for backend in (BackendName.TORCH, BackendName.ONNXRUNTIME)
        }
        unet = pipelines[BackendName.TORCH].components.unet
        params = sum(p.numel() for p in unet.parameters()) / 1e6
        size = pipelines[BackendName.TORCH].info.default_size
        for batch in batches:
            results = time_backends(pipelines, batch, repeats)
            ratio = results[BackendName.TORCH]["total"] / results[BackendName.ONNXRUNTIME]["total"]
            for backend, r in results.items():
                cells = " | ".join(f"{r[k] * 1e3:.0f}" for k in (*STAGES, "total"))
                last = f"{ratio:.2f}x" if backend is BackendName.ONNXRUNTIME else ""
                print(f"| {name} | {params:.1f}M | {size} | {batch} | {backend.value} | {cells} | {last} |")


if __name__ == "__main__":
    main()
