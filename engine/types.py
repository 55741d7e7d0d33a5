"""The engine's public value types: what a caller sends in and what comes back."""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import TYPE_CHECKING, NamedTuple

from engine.errors import UnsupportedDecoderError

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

    @classmethod
    def parse(cls, value: object) -> TorchCompile:
        """A mode, its name in any case, or the setting's old boolean: true (1, yes, on) is the default
        mode, false (0, no) is off. Anything else names the choices."""
        if isinstance(value, bool):
            return cls.DEFAULT if value else cls.OFF
        if isinstance(value, str):
            text = value.strip().lower()
            value = _LEGACY_COMPILE.get(text, text)
        try:
            return cls(value)
        except ValueError:
            choices = ", ".join(mode.value for mode in cls)
            raise ValueError(f"torch_compile {value!r} is not one of: {choices}") from None


_LEGACY_COMPILE = {"true": "default", "1": "default", "yes": "default", "on": "default"} | dict.fromkeys(
    ("false", "0", "no"), "off"
)


class Decoder(str, Enum):
    """Which decoder turns latents into pixels: the model's VAE, or a TAESD-layout `AutoencoderTiny`."""

    FULL = "full"
    TINY = "tiny"


SEED_SPACE = 2**32  # seeds are in [0, SEED_SPACE): what numpy and most image APIs take
MAX_SEED = SEED_SPACE - 1


def random_seed() -> int:
    return secrets.randbelow(SEED_SPACE)


_SIDE = r"(0|[1-9][0-9]{0,4})"  # ASCII digits, no leading zero, at most 5 (a side above 99999 px is no size)
_SIZE = re.compile(rf"{_SIDE}x{_SIDE}", re.ASCII)
_SQUARE = re.compile(_SIDE, re.ASCII)


def parse_size(text: str, *, square: bool = False) -> tuple[int, int]:
    """'WIDTHxHEIGHT' in pixels -> (width, height), strictly: ASCII digits without leading zeros either
    side of a lowercase x, nothing around them; with `square`, a lone 'N' too (N x N). ValueError,
    saying the form, otherwise. Whether a size is served is the model's and the server's to say."""
    if match := _SIZE.fullmatch(text):
        return int(match[1]), int(match[2])
    if square and (match := _SQUARE.fullmatch(text)):
        return int(match[1]), int(match[1])
    form = "512 or 512x768" if square else "512x768"
    raise ValueError(
        f"size {text!r} is not WIDTHxHEIGHT in pixels: it must look like {form}, with digits 0-9 (no "
        "leading zeros) and a lowercase x, and nothing around them"
    )


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


class BatchKey(NamedTuple):
    """What the requests of one batch share: their size and their decoder. The service's batcher groups
    requests by it (and by model), and estimates a batch's device time by it."""

    width: int
    height: int
    decoder: Decoder | None = None


@dataclass(frozen=True)
class GenerationRequest:
    """One image to make; the image depends only on (model, prompt, seed, width, height, decoder).

    The service resolves every default into it once, at the edge (service.generation.resolve_job), and
    the batcher, the device worker and the pipeline take it as it is. A new per-request field is declared
    here and in the request schema (service.schemas, whose fields of the same name are copied in), and
    read where it is used."""

    prompt: str
    seed: int
    width: int
    height: int
    decoder: Decoder | None = None  # None: the pipeline's default (EngineConfig.decoder)
    moderation: Moderation = Moderation.AUTO  # the safety checker's strictness (when it runs)

    @property
    def shape_key(self) -> tuple[int, int]:
        """The image size."""
        return (self.width, self.height)

    @property
    def batch_key(self) -> BatchKey:
        return BatchKey(self.width, self.height, self.decoder)

    def images(self, n: int) -> tuple[GenerationRequest, ...]:
        """This request `n` times, image i with seed + i (mod SEED_SPACE)."""
        return tuple(replace(self, seed=(self.seed + i) % SEED_SPACE) for i in range(n))


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

    def decoder_for(self, wanted: Decoder | None) -> Decoder:
        """The decoder a request gets (None: the default); UnsupportedDecoderError naming the choices
        when this model has not that one."""
        chosen = wanted or self.default_decoder
        if chosen not in self.decoders:
            raise UnsupportedDecoderError(
                f"decoder '{chosen.value}' is not available for model {self.name}; choose one of: "
                + ", ".join(d.value for d in self.decoders)
            )
        return chosen
