"""Small deterministic random-init diffusers pipelines: the fixtures of the test suite and the models
of the CPU benches. Two UNet shapes mirror SD1.5 (one head dim, conv projections) and SD2.1-base
(per-block head dims, linear projections)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderTiny,
    DDIMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from tokenizers import Tokenizer, normalizers, pre_tokenizers, trainers
from tokenizers.models import BPE
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

SD_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "prediction_type": "epsilon",
}

BASE_WORDS = [
    "a",
    "an",
    "the",
    "of",
    "on",
    "in",
    "with",
    "and",
    "at",
    "to",
    "small",
    "large",
    "big",
    "tiny",
    "red",
    "green",
    "blue",
    "yellow",
    "orange",
    "purple",
    "pink",
    "white",
    "black",
    "gray",
    "brown",
    "cyan",
    "circle",
    "square",
    "triangle",
    "star",
    "ring",
    "cross",
    "heart",
    "background",
    "top",
    "bottom",
    "left",
    "right",
    "center",
    "corner",
    "photo",
    "painting",
    "picture",
    "cat",
    "dog",
    "house",
    "tree",
    "sky",
    "sea",
    "mountain",
]

START, END = "<|startoftext|>", "<|endoftext|>"


def word_vocab(words: Iterable[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A CLIP-style byte-level BPE trained on `words`: each is one token, other text falls back to bytes.

    Returns (vocab, merges) in the form CLIPTokenizer takes.
    """
    bpe = Tokenizer(BPE(end_of_word_suffix="</w>", continuing_subword_prefix=""))
    bpe.normalizer = normalizers.Lowercase()
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    word_list = sorted({w.lower() for w in words})
    trainer = trainers.BpeTrainer(
        vocab_size=2 * len(alphabet) + 40 * len(word_list) + 2,
        initial_alphabet=alphabet,
        special_tokens=[START, END],
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    bpe.train_from_iterator(word_list, trainer=trainer)
    model = json.loads(bpe.to_str())["model"]
    vocab: dict[str, int] = dict(model["vocab"])
    for sym in alphabet:  # byte fallbacks at the end of a word
        vocab.setdefault(sym + "</w>", len(vocab))
    return vocab, [tuple(m) for m in model["merges"]]


def make_tokenizer(words: Iterable[str] = BASE_WORDS, max_length: int = 77) -> CLIPTokenizer:
    vocab, merges = word_vocab(words)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length, pad_token=END)


@dataclass(frozen=True)
class PipelineSize:
    """The dimensions of a generated pipeline: tiny for tests, larger presets for CPU benchmarks."""

    unet_channels: tuple[int, ...] = (32, 64)
    text_width: int = 32
    text_layers: int = 2
    vae_channels: tuple[int, ...] = (8, 16, 16, 16)
    image_size: int = 64  # native pixels; the UNet's sample_size is this over the VAE factor
    norm_groups: int = 8


TINY = PipelineSize()
# ~18M-parameter UNet at 128 px (bench/cpu_backends.py)
MID_128 = PipelineSize((64, 128, 256), 256, 4, (32, 64, 64, 64), 128, 16)
# ~40M-parameter UNet at 256 px (bench/load_service.py)
MID_256 = PipelineSize((96, 192, 384), 256, 4, (32, 64, 128, 128), 256, 16)


def tiny_unet(
    shape: str = "sd15", cross_dim: int = 32, channels: tuple[int, ...] = (32, 64), sample_size: int = 8
) -> UNet2DConditionModel:
    sd21 = shape == "sd21"
    levels = len(channels)
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=channels,
        layers_per_block=1 if sd21 else 2,
        down_block_types=("CrossAttnDownBlock2D",) * (levels - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (levels - 1),
        cross_attention_dim=cross_dim,
        attention_head_dim=tuple(max(1, c // 16) for c in channels) if sd21 else 8,
        use_linear_projection=sd21,
        norm_num_groups=8,
    )


def tiny_vae(
    channels: tuple[int, ...] = TINY.vae_channels, image_size: int = 64, groups: int = 8
) -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels),
        block_out_channels=channels,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=groups,
        sample_size=image_size,
    )


def tiny_autoencoder(
    upsamplings: int = 3, latent_channels: int = 4, channels: int = 8, scaling_factor: float = 1.0
) -> AutoencoderTiny:
    """A TAESD-layout AutoencoderTiny decoding by 2**upsamplings (random init, seeded by the caller)."""
    blocks = upsamplings + 1
    return AutoencoderTiny(
        latent_channels=latent_channels,
        encoder_block_out_channels=(channels,) * blocks,
        num_encoder_blocks=(1,) * blocks,
        decoder_block_out_channels=(channels,) * blocks,
        num_decoder_blocks=(1,) * blocks,
        scaling_factor=scaling_factor,
    )


def add_tiny_decoder(model_dir: Path, folder: Path | None = None, seed: int = 1, **kw: float) -> Path:
    """Save an AutoencoderTiny into `<model_dir>/vae_tiny` (or `folder`) matching the model's VAE
    unless `kw` (tiny_autoencoder's arguments) says otherwise; return the folder."""
    vae = json.loads((Path(model_dir) / "vae" / "config.json").read_text())
    args = {
        "upsamplings": len(vae["block_out_channels"]) - 1,
        "latent_channels": vae["latent_channels"],
        **kw,
    }
    torch.manual_seed(seed)
    folder = folder or Path(model_dir) / "vae_tiny"
    tiny_autoencoder(**args).save_pretrained(str(folder), safe_serialization=True)  # type: ignore[arg-type]
    return folder


def build_tiny_pipeline(out_dir: Path, shape: str = "sd15", seed: int = 0, size: PipelineSize = TINY) -> Path:
    """Save a random-init (seeded, so deterministic) SD-layout pipeline folder and return its path."""
    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    tokenizer = make_tokenizer()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=size.text_width,
            intermediate_size=size.text_width * (2 if size.text_width <= 32 else 4),
            num_hidden_layers=size.text_layers,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=tokenizer.convert_tokens_to_ids(START),
            eos_token_id=tokenizer.convert_tokens_to_ids(END),
            pad_token_id=tokenizer.convert_tokens_to_ids(END),
        )
    )
    vae_factor = 2 ** (len(size.vae_channels) - 1)
    pipe = StableDiffusionPipeline(
        vae=tiny_vae(size.vae_channels, size.image_size, size.norm_groups),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=tiny_unet(shape, size.text_width, size.unet_channels, size.image_size // vae_factor),
        scheduler=DDIMScheduler(**SD_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out_dir, safe_serialization=True)
    return out_dir
