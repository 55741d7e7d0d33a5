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
