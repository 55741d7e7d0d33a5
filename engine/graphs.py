"""The modules a backend runs and an exporter traces, beside the TiUE denoiser: one set, so that the
torch backend runs what the compiled backends were exported from."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, AutoencoderTiny
from torch import nn


class TextEncoderGraph(nn.Module):
    """Token ids to the CLIP text encoder's last hidden states, cast to `out_dtype` when one is given."""

    def __init__(self, text_encoder: nn.Module, out_dtype: torch.dtype | None = None):
        super().__init__()
        self.text_encoder = text_encoder
        self.out_dtype = out_dtype

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        states: torch.Tensor = self.text_encoder(input_ids)[0]
        return states if self.out_dtype is None else states.to(self.out_dtype)


class DecoderGraph(nn.Module):
    """Latents to images in [-1, 1], by a VAE or a tiny decoder (an AutoencoderTiny)."""

    def __init__(self, vae: AutoencoderKL | AutoencoderTiny):
        super().__init__()
        self.vae = vae

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        images: torch.Tensor = self.vae.decode(latents).sample
        return images
