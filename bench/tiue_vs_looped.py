"""TiUE one-pass vs the same weights run as a looped 4-step student and as 1 step (CPU or GPU).

Random weights at SD-size UNet configs; only the denoiser is timed (text encoder and VAE are the same
for every mode). Modes run interleaved within each repeat so machine noise hits them alike.

    python bench/tiue_vs_looped.py --unet sd21 --size 512 --batches 1 4 --repeats 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import DDIMScheduler, UNet2DConditionModel
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.denoiser import TiUEDenoiser  # noqa: E402
from engine.schedule import DDIMChain  # noqa: E402
from tests.support.tiny_model import SD_SCHEDULER  # noqa: E402

UNETS = {
    # stabilityai/stable-diffusion-2-1-base unet/config.json (the fields that shape compute)
    "sd21": dict(
        block_out_channels=(320, 640, 1280, 1280),
        attention_head_dim=(5, 10, 20, 20),
        use_linear_projection=True,
        cross_attention_dim=1024,
        layers_per_block=2,
        sample_size=64,
    ),
    # runwayml/stable-diffusion-v1-5
    "sd15": dict(
        block_out_channels=(320, 640, 1280, 1280),
        attention_head_dim=8,
        cross_attention_dim=768,
        layers_per_block=2,
        sample_size=64,
    ),
    # a 72M-parameter student-sized UNet, for quick runs
    "mid": dict(
        block_out_channels=(128, 256, 512),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=8,
        cross_attention_dim=768,
        layers_per_block=2,
        sample_size=64,
    ),
}


def build(name: str, device: str, dtype: torch.dtype) -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(**UNETS[name]).to(device, dtype).eval()  # type: ignore[arg-type]


def modes(
    unet: UNet2DConditionModel, steps: int
) -> dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    tiue = TiUEDenoiser(unet, DDIMChain.from_scheduler_config(SD_SCHEDULER, steps))
    scheduler = DDIMScheduler.from_config(SD_SCHEDULER)
    scheduler.set_timesteps(steps)

    def looped(z: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        for t in scheduler.timesteps:
            z = scheduler.step(unet(z, t, states).sample, t, z).prev_sample
        return z

    def one_step(z: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        t = scheduler.timesteps[0]
        return scheduler.step(unet(z, t, states).sample, t, z).pred_original_sample

    return {"tiue one-pass": tiue, f"looped {steps}-step": looped, "1-step": one_step}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--unet", choices=sorted(UNETS), default="sd21")
    ap.add_argument("--size", type=int, default=512, help="image pixels (latent = size/8)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32")
    args = ap.parse_args()
    dtype = torch.float16 if args.dtype == "fp16" else torch.float32
    unet = build(args.unet, args.device, dtype)
    params = sum(p.numel() for p in unet.parameters()) / 1e6
    latent = args.size // 8
    print(
        f"UNet {args.unet} ({params:.0f}M params), {args.size}x{args.size} (latent {latent}), {args.device} {args.dtype}, "
        f"threads {torch.get_num_threads()}, repeats {args.repeats}"
    )
    runs = modes(unet, args.steps)
    looped_name = f"looped {args.steps}-step"
    rows = []
    for batch in args.batches:
        g = torch.Generator().manual_seed(batch)
        z = torch.randn(batch, 4, latent, latent, generator=g).to(args.device, dtype)
        states = torch.randn(batch, 77, unet.config.cross_attention_dim, generator=g).to(args.device, dtype)
        flops = {}
        for name, fn in runs.items():  # the FLOP-counted run doubles as warm-up
            with FlopCounterMode(display=False) as counter:
                fn(z, states)
            flops[name] = counter.get_total_flops()
        times: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(args.repeats):
            for name, fn in runs.items():
                sync(args.device)
                start = time.perf_counter()
                fn(z, states)
                sync(args.device)
                times[name].append(time.perf_counter() - start)
        base = statistics.median(times[looped_name])
        for name in runs:
            t = statistics.median(times[name])
            rows.append(
                (batch, name, t, batch / t, base / t, flops[looped_name] / flops[name], flops[name] / 1e12)
            )
    print(
        f"{'batch':>5}  {'mode':<16} {'s/batch':>8} {'img/s':>7} {'speed-up':>9} {'FLOP ratio':>10} {'TFLOP':>7}"
    )
    for batch, name, t, ips, speedup, flop_ratio, tflop in rows:
        print(
            f"{batch:>5}  {name:<16} {t:>8.2f} {ips:>7.3f} {speedup:>8.2f}x {flop_ratio:>9.2f}x {tflop:>7.2f}"
        )
    print("speed-up and FLOP ratio are against the looped student at the same batch (higher is faster)")


if __name__ == "__main__":
    main()
