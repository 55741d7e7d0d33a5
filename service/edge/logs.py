"""Per-request log context and the process's logging: text, or one JSON object per line.

The outermost middleware opens a `RequestRecord` for each request; code on the request's path adds
to its `fields` (queue wait, batch ids, seeds), and the access line writes them once at the end.
Every log record made inside the request's context carries its `request_id`.
"""

from __future__ import annotations

import importlib
import json
import logging
import re
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

ACCESS_LOGGER = "tiue.access"
_LIBRARIES = ("transformers.utils.logging", "diffusers.utils.logging")  # each has its own stderr handler
_QUIET_LOGGERS = ("py.warnings", "transformers", "diffusers")  # their warnings go out at DEBUG
_IN_ACCESS_MESSAGE = frozenset({"method", "route", "status", "duration_s"})  # not repeated in text lines


# Characters that must never reach a log line or an answer raw: C0/C1 controls and DEL (a terminal
# escape, a NUL, a newline that forges a line), Unicode line/paragraph separators, the bidi overrides
# that reorder what a reader sees, and lone surrogates (no encoding can write them).
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


def printable(text: str) -> str:
    """`text` with every character above written as a Python escape (`\\x1b`, `\\ud800`): one line, any
    encoding, nothing a terminal acts on. Everything else, non-ASCII letters included, stays as it is."""
    return _UNPRINTABLE.sub(_escape, text) if _UNPRINTABLE.search(text) else text


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


class LogFormat(str, Enum):
    TEXT = "text"
    JSON = "json"


@dataclass
class RequestRecord:
    """One request, as its access line will tell it. `fields` is for code on the request's path to fill."""

    request_id: str
    method: str
    route: str
    client: str | None
    started: float  # perf_counter
    fields: dict[str, Any] = field(default_factory=dict)

    @property
    def model(self) -> str:
        """The served model the request was routed to ("" before one was chosen): a metric label."""
        return str(self.fields.get("model", ""))


_current: ContextVar[RequestRecord | None] = ContextVar("tiue_request", default=None)


def current_request() -> RequestRecord | None:
    """The request being served in this context, or None (startup, the device worker's own task)."""
    return _current.get()


def request_id() -> str | None:
    record = _current.get()
    return record.request_id if record is not None else None


def annotate(**fields: Any) -> None:
    """Add fields to the current request's access line; does nothing outside a request."""
    record = _current.get()
    if record is not None:
        record.fields.update(fields)


@contextmanager
def request_context(record: RequestRecord) -> Iterator[RequestRecord]:
    token = _current.set(record)
    try:
        yield record
    finally:
        _current.reset(token)


def log_access(record: RequestRecord, status: int, duration_s: float, *, quiet: bool = False) -> None:
    """The request's one access line; `quiet` (probes, metrics scrapes) logs it at debug."""
    fields = {
        "method": record.method,
        "route": record.route,
        "status": status,
        "duration_s": round(duration_s, 6),
        "client": record.client,
        **record.fields,
    }
    logging.getLogger(ACCESS_LOGGER).log(
        logging.DEBUG if quiet else logging.INFO,
        "%s %s %d %.3fs",
        record.method,
        record.route,
        status,
        duration_s,
        extra={"request_id": record.request_id, "fields": fields},
    )


class RequestIdFilter(logging.Filter):
    """Puts `request_id` on every record: an explicit `extra={"request_id": ...}`, else the context's."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = request_id()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, request_id, the record's `fields`, traceback."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        out: dict[str, Any] = {
            "ts": f"{stamp}.{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        rid = getattr(record, "request_id", None)
        if rid is not None:
            out["request_id"] = rid
        fields = getattr(record, "fields", None)
        if isinstance(fields, Mapping):
            for key, value in fields.items():
                out.setdefault(str(key), value)
        if record.exc_info:
            out["traceback"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["traceback"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        line = json.dumps(out, default=str, ensure_ascii=False)
        # json.dumps escapes C0 controls but leaves a lone surrogate raw, which no UTF-8 stream can write:
        # as `\\udXXX` it is a JSON escape again, so the line stays valid JSON.
        return line.encode("utf-8", "backslashreplace").decode("utf-8")


class TextFormatter(logging.Formatter):
    """`time level logger: message key=value ... [request_id]`, the traceback (if any) on the lines below."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        fields = getattr(record, "fields", None)
        if isinstance(fields, Mapping):
            line += "".join(
                f" {key}={_text(value)}"
                for key, value in fields.items()
                if key not in _IN_ACCESS_MESSAGE and value is not None
            )
        rid = getattr(record, "request_id", None)
        return printable(f"{line} [{rid}]" if rid else line)


def _text(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list | tuple):
        return ",".join(_text(item) for item in value)
    return str(value)


class LibraryWarningFilter(logging.Filter):
    """Warnings from the model libraries and Python's `warnings` (deprecations, config notes) are for
    whoever debugs the service, not for its operator: written at DEBUG, so shown only at that level.
    Their errors keep their level."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR or not record.name.startswith(_QUIET_LOGGERS):
            return True
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return logging.getLogger().isEnabledFor(logging.DEBUG)


def make_handler(fmt: LogFormat, stream: Any = None) -> logging.Handler:
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.addFilter(RequestIdFilter())
    handler.addFilter(LibraryWarningFilter())
    handler.setFormatter(JsonFormatter() if fmt is LogFormat.JSON else TextFormatter())
    return handler


def configure_logging(level: str, fmt: LogFormat) -> None:
    """One handler on the root logger, to stderr; uvicorn, warnings and the model libraries go through it.

    Uvicorn's own access line is off: the service writes its own (`tiue.access`), with the request ID.
    """
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
        old.close()
    root.addHandler(make_handler(fmt))
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.asgi"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    access = logging.getLogger("uvicorn.access")
    access.handlers.clear()
    access.propagate = False
    access.disabled = True
    logging.captureWarnings(True)
    for module in _LIBRARIES:
        try:
            library = importlib.import_module(module)
        except ImportError:
            continue
        library.disable_default_handler()
        library.enable_propagation()
        library.disable_progress_bar()  # tqdm ("Loading weights") writes to stderr directly, not in lines
