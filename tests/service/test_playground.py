"""The playground's routes over ASGI: served with a strict policy, and gone when switched off.
What the page does in a browser: test_playground_browser.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from fakes import FakeEngine, serve
from test_playground_browser import APT

from service.routes.playground import CONTENT_SECURITY_POLICY

ASSETS = {
    "/": "text/html",
    "/static/playground.css": "text/css",
    "/static/playground.js": "text/javascript",
}


@pytest.mark.parametrize(("path", "media_type"), ASSETS.items())
async def test_the_page_and_its_assets_are_served_under_a_strict_policy(
    engine: FakeEngine, path: str, media_type: str
) -> None:
    async with serve(engine) as (client, _):
        response = await client.get(path)
    assert response.status_code == 200
    assert response.headers["content-type"].split(";")[0] == media_type
    assert response.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    assert response.headers["x-content-type-options"] == "nosniff"
    assert "x-request-id" in response.headers
    assert response.content


def test_the_policy_allows_only_the_pages_own_files() -> None:
    directives = dict(d.strip().split(" ", 1) for d in CONTENT_SECURITY_POLICY.split(";"))
    assert directives["default-src"] == "'none'"
    assert directives["script-src"] == directives["style-src"] == "'self'"  # no inline script or style
    assert directives["connect-src"] == "'self'"
    assert directives["frame-ancestors"] == "'none'"


async def test_the_page_loads_only_packaged_files(engine: FakeEngine) -> None:
    async with serve(engine) as (client, _):
        html = (await client.get("/")).text
    assert 'href="/static/playground.css"' in html and 'src="/static/playground.js"' in html
    assert "<style" not in html and " style=" not in html and "http" not in html  # nothing inline, no CDN


async def test_switched_off_the_playground_is_404(engine: FakeEngine) -> None:
    async with serve(engine, playground=False) as (client, _):
        answers = [await client.get(path) for path in ASSETS]
        assert (await client.get("/livez")).status_code == 200
    for answer in answers:
        assert answer.status_code == 404
        assert answer.json()["error"]["code"] == "not_found"


def test_the_readme_test_command_is_what_ci_runs_and_installs_the_browser() -> None:
    root = Path(__file__).resolve().parents[2]
    ci = (root / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci in (root / "README.md").read_text().splitlines()
    assert ci.startswith(f"{APT} "), ci  # more packages may follow the browser's


def test_the_setting_reads_tiue_playground(monkeypatch: pytest.MonkeyPatch) -> None:
    from service.settings import Settings

    monkeypatch.setenv("TIUE_PLAYGROUND", "false")
    assert Settings().playground is False
