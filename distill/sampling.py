"""Drawing images: per-image seeded noise, the teacher's guided DDIM loop, and VAE decoding."""

from __future__ import annotations

import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

from distill.models import LATENT_CHANNELS, LATENT_SIZE
from engine.pipeline import to_uint8


def initial_noise(seeds: list[int], size: int = LATENT_SIZE) -> torch.Tensor:
    """One generator per image, so an image does not depend on the batch it lands in."""
    return torch.cat(
        [
            torch.randn(1, LATENT_CHANNELS, size, size, generator=torch.Generator().manual_seed(s))
            for s in seeds
        ]
    )


@torch.no_grad()
def ddim_sample(
    unet: UNet2DConditionModel,
    scheduler_config: dict,
    z_t: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor | None,
    steps: int,
    guidance: float,
) -> torch.Tensor:
    """Eta-0 DDIM from z_T with classifier-free guidance (none when uncond is None or guidance == 1)."""
    sched = DDIMScheduler.from_config(scheduler_config)
    sched.set_timesteps(steps)
    z = z_t
    guided = uncond is not None and guidance != 1.0
    for t in sched.timesteps:
        if guided:
            assert uncond is not None
            e_c, e_u = unet(torch.cat([z, z]), t, torch.cat([cond, uncond.expand_as(cond)])).sample.chunk(2)
            eps = e_u + guidance * (e_c - e_u)
        else:
            eps = unet(z, t, cond).sample
        z = sched.step(eps, t, z, eta=0.0).prev_sample
    return z


@torch.no_grad()
def decode(vae: AutoencoderKL, latents: torch.Tensor, batch: int = 128) -> np.ndarray:
    out = [
        vae.decode(latents[i : i + batch] / vae.config.scaling_factor).sample
        for i in range(0, len(latents), batch)
    ]
    return to_uint8(torch.cat(out))
