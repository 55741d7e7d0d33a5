"""torch.compile for serving: static shapes compiled at warm-up, kept on disk, never compiled on a request.

The torch backend compiles its modules with `compile_module`; the pipeline warms every batch bucket
and size (engine.pipeline.TiUEPipeline.warmup), then serves inside `serving()`, where a shape that was
not warmed runs eagerly instead of compiling. Inductor's and Triton's caches live in the compile cache
folder (`EngineConfig.compile_cache_dir`), and torch's portable "mega-cache" blob beside them, so a
restarted pod warms from disk.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from engine.config import EngineConfig
from engine.loading import cache_root
from engine.types import TorchCompile

log = logging.getLogger(__name__)

_MODES = {
    TorchCompile.DEFAULT: None,
    TorchCompile.MAX_AUTOTUNE: "max-autotune",
    TorchCompile.REDUCE_OVERHEAD: "reduce-overhead",
}


def cache_dir(config: EngineConfig) -> Path:
    return config.compile_cache_dir or cache_root() / "compile"


def warm_passes(mode: TorchCompile) -> int:
    """Calls per bucket at warm-up: CUDA graph trees run a shape eagerly once, record it on the second
    call and replay from the third, so reduce-overhead needs three for requests to meet replays only;
    built packages capture their graph on the first call (engine.cuda_graphs) and replay on the second."""
    return {TorchCompile.REDUCE_OVERHEAD: 3, TorchCompile.AOT: 2}.get(mode, 1)


def prepare(config: EngineConfig) -> None:
    """Before the first compile: point inductor and Triton at the cache folder, load the saved
    mega-cache, and allow one compiled graph per bucket and size."""
    folder = cache_dir(config)
    folder.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder / "inductor")
    os.environ["TRITON_CACHE_DIR"] = str(folder / "triton")
    buckets = len(config.batch_buckets()) * max(1, len(config.warm_sizes))
    dynamo = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):  # the second is the pre-2.6 name
        if hasattr(dynamo, name):
            setattr(dynamo, name, max(getattr(dynamo, name), buckets + 8))
            break
    _load_mega_cache(_mega_cache_path(config))


def compile_module(module: nn.Module, mode: TorchCompile) -> nn.Module:
    """Static shapes (dynamic=False): one specialised graph per bucket, as fast as a shape can run."""
    compiled: nn.Module = torch.compile(module, mode=_MODES[mode], dynamic=False)  # type: ignore[assignment]
    return compiled


@contextlib.contextmanager
def serving(config: EngineConfig, frozen: bool) -> Iterator[None]:
    """Around one batch: a new CUDA-graph step begins (the previous batch's outputs are no longer read);
    once `frozen` (warmed), a shape that was not warmed runs eagerly rather than compiling on a
    request's time."""
    if config.compile_mode is TorchCompile.REDUCE_OVERHEAD and hasattr(
        torch.compiler, "cudagraph_mark_step_begin"
    ):
        torch.compiler.cudagraph_mark_step_begin()
    if not frozen or not hasattr(torch.compiler, "set_stance"):  # set_stance: torch >= 2.6
        yield
        return
    with torch.compiler.set_stance("eager_on_recompile"):
        yield


def after_text_encoder(config: EngineConfig, states: torch.Tensor) -> torch.Tensor:
    """Under CUDA graph trees, the text encoder and the denoiser+decoders are separate trees' roots: the
    states are copied out of the text encoder's graph and a new step begins. Otherwise a batch whose
    prompts the cache held (no text encoder), or missed only in part (a smaller bucket), would follow a
    path through the tree that the warm-up never recorded, and record one on a request's time."""
    if config.compile_mode is not TorchCompile.REDUCE_OVERHEAD or not hasattr(
        torch.compiler, "cudagraph_mark_step_begin"
    ):
        return states
    states = states.clone()
    torch.compiler.cudagraph_mark_step_begin()
    return states


def save(config: EngineConfig) -> None:
    """After warm-up: write the mega-cache blob (what this process compiled or loaded), atomically."""
    save_artifacts = getattr(torch.compiler, "save_cache_artifacts", None)
    if save_artifacts is None:
        return
    try:
        saved = save_artifacts()
    except Exception as exc:  # a cache is an optimisation: never fail a warm-up for it
        log.warning("could not collect the compile cache artefacts: %s", exc)
        return
    if not saved:
        return
    blob = saved[0]
    path = _mega_cache_path(config)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    with os.fdopen(fd, "wb") as f:
        f.write(blob)
    os.replace(tmp, path)
    log.info("compile cache saved: %s (%.1f MB)", path, len(blob) / 1e6)


def _mega_cache_path(config: EngineConfig) -> Path:
    """One blob per torch release and device model: another GPU or torch would find nothing in it."""
    device = torch.device(config.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    tag = re.sub(r"[^A-Za-z0-9._-]+", "_", f"torch-{torch.__version__}-{name}")
    return cache_dir(config) / f"mega-cache-{tag}.bin"


def _load_mega_cache(path: Path) -> None:
    load_artifacts = getattr(torch.compiler, "load_cache_artifacts", None)
    if load_artifacts is None or not path.is_file():
        return
    try:
        load_artifacts(path.read_bytes())
    except Exception as exc:
        log.warning("ignoring the compile cache %s: %s", path, exc)
        return
    log.info("compile cache loaded: %s", path)
