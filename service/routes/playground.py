"""`GET /`: the browser playground, one page of HTML, CSS and script packaged with the service.

The page only calls the public API (`/v1/models`, `/generate`) from the same origin, so its policy
can forbid everything else: no inline script or style, nothing from another origin, no framing."""

from __future__ import annotations

from functools import cache
from importlib import resources

from fastapi import APIRouter
from fastapi.responses import Response

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'"
)
_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # revalidate, so a new release's page and script arrive together
}

router = APIRouter(tags=["playground"], include_in_schema=False)


@cache
def _asset(name: str) -> bytes:
    return (resources.files("service") / "static" / name).read_bytes()


def _answer(name: str, media_type: str) -> Response:
    return Response(_asset(name), media_type=media_type, headers=_HEADERS)


@router.get("/")
async def page() -> Response:
    return _answer("playground.html", "text/html; charset=utf-8")


@router.get("/static/playground.css")
async def stylesheet() -> Response:
    return _answer("playground.css", "text/css; charset=utf-8")


@router.get("/static/playground.js")
async def script() -> Response:
    return _answer("playground.js", "text/javascript; charset=utf-8")


@router.get("/favicon.ico")
async def favicon() -> Response:
    """Browsers ask for it on every page of the origin; an answer, not a 404 in the log."""
    return Response(
        _asset("favicon.ico"),
        media_type="image/vnd.microsoft.icon",
        headers={"Cache-Control": "max-age=86400"},
    )
