"""One contract per exported component: tensor names, dims, dtypes, the module to trace, a sample input
and its profile shapes. The ONNX exporter, the TensorRT builder and both compiled backends read these
and nothing else, so a name or an axis is declared once.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import nn

from engine.denoiser import TiUEDenoiser
from engine.export.profiles import ModelDims, Profile
from engine.graphs import DecoderGraph, TextEncoderGraph
from engine.loading import Components
from engine.types import Decoder, Precision

TEXT_ENCODER, DENOISER, VAE_DECODER = "text_encoder", "denoiser", "vae_decoder"
VAE_DECODER_TINY = "vae_decoder_tiny"  # exported only for a model with a tiny decoder
DECODER_CONTRACTS = {Decoder.FULL: VAE_DECODER, Decoder.TINY: VAE_DECODER_TINY}
EXPORT_PRECISIONS = (Precision.FP32, Precision.FP16)  # what ONNX graphs and TensorRT engines are built in
DYNAMIC_DIMS = frozenset({"batch", "height", "width", "image_height", "image_width"})

Shape = tuple[int, ...]
M = TypeVar("M", bound=nn.Module)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dims: tuple[str, ...]  # names resolved by ModelDims.resolve; those in DYNAMIC_DIMS are dynamic axes
    dtype: str  # "int64", or "compute" for the precision the artefact is built in

    def torch_dtype(self, precision: Precision) -> torch.dtype:
        return torch.int64 if self.dtype == "int64" else precision.torch_dtype

    def shape(self, dims: Mapping[str, int]) -> Shape:
        return tuple(dims[d] for d in self.dims)


def _in_dtype(module: M, dtype: torch.dtype) -> M:
    """The module in `dtype`, copied when it is loaded in another (components stay untouched)."""
    current = next(module.parameters()).dtype
    return module if current == dtype else copy.deepcopy(module).to(dtype)


def _text_encoder(components: Components, precision: Precision) -> nn.Module:
    # Always computed in fp32 (cheap, and transformers' fp16 CLIP mixes fp32 residuals into fp16
    # LayerNorms, which ONNX and TensorRT reject); the states leave in the compute precision.
    return TextEncoderGraph(_in_dtype(components.text_encoder, torch.float32), precision.torch_dtype)


def _denoiser(components: Components, precision: Precision) -> nn.Module:
    components.chain.require_linear("exporting the TiUE denoiser as one graph")
    return TiUEDenoiser(_in_dtype(components.unet, precision.torch_dtype), components.chain)


def _vae_decoder(components: Components, precision: Precision) -> nn.Module:
    return DecoderGraph(_in_dtype(components.vae, precision.torch_dtype))


def _vae_decoder_tiny(components: Components, precision: Precision) -> nn.Module:
    if components.vae_tiny is None:
        raise ValueError(f"model {components.path} has no tiny decoder to export")
    return DecoderGraph(_in_dtype(components.vae_tiny, precision.torch_dtype))


@dataclass(frozen=True)
class ComponentContract:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    sized: bool  # depends on height/width; the text encoder does not, so it needs one profile only
    build_module: Callable[[Components, Precision], nn.Module]

    @property
    def filename(self) -> str:
        return f"{self.name}.onnx"

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {
            t.name: {i: d for i, d in enumerate(t.dims) if d in DYNAMIC_DIMS}
            for t in self.inputs + self.outputs
        }

    def shapes(self, dims: ModelDims, batch: int, height: int, width: int) -> dict[str, Shape]:
        """Shapes of every input and output at one (batch, latent height, latent width)."""
        named = dims.resolve(batch, height, width)
        return {t.name: t.shape(named) for t in self.inputs + self.outputs}

    def profile_shapes(self, dims: ModelDims, profile: Profile) -> dict[str, tuple[Shape, Shape, Shape]]:
        """min/opt/max shape of each input, as TensorRT's optimization profile takes them."""
        per = {w: self.shapes(dims, *profile.dims(w)) for w in ("min", "opt", "max")}
        return {t.name: (per["min"][t.name], per["opt"][t.name], per["max"][t.name]) for t in self.inputs}

    def distinct_profiles(self, profiles: tuple[Profile, ...]) -> tuple[Profile, ...]:
        """The profiles this component needs: the text encoder ignores sizes, so one per batch range."""
        if self.sized:
            return profiles
        seen: dict[tuple[int, int, int], Profile] = {}
        for p in profiles:
            seen.setdefault((p.batch.min, p.batch.opt, p.batch.max), p)
        return tuple(seen.values())

    def sample_inputs(
        self, dims: ModelDims, profile: Profile, precision: Precision, device: torch.device
    ) -> tuple[torch.Tensor, ...]:
        """Inputs to trace with: batch 2 and height != width where the profile allows, so that no
        dynamic axis can be traced as a constant or mistaken for another."""
        batch = min(2, profile.batch.max) if profile.batch.max > 1 else 1
        height = profile.height.opt
        m = dims.latent_multiple
        width = height + m if profile.width.contains(height + m) else height - m
        if not profile.width.contains(width):
            width = profile.width.opt
        shapes = self.shapes(dims, batch, height, width)
        gen = torch.Generator().manual_seed(0)
        out = []
        for t in self.inputs:
            if t.dtype == "int64":
                x = torch.randint(0, 2, shapes[t.name], generator=gen, dtype=torch.int64)
            else:
                x = torch.randn(shapes[t.name], generator=gen).to(precision.torch_dtype)
            out.append(x.to(device))
        return tuple(out)


CONTRACTS: dict[str, ComponentContract] = {
    TEXT_ENCODER: ComponentContract(
        TEXT_ENCODER,
        inputs=(TensorSpec("input_ids", ("batch", "seq_len"), "int64"),),
        outputs=(TensorSpec("states", ("batch", "seq_len", "hidden"), "compute"),),
        sized=False,
        build_module=_text_encoder,
    ),
    DENOISER: ComponentContract(
        DENOISER,
        inputs=(
            TensorSpec("z_t", ("batch", "channels", "height", "width"), "compute"),
            TensorSpec("states", ("batch", "seq_len", "hidden"), "compute"),
        ),
        outputs=(TensorSpec("z_0", ("batch", "channels", "height", "width"), "compute"),),
        sized=True,
        build_module=_denoiser,
    ),
    VAE_DECODER: ComponentContract(
        VAE_DECODER,
        inputs=(TensorSpec("latents", ("batch", "channels", "height", "width"), "compute"),),
        outputs=(TensorSpec("images", ("batch", "rgb", "image_height", "image_width"), "compute"),),
        sized=True,
        build_module=_vae_decoder,
    ),
    VAE_DECODER_TINY: ComponentContract(
        VAE_DECODER_TINY,
        inputs=(TensorSpec("latents", ("batch", "channels", "height", "width"), "compute"),),
        outputs=(TensorSpec("images", ("batch", "rgb", "image_height", "image_width"), "compute"),),
        sized=True,
        build_module=_vae_decoder_tiny,
    ),
}


def contracts_for(components: Components) -> dict[str, ComponentContract]:
    """The components this model exports: all but the tiny decoder when it has none."""
    return {
        name: c
        for name, c in CONTRACTS.items()
        if name != VAE_DECODER_TINY or components.vae_tiny is not None
    }
