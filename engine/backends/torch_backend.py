"""Eager (optionally compiled) PyTorch on CPU or CUDA."""

from __future__ import annotations

import logging

import torch
from diffusers import AutoencoderKL, AutoencoderTiny
from torch import nn

from engine.config import EngineConfig
from engine.denoiser import TiUEDenoiser
from engine.export.cache import Entry
from engine.loading import Components
from engine.types import Decoder

log = logging.getLogger(__name__)


class _Decoder(nn.Module):
    def __init__(self, vae: AutoencoderKL | AutoencoderTiny):
        super().__init__()
        self.vae = vae

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents).sample


class _TextEncoder(nn.Module):
    def __init__(self, text_encoder: nn.Module):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(input_ids)[0]


class TorchBackend:
    name = "torch"

    @staticmethod
    def check_runnable(config: EngineConfig) -> None:
        """Torch runs wherever it imports; a bad device fails when the modules move to it."""

    def __init__(self, components: Components, config: EngineConfig, artefacts: Entry | None = None):
        self.device = torch.device(config.device)
        self.dtype = config.precision.torch_dtype
        self.text_encoder: nn.Module = _TextEncoder(components.text_encoder)
        self.denoiser: nn.Module = TiUEDenoiser(
            components.unet, components.chain, components.scheduler_config
        ).to(self.device)
        autoencoders = {Decoder.FULL: components.vae, Decoder.TINY: components.vae_tiny}
        self.decoders: dict[Decoder, nn.Module] = {
            d: _Decoder(vae) for d, vae in autoencoders.items() if vae is not None
        }
        if self.device.type == "cuda":
            components.unet.to(memory_format=torch.channels_last)
            for vae in autoencoders.values():
                if vae is not None:
                    vae.to(memory_format=torch.channels_last)
        if config.torch_compile:
            log.info("compiling the denoiser and the decoders with torch.compile")
            self.denoiser = torch.compile(self.denoiser, dynamic=True)  # type: ignore[assignment]
            self.decoders = {d: torch.compile(m, dynamic=True) for d, m in self.decoders.items()}  # type: ignore[misc]

    def unsupported(self, batch: int, latent_height: int, latent_width: int) -> str | None:
        return None

    @torch.inference_mode()
    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(input_ids.to(self.device))

    @torch.inference_mode()
    def denoise(self, z_t: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        return self.denoiser(z_t.to(self.device, self.dtype), states.to(self.dtype))

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor, decoder: Decoder = Decoder.FULL) -> torch.Tensor:
        return self.decoders[decoder](latents.to(self.device, self.dtype))
