"""Shape ranges a compiled artefact serves: batch and latent height/width, min/opt/max.

Everything here is in latent pixels (what the graphs see); the CLI converts from image pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the CLI parses ranges without importing torch
    from engine.loading import Components


@dataclass(frozen=True)
class Range:
    """An inclusive range with the value to tune for (TensorRT's min/opt/max)."""

    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        if not 1 <= self.min <= self.opt <= self.max:
            raise ValueError(f"a range needs 1 <= min <= opt <= max, got {self}")

    def __str__(self) -> str:
        return f"{self.min}:{self.opt}:{self.max}"

    def contains(self, value: int) -> bool:
        return self.min <= value <= self.max

    def get(self, which: str) -> int:
        return {"min": self.min, "opt": self.opt, "max": self.max}[which]

    @classmethod
    def parse(cls, text: str) -> Range:
        """'MIN:OPT:MAX', 'MIN:MAX' (opt = max) or 'N' (static)."""
        try:
            parts = [int(p) for p in text.split(":")]
        except ValueError:
            raise ValueError(f"expected MIN:OPT:MAX, MIN:MAX or N (integers), got {text!r}") from None
        if len(parts) == 1:
            return cls(parts[0], parts[0], parts[0])
        if len(parts) == 2:
            return cls(parts[0], parts[1], parts[1])
        if len(parts) == 3:
            return cls(*parts)
        raise ValueError(f"expected MIN:OPT:MAX, MIN:MAX or N, got {text!r}")


@dataclass(frozen=True)
class Profile:
    """One optimization profile: the batch and latent height/width a graph or engine is built for."""

    batch: Range
    height: Range
    width: Range

    def covers(self, batch: int, height: int, width: int) -> bool:
        return self.batch.contains(batch) and self.height.contains(height) and self.width.contains(width)

    def dims(self, which: str) -> tuple[int, int, int]:
        """(batch, height, width) at 'min', 'opt' or 'max'."""
        return self.batch.get(which), self.height.get(which), self.width.get(which)

    def describe(self, vae_scale: int) -> str:
        def px(r: Range) -> str:
            return f"{r.min * vae_scale}..{r.max * vae_scale}"

        return f"batch {self.batch.min}..{self.batch.max}, height {px(self.height)} px, width {px(self.width)} px"

    def to_dict(self) -> dict[str, list[int]]:
        return {
            k: [r.min, r.opt, r.max]
            for k, r in (("batch", self.batch), ("height", self.height), ("width", self.width))
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Profile:
        return cls(Range(*data["batch"]), Range(*data["height"]), Range(*data["width"]))


@dataclass(frozen=True)
class ModelDims:
    """The fixed sizes of one checkpoint that shape its graphs."""

    seq_len: int  # tokenizer window, including BOS/EOS
    hidden: int  # text encoder width == UNet cross-attention width
    latent_channels: int
    vae_scale: int  # image pixels per latent pixel
    latent_multiple: int  # latent height/width must be multiples of this (UNet downsampling)
    default_latent: int  # the UNet's native sample size

    @classmethod
    def from_components(cls, components: Components) -> ModelDims:
        from engine.loading import vae_scale  # deferred: the CLI parses ranges without importing torch

        unet = components.unet.config
        return cls(
            seq_len=int(components.tokenizer.model_max_length),
            hidden=int(components.text_encoder.config.hidden_size),
            latent_channels=int(unet.in_channels),
            vae_scale=vae_scale(components.vae),
            latent_multiple=2 ** (len(unet.block_out_channels) - 1),
            default_latent=int(unet.sample_size),
        )

    @property
    def size_multiple(self) -> int:
        """Image width and height must be multiples of this many pixels."""
        return self.vae_scale * self.latent_multiple

    @property
    def default_size(self) -> int:
        """The model's native image side, in pixels."""
        return self.default_latent * self.vae_scale

    def resolve(self, batch: int, height: int, width: int) -> dict[str, int]:
        """Every named dimension a contract may use."""
        return {
            "batch": batch,
            "height": height,
            "width": width,
            "seq_len": self.seq_len,
            "hidden": self.hidden,
            "channels": self.latent_channels,
            "rgb": 3,
            "image_height": height * self.vae_scale,
            "image_width": width * self.vae_scale,
        }

    def check(self, profile: Profile) -> None:
        """Refuse ranges the UNet cannot serve at all (bounds off its downsampling multiple)."""
        m = self.latent_multiple
        for name, r in (("height", profile.height), ("width", profile.width)):
            bad = [v for v in (r.min, r.opt, r.max) if v % m]
            if bad:
                raise ValueError(
                    f"latent {name} range {r} has values that are not multiples of {m} "
                    f"(image sizes must be multiples of {m * self.vae_scale} px)"
                )


def default_batch(max_batch_size: int) -> Range:
    return Range(1, min(4, max_batch_size), max_batch_size)


def default_profiles(dims: ModelDims, max_batch_size: int) -> tuple[Profile, ...]:
    """Half to one and a half times the native size, tuned for the native size (512 px SD: 256..768)."""
    m, native = dims.latent_multiple, dims.default_latent
    low = max(m, (native // 2) // m * m)
    high = max(native, -(-native * 3 // 2) // m * m)
    sizes = Range(low, native, high)
    return (Profile(default_batch(max_batch_size), sizes, sizes),)


def pixel_range(text: str, dims: ModelDims) -> Range:
    """A size spec in image pixels ('MIN:OPT:MAX' or 'N') as a latent range; sizes must fit the UNet."""
    r = Range.parse(text)
    step = dims.vae_scale * dims.latent_multiple
    bad = [v for v in (r.min, r.opt, r.max) if v % step]
    if bad:
        raise ValueError(f"image sizes must be multiples of {step} px, got {bad} in {text!r}")
    return Range(r.min // dims.vae_scale, r.opt // dims.vae_scale, r.max // dims.vae_scale)


def profiles_from_specs(
    size_specs: list[str] | None, batch: Range | None, dims: ModelDims, max_batch_size: int
) -> tuple[Profile, ...]:
    """One profile per size spec, in image pixels: 'RANGE' (both sides) or 'WIDTHxHEIGHT' ranges, like the API's "WxH".
    Without `batch`, batches up to `max_batch_size`: the profile the server with that setting looks for."""
    batch = batch or default_batch(max_batch_size)
    if not size_specs:
        return tuple(Profile(batch, p.height, p.width) for p in default_profiles(dims, batch.max))
    profiles = []
    for spec in size_specs:
        w_text, _, h_text = spec.lower().partition("x")
        width = pixel_range(w_text, dims)
        height = pixel_range(h_text, dims) if h_text else width
        profiles.append(Profile(batch, height, width))
    return tuple(profiles)


def outside_profiles(
    profiles: tuple[Profile, ...], vae_scale: int, batch: int, height: int, width: int
) -> str | None:
    """Why no profile serves (batch, latent height, latent width), in image pixels; None if one does."""
    if any(p.covers(batch, height, width) for p in profiles):
        return None
    served = "; ".join(p.describe(vae_scale) for p in profiles)
    return (
        f"batch {batch} at {width * vae_scale}x{height * vae_scale} px is outside the compiled profiles "
        f"({served}); export or build engines for a wider range"
    )
