"""The metrics that dashboards and alert rules divide by: device busy time and the configured limits."""

from __future__ import annotations

from fakes import FakeEngine, serve

GOOD = {"prompt": "a red circle", "seed": 1}


def sample(app: object, name: str, labels: dict[str, str] | None = None) -> float | None:
    value: float | None = app.state.tiue.metrics.registry.get_sample_value(name, labels or {})  # type: ignore[attr-defined]
    return value


async def test_device_busy_seconds_count_every_batch_failed_ones_too() -> None:
    engine = FakeEngine(fail=lambda batch: batch[0].seed == 2)
    engine.compute_s = 0.05
    async with serve(engine) as (client, app):
        assert sample(app, "tiue_device_busy_seconds_total", {"model": "fake-tiue"}) == 0.0
        assert (await client.post("/generate", json=GOOD)).status_code == 200
        one = sample(app, "tiue_device_busy_seconds_total", {"model": "fake-tiue"})
        assert one is not None and 0.05 <= one < 1.0
        assert (await client.post("/generate", json={**GOOD, "seed": 2})).status_code == 500
        two = sample(app, "tiue_device_busy_seconds_total", {"model": "fake-tiue"})
    assert two is not None and two >= one + 0.05


async def test_the_limits_are_exported_from_settings() -> None:
    async with serve(FakeEngine(), queue_size=24, request_timeout_s=45) as (_client, app):
        assert sample(app, "tiue_queue_capacity_images") == 24
        assert sample(app, "tiue_request_timeout_seconds") == 45
