"""The engine end to end on a CUDA GPU, through the code the service runs (`load_pipeline`):

1. the shipped default model on cuda (fp32, fp16, bf16) against the CPU fp32 reference: pixel
   differences and the judge's colour/shape accuracy on held-out (prompt, seed) pairs;
2. an SD2.1-base-sized pipeline (random weights: 865M UNet, 23-layer 1024-wide CLIP text encoder,
   SD VAE), 512x512, fp16: per-stage milliseconds at batch 1/4/8, eager and torch.compile.

Run it through bench/gpu_check.sh (which brings diffusers along), or with diffusers installed:
    python bench/gpu_pipeline.py --out gpu_pipeline.md [--budget-s 240]
`--smoke` runs both sections on the CPU with small models, to check the script without a GPU.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.config import EngineConfig  # noqa: E402
from engine.pipeline import TiUEPipeline, load_pipeline  # noqa: E402
from engine.types import GenerationRequest, Precision, TorchCompile  # noqa: E402

SD21_TEXT = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 23, "heads": 16}
SD_VAE_CHANNELS = (128, 256, 512, 512)
SMOKE_TEXT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "heads": 4}
SMOKE_VAE_CHANNELS = (8, 16, 16, 16)


class Report:
    def __init__(self, out: Path | None):
        self.out, self.lines = out, []

    def __call__(self, line: str = "") -> None:
        print(line, flush=True)
        self.lines.append(line)
        if self.out is not None:
            self.out.write_text("\n".join(self.lines) + "\n")


def default_model(report: Report, n_prompts: int, device: str) -> None:
    from distill.evaluate import accuracy, eval_prompts
    from distill.judge import load_judge
    from distill.ship import JUDGE_PATH

    prompts = eval_prompts(n_prompts)
    requests = [GenerationRequest(p, s, 64, 64) for p in prompts for s in (0, 1)]
    judge = load_judge(JUDGE_PATH)

    def images(device: str, precision: Precision) -> np.ndarray:
        config = EngineConfig(
            device=device, precision=precision, max_batch_size=64, torch_compile=TorchCompile.OFF
        )
        pipe = load_pipeline(config)
        return np.stack([im.pixels for im in pipe.generate(requests).images])

    reference = images("cpu", Precision.FP32)
    report("## The shipped default model on the GPU vs the CPU (fp32) reference")
    report(f"{len(requests)} held-out (prompt, seed) pairs, 64x64, through `load_pipeline`.")
    report()
    report("| device / precision | max abs uint8 diff | mean abs diff | judge shape | judge colour |")
    report("|---|---|---|---|---|")
    rows = [("cpu", Precision.FP32), (device, Precision.FP32)]
    rows += [(device, Precision.FP16), (device, Precision.BF16)] if device != "cpu" else []
    for name, precision in rows:
        got = reference if name == "cpu" else images(name, precision)
        diff = np.abs(got.astype(np.int16) - reference.astype(np.int16))
        acc = accuracy(judge, got, [r.prompt for r in requests])
        report(
            f"| {name} {precision.value} | {diff.max()} | {diff.mean():.3f} | "
            f"{100 * acc['shape']:.1f} | {100 * acc['color']:.1f} |"
        )


def build_sd21_sized(out: Path, device: str, smoke: bool) -> Path:
    """A random-weight pipeline folder with SD2.1-base's component sizes (tiny ones for --smoke)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from bench.gpu_check import SD21_BASE_UNET, SMOKE_UNET
    from tests.support.tiny_model import END, SD_SCHEDULER, START, make_tokenizer

    text = SMOKE_TEXT if smoke else SD21_TEXT
    tokenizer = make_tokenizer()
    with torch.device(device):
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=text["hidden_size"],
                intermediate_size=text["intermediate_size"],
                num_hidden_layers=text["num_hidden_layers"],
                num_attention_heads=text["heads"],
                hidden_act="gelu",
                max_position_embeddings=77,
                bos_token_id=tokenizer.convert_tokens_to_ids(START),
                eos_token_id=tokenizer.convert_tokens_to_ids(END),
                pad_token_id=tokenizer.convert_tokens_to_ids(END),
            )
        )
        unet = UNet2DConditionModel(**(SMOKE_UNET if smoke else SD21_BASE_UNET))
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=SMOKE_VAE_CHANNELS if smoke else SD_VAE_CHANNELS,
            layers_per_block=2,
            latent_channels=4,
            norm_num_groups=8 if smoke else 32,
            sample_size=64 if smoke else 512,
        )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler(**SD_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.to(torch.float32 if smoke else torch.float16).save_pretrained(out, safe_serialization=True)
    return out


def time_batches(pipe: TiUEPipeline, batches: list[int], iters: int) -> list[dict[str, float]]:
    rows = []
    size = pipe.info.default_size
    for batch in batches:
        requests = [GenerationRequest(f"a photo number {i}", i, size, size) for i in range(batch)]
        for _ in range(2):
            pipe.generate(requests)
        runs = []
        for _ in range(iters):
            started = time.perf_counter()
            result = pipe.generate(requests)
            runs.append({"total": time.perf_counter() - started, **result.timings})
        row = {k: statistics.median(r[k] for r in runs) * 1e3 for k in runs[0]}
        rows.append({"batch": batch, **row})
    return rows


def sd_sized(report: Report, batches: list[int], iters: int, deadline: float, device: str) -> None:
    smoke = device == "cpu"
    precision = Precision.FP32 if smoke else Precision.FP16
    report()
    what = "small models, fp32 (--smoke)" if smoke else "512x512, fp16 (random weights)"
    report(f"## SD2.1-base-sized pipeline through `load_pipeline` on {device}: {what}")
    report()
    report("| mode | batch | text ms | denoise ms | VAE decode ms | total ms | images/s | note |")
    report("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="tiue-sd21-") as work:
        started = time.monotonic()
        folder = build_sd21_sized(Path(work) / "sd21", device, smoke)
        note = f"built+saved {time.monotonic() - started:.0f}s"
        for compiled in (False, True):
            if compiled and deadline - time.monotonic() < 330:  # SD-size warm-up took > 230 s on an H100
                report("| torch.compile | - | - | - | - | - | - | skipped: too little time left |")
                continue
            started = time.monotonic()
            pipe = load_pipeline(
                EngineConfig(
                    folder,
                    device=device,
                    precision=precision,
                    torch_compile=TorchCompile.DEFAULT if compiled else TorchCompile.OFF,
                    prompt_cache_size=0,  # the text encoder's time is measured, not skipped
                )
            )
            loaded = time.monotonic() - started
            started = time.monotonic()
            pipe.warmup()
            warm = time.monotonic() - started
            note += f"; load {loaded:.0f}s, first image {warm:.0f}s"
            for row in time_batches(pipe, batches, iters):
                b = int(row["batch"])
                report(
                    f"| {'torch.compile' if compiled else 'eager'} | {b} | {row['text_encode']:.1f} | "
                    f"{row['denoise']:.1f} | {row['vae_decode']:.1f} | {row['total']:.1f} | "
                    f"{b / row['total'] * 1e3:.1f} | {note} |"
                )
                note = ""
            del pipe
            if not smoke:
                mem = torch.cuda.max_memory_allocated() / 2**30
                report(
                    f"| {'torch.compile' if compiled else 'eager'} | peak GPU memory {mem:.1f} GiB | | | | | | |"
                )
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batches", default="1,4,8")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--prompts", type=int, default=32, help="default-model check: held-out prompts")
    parser.add_argument("--budget-s", type=float, default=240.0)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--smoke", action="store_true", help="small models on the CPU: checks the script")
    args = parser.parse_args()
    if not args.smoke and not torch.cuda.is_available():
        sys.stderr.write("no CUDA GPU visible to torch (--smoke checks the script on the CPU)\n")
        return 2
    device = "cpu" if args.smoke else "cuda"
    deadline = time.monotonic() + args.budget_s
    report = Report(args.out)
    report(f"{torch.cuda.get_device_name() if device == 'cuda' else 'CPU'}; torch {torch.__version__}")
    report()
    torch.backends.cudnn.benchmark = True
    for name, section in (
        ("default model", lambda: default_model(report, args.prompts, device)),
        (
            "sd-sized",
            lambda: sd_sized(report, [int(b) for b in args.batches.split(",")], args.iters, deadline, device),
        ),
    ):
        try:
            section()
        except Exception as exc:  # one failing section must not hide the other's numbers
            import traceback

            traceback.print_exc()
            report(f"\n- {name}: FAILED {type(exc).__name__}: {str(exc)[:300]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
