"""`GET /docs`: Swagger UI over `/openapi.json`, from assets packaged with the service (TIUE_DOCS=false: off).

Swagger UI's script and stylesheet come from the `fastapi-offline` package, the page and its start-up
script from service/static; nothing is fetched from another origin, and the policy forbids it.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

from fastapi import APIRouter
from fastapi.responses import Response

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'"
)
_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
_SWAGGER_PACKAGE = "fastapi_offline"  # ships swagger-ui-bundle.js and swagger-ui.css under static/

router = APIRouter(tags=["docs"], include_in_schema=False)


@cache
def _asset(package: str, name: str) -> bytes:
    return (resources.files(package) / "static" / name).read_bytes()


def _answer(package: str, name: str, media_type: str) -> Response:
    return Response(_asset(package, name), media_type=media_type, headers=_HEADERS)


@router.get("/docs")
async def page() -> Response:
    return _answer("service", "docs.html", "text/html; charset=utf-8")


@router.get("/static/docs.js")
async def start() -> Response:
    return _answer("service", "docs.js", "text/javascript; charset=utf-8")


@router.get("/static/swagger-ui-bundle.js")
async def bundle() -> Response:
    return _answer(_SWAGGER_PACKAGE, "swagger-ui-bundle.js", "text/javascript; charset=utf-8")


@router.get("/static/swagger-ui.css")
async def stylesheet() -> Response:
    return _answer(_SWAGGER_PACKAGE, "swagger-ui.css", "text/css; charset=utf-8")
