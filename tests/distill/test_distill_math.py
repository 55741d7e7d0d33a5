"""The pieces of the distillation objective: the KL term, the LoRA wrapper, the one-pass student."""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel

from distill.lora import add_lora
from distill.models import build_scheduler
from distill.onepass import one_pass
from distill.student import kl_term


def test_kl_is_zero_for_standard_normal_statistics() -> None:
    eps = torch.randn(4, 3, 4, 8, 8)
    flat = eps.reshape(12, -1)
    eps = ((flat - flat.mean(1, keepdim=True)) / flat.std(1, unbiased=False, keepdim=True)).view_as(eps)
    assert kl_term(eps).abs().item() < 1e-5


def test_kl_matches_the_closed_form_per_prediction() -> None:
    eps = torch.randn(2, 3, 4, 8, 8) * 2.0 + 0.5  # T=2, B=3
    flat = eps.reshape(6, -1)
    mu, var = flat.mean(1), flat.var(1, unbiased=False)
    want = (-0.5 * 0.1 * (1 + torch.log(var) - mu**2 - var)).mean()
    assert torch.allclose(kl_term(eps, lam=0.1), want, atol=1e-6)
    assert kl_term(eps).item() > 0


def test_kl_gradient_pulls_towards_unit_statistics() -> None:
    eps = (torch.randn(1, 1, 4, 8, 8) * 3 + 1).requires_grad_(True)
    kl_term(eps).backward()
    assert eps.grad is not None
    with torch.no_grad():
        stepped = eps - 10.0 * eps.grad
    assert kl_term(stepped).item() < kl_term(eps).item()


def _tiny_unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 32),
        layers_per_block=1,
        cross_attention_dim=16,
        attention_head_dim=4,
        norm_num_groups=8,
    ).eval()


def test_lora_starts_equal_to_base_and_trains_only_adapters() -> None:
    unet = _tiny_unet()
    z, t, states = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 5, 16)
    with torch.no_grad():
        before = unet(z, t, states).sample
    params = add_lora(unet, rank=4)
    with torch.no_grad():
        after = unet(z, t, states).sample
    assert torch.allclose(before, after, atol=1e-6)
    trainable = [p for p in unet.parameters() if p.requires_grad]
    assert len(trainable) == len(params) > 0


def test_student_one_pass_is_the_serving_denoiser_with_its_eps() -> None:
    unet = _tiny_unet()
    config = build_scheduler().config
    z, states = torch.randn(3, 4, 8, 8), torch.randn(3, 5, 16)
    module = one_pass(unet, config)
    assert module.denoiser.chain.timesteps == (751, 501, 251, 1)
    with torch.no_grad():
        z0, eps = module(z, states)
        served = module.denoiser(z, states)
    assert eps.shape == (4, 3, 4, 8, 8)
    assert torch.equal(z0, served)
