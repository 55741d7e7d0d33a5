"""`tiue export` and `tiue build-engines`: make the compiled artefacts ahead of time (a Kubernetes Job
or init container), into the folder the service then reads as its engine_dir.

Register with `add_export_parser(subparsers)` / `add_build_engines_parser(subparsers)`; each sets
`handler` (namespace -> exit status). Importing this module and building the parsers import neither
torch nor diffusers: that waits for the handler.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from engine.export.profiles import Range

if TYPE_CHECKING:
    from engine.export.cache import Entry
    from engine.loading import Components
    from engine.types import Precision

log = logging.getLogger(__name__)

_PRECISIONS = ("fp32", "fp16")  # engine.export.onnx_export.EXPORT_PRECISIONS, without importing torch


def _batch(text: str) -> Range:
    try:
        return Range.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _common(parser: argparse.ArgumentParser, precision: str) -> None:
    parser.add_argument(
        "--model", type=Path, default=None, help="diffusers pipeline folder (default: the embedded model)"
    )
    parser.add_argument("--precision", choices=_PRECISIONS, default=precision, help=f"default {precision}")
    parser.add_argument(
        "--batch", type=_batch, default=None, metavar="MIN:OPT:MAX", help="batch range (default 1:4:8)"
    )
    parser.add_argument(
        "--sizes",
        nargs="+",
        default=None,
        metavar="SPEC",
        help="image sizes in pixels, one profile each: MIN:OPT:MAX for both sides, or W_RANGExH_RANGE "
        "(e.g. 256:512:768 or 512x512:768:1024); default half to 1.5 times the native size",
    )
    parser.add_argument(
        "--steps", type=int, default=4, help="denoising steps baked into the graph (default 4)"
    )
    parser.add_argument(
        "--device", default="auto", help="device to trace on: cpu, cuda, cuda:1 (default: cuda if present)"
    )


def add_export_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help="export the ONNX graphs (text encoder, TiUE denoiser, VAE decoder)",
        description="Export the text encoder, the whole TiUE denoiser (one graph) and the VAE decoder to "
        "ONNX with dynamic batch and size, into a cache entry under --out (use it as engine_dir).",
    )
    parser.add_argument("--out", type=Path, required=True, help="engine folder to write the entry into")
    _common(parser, "fp32")
    parser.set_defaults(handler=run_export)


def add_build_engines_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "build-engines",
        help="build the compiled artefacts the service loads (TensorRT engines or ONNX graphs)",
        description="Export the ONNX graphs if needed and build TensorRT engines from them for this GPU and "
        "TensorRT version, into --engine-dir; the service finds them there by their key.",
    )
    parser.add_argument("--engine-dir", type=Path, default=None, help="default: the cache root's engines/")
    parser.add_argument("--backend", choices=["tensorrt", "onnxruntime"], default="tensorrt")
    _common(parser, "fp16")
    parser.set_defaults(handler=run_build_engines)


def _device(text: str) -> str:
    import torch

    return ("cuda" if torch.cuda.is_available() else "cpu") if text == "auto" else text


def _load(args: argparse.Namespace) -> tuple[Components, Precision]:
    from engine.loading import load_components
    from engine.types import Precision

    precision = Precision(args.precision)
    components = load_components(args.model, precision.torch_dtype, _device(args.device), args.steps)
    return components, precision


def _report(entry: Entry, verb: str) -> None:
    files = ", ".join(f"{name} ({meta['bytes'] / 1e6:.1f} MB)" for name, meta in entry.files.items())
    scale = int(entry.info.get("dims", {}).get("vae_scale", 8))
    profiles = "; ".join(p.describe(scale) for p in entry.key.profiles)
    sys.stdout.write(f"{verb} {entry.path}\n  {files}\n  profiles: {profiles}\n")


def run_export(args: argparse.Namespace) -> int:
    from engine.errors import EngineError
    from engine.export.cache import ArtefactStore
    from engine.export.onnx_export import export_onnx_entry
    from engine.export.profiles import ModelDims, profiles_from_specs

    try:
        components, precision = _load(args)
        profiles = profiles_from_specs(args.sizes, args.batch, ModelDims.from_components(components))
        entry = export_onnx_entry(ArtefactStore(args.out), components, precision, profiles)
    except (EngineError, ValueError) as exc:
        sys.stderr.write(f"tiue export: {exc}\n")
        return 2 if isinstance(exc, ValueError) else 1
    _report(entry, "exported")
    return 0


def run_build_engines(args: argparse.Namespace) -> int:
    from engine.config import EngineConfig
    from engine.errors import EngineError
    from engine.export.onnx_export import ensure_onnx
    from engine.export.profiles import ModelDims, profiles_from_specs
    from engine.export.tensorrt_build import ensure_tensorrt, tensorrt_target
    from engine.types import BackendName

    try:
        backend = BackendName(args.backend)
        trt = backend is BackendName.TENSORRT
        target = (
            tensorrt_target(_device(args.device), build_without_gpu=True) if trt else None
        )  # before any work
        components, precision = _load(args)
        profiles = profiles_from_specs(args.sizes, args.batch, ModelDims.from_components(components))
        config = EngineConfig(
            model_dir=args.model,
            backend=backend,
            precision=precision,
            steps=args.steps,
            engine_dir=args.engine_dir,
            build_engines=True,
            max_batch_size=min(p.batch.max for p in profiles),
        )
        if target is None:
            entry = ensure_onnx(components, config, profiles=profiles)
        else:
            entry = ensure_tensorrt(components, config, *target, profiles=profiles)
    except (EngineError, ValueError) as exc:
        sys.stderr.write(f"tiue build-engines: {exc}\n")
        return 2 if isinstance(exc, ValueError) else 1
    _report(entry, "ready")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m engine.export {export,build-engines} ...`, for use before the service CLI has them."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="python -m engine.export")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_export_parser(subparsers)
    add_build_engines_parser(subparsers)
    args = parser.parse_args(argv)
    status: int = args.handler(args)
    return status
