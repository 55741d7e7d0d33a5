"""`tiue generate` writes the image and reports each stage's time; bad input exits 2 with a message."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from service.cli import main


def test_generate_writes_the_image(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "sub" / "img.png"
    argv = ["generate", "a red circle", "--seed", "5", "--size", "96x64", "--model", str(tiny_model_dir)]
    assert main([*argv, "--out", str(out), "--threads", "1"]) == 0
    image = np.asarray(Image.open(out))
    assert image.shape == (64, 96, 3)
    printed = capsys.readouterr().out
    for stage in ("text_encode", "denoise", "vae_decode", "total"):
        assert stage in printed
    assert "seed 5" in printed
    again = tmp_path / "again.png"
    assert main([*argv, "--out", str(again), "--threads", "1"]) == 0
    assert np.array_equal(np.asarray(Image.open(again)), image)  # same seed, same image


def test_generate_refuses_a_bad_size(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        [
            "generate",
            "cat",
            "--size",
            "100x64",
            "--model",
            str(tiny_model_dir),
            "--out",
            str(tmp_path / "x.png"),
        ]
    )
    assert code == 2
    assert "multiple of 16" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_generate_names_a_missing_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "cat", "--model", str(tmp_path / "none"), "--out", str(tmp_path / "x.png")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_generate_reads_the_same_settings_as_serve(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """TIUE_BACKEND reaches `tiue generate` (it used to run torch regardless); the fix it names exists."""
    monkeypatch.setenv("TIUE_BACKEND", "onnxruntime")
    monkeypatch.setenv("TIUE_ENGINE_DIR", str(tmp_path / "engines"))
    argv = [
        "generate",
        "cat",
        "--model",
        str(tiny_model_dir),
        "--out",
        str(tmp_path / "x.png"),
        "--threads",
        "1",
    ]
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert "no usable onnx artefacts" in error and "--build-engines" in error
    assert main([*argv, "--backend", "torch"]) == 0  # a flag overrides the variable


def test_every_command_shows_choices_and_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("serve", "generate", "export", "build-engines"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "--backend {torch,onnxruntime,tensorrt}" in text or command == "export"
        assert "--precision {fp32,fp16,bf16}" in text and "(TIUE_PRECISION; default: fp32)" in text
        assert "BackendName." not in text and "Precision." not in text
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    assert "--api-keys" not in capsys.readouterr().out  # keys only from the environment


def test_a_bad_setting_names_the_command_and_the_field(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TIUE_STEPS", "0")
    assert main(["generate", "cat", "--out", str(tmp_path / "x.png")]) == 2
    assert capsys.readouterr().err.splitlines()[:2] == [
        "tiue generate: invalid settings",
        "  steps: Input should be greater than or equal to 1",
    ]


@pytest.mark.parametrize("seed", [str(2**32), "-1", "1e3", "٣"])
def test_a_seed_out_of_range_is_one_line_and_exit_2(
    seed: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["generate", "cat", "--seed", seed, "--out", str(tmp_path / "x.png")])
    assert exited.value.code == 2
    error = capsys.readouterr().err
    assert "give a whole number from 0 to 4294967295" in error and "Traceback" not in error
    assert not (tmp_path / "x.png").exists()
