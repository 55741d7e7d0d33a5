"""The one interface every backend implements: three compute stages on tensors."""

from __future__ import annotations

from typing import Protocol

import torch

from engine.types import Decoder


class Backend(Protocol):
    """Runs the three compute stages. Inputs and outputs are torch tensors on `device`.

    The pipeline owns tokenization, noise, latent scaling and post-processing; a backend only computes.
    """

    name: str
    device: torch.device
    dtype: torch.dtype

    def unsupported(self, batch: int, latent_height: int, latent_width: int) -> str | None:
        """Why this backend cannot run that shape (e.g. outside a compiled profile), or None."""
        ...

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, L] int64 token ids -> [B, L, D] prompt states."""
        ...

    def denoise(self, z_t: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        """[B, C, h, w] initial noise and prompt states -> [B, C, h, w] final latents z_0."""
        ...

    def decode(self, latents: torch.Tensor, decoder: Decoder = Decoder.FULL) -> torch.Tensor:
        """[B, C, h, w] latents already scaled for `decoder` (pipeline.latent_scaling) -> [B, 3, H, W]
        in [-1, 1], by the model's VAE or its tiny decoder (an AutoencoderTiny)."""
        ...
