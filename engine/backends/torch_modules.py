"""The torch backend's three compute stages as modules, on their device and in their memory format.

One place for how the stages are split and prepared, so that the backend that runs them eagerly or
compiled and the AOTInductor build (engine.export.torch_aot) see the same graphs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL, AutoencoderTiny
from torch import nn

from engine.config import EngineConfig
from engine.denoiser import TiUEDenoiser
from engine.loading import Components
from engine.types import Decoder


class VaeDecoderStage(nn.Module):
    def __init__(self, vae: AutoencoderKL | AutoencoderTiny):
        super().__init__()
        self.vae = vae

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents).sample


class TextEncoderStage(nn.Module):
    def __init__(self, text_encoder: nn.Module):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(input_ids)[0]


@dataclass
class StageModules:
    text_encoder: nn.Module
    denoiser: nn.Module
    decoders: dict[Decoder, nn.Module]
    device: torch.device
    dtype: torch.dtype
    memory_format: torch.memory_format  # of latents: channels-last on a GPU


def stage_modules(
    components: Components, config: EngineConfig, denoiser: nn.Module | None = None
) -> StageModules:
    """The text encoder, the TiUE denoiser (or `denoiser`: benchmarks run a looped student) and each loaded
    decoder; on CUDA the convolutions in channels-last and cuDNN's autotuner on (buckets repeat shapes)."""
    device = torch.device(config.device)
    cuda = device.type == "cuda"
    autoencoders = {Decoder.FULL: components.vae, Decoder.TINY: components.vae_tiny}
    if cuda:
        components.unet.to(memory_format=torch.channels_last)
        for vae in autoencoders.values():
            if vae is not None:
                vae.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True
    if denoiser is None:
        denoiser = TiUEDenoiser(components.unet, components.chain, components.scheduler_config)
    return StageModules(
        text_encoder=TextEncoderStage(components.text_encoder),
        denoiser=denoiser.to(device),
        decoders={d: VaeDecoderStage(vae) for d, vae in autoencoders.items() if vae is not None},
        device=device,
        dtype=config.precision.torch_dtype,
        memory_format=torch.channels_last if cuda else torch.contiguous_format,
    )
