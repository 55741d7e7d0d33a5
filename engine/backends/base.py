"""The one interface every backend implements: three compute stages on tensors, and what it is handed."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch

from engine.types import Decoder

if TYPE_CHECKING:
    from engine.config import EngineConfig
    from engine.export.profiles import Profile


@dataclass(frozen=True)
class Artefacts:
    """What a compiled backend runs, decided once at load (engine.export.artefacts): a file per graph
    (ONNX graph or TensorRT engine, by its contract's name in engine.export.contracts) or per torch
    AOTInductor package, and the shapes they were built for. A backend runs them; it never builds."""

    folder: Path
    profiles: tuple[Profile, ...]
    files: dict[str, Path]


class Backend(Protocol):
    """Runs the three compute stages. Inputs and outputs are torch tensors on `device`.

    The pipeline owns tokenization, noise, latent scaling and post-processing; a backend only computes.
    A backend class is constructed as `Backend(components, config, artefacts)`.
    """

    name: str
    device: torch.device
    dtype: torch.dtype

    @staticmethod
    def check_runnable(config: EngineConfig) -> None:
        """Raise BackendUnavailableError when this backend cannot run `config` here (no GPU, package
        missing, a precision it does not run), before anything is looked up or built."""
        ...

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
