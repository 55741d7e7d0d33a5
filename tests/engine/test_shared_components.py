"""Byte-identical component folders load once per process (several models on one server)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from engine.loading import load_components
from tests.support.tiny_model import build_tiny_pipeline


def test_a_copied_vae_is_the_same_module_and_other_parts_are_not(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    other = build_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd21-copied-vae"), "sd21", seed=3)
    shutil.rmtree(other / "vae")
    shutil.copytree(tiny_model_dir / "vae", other / "vae")
    first = load_components(tiny_model_dir, torch.float32, "cpu", 4)
    second = load_components(other, torch.float32, "cpu", 4)
    assert second.vae is first.vae
    assert second.text_encoder is not first.text_encoder and second.unet is not first.unet
    # another dtype is another module
    half = load_components(other, torch.bfloat16, "cpu", 4)
    assert half.vae is not first.vae and half.vae.dtype == torch.bfloat16


def test_the_same_folder_twice_shares_the_vae_and_text_encoder(tiny_model_dir: Path) -> None:
    first = load_components(tiny_model_dir, torch.float32, "cpu", 4)
    again = load_components(tiny_model_dir, torch.float32, "cpu", 4)
    assert again.vae is first.vae and again.text_encoder is first.text_encoder
    assert again.unet is not first.unet  # the UNet is never shared: backends may compile or fold it
