"""Request IDs on every answer, one access line per request, JSON logs, and no secrets in settings errors."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import suppress
from pathlib import Path
from typing import Any

import diffusers.utils.logging as diffusers_logging
import httpx
import pytest
import transformers.utils.logging as transformers_logging
from fakes import FakeEngine, serve, wait_until
from test_uvicorn_e2e import uvicorn_serving

from service.cli import build_parser, serve_settings
from service.edge.logs import LogFormat, RequestRecord, configure_logging, log_access, make_handler
from service.settings import Settings

HERE = Path(__file__).parent
ROOT = HERE.parents[1]
GOOD = {"prompt": "a red circle", "seed": 7}
MADE_ID = re.compile(r"[0-9a-f]{32}")
RID_OK, RID_FAIL = {"X-Request-ID": "json-ok"}, {"X-Request-ID": "json-fail"}
Lines = Callable[[], list[dict[str, Any]]]


@pytest.fixture
def logged() -> Iterator[Lines]:
    """The JSON lines the process's root logger would write, from everything logged in this test."""
    stream = io.StringIO()
    handler = make_handler(LogFormat.JSON, stream)
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield lambda: [json.loads(line) for line in stream.getvalue().splitlines()]
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def access_lines(lines: list[dict[str, Any]], rid: str) -> list[dict[str, Any]]:
    return [line for line in lines if line["logger"] == "tiue.access" and line.get("request_id") == rid]


def error_rid(response: httpx.Response) -> str:
    rid: str = response.json()["error"]["request_id"]
    assert rid == response.headers["x-request-id"], response.text
    return rid


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """Undo `configure_logging` after the test; pytest's own handlers are kept out of its way (it closes
    the handlers it replaces)."""
    root, names = logging.getLogger(), ("uvicorn", "uvicorn.error", "uvicorn.asgi", "uvicorn.access")
    saved = (root.handlers[:], root.level, [logging.getLogger(n).__dict__.copy() for n in names])
    for handler in saved[0]:
        root.removeHandler(handler)
    try:
        yield
    finally:
        logging.captureWarnings(False)
        for handler in root.handlers[:]:
            root.removeHandler(handler)
        for handler in saved[0]:
            root.addHandler(handler)
        root.setLevel(saved[1])
        for name, state in zip(names, saved[2], strict=True):
            logging.getLogger(name).__dict__.update(state)
        for library in (transformers_logging, diffusers_logging):  # back to their own stderr handlers
            library.enable_default_handler()
            library.disable_propagation()
            library.enable_progress_bar()


class WarningEngine(FakeEngine):
    def warmup(self, batch_sizes: Any = None, sizes: Any = None) -> None:
        warnings.warn("the fake engine warns at warm-up, as libraries do", UserWarning, stacklevel=1)
        super().warmup(batch_sizes, sizes)


def json_line(line: str) -> dict[str, Any]:
    try:
        parsed: dict[str, Any] = json.loads(line)
    except json.JSONDecodeError:
        pytest.fail(f"not a JSON line: {line!r}")
    return parsed


async def test_a_sane_request_id_is_echoed_and_any_other_replaced(engine: FakeEngine) -> None:
    async with serve(engine) as (client, _app):
        given = await client.get("/livez", headers={"X-Request-ID": "lb-7f3a:01.b_c-d"})
        absent = await client.get("/livez")
        for bad in ("has space", "x" * 129, "", "é".encode()):
            malformed = await client.get("/livez", headers={"X-Request-ID": bad})
            assert MADE_ID.fullmatch(malformed.headers["x-request-id"]), bad
    assert given.headers["x-request-id"] == "lb-7f3a:01.b_c-d"
    assert MADE_ID.fullmatch(absent.headers["x-request-id"])


async def test_every_answer_and_error_body_carries_the_request_id(logged: Lines) -> None:
    class BrokenTokenizer(FakeEngine):
        def count_tokens(self, prompt: str) -> int:
            if prompt == "break":
                raise KeyError("tokenizer state went missing")
            return super().count_tokens(prompt)

    engine = BrokenTokenizer(fail=lambda batch: any(r.prompt == "fail" for r in batch))
    auth = {"Authorization": "Bearer k1"}
    async with serve(engine, api_keys=["k1"]) as (client, _app):
        ok = await client.post("/generate", json=GOOD, headers=auth)
        raw = await client.post("/generate", json=GOOD, headers={**auth, "Accept": "image/png"})
        errors = {
            401: await client.post("/generate", json=GOOD),
            413: await client.post("/generate", json={"prompt": "x" * 70_000}, headers=auth),
            422: await client.post("/generate", json={"prompt": "a", "n": 0}, headers=auth),
            404: await client.get("/nowhere"),
            500: await client.post("/generate", json={"prompt": "fail"}, headers=auth),
        }
        unhandled = await client.post("/generate", json={"prompt": "break"}, headers=auth)
    assert ok.status_code == 200 and MADE_ID.fullmatch(ok.headers["x-request-id"])
    assert raw.headers["content-type"] == "image/png" and MADE_ID.fullmatch(raw.headers["x-request-id"])
    for status, response in errors.items():
        assert response.status_code == status, response.text
        assert MADE_ID.fullmatch(error_rid(response))
    assert unhandled.status_code == 500
    rid = error_rid(unhandled)
    (traceback_line,) = [line for line in logged() if "traceback" in line and line.get("request_id") == rid]
    assert "tokenizer state went missing" in traceback_line["traceback"]


async def test_each_request_gets_exactly_one_access_line(engine: FakeEngine, logged: Lines) -> None:
    async with serve(engine) as (client, _app):
        responses = [
            await client.post("/generate", json=GOOD),
            await client.post("/generate", json={"prompt": "a", "n": 0}),
            await client.post(
                "/generate", content=b"{not json", headers={"Content-Type": "application/json"}
            ),
            await client.get("/nowhere%0Aforged line"),
            await client.get("/readyz"),
        ]
    lines = logged()
    for response in responses:
        (line,) = access_lines(lines, response.headers["x-request-id"])
        assert line["status"] == response.status_code
        assert line["method"] == response.request.method and line["client"]
        assert isinstance(line["duration_s"], float)
    assert access_lines(lines, responses[0].headers["x-request-id"])[0]["level"] == "INFO"
    assert access_lines(lines, responses[3].headers["x-request-id"])[0]["route"] == "/nowhere%0Aforged%20line"
    assert access_lines(lines, responses[4].headers["x-request-id"])[0]["level"] == "DEBUG"  # probes: quiet
    assert not any("a red circle" in json.dumps(line) for line in lines)


@pytest.mark.slow  # waits out a real disconnect (~5 s)
async def test_a_client_that_hangs_up_gets_a_499_access_line(engine: FakeEngine, logged: Lines) -> None:
    engine.gate.clear()
    async with (
        uvicorn_serving(engine, max_batch_size=1) as (url, _app),
        httpx.AsyncClient(base_url=url, timeout=0.2) as client,
    ):
        with suppress(httpx.ReadTimeout):
            await client.post("/generate", json=GOOD, headers={"X-Request-ID": "gone-1"})
        await wait_until(lambda: bool(access_lines(logged(), "gone-1")))
    (line,) = access_lines(logged(), "gone-1")
    assert (line["status"], line["route"], line["level"]) == (499, "/generate", "INFO")


def test_text_lines_end_with_the_fields_and_the_request_id() -> None:
    stream = io.StringIO()
    logger = logging.getLogger("tiue.access")
    logger.addHandler(handler := make_handler(LogFormat.TEXT, stream))
    logger.setLevel(logging.INFO)
    try:
        record = RequestRecord("req-1", "POST", "/generate", "10.0.0.2:5123", time.perf_counter())
        record.fields.update(queue_wait_s=0.0042, batch_ids=[3], images=1, seeds=[7], model="fake-tiue")
        log_access(record, 200, 0.1234)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(logging.NOTSET)
    assert (
        stream.getvalue()
        .rstrip()
        .endswith(
            "tiue.access: POST /generate 200 0.123s client=10.0.0.2:5123 queue_wait_s=0.0042 batch_ids=3 "
            "images=1 seeds=7 model=fake-tiue [req-1]"
        )
    )


@pytest.mark.usefixtures("restore_logging")
async def test_json_logs_are_one_object_per_line_for_everything(capfd: pytest.CaptureFixture[str]) -> None:
    configure_logging("info", LogFormat.JSON)  # as `tiue serve --log-format json` does
    engine = WarningEngine(fail=lambda batch: any(r.prompt == "fail" for r in batch))
    async with (
        uvicorn_serving(engine, max_batch_size=1) as (url, _app),
        httpx.AsyncClient(base_url=url, timeout=10) as client,
    ):
        ok = await client.post("/generate", json={"prompt": "a secret red circle", "seed": 7}, headers=RID_OK)
        failed = await client.post("/generate", json={"prompt": "fail", "seed": 8}, headers=RID_FAIL)
        logging.getLogger("service.test").info("a service line")
    assert (ok.status_code, failed.status_code) == (200, 500)
    lines = [json_line(line) for line in capfd.readouterr().err.splitlines()]  # all of stderr, each line JSON
    for line in lines:
        assert {"ts", "level", "logger", "message"} <= set(line), line
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["ts"])
    loggers = {line["logger"] for line in lines}
    assert {"uvicorn.error", "tiue.access", "service.test"} <= loggers
    assert "py.warnings" not in loggers  # a library's warning is for debugging: at info it is not shown
    assert "uvicorn.access" not in loggers  # ours replaces it
    assert not any("secret red circle" in json.dumps(line) for line in lines)  # no prompt at info

    (access,) = access_lines(lines, "json-ok")
    assert (access["level"], access["method"], access["route"], access["status"]) == (
        "INFO",
        "POST",
        "/generate",
        200,
    )
    assert access["client"].startswith("127.0.0.1:") and access["duration_s"] > 0
    assert access["queue_wait_s"] >= 0 and access["images"] == 1 and access["seeds"] == [7]
    assert len(access["batch_ids"]) == 1 and isinstance(access["batch_ids"][0], int)

    (traceback_line,) = [line for line in lines if "traceback" in line]
    assert traceback_line["level"] == "ERROR" and "caught fire" in traceback_line["traceback"]
    assert "json-fail" in json.dumps(traceback_line)  # the batch's line names the requests in it
    assert [line["status"] for line in access_lines(lines, "json-fail")] == [500]


@pytest.mark.usefixtures("restore_logging")
@pytest.mark.parametrize("level", ["info", "debug"])
def test_library_warnings_go_through_the_log_at_debug(level: str, capfd: pytest.CaptureFixture[str]) -> None:
    configure_logging(level, LogFormat.JSON)
    with warnings.catch_warnings():  # out of pytest's own record of warnings, into the log's
        warnings.simplefilter("always")
        logging.captureWarnings(True)
        warnings.warn("a library's note", UserWarning, stacklevel=1)
    logging.getLogger("diffusers.configuration_utils").warning("a config note")
    logging.getLogger("transformers.modeling_utils").error("a library error")
    logging.getLogger("engine.pipeline").warning("our own warning")
    lines = [json_line(line) for line in capfd.readouterr().err.splitlines()]
    seen = {line["logger"]: line["level"] for line in lines}
    assert seen.pop("engine.pipeline") == "WARNING" and seen.pop("transformers.modeling_utils") == "ERROR"
    assert seen == (
        {"py.warnings": "DEBUG", "diffusers.configuration_utils": "DEBUG"} if level == "debug" else {}
    )


def test_the_log_format_is_a_setting_and_a_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    assert (
        serve_settings(build_parser().parse_args(["serve", "--log-format", "JSON"])).log_format
        is LogFormat.JSON
    )
    monkeypatch.setenv("TIUE_LOG_FORMAT", "json")
    assert Settings().log_format is LogFormat.JSON


def test_settings_errors_name_the_setting_and_never_show_a_key() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TIUE_API_KEYS": "k1secret", "TIUE_QUEUE_SIZE": "2"}
    result = subprocess.run(
        [sys.executable, "-m", "service.cli", "serve"], env=env, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2
    assert result.stderr.startswith("tiue serve: invalid settings\n")
    assert "queue_size" in result.stderr
    assert "k1secret" not in result.stdout + result.stderr
    assert "input_value" not in result.stderr


def test_api_keys_never_show_in_settings_dumps(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIUE_API_KEYS", "k1secret,k2secret")
    settings = Settings()
    assert settings.auth_enabled
    for shown in (repr(settings), str(settings.model_dump()), settings.model_dump_json()):
        assert "k1secret" not in shown and "k2secret" not in shown
