"""bench/load_service.py and bench/overload.py, briefly, with their fake engines: the scripts against a
real server on 127.0.0.1, so that a renamed metric, a new label or a new server limit breaks a test
rather than the next measurement. They check the scripts, not the speed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def bench(*args: str) -> None:
    result = subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=180, check=False
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.mark.slow
def test_load_service_bench_reads_batches_and_device_time_from_metrics(tmp_path: Path) -> None:
    out = tmp_path / "load.json"
    bench(
        "bench/load_service.py", "--engine", "fake", "--concurrency", "2", "--max-batch-size", "2",
        "--duration", "1", "--warmup", "0.2", "--repeats", "1", "--json", str(out),
    )  # fmt: skip
    rows = json.loads(out.read_text())["rows"]
    assert {(row["max_batch_size"], row["concurrency"]) for row in rows} == {(2, 2), (1, 2)}
    for row in rows:
        assert row["requests"] > 0 and row["errors"] == 0, row
        assert 1 <= row["mean_batch"] <= row["max_batch_size"], row  # from tiue_batch_size_images
        assert 0.2 < row["device_busy"] <= 1.05, row  # from tiue_stage_duration_seconds


@pytest.mark.slow
def test_overload_bench_reports_every_column_by_both_clocks(tmp_path: Path) -> None:
    out = tmp_path / "overload.md"
    bench(
        "bench/overload.py", "--fake", "--capacity-duration", "2", "--loads", "2", "--duration", "2",
        "--out", str(out),
    )  # fmt: skip
    lines = [line for line in out.read_text().splitlines() if line.startswith("| ")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = {
        cells[0]: dict(zip(header, cells, strict=True))
        for cells in ([cell.strip() for cell in line.strip("|").split("|")] for line in lines[1:])
    }
    assert set(rows) == {"capacity (closed loop)", "open loop 2x", "retry storm"}
    for name, row in rows.items():
        assert row["200"] != "0", (name, row)
        # clients from their own addresses: the per-address connection cap refuses none of them
        assert row["other"] == "0", (name, row)
        assert row["goodput img/s (server clock)"] != "-" and row["% of capacity (server)"] != "-", row
        assert row["device busy"].endswith("ms/img"), row
    assert rows["capacity (closed loop)"]["% of capacity (server)"] == "100 %"
    assert int(rows["retry storm"]["429"]) > 0
