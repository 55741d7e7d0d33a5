"""Stage `judge`: an independent attribute classifier, trained only on ground-truth renders.

It never sees a generated image; blur, noise and colour-shift augmentation stand in for the
softness of decoded latents. Its weights ship beside the model for the CI agreement test.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from distill.common import load_checkpoint, save_checkpoint, seed_all, to_unit
from distill.domain import ATTRIBUTES, CLASSES, label_array, make_dataset

log = logging.getLogger(__name__)


class Judge(nn.Module):
    """A small CNN with one softmax head per attribute."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        w = width

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2),
            )  # fmt: skip

        stem = nn.Sequential(nn.Conv2d(3, w, 3, stride=2, padding=1), nn.BatchNorm2d(w), nn.ReLU())
        self.features = nn.Sequential(stem, block(w, w), block(w, 2 * w), block(2 * w, 4 * w))
        self.flat = nn.Sequential(nn.Flatten(), nn.Linear(4 * w * 16, 256), nn.ReLU(), nn.Dropout(0.2))
        self.heads = nn.ModuleDict({a: nn.Linear(256, len(CLASSES[a])) for a in ATTRIBUTES})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.flat(self.features(x))
        return {a: head(h) for a, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, images_uint8: np.ndarray, batch: int = 256) -> np.ndarray:
        """uint8 [N, 64, 64, 3] -> labels [N, len(ATTRIBUTES)]."""
        self.eval()
        out = []
        for i in range(0, len(images_uint8), batch):
            logits = self(to_unit(images_uint8[i : i + batch]))
            out.append(torch.stack([logits[a].argmax(1) for a in ATTRIBUTES], 1))
        return torch.cat(out).numpy()


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    n = x.shape[0]
    sigma = torch.rand(n, generator=gen) * 1.2
    k = torch.arange(-2, 3, dtype=torch.float32)
    kern = torch.exp(-(k[None] ** 2) / (2 * sigma[:, None].clamp(min=1e-3) ** 2))
    kern = kern / kern.sum(1, keepdim=True)
    xs = x.reshape(1, n * 3, 64, 64)
    kx = kern.repeat_interleave(3, 0)[:, None, None, :]
    ky = kern.repeat_interleave(3, 0)[:, None, :, None]
    xs = F.conv2d(F.pad(xs, (2, 2, 0, 0), mode="replicate"), kx, groups=n * 3)
    xs = F.conv2d(F.pad(xs, (0, 0, 2, 2), mode="replicate"), ky, groups=n * 3)
    x = xs.reshape(n, 3, 64, 64)
    x = x + 0.06 * torch.rand(n, 1, 1, 1, generator=gen) * torch.randn(x.shape, generator=gen)
    x = x + 0.05 * torch.randn(n, 3, 1, 1, generator=gen)
    return x.clamp(-1, 1)


def train_judge(workdir: Path, steps: int, batch: int, seed: int, lr: float = 2e-3) -> Path:
    ckpt_path = workdir / "judge" / "ckpt.pt"
    seed_all(seed)
    model = Judge()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    step = 0
    if (ck := load_checkpoint(ckpt_path)) is not None:
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        step = ck["step"]
    bar = tqdm(total=steps, initial=step, desc="judge")
    model.train()
    while step < steps:
        scenes, images = make_dataset(batch, seed=10_000_019 * (seed + 1) + step)
        gen = torch.Generator().manual_seed(seed * 31 + step)
        x = _augment(to_unit(images), gen)
        y = torch.from_numpy(label_array(scenes))
        logits = model(x)
        loss = torch.stack([F.cross_entropy(logits[a], y[:, j]) for j, a in enumerate(ATTRIBUTES)]).sum()
        for g in opt.param_groups:
            g["lr"] = lr * 0.5 * (1 + np.cos(np.pi * step / steps))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % 200 == 0 or step == steps:
            save_checkpoint(ckpt_path, {"model": model.state_dict(), "opt": opt.state_dict(), "step": step})
    bar.close()
    out = workdir / "judge" / "judge.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out))
    acc = heldout_accuracy(model)
    log.info("judge held-out accuracy on real images: %s", acc)
    return out


def load_judge(path: Path) -> Judge:
    model = Judge()
    model.load_state_dict(load_file(str(path)))
    return model.eval()


def heldout_accuracy(model: Judge, n: int = 2000, seed: int = 424_242) -> dict[str, float]:
    """Accuracy per attribute on fresh real renders (a seed no training batch uses)."""
    scenes, images = make_dataset(n, seed=seed)
    pred = model.predict(images)
    y = label_array(scenes)
    return {a: float((pred[:, j] == y[:, j]).mean()) for j, a in enumerate(ATTRIBUTES)}
