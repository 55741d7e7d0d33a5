"""Who is calling, and since when: the API key check (before the body is read), the client's identity
for the fair queue and the rate limiter, the arrival time every deadline counts from, and the refusals
that can be told from those alone."""

from __future__ import annotations

import time
from collections.abc import Callable, Container
from dataclasses import dataclass

from starlette.types import ASGIApp, Receive, Scope, Send

from service.edge.auth import ApiKeys
from service.errors import ServiceError, error_response
from service.metrics import ServiceMetrics


@dataclass(frozen=True)
class Caller:
    client: str  # "key:<digest prefix>" when API keys are on, else "addr:<host>"; never a key itself
    arrived: float  # monotonic

    @classmethod
    def of(cls, scope: Scope) -> Caller:
        caller = scope.get("state", {}).get("caller")
        return caller if isinstance(caller, Caller) else cls("", time.monotonic())


class ClientMiddleware:
    """For the generation and model routes: stamp the arrival, refuse a missing or wrong API key with 401 before
    anything reads the body, and name the client."""

    def __init__(self, app: ASGIApp, api_keys: ApiKeys, metrics: ServiceMetrics, paths: Container[str]):
        self.app = app
        self.api_keys = api_keys
        self.metrics = metrics
        self.paths = paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in self.paths:
            await self.app(scope, receive, send)
            return
        arrived = time.monotonic()
        authorization = next((v for k, v in scope["headers"] if k == b"authorization"), None)
        try:
            key = self.api_keys.identify(authorization.decode("latin-1") if authorization else None)
        except ServiceError as exc:
            await error_response(exc, self.metrics)(scope, receive, send)
            return
        if key is None:
            host = scope.get("client") or ("unknown", 0)
            key = f"addr:{host[0]}"
        scope.setdefault("state", {})["caller"] = Caller(key, arrived)
        await self.app(scope, receive, send)


class EarlyRefusalMiddleware:
    """For the generation routes, once the caller is known and before the body is read, parsed or its
    prompt tokenized: the refusal (503 not ready, 429 rate limit, queue full, over its share, too late)
    that any request from this caller would get now. Under overload most requests end here, cheaply."""

    def __init__(
        self, app: ASGIApp, check: Callable[[Caller], None], metrics: ServiceMetrics, paths: Container[str]
    ):
        self.app = app
        self.check = check
        self.metrics = metrics
        self.paths = paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] in self.paths:
            try:
                self.check(Caller.of(scope))
            except ServiceError as exc:
                await error_response(exc, self.metrics)(scope, receive, send)
                return
        await self.app(scope, receive, send)
