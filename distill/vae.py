"""Stage `vae`: train the small AutoencoderKL on freshly rendered scenes, then pre-encode a cached,
jittered latent set so the teacher and the student never run the VAE encoder in their loops."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from tqdm import tqdm

from distill.common import load_checkpoint, save_checkpoint, seed_all, to_unit
from distill.domain import label_array, make_dataset
from distill.models import build_vae

log = logging.getLogger(__name__)


def train_vae(
    workdir: Path, steps: int, batch: int, seed: int, lr: float = 2e-3, kl_weight: float = 1e-6
) -> Path:
    out = workdir / "vae"
    ckpt_path = out / "ckpt.pt"
    seed_all(seed)
    vae = build_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    step = 0
    if (ck := load_checkpoint(ckpt_path)) is not None:
        vae.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        step = ck["step"]
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 100) * (0.1 + 0.9 * (1 - s / steps))
    )
    for _ in range(step):
        sched.step()
    bar = tqdm(total=steps, initial=step, desc="vae")
    while step < steps:
        _, images = make_dataset(batch, seed=seed * 1_000_003 + step)
        x = to_unit(images)
        post = vae.encode(x).latent_dist
        # Decode the posterior mean: sampling at the initial unit variance drowns the small latent
        # signal and only taught the decoder blurry averages. The KL term still bounds the means.
        rec = vae.decode(post.mean).sample
        loss = (rec - x).abs().mean() + (rec - x).pow(2).mean() + kl_weight * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % 100 == 0 or step == steps:
            save_checkpoint(ckpt_path, {"model": vae.state_dict(), "opt": opt.state_dict(), "step": step})
    bar.close()
    return ckpt_path


@torch.no_grad()
def encode_cache(workdir: Path, n: int, seed: int, batch: int = 250) -> Path:
    """Encode n jittered scenes; save the latents (posterior means), labels and the scaling factor."""
    vae = build_vae()
    vae.load_state_dict(torch.load(workdir / "vae" / "ckpt.pt", map_location="cpu")["model"])
    vae.eval()
    scenes, images = make_dataset(n, seed=seed + 17)
    means = []
    for i in tqdm(range(0, n, batch), desc="encode"):
        means.append(vae.encode(to_unit(images[i : i + batch])).latent_dist.mean)
    mean = torch.cat(means)
    scaling = float(1.0 / mean.std())
    vae.register_to_config(scaling_factor=scaling)
    vae.save_pretrained(str(workdir / "vae" / "model"), safe_serialization=True)
    path = workdir / "latents.pt"
    save_checkpoint(
        path,
        {
            "mean": mean,
            "labels": torch.from_numpy(label_array(scenes)),
            "scaling_factor": scaling,
        },
    )
    log.info("encoded %d scenes, latent std %.3f -> scaling_factor %.4f", n, float(mean.std()), scaling)
    return path


def load_vae(workdir: Path) -> AutoencoderKL:
    vae = AutoencoderKL.from_pretrained(str(workdir / "vae" / "model"), local_files_only=True)
    vae.eval().requires_grad_(False)
    return vae


def reconstruction_error(vae: AutoencoderKL, n: int = 64, seed: int = 999) -> float:
    _, images = make_dataset(n, seed=seed)
    x = to_unit(images)
    with torch.no_grad():
        rec = vae.decode(vae.encode(x).latent_dist.mean).sample
    return float((rec.clamp(-1, 1) - x).abs().mean() * 127.5)


def finetune_decoder(workdir: Path, steps: int, batch: int, seed: int, lr: float = 5e-4) -> Path:
    """Keep training the decoder with the encoder frozen: the cached latents, the scaling factor and
    everything trained on them stay valid, while decoded images get sharper. Runs beside the teacher."""
    out = workdir / "vae" / "decoder_ckpt.pt"
    vae = load_vae(workdir)
    trainable = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    for p in trainable:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    step = 0
    if (ck := load_checkpoint(out)) is not None:
        vae.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        step = ck["step"]
    vae.decoder.train()
    bar = tqdm(total=steps, initial=step, desc="vae decoder")
    while step < steps:
        _, images = make_dataset(batch, seed=seed * 1_000_033 + 7_777_777 + step)
        x = to_unit(images)
        with torch.no_grad():
            z = vae.encode(x).latent_dist.mean
        rec = vae.decode(z).sample
        loss = (rec - x).abs().mean() + (rec - x).pow(2).mean()
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / 100) * (0.1 + 0.9 * (1 - step / steps))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % 100 == 0 or step == steps:
            save_checkpoint(out, {"model": vae.state_dict(), "opt": opt.state_dict(), "step": step})
    bar.close()
    vae.eval()
    vae.save_pretrained(str(workdir / "vae" / "model"), safe_serialization=True)
    log.info(
        "decoder fine-tuned to step %d; reconstruction error %.2f levels", step, reconstruction_error(vae)
    )
    return workdir / "vae" / "model"
