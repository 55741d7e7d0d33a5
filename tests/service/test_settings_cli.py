"""Settings from the environment, and the `tiue` command line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from engine.types import BackendName, Precision, TorchCompile
from service.cli import build_parser, main, serve_settings
from service.settings import PromptPolicy, Settings


def test_defaults_serve_the_embedded_model_locally() -> None:
    settings = Settings()
    assert settings.model_dir is None and settings.backend is BackendName.TORCH and settings.device == "cpu"
    assert (settings.host, settings.port) == ("127.0.0.1", 8000)
    assert (settings.max_batch_size, settings.max_wait_ms, settings.queue_size) == (4, 10, 64)
    assert (settings.request_timeout_s, settings.shutdown_grace_s, settings.max_n) == (120, 30, 8)
    assert not settings.auth_enabled and settings.prompt_policy is PromptPolicy.TRUNCATE


def test_environment_is_read_with_the_tiue_prefix(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    env = {
        "TIUE_MODEL_DIR": str(tmp_path),
        "TIUE_BACKEND": "ONNXRuntime",
        "TIUE_PRECISION": "fp16",
        "TIUE_DEVICE": "cuda:1",
        "TIUE_MAX_BATCH_SIZE": "8",
        "TIUE_MAX_WAIT_MS": "2.5",
        "TIUE_API_KEYS": " key-a, key-b,,",
        "TIUE_BUILD_ENGINES": "true",
        "TIUE_PROMPT_POLICY": "reject",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = Settings()
    assert settings.model_dir == tmp_path and settings.backend is BackendName.ONNXRUNTIME
    assert settings.max_wait_s == 0.0025 and settings.prompt_policy is PromptPolicy.REJECT
    assert [key.get_secret_value() for key in settings.api_keys] == ["key-a", "key-b"]
    assert "key-a" not in repr(settings)  # keys never reach a log line through repr
    config = settings.engine
    assert (config.model_dir, config.precision, config.device) == (tmp_path, Precision.FP16, "cuda:1")
    assert (config.max_batch_size, config.build_engines) == (8, True)


def test_empty_model_dir_means_the_embedded_model(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIUE_MODEL_DIR", "")
    assert Settings().model_dir is None


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"TIUE_QUEUE_SIZE": "4"}, "could never be admitted"),
        ({"TIUE_MIN_SIZE": "512", "TIUE_MAX_SIZE": "256"}, "larger than max_size"),
        ({"TIUE_MAX_BATCH_SIZE": "0"}, "max_batch_size"),
        ({"TIUE_BACKEND": "trt"}, "backend"),
        ({"TIUE_PRECISION": "int8"}, "precision"),
        ({"TIUE_MODELS": "sd15"}, "is not NAME=DIR"),
        ({"TIUE_MODELS": "a=/x,a=/y"}, "given twice"),
        ({"TIUE_MODELS": "a b=/x"}, "is not 1-64 letters"),
        ({"TIUE_MODELS": "a=/x", "TIUE_MODEL_DIR": "/y"}, "not both"),
        ({"TIUE_MODELS": "a=/x", "TIUE_DEFAULT_MODEL": "b"}, "is not one of the models: a"),
    ],
)
def test_inconsistent_settings_fail_at_startup(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], needle: str
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError, match=needle):
        Settings()


def test_flags_override_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TIUE_PORT", "9000")
    monkeypatch.setenv("TIUE_MAX_BATCH_SIZE", "2")
    args = build_parser().parse_args(
        ["serve", "--port", "8123", "--model", str(tmp_path), "--torch-compile", "default"]
    )
    settings = serve_settings(args)
    assert (settings.port, settings.model_dir, settings.torch_compile) == (
        8123,
        tmp_path,
        TorchCompile.DEFAULT,
    )
    assert settings.max_batch_size == 2  # not given as a flag: the environment's value stands


def test_serve_refuses_bad_settings_with_a_message(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--queue-size", "2"]) == 2
    assert "could never be admitted" in capsys.readouterr().err


def test_help_imports_neither_torch_nor_fastapi() -> None:
    code = (
        "import sys, contextlib, io\n"
        "from service.cli import main\n"
        "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
        "    main(['--help'])\n"
        "print(sorted(m for m in ('torch', 'fastapi', 'uvicorn', 'diffusers', 'transformers') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]"
