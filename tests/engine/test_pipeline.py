"""The pipeline end to end through the real loading code, on tiny saved pipeline folders."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from engine import EngineConfig, GenerationRequest
from engine.errors import InvalidRequestError, ModelLoadError, UnsupportedSchedulerError, UnsupportedSizeError
from engine.loading import default_model_dir
from engine.pipeline import TiUEPipeline, load_pipeline


@pytest.fixture(scope="module")
def pipeline(tiny_model_dir_any: Path) -> TiUEPipeline:
    return load_pipeline(EngineConfig(model_dir=tiny_model_dir_any))


def _req(prompt: str, seed: int, size: int = 64, width: int | None = None) -> GenerationRequest:
    return GenerationRequest(prompt=prompt, seed=seed, width=width or size, height=size)


def test_generates_uint8_rgb_at_requested_size(pipeline: TiUEPipeline) -> None:
    result = pipeline.generate([_req("a red circle", 1, size=32, width=64)])
    (image,) = result.images
    assert image.pixels.shape == (32, 64, 3) and image.pixels.dtype == np.uint8
    assert image.seed == 1
    assert set(result.timings) == {"text_encode", "denoise", "vae_decode"}
    assert image.pixels.std() > 0  # not a constant frame


def test_batch_invariance(pipeline: TiUEPipeline) -> None:
    """An image depends on (prompt, seed, size) only, not on the batch it was generated in."""
    alone = pipeline.generate([_req("a blue square", 42)]).images[0].pixels
    batch = pipeline.generate(
        [_req("a green star", 7), _req("a blue square", 42), _req("a red circle", 3), _req("tree", 9)]
    ).images
    assert batch[1].seed == 42
    # fp32 on CPU: GEMM blocking may differ with batch size; at most one uint8 level of rounding
    assert np.abs(batch[1].pixels.astype(int) - alone.astype(int)).max() <= 1
    assert not np.array_equal(batch[0].pixels, batch[1].pixels)


def test_seed_and_prompt_change_the_image(pipeline: TiUEPipeline) -> None:
    a, b, c, a2 = pipeline.generate([_req("cat", 1), _req("cat", 2), _req("dog", 1), _req("cat", 1)]).images
    assert not np.array_equal(a.pixels, b.pixels)
    assert not np.array_equal(a.pixels, c.pixels)
    assert np.array_equal(a.pixels, a2.pixels)


def test_a_batch_over_max_batch_size_is_refused(tiny_model_dir: Path) -> None:
    """Forming batches is the caller's job (the service's batcher); the pipeline runs one as given."""
    pipe = load_pipeline(EngineConfig(model_dir=tiny_model_dir, max_batch_size=2))
    with pytest.raises(InvalidRequestError, match="at most 2 images"):
        pipe.generate([_req("cat", s) for s in range(3)])
    assert [im.seed for im in pipe.generate([_req("cat", 7), _req("cat", 8)]).images] == [7, 8]


@pytest.mark.parametrize(("width", "height"), [(60, 64), (64, 0), (8, 64)])
def test_unsupported_size_is_refused(pipeline: TiUEPipeline, width: int, height: int) -> None:
    with pytest.raises(UnsupportedSizeError, match="multiple of 16"):
        pipeline.validate(GenerationRequest("cat", 0, width, height))


def test_bad_requests_are_refused(pipeline: TiUEPipeline) -> None:
    with pytest.raises(InvalidRequestError, match="empty"):
        pipeline.validate(_req("   ", 0))
    with pytest.raises(InvalidRequestError, match="seed"):
        pipeline.validate(_req("cat", -1))
    with pytest.raises(InvalidRequestError, match="same width and height"):
        pipeline.generate([_req("cat", 0, 64), _req("cat", 0, 32)])


def test_count_tokens_includes_bos_eos_and_is_not_truncated(pipeline: TiUEPipeline) -> None:
    assert pipeline.count_tokens("a red circle") == 5
    assert pipeline.count_tokens("red " * 100) == 102
    assert pipeline.info.max_prompt_tokens == 77


def test_info_describes_the_model(pipeline: TiUEPipeline, tiny_model_dir_any: Path) -> None:
    info = pipeline.info
    assert (info.backend, info.precision, info.device, info.steps) == ("torch", "fp32", "cpu", 4)
    assert info.size_multiple == 16 and info.default_size == 64
    assert info.name == tiny_model_dir_any.name


def test_missing_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_pipeline(EngineConfig(model_dir=tmp_path / "nope"))
    with pytest.raises(ModelLoadError, match="model_index.json is missing"):
        load_pipeline(EngineConfig(model_dir=tmp_path))


@pytest.mark.parametrize("component", ["unet", "vae", "text_encoder", "tokenizer", "scheduler"])
def test_missing_component_is_named(tiny_model_dir: Path, tmp_path: Path, component: str) -> None:
    broken = shutil.copytree(tiny_model_dir, tmp_path / "broken")
    shutil.rmtree(broken / component)
    with pytest.raises(ModelLoadError, match=f"missing pipeline components: {component}/"):
        load_pipeline(EngineConfig(model_dir=broken))


def test_corrupt_weights_are_a_clear_error(tiny_model_dir: Path, tmp_path: Path) -> None:
    broken = shutil.copytree(tiny_model_dir, tmp_path / "corrupt")
    (broken / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelLoadError, match="cannot load"):
        load_pipeline(EngineConfig(model_dir=broken))


def test_nonlinear_scheduler_runs_the_step_loop(tiny_model_dir: Path, tmp_path: Path) -> None:
    folder = shutil.copytree(tiny_model_dir, tmp_path / "clip")
    cfg_path = folder / "scheduler" / "scheduler_config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "clip_sample": True}))
    pipe = load_pipeline(EngineConfig(model_dir=folder))
    assert not pipe.components.chain.linear
    assert pipe.generate([_req("cat", 0)]).images[0].pixels.shape == (64, 64, 3)
    with pytest.raises(UnsupportedSchedulerError, match="clip_sample"):
        pipe.components.chain.require_linear("export")


def test_embedded_default_loads_without_configuration() -> None:
    pipe = load_pipeline(EngineConfig())
    assert (default_model_dir() / "model_index.json").is_file()
    size = pipe.info.default_size
    assert pipe.generate([_req("a red circle", 0, size=size)]).images[0].pixels.shape == (size, size, 3)


def test_a_missing_embedded_default_says_what_to_pass(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("engine.loading.SHIPPED_DEFAULT", tmp_path / "default_model")
    with pytest.raises(ModelLoadError, match="missing from this installation") as exc:
        load_pipeline(EngineConfig())
    assert "--model" in str(exc.value) and "TIUE_MODEL_DIR" in str(exc.value)
    assert not list(tmp_path.iterdir()), "no model is built in its place"


def test_warmup_uses_a_size_the_backend_supports(tiny_model_dir: Path) -> None:
    """Compiled engines may exclude the model's default size; warm-up must not fail on that."""
    pipe = load_pipeline(EngineConfig(model_dir=tiny_model_dir))
    seen: list[int] = []
    pipe.backend.unsupported = lambda batch, h, w: None if h * 8 >= 96 else "outside the profile"  # type: ignore[method-assign]
    assert pipe.nearest_supported_size(64) == 96
    real_generate = pipe.generate
    pipe.generate = lambda reqs: seen.append(reqs[0].width) or real_generate(reqs)  # type: ignore[method-assign]
    pipe.warmup()
    assert seen == [96]


def test_threads_setting_reaches_torch(tiny_model_dir: Path) -> None:
    before = torch.get_num_threads()
    try:
        load_pipeline(EngineConfig(model_dir=tiny_model_dir, threads=2))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
