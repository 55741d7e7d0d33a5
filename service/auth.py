"""Optional API keys: `Authorization: Bearer <key>`, compared in constant time."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

from starlette.requests import Request

from service.errors import Unauthorized


def _digest(key: str) -> bytes:
    # Equal-length digests, so the comparison's time says nothing about a key's length either.
    return hashlib.sha256(key.encode("utf-8")).digest()


class ApiKeys:
    """The keys this server accepts; none means auth is off."""

    def __init__(self, keys: Iterable[str]):
        self._digests = [_digest(key) for key in keys if key]

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def check(self, authorization: str | None) -> None:
        """Raise Unauthorized unless the header carries one of the keys (every key is compared)."""
        if not self._digests:
            return
        if not authorization:
            raise Unauthorized("an API key is required: send 'Authorization: Bearer <key>'")
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Unauthorized("the Authorization header must be 'Bearer <key>'")
        given = _digest(token)
        matched = False
        for digest in self._digests:
            matched |= hmac.compare_digest(given, digest)
        if not matched:
            raise Unauthorized("the API key is not valid")


async def require_api_key(request: Request) -> None:
    """FastAPI dependency for the generation routes."""
    request.app.state.tiue.api_keys.check(request.headers.get("authorization"))
