"""Which models a server loads: TIUE_MODELS, TIUE_DEFAULT_MODEL, `tiue serve --model NAME=DIR` (bad values:
test_settings_cli.test_inconsistent_settings_fail_at_startup)."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.config import EngineConfig
from service.cli import build_parser, main, serve_settings
from service.settings import Settings


def test_models_are_read_in_order_and_an_empty_folder_is_the_embedded_model(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(
        "TIUE_MODELS", "sd21=/models/loopfree-sd2.1-base, sd15=/models/loopfree-sd1.5,default="
    )
    settings = Settings()
    assert settings.model_dirs() == [
        ("sd21", Path("/models/loopfree-sd2.1-base")),
        ("sd15", Path("/models/loopfree-sd1.5")),
        ("default", None),
    ]
    assert settings.default_model is None  # the first: sd21


def test_one_model_dir_is_one_model_named_by_itself(tmp_path: Path) -> None:
    assert Settings(model_dir=tmp_path).model_dirs() == [(None, tmp_path)]
    assert Settings().model_dirs() == [(None, None)]


def test_serve_takes_model_name_dir_repeated() -> None:
    args = build_parser().parse_args(
        ["serve", "--model", "sd15=/m/a", "--model", "default=", "--default-model", "default"]
    )
    settings = serve_settings(args)
    assert settings.models == {"sd15": Path("/m/a"), "default": None} and settings.default_model == "default"
    one = serve_settings(build_parser().parse_args(["serve", "--model", "/m/a"]))
    assert one.model_dir == Path("/m/a") and one.models == {}


def test_serve_refuses_one_dir_mixed_with_named_models(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["serve", "--model", "a=/x", "--model", "/y"])
    assert exited.value.code == 2 and "NAME=DIR" in capsys.readouterr().err


def test_build_engines_builds_every_configured_model(monkeypatch: pytest.MonkeyPatch) -> None:
    import engine.export.cli

    built: list[Path | None] = []

    def build(config: EngineConfig, batch: object, sizes: object) -> int:
        built.append(config.model_dir)
        return 1 if config.model_dir == Path("/m/broken") else 0

    monkeypatch.setattr(engine.export.cli, "build_engines", build)
    monkeypatch.setenv("TIUE_MODELS", "sd21=/m/b,sd15=/m/a")
    assert main(["build-engines", "--backend", "onnxruntime"]) == 0
    assert built == [Path("/m/b"), Path("/m/a")]
    monkeypatch.setenv("TIUE_MODELS", "sd21=/m/broken,sd15=/m/a")
    assert main(["build-engines", "--backend", "onnxruntime"]) == 1  # the Job fails if any build does
    built.clear()
    assert main(["build-engines", "--backend", "onnxruntime", "--model", "/m/one"]) == 0  # the flag wins
    assert built == [Path("/m/one")]
