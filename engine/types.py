"""The engine's public value types: what a caller sends in and what comes back."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    import torch


class Precision(str, Enum):
    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"

    @property
    def torch_dtype(self) -> torch.dtype:
        import torch  # deferred so that CLI parsing does not import torch

        return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[self.value]


class BackendName(str, Enum):
    TORCH = "torch"
    ONNXRUNTIME = "onnxruntime"
    TENSORRT = "tensorrt"


class TorchCompile(str, Enum):
    """How the torch backend compiles: not at all, with inductor, with inductor and CUDA graphs, or from
    AOTInductor packages built ahead of time (`tiue build-engines --backend torch`)."""

    AUTO = "auto"  # CUDA: built packages when found, else reduce-overhead; the CPU: off
    OFF = "off"
    DEFAULT = "default"
    MAX_AUTOTUNE = "max-autotune"  # longer compiles, autotuned kernels
    REDUCE_OVERHEAD = "reduce-overhead"  # CUDA graphs: one launch per stage (a GPU only)
    AOT = "aot"  # built packages (CUDA graphs captured at load on a GPU); none usable: as auto without them


class Decoder(str, Enum):
    """Which decoder turns latents into pixels: the model's VAE, or a TAESD-layout `AutoencoderTiny`."""

    FULL = "full"
    TINY = "tiny"


DEVICE_STAGES = ("text_encode", "denoise", "vae_decode")  # what BatchResult.timings reports, in order


@dataclass(frozen=True)
class GenerationRequest:
    """One image to make. The image depends only on (model, prompt, seed, width, height, decoder)."""

    prompt: str
    seed: int
    width: int
    height: int
    decoder: Decoder | None = None  # None: the pipeline's default (EngineConfig.decoder)

    @property
    def shape_key(self) -> tuple[int, int]:
        """The image size; requests of one batch share it (and their decoder)."""
        return (self.width, self.height)


@dataclass
class GeneratedImage:
    pixels: np.ndarray  # (height, width, 3) uint8 RGB
    seed: int


@dataclass
class BatchResult:
    images: list[GeneratedImage]
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage in DEVICE_STAGES


@dataclass(frozen=True)
class ModelInfo:
    """What the service reports and validates against."""

    name: str
    backend: str
    precision: str
    device: str
    steps: int
    max_prompt_tokens: int  # text encoder window, including BOS/EOS
    size_multiple: int  # width and height must be multiples of this (pixels)
    default_size: int  # pixels, the UNet's native sample size times the VAE factor
    decoders: tuple[Decoder, ...] = (Decoder.FULL,)  # the decoders loaded
    default_decoder: Decoder = Decoder.FULL  # what a request that names none gets
    trained_sizes: tuple[tuple[int, int], ...] = ()  # (width, height) it draws well; (): not known
    vocabulary: tuple[str, ...] | None = None  # the words it was trained on; None: not known (any words)
