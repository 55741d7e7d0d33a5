"""The served OpenAPI schema against the server: schemathesis over TCP, plus the hand-made nasty bodies.

Schemathesis reads `/openapi.json` from a real uvicorn on 127.0.0.1 (fake engine, small limits so every
request is cheap) and checks every answer: no 5xx, the status, content type, headers and body all as
documented, and bodies the schema calls invalid refused.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import uvicorn
from fakes import FakeEngine, make_settings, serve

from service.app import create_app

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is in the dev extra")
from hypothesis import HealthCheck, settings  # noqa: E402  (after the skip: hypothesis comes with it)
from schemathesis.checks import positive_data_acceptance  # noqa: E402

# Small limits: the generator stays within cheap requests, and the limits themselves get exercised.
LIMITS: dict[str, Any] = {
    "max_n": 2,
    "min_size": 16,
    "max_size": 64,
    "max_prompt_chars": 64,
    "max_body_bytes": 4096,
    "queue_size": 64,
    "request_timeout_s": 10,
}
GOOD = {"prompt": "a red circle", "seed": 7}
KEY = "secret-1"


class ThreadedServer:
    """uvicorn on 127.0.0.1 in a thread of its own, for synchronous clients (schemathesis uses requests)."""

    def __init__(self, engine: FakeEngine, **settings: Any):
        self.app = create_app(make_settings(**settings), pipeline_factory=lambda: engine)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_config=None, lifespan="on"))
        self.thread = threading.Thread(
            target=lambda: asyncio.run(self.server.serve(sockets=[self.sock])), daemon=True
        )

    def __enter__(self) -> ThreadedServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.05)  # another thread's event loop: nothing to await here
        raise TimeoutError("the server did not become ready")

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


@pytest.fixture(scope="module")
def served() -> Iterator[ThreadedServer]:
    with ThreadedServer(FakeEngine(), **LIMITS) as server:
        yield server


@pytest.fixture(scope="module")
def served_with_keys() -> Iterator[ThreadedServer]:
    with ThreadedServer(FakeEngine(), **LIMITS, api_keys=KEY) as server:
        yield server


def test_the_served_schema_states_the_limits_and_statuses(served: ThreadedServer) -> None:
    schema = httpx.get(f"{served.url}/openapi.json").json()
    bodies = schema["components"]["schemas"]
    generate = bodies["GenerateRequest"]["properties"]
    assert generate["n"]["maximum"] == LIMITS["max_n"]
    assert generate["prompt"]["maxLength"] == LIMITS["max_prompt_chars"]
    width = next(branch for branch in generate["width"]["anyOf"] if branch.get("type") == "integer")
    assert (width["minimum"], width["maximum"]) == (LIMITS["min_size"], LIMITS["max_size"])
    openai_n = bodies["OpenAIImageRequest"]["properties"]["n"]["anyOf"][0]
    assert openai_n["maximum"] == LIMITS["max_n"]

    paths = schema["paths"]
    assert list(paths["/metrics"]["get"]["responses"]["200"]["content"]) == [
        "text/plain; version=0.0.4; charset=utf-8"
    ]
    assert httpx.get(f"{served.url}/metrics").headers["content-type"].startswith("text/plain; version=0.0.4")
    assert {"200", "503"} <= set(paths["/readyz"]["get"]["responses"])
    for path in ("/generate", "/v1/images/generations"):
        responses = paths[path]["post"]["responses"]
        assert {"200", "400", "408", "413", "415", "422", "429", "500", "503", "504"} <= set(responses)
        assert "401" not in responses and "security" not in paths[path]["post"]  # no keys: no auth
        assert responses["429"]["headers"]["Retry-After"]["required"] is True
        assert "HTTPValidationError" not in str(responses)
    for operations in paths.values():
        for operation in operations.values():
            for response in operation["responses"].values():
                assert "X-Request-ID" in response["headers"]


def test_with_api_keys_the_schema_asks_for_one() -> None:
    schema = create_app(make_settings(api_keys=KEY), pipeline_factory=FakeEngine).openapi()
    for path in ("/generate", "/v1/images/generations"):
        operation = schema["paths"][path]["post"]
        assert operation["security"] == [{"HTTPBearer": []}]
        assert operation["responses"]["401"]["headers"]["WWW-Authenticate"]
    assert "security" not in schema["paths"]["/readyz"]["get"]


# Built at import from an app with the same settings (schemathesis parametrizes at collection, before any
# server runs; its fixture-based loader breaks on pytest 9.2); the test checks the served one is the same.
SCHEMA = create_app(make_settings(**LIMITS), pipeline_factory=FakeEngine).openapi()
schema = schemathesis.openapi.from_dict(SCHEMA)


def test_the_fuzzed_schema_is_the_served_one(served: ThreadedServer) -> None:
    assert httpx.get(f"{served.url}/openapi.json").json() == SCHEMA


@pytest.mark.slow
@schema.parametrize()
@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,  # the same examples every run: CI fails on the code, not on the draw
    database=None,  # nothing written into the checkout
)
def test_every_answer_matches_the_schema(case: Any, served: ThreadedServer) -> None:
    # Not positive_data_acceptance: some rules are the model's or span fields (sides a multiple of 16,
    # width with height), so a schema-valid body may still get its 422, which is documented.
    response = case.call_and_validate(base_url=served.url, excluded_checks=[positive_data_acceptance])
    assert response.headers.get("x-request-id"), "every answer the app makes carries its request ID"


SCHEMA_WITH_KEYS = create_app(make_settings(**LIMITS, api_keys=KEY), pipeline_factory=FakeEngine).openapi()
schema_with_keys = schemathesis.openapi.from_dict(SCHEMA_WITH_KEYS).include(method="POST")


@pytest.mark.slow
@schema_with_keys.parametrize()
@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
    database=None,
)
def test_with_api_keys_every_answer_matches_the_schema(case: Any, served_with_keys: ThreadedServer) -> None:
    """With the key; schemathesis also sends each case without it and with a wrong one (401 expected)."""
    case.call_and_validate(
        base_url=served_with_keys.url,
        headers={"Authorization": f"Bearer {KEY}"},
        excluded_checks=[positive_data_acceptance],
    )


# -- the hand-made nasty bodies -------------------------------------------------------------------

ROUTES = ("/generate", "/v1/images/generations")
JSON = {"content-type": "application/json"}


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize(
    ("content", "status"),
    [
        pytest.param(b'{"prompt": "a \\ud800 circle"}', 422, id="lone-surrogate"),
        pytest.param(b'{"prompt": "a \xff\xfe circle"}', 400, id="invalid-utf8"),
        pytest.param(b'"a red circle"', 422, id="json-string"),
        pytest.param(b"[1, 2]", 422, id="json-array"),
        pytest.param(b"null", 422, id="json-null"),
    ],
)
async def test_nasty_bodies_are_4xx_with_a_code_and_leave_the_service_healthy(
    route: str, content: bytes, status: int
) -> None:
    async with serve(FakeEngine()) as (client, _app):
        response = await client.post(route, content=content, headers=JSON)
        assert response.status_code == status, response.text
        assert response.json()["error"]["code"] is not None, response.text
        assert (await client.post(route, json=GOOD)).status_code == 200


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize(
    "content", [b"{not json", b"\xff\xfe", b"[1, 2]"], ids=["bad-json", "bytes", "array"]
)
async def test_without_a_key_a_bad_body_is_401_not_400(route: str, content: bytes) -> None:
    """Auth comes before the body is parsed: a caller without a key learns nothing about the body."""
    async with serve(FakeEngine(), api_keys=KEY) as (client, _app):
        response = await client.post(route, content=content, headers=JSON)
        assert response.status_code == 401, response.text
        assert response.json()["error"]["code"] == "unauthorized"
        good = await client.post(route, json=GOOD, headers={"Authorization": f"Bearer {KEY}"})
        assert good.status_code == 200
