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
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from tqdm import tqdm

from distill.common import ema_update, load_checkpoint, need, save_checkpoint, seed_all
from distill.domain import sample_scene, training_caption
from distill.lora import add_lora
from distill.models import LATENT_CHANNELS, LATENT_SIZE, build_scheduler
from distill.onepass import one_pass
from distill.sampling import ddim_sample
from distill.teacher import load_teacher
from distill.text import encode
from distill.tokenizer import load_tokenizer
from distill.vae import load_vae

log = logging.getLogger(__name__)

GUIDANCE = 4.5
KL_LAMBDA = 0.1
VARIANTS = ("regress", "vsd_kl", "vsd")  # the order `student` runs them: VSD starts from regress


@dataclass(frozen=True)
class Cycle:
    """One learning-rate cycle: linear warm-up, then cosine to zero. A recipe's cycles run one after
    another on the same weights, optimiser state and data stream (warm restarts); the image-regression
    weights may change from one cycle to the next."""

    steps: int
    lr: float
    pixel_weight: float = 0.0
    edge_weight: float = 0.0

    def lr_at(self, i: int) -> float:
        warm = min(1.0, (i + 1) / WARMUP)
        return self.lr * warm * 0.5 * (1 + math.cos(math.pi * min(i, self.steps) / self.steps))


def cycle_at(cycles: Sequence[Cycle], step: int) -> tuple[Cycle, int]:
    """The cycle a global step falls in, and the step within that cycle."""
    for cycle in cycles:
        if step < cycle.steps:
            return cycle, step
        step -= cycle.steps
    return cycles[-1], cycles[-1].steps


@dataclass(frozen=True)
class Recipe:
    """A variant's defaults in `python -m distill student`. The flags --steps, --lr,
    --pixel-weight and --edge-weight replace the cycles with one cycle; the other flags replace the
    field of the same name."""

    cycles: tuple[Cycle, ...]
    batch: int
    init: str = "teacher"
    reg_weight: float = 0.0
    fake_warmup: int = 0
    fake_updates: int = 1

    @property
    def steps(self) -> int:
        return sum(c.steps for c in self.cycles)


# The one-pass student at teacher init is poor (the shared encoder must be learnt), and VSD from there
# did not converge on this CPU budget; so VSD fine-tunes the regression student, DMD-style: regression
# anchor, the fake score warmed up on the starting student and updated twice per student step.
_VSD = Recipe(
    cycles=(Cycle(2000, 5e-5),), batch=16, init="regress", reg_weight=1.0, fake_warmup=400, fake_updates=2
)
# The shipped regression student's chain (docs/distill.md): latent MSE, then the decoded-image term,
# then two warm restarts: the image term weighted up, then weighted up on the targets' edges (small
# shapes' outlines, where the student's remaining shape errors were).
_REGRESS = Recipe(
    cycles=(
        Cycle(2600, 1e-4),
        Cycle(1200, 1e-4, pixel_weight=2.0),
        Cycle(1400, 4e-5, pixel_weight=8.0),
        Cycle(4000, 6e-5, pixel_weight=2.0, edge_weight=3.0),
    ),
    batch=32,
)
RECIPES = {"regress": _REGRESS, "vsd_kl": _VSD, "vsd": _VSD}
WARMUP = 100  # learning-rate warm-up steps
WARMUP_DRAWS = 10_000_000  # the fake-score warm-up draws its batches from step numbers training never reaches


def edge_weights(images: torch.Tensor, strength: float) -> torch.Tensor:
    """Per-pixel loss weights, (B, 1, H, W): 1 + strength x the image's gradient magnitude, scaled
    so each image's edges carry the same total weight whatever the size of its shape."""
    dx = (images[..., :, 1:] - images[..., :, :-1]).abs().mean(1, keepdim=True)
    dy = (images[..., 1:, :] - images[..., :-1, :]).abs().mean(1, keepdim=True)
    grad = F.pad(dx, (0, 1, 0, 0)) + F.pad(dy, (0, 0, 0, 1))
    return 1.0 + strength * grad / grad.mean(dim=(2, 3), keepdim=True).clamp_min(1e-6)


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
    cycles: Sequence[Cycle],
    batch: int,
    seed: int,
    fake_lr: float = 1e-3,
    ema_decay: float = 0.995,
    n_targets: int = 4096,
    minutes: float | None = None,
    init: str = "teacher",
    reg_weight: float = 0.0,
    fake_warmup: int = 0,
    fake_updates: int = 1,
) -> Path:
    """Train one variant; `init` is where the student starts: the teacher's weights, or another
    variant's exported student (e.g. VSD fine-tuning the regression student). `reg_weight` > 0 adds
    DMD's regression anchor to the VSD variants: the same one-pass output also regressed onto the
    teacher's multi-step target for its (noise, prompt), weighted by reg_weight. The fake score takes
    `fake_warmup` steps on the initial student's samples before the student moves (a student that
    starts near the guided teacher would otherwise be pushed by fake = unguided teacher, i.e. guided
    twice), then `fake_updates` steps per student step (DMD2's two time-scale rule).
    Each cycle sets the learning rate and the regression's weights: `pixel_weight` > 0 adds the error
    on decoded images (through the frozen VAE decoder), as DMD regresses in image space, since latent
    MSE under-weights the small hue shifts that change a colour; `edge_weight` > 0 weights that error
    up on the target's edges (`edge_weights`), since a small shape's outline is a few pixels of a 64x64
    image, yet it is what tells a circle from a square."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose from {VARIANTS}")
    if init != "teacher" and (init not in VARIANTS or init == variant):
        raise ValueError(f"init must be 'teacher' or another variant than {variant!r}, got {init!r}")
    out = workdir / "student" / variant
    ckpt_path = out / "ckpt.pt"
    seed_all(seed)
    teacher, text_encoder = load_teacher(need(workdir / "teacher" / "unet", "teacher").parent.parent)
    tokenizer = load_tokenizer(workdir / "tokenizer")
    sched = build_scheduler()
    student = copy.deepcopy(teacher).requires_grad_(True).train()
    if init != "teacher":
        start = need(workdir / "student" / init / "unet", f"student --variant {init}")
        student.load_state_dict(UNet2DConditionModel.from_pretrained(start).state_dict())
        log.info("student[%s] starts from %s", variant, start)
    ema = copy.deepcopy(student).requires_grad_(False)
    denoise = one_pass(student, sched.config, steps=4)
    steps = sum(c.steps for c in cycles)  # --minutes may cut it short
    opt = torch.optim.AdamW(student.parameters(), lr=cycles[0].lr, weight_decay=0.0)
    fake: UNet2DConditionModel | None = None
    fake_opt = None
    if variant != "regress":
        fake = copy.deepcopy(teacher)
        fake_params = add_lora(fake, rank=16, alpha=16.0)
        fake.train()
        fake_opt = torch.optim.AdamW(fake_params, lr=fake_lr, weight_decay=0.0)
    use_targets = variant == "regress" or reg_weight > 0
    vae = load_vae(workdir) if any(c.pixel_weight > 0 for c in cycles) else None

    def regression(z0: torch.Tensor, target: torch.Tensor, cycle: Cycle) -> torch.Tensor:
        loss = F.mse_loss(z0, target)
        if vae is not None and cycle.pixel_weight > 0:
            scale = 1.0 / vae.config.scaling_factor
            with torch.no_grad():
                want = vae.decode(target * scale).sample
            err = (vae.decode(z0 * scale).sample - want).square()
            if cycle.edge_weight > 0:
                err = err * edge_weights(want, cycle.edge_weight)
            loss = loss + cycle.pixel_weight * err.mean()
        return loss

    targets = build_targets(workdir, n=n_targets, seed=seed) if use_targets else None
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

    def draw(step: int) -> tuple[list[str], torch.Tensor, torch.Tensor | None, torch.Generator]:
        """The step's prompts and noise (from the target pool when one is used), and its generator."""
        rng = np.random.default_rng([seed, 5, step])
        gen = torch.Generator().manual_seed(seed * 104_729 + step)
        if targets is not None:
            idx = torch.from_numpy(rng.integers(0, len(tprompts), batch))
            return [tprompts[int(i)] for i in idx], tz_t[idx], tz_0[idx], gen
        z_t = torch.randn(batch, LATENT_CHANNELS, LATENT_SIZE, LATENT_SIZE, generator=gen)
        return _prompts(rng, batch), z_t, None, gen

    if fake is not None and fake_opt is not None and step == 0 and fake_warmup > 0:
        for k in tqdm(range(fake_warmup), desc="fake score warm-up"):
            prompts, z_t, _, gen = draw(WARMUP_DRAWS + k)
            with torch.no_grad():
                states = encode(text_encoder, tokenizer, prompts)
                z0 = denoise(z_t, states)[0]
            _fake_step(fake, fake_opt, z0, states, alphas, gen)
    bar = tqdm(total=steps, initial=step, desc=f"student[{variant}]")
    deadline = time.monotonic() + 60 * minutes if minutes else None
    while step < steps:
        if deadline is not None and time.monotonic() > deadline:
            log.info("time budget of %.0f min reached at step %d", minutes, step)
            break
        cycle, local = cycle_at(cycles, step)
        for group in opt.param_groups:
            group["lr"] = cycle.lr_at(local)
        prompts, z_t, target, gen = draw(step)
        with torch.no_grad():
            states = encode(text_encoder, tokenizer, prompts)
        z0, eps = denoise(z_t, states)
        logs: dict[str, float] = {}
        if variant == "regress":
            assert target is not None
            loss = regression(z0, target, cycle)
        else:
            assert fake is not None
            loss = _vsd_loss(z0, states, uncond, teacher, fake, alphas, gen)
        logs["main"] = loss.item()
        if variant != "regress" and reg_weight > 0:
            assert target is not None
            reg = regression(z0, target, cycle)
            loss = loss + reg_weight * reg
            logs["reg"] = reg.item()
        if variant == "vsd_kl":
            kl = kl_term(eps)
            loss = loss + kl
            logs["kl"] = kl.item()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        ema_update(ema, student, min(ema_decay, (1 + step) / (10 + step)))
        if fake is not None and fake_opt is not None:
            for _ in range(fake_updates):
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
    return loss.item()
