"""Stage `eval`: the judge's attribute accuracy and the seed diversity of every generator on a
fixed set of held-out prompts x seeds, beside the real data; writes results.json and table.md
(`--split val`: results_val.json and table_val.md)."""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import UNet2DConditionModel
from PIL import Image
from tqdm import tqdm

from distill.common import need, to_unit
from distill.domain import (
    ATTRIBUTES,
    CLASSES,
    Scene,
    make_dataset,
    render,
    sample_scene,
    specified,
)
from distill.judge import Judge, heldout_accuracy, load_judge
from distill.models import build_scheduler
from distill.onepass import one_pass
from distill.sampling import ddim_sample, decode, initial_noise
from distill.student import GUIDANCE, VARIANTS
from distill.teacher import load_teacher
from distill.text import encode
from distill.tokenizer import load_tokenizer
from distill.vae import load_vae

log = logging.getLogger(__name__)

EVAL_SEED = 20_250_521  # held out: no training stage draws scenes or noise from it
N_PROMPTS, N_SEEDS = 64, 4
DIVERSITY_PROMPTS, DIVERSITY_SEEDS = 12, 8
Generator = Callable[[list[str], list[int]], np.ndarray]


@dataclass(frozen=True)
class Split:
    """A fixed set of held-out prompts x seeds. `test` makes the table; `val` (other prompts, other
    noise) is for choosing between students, so that the table is not what a choice was tuned on."""

    scene_seed: int
    prompts: int
    seeds: int
    noise_base: int
    suffix: str


SPLITS = {
    "test": Split(EVAL_SEED, N_PROMPTS, N_SEEDS, 1000, ""),
    "val": Split(EVAL_SEED + 77, 256, 2, 9000, "_val"),
}


def eval_prompts(n: int = N_PROMPTS, seed: int = EVAL_SEED) -> list[str]:
    """Full captions (all five attributes pinned) of scenes drawn from a held-out seed."""
    rng = np.random.default_rng(seed)
    return [sample_scene(rng).caption() for _ in range(n)]


def diversity_prompts(n: int = DIVERSITY_PROMPTS) -> list[str]:
    """Short captions (size and position free), so seeds should vary the picture."""
    rng = np.random.default_rng(EVAL_SEED + 1)
    return [sample_scene(rng).caption(keep_size=False, keep_position=False) for _ in range(n)]


def accuracy(judge: Judge, images: np.ndarray, prompts: list[str]) -> dict[str, float]:
    """Share of images whose judged attribute equals the one the prompt asks for."""
    pred = judge.predict(images)
    hits: dict[str, list[bool]] = {a: [] for a in ATTRIBUTES}
    all_ok = []
    for row, prompt in zip(pred, prompts, strict=True):
        want = specified(prompt)
        ok = [CLASSES[a][row[j]] == want[a] for j, a in enumerate(ATTRIBUTES) if a in want]
        for j, a in enumerate(ATTRIBUTES):
            if a in want:
                hits[a].append(CLASSES[a][row[j]] == want[a])
        all_ok.append(all(ok))
    out = {a: float(np.mean(h)) for a, h in hits.items() if h}
    out["all"] = float(np.mean(all_ok))
    return out


@torch.no_grad()
def diversity(judge: Judge, groups: list[np.ndarray]) -> dict[str, float]:
    """Mean pairwise distance between images of one prompt: pixels in [0,1] (RMS) and judge features."""
    pix, feat = [], []
    judge.eval()
    for g in groups:
        x = to_unit(g)
        f = judge.flat[:-1](judge.features(x))  # penultimate features, before dropout
        for i, j in itertools.combinations(range(len(g)), 2):
            pix.append(float(((x[i] - x[j]) / 2).pow(2).mean().sqrt()))
            feat.append(float((f[i] - f[j]).norm() / f.norm(dim=1).mean()))
    return {"pixel": float(np.mean(pix)), "feature": float(np.mean(feat))}


def real_groups(prompts: list[str], n: int, seed: int = EVAL_SEED + 2) -> list[np.ndarray]:
    """Ground-truth images for each caption: its free attributes drawn at random, then jitter."""
    rng = np.random.default_rng(seed)
    groups = []
    for p in prompts:
        want = specified(p)
        imgs = []
        for _ in range(n):
            free = sample_scene(rng)
            scene = Scene(**{a: want.get(a, getattr(free, a)) for a in ATTRIBUTES})
            imgs.append(render(scene, rng))
        groups.append(np.stack(imgs))
    return groups


class Generators:
    """Every model in the table, as prompts x seeds -> uint8 images."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.tokenizer = load_tokenizer(workdir / "tokenizer")
        self.teacher, self.text_encoder = load_teacher(workdir)
        self.vae = load_vae(workdir)
        self.config = build_scheduler().config
        self.uncond = encode(self.text_encoder, self.tokenizer, [""])

    @torch.no_grad()
    def teacher_ddim(self, steps: int, guidance: float = GUIDANCE) -> Generator:
        def gen(prompts: list[str], seeds: list[int]) -> np.ndarray:
            out = []
            for i in range(0, len(prompts), 128):
                cond = encode(self.text_encoder, self.tokenizer, prompts[i : i + 128])
                z = ddim_sample(
                    self.teacher,
                    self.config,
                    initial_noise(seeds[i : i + 128]),
                    cond,
                    self.uncond,
                    steps,
                    guidance,
                )
                out.append(decode(self.vae, z))
            return np.concatenate(out)

        return gen

    def one_pass(self, unet: UNet2DConditionModel) -> Generator:
        denoise = one_pass(unet.eval(), self.config, steps=4)

        @torch.no_grad()
        def gen(prompts: list[str], seeds: list[int]) -> np.ndarray:
            out = []
            for i in range(0, len(prompts), 128):
                cond = encode(self.text_encoder, self.tokenizer, prompts[i : i + 128])
                z0, _ = denoise(initial_noise(seeds[i : i + 128]), cond)
                out.append(decode(self.vae, z0))
            return np.concatenate(out)

        return gen

    def student(self, variant: str) -> UNet2DConditionModel | None:
        path = self.workdir / "student" / variant / "unet"
        if not path.exists():
            return None
        return UNet2DConditionModel.from_pretrained(str(path), local_files_only=True).eval()


def run_eval(workdir: Path, n_prompts: int | None = None, split: str = "test") -> dict:
    """The results table on one split; `n_prompts` below the split's is for smoke runs."""
    chosen = SPLITS[split]
    n_prompts = n_prompts or chosen.prompts
    judge = load_judge(need(workdir / "judge" / "judge.safetensors", "judge"))
    g = Generators(workdir)
    rows: dict[str, Generator] = {
        "teacher, 25-step DDIM, CFG 4.5": g.teacher_ddim(25),
        "teacher, 4-step DDIM, CFG 4.5": g.teacher_ddim(4),
        "teacher, 4-step DDIM, no CFG": g.teacher_ddim(4, guidance=1.0),
        "teacher weights run one-pass (student init)": g.one_pass(g.teacher),
    }
    names = {
        "regress": "TiUE student: regression onto the teacher (latent + image MSE)",
        "vsd_kl": "TiUE student: VSD + KL (paper), from regression, anchored",
        "vsd": "TiUE student: VSD, no KL (ablation), from regression, anchored",
    }
    for v in VARIANTS:
        if (unet := g.student(v)) is not None:
            rows[names[v]] = g.one_pass(unet)
    prompts = eval_prompts(n_prompts, chosen.scene_seed)
    seeds = list(range(chosen.seeds))
    flat_prompts = [p for p in prompts for _ in seeds]
    flat_seeds = [chosen.noise_base + s for _ in prompts for s in seeds]
    div_prompts = diversity_prompts(min(DIVERSITY_PROMPTS, n_prompts))
    div_flat = [p for p in div_prompts for _ in range(DIVERSITY_SEEDS)]
    div_seeds = [5000 + s for _ in div_prompts for s in range(DIVERSITY_SEEDS)]
    real_scenes, real_images = make_dataset(len(flat_prompts), seed=EVAL_SEED + 3)
    results: dict = {
        "judge_heldout_real": heldout_accuracy(judge),
        "n_images": len(flat_prompts),
        "rows": {},
    }
    results["rows"]["real data (ground truth renders)"] = {
        "accuracy": accuracy(judge, real_images, [s.caption() for s in real_scenes]),
        "diversity": diversity(judge, real_groups(div_prompts, DIVERSITY_SEEDS)),
    }
    with torch.no_grad():
        recon = decode(
            g.vae, g.vae.encode(to_unit(real_images)).latent_dist.mean * g.vae.config.scaling_factor
        )
    results["rows"]["real renders through the VAE (upper bound)"] = {
        "accuracy": accuracy(judge, recon, [s.caption() for s in real_scenes]),
        "diversity": {"pixel": float("nan"), "feature": float("nan")},
    }
    out = workdir / "eval"
    out.mkdir(parents=True, exist_ok=True)
    for k, (name, gen) in enumerate(tqdm(rows.items(), desc="eval")):
        images = gen(flat_prompts, flat_seeds)
        cols, per_prompt = min(16, n_prompts), chosen.seeds
        sheet = images[: cols * per_prompt].reshape(cols, per_prompt, 64, 64, 3).transpose(1, 2, 0, 3, 4)
        sheet_path = out / f"samples{chosen.suffix}_{k}.png"
        Image.fromarray(sheet.reshape(per_prompt * 64, cols * 64, 3)).save(sheet_path)
        div_images = gen(div_flat, div_seeds)
        groups = [div_images[i : i + DIVERSITY_SEEDS] for i in range(0, len(div_images), DIVERSITY_SEEDS)]
        results["rows"][name] = {
            "accuracy": accuracy(judge, images, flat_prompts),
            "diversity": diversity(judge, groups),
        }
        log.info("%s: %s", name, results["rows"][name])
    (out / f"results{chosen.suffix}.json").write_text(json.dumps(results, indent=2))
    (out / f"table{chosen.suffix}.md").write_text(markdown_table(results))
    return results


def markdown_table(results: dict) -> str:
    cols = [*ATTRIBUTES, "all"]
    head = "| generator | " + " | ".join(cols) + " | diversity (pixel) | diversity (judge feat.) |"
    lines = [head, "|" + "---|" * (len(cols) + 3)]
    for name, r in results["rows"].items():
        acc = " | ".join(f"{100 * r['accuracy'][c]:.1f}" for c in cols)
        div = " | ".join(
            "—" if np.isnan(v) else f"{v:.3f}" for v in (r["diversity"]["pixel"], r["diversity"]["feature"])
        )
        lines.append(f"| {name} | {acc} | {div} |")
    judge = ", ".join(f"{a} {100 * v:.1f}" for a, v in results["judge_heldout_real"].items())
    lines.append("")
    lines.append(f"Judge accuracy on held-out real renders: {judge}. Images per row: {results['n_images']}.")
    return "\n".join(lines) + "\n"


def probe_teacher(workdir: Path, n: int = 64) -> dict[str, float]:
    """Judge accuracy of the latest teacher checkpoint (25-step DDIM, CFG 4.5), to size training."""
    from distill.teacher import export_teacher

    export_teacher(workdir)
    judge = load_judge(need(workdir / "judge" / "judge.safetensors", "judge"))
    prompts = eval_prompts(n)
    images = Generators(workdir).teacher_ddim(25)(prompts, [1000] * n)
    acc = accuracy(judge, images, prompts)
    log.info("teacher probe: %s", acc)
    return acc
