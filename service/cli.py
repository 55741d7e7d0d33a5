"""`tiue`: one command for serving and its tools, one settings model for all of them.

Every subcommand reads the same `TIUE_*` variables (service.settings.Settings); its flags, made from
the settings' own fields (type, choices, default, description), override them. Heavy imports wait for
the handler, so `tiue --help` imports neither torch nor FastAPI.
"""

from __future__ import annotations

import argparse
import enum
import os
import re
import sys
import types
import typing
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.config import EngineConfig, Scope

if TYPE_CHECKING:
    import uvicorn
    from pydantic import ValidationError

    from service.settings import Settings

# Settings each command reads: EngineConfig's fields, by the commands they are for (engine.config.Scope).
EXPORT_FIELDS = EngineConfig.names(Scope.MODEL)  # what loads the model
BUILD_FIELDS = EngineConfig.names(Scope.MODEL, Scope.ARTEFACTS)  # and what finds or builds its artefacts
ENGINE_FIELDS = EngineConfig.names()  # and what runs it
_FLAG_NAMES = {"model_dir": "model"}  # a field whose flag is not its own name
_NOT_FLAGS = frozenset({"api_keys"})  # secrets stay out of the command line (and `ps`): TIUE_API_KEYS only


def _flag(field: str) -> str:
    return "--" + _FLAG_NAMES.get(field, field).replace("_", "-")


def _plain_type(annotation: Any) -> Any:
    """`X | None` -> X."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0] if len(args) == 1 else str
    return annotation


def add_setting_flags(parser: argparse.ArgumentParser, fields: Iterable[str]) -> None:
    """One flag per settings field, defaulting to None so that only a flag given overrides TIUE_*."""
    from service.settings import Settings

    group = parser.add_argument_group("settings (each also read from its TIUE_* variable)")
    for name in fields:
        info = Settings.model_fields[name]
        kind = _plain_type(info.annotation)
        default = info.default.value if isinstance(info.default, enum.Enum) else info.default
        shown = "" if default is None or info.default_factory is not None else f"; default: {default}"
        help_text = f"{info.description or name.replace('_', ' ')} (TIUE_{name.upper()}{shown})"
        options: dict[str, Any] = {"dest": name, "default": None, "help": help_text}
        if isinstance(kind, type) and issubclass(kind, enum.Enum):
            options["choices"] = [member.value for member in kind]
            options["type"] = str.lower  # as the settings read TIUE_*: JSON and json alike
        elif kind is bool:
            options["action"] = argparse.BooleanOptionalAction
        elif kind in (int, float, Path):
            options["type"] = kind
        group.add_argument(_flag(name), **options)


def settings_from(args: argparse.Namespace, fields: Iterable[str]) -> Settings:
    """TIUE_* environment variables, overridden by the flags given on the command line."""
    from service.settings import Settings

    overrides = {name: getattr(args, name) for name in fields if getattr(args, name, None) is not None}
    if overrides.get("model_dir") is not None:
        overrides.setdefault("models", {})  # a flag naming one model replaces TIUE_MODELS
    return Settings(**overrides)


def serve_settings(args: argparse.Namespace) -> Settings:
    return settings_from(args, _serve_fields())


def _serve_fields() -> list[str]:
    from service.settings import Settings

    return [name for name in Settings.model_fields if name not in _NOT_FLAGS]


class _ModelFlag(argparse.Action):
    """`tiue serve --model DIR` (one model, as TIUE_MODEL_DIR) or `--model NAME=DIR`, repeated (as TIUE_MODELS)."""

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, value: Any, _: Any = None
    ) -> None:
        name, sep, folder = str(value).partition("=")
        models: dict[str, Path | None] = dict(getattr(namespace, "models", None) or {})
        if not sep:
            if models or namespace.model_dir is not None:
                parser.error("--model: give one DIR, or NAME=DIR for each of several models")
            namespace.model_dir = Path(value)
            return
        if namespace.model_dir is not None or name in models:
            parser.error(f"--model {value}: give one DIR, or NAME=DIR once for each of several models")
        models[name] = Path(folder) if folder else None
        namespace.models = models


def _size(text: str) -> tuple[int, int]:
    from engine.types import parse_size

    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _seed(text: str) -> int:
    from engine.types import MAX_SEED

    if not re.fullmatch(r"[0-9]+", text, re.ASCII) or int(text) > MAX_SEED:
        raise argparse.ArgumentTypeError(f"{text!r} is not a seed: give a whole number from 0 to {MAX_SEED}")
    return int(text)


def _batch(text: str) -> Any:
    from engine.export.cli import parse_batch

    try:
        return parse_batch(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_profile_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--batch",
        type=_batch,
        default=None,
        metavar="MIN:OPT:MAX",
        help="batch range (default 1:4:max-batch-size)",
    )
    parser.add_argument(
        "--sizes",
        nargs="+",
        default=None,
        metavar="SPEC",
        help="image sizes in pixels, one profile each: MIN:OPT:MAX for both sides, or W_RANGExH_RANGE "
        "(e.g. 256:512:768 or 512x512:768:1024); default half to 1.5 times the native size",
    )


def _add_serve(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve the HTTP API",
        description="Serve the HTTP API. With nothing set it serves the embedded default model on "
        "127.0.0.1:8000. Every setting is also read from its TIUE_* variable (docs/api.md, Settings); "
        "API keys only from TIUE_API_KEYS.",
    )
    add_setting_flags(p, [name for name in _serve_fields() if name not in ("model_dir", "models")])
    p.add_argument(
        "--model",
        dest="model_dir",
        action=_ModelFlag,
        default=None,
        metavar="DIR|NAME=DIR",
        help="a diffusers pipeline folder (TIUE_MODEL_DIR); or NAME=DIR, repeated, for several models on one "
        "device (TIUE_MODELS; an empty DIR: the embedded default model)",
    )
    p.set_defaults(handler=_run_serve, models=None)


def _add_generate(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "generate",
        help="generate one image and print per-stage timings",
        description="Generate one image with the model, backend and precision the server would use.",
    )
    p.add_argument("prompt")
    p.add_argument("--seed", type=_seed, default=None, help="0 to 2**32 - 1 (default: random, printed)")
    p.add_argument(
        "--size", type=_size, default=None, help="WxH in pixels (default: the model's native size)"
    )
    p.add_argument(
        "--out", type=Path, default=Path("out.png"), help="image file; the suffix picks the format"
    )
    add_setting_flags(p, ENGINE_FIELDS)
    p.set_defaults(handler=_run_generate)


def _add_export(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export",
        help="export the ONNX graphs (text encoder, TiUE denoiser, VAE decoder)",
        description="Export the text encoder, the whole TiUE denoiser (one graph) and the VAE decoder to "
        "ONNX with dynamic batch and size, into a cache entry under --out (use it as the engine dir).",
    )
    p.add_argument("--out", type=Path, required=True, help="engine folder to write the entry into")
    _add_profile_options(p)
    add_setting_flags(p, EXPORT_FIELDS)
    p.set_defaults(handler=_run_export)


def _add_build_engines(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "build-engines",
        help="build the compiled artefacts the service loads (TensorRT engines, ONNX graphs or AOTInductor packages)",
        description="For --backend tensorrt: export the ONNX graphs if needed and build TensorRT engines "
        "from them for this GPU and TensorRT version; for --backend onnxruntime: export the graphs; for "
        "--backend torch: AOTInductor packages of each stage at each warmed batch size and size, for this "
        "device and torch version. Into --engine-dir, where the server with the same settings finds them "
        "by their key.",
    )
    _add_profile_options(p)
    add_setting_flags(p, BUILD_FIELDS)
    p.set_defaults(handler=_run_build_engines)


_REGISTRARS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (
    _add_serve,
    _add_generate,
    _add_export,
    _add_build_engines,
)


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tiue-serve")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tiue", description="TiUE text-to-image: serve and tools.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for register in _REGISTRARS:
        register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # Before torch loads OpenMP: idle threads sleep instead of spinning, so a busy neighbour on the same
    # CPUs slows a request ~2x instead of ~10x (bench/noisy_neighbour.py, docs/benchmarks.md).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    return handler(args)


def settings_error(exc: ValidationError, command: str = "serve") -> str:
    """Each bad setting and what is wrong with it, never the values given: one of them may be an API key."""
    lines = [f"tiue {command}: invalid settings"]
    for error in exc.errors(include_input=False, include_url=False, include_context=False):
        field = ".".join(str(part) for part in error["loc"]) or "settings"
        lines.append(f"  {field}: {str(error['msg']).removeprefix('Value error, ')}")
    return _redact("\n".join(lines), os.environ.get("TIUE_API_KEYS", "").split(","))


def _redact(text: str, secrets: Iterable[str]) -> str:
    """In case a message quotes a value: the API keys in the environment become `***`."""
    for secret in sorted((s.strip() for s in secrets if s.strip()), key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def _settings_or_exit(args: argparse.Namespace, fields: Iterable[str]) -> Settings | None:
    from pydantic import ValidationError

    try:
        return settings_from(args, fields)
    except ValidationError as exc:
        print(settings_error(exc, args.command), file=sys.stderr)
        return None


def _run_generate(args: argparse.Namespace) -> int:
    from engine.cli import check_out, generate_image

    problem = check_out(args.out)  # before any work: a typo in --out must not cost a model load
    if problem is not None:
        print(f"tiue generate: {problem}", file=sys.stderr)
        return 2
    settings = _settings_or_exit(args, ENGINE_FIELDS)
    if settings is None:
        return 2
    _quiet_libraries()
    return generate_image(settings.engine, args.prompt, args.seed, args.size, args.out)


def _quiet_libraries() -> None:
    """Warnings (ours, one line each) on stderr; the model libraries' progress bars and notes only at debug."""
    from service.edge.logs import LogFormat, configure_logging

    configure_logging("warning", LogFormat.TEXT)


def _preflight(settings: Settings) -> str | None:
    """Each model's device and folder checked before the port is bound; the first problem, or None."""
    from dataclasses import replace

    from engine.errors import EngineError
    from engine.loading import check_config

    config = settings.engine
    for _name, folder in settings.model_dirs():
        try:
            check_config(replace(config, model_dir=folder))
        except EngineError as exc:
            return str(exc)
    return None


def _run_export(args: argparse.Namespace) -> int:
    from engine.export.cli import export_graphs

    settings = _settings_or_exit(args, EXPORT_FIELDS)
    if settings is None:
        return 2
    _tool_logging()
    return export_graphs(settings.engine, args.out, args.batch, args.sizes)


def _run_build_engines(args: argparse.Namespace) -> int:
    from engine.export.cli import build_engines

    settings = _settings_or_exit(args, BUILD_FIELDS)
    if settings is None:
        return 2
    _tool_logging()
    return for_each_model(settings, lambda config: build_engines(config, args.batch, args.sizes))


def for_each_model(settings: Settings, run: Callable[[EngineConfig], int]) -> int:
    """Run a tool once per configured model (TIUE_MODELS, else the one model), in order; the worst exit
    code, so that an engine-build Job fails if any model's build does."""
    from dataclasses import replace

    config = settings.engine
    return max(run(replace(config, model_dir=folder)) for _name, folder in settings.model_dirs())


def _tool_logging() -> None:
    import logging

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")


def _run_serve(args: argparse.Namespace) -> int:
    from service.app import create_app
    from service.edge.logs import configure_logging
    from service.edge.server import build_server

    settings = _settings_or_exit(args, _serve_fields())
    if settings is None:
        return 2
    configure_logging(settings.log_level.value, settings.log_format)
    problem = _preflight(settings)
    if problem is not None:
        print(f"tiue serve: {problem}", file=sys.stderr)
        return 2

    failures: list[BaseException] = []
    server: uvicorn.Server | None = None

    def on_fatal(exc: BaseException) -> None:
        failures.append(exc)
        if server is not None:
            server.should_exit = True

    app = create_app(settings, on_fatal=on_fatal)
    server = build_server(app, settings)
    server.run()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
