"""deploy/smoke_podman.sh and download_wheels.sh: shellcheck finds nothing, --help documents them, and
the smoke script's runtime choice and failure reports work, against a stand-in podman.

The smoke itself needs podman and several minutes; it is run by hand (docs/deploy.md gives its output).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from deploy_checks import ROOT, run, tool

SCRIPT = ROOT / "deploy" / "smoke_podman.sh"
WHEELS_SCRIPT = ROOT / "deploy" / "download_wheels.sh"
GPU_BENCH_SCRIPTS = [ROOT / "bench" / "gpu_check.sh", ROOT / "bench" / "gpu_service.sh"]  # the device calls

# A podman whose default runtime (crun) fails as on a host with cgroups in hybrid mode, whose runc
# works, and that knows no other runtime; the base image "exists", so nothing is built or pulled.
FAKE_PODMAN = r"""#!/usr/bin/env bash
runtime=default
if [[ $1 == --runtime ]]; then runtime=$2; shift 2; fi
case $1 in
  info) if [[ "$*" == *OCIRuntime* ]]; then echo crun; else echo "host: fake"; fi ;;
  version) echo 4.3.1 ;;
  image) exit 0 ;;
  container) exit 1 ;;
  run)
    case $runtime in
      runc) echo 3.11 ;;
      default) echo "Error: OCI runtime error: crun: cgroups in hybrid mode not supported," \
                    "drop all controllers from cgroupv2" >&2; exit 126 ;;
      *) echo "Error: default OCI runtime \"$runtime\" not found: invalid argument" >&2; exit 125 ;;
    esac ;;
esac
exit 0
"""


def shellcheck(path: Path) -> tuple[int, str]:
    result = run([tool("shellcheck"), "--severity=style", "--shell=bash", str(path)])
    return result.returncode, result.stdout + result.stderr


@pytest.mark.parametrize("script", [SCRIPT, WHEELS_SCRIPT, *GPU_BENCH_SCRIPTS], ids=lambda path: path.name)
def test_shellcheck_is_clean(script: Path) -> None:
    code, output = shellcheck(script)
    assert code == 0, output


def test_shellcheck_fails_on_a_broken_copy(tmp_path: Path) -> None:
    broken = tmp_path / "smoke.sh"
    broken.write_text(SCRIPT.read_text() + "\nrm -rf $OUT/*\n")
    code, output = shellcheck(broken)
    assert code != 0 and "SC2086" in output and "SC2115" in output, output


def test_script_is_executable_and_documents_itself() -> None:
    assert os.access(SCRIPT, os.X_OK)
    result = run(["bash", str(SCRIPT), "--help"], timeout=10)
    assert result.returncode == 0, result.stderr
    for word in (
        "Usage:",
        "SMOKE_BASE_IMAGE",
        "debootstrap",
        "--keep",
        "--keep-images",
        "--runtime",
        "SMOKE_RUNTIME",
    ):
        assert word in result.stdout
    assert run(["bash", str(SCRIPT), "--bogus"], timeout=10).returncode == 2
    assert run(["bash", str(SCRIPT), "--runtime"], timeout=10).returncode == 2
    assert os.access(WHEELS_SCRIPT, os.X_OK)
    assert "Usage:" in run(["bash", str(WHEELS_SCRIPT), "--help"], timeout=10).stdout
    assert run(["bash", str(WHEELS_SCRIPT)], timeout=10).returncode == 2, "DIR is required"


def fake_smoke(tmp_path: Path, *arguments: str) -> tuple[int, str, str]:
    """Run the smoke script against FAKE_PODMAN, with pip unable to find anything (fast, offline)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "podman").write_text(FAKE_PODMAN)
    (bin_dir / "podman").chmod(0o755)
    # The test's Python (has pip and prometheus_client, like the host's the docs install); a wrapper, not a
    # symlink, so that a virtualenv's Python keeps its packages.
    (bin_dir / "python3").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (bin_dir / "python3").chmod(0o755)
    (tmp_path / "no-wheels").mkdir()
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "SMOKE_WORK_DIR": str(tmp_path / "work"),
        "SMOKE_TORCH_INDEX_URL": "",
        "PIP_CONFIG_FILE": os.devnull,
        "PIP_NO_INDEX": "1",
        "PIP_FIND_LINKS": str(tmp_path / "no-wheels"),
    }
    result = subprocess.run(
        ["bash", str(SCRIPT), *arguments], capture_output=True, text=True, timeout=60, env=env, check=False
    )
    return result.returncode, result.stdout, result.stderr


def test_falls_back_to_runc_on_crun_cgroup_error_and_fails_loudly(tmp_path: Path) -> None:
    code, out, err = fake_smoke(tmp_path)
    assert "crun cannot run containers on this host: cgroups in hybrid mode" in out, out
    assert "ok   runtime runc (instead of podman's default, crun" in out, out
    assert "ok   python 3.11 in the base image" in out
    # the next step fails (no wheels anywhere): a FAIL line naming it, the log's tail, the way round
    assert code == 1, (out, err)
    assert "FAIL: wheels: deploy/download_wheels.sh failed" in err, err
    assert "No matching distribution found for torch==" in err and "download.pytorch.org/whl/cpu" in err, err


def test_a_runtime_that_cannot_run_fails_with_its_error(tmp_path: Path) -> None:
    code, out, err = fake_smoke(tmp_path, "--runtime", "bogus")
    assert code == 1, (out, err)
    assert "FAIL: runtime: runtime 'bogus' (asked for) cannot run a container here" in err, err
    assert 'default OCI runtime "bogus" not found' in err, "the log's last lines are shown"
