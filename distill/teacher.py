"""Stage `teacher`: the teacher UNet and the text encoder, trained jointly from scratch on the cached
latents with the epsilon loss (min-SNR weighted), ~10% prompt dropout for guidance, and EMA."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import numpy as np
import torch
from diffusers import UNet2DConditionModel
from tqdm import tqdm
from transformers import CLIPTextModel

from distill.common import ema_update, load_checkpoint, need, save_checkpoint, seed_all
from distill.domain import scene_from_labels, training_caption
from distill.models import build_scheduler, build_text_encoder, build_unet
from distill.text import token_ids
from distill.tokenizer import load_tokenizer

log = logging.getLogger(__name__)

PROMPT_DROPOUT = 0.1
MIN_SNR_GAMMA = 5.0


class LatentSet:
    """The pre-encoded scenes (jittered renders, so a caption has many latents), scaled like SD's."""

    def __init__(self, workdir: Path) -> None:
        d = torch.load(need(workdir / "latents.pt", "vae"), map_location="cpu")
        self.mean, self.labels = d["mean"], d["labels"].numpy()
        self.scaling = float(d["scaling_factor"])

    def __len__(self) -> int:
        return len(self.labels)

    def batch(
        self, idx: np.ndarray, rng: np.random.Generator, dropout: float
    ) -> tuple[torch.Tensor, list[str]]:
        i = torch.from_numpy(idx)
        z = self.mean[i] * self.scaling
        prompts = [
            "" if rng.random() < dropout else training_caption(scene_from_labels(self.labels[k]), rng)
            for k in idx
        ]
        return z, prompts


def train_teacher(
    workdir: Path, steps: int, batch: int, seed: int, lr: float = 3e-4, ema_decay: float = 0.999
) -> None:
    out = workdir / "teacher"
    ckpt_path = out / "ckpt.pt"
    seed_all(seed)
    tokenizer = load_tokenizer(need(workdir / "tokenizer", "data"))
    data = LatentSet(workdir)
    unet, text_encoder = build_unet(), build_text_encoder(tokenizer)
    ema_unet, ema_text = (
        copy.deepcopy(unet).requires_grad_(False),
        copy.deepcopy(text_encoder).requires_grad_(False),
    )
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    step = 0
    if (ck := load_checkpoint(ckpt_path)) is not None:
        unet.load_state_dict(ck["unet"])
        text_encoder.load_state_dict(ck["text"])
        ema_unet.load_state_dict(ck["ema_unet"])
        ema_text.load_state_dict(ck["ema_text"])
        opt.load_state_dict(ck["opt"])
        step = ck["step"]
    scheduler = build_scheduler()
    alphas = scheduler.alphas_cumprod
    snr = alphas / (1 - alphas)
    weight = torch.clamp(snr, max=MIN_SNR_GAMMA) / snr

    def lr_at(s: int) -> float:
        return lr * min(1.0, (s + 1) / 300) * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * min(s, steps) / steps)))

    bar = tqdm(total=steps, initial=step, desc="teacher")
    while step < steps:
        rng = np.random.default_rng([seed, step])
        gen = torch.Generator().manual_seed(seed * 7_919 + step)
        idx = rng.integers(0, len(data), batch)
        z0, prompts = data.batch(idx, rng, PROMPT_DROPOUT)
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=gen)
        zt = scheduler.add_noise(z0, noise, t)
        states = text_encoder(token_ids(tokenizer, prompts)).last_hidden_state
        eps = unet(zt, t, states).sample
        loss = (weight[t] * (eps - noise).pow(2).mean(dim=(1, 2, 3))).mean()
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(ema_decay, (1 + step) / (10 + step))
        ema_update(ema_unet, unet, decay)
        ema_update(ema_text, text_encoder, decay)
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % 250 == 0 or step == steps:
            save_checkpoint(
                ckpt_path,
                {
                    "unet": unet.state_dict(),
                    "text": text_encoder.state_dict(),
                    "ema_unet": ema_unet.state_dict(),
                    "ema_text": ema_text.state_dict(),
                    "opt": opt.state_dict(),
                    "step": step,
                },
            )
    bar.close()
    export_teacher(workdir)


def export_teacher(workdir: Path) -> None:
    """Write the EMA weights of the latest checkpoint as diffusers/transformers folders."""
    ck = torch.load(need(workdir / "teacher" / "ckpt.pt", "teacher"), map_location="cpu", weights_only=False)
    tokenizer = load_tokenizer(workdir / "tokenizer")
    unet, text_encoder = build_unet(), build_text_encoder(tokenizer)
    unet.load_state_dict(ck["ema_unet"])
    text_encoder.load_state_dict(ck["ema_text"])
    unet.save_pretrained(str(workdir / "teacher" / "unet"), safe_serialization=True)
    text_encoder.save_pretrained(str(workdir / "teacher" / "text_encoder"), safe_serialization=True)
    log.info("exported teacher EMA weights at step %d", ck["step"])


def load_teacher(workdir: Path) -> tuple[UNet2DConditionModel, CLIPTextModel]:
    unet = UNet2DConditionModel.from_pretrained(str(workdir / "teacher" / "unet"), local_files_only=True)
    text_encoder = CLIPTextModel.from_pretrained(
        str(workdir / "teacher" / "text_encoder"), local_files_only=True
    )
    return unet.eval().requires_grad_(False), text_encoder.eval().requires_grad_(False)
