"""The GPU comparison in one go: TiUE one-pass vs a looped 4-step student, on eager torch fp16,
torch.compile, ONNX Runtime CUDA and TensorRT (each where it can run here), at SD2.1-base UNet size
(random weights), 512x512 (64x64 latent), batch 1/4/8. Prints one table; budgeted to finish in
under 10 minutes on one H100 (sections that would overrun are skipped and say so).

Run it through bench/gpu_check.sh, which brings diffusers along offline. --smoke runs a tiny UNet on
whatever device there is, to check the script itself without a GPU.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import torch
from diffusers import DDIMScheduler, UNet2DConditionModel
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.denoiser import TiUEDenoiser  # noqa: E402
from engine.export.contracts import CONTRACTS, DENOISER, ComponentContract, TensorSpec  # noqa: E402
from engine.export.onnx_export import export_component  # noqa: E402
from engine.export.profiles import ModelDims, Profile, Range  # noqa: E402
from engine.loading import Components  # noqa: E402
from engine.schedule import DDIMChain  # noqa: E402
from engine.types import Precision  # noqa: E402
from tests.support.tiny_model import SD_SCHEDULER  # noqa: E402

log = logging.getLogger("gpu_check")

SD21_BASE_UNET: dict[str, Any] = {  # stabilityai/stable-diffusion-2-1-base unet/config.json
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "attention_head_dim": (5, 10, 20, 20),
    "use_linear_projection": True,
    "cross_attention_dim": 1024,
}
SMOKE_UNET: dict[str, Any] = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    "attention_head_dim": (2, 4),
    "use_linear_projection": True,
    "cross_attention_dim": 32,
    "norm_num_groups": 8,
}
STEPS = 4
SEQ_LEN = 77


@dataclass
class Row:
    backend: str
    batch: int
    tiue_ms: float | None = None
    looped_ms: float | None = None
    max_diff: float | None = None  # TiUE z_0 against eager torch
    note: str = ""


@dataclass
class Check:
    device: torch.device
    dtype: torch.dtype
    unet: UNet2DConditionModel
    chain: DDIMChain
    batches: list[int]
    latent: int
    iters: int
    deadline: float
    work: Path
    out: Path | None = None
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    reference: dict[int, torch.Tensor] = field(default_factory=dict)

    def add(self, row: Row) -> None:
        """Record and print a row at once, so a run cut short still leaves its numbers."""
        self.rows.append(row)
        sys.stdout.write(table(self, [row]).splitlines()[-1] + "\n")
        self.save()

    def note(self, text: str) -> None:
        self.notes.append(text)
        sys.stdout.write(f"- {text}\n")
        self.save()

    def save(self) -> None:
        if self.out is not None:
            self.out.write_text(report(self) + "\n")

    def inputs(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(batch)
        z_t = torch.randn(batch, 4, self.latent, self.latent, generator=gen)
        states = torch.randn(batch, SEQ_LEN, int(self.unet.config.cross_attention_dim), generator=gen)
        return z_t.to(self.device, self.dtype), states.to(self.device, self.dtype)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def timed(self, fn: Callable[[], Any]) -> float:
        """Median milliseconds of `iters` calls after warm-up (CUDA events on a GPU)."""
        for _ in range(2):
            fn()
        _sync(self.device)
        times = []
        for _ in range(self.iters):
            if self.device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                started = time.perf_counter()
                fn()
                times.append((time.perf_counter() - started) * 1e3)
        return statistics.median(times)

    def diff(self, batch: int, z_0: torch.Tensor) -> float:
        return float((z_0.float() - self.reference[batch].float()).abs().max())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Looped(nn.Module):
    """The baseline: a 4-step DDIM (eta 0) student, one full UNet call per step."""

    def __init__(self, unet: nn.Module, scheduler_config: dict[str, Any], steps: int):
        super().__init__()
        self.unet = unet
        scheduler = DDIMScheduler.from_config(scheduler_config)
        scheduler.set_timesteps(steps)
        self.timesteps = [int(t) for t in scheduler.timesteps]
        alphas = scheduler.alphas_cumprod.double()
        stride = scheduler.config.num_train_timesteps // steps
        self.coefs = []
        for t in self.timesteps:
            a = float(alphas[t])
            prev = float(alphas[t - stride]) if t - stride >= 0 else float(scheduler.final_alpha_cumprod)
            c = (prev / a) ** 0.5
            self.coefs.append((c, (1 - prev) ** 0.5 - c * (1 - a) ** 0.5))

    def forward(self, z: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        for t, (c, d) in zip(self.timesteps, self.coefs, strict=True):
            eps = self.unet(z, t, encoder_hidden_states=states).sample
            z = c * z + d * eps
        return z


def run_eager(check: Check) -> None:
    denoiser, looped = TiUEDenoiser(check.unet, check.chain), Looped(check.unet, SD_SCHEDULER, STEPS)
    with torch.inference_mode():
        for batch in check.batches:
            z_t, states = check.inputs(batch)
            check.reference[batch] = denoiser(z_t, states)
            if not torch.isfinite(check.reference[batch]).all():
                check.note(f"eager z_0 at batch {batch} is not finite (random weights in {check.dtype})")
            tiue = check.timed(lambda: denoiser(z_t, states))  # noqa: B023
            loop = check.timed(lambda: looped(z_t, states))  # noqa: B023
            check.add(Row("torch eager", batch, tiue, loop, 0.0))


def run_compile(check: Check) -> None:
    """torch.compile (inductor, default mode): batch marked dynamic, so one graph serves 4 and 8."""
    denoiser = torch.compile(TiUEDenoiser(check.unet, check.chain))
    looped = Looped(cast(nn.Module, torch.compile(check.unet)), SD_SCHEDULER, STEPS)
    order = sorted(check.batches, key=lambda b: (b == 1, b))
    expected = 90.0  # seconds a first call (compilation) may take; updated from what we see
    with torch.inference_mode():
        for batch in order:
            if check.left() < 1.3 * expected:
                check.add(
                    Row("torch.compile", batch, note=f"skipped: a compile (~{expected:.0f}s) would overrun")
                )
                continue
            z_t, states = check.inputs(batch)
            if batch > 1:
                torch._dynamo.mark_dynamic(z_t, 0)
                torch._dynamo.mark_dynamic(states, 0)
            started = time.monotonic()
            z_0 = denoiser(z_t, states)
            looped(z_t, states)
            _sync(check.device)
            warm = time.monotonic() - started
            expected = max(expected, warm)
            tiue = check.timed(lambda: denoiser(z_t, states))  # noqa: B023
            loop = check.timed(lambda: looped(z_t, states))  # noqa: B023
            check.add(
                Row("torch.compile", batch, tiue, loop, check.diff(batch, z_0), f"first call {warm:.0f}s")
            )


# -- ONNX ------------------------------------------------------------------------------------------


class UNetStep(nn.Module):
    """One UNet call as a graph, for the looped baseline on the compiled backends."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, z: torch.Tensor, timestep: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        return self.unet(z, timestep, encoder_hidden_states=states).sample


UNET_STEP = ComponentContract(
    "unet_step",
    inputs=(
        TensorSpec("z", ("batch", "channels", "height", "width"), "compute"),
        TensorSpec("timestep", ("one",), "int64"),
        TensorSpec("states", ("batch", "seq_len", "hidden"), "compute"),
    ),
    outputs=(TensorSpec("eps", ("batch", "channels", "height", "width"), "compute"),),
    sized=True,
    build_module=lambda c, p: UNetStep(c.unet),
)


def stand_in(check: Check) -> tuple[Components, ModelDims, Profile]:
    """What the exporter reads from a pipeline, for a bare UNet (no text encoder or VAE here)."""
    hidden = int(check.unet.config.cross_attention_dim)
    components = SimpleNamespace(
        unet=check.unet,
        chain=check.chain,
        tokenizer=SimpleNamespace(model_max_length=SEQ_LEN),
        text_encoder=SimpleNamespace(config=SimpleNamespace(hidden_size=hidden)),
        vae=SimpleNamespace(config=SimpleNamespace(block_out_channels=(1, 2, 3, 4))),
    )
    levels = len(check.unet.config.block_out_channels)
    dims = ModelDims(SEQ_LEN, hidden, 4, 8, 2 ** (levels - 1), check.latent)
    size = Range(check.latent, check.latent, check.latent)
    profile = Profile(Range(1, min(4, max(check.batches)), max(check.batches)), size, size)
    return cast(Components, components), dims, profile


def export(check: Check, contract: ComponentContract) -> tuple[Path, float]:
    components, _, profile = stand_in(check)
    out = check.work / contract.name
    out.mkdir(exist_ok=True)
    started = time.monotonic()
    precision = Precision.FP16 if check.dtype == torch.float16 else Precision.FP32
    if contract is UNET_STEP:
        sample = (*check.inputs(2)[:1], torch.tensor([999], device=check.device), check.inputs(2)[1])
        with torch.no_grad():
            torch.onnx.export(
                UNetStep(check.unet),
                sample,
                str(out / contract.filename),
                input_names=contract.input_names,
                output_names=contract.output_names,
                dynamic_axes=contract.dynamic_axes(),  # type: ignore[arg-type]
                opset_version=18,
                dynamo=False,
            )
    else:
        export_component(contract, components, precision, (profile,), out)
    return out / contract.filename, time.monotonic() - started


def run_onnxruntime(check: Check) -> None:
    import numpy as np
    import onnxruntime as ort

    cuda = check.device.type == "cuda"
    provider = "CUDAExecutionProvider" if cuda else "CPUExecutionProvider"
    if provider not in ort.get_available_providers():
        check.note(f"onnxruntime {ort.__version__}: no {provider} ({ort.get_available_providers()}); skipped")
        return
    np_dtype = {torch.float16: np.float16, torch.float32: np.float32, torch.int64: np.int64}
    options = ort.SessionOptions()
    options.log_severity_level = 3

    def session(path: Path) -> Any:
        return ort.InferenceSession(
            str(path), options, providers=list(dict.fromkeys([provider, "CPUExecutionProvider"]))
        )

    def runner(sess: Any, feeds: dict[str, torch.Tensor], out: torch.Tensor) -> Callable[[], torch.Tensor]:
        binding = sess.io_binding()
        kind = "cuda" if cuda else "cpu"
        for name, t in feeds.items():
            binding.bind_input(name, kind, 0, np_dtype[t.dtype], tuple(t.shape), t.data_ptr())
        binding.bind_output(
            sess.get_outputs()[0].name, kind, 0, np_dtype[out.dtype], tuple(out.shape), out.data_ptr()
        )

        def run() -> torch.Tensor:
            _sync(check.device)  # onnxruntime works on its own stream; torch's writes must land first
            sess.run_with_iobinding(binding)
            return out

        return run

    path, seconds = export(check, CONTRACTS[DENOISER])
    tiue_sess = session(path)
    check.note(f"onnxruntime: TiUE graph exported in {seconds:.0f}s")
    step_sess = None
    if check.left() > 150:
        step_path, seconds = export(check, UNET_STEP)
        step_sess = session(step_path)
        check.note(f"onnxruntime: UNet step graph exported in {seconds:.0f}s")
    looped = Looped(check.unet, SD_SCHEDULER, STEPS)
    for batch in check.batches:
        z_t, states = check.inputs(batch)
        out = torch.empty_like(z_t)
        tiue_run = runner(tiue_sess, {"z_t": z_t, "states": states}, out)
        _sync(check.device)
        z_0 = tiue_run().clone()
        tiue = check.timed(tiue_run)
        loop = None
        if step_sess is not None:
            z, eps = torch.empty_like(z_t), torch.empty_like(z_t)
            steps = [
                runner(
                    step_sess,
                    {"z": z, "timestep": torch.tensor([t], device=check.device), "states": states},
                    eps,
                )
                for t in looped.timesteps
            ]

            def loop_run() -> torch.Tensor:
                z.copy_(z_t)  # noqa: B023
                for run, (c, d) in zip(steps, looped.coefs, strict=True):  # noqa: B023
                    run()
                    z.mul_(c).add_(eps, alpha=d)  # noqa: B023
                return z  # noqa: B023

            loop = check.timed(loop_run)
        check.add(Row(f"onnxruntime {provider[:-17]}", batch, tiue, loop, check.diff(batch, z_0)))


# -- TensorRT --------------------------------------------------------------------------------------


def run_tensorrt(check: Check) -> None:
    try:
        import tensorrt as trt
    except ImportError as exc:
        check.note(f"tensorrt not importable ({exc}); skipped")
        return
    if check.device.type != "cuda":
        check.note("tensorrt needs a GPU; skipped")
        return
    from engine.backends.tensorrt_backend import _EngineRunner
    from engine.backends.tensorrt_runtime import make_logger
    from engine.export.tensorrt_build import build_engine

    components, dims, profile = stand_in(check)
    precision = Precision.FP16 if check.dtype == torch.float16 else Precision.FP32
    path = check.work / DENOISER / CONTRACTS[DENOISER].filename
    if not path.exists():
        path, _ = export(check, CONTRACTS[DENOISER])
    if check.left() < 240:
        check.note("tensorrt: skipped, too little time left to build an SD-size engine")
        return
    started = time.monotonic()
    plan, _ = build_engine(trt, path, CONTRACTS[DENOISER], dims, (profile,), precision)
    check.note(f"tensorrt {trt.__version__}: TiUE engine built in {time.monotonic() - started:.0f}s")
    stream = torch.cuda.Stream(check.device)
    runner = _EngineRunner(
        trt, trt.Runtime(make_logger(trt)), plan, CONTRACTS[DENOISER], check.device, stream
    )
    for batch in check.batches:
        z_t, states = check.inputs(batch)
        feeds = {"z_t": z_t, "states": states}
        z_0 = runner(feeds)
        tiue = check.timed(lambda: runner(feeds))  # noqa: B023
        graphs = "CUDA graph" if runner.graphs else "no CUDA graph"
        check.add(Row(f"tensorrt {trt.__version__}", batch, tiue, None, check.diff(batch, z_0), graphs))


# -- report ----------------------------------------------------------------------------------------


def table(check: Check, rows: list[Row] | None = None) -> str:
    def ms(v: float | None) -> str:
        return f"{v:.1f}" if v is not None else "-"

    lines = [
        "| backend | batch | TiUE one-pass ms | looped 4-step ms | looped/TiUE | TiUE img/s | max abs diff vs eager | note |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in check.rows if rows is None else rows:
        ratio = f"{r.looped_ms / r.tiue_ms:.2f}x" if r.tiue_ms and r.looped_ms else "-"
        rate = f"{r.batch / r.tiue_ms * 1e3:.1f}" if r.tiue_ms else "-"
        diff = f"{r.max_diff:.2e}" if r.max_diff is not None else "-"
        lines.append(
            f"| {r.backend} | {r.batch} | {ms(r.tiue_ms)} | {ms(r.looped_ms)} | {ratio} | {rate} | {diff} | {r.note} |"
        )
    return "\n".join(lines)


def environment(check: Check) -> str:
    import diffusers

    parts = [f"torch {torch.__version__}", f"diffusers {diffusers.__version__}"]
    if check.device.type == "cuda":
        parts.insert(0, torch.cuda.get_device_name(check.device))
    try:
        import onnxruntime

        parts.append(f"onnxruntime {onnxruntime.__version__} {onnxruntime.get_available_providers()}")
    except ImportError:
        parts.append("no onnxruntime")
    params = sum(p.numel() for p in check.unet.parameters()) / 1e6
    parts.append(f"UNet {params:.0f}M params, {check.dtype}, latent {check.latent}x{check.latent}")
    return "; ".join(parts)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="tiny UNet, to check the script without a GPU")
    parser.add_argument("--batches", default="1,4,8")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument(
        "--budget-s", type=float, default=480.0, help="start nothing that would end after this many seconds"
    )
    parser.add_argument("--skip", default="", help="comma list of: compile, onnxruntime, tensorrt")
    parser.add_argument("--out", type=Path, default=None, help="also write the table (markdown) here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    started = time.monotonic()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.smoke:
        sys.stderr.write("no CUDA GPU: run with --smoke to check the script on the CPU\n")
        return 2
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    if device.type == "cpu":
        torch.set_num_threads(1)  # a smoke run checks the script; one thread keeps shared CPUs usable
    torch.manual_seed(0)
    config = SMOKE_UNET if args.smoke else SD21_BASE_UNET
    with torch.device(device):  # initialising 865M random weights on the GPU, not the CPU, saves ~15 s
        unet = UNet2DConditionModel(**config)
    unet = unet.to(device, dtype).eval().requires_grad_(False)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        unet.to(memory_format=torch.channels_last)
    with tempfile.TemporaryDirectory(prefix="tiue-gpu-check-") as work:
        check = Check(
            device=device,
            dtype=dtype,
            unet=unet,
            chain=DDIMChain.from_scheduler_config(SD_SCHEDULER, STEPS),
            batches=[int(b) for b in args.batches.split(",")],
            latent=int(config["sample_size"]),
            iters=args.iters,
            deadline=started + args.budget_s,
            work=Path(work),
            out=args.out,
        )
        sys.stdout.write(environment(check) + "\n" + table(check) + "\n")
        sections = [("eager", run_eager), ("compile", run_compile), ("onnxruntime", run_onnxruntime)]
        sections.append(("tensorrt", run_tensorrt))
        for name, section in sections:
            if name in args.skip.split(","):
                check.note(f"{name}: skipped (--skip)")
                continue
            if name != "eager" and check.left() < 60:
                check.note(f"{name}: skipped, time budget spent")
                continue
            section_started = time.monotonic()
            try:
                section(check)
            except Exception as exc:  # a broken backend must not hide the others' numbers
                check.note(f"{name}: FAILED {type(exc).__name__}: {str(exc)[:300]}")
                traceback.print_exc()
            log.warning("%s took %.0fs", name, time.monotonic() - section_started)
    check.note(f"total {time.monotonic() - started:.0f}s")
    sys.stdout.write("\n" + report(check) + "\n")
    return 0


def report(check: Check) -> str:
    return "\n".join([environment(check), "", table(check), "", *[f"- {n}" for n in check.notes]])


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
