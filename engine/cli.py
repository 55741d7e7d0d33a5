"""`tiue generate`: one image from the command line, with the time each stage took.

The command line itself (flags, TIUE_* settings) is service.cli's; this is what it runs.
"""

from __future__ import annotations

import dataclasses
import secrets
import sys
import time
from pathlib import Path

from engine.config import EngineConfig


def parse_size(text: str) -> tuple[int, int]:
    """'WxH' -> (width, height); ValueError with the expected form otherwise."""
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"size must look like 512x512, got {text!r}") from None
    return width, height


def generate_image(
    config: EngineConfig, prompt: str, seed: int | None, size: tuple[int, int] | None, out: Path
) -> int:
    from PIL import Image

    from engine.errors import EngineError
    from engine.pipeline import load_pipeline
    from engine.types import GenerationRequest, TorchCompile

    if config.torch_compile is TorchCompile.AUTO:  # one image: compiling would cost minutes to save ms
        config = dataclasses.replace(config, torch_compile=TorchCompile.OFF)
    try:
        started = time.perf_counter()
        pipeline = load_pipeline(config)
        loaded = time.perf_counter() - started
        width, height = size or (pipeline.info.default_size,) * 2
        seed = seed if seed is not None else secrets.randbelow(2**31)
        request = GenerationRequest(prompt=prompt, seed=seed, width=width, height=height)
        pipeline.validate(request)
        started = time.perf_counter()
        result = pipeline.generate([request])
        total = time.perf_counter() - started
    except EngineError as exc:
        print(f"tiue generate: {exc}", file=sys.stderr)
        return 2
    if result.images[0].flagged:
        print(
            f"tiue generate: the safety checker flagged the image (seed {seed}); nothing was written. "
            "Try another prompt or seed",
            file=sys.stderr,
        )
        return 1
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(result.images[0].pixels).save(out)
    info = pipeline.info
    print(
        f"model {info.name} on {info.backend}/{info.device}/{info.precision}, {info.steps} steps, "
        f"loaded in {loaded:.2f} s"
    )
    for stage, seconds in result.timings.items():
        print(f"  {stage:<12} {seconds * 1000:9.1f} ms")
    print(f"  {'total':<12} {total * 1000:9.1f} ms")
    print(f"wrote {out} ({width}x{height}, seed {seed})")
    return 0
