"""Stage `tiny-decoder`: distil a diffusers `AutoencoderTiny` decoder (TAESD's layout) from the VAE.

Decoder-only: the tiny decoder learns to map the VAE's *scaled* latents (what the denoiser makes;
`scaling_factor` 1.0, as TAESD) to the images the full VAE decodes from them, and to the real
renders they were encoded from. Stage `tiny-eval` judges the shipped model's images through both
decoders side by side.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, AutoencoderTiny
from tqdm import tqdm

from distill.common import load_checkpoint, save_checkpoint, seed_all, to_unit
from distill.domain import make_dataset, sample_scene
from distill.student import edge_weights

log = logging.getLogger(__name__)

SHIPPED_MODEL = Path(__file__).resolve().parent.parent / "engine" / "default_model"
TINY_CHANNELS, TINY_BLOCKS = 24, (3, 3, 1, 0)  # the 64x64 stage: one conv, cheap at full size
NOISE_MAX = 0.1  # latent jitter: the student's latents are near, not on, the encoder's
EDGE_WEIGHT = 3.0  # the error weighted up on the target's edges: a small shape's outline is a few pixels
# The student's own one-pass latents (option `student_latents`): noise seeds from their own range, far
# from every eval split's (`SPLITS[*].noise_base + s`, and the diversity rows' 5000 + s)
STUDENT_NOISE_BASE = 70_000_000
STUDENT_SCENE_SALT = 52_525


def build_tiny_decoder(vae: AutoencoderKL) -> AutoencoderTiny:
    """An AutoencoderTiny whose decoder upsamples by the VAE's factor, on its latent channels. The
    encoder is a minimal placeholder (decoder-only distillation; serving never encodes)."""
    ups = len(vae.config.block_out_channels) - 1
    return AutoencoderTiny(
        latent_channels=int(vae.config.latent_channels),
        encoder_block_out_channels=(8,) * (ups + 1),
        num_encoder_blocks=(1,) * (ups + 1),
        decoder_block_out_channels=(TINY_CHANNELS,) * (ups + 1),
        num_decoder_blocks=TINY_BLOCKS if len(TINY_BLOCKS) == ups + 1 else (1,) * (ups + 1),
        upsampling_scaling_factor=2,
        scaling_factor=1.0,
    )


def teacher_vae(workdir: Path) -> tuple[AutoencoderKL, Path]:
    """The recipe's VAE (`<workdir>/vae/model`), else the shipped model's (the same weights)."""
    folder = workdir / "vae" / "model"
    if not (folder / "config.json").is_file():
        folder = SHIPPED_MODEL / "vae"
        log.info("no %s: distilling from the shipped VAE %s", workdir / "vae" / "model", folder)
    vae = AutoencoderKL.from_pretrained(str(folder), local_files_only=True)
    return vae.eval().requires_grad_(False), folder


def _latent_set(vae: AutoencoderKL, n: int, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """n rendered scenes and their scaled posterior-mean latents (cached in the workdir by the caller)."""
    _, images = make_dataset(n, seed=seed)
    return _latent_set_from(vae, images), images


def student_prompts(n: int, seed: int) -> list[str]:
    """n full captions of training-domain scenes, drawn from their own stream, none of them a prompt of
    an eval split (test, val) or of the diversity rows."""
    from distill.evaluate import SPLITS, diversity_prompts, eval_prompts

    held = set(diversity_prompts())
    for split in SPLITS.values():
        held.update(eval_prompts(split.prompts, split.scene_seed))
    rng = np.random.default_rng(seed * 1_000_037 + STUDENT_SCENE_SALT)
    prompts: list[str] = []
    while len(prompts) < n:
        if (p := sample_scene(rng).caption()) not in held:
            prompts.append(p)
    return prompts


def student_noise_seeds(n: int, seed: int) -> list[int]:
    """The noise seeds of the student latents: `STUDENT_NOISE_BASE` up, never an eval split's."""
    base = STUDENT_NOISE_BASE + seed * 1_000_000
    return list(range(base, base + n))


@torch.no_grad()
def student_latents(model_dir: Path, n: int, seed: int, batch: int = 64) -> torch.Tensor:
    """The shipped student's one-pass z_0 (4 DDIM steps folded, as served and as `tiny-eval` draws
    them) for n training-domain prompts x noise seeds disjoint from the eval splits'."""
    from diffusers import StableDiffusionPipeline

    from distill.onepass import one_pass
    from distill.sampling import initial_noise
    from distill.text import encode

    pipe = StableDiffusionPipeline.from_pretrained(str(model_dir), local_files_only=True, safety_checker=None)
    prompts, seeds = student_prompts(n, seed), student_noise_seeds(n, seed)
    denoise = one_pass(pipe.unet.eval(), pipe.scheduler.config, steps=4)
    return torch.cat(
        [
            denoise(
                initial_noise(seeds[i : i + batch], pipe.unet.config.sample_size),
                encode(pipe.text_encoder, pipe.tokenizer, prompts[i : i + batch]),
            )[0]
            for i in range(0, n, batch)
        ]
    )


def train_tiny_decoder(
    workdir: Path,
    steps: int,
    batch: int,
    seed: int,
    n: int = 8192,
    lr: float = 2e-3,
    real_weight: float = 0.5,
    edge_weight: float = EDGE_WEIGHT,
    n_student: int = 0,
    student_share: float = 0.5,
    student_model: Path = SHIPPED_MODEL,
) -> Path:
    """Train, resumably, and save the decoder as a diffusers folder at `<workdir>/vae_tiny/model`.

    With `n_student` > 0, `student_share` of every batch is the student's own one-pass latents
    (`student_latents` of `student_model`, cached) with the VAE's decodes of them as the only target
    (no real render matches them); the rest is the encoder's latents as without it."""
    out = workdir / "vae_tiny"
    vae, vae_dir = teacher_vae(workdir)
    cache = out / "latents.pt"
    if (data := load_checkpoint(cache)) is None:
        latents, images = _latent_set(vae, n, seed=seed * 1_000_037 + 31_337)
        data = {"latents": latents, "images": torch.from_numpy(images)}
        save_checkpoint(cache, data)
    latents, images = data["latents"], data["images"].numpy()
    n_stu_batch = min(batch - 1, max(1, round(batch * student_share))) if n_student > 0 else 0
    n_enc_batch = batch - n_stu_batch
    stu_latents = torch.empty(0)
    if n_student > 0:
        stu_cache = out / "student_latents.pt"
        stu = load_checkpoint(stu_cache)
        if stu is None or stu["n"] != n_student or stu["seed"] != seed:
            t0 = time.perf_counter()
            stu = {"latents": student_latents(student_model, n_student, seed), "n": n_student, "seed": seed}
            save_checkpoint(stu_cache, stu)
            log.info("%d student latents in %.0f s", n_student, time.perf_counter() - t0)
        stu_latents = stu["latents"]
    gen = seed_all(seed)
    tiny = build_tiny_decoder(vae)
    opt = torch.optim.AdamW(tiny.decoder.parameters(), lr=lr, weight_decay=0.0)
    step, seconds = 0, 0.0
    if (ck := load_checkpoint(out / "ckpt.pt")) is not None:
        tiny.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        step, seconds = ck["step"], ck.get("seconds", 0.0)
        gen.manual_seed(seed + step)
    tiny.decoder.train()
    sf = float(vae.config.scaling_factor)
    bar = tqdm(total=steps, initial=step, desc="tiny decoder")
    started = time.perf_counter() - seconds
    while step < steps:
        idx = torch.randint(0, len(latents), (n_enc_batch,), generator=gen)
        z = latents[idx] + torch.randn(n_enc_batch, 1, 1, 1, generator=gen).abs() * NOISE_MAX * torch.randn(
            latents[idx].shape, generator=gen
        )
        if n_stu_batch:
            z = torch.cat([z, stu_latents[torch.randint(0, len(stu_latents), (n_stu_batch,), generator=gen)]])
        with torch.no_grad():
            target = vae.decode(z / sf).sample.clamp(-1, 1)
        real = to_unit(images[idx.numpy()])
        pred = tiny.decode(z / tiny.config.scaling_factor).sample
        weight = edge_weights(target, edge_weight) if edge_weight > 0 else torch.ones_like(target[:, :1])
        e = n_enc_batch
        loss = _l1_mse(pred, target, weight) + real_weight * _l1_mse(pred[:e], real, weight[:e])
        for g in opt.param_groups:
            g["lr"] = (
                lr * min(1.0, (step + 1) / 50) * (0.05 + 0.95 * 0.5 * (1 + np.cos(np.pi * step / steps)))
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % 100 == 0 or step == steps:
            seconds = time.perf_counter() - started
            save_checkpoint(
                out / "ckpt.pt",
                {"model": tiny.state_dict(), "opt": opt.state_dict(), "step": step, "seconds": seconds},
            )
    bar.close()
    tiny.eval()
    tiny.save_pretrained(str(out / "model"), safe_serialization=True)
    report: dict = {
        "steps": step,
        "train_seconds": round(time.perf_counter() - started, 1),
        "vae": str(vae_dir),
    }
    if n_student:
        report["student_latents"] = {
            "n": n_student,
            "share": n_stu_batch / batch,
            "model": str(student_model),
        }
    report["reconstruction_levels"] = _agreement(vae, tiny)
    (out / "train.json").write_text(json.dumps(report, indent=2))
    log.info("tiny decoder: %s", report)
    return out / "model"


def _l1_mse(a: torch.Tensor, b: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    err = a - b
    return (err.abs() * weight).mean() + (err.pow(2) * weight).mean()


@torch.no_grad()
def _agreement(
    vae: AutoencoderKL, tiny: AutoencoderTiny, n: int = 256, seed: int = 4_242
) -> dict[str, float]:
    """Mean absolute error in 0..255 levels on fresh scenes: tiny vs full decode, and each vs the render."""
    z, images = _latent_set(vae, n, seed=seed)
    full = vae.decode(z / vae.config.scaling_factor).sample.clamp(-1, 1)
    small = tiny.decode(z / tiny.config.scaling_factor).sample.clamp(-1, 1)
    real = to_unit(images)
    return {
        "tiny_vs_full": float((small - full).abs().mean() * 127.5),
        "full_vs_real": float((full - real).abs().mean() * 127.5),
        "tiny_vs_real": float((small - real).abs().mean() * 127.5),
    }


def ship_tiny_decoder(workdir: Path, out: Path) -> Path:
    """Copy the trained decoder into `<out>/vae_tiny` (a pipeline folder), replacing what is there."""
    src = workdir / "vae_tiny" / "model"
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"{src} is missing: run `python -m distill tiny-decoder` first")
    dest = out / "vae_tiny"
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(src, dest)
    drop_unexpected_config(dest / "config.json")
    log.info("shipped the tiny decoder to %s", dest)
    return dest


def drop_unexpected_config(config_path: Path) -> None:
    """AutoencoderTiny records `block_out_channels` (a copy of `decoder_block_out_channels`) in the config it
    saves but warns about it on load; the shipped config leaves it out (the loaded model sets it again)."""
    config = json.loads(config_path.read_text())
    if config.pop("block_out_channels", None) is not None:
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


@torch.no_grad()
def evaluate_tiny_decoder(model_dir: Path, judge_path: Path, workdir: Path, split: str = "test") -> str:
    """The judge table of one shipped model's images through its VAE and through its tiny decoder,
    from the same one-pass latents (and of real renders through each), as markdown."""
    from diffusers import StableDiffusionPipeline

    from distill.evaluate import SPLITS, accuracy, eval_prompts
    from distill.judge import load_judge
    from distill.onepass import one_pass
    from distill.sampling import decode, initial_noise
    from distill.text import encode

    chosen = SPLITS[split]
    judge = load_judge(judge_path)
    pipe = StableDiffusionPipeline.from_pretrained(str(model_dir), local_files_only=True, safety_checker=None)
    tiny = AutoencoderTiny.from_pretrained(str(model_dir / "vae_tiny"), local_files_only=True).eval()
    prompts = eval_prompts(chosen.prompts, chosen.scene_seed)
    flat = [p for p in prompts for _ in range(chosen.seeds)]
    seeds = [chosen.noise_base + s for _ in prompts for s in range(chosen.seeds)]
    denoise = one_pass(pipe.unet.eval(), pipe.scheduler.config, steps=4)
    z0 = torch.cat(
        [
            denoise(
                initial_noise(seeds[i : i + 64], pipe.unet.config.sample_size),
                encode(pipe.text_encoder, pipe.tokenizer, flat[i : i + 64]),
            )[0]
            for i in range(0, len(flat), 64)
        ]
    )
    scenes, images = make_dataset(len(flat), seed=chosen.scene_seed + 3)
    real_z = _latent_set_from(pipe.vae, images)
    captions = [s.caption() for s in scenes]
    rows = {
        "real renders through the VAE": accuracy(judge, decode(pipe.vae, real_z), captions),
        "real renders through the tiny decoder": accuracy(judge, decode(tiny, real_z), captions),
        "shipped student, full VAE decoder": accuracy(judge, decode(pipe.vae, z0), flat),
        "shipped student, tiny decoder": accuracy(judge, decode(tiny, z0), flat),
    }
    cols = list(rows["shipped student, full VAE decoder"])
    lines = ["| images | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    lines += [
        f"| {name} | " + " | ".join(f"{100 * acc[c]:.1f}" for c in cols) + " |" for name, acc in rows.items()
    ]
    full, small = rows["shipped student, full VAE decoder"], rows["shipped student, tiny decoder"]
    lines.append(
        "| tiny − full (student) | " + " | ".join(f"{100 * (small[c] - full[c]):+.1f}" for c in cols) + " |"
    )
    table = "\n".join(lines) + f"\n\nImages per row: {len(flat)} ({split} split).\n"
    out = workdir / "vae_tiny"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"judge{chosen.suffix}.json").write_text(json.dumps(rows, indent=2))
    (out / f"table{chosen.suffix}.md").write_text(table)
    log.info("tiny decoder judge table:\n%s", table)
    return table


@torch.no_grad()
def _latent_set_from(vae: AutoencoderKL, images: np.ndarray, batch: int = 256) -> torch.Tensor:
    sf = float(vae.config.scaling_factor)
    return torch.cat(
        [
            vae.encode(to_unit(images[i : i + batch])).latent_dist.mean * sf
            for i in range(0, len(images), batch)
        ]
    )
