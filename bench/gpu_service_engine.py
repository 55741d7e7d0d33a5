"""bench/gpu_service.py's child processes: the engine called directly (the ceiling, and image
encoding on its own images) and diffusers' StableDiffusionPipeline (the peer). Each runs in a fresh
process and reports through `emit`."""

from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.gpu_service_report import emit

FORMATS = ("png", "jpeg", "webp")
SMOOTH_SIZE = 512


def prompt(k: int) -> str:
    return f"a photo of object {k}, studio light"


def timed_calls(
    call: Callable[[], Any], min_calls: int, min_s: float = 1.0, max_calls: int = 200
) -> list[float]:
    """Seconds per call: at least `min_calls` and `min_s` of them, after one untimed call."""
    call()
    times: list[float] = []
    until = time.perf_counter() + min_s
    while len(times) < min_calls or (time.perf_counter() < until and len(times) < max_calls):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return times


def direct(spec: dict[str, Any]) -> int:
    """The engine as `tiue serve` builds it: `Settings()` from the same TIUE_* environment."""
    from engine.pipeline import load_pipeline
    from engine.types import GenerationRequest
    from service.settings import Settings

    config = Settings().engine_config()
    started = time.monotonic()
    pipe = load_pipeline(config)
    load_s = time.monotonic() - started
    pipe.warmup()
    mode = getattr(config.torch_compile, "value", config.torch_compile)
    emit(
        "starts",
        {
            "what": "engine in a new process (load_pipeline + warmup)",
            "artefacts": spec["cache"],
            "ready_s": time.monotonic() - spec["started"],
            "log": f"load {load_s:.1f}s, warm-up {time.monotonic() - started - load_s:.1f}s, "
            f"torch_compile {mode}, buckets {list(config.batch_buckets()) or '-'}",
        },
    )
    size = pipe.info.default_size
    counter = itertools.count()
    last: list[Any] = []

    def call(batch: int) -> None:
        seeds = itertools.islice(counter, batch)
        requests = [GenerationRequest(prompt=prompt(k), seed=k, width=size, height=size) for k in seeds]
        result = pipe.generate(requests)
        stages.append(result.timings)
        last[:] = [result.images[0].pixels]

    for batch in spec["batches"]:
        stages: list[dict[str, float]] = []
        times = timed_calls(lambda b=batch: call(b), spec["min_calls"], spec["min_s"])
        row = {k: 1e3 * statistics.median(t[k] for t in stages[1:]) for k in stages[-1]}
        p50 = statistics.median(times)
        emit(
            "direct",
            {"batch": batch, "p50_ms": 1e3 * p50, "images_s": batch * len(times) / sum(times), **row},
        )
    if last:
        encode_rows(last[0])
    return 0


def encode_rows(model_image: Any) -> None:
    """service/images.py's encoder on the engine's own image (random weights: noise-like, PNG's worst
    case) and on a smooth 512x512 image (closer to a photograph's entropy)."""
    import numpy as np

    from service.images import encode_image

    grad = np.linspace(0, 255, SMOOTH_SIZE * SMOOTH_SIZE * 3).reshape(SMOOTH_SIZE, SMOOTH_SIZE, 3)
    noise = np.random.default_rng(0).integers(0, 12, grad.shape)
    smooth = (grad + noise).clip(0, 255).astype(np.uint8)
    for name, pixels in (("engine output", model_image), ("smooth gradient", smooth)):
        for fmt in FORMATS:
            data = encode_image(pixels, fmt)  # type: ignore[arg-type]
            times = timed_calls(lambda p=pixels, f=fmt: encode_image(p, f), 10, min_s=0.3)
            emit(
                "encode",
                {
                    "image": name,
                    "size": f"{pixels.shape[1]}x{pixels.shape[0]}",
                    "format": fmt,
                    "ms": 1e3 * statistics.median(times),
                    "kb": len(data) / 1e3,
                },
            )


def peer(spec: dict[str, Any]) -> int:
    """What a user would run instead: diffusers' pipeline, 4 looped DDIM steps without guidance (the
    student's distilled guidance), its UNet and decoder compiled with CUDA graphs, the same weights."""
    import numpy as np
    import torch
    from diffusers import AutoencoderTiny, DDIMScheduler, StableDiffusionPipeline

    smoke = spec["smoke"]
    if smoke:
        torch.set_num_threads(1)  # as the engine's smoke settings (TIUE_THREADS=1)
    device, dtype = ("cpu", torch.float32) if smoke else ("cuda", torch.float16)
    folder = Path(spec["folder"])
    started = time.monotonic()
    pipe = StableDiffusionPipeline.from_pretrained(
        folder, torch_dtype=dtype, safety_checker=None, requires_safety_checker=False, local_files_only=True
    )
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    if spec["decoder"] == "tiny" and (folder / "vae_tiny").is_dir():
        pipe.vae = AutoencoderTiny.from_pretrained(folder / "vae_tiny", torch_dtype=dtype)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    # inductor on a CPU takes minutes a graph: the smoke run compiles with dynamo alone
    options: dict[str, Any] = (
        {"backend": "eager"} if smoke else {"mode": "reduce-overhead", "fullgraph": True}
    )
    pipe.unet = torch.compile(pipe.unet, dynamic=False, **options)
    pipe.vae.decode = torch.compile(pipe.vae.decode, dynamic=False, **options)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    counter = itertools.count()
    emit("note", {"text": f"peer: pipeline loaded in {time.monotonic() - started:.1f}s, {size}x{size}"})

    def call(batch: int) -> None:
        seeds = list(itertools.islice(counter, batch))
        generators = [torch.Generator(device).manual_seed(s) for s in seeds]
        out = pipe(
            prompt=[prompt(s) for s in seeds],
            num_inference_steps=4,
            guidance_scale=0.0,
            height=size,
            width=size,
            output_type="np",
            generator=generators,
        )
        (out.images * 255).round().astype(np.uint8)  # the engine's output is uint8 too

    for batch in spec["batches"]:
        started = time.monotonic()
        for _ in range(2):  # compiles, then records the CUDA graphs
            call(batch)
        warm_s = time.monotonic() - started
        times = timed_calls(lambda b=batch: call(b), spec["min_calls"], spec["min_s"])
        p50 = statistics.median(times)
        emit(
            "peer",
            {
                "batch": batch,
                "p50_ms": 1e3 * p50,
                "images_s": batch * len(times) / sum(times),
                "warm_s": warm_s,
            },
        )
    return 0
