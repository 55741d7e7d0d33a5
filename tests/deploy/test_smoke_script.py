"""deploy/smoke_podman.sh: shellcheck finds nothing, and its --help documents it without running it.

The smoke itself needs podman and several minutes; it is run by hand (docs/deploy.md gives its output).
"""

from __future__ import annotations

import os
from pathlib import Path

from deploy_checks import ROOT, run, tool

SCRIPT = ROOT / "deploy" / "smoke_podman.sh"


def shellcheck(path: Path) -> tuple[int, str]:
    result = run([tool("shellcheck"), "--severity=style", "--shell=bash", str(path)])
    return result.returncode, result.stdout + result.stderr


def test_shellcheck_is_clean() -> None:
    code, output = shellcheck(SCRIPT)
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
    for word in ("Usage:", "SMOKE_BASE_IMAGE", "debootstrap", "--keep"):
        assert word in result.stdout
    assert run(["bash", str(SCRIPT), "--bogus"], timeout=10).returncode == 2
