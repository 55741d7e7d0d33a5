"""Names the API shows that are defined elsewhere stay in step with their owner."""

from __future__ import annotations

from engine.types import DEVICE_STAGES
from service.metrics import STAGES
from service.schemas import Timings


def test_the_timings_schema_lists_every_stage_the_metrics_report() -> None:
    assert STAGES[: len(DEVICE_STAGES)] == DEVICE_STAGES
    assert list(Timings.model_fields) == ["queue_wait", *STAGES, "total"]
