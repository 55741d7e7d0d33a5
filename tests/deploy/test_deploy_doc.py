"""docs/deploy.md's commands stay real: the files they name are in the repository, the scripts they call
accept the flags and settings shown, the Dockerfile has the stages and build arguments passed to it.

A renamed file or flag then fails CI instead of a user's copy-paste. No containers, no network:
nothing runs but the repo scripts' `--help` (see doc_commands.py).
"""

from __future__ import annotations

import re

import pytest
from deploy_checks import ROOT
from doc_commands import Checker, code_blocks, commands

DOC = ROOT / "docs" / "deploy.md"


@pytest.fixture(scope="module")
def checker() -> Checker:
    return Checker(ROOT)


def test_every_command_in_the_deploy_doc_exists(checker: Checker) -> None:
    text = DOC.read_text()
    assert sum(1 for _ in code_blocks(text)) >= 6, "the shell blocks were not found"
    problems = checker.problems(text)
    assert not problems, "\n".join(problems)


def test_the_offline_recipe_and_the_smoke_test_are_documented() -> None:
    words = [
        word for _, block in code_blocks(DOC.read_text()) for command in commands(block) for word in command
    ]
    for needed in ("deploy/download_wheels.sh", "deploy/smoke_podman.sh", "--build-context", "runc"):
        assert needed in words, f"docs/deploy.md has no command with {needed}"


@pytest.mark.parametrize(
    ("shown", "replacement"),
    [
        ("deploy/smoke_podman.sh --runtime runc", "deploy/smoke_podman.sh --engine runc"),  # a flag it lacks
        ("sudo deploy/smoke_podman.sh", "sudo deploy/smoke.sh"),  # a renamed script
        ("deploy/download_wheels.sh", "deploy/fetch_wheels.sh"),
        ("apt-get install -y", "apt-get install"),  # stops to ask
        ("--target cpu", "--target cpu-slim"),  # no such stage
        ("--build-arg PIP_NO_INDEX=1", "--build-arg PIP_OFFLINE=1"),  # no such ARG
        ("-f k8s/prometheus-adapter/values.yaml", "-f k8s/prometheus-adapter/value.yaml"),  # a missing file
        ("--precision fp16", "--precission fp16"),  # the tiue CLI rejects it
        ("--profile gpu", "--profile gpus"),  # no such compose profile
    ],
)
def test_a_broken_copy_fails(checker: Checker, shown: str, replacement: str) -> None:
    text = DOC.read_text()
    pattern = re.escape(shown) + r"(?=\s|$)"
    block = next((block for _, block in code_blocks(text) if re.search(pattern, block)), None)
    assert block is not None, f"no command in the doc shows {shown!r} any more: update this test"
    copy = text.replace(block, re.sub(pattern, replacement, block, count=1), 1)
    assert checker.problems(copy), f"replacing {shown!r} by {replacement!r} went unnoticed"


def test_settings_and_options_of_a_script_are_checked(checker: Checker) -> None:
    def problems(command: str) -> list[str]:
        return checker.problems(f"```bash\n{command}\n```\n")

    assert not problems("sudo SMOKE_RUNTIME=runc deploy/smoke_podman.sh --keep-images")
    assert problems("sudo SMOKE_RUNTIM=runc deploy/smoke_podman.sh")  # a setting it does not read
    assert problems("deploy/smoke_podman.sh --keep-image")
    assert not problems("deploy/download_wheels.sh --python-version 3.11 wheels")
    assert problems("deploy/download_wheels.sh --python 3.11 wheels")
    assert problems("pip download -d wheels -r requirements.txt")  # the file the doc once named


def test_every_command_in_the_models_doc_exists(checker: Checker) -> None:
    """docs/models.md walks a user through `tiue generate`, `serve` and `build-engines`: the flags parse."""
    text = (ROOT / "docs" / "models.md").read_text()
    words = [word for _, block in code_blocks(text) for command in commands(block) for word in command]
    for needed in ("huggingface-cli", "generate", "serve", "build-engines"):
        assert needed in words, f"docs/models.md has no command with {needed}"
    assert not checker.problems(text)
    assert checker.problems(text.replace("--precision fp16", "--precission fp16", 1))
