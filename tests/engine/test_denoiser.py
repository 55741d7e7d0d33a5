"""The split UNet and the one-pass TiUE denoiser against diffusers' own forward and scheduler."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, UNet2DConditionModel

from engine.denoiser import TiUEDenoiser, run_decoder, run_encoder, time_embedding
from engine.schedule import DDIMChain
from tests.support.tiny_model import SD_SCHEDULER


@pytest.fixture(scope="module")
def unet(tiny_model_dir_any: Path) -> UNet2DConditionModel:
    model = UNet2DConditionModel.from_pretrained(tiny_model_dir_any, subfolder="unet", local_files_only=True)
    return model.eval()


def _inputs(batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, 8, 8, generator=g), torch.randn(batch, 77, 32, generator=g)


@torch.no_grad()
@pytest.mark.parametrize("t", [999, 751, 251, 1])
def test_split_equals_unet_forward(unet: UNet2DConditionModel, t: int) -> None:
    z, states = _inputs(2)
    emb = time_embedding(unet, torch.full((2,), t), z.dtype)
    mid, skips = run_encoder(unet, z, emb, states)
    split = run_decoder(unet, mid, skips, emb, states)
    torch.testing.assert_close(split, unet(z, t, states).sample, rtol=0, atol=1e-5)


@torch.no_grad()
def reference_tiue(
    unet: UNet2DConditionModel, config: dict, z_t: torch.Tensor, states: torch.Tensor
) -> torch.Tensor:
    """The TiUE algorithm as written: encoder features from step 0 reused, each decoder run alone, DDIM stepped."""
    scheduler = DDIMScheduler.from_config(config)
    scheduler.set_timesteps(4)
    t0 = scheduler.timesteps[0]
    mid, skips = run_encoder(unet, z_t, time_embedding(unet, t0.repeat(z_t.shape[0]), z_t.dtype), states)
    z = z_t
    for t in scheduler.timesteps:
        eps = run_decoder(unet, mid, skips, time_embedding(unet, t.repeat(z_t.shape[0]), z_t.dtype), states)
        z = scheduler.step(eps, t, z, eta=0.0).prev_sample
    return z


@torch.no_grad()
@pytest.mark.parametrize("batch", [1, 3])
def test_one_pass_equals_reference_algorithm(unet: UNet2DConditionModel, batch: int) -> None:
    z, states = _inputs(batch, seed=batch)
    denoiser = TiUEDenoiser(unet, DDIMChain.from_scheduler_config(SD_SCHEDULER, 4))
    torch.testing.assert_close(
        denoiser(z, states), reference_tiue(unet, SD_SCHEDULER, z, states), rtol=0, atol=1e-4
    )


@torch.no_grad()
def test_step_loop_fallback_for_nonlinear_config(unet: UNet2DConditionModel) -> None:
    config = {**SD_SCHEDULER, "clip_sample": True, "clip_sample_range": 1.0}
    chain = DDIMChain.from_scheduler_config(config, 4)
    z, states = _inputs(2, seed=7)
    denoiser = TiUEDenoiser(unet, chain, config)
    torch.testing.assert_close(
        denoiser(z, states), reference_tiue(unet, config, z, states), rtol=0, atol=1e-4
    )


@torch.no_grad()
def test_decoders_run_as_one_batch(unet: UNet2DConditionModel) -> None:
    """T*B rows go through the decoder in a single call: count the up-block invocations."""
    calls: list[int] = []
    hook = unet.up_blocks[0].register_forward_hook(lambda _m, _args, out: calls.append(out.shape[0]))
    try:
        TiUEDenoiser(unet, DDIMChain.from_scheduler_config(SD_SCHEDULER, 4))(*_inputs(3))
    finally:
        hook.remove()
    assert calls == [12]


def test_return_eps_is_differentiable(unet: UNet2DConditionModel) -> None:
    denoiser = TiUEDenoiser(unet, DDIMChain.from_scheduler_config(SD_SCHEDULER, 4))
    z, states = _inputs(2)
    z_0, eps = denoiser(z, states, return_eps=True)
    assert eps.shape == (4, 2, 4, 8, 8)
    z_0.sum().backward()
    assert unet.conv_in.weight.grad is not None
    unet.zero_grad(set_to_none=True)


def test_fixture_shapes_mirror_sd15_and_sd21(tiny_model_dir_any: Path) -> None:
    cfg = json.loads((tiny_model_dir_any / "unet" / "config.json").read_text())
    sd21 = tiny_model_dir_any.name.startswith("tiny-sd21")
    assert cfg["use_linear_projection"] is sd21
    assert isinstance(cfg["attention_head_dim"], list) is sd21
