"""`size` over HTTP is read strictly: ASCII digits without leading zeros around a lowercase x."""

from __future__ import annotations

import pytest
from fakes import FakeEngine, serve

REFUSED = [
    " 64x64",
    "64x64 ",
    "64x64\n",
    "64 x 64",
    "64X64",
    "64×64",
    "0064x0064",
    "６４x６４",  # fullwidth digits
    "٦٤x٦٤",  # Arabic-Indic digits
    "64x64x64",
    "",
]


@pytest.mark.parametrize("route", ["/generate", "/v1/images/generations"])
async def test_only_plain_width_x_height_is_a_size(route: str) -> None:
    engine = FakeEngine()
    async with serve(engine) as (client, _app):
        ok = await client.post(route, json={"prompt": "x", "size": "96x64", "seed": 1})
        assert ok.status_code == 200 and ok.json()["size"] == "96x64"
        for size in REFUSED:
            r = await client.post(route, json={"prompt": "x", "size": size})
            assert r.status_code == 422, size
            error = r.json()["error"]
            assert error["param"] == "size", size
            assert "is not WIDTHxHEIGHT in pixels: it must look like 512x768" in error["message"]
            assert "digits 0-9 (no leading zeros) and a lowercase x" in error["message"]
    assert len(engine.batches) == 1  # nothing refused reached the device
