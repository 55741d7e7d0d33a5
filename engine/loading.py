"""Loading a TiUE checkpoint: a local diffusers pipeline folder, offline, in a chosen dtype and device."""

from __future__ import annotations

import json
import logging
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import torch
from diffusers import AutoencoderKL, AutoencoderTiny, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from engine.card import ModelCard, read_card
from engine.config import EngineConfig
from engine.denoiser import check_unet_supported
from engine.errors import BackendUnavailableError, ModelLoadError
from engine.files import COMPONENTS, TINY_DECODER, folder_content_hash
from engine.schedule import DDIMChain
from engine.types import Decoder

log = logging.getLogger(__name__)

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
    vae_tiny: AutoencoderTiny | None = None
    vae_tiny_path: Path | None = None
    card: ModelCard = ModelCard()  # what the folder says it draws well (engine.card)


M = TypeVar("M", bound=torch.nn.Module)

# Modules loaded from byte-identical component folders, by (content hash, dtype, device): several
# pipelines in one process (a server with several models) hold one copy. Weak, so a pipeline that is
# dropped takes its modules with it.
_SHARED: weakref.WeakValueDictionary[tuple[str, str, str], torch.nn.Module] = weakref.WeakValueDictionary()
_SHARED_LOCK = threading.Lock()


def shared_module(folder: Path, dtype: torch.dtype, device: str | torch.device, load: Callable[[], M]) -> M:
    """`load()`'s module, or the one already loaded from a folder with the same bytes, dtype and device
    (a VAE or text encoder two models share). Shared modules are inference-only: never changed in place."""
    key = (folder_content_hash(folder), str(dtype), str(torch.device(device)))
    with _SHARED_LOCK:
        module = _SHARED.get(key)
        if module is None:
            module = load()
            _SHARED[key] = module
        else:
            log.info("%s is byte-identical to a component already loaded: sharing its module", folder)
    return cast(M, module)


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


def check_device(device: str) -> None:
    """A device torch can use here; BackendUnavailableError naming the fix otherwise (never torch's
    assertion from deep inside a `.to()`)."""
    try:
        wanted = torch.device(device)
    except (RuntimeError, ValueError):
        raise BackendUnavailableError(
            f"device {device!r} is not a torch device: use cpu, cuda or cuda:N"
        ) from None
    if wanted.type == "cuda":
        if not torch.cuda.is_available():
            build = f"torch {torch.__version__} " + (
                "has no CUDA GPU to use" if torch.version.cuda else "is built without CUDA"
            )
            raise BackendUnavailableError(
                f"device {device} was asked for, but {build}; use --device cpu (TIUE_DEVICE)"
            )
        if wanted.index is not None and wanted.index >= torch.cuda.device_count():
            raise BackendUnavailableError(
                f"device {device} was asked for, but torch sees {torch.cuda.device_count()} CUDA GPU(s)"
            )


def check_config(config: EngineConfig) -> None:
    """What can be checked without loading weights: the device, the model folder, its tiny decoder.
    `tiue serve` runs it before binding its port, so a typo fails in one line, not after start-up."""
    check_device(config.device)
    if config.model_dir is None:
        check_default_model()
    else:
        check_model_dir(Path(config.model_dir))
    path = Path(config.model_dir) if config.model_dir is not None else default_model_dir()
    tiny_decoder_folder(path, config.tiny_decoder_dir, config.decoder is Decoder.TINY)


def check_default_model() -> None:
    if not (default_model_dir() / "model_index.json").is_file():
        raise ModelLoadError(
            f"the embedded default model is missing from this installation ({default_model_dir()}); "
            "pass --model or set TIUE_MODEL_DIR to a diffusers pipeline folder"
        )


def vae_scale(vae: AutoencoderKL) -> int:
    """Image pixels per latent pixel: one 2x upsampling between consecutive decoder blocks."""
    return int(2 ** (len(vae.config.block_out_channels) - 1))


def tiny_decoder_scale(tiny: AutoencoderTiny) -> int:
    cfg = tiny.config
    return int(cfg.upsampling_scaling_factor ** (len(cfg.decoder_block_out_channels) - 1))


def tiny_decoder_folder(model_path: Path, tiny_decoder_dir: Path | None, required: bool) -> Path | None:
    """The AutoencoderTiny folder to load: the one named, else `<model>/vae_tiny` when present.
    A named folder must exist; so must one when the tiny decoder is the server's default."""
    folder = Path(tiny_decoder_dir) if tiny_decoder_dir is not None else model_path / TINY_DECODER
    if (folder / "config.json").is_file():
        return folder
    if tiny_decoder_dir is not None or required:
        what = "does not exist" if not folder.exists() else "has no config.json"
        raise ModelLoadError(
            f"tiny decoder folder {folder} {what}: point --tiny-decoder-dir (TIUE_TINY_DECODER_DIR) at a "
            "diffusers AutoencoderTiny folder, or serve --decoder full"
        )
    return None


def load_tiny_decoder(folder: Path, vae: AutoencoderKL, dtype: torch.dtype) -> AutoencoderTiny:
    """An AutoencoderTiny that decodes this VAE's latents: same latent channels, same spatial scale."""
    try:
        config = json.loads((folder / "config.json").read_text())
        if config.get("_class_name") != "AutoencoderTiny":
            raise ModelLoadError(
                f"tiny decoder folder {folder} holds a {config.get('_class_name')}, not an AutoencoderTiny"
            )
        tiny = AutoencoderTiny.from_pretrained(folder, torch_dtype=dtype, local_files_only=True)
    except ModelLoadError:
        raise
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"cannot load the tiny decoder in {folder}: {exc}") from exc
    problems = []
    if int(tiny.config.latent_channels) != int(vae.config.latent_channels):
        problems.append(
            f"latent channels {tiny.config.latent_channels}, the VAE's are {vae.config.latent_channels}"
        )
    if tiny_decoder_scale(tiny) != vae_scale(vae):
        problems.append(f"spatial scale {tiny_decoder_scale(tiny)}x, the VAE's is {vae_scale(vae)}x")
    if problems:
        raise ModelLoadError(f"tiny decoder {folder} does not match the model: {'; '.join(problems)}")
    return tiny


def load_components(
    model_dir: Path | None,
    dtype: torch.dtype,
    device: str | torch.device,
    steps: int,
    tiny_decoder_dir: Path | None = None,
    require_tiny_decoder: bool = False,
) -> Components:
    """The pipeline folder's parts, and its tiny decoder where one is present (see tiny_decoder_folder)."""
    path = Path(model_dir) if model_dir is not None else default_model_dir()
    if model_dir is None:
        check_default_model()
    check_model_dir(path)
    card = read_card(path)
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
    tiny_path = tiny_decoder_folder(path, tiny_decoder_dir, require_tiny_decoder)
    tiny = load_tiny_decoder(tiny_path, vae, dtype) if tiny_path is not None else None
    for module in (unet, vae, text_encoder, tiny):
        if module is not None:
            module.to(device).eval().requires_grad_(False)
    name = "default" if path == SHIPPED_DEFAULT else path.name
    return Components(
        name, path, unet, vae, text_encoder, tokenizer, scheduler_config, chain, tiny, tiny_path, card
    )


def load_configured(config: EngineConfig) -> Components:
    """The components `config` names, its tiny decoder required when it is the server's default."""
    check_config(config)
    return load_components(
        config.model_dir,
        config.precision.torch_dtype,
        config.device,
        config.steps,
        tiny_decoder_dir=config.tiny_decoder_dir,
        require_tiny_decoder=config.decoder is Decoder.TINY,
    )
