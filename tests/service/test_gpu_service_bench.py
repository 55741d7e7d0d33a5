"""bench/gpu_service.py --smoke: the GPU bench's own code, end to end on the CPU with the tiny test-size
model (a real `tiue serve` on 127.0.0.1, the engine in a child process, diffusers' pipeline), within the
two minutes its budget promises. It checks the script, not the speed."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_service_bench_smoke_runs_every_section(tmp_path: Path) -> None:
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "bench/gpu_service.py", "--smoke", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    data = json.loads((tmp_path / "gpu_service.json").read_text())
    notes = " ".join(data["notes"])
    assert elapsed < 150, f"the smoke run took {elapsed:.0f}s; its budget is 110s plus the last section"

    serve = [s for s in data["starts"] if s["what"] == "tiue serve"]
    assert serve and serve[0]["ready_s"] > 0, notes
    service = {r["concurrency"]: r for r in data["service"]}
    assert service[1]["requests"] > 0 and set(service[1]["statuses"]) == {"200"}, service
    assert service[1]["p50_ms"] > 0 and service[1]["engine_p50_ms"] > 0
    for row in data["service"]:  # the server answers every request at every concurrency it was offered
        assert set(row["statuses"]) <= {"200"}, row

    if data["direct"]:
        assert [r["batch"] for r in data["direct"]] == [1, 2, 4]
        assert all(r["images_s"] > 0 for r in data["direct"])
        assert {(r["image"], r["format"]) for r in data["encode"]} >= {
            ("smooth gradient", f) for f in ("png", "jpeg", "webp")
        }
        assert data["summary"]["added_c1_ms"] is not None
    else:
        assert "direct: skipped" in notes or "direct: cut" in notes, notes
    assert data["peer"] or "peer:" in notes, notes
    artefact_starts = [s for s in data["starts"] if s["artefacts"].startswith("built")]
    assert artefact_starts or "build-engines" in notes or "built artefacts" in notes, notes

    markdown = (tmp_path / "gpu_service.md").read_text()
    assert "| concurrency | images/s |" in markdown and "### Against the targets" in markdown
