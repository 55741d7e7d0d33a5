"""ONNX Runtime against eager torch, component by component and for whole images, on both tiny UNet
shapes, at batches other than the export batch (2) and at two sizes, one not square."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.backends.torch_backend import TorchBackend
from engine.errors import UnsupportedSizeError
from engine.pipeline import TiUEPipeline
from engine.types import GenerationRequest

# (batch, latent height, latent width): square at the tuned size, and oblong near the range's ends.
SHAPES = [(1, 8, 8), (3, 6, 12)]
PROMPTS = ["a red circle", "a small blue square on a white background", "a tree"]


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape and a.dtype == b.dtype
    return float((a.float() - b.float()).abs().max())


def _noise(batch: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 4, height, width, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("batch", [1, 3])
def test_text_encoder_matches_torch(
    onnx_pipeline_any: TiUEPipeline, torch_backend_any: TorchBackend, batch: int
) -> None:
    ids = onnx_pipeline_any.tokenize(PROMPTS[:batch])
    got = onnx_pipeline_any.backend.encode_text(ids)
    assert _max_diff(got, torch_backend_any.encode_text(ids)) <= 1e-4


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_denoiser_matches_torch(
    onnx_pipeline_any: TiUEPipeline, torch_backend_any: TorchBackend, shape: tuple[int, int, int]
) -> None:
    batch, height, width = shape
    states = torch_backend_any.encode_text(onnx_pipeline_any.tokenize(PROMPTS[:batch]))
    z_t = _noise(batch, height, width)
    got = onnx_pipeline_any.backend.denoise(z_t, states)
    want = torch_backend_any.denoise(z_t, states)
    assert want.abs().max() > 1.0  # a real signal, not a vacuous comparison
    assert _max_diff(got, want) <= 1e-4


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_vae_decoder_matches_torch(
    onnx_pipeline_any: TiUEPipeline, torch_backend_any: TorchBackend, shape: tuple[int, int, int]
) -> None:
    latents = _noise(*shape, seed=1)
    got = onnx_pipeline_any.backend.decode(latents)
    assert got.shape == (shape[0], 3, shape[1] * 8, shape[2] * 8)
    assert _max_diff(got, torch_backend_any.decode(latents)) <= 1e-4


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


@pytest.mark.parametrize(("count", "width", "height"), [(3, 64, 64), (1, 96, 48)])
def test_whole_images_match_torch(
    onnx_pipeline_any: TiUEPipeline, torch_backend_any: TorchBackend, count: int, width: int, height: int
) -> None:
    requests = [GenerationRequest(PROMPTS[i], seed=100 + i, width=width, height=height) for i in range(count)]
    reference = TiUEPipeline(onnx_pipeline_any.components, torch_backend_any, onnx_pipeline_any.config)
    got = onnx_pipeline_any.generate(requests).images
    want = reference.generate(requests).images
    for g, w in zip(got, want, strict=True):
        assert g.pixels.shape == (height, width, 3)
        assert _psnr(g.pixels, w.pixels) >= 40.0


def test_reports_the_backend_it_runs(onnx_pipeline_any: TiUEPipeline) -> None:
    assert onnx_pipeline_any.info.backend == "onnxruntime"


def test_shapes_outside_the_exported_range_are_refused(onnx_pipeline_any: TiUEPipeline) -> None:
    backend = onnx_pipeline_any.backend
    assert backend.unsupported(4, 12, 4) is None
    reason = backend.unsupported(1, 16, 8)
    assert reason is not None and "64x128 px" in reason and "32..96 px" in reason
    assert "batch 5" in (backend.unsupported(5, 8, 8) or "")
    with pytest.raises(UnsupportedSizeError, match="outside the compiled profiles"):
        onnx_pipeline_any.validate(GenerationRequest("a tree", 0, 128, 64))
    with pytest.raises(UnsupportedSizeError):
        backend.denoise(_noise(1, 16, 16), torch.zeros(1, 77, 32))
