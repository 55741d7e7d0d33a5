"""engine.loading.check_config: what `tiue serve` checks before binding its port, without loading weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.config import EngineConfig
from engine.errors import BackendUnavailableError, ModelLoadError
from engine.loading import check_config, check_device
from engine.types import Decoder


def test_the_default_and_a_good_folder_pass(tiny_model_dir: Path) -> None:
    check_config(EngineConfig())
    check_config(EngineConfig(model_dir=tiny_model_dir))


@pytest.mark.parametrize("device", ["gpu", "cuda:x", ""])
def test_a_device_torch_does_not_know_is_named(device: str) -> None:
    with pytest.raises(BackendUnavailableError, match="is not a torch device: use cpu, cuda or cuda:N"):
        check_device(device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this torch has CUDA")
def test_cuda_without_cuda_says_what_to_use() -> None:
    with pytest.raises(
        BackendUnavailableError, match="device cuda:1 was asked for, but torch .*--device cpu"
    ):
        check_config(EngineConfig(device="cuda:1"))


def test_a_missing_tiny_decoder_is_found_before_loading(tiny_model_dir: Path) -> None:
    with pytest.raises(
        ModelLoadError, match=f"tiny decoder folder {tiny_model_dir / 'vae_tiny'} does not exist"
    ):
        check_config(EngineConfig(model_dir=tiny_model_dir, decoder=Decoder.TINY))


def test_a_folder_missing_a_component_is_named(tiny_model_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(ModelLoadError, match=f"{tmp_path} is missing pipeline components: unet/config.json"):
        check_config(EngineConfig(model_dir=tmp_path))
