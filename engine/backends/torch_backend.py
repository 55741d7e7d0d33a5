"""Eager or compiled (engine.compiling: static shapes per warmed bucket) PyTorch on CPU or CUDA."""

from __future__ import annotations

import logging

import torch
from torch import nn

from engine import compiling
from engine.backends.base import Artefacts
from engine.config import EngineConfig
from engine.denoiser import TiUEDenoiser
from engine.errors import BackendUnavailableError
from engine.graphs import DecoderGraph, TextEncoderGraph
from engine.loading import Components
from engine.types import Decoder, TorchCompile

log = logging.getLogger(__name__)


class TorchBackend:
    name = "torch"

    @staticmethod
    def check_runnable(config: EngineConfig) -> None:
        """Torch runs wherever it imports; a bad device fails when the modules move to it."""
        if (
            config.torch_compile is TorchCompile.REDUCE_OVERHEAD
            and torch.device(config.device).type != "cuda"
        ):
            raise BackendUnavailableError(
                f"torch_compile reduce-overhead records CUDA graphs and needs device cuda (got {config.device}); "
                "set TIUE_TORCH_COMPILE=default (or off) on the CPU"
            )

    def __init__(
        self,
        components: Components,
        config: EngineConfig,
        artefacts: Artefacts | None = None,
        denoiser: nn.Module | None = None,  # instead of the TiUE one-pass (benchmarks: a looped student)
    ):
        self.device = torch.device(config.device)
        self.dtype = config.precision.torch_dtype
        self.text_encoder: nn.Module = TextEncoderGraph(components.text_encoder)
        self.denoiser: nn.Module = (
            denoiser
            if denoiser is not None
            else TiUEDenoiser(components.unet, components.chain, components.scheduler_config)
        ).to(self.device)
        self.memory_format = torch.channels_last if self.device.type == "cuda" else torch.contiguous_format
        autoencoders = {Decoder.FULL: components.vae, Decoder.TINY: components.vae_tiny}
        self.decoders: dict[Decoder, nn.Module] = {
            d: DecoderGraph(vae) for d, vae in autoencoders.items() if vae is not None
        }
        if self.device.type == "cuda":
            components.unet.to(memory_format=torch.channels_last)
            for vae in autoencoders.values():
                if vae is not None:
                    vae.to(memory_format=torch.channels_last)
            torch.backends.cudnn.benchmark = True  # shapes repeat (buckets), so the tuned kernel is reused
        if config.torch_compile is not TorchCompile.OFF:
            log.info(
                "torch.compile %s: the denoiser and decoders, static shapes per bucket (batches %s), cache %s",
                config.torch_compile.value,
                ",".join(map(str, config.batch_buckets())),
                compiling.cache_dir(config),
            )
            compiling.prepare(config)
            self.denoiser = compiling.compile_module(self.denoiser, config.torch_compile)
            self.decoders = {
                d: compiling.compile_module(m, config.torch_compile) for d, m in self.decoders.items()
            }

    def unsupported(self, batch: int, latent_height: int, latent_width: int) -> str | None:
        return None

    @torch.inference_mode()
    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(input_ids.to(self.device))

    @torch.inference_mode()
    def denoise(self, z_t: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        z_t = z_t.to(self.device, self.dtype).contiguous(memory_format=self.memory_format)
        return self.denoiser(z_t, states.to(self.dtype))

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor, decoder: Decoder = Decoder.FULL) -> torch.Tensor:
        latents = latents.to(self.device, self.dtype).contiguous(memory_format=self.memory_format)
        return self.decoders[decoder](latents)
