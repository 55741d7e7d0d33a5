"""Optional API keys: `Authorization: Bearer <key>`, compared in constant time."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

from fastapi.security import HTTPBearer

from service.errors import Unauthorized


def _digest(key: str) -> bytes:
    # Equal-length digests, so the comparison's time says nothing about a key's length either.
    return hashlib.sha256(key.encode("utf-8")).digest()


class ApiKeys:
    """The keys this server accepts; none means auth is off."""

    def __init__(self, keys: Iterable[str]):
        self._digests = [_digest(key) for key in keys if key]

    def identify(self, authorization: str | None) -> str | None:
        """None when auth is off; else the caller's key as "key:<digest prefix>" (safe to log), or
        Unauthorized unless the header carries one of the keys (every key is compared)."""
        if not self._digests:
            return None
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
        return f"key:{given.hex()[:12]}"


# For the OpenAPI schema only: service.edge.caller.ClientMiddleware checks the key before the body is read.
bearer_scheme = HTTPBearer(auto_error=False, description="one of TIUE_API_KEYS, when the server sets any")
