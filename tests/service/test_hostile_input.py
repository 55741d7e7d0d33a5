"""What a hostile client sends, over real TCP to the deployed server (service.edge.server on 127.0.0.1): any
code point echoed safely, no control character in a log line, and strict HTTP framing with JSON answers."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
from fakes import FakeEngine
from serving import raw_connection, read_until_closed, tiue_server

from service.edge.logs import LogFormat, make_handler

GENERATION_ROUTES = ("/generate", "/v1/images/generations")


def split(answer: bytes) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of one HTTP/1.1 answer read to the connection's end."""
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split(" ")[1]), headers, body


async def exchange(port: int, request: bytes, timeout: float = 5) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes on a fresh connection; the answer, read until the server closes (Connection: close)."""
    reader, writer = await raw_connection(port)
    writer.write(request)
    try:
        return split(await read_until_closed(reader, timeout))
    finally:
        writer.close()


def post(path: str, body: bytes, *extra: str) -> bytes:
    head = [
        f"POST {path} HTTP/1.1",
        "Host: t",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        "Connection: close",
        *extra,
    ]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


@pytest.fixture
def text_log() -> Iterator[io.StringIO]:
    """What the text log (the default format) writes during the test."""
    stream = io.StringIO()
    handler = make_handler(LogFormat.TEXT, stream)
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    handler = make_handler(LogFormat.JSON, stream)
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


@pytest.mark.parametrize("route", GENERATION_ROUTES)
async def test_a_lone_surrogate_in_model_is_a_404_that_quotes_it_escaped(
    engine: FakeEngine, route: str
) -> None:
    body = b'{"prompt": "a red circle", "model": "x\\ud800\\u001b[31m"}'  # JSON escapes: valid JSON text
    async with tiue_server(engine) as served:
        status, headers, answer = await exchange(served.port, post(route, body))
    assert status == 404, answer
    error = json.loads(answer)["error"]
    assert error["code"] == "model_not_found" and error["param"] == "model"
    assert "'x\\ud800\\x1b[31m'" in error["message"]
    assert error["request_id"] == headers["x-request-id"]


async def test_an_unknown_field_named_by_control_characters_is_quoted_escaped(engine: FakeEngine) -> None:
    async with tiue_server(engine) as served:
        status, _headers, answer = await exchange(
            served.port, post("/generate", b'{"prompt": "a", "\\u001b[2J\\n": 1}')
        )
    assert status == 422, answer
    assert json.loads(answer)["error"]["message"] == "\\x1b[2J\\x0a: unknown field"


async def test_path_parameters_reach_the_text_log_escaped(engine: FakeEngine, text_log: io.StringIO) -> None:
    async with tiue_server(engine) as served:
        for target in ("/v1/models/x%1b%5b31mRED%1b%5b0m", "/v1/models/%00", "/v1/models/a%0d%0aforged"):
            status, _headers, _answer = await exchange(
                served.port, f"GET {target} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode()
            )
            assert status == 404
    written = text_log.getvalue()
    assert "GET /v1/models/x\\x1b[31mRED\\x1b[0m 404" in written
    assert "GET /v1/models/\\x00 404" in written
    assert "GET /v1/models/a\\x0d\\x0aforged 404" in written
    assert not any(ch in written.replace("\n", "") for ch in "\x1b\x00\r"), "a raw control character"
    assert all(" tiue.access: " in line or "tiue.access" not in line for line in written.splitlines())


async def test_json_log_lines_stay_valid_json_for_any_input(
    engine: FakeEngine, json_log: io.StringIO
) -> None:
    async with tiue_server(engine) as served:
        await exchange(
            served.port, b"GET /v1/models/%1b%00%0a%e2%80%ae HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
        )
        await exchange(served.port, post("/generate", b'{"prompt": "a", "model": "\\ud800"}'))
    lines = [json.loads(line) for line in json_log.getvalue().splitlines()]  # each line one object
    routes = [line.get("route") for line in lines if line["logger"] == "tiue.access"]
    assert "/v1/models/\x1b\x00\n\u202e" in routes  # JSON carries the value exactly, escaped by JSON itself


def assert_json_error(status: int, headers: dict[str, str], body: bytes, expected: int) -> dict[str, str]:
    assert status == expected, body
    assert headers["content-type"] == "application/json" and headers["connection"] == "close"
    error: dict[str, str] = json.loads(body)["error"]
    assert error["request_id"] == headers["x-request-id"]
    return error


async def test_content_length_with_transfer_encoding_is_a_400(engine: FakeEngine) -> None:
    body = b'{"prompt": "a red circle"}'
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    async with tiue_server(engine) as served:
        answer = await exchange(served.port, post("/generate", chunked, "Transfer-Encoding: chunked"))
    error = assert_json_error(*answer, 400)
    assert "Content-Length or Transfer-Encoding" in error["message"]
    assert not engine.batches


@pytest.mark.parametrize("keys", [("right", "wrong"), ("wrong", "right"), ("right", "right")])
async def test_two_authorization_headers_are_a_400_whichever_comes_first(
    engine: FakeEngine, keys: tuple[str, str]
) -> None:
    auth = [f"Authorization: Bearer {key}" for key in keys]
    async with tiue_server(engine, api_keys="right") as served:
        answer = await exchange(served.port, post("/generate", b'{"prompt": "a red circle"}', *auth))
    error = assert_json_error(*answer, 400)
    assert "Authorization header is given 2 times" in error["message"]
    assert not engine.batches


@pytest.mark.parametrize(
    ("request_bytes", "status", "said"),
    [
        (
            b"GET /livez HTTP/1.1\r\nHost: t\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            400,
            "Content-Length",
        ),
        (
            post("/generate", b"{}", "Transfer-Encoding: gzip").replace(b"Content-Length: 2\r\n", b""),
            501,  # h11's hint: a transfer coding it does not implement
            "chunked",
        ),
        (b"\x16\x03\x01garbage\r\n\r\n", 400, ""),
        (b"GET /livez HTTP/1.1\r\nHost: t\r\nBad Header: 1\r\n\r\n", 400, ""),
    ],
    ids=["conflicting-content-length", "te-gzip", "garbage-request-line", "bad-header-name"],
)
async def test_requests_h11_cannot_parse_get_a_json_400_with_a_request_id(
    engine: FakeEngine, json_log: io.StringIO, request_bytes: bytes, status: int, said: str
) -> None:
    async with tiue_server(engine) as served:
        answer = await exchange(served.port, request_bytes)
    error = assert_json_error(*answer, status)
    assert error["message"].startswith("the request is not valid HTTP/1.1") and said in error["message"]
    assert error["code"] == "invalid"
    lines = [json.loads(line) for line in json_log.getvalue().splitlines()]
    access = [line for line in lines if line["logger"] == "tiue.access"]
    assert [(line["status"], line["request_id"]) for line in access] == [(status, error["request_id"])]


async def chunks(chunk: bytes, count: int) -> AsyncIterator[bytes]:
    for _ in range(count):
        yield chunk


async def test_an_oversized_body_gets_a_readable_413_before_the_connection_closes(engine: FakeEngine) -> None:
    big = b'{"prompt": "' + b"x" * 10_000_000 + b'"}'
    async with tiue_server(engine) as served:
        reader, writer = await raw_connection(served.port)
        writer.write(post("/generate", big))
        await writer.drain()  # every byte of it sent: nothing reset the connection meanwhile
        answer = split(await read_until_closed(reader, timeout=10))
        writer.close()
        async with httpx.AsyncClient(base_url=served.url, timeout=10) as client:
            streamed = await client.post(
                "/generate",
                content=chunks(b"x" * 65536, 160),  # chunked: found too large while read
                headers={"Content-Type": "application/json"},
            )
    error = assert_json_error(*answer, 413)
    assert error["message"] == "the request body is larger than 65536 bytes" and error["param"] == "body"
    assert streamed.status_code == 413 and streamed.json()["error"]["param"] == "body"
