"""How to build a pipeline: which model, which backend, on what device, in what precision."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from enum import Enum
from pathlib import Path
from typing import Any

from engine.types import BackendName, Decoder, Precision, SafetyCheck, TorchCompile


class Scope(str, Enum):
    """Which commands read a setting: every command that loads the model (`tiue export` too), those that
    also find or build compiled artefacts (`tiue build-engines`), or only those that run it."""

    MODEL = "model"
    ARTEFACTS = "artefacts"
    RUN = "run"


def setting(
    default: Any = None,
    help: str = "",
    *,
    scope: Scope = Scope.RUN,
    factory: Callable[[], Any] | None = None,
    **bounds: float,
) -> Any:
    """A field of EngineConfig with what the service's settings and the command line derive from it:
    its description, the commands that take it, and bounds (`ge`, `le`) a value must keep."""
    metadata = {"help": help, "scope": scope, "bounds": bounds}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class EngineConfig:
    """The engine's settings, declared once: `service.settings.Settings` reads each from its TIUE_*
    variable and the `tiue` commands make a flag of each (service.cli), with these defaults."""

    model_dir: Path | None = setting(
        None, "a diffusers pipeline folder (unset: the embedded default model)", scope=Scope.MODEL
    )
    backend: BackendName = setting(BackendName.TORCH, "what runs the model", scope=Scope.ARTEFACTS)
    device: str = setting("cpu", "cpu, cuda, cuda:1, ...", scope=Scope.MODEL)
    precision: Precision = setting(Precision.FP32, "weights and activations", scope=Scope.MODEL)
    steps: int = setting(4, "TiUE decoder steps", scope=Scope.MODEL, ge=1, le=50)
    engine_dir: Path | None = setting(
        None, "compiled-artefact cache (unset: the cache root's engines/)", scope=Scope.ARTEFACTS
    )
    cache_dir: Path | None = setting(
        None,
        "root of what the engine generates: engines/, compile/, the file-hash memo (unset: "
        "$XDG_CACHE_HOME/tiue-serve, else ~/.cache/tiue-serve)",
        scope=Scope.MODEL,
    )
    build_engines: bool = setting(
        False, "compiled backends: build missing artefacts at load instead of refusing"
    )
    torch_compile: TorchCompile = setting(
        TorchCompile.AUTO,
        "torch backend: compile the text encoder, denoiser and decoders for each warmed batch size and size "
        "before the server is ready (reduce-overhead: CUDA graphs too; aot: the AOTInductor packages `tiue "
        "build-engines --backend torch` built; auto: on CUDA those packages when usable, else "
        "reduce-overhead, on the CPU off; true/false: default/off). See compile_mode",
    )
    compile_cache_dir: Path | None = setting(
        None,
        "torch.compile's inductor/Triton caches, kept across restarts (unset: the cache root's compile/)",
    )
    warm_batch_sizes: tuple[int, ...] = setting(  # ARTEFACTS: the torch backend builds what is warmed
        (),
        "batch sizes compiled at warm-up, comma-separated; a batch runs padded to the next (unset: on CUDA "
        "1, 2, 4, 8, 16 below max_batch_size, elsewhere the powers of two below it; and max_batch_size)",
        scope=Scope.ARTEFACTS,
    )
    warm_sizes: tuple[tuple[int, int], ...] = setting(
        (),
        "image sizes warmed (compiled) before ready, comma-separated WxH or N (unset: the native size)",
        scope=Scope.ARTEFACTS,
    )
    max_batch_size: int = setting(
        4, "images per engine call; compiled profiles are sized from it", scope=Scope.MODEL, ge=1, le=256
    )
    threads: int = setting(
        help="CPU intra-op threads for torch and onnxruntime (unset: the container's CPU limit, else the "
        "usable CPUs; 0: the library's own default)",
        factory=lambda: available_cpus(),
        ge=0,
        le=256,
    )
    decoder: Decoder = setting(
        Decoder.FULL,
        "the decoder of requests that name none: full (the model's VAE) or tiny (its AutoencoderTiny; "
        "the server fails to start without one)",
        scope=Scope.MODEL,
    )
    tiny_decoder_dir: Path | None = setting(
        None,
        "a diffusers AutoencoderTiny folder to use as the tiny decoder (unset: <model>/vae_tiny when "
        "present); checked against the model's VAE at load",
        scope=Scope.MODEL,
    )
    safety_checker: SafetyCheck = setting(
        SafetyCheck.AUTO,
        "check every image with the model folder's safety_checker/ and withhold flagged ones (auto: when "
        "the folder has one; on: the server fails to start without one; off; engine.safety)",
    )
    prompt_cache_size: int = setting(
        1024,
        "prompts whose text-encoder output is kept (LRU by token ids, engine.prompt_cache; at SD size about "
        "160 KB each on the device); 0: off",
        ge=0,
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "torch_compile", TorchCompile.parse(self.torch_compile))
        outside = sorted(b for b in self.warm_batch_sizes if not 1 <= b <= self.max_batch_size)
        if outside:
            raise ValueError(
                f"warm batch sizes {outside} are outside 1..max_batch_size ({self.max_batch_size}); give "
                "sizes within 1..max_batch_size, or raise max_batch_size"
            )

    @classmethod
    def names(cls, *scopes: Scope) -> tuple[str, ...]:
        """The fields read by commands of these scopes (all fields when none is named), in order."""
        return tuple(f.name for f in fields(cls) if not scopes or f.metadata["scope"] in scopes)

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
