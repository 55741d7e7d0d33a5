"""The tiny decoder (a diffusers AutoencoderTiny): loading, its checks, its latent scaling, per-request choice."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderTiny, StableDiffusionPipeline

from engine import Decoder, EngineConfig, GenerationRequest
from engine.errors import InvalidRequestError, ModelLoadError
from engine.pipeline import TiUEPipeline, load_pipeline
from tests.support.tiny_model import add_tiny_decoder


@pytest.fixture(scope="module")
def pipeline(tiny_decoder_model_dir: Path) -> TiUEPipeline:
    return load_pipeline(EngineConfig(model_dir=tiny_decoder_model_dir))


def _req(seed: int, decoder: Decoder | None = None) -> GenerationRequest:
    return GenerationRequest("a red circle", seed, 64, 64, decoder)


def test_vae_tiny_in_the_model_folder_is_loaded_and_listed(pipeline: TiUEPipeline) -> None:
    assert isinstance(pipeline.components.vae_tiny, AutoencoderTiny)
    assert pipeline.info.decoders == (Decoder.FULL, Decoder.TINY)
    assert pipeline.info.default_decoder is Decoder.FULL


def test_without_vae_tiny_only_the_full_decoder_is_offered(tiny_model_dir: Path) -> None:
    pipe = load_pipeline(EngineConfig(model_dir=tiny_model_dir))
    assert pipe.info.decoders == (Decoder.FULL,)
    with pytest.raises(InvalidRequestError, match="decoder 'tiny' is not available .* choose one of: full"):
        pipe.generate([_req(0, Decoder.TINY)])


def test_tiny_by_default_without_one_fails_at_load_naming_the_folder(tiny_model_dir: Path) -> None:
    with pytest.raises(
        ModelLoadError, match=f"tiny decoder folder {tiny_model_dir / 'vae_tiny'} does not exist"
    ):
        load_pipeline(EngineConfig(model_dir=tiny_model_dir, decoder=Decoder.TINY))


def test_a_named_folder_that_is_missing_fails_at_load(tiny_model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=f"{tmp_path / 'nope'} does not exist"):
        load_pipeline(EngineConfig(model_dir=tiny_model_dir, tiny_decoder_dir=tmp_path / "nope"))


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"latent_channels": 3}, "latent channels 3, the VAE's are 4"),
        ({"upsamplings": 2}, "spatial scale 4x, the VAE's is 8x"),
    ],
)
def test_a_mismatched_tiny_decoder_fails_at_load_naming_folder_and_mismatch(
    tiny_model_dir: Path, tmp_path: Path, kw: dict[str, int], message: str
) -> None:
    folder = add_tiny_decoder(tiny_model_dir, tmp_path / "taesd", **kw)
    with pytest.raises(ModelLoadError, match=f"tiny decoder {folder} does not match the model: {message}"):
        load_pipeline(EngineConfig(model_dir=tiny_model_dir, tiny_decoder_dir=folder))


def test_a_folder_of_another_class_is_refused(tiny_model_dir: Path) -> None:
    with pytest.raises(ModelLoadError, match="holds a AutoencoderKL, not an AutoencoderTiny"):
        load_pipeline(EngineConfig(model_dir=tiny_model_dir, tiny_decoder_dir=tiny_model_dir / "vae"))


def test_a_tiny_decoder_from_a_named_folder(tiny_model_dir: Path, tmp_path: Path) -> None:
    folder = add_tiny_decoder(tiny_model_dir, tmp_path / "taesd")
    pipe = load_pipeline(
        EngineConfig(model_dir=tiny_model_dir, tiny_decoder_dir=folder, decoder=Decoder.TINY)
    )
    assert pipe.components.vae_tiny_path == folder
    assert pipe.info.default_decoder is Decoder.TINY
    assert pipe.generate([_req(0)]).images[0].pixels.shape == (64, 64, 3)


@torch.no_grad()
def test_tiny_decoding_is_what_diffusers_does_with_an_autoencoder_tiny_as_its_vae(
    pipeline: TiUEPipeline, tiny_decoder_model_dir: Path
) -> None:
    """A diffusers pipeline whose `vae` is the AutoencoderTiny decodes `latents / vae.scaling_factor`
    and post-processes [-1, 1] to uint8; ours gives the same pixels from the same z_0."""
    request = _req(3, Decoder.TINY)
    ours = pipeline.generate([request]).images[0].pixels
    states = pipeline.backend.encode_text(pipeline.tokenize([request.prompt]))
    z_0 = pipeline.backend.denoise(pipeline.initial_noise([request], 8, 8), states)
    tiny = AutoencoderTiny.from_pretrained(tiny_decoder_model_dir / "vae_tiny")
    sd = StableDiffusionPipeline.from_pretrained(tiny_decoder_model_dir, vae=tiny, safety_checker=None)
    assert sd.vae.config.scaling_factor == 0.75
    image = sd.vae.decode(z_0 / sd.vae.config.scaling_factor, return_dict=False)[0]
    theirs = (sd.image_processor.postprocess(image, output_type="np")[0] * 255).round().astype(np.uint8)
    assert np.abs(ours.astype(int) - theirs.astype(int)).max() <= 1
    full = pipeline.generate([_req(3, Decoder.FULL)]).images[0].pixels
    assert not np.array_equal(full, ours)


def test_the_default_decoder_serves_requests_that_name_none(tiny_decoder_model_dir: Path) -> None:
    pipe = load_pipeline(EngineConfig(model_dir=tiny_decoder_model_dir, decoder=Decoder.TINY))
    implicit = pipe.generate([_req(5)]).images[0].pixels
    explicit = pipe.generate([_req(5, Decoder.TINY)]).images[0].pixels
    assert np.array_equal(implicit, explicit)


def test_one_batch_has_one_decoder(pipeline: TiUEPipeline) -> None:
    with pytest.raises(InvalidRequestError, match="same decoder"):
        pipeline.generate([_req(0, Decoder.FULL), _req(1, Decoder.TINY)])
    # None means the default (full), so it may share a batch with an explicit full
    assert len(pipeline.generate([_req(0), _req(1, Decoder.FULL)]).images) == 2


def test_the_model_hash_covers_vae_tiny(tiny_model_dir: Path, tmp_path: Path) -> None:
    from engine.files import model_content_hash

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    memo = tmp_path / "memo.json"
    before = model_content_hash(model, memo)
    add_tiny_decoder(model)
    with_tiny = model_content_hash(model, memo)
    assert with_tiny != before
    outside = add_tiny_decoder(model, tmp_path / "taesd", seed=2)
    assert model_content_hash(model, memo, outside) not in (before, with_tiny)
