"""The TiUE one-pass student forward for training and evaluation: the serving code itself.

The student is trained through `engine.denoiser.TiUEDenoiser` and `engine.schedule.DDIMChain`, so
what is distilled is exactly what is served (encoder once at t_0, all T decoders in one batched
pass, DDIM folded).
"""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel
from torch import nn

from engine.denoiser import TiUEDenoiser
from engine.schedule import DDIMChain


class OnePassWithEps(nn.Module):
    """(z_T, states) -> (z_0, eps [T, B, C, H, W]): the KL term needs every step's prediction."""

    def __init__(self, denoiser: TiUEDenoiser) -> None:
        super().__init__()
        self.denoiser: TiUEDenoiser = denoiser

    def forward(self, z_t: torch.Tensor, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z0, eps = self.denoiser(z_t, states, return_eps=True)
        return z0, eps


def one_pass(unet: UNet2DConditionModel, scheduler_config: dict, steps: int = 4) -> OnePassWithEps:
    chain = DDIMChain.from_scheduler_config(dict(scheduler_config), steps)
    chain.require_linear("training the one-pass student")
    return OnePassWithEps(TiUEDenoiser(unet, chain))
