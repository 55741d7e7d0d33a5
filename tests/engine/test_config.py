"""The CPU thread default follows the container's CPU limit."""

from __future__ import annotations

import os
from pathlib import Path

from engine.config import available_cpus


def usable() -> int:
    return len(os.sched_getaffinity(0))


def test_a_cgroup_v2_limit_caps_the_threads(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("150000 100000\n")  # 1.5 CPUs
    assert available_cpus(tmp_path) == 1


def test_no_limit_means_every_usable_cpu(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert available_cpus(tmp_path) == usable()
    assert available_cpus(tmp_path / "missing") == usable()


def test_a_cgroup_v1_quota_caps_the_threads(tmp_path: Path) -> None:
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("50000\n")  # half a CPU: still one thread
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert available_cpus(tmp_path) == 1
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert available_cpus(tmp_path) == usable()
