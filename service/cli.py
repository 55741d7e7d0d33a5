"""`tiue`: one command, subcommands registered by small functions; heavy imports wait for the handler.

Each `_add_<name>(subparsers)` adds one subcommand and sets `handler` (args -> exit code), so
`tiue --help` imports neither torch nor FastAPI.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from engine.cli import add_generate_parser
from engine.export.cli import add_build_engines_parser, add_export_parser

if TYPE_CHECKING:
    import uvicorn
    from pydantic import ValidationError

    from service.settings import Settings

_SERVE_FLAGS = {  # flag -> Settings field; a flag given on the command line wins over TIUE_* variables
    "host": "host",
    "port": "port",
    "model": "model_dir",
    "backend": "backend",
    "device": "device",
    "dtype": "dtype",
    "steps": "steps",
    "engine_dir": "engine_dir",
    "build_engines": "build_engines",
    "torch_compile": "torch_compile",
    "threads": "threads",
    "max_batch_size": "max_batch_size",
    "max_wait_ms": "max_wait_ms",
    "queue_size": "queue_size",
    "log_level": "log_level",
    "log_format": "log_format",
}


def _add_serve(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve the HTTP API",
        description="Serve the HTTP API. Settings come from TIUE_* environment variables (see "
        "README.md, The HTTP service); these flags override them. With nothing set it serves the embedded "
        "default model on 127.0.0.1:8000.",
    )
    p.add_argument("--host", help="bind address (TIUE_HOST, default 127.0.0.1)")
    p.add_argument("--port", type=int, help="TIUE_PORT, default 8000")
    p.add_argument("--model", type=Path, help="diffusers pipeline folder (TIUE_MODEL_DIR; default: embedded)")
    p.add_argument("--backend", help="torch | onnxruntime | tensorrt (TIUE_BACKEND)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (TIUE_DEVICE)")
    p.add_argument("--dtype", help="fp32 | fp16 | bf16 (TIUE_DTYPE)")
    p.add_argument("--steps", type=int, help="TiUE decoder steps (TIUE_STEPS)")
    p.add_argument("--engine-dir", type=Path, help="compiled-engine cache (TIUE_ENGINE_DIR)")
    p.add_argument("--build-engines", action="store_true", default=None, help="build missing engines at load")
    p.add_argument("--torch-compile", action="store_true", default=None, help="torch.compile the backend")
    p.add_argument("--threads", type=int, help="CPU intra-op threads, 0 = library default (TIUE_THREADS)")
    p.add_argument("--max-batch-size", type=int, help="images per engine call (TIUE_MAX_BATCH_SIZE)")
    p.add_argument("--max-wait-ms", type=float, help="batch collection window (TIUE_MAX_WAIT_MS)")
    p.add_argument("--queue-size", type=int, help="images that may wait (TIUE_QUEUE_SIZE)")
    p.add_argument("--log-level", help="debug | info | warning | error (TIUE_LOG_LEVEL)")
    p.add_argument("--log-format", help="text | json: one JSON object per line (TIUE_LOG_FORMAT)")
    p.set_defaults(handler=_run_serve)


_REGISTRARS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (
    _add_serve,
    add_generate_parser,
    add_export_parser,
    add_build_engines_parser,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tiue", description="TiUE text-to-image: serve and tools.")
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


def serve_settings(args: argparse.Namespace) -> Settings:
    """TIUE_* environment variables, overridden by the flags given on the command line."""
    from service.settings import Settings

    overrides = {
        field: getattr(args, flag) for flag, field in _SERVE_FLAGS.items() if getattr(args, flag) is not None
    }
    return Settings(**overrides)


def settings_error(exc: ValidationError) -> str:
    """Each bad setting and what is wrong with it, never the values given: one of them may be an API key."""
    lines = ["tiue serve: invalid settings"]
    for error in exc.errors(include_input=False, include_url=False, include_context=False):
        field = ".".join(str(part) for part in error["loc"]) or "settings"
        lines.append(f"  {field}: {str(error['msg']).removeprefix('Value error, ')}")
    return _redact("\n".join(lines), os.environ.get("TIUE_API_KEYS", "").split(","))


def _redact(text: str, secrets: Iterable[str]) -> str:
    """In case a message quotes a value: the API keys in the environment become `***`."""
    for secret in sorted((s.strip() for s in secrets if s.strip()), key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def _run_serve(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from service.app import create_app
    from service.logs import configure_logging
    from service.server import build_server

    try:
        settings = serve_settings(args)
    except ValidationError as exc:
        print(settings_error(exc), file=sys.stderr)
        return 2
    configure_logging(settings.log_level.value, settings.log_format)

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
