"""`tiue generate`: one image from the command line, with the time each stage took."""

from __future__ import annotations

import argparse
import secrets
import sys
import time
from pathlib import Path

from engine.types import BackendName, Precision


def parse_size(text: str) -> tuple[int, int]:
    """'WxH' -> (width, height)."""
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 512x512, got {text!r}") from None
    return width, height


def add_engine_options(parser: argparse.ArgumentParser) -> None:
    """Options shared by every command that loads a model."""
    parser.add_argument(
        "--model", type=Path, default=None, help="diffusers pipeline folder (default: embedded model)"
    )
    parser.add_argument("--backend", type=BackendName, choices=list(BackendName), default=BackendName.TORCH)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", type=Precision, choices=list(Precision), default=Precision.FP32)
    parser.add_argument("--steps", type=int, default=4, help="TiUE decoder steps (T)")
    parser.add_argument(
        "--engine-dir", type=Path, default=None, help="compiled-engine cache (onnxruntime, tensorrt)"
    )
    parser.add_argument("--threads", type=int, default=0, help="CPU intra-op threads (0: library default)")


def add_generate_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("generate", help="generate one image and print per-stage timings")
    p.add_argument("prompt")
    p.add_argument("--seed", type=int, default=None, help="default: random (printed)")
    p.add_argument(
        "--size", type=parse_size, default=None, help="WxH in pixels (default: the model's native size)"
    )
    p.add_argument(
        "--out", type=Path, default=Path("out.png"), help="image file; the suffix picks the format"
    )
    add_engine_options(p)
    p.set_defaults(handler=run_generate)


def run_generate(args: argparse.Namespace) -> int:
    from PIL import Image

    from engine.config import EngineConfig
    from engine.errors import EngineError
    from engine.pipeline import load_pipeline
    from engine.types import GenerationRequest

    config = EngineConfig(
        model_dir=args.model,
        backend=args.backend,
        device=args.device,
        precision=args.dtype,
        steps=args.steps,
        engine_dir=args.engine_dir,
        threads=args.threads,
    )
    try:
        started = time.perf_counter()
        pipeline = load_pipeline(config)
        loaded = time.perf_counter() - started
        width, height = args.size or (pipeline.info.default_size,) * 2
        seed = args.seed if args.seed is not None else secrets.randbelow(2**31)
        request = GenerationRequest(prompt=args.prompt, seed=seed, width=width, height=height)
        pipeline.validate(request)
        started = time.perf_counter()
        result = pipeline.generate([request])
        total = time.perf_counter() - started
    except EngineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(result.images[0].pixels).save(args.out)
    info = pipeline.info
    print(
        f"model {info.name} on {info.backend}/{info.device}/{info.dtype}, {info.steps} steps, loaded in {loaded:.2f} s"
    )
    for stage, seconds in result.timings.items():
        print(f"  {stage:<12} {seconds * 1000:9.1f} ms")
    print(f"  {'total':<12} {total * 1000:9.1f} ms")
    print(f"wrote {args.out} ({width}x{height}, seed {seed})")
    return 0
