"""Stage `student`: TiUE distillation of the one-pass student from the frozen, guided teacher.

Variants (`--variant`):
- `vsd_kl` (the paper): SwiftBrush-style variational score distillation against the teacher with
  CFG 4.5, a LoRA fake-score model trained on the student's own samples, plus the KL term on each
  of the T*B noise predictions, -0.5*lambda*(1 + log var - mu^2 - var), lambda = 0.1.
- `vsd`: the same without the KL term (the ablation).
- `regress`: baseline; regress the one-pass z_0 onto the teacher's guided multi-step DDIM output
  from the same noise and prompt.
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from tqdm import tqdm

from engine.distill.common import ema_update, load_checkpoint, need, save_checkpoint, seed_all
from engine.distill.domain import sample_scene, training_caption
from engine.distill.lora import add_lora
from engine.distill.models import LATENT_CHANNELS, LATENT_SIZE, build_scheduler
from engine.distill.onepass import one_pass
from engine.distill.sampling import ddim_sample
from engine.distill.teacher import load_teacher
from engine.distill.text import encode
from engine.distill.tokenizer import load_tokenizer

log = logging.getLogger(__name__)

GUIDANCE = 4.5
KL_LAMBDA = 0.1
VARIANTS = ("vsd_kl", "vsd", "regress")


def kl_term(eps: torch.Tensor, lam: float = KL_LAMBDA) -> torch.Tensor:
    """Mean over the T*B predictions of -0.5*lam*(1 + log var - mu^2 - var), mu/var over (C, H, W).

    It pulls every decoder's noise prediction towards N(0, I) statistics, which keeps the one-pass
    student from collapsing its noise predictions (the paper's regulariser)."""
    flat = eps.reshape(-1, eps[0, 0].numel())
    mu, var = flat.mean(1), flat.var(1, unbiased=False)
    return (-0.5 * lam * (1 + torch.log(var + 1e-8) - mu.pow(2) - var)).mean()


def _prompts(rng: np.random.Generator, n: int) -> list[str]:
    return [training_caption(sample_scene(rng), rng) for _ in range(n)]


@torch.no_grad()
def build_targets(workdir: Path, n: int, seed: int, steps: int = 20, chunk: int = 128) -> dict[str, Any]:
    """The teacher's guided DDIM outputs for n (noise, prompt) pairs; resumable chunk by chunk."""
    path = workdir / "student" / "targets.pt"
    have: dict[str, Any] = load_checkpoint(path) or {"z_t": [], "z_0": [], "prompts": []}
    if len(have["prompts"]) >= n:
        return have
    unet, text_encoder = load_teacher(workdir)
    tokenizer = load_tokenizer(workdir / "tokenizer")
    config = build_scheduler().config
    uncond = encode(text_encoder, tokenizer, [""])
    bar = tqdm(total=n, initial=len(have["prompts"]), desc="targets")
    while len(have["prompts"]) < n:
        k = len(have["prompts"]) // chunk
        rng = np.random.default_rng([seed, 77, k])
        prompts = _prompts(rng, chunk)
        z_t = torch.randn(
            chunk,
            LATENT_CHANNELS,
            LATENT_SIZE,
            LATENT_SIZE,
            generator=torch.Generator().manual_seed(seed * 1_000 + k),
        )
        z_0 = ddim_sample(
            unet, config, z_t, encode(text_encoder, tokenizer, prompts), uncond, steps, GUIDANCE
        )
        have["z_t"].append(z_t)
        have["z_0"].append(z_0)
        have["prompts"].extend(prompts)
        save_checkpoint(path, have)
        bar.update(chunk)
    bar.close()
    return have


def train_student(
    workdir: Path,
    variant: str,
    steps: int,
    batch: int,
    seed: int,
    lr: float | None = None,
    fake_lr: float = 1e-3,
    ema_decay: float = 0.995,
    n_targets: int = 4096,
    minutes: float | None = None,
) -> Path:
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose from {VARIANTS}")
    out = workdir / "student" / variant
    ckpt_path = out / "ckpt.pt"
    seed_all(seed)
    teacher, text_encoder = load_teacher(need(workdir / "teacher" / "unet", "teacher").parent.parent)
    tokenizer = load_tokenizer(workdir / "tokenizer")
    sched = build_scheduler()
    student = copy.deepcopy(teacher).requires_grad_(True).train()
    ema = copy.deepcopy(student).requires_grad_(False)
    denoise = one_pass(student, sched.config, steps=4)
    lr = lr if lr is not None else (1e-4 if variant == "regress" else 5e-5)
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0)
    fake: UNet2DConditionModel | None = None
    fake_opt = None
    if variant != "regress":
        fake = copy.deepcopy(teacher)
        fake_params = add_lora(fake, rank=16, alpha=16.0)
        fake.train()
        fake_opt = torch.optim.AdamW(fake_params, lr=fake_lr, weight_decay=0.0)
    targets = build_targets(workdir, n=n_targets, seed=seed) if variant == "regress" else None
    if targets is not None:
        tz_t, tz_0, tprompts = torch.cat(targets["z_t"]), torch.cat(targets["z_0"]), targets["prompts"]
    step = 0
    if (ck := load_checkpoint(ckpt_path)) is not None:
        student.load_state_dict(ck["student"])
        ema.load_state_dict(ck["ema"])
        opt.load_state_dict(ck["opt"])
        if fake is not None and fake_opt is not None:
            fake.load_state_dict(ck["fake"])
            fake_opt.load_state_dict(ck["fake_opt"])
        step = ck["step"]
    alphas = sched.alphas_cumprod
    with torch.no_grad():
        uncond = encode(text_encoder, tokenizer, [""])
    bar = tqdm(total=steps, initial=step, desc=f"student[{variant}]")
    deadline = time.monotonic() + 60 * minutes if minutes else None
    while step < steps:
        if deadline is not None and time.monotonic() > deadline:
            log.info("time budget of %.0f min reached at step %d", minutes, step)
            break
        rng = np.random.default_rng([seed, 5, step])
        gen = torch.Generator().manual_seed(seed * 104_729 + step)
        if targets is not None:
            idx = torch.from_numpy(rng.integers(0, len(tprompts), batch))
            prompts = [tprompts[int(i)] for i in idx]
            z_t, target = tz_t[idx], tz_0[idx]
        else:
            prompts = _prompts(rng, batch)
            z_t = torch.randn(batch, LATENT_CHANNELS, LATENT_SIZE, LATENT_SIZE, generator=gen)
        with torch.no_grad():
            states = encode(text_encoder, tokenizer, prompts)
        z0, eps = denoise(z_t, states)
        logs: dict[str, float] = {}
        if targets is not None:
            loss = F.mse_loss(z0, target)
        else:
            assert fake is not None
            loss = _vsd_loss(z0, states, uncond, teacher, fake, alphas, gen)
        logs["main"] = float(loss)
        if variant == "vsd_kl":
            kl = kl_term(eps)
            loss = loss + kl
            logs["kl"] = float(kl)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        ema_update(ema, student, min(ema_decay, (1 + step) / (10 + step)))
        if fake is not None and fake_opt is not None:
            logs["fake"] = _fake_step(fake, fake_opt, z0.detach(), states, alphas, gen)
        step += 1
        bar.update(1)
        bar.set_postfix({k: f"{v:.4f}" for k, v in logs.items()})
        if step % 50 == 0 or step == steps or (deadline is not None and time.monotonic() > deadline):
            state = {
                "student": student.state_dict(),
                "ema": ema.state_dict(),
                "opt": opt.state_dict(),
                "step": step,
            }
            if fake is not None and fake_opt is not None:
                state |= {"fake": fake.state_dict(), "fake_opt": fake_opt.state_dict()}
            save_checkpoint(ckpt_path, state)
    bar.close()
    ema.save_pretrained(str(out / "unet"), safe_serialization=True)
    return out / "unet"


def _noised(z0: torch.Tensor, alphas: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    t = torch.randint(20, 980, (z0.shape[0],), generator=gen)
    noise = torch.randn(z0.shape, generator=gen)
    a = alphas[t].view(-1, 1, 1, 1)
    return a.sqrt() * z0 + (1 - a).sqrt() * noise, noise, t, a


def _vsd_loss(
    z0: torch.Tensor,
    states: torch.Tensor,
    uncond: torch.Tensor,
    teacher: UNet2DConditionModel,
    fake: UNet2DConditionModel,
    alphas: torch.Tensor,
    gen: torch.Generator,
) -> torch.Tensor:
    """The VSD gradient (guided teacher score minus fake score) as a surrogate MSE on z_0.

    The score difference is taken in x_0 units and normalised per sample as in DMD, which makes the
    step size independent of t without hand-tuned weights."""
    x_t, _, t, a = _noised(z0.detach(), alphas, gen)
    with torch.no_grad():
        e_c, e_u = teacher(
            torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([states, uncond.expand_as(states)])
        ).sample.chunk(2)
        e_real = e_u + GUIDANCE * (e_c - e_u)
        fake.eval()
        e_fake = fake(x_t, t, states).sample
        fake.train()
        x0_real = (x_t - (1 - a).sqrt() * e_real) / a.sqrt()
        x0_fake = (x_t - (1 - a).sqrt() * e_fake) / a.sqrt()
        weight = (z0.detach() - x0_real).abs().mean(dim=(1, 2, 3), keepdim=True).clamp(min=1e-3)
        grad = (x0_fake - x0_real) / weight
    return 0.5 * F.mse_loss(z0, (z0 - grad).detach())


def _fake_step(
    fake: UNet2DConditionModel,
    opt: torch.optim.Optimizer,
    z0: torch.Tensor,
    states: torch.Tensor,
    alphas: torch.Tensor,
    gen: torch.Generator,
) -> float:
    """The fake score learns the student's current output distribution (plain epsilon loss)."""
    x_t, noise, t, _ = _noised(z0, alphas, gen)
    loss = F.mse_loss(fake(x_t, t, states).sample, noise)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss)
