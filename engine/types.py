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


class SafetyCheck(str, Enum):
    """Whether generated images pass the model folder's `safety_checker/` (diffusers'
    StableDiffusionSafetyChecker) before they are returned."""

    AUTO = "auto"  # when the model folder has one
    ON = "on"  # the model folder must have one, or loading fails
    OFF = "off"


class Moderation(str, Enum):
    """How strictly the safety checker flags an image (OpenAI's `moderation`). AUTO is diffusers'
    behaviour: an image near a special-care concept gets 0.01 added to every concept score, so it
    flags sooner; LOW leaves that adjustment out and flags only on the concept thresholds."""

    AUTO = "auto"
    LOW = "low"


TEXT_ENCODE, DENOISE, VAE_DECODE, SAFETY_CHECK = "text_encode", "denoise", "vae_decode", "safety_check"
# What BatchResult.timings reports, in order (safety_check only when the model's checker runs).
DEVICE_STAGES = (TEXT_ENCODE, DENOISE, VAE_DECODE, SAFETY_CHECK)


@dataclass(frozen=True)
class GenerationRequest:
    """One image to make. The image depends only on (model, prompt, seed, width, height, decoder)."""

    prompt: str
    seed: int
    width: int
    height: int
    decoder: Decoder | None = None  # None: the pipeline's default (EngineConfig.decoder)
    moderation: Moderation = Moderation.AUTO  # the safety checker's strictness (when it runs)

    @property
    def shape_key(self) -> tuple[int, int]:
        """The image size; requests of one batch share it (and their decoder)."""
        return (self.width, self.height)


@dataclass
class GeneratedImage:
    pixels: np.ndarray  # (height, width, 3) uint8 RGB; all zero when flagged
    seed: int
    flagged: bool = False  # the safety checker flagged it: never to be returned


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
    safety_checker: bool = False  # images pass a safety checker (and `moderation` is honoured)
