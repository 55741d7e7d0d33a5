"""A user's mistake on the command line ends in one line on stderr and exit 2, never a traceback, and
before any work: the real `tiue` run as a subprocess, as a person would run it."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
MISSING_MODEL = "/does/not/exist"  # named by commands whose --out check must fail first


def tiue(*args: str, timeout: float = 120, **env: str) -> tuple[subprocess.CompletedProcess[str], float]:
    environ = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "TIUE_THREADS": "1",
        **{f"TIUE_{name.upper()}": value for name, value in env.items()},
    }
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "service.cli", *args],
        env=environ,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return result, time.perf_counter() - started


def one_line_refusal(result: subprocess.CompletedProcess[str], command: str) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"tiue {command}: "), lines[0]
    return lines[0]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def test_version_prints_the_package_version() -> None:
    result, _ = tiue("--version")
    version = re.search(r'^version = "(.+)"$', (ROOT / "pyproject.toml").read_text(), re.M)
    assert version is not None
    assert (result.returncode, result.stdout.strip()) == (0, f"tiue {version.group(1)}")


@pytest.mark.parametrize(
    ("out", "needle"),
    [
        ("x.txt", ".txt is not an image format"),
        ("noextension", "has no file extension"),
        (".", "is a folder"),
        ("afile/x.png", "is a file, not a folder"),
    ],
)
def test_a_bad_out_is_refused_before_the_model_is_loaded(tmp_path: Path, out: str, needle: str) -> None:
    (tmp_path / "afile").write_text("not a folder")
    # The model folder does not exist either: had the model been loaded first, the error would say so.
    result, seconds = tiue("generate", "a red circle", "--out", str(tmp_path / out), "--model", MISSING_MODEL)
    line = one_line_refusal(result, "generate")
    assert needle in line and MISSING_MODEL not in line, line
    assert seconds < 20, seconds  # argument checks only: well under a torch import on a busy machine
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]  # nothing written


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere: a read-only folder refuses no one")
def test_an_unwritable_out_folder_is_refused(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    result, _ = tiue("generate", "a red circle", "--out", str(locked / "x.png"), "--model", MISSING_MODEL)
    assert "is not writable" in one_line_refusal(result, "generate")


@pytest.mark.slow  # imports torch
def test_serve_checks_the_model_folder_before_binding_the_port(tmp_path: Path) -> None:
    port = free_port()
    missing, _ = tiue("serve", "--model", MISSING_MODEL, "--port", str(port))
    line = one_line_refusal(missing, "serve")
    assert MISSING_MODEL in line and "does not exist" in line, line
    assert "startup complete" not in missing.stdout + missing.stderr

    not_a_pipeline, _ = tiue("serve", "--model", f"several={tmp_path}", "--port", str(port))
    line = one_line_refusal(not_a_pipeline, "serve")
    assert str(tmp_path) in line and "model_index.json is missing" in line, line


@pytest.mark.slow  # imports torch
@pytest.mark.skipif(torch.cuda.is_available(), reason="this torch has CUDA: nothing to refuse")
@pytest.mark.parametrize("command", ["serve", "generate"])
def test_cuda_without_cuda_is_one_line(command: str, tmp_path: Path) -> None:
    args = ["--out", str(tmp_path / "x.png")] if command == "generate" else ["--port", str(free_port())]
    words = ["a red circle"] if command == "generate" else []
    result, _ = tiue(command, *words, *args, device="cuda")
    line = one_line_refusal(result, command)
    assert "device cuda was asked for" in line and "--device cpu" in line, line
    assert not (tmp_path / "x.png").exists()


@pytest.mark.slow  # loads the default model
def test_a_normal_generate_prints_no_progress_bar_or_library_warning(tmp_path: Path) -> None:
    out = tmp_path / "x.png"
    result, _ = tiue("generate", "a red circle on a blue background", "--seed", "3", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # no tqdm "Loading weights", no diffusers config warning
    assert out.is_file() and f"wrote {out}" in result.stdout


@pytest.mark.slow  # loads a model in fp16
def test_fp16_on_a_cpu_is_one_warning(tiny_model_dir: Path, tmp_path: Path) -> None:
    result, _ = tiue(
        "generate",
        "a red circle",
        "--model",
        str(tiny_model_dir),
        "--out",
        str(tmp_path / "x.png"),
        precision="fp16",
    )
    warnings = [line for line in result.stderr.splitlines() if "fp16" in line]
    assert len(warnings) == 1 and "slower than fp32" in warnings[0], result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow  # loads the default model
def test_unknown_words_and_untrained_sizes_are_warned_on_the_command_line(tmp_path: Path) -> None:
    result, _ = tiue(
        "generate", "a blue star", "--size", "128x128", "--seed", "1", "--out", str(tmp_path / "x.png")
    )
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 2, result.stderr
    assert "does not know the words 'star'" in lines[0] and "trained at 64x64" in lines[1], lines


@pytest.mark.slow  # serves the default model
def test_a_normal_serve_start_prints_log_lines_only() -> None:
    port = free_port()
    environ = {**os.environ, "PYTHONPATH": str(ROOT), "TIUE_THREADS": "1", "TIUE_PORT": str(port)}
    process = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve"], env=environ, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate(timeout=10)
    lines = stderr.splitlines()
    assert any("ready in" in line for line in lines), stderr
    # Every line is a log line at INFO: no tqdm bar ("Loading weights … it/s"), no library warning.
    assert all(re.match(r"^\S+ \S+ INFO ", line) for line in lines), stderr
