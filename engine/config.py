"""How to build a pipeline: which model, which backend, on what device, in what precision."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from engine.types import BackendName, Decoder, Precision, SafetyCheck, TorchCompile


@dataclass(frozen=True)
class EngineConfig:
    model_dir: Path | None = None  # None: the embedded default model
    backend: BackendName = BackendName.TORCH
    device: str = "cpu"
    precision: Precision = Precision.FP32
    steps: int = 4
    engine_dir: Path | None = None  # cache of compiled artefacts (ONNX graphs, TensorRT engines)
    build_engines: bool = False  # compiled backends: build a missing engine at load instead of failing
    torch_compile: TorchCompile = TorchCompile.AUTO  # torch backend: see compile_mode
    compile_cache_dir: Path | None = None  # inductor/Triton caches; None: the cache root's compile/
    warm_batch_sizes: tuple[int, ...] = ()  # compiled batch buckets; (): powers of two and the maximum
    warm_sizes: tuple[tuple[int, int], ...] = ()  # (width, height) warmed; (): the native size
    max_batch_size: int = 8  # images per denoiser call; compiled profiles are sized from it
    threads: int = 0  # CPU intra-op threads for torch and onnxruntime; 0 keeps the library default
    decoder: Decoder = Decoder.FULL  # the decoder of requests that name none
    tiny_decoder_dir: Path | None = None  # an AutoencoderTiny folder; None: <model>/vae_tiny when present
    safety_checker: SafetyCheck = SafetyCheck.AUTO  # the model folder's safety_checker/ (engine.safety)
    prompt_cache_size: int = 1024  # text encoder outputs kept, LRU by token ids (engine.prompt_cache); 0: off

    def __post_init__(self) -> None:
        if isinstance(self.torch_compile, bool):  # the old boolean: true is the default mode
            mode = TorchCompile.DEFAULT if self.torch_compile else TorchCompile.OFF
            object.__setattr__(self, "torch_compile", mode)

    @property
    def on_cuda(self) -> bool:
        return self.device.split(":")[0].strip().lower() == "cuda"

    @property
    def compile_mode(self) -> TorchCompile:
        """What `torch_compile` means on this device: auto is CUDA graphs (reduce-overhead) on CUDA and off
        on the CPU. aot stays aot: whether built packages are found is decided at load
        (engine.export.torch_aot.resolve), which also makes auto on CUDA prefer them."""
        if self.torch_compile is TorchCompile.AUTO:
            return TorchCompile.REDUCE_OVERHEAD if self.on_cuda else TorchCompile.OFF
        return self.torch_compile

    @property
    def compiles(self) -> bool:
        """The torch backend compiles with static shapes: batches run padded to `batch_buckets()`."""
        return BackendName(self.backend) is BackendName.TORCH and self.compile_mode is not TorchCompile.OFF

    def batch_buckets(self) -> tuple[int, ...]:
        """The batch sizes compiled at warm-up, ascending (empty when nothing compiles); a batch runs padded
        up to the next one, so no request meets a shape that was not compiled. Default: on CUDA 1, 2, 4, 8
        and 16 (what a GPU serves well), elsewhere the powers of two below max_batch_size; and
        max_batch_size."""
        if not self.compiles:
            return ()
        top = 16 if self.on_cuda else self.max_batch_size - 1
        sizes = set(self.warm_batch_sizes) or {
            2**i for i in range(16) if 2**i < self.max_batch_size and 2**i <= top
        }
        outside = sorted(b for b in sizes if not 1 <= b <= self.max_batch_size)
        if outside:
            raise ValueError(
                f"warm batch sizes {outside} are outside 1..max_batch_size ({self.max_batch_size})"
            )
        return tuple(sorted(sizes | {self.max_batch_size}))


def available_cpus(cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """CPUs this process may use: its container's CPU limit (cgroup v2 `cpu.max` or v1 CFS quota),
    else the CPUs it may run on. One intra-op thread per usable CPU and no more: OpenMP threads that
    outnumber the CPUs spin-wait against each other, and a request takes many times longer."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    quota = _cgroup_quota(cgroup)
    return max(1, min(cpus, math.floor(quota)) if quota is not None else cpus)


def _cgroup_quota(root: Path) -> float | None:
    try:
        limit, period = (root / "cpu.max").read_text().split()[:2]
        return None if limit == "max" else int(limit) / int(period)
    except (OSError, ValueError):
        pass
    return _cgroup_v1_quota(root)


def _cgroup_v1_quota(root: Path) -> float | None:
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None
