"""`tiue generate`: one image from the command line, with the time each stage took.

The command line itself (flags, TIUE_* settings) is service.cli's; this is what it runs.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from pathlib import Path

from engine.config import EngineConfig


def check_out(out: Path) -> str | None:
    """Why the image cannot be written to `out` (a format the encoder does not know, a folder that cannot
    be made or written), or None; checked before anything is loaded."""
    from PIL import Image

    if out.is_dir():
        return f"--out {out} is a folder; name the image file to write"
    suffix = out.suffix.lower()
    if not suffix:
        return f"--out {out} has no file extension; end it in .png, .jpg or .webp"
    if Image.registered_extensions().get(suffix) not in Image.SAVE:
        return f"--out {out}: {suffix} is not an image format this tool writes; use .png, .jpg or .webp"
    folder = out.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent  # the nearest folder that exists: the rest is made
    if not folder.is_dir():
        return f"--out {out}: {folder} is a file, not a folder"
    writable = os.access(out, os.W_OK) if out.exists() else os.access(folder, os.W_OK | os.X_OK)
    if not writable:
        return f"--out {out}: {out if out.exists() else folder} is not writable"
    return None


def generate_image(
    config: EngineConfig, prompt: str, seed: int | None, size: tuple[int, int] | None, out: Path
) -> int:
    from PIL import Image

    from engine.card import fit_warnings
    from engine.errors import EngineError
    from engine.pipeline import load_pipeline
    from engine.types import GenerationRequest, TorchCompile, random_seed

    if config.torch_compile is TorchCompile.AUTO:  # one image: compiling would cost minutes to save ms
        config = dataclasses.replace(config, torch_compile=TorchCompile.OFF)
    try:
        started = time.perf_counter()
        pipeline = load_pipeline(config)
        loaded = time.perf_counter() - started
        width, height = size or (pipeline.info.default_size,) * 2
        seed = seed if seed is not None else random_seed()
        request = GenerationRequest(prompt=prompt, seed=seed, width=width, height=height)
        pipeline.validate(request)
        for warning in fit_warnings(pipeline.info, prompt, width, height):
            print(f"tiue generate: warning: {warning}", file=sys.stderr)
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
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(result.images[0].pixels).save(out)
    except OSError as exc:  # the disk filled, or the folder changed since check_out
        print(f"tiue generate: cannot write {out}: {exc}", file=sys.stderr)
        return 1
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
