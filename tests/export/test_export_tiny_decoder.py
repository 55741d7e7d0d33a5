"""The tiny decoder on the compiled backends: exported beside the other graphs when the model has one,
ONNX Runtime matches torch, and TensorRT(-RTX) builds its profile."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from engine.backends.torch_backend import TorchBackend
from engine.config import EngineConfig
from engine.export.cache import ArtefactStore
from engine.export.contracts import VAE_DECODER_TINY
from engine.pipeline import TiUEPipeline, load_pipeline
from engine.types import Decoder, GenerationRequest

HAVE_TRT = any(importlib.util.find_spec(m) for m in ("tensorrt", "tensorrt_rtx"))


@pytest.fixture(scope="module")
def tiny_engine_dir(
    tiny_decoder_model_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
    tiue: Callable[..., int],
    export_args: list[str],
) -> Path:
    out = tmp_path_factory.mktemp("engines-tiny")
    assert tiue("export", "--model", tiny_decoder_model_dir, "--out", out, *export_args) == 0
    return out


@pytest.fixture(scope="module")
def onnx_pipeline(
    tiny_decoder_model_dir: Path, tiny_engine_dir: Path, ort_config: Callable[..., EngineConfig]
) -> TiUEPipeline:
    return load_pipeline(ort_config(tiny_decoder_model_dir, tiny_engine_dir))


def test_the_tiny_decoder_is_exported_when_the_model_has_one(
    tiny_engine_dir: Path, engine_dir_any: Path
) -> None:
    (entry,) = ArtefactStore(tiny_engine_dir).entries("onnx")
    assert set(entry.files) == {"text_encoder", "denoiser", "vae_decoder", VAE_DECODER_TINY}
    (plain,) = ArtefactStore(engine_dir_any).entries("onnx")
    assert VAE_DECODER_TINY not in plain.files


@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 4, 12)], ids=lambda s: "x".join(map(str, s)))
def test_onnxruntime_tiny_decoder_matches_torch(
    onnx_pipeline: TiUEPipeline, shape: tuple[int, int, int]
) -> None:
    reference = TorchBackend(onnx_pipeline.components, EngineConfig())
    batch, height, width = shape
    latents = torch.randn((batch, 4, height, width), generator=torch.Generator().manual_seed(4)) * 2
    got = onnx_pipeline.backend.decode(latents, Decoder.TINY)
    want = reference.decode(latents, Decoder.TINY)
    assert got.shape == (shape[0], 3, shape[1] * 8, shape[2] * 8)
    assert want.std() > 0.01
    assert (got - want).abs().max() <= 1e-4
    assert (onnx_pipeline.backend.decode(latents, Decoder.FULL) - got).abs().max() > 1e-2


def test_onnxruntime_serves_both_decoders(onnx_pipeline: TiUEPipeline) -> None:
    assert onnx_pipeline.info.decoders == (Decoder.FULL, Decoder.TINY)
    tiny = onnx_pipeline.generate([GenerationRequest("a red circle", 1, 64, 64, Decoder.TINY)])
    assert tiny.images[0].pixels.shape == (64, 64, 3)


@pytest.mark.slow  # a real TensorRT-RTX build of the four graphs
@pytest.mark.skipif(not HAVE_TRT, reason="neither tensorrt nor tensorrt_rtx is installed")
def test_the_tiny_decoder_profile_builds_into_a_tensorrt_engine(
    tiny_decoder_model_dir: Path, tiny_engine_dir: Path, tiue: Callable[..., int], export_args: list[str]
) -> None:
    args = ("--backend", "tensorrt", "--model", tiny_decoder_model_dir, "--engine-dir", tiny_engine_dir)
    assert tiue("build-engines", *args, "--device", "cpu", *export_args) == 0
    (entry,) = ArtefactStore(tiny_engine_dir).entries("tensorrt")
    assert entry.problems() == []
    assert entry.file(VAE_DECODER_TINY).stat().st_size > 10_000
