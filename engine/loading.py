"""Loading a TiUE checkpoint: a local diffusers pipeline folder, offline, in a chosen dtype and device."""

from __future__ import annotations

import json
import logging
import os
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from engine.denoiser import check_unet_supported
from engine.errors import ModelLoadError
from engine.schedule import DDIMChain

log = logging.getLogger(__name__)

COMPONENTS = {
    "unet": "config.json",
    "vae": "config.json",
    "text_encoder": "config.json",
    "tokenizer": None,
    "scheduler": "scheduler_config.json",
}
SHIPPED_DEFAULT = Path(__file__).parent / "default_model"


@dataclass
class Components:
    """Everything a backend and the pipeline need from a checkpoint."""

    name: str
    path: Path
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler_config: dict[str, Any]
    chain: DDIMChain


M = TypeVar("M", bound=torch.nn.Module)

# Modules loaded from byte-identical component folders, by (content hash, dtype, device): several
# pipelines in one process (a server with several models) hold one copy. Weak, so a pipeline that is
# dropped takes its modules with it.
_SHARED: weakref.WeakValueDictionary[tuple[str, str, str], torch.nn.Module] = weakref.WeakValueDictionary()
_SHARED_LOCK = threading.Lock()


def shared_module(folder: Path, dtype: torch.dtype, device: str | torch.device, load: Callable[[], M]) -> M:
    """`load()`'s module, or the one already loaded from a folder with the same bytes, dtype and device
    (a VAE or text encoder two models share). Shared modules are inference-only: never changed in place."""
    from engine.export.cache import folder_content_hash  # that module imports this one

    key = (folder_content_hash(folder), str(dtype), str(torch.device(device)))
    with _SHARED_LOCK:
        module = _SHARED.get(key)
        if module is None:
            module = load()
            _SHARED[key] = module
        else:
            log.info("%s is byte-identical to a component already loaded: sharing its module", folder)
    return cast(M, module)


def cache_root() -> Path:
    """Where generated artefacts live: $TIUE_CACHE_DIR, else $XDG_CACHE_HOME/tiue-serve, else ~/.cache/tiue-serve."""
    if os.environ.get("TIUE_CACHE_DIR"):
        return Path(os.environ["TIUE_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tiue-serve"


def default_model_dir() -> Path:
    """The distilled default model shipped inside the package (loading checks it is all there)."""
    return SHIPPED_DEFAULT


def check_model_dir(path: Path) -> None:
    """Fail with a message naming exactly what is missing from a pipeline folder."""
    if not path.exists():
        raise ModelLoadError(f"model folder {path} does not exist")
    if not path.is_dir():
        raise ModelLoadError(f"model path {path} is not a folder")
    if not (path / "model_index.json").is_file():
        raise ModelLoadError(f"{path} is not a diffusers pipeline folder: model_index.json is missing")
    missing = []
    for name, config in COMPONENTS.items():
        sub = path / name
        if not sub.is_dir() or (config and not (sub / config).is_file()):
            missing.append(f"{name}/" + (config or ""))
    if missing:
        raise ModelLoadError(f"{path} is missing pipeline components: {', '.join(missing)}")


def load_components(
    model_dir: Path | None, dtype: torch.dtype, device: str | torch.device, steps: int
) -> Components:
    path = Path(model_dir) if model_dir is not None else default_model_dir()
    if model_dir is None and not (path / "model_index.json").is_file():
        raise ModelLoadError(
            f"the embedded default model is missing from this installation ({path}); "
            "pass --model or set TIUE_MODEL_DIR to a diffusers pipeline folder"
        )
    check_model_dir(path)
    kw: dict[str, Any] = {"local_files_only": True}
    try:
        scheduler_config = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
        chain = DDIMChain.from_scheduler_config(scheduler_config, steps)
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=dtype, **kw)
        check_unet_supported(unet)
        vae = shared_module(
            path / "vae",
            dtype,
            device,
            lambda: AutoencoderKL.from_pretrained(path / "vae", torch_dtype=dtype, **kw),
        )
        text_encoder = shared_module(
            path / "text_encoder",
            dtype,
            device,
            lambda: CLIPTextModel.from_pretrained(path / "text_encoder", dtype=dtype, **kw),
        )
        tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", **kw)
    except ModelLoadError:
        raise
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"cannot load the pipeline in {path}: {exc}") from exc
    if unet.config.cross_attention_dim != text_encoder.config.hidden_size:
        raise ModelLoadError(
            f"unet cross_attention_dim {unet.config.cross_attention_dim} does not match the text encoder's "
            f"hidden size {text_encoder.config.hidden_size}"
        )
    for module in (unet, vae, text_encoder):
        module.to(device).eval().requires_grad_(False)
    name = "default" if path == SHIPPED_DEFAULT else path.name
    return Components(name, path, unet, vae, text_encoder, tokenizer, scheduler_config, chain)
