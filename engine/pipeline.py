"""Prompts to uint8 images: tokenize, encode text, TiUE denoise, VAE decode, post-process.

The math lives here once; backends only run the three compute stages.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import numpy as np
import torch

from engine import compiling
from engine.backends import Backend, backend_class
from engine.config import EngineConfig
from engine.errors import BackendUnavailableError, InvalidRequestError, ModelLoadError, UnsupportedSizeError
from engine.export import torch_aot
from engine.export.artefacts import backend_artefacts
from engine.export.profiles import ModelDims
from engine.loading import Components, load_configured
from engine.prompt_cache import PromptCache
from engine.safety import SafetyChecker, load_safety_checker
from engine.types import (
    DENOISE,
    MAX_SEED,
    SAFETY_CHECK,
    TEXT_ENCODE,
    VAE_DECODE,
    BatchKey,
    BatchResult,
    Decoder,
    GeneratedImage,
    GenerationRequest,
    ModelInfo,
    Precision,
    TorchCompile,
)

log = logging.getLogger(__name__)


class TiUEPipeline:
    def __init__(
        self,
        components: Components,
        backend: Backend,
        config: EngineConfig,
        safety_checker: SafetyChecker | None = None,
    ):
        self.components = components
        self.backend = backend
        self.config = config
        self.safety_checker = safety_checker
        self.dims = ModelDims.from_components(components)
        self.vae_scale = self.dims.vae_scale
        self.latent_channels = self.dims.latent_channels
        self.latent_scaling = latent_scaling(components)
        decoders = tuple(self.latent_scaling)
        if config.decoder not in decoders:
            raise ModelLoadError(f"decoder {config.decoder.value} is not loaded; loaded: {_names(decoders)}")
        self._warmed = False  # set by warmup(): from then on a compiled pipeline compiles nothing more
        # A fast tokenizer keeps its padding/truncation settings in mutable state: shared by the device
        # thread (padded batches) and the event loop (counting for admission), one call can run with the
        # other's settings and fail. The device thread owns `components.tokenizer`; counting has its own.
        self._counting_tokenizer = copy.deepcopy(components.tokenizer)
        self._counting_lock = threading.Lock()
        self.prompt_cache = PromptCache(config.prompt_cache_size)
        self._warming = False  # warm-up encodes every bucket's batch, bypassing the prompt cache
        self.info = ModelInfo(
            name=components.name,
            backend=backend.name,
            precision=config.precision.value,
            device=str(backend.device),
            steps=components.chain.steps,
            max_prompt_tokens=self.dims.seq_len,
            size_multiple=self.dims.size_multiple,
            default_size=self.dims.default_size,
            decoders=decoders,
            default_decoder=config.decoder,
            trained_sizes=components.card.trained_sizes or ((self.dims.default_size,) * 2,),
            vocabulary=components.card.vocabulary,
            safety_checker=safety_checker is not None,
        )

    # -- validation -----------------------------------------------------------------------------

    def validate(self, request: GenerationRequest) -> None:
        """Raise InvalidRequestError with a message a person can act on; never touches the device. The
        service calls it once per request, before queueing; `generate` then checks only what a batch
        must share."""
        if not request.prompt.strip():
            raise InvalidRequestError("prompt must not be empty")
        if not 0 <= request.seed <= MAX_SEED:
            raise InvalidRequestError(f"seed must be in [0, {MAX_SEED}], got {request.seed}")
        self._check_shape(request.batch_key)

    def _check_shape(self, key: BatchKey) -> Decoder:
        """The key's decoder, when this pipeline can run a batch of that size with it."""
        decoder = self.info.decoder_for(key.decoder)
        m = self.info.size_multiple
        for name, value in (("width", key.width), ("height", key.height)):
            if value < m or value % m:
                raise UnsupportedSizeError(
                    f"{name} {value} is not supported: it must be a positive multiple of {m}"
                )
        reason = self.backend.unsupported(1, key.height // self.vae_scale, key.width // self.vae_scale)
        if reason:
            raise UnsupportedSizeError(f"size {key.width}x{key.height} is not supported: {reason}")
        return decoder

    def count_tokens(self, prompt: str) -> int:
        """Tokens including BOS/EOS, before truncation to the text encoder's window. Safe to call from any
        thread while batches run (the device thread's tokenizer is never touched)."""
        with self._counting_lock:
            return len(self._counting_tokenizer(prompt, truncation=False).input_ids)

    # -- generation -----------------------------------------------------------------------------

    def generate(self, requests: Sequence[GenerationRequest]) -> BatchResult:
        """One image per request, in order, in one batch: all of one size, at most `max_batch_size`
        (compiled profiles are sized from it; the service's batcher forms batches within it)."""
        if not requests:
            return BatchResult(images=[])
        if len({r.shape_key for r in requests}) != 1:
            raise InvalidRequestError("all requests in one batch must have the same width and height")
        if len({self.info.decoder_for(r.decoder) for r in requests}) != 1:
            raise InvalidRequestError("all requests in one batch must use the same decoder")
        if len(requests) > self.config.max_batch_size:
            raise InvalidRequestError(
                f"a batch holds at most {self.config.max_batch_size} images (max_batch_size); got {len(requests)}"
            )
        self._check_shape(requests[0].batch_key)
        with self._compile_scope():
            result = self._run(self._padded(requests))
        return BatchResult(result.images[: len(requests)], result.timings)

    def _padded(self, requests: Sequence[GenerationRequest]) -> list[GenerationRequest]:
        """Compiled: the batch filled up to the next compiled bucket with copies of its last request (their
        images are dropped), so that it runs a shape compiled at warm-up."""
        return [*requests, *[requests[-1]] * (self._bucket(len(requests)) - len(requests))]

    def _bucket(self, batch: int) -> int:
        return next((b for b in self.config.batch_buckets() if b >= batch), batch)

    def _compile_scope(self) -> AbstractContextManager[None]:
        """Once warmed, a compiled pipeline compiles nothing more (an unwarmed size runs eagerly)."""
        return compiling.serving(self.config, frozen=self._warmed) if self.config.compiles else nullcontext()

    def _run(self, requests: Sequence[GenerationRequest]) -> BatchResult:
        timings: dict[str, float] = {}
        decoder = self.info.decoder_for(requests[0].decoder)
        width, height = requests[0].shape_key
        with self._timed(TEXT_ENCODE, timings):
            ids = self.tokenize([r.prompt for r in requests])
            if self._warming:
                states = self._encode_text(ids)
            else:
                states = self.prompt_cache.encode(ids, self._encode_text)
            states = compiling.after_text_encoder(self.config, states)
        with self._timed(DENOISE, timings):
            z_t = self.initial_noise(requests, height // self.vae_scale, width // self.vae_scale)
            z_0 = self.backend.denoise(to_device(z_t, self.backend.device).to(self.backend.dtype), states)
        with self._timed(VAE_DECODE, timings):
            scale, shift = self.latent_scaling[decoder]
            images = self.backend.decode(z_0 / scale + shift, decoder)
            pixels = to_uint8(images)
        flags = [False] * len(requests)
        if self.safety_checker is not None:
            with self._timed(SAFETY_CHECK, timings):
                flags = self.safety_checker.flags(pixels, [r.moderation for r in requests])
            for index, flagged in enumerate(flags):
                if flagged:
                    pixels[index] = 0  # never handed on, even by mistake: black, as diffusers answers
        return BatchResult(
            [GeneratedImage(p, r.seed, f) for p, r, f in zip(pixels, requests, flags, strict=True)], timings
        )

    def _encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        """The text encoder on a batch padded to its bucket (the prompts the cache missed may be fewer
        than the batch), so that it too runs a shape compiled at warm-up."""
        rows = ids.shape[0]
        padded = torch.cat([ids, ids[-1:].expand(self._bucket(rows) - rows, -1)])
        return self.backend.encode_text(padded)[:rows]

    def tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        tok = self.components.tokenizer
        out = tok(
            list(prompts),
            padding="max_length",
            max_length=tok.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        return out.input_ids

    def initial_noise(
        self, requests: Sequence[GenerationRequest], latent_h: int, latent_w: int
    ) -> torch.Tensor:
        """z_T drawn per image on the CPU from its own seed: independent of batch and device."""
        shape = (1, self.latent_channels, latent_h, latent_w)
        return torch.cat(
            [
                torch.randn(shape, generator=torch.Generator().manual_seed(r.seed), dtype=torch.float32)
                for r in requests
            ]
        )

    def warmup(
        self, batch_sizes: Sequence[int] | None = None, sizes: Sequence[tuple[int, int]] | None = None
    ) -> None:
        """Run every shape the server will meet once, so that no request pays for lazy initialisation or a
        compile: each batch size (default: the compiled buckets, else one image) at each (width, height)
        (default: `warm_sizes`, else the native size; a square one the backend cannot run moves to the
        nearest it can), with each loaded decoder. A compiled pipeline then compiles nothing more and
        saves its compile cache."""
        batches = tuple(batch_sizes or self.config.batch_buckets() or (1,))
        native = self.info.default_size
        wanted = [self._warm_size(w, h) for w, h in (sizes or self.config.warm_sizes or [(native, native)])]
        passes = compiling.warm_passes(self.config.compile_mode) if self.config.compiles else 1
        started = time.perf_counter()
        self._warming = True
        try:
            for width, height in wanted:
                for decoder in self.info.decoders:
                    for batch in batches:
                        requests = [
                            GenerationRequest("warm up", s, width, height, decoder=decoder)
                            for s in range(batch)
                        ]
                        for _ in range(passes):
                            self.generate(requests)
        finally:
            self._warming = False
        if self.config.compiles and not self._warmed:
            compiling.save(self.config)
        self._warmed = True
        log.info(
            "warmed batches %s at %s in %.1fs",
            ",".join(map(str, batches)),
            ", ".join(f"{w}x{h}" for w, h in wanted),
            time.perf_counter() - started,
        )

    def _warm_size(self, width: int, height: int) -> tuple[int, int]:
        if (
            width != height
            or self.backend.unsupported(1, height // self.vae_scale, width // self.vae_scale) is None
        ):
            return width, height  # generate() says why an oblong size cannot run
        size = self.nearest_supported_size(width)
        return size, size

    def nearest_supported_size(self, size: int, limit: int = 4096) -> int:
        m = self.info.size_multiple
        candidates = sorted(range(m, limit + 1, m), key=lambda s: (abs(s - size), s))
        for s in candidates:
            if self.backend.unsupported(1, s // self.vae_scale, s // self.vae_scale) is None:
                return s
        raise UnsupportedSizeError(f"the {self.backend.name} backend supports no square size up to {limit}")

    @contextmanager
    def _timed(self, stage: str, timings: dict[str, float]) -> Iterator[None]:
        start = time.perf_counter()
        yield
        if self.backend.device.type == "cuda":
            torch.cuda.synchronize(self.backend.device)
        timings[stage] = time.perf_counter() - start


def latent_scaling(components: Components) -> dict[Decoder, tuple[float, float]]:
    """(scaling_factor, shift_factor) per loaded decoder: it decodes `z_0 / scaling + shift`.

    This is what diffusers does when an `AutoencoderTiny` replaces the VAE: a pipeline decodes
    `latents / vae.config.scaling_factor` (SD3/Flux add `vae.config.shift_factor`) with whichever
    autoencoder is its `vae`, so the tiny decoder's own config counts — TAESD's scaling_factor is 1.0,
    so it reads the denoiser's scaled latents as they are — and `AutoencoderTiny.decode` returns
    [-1, 1], like the VAE.
    """
    out = {Decoder.FULL: _factors(components.vae.config)}
    if components.vae_tiny is not None:
        out[Decoder.TINY] = _factors(components.vae_tiny.config)
    return out


def _factors(config: Any) -> tuple[float, float]:
    return float(config.scaling_factor), float(getattr(config, "shift_factor", None) or 0.0)


def _names(decoders: Sequence[Decoder]) -> str:
    return ", ".join(d.value for d in decoders)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[B, 3, H, W] in [-1, 1] -> [B, H, W, 3] uint8, as diffusers' image processor rounds (half to even),
    computed where the images are; from a GPU, 1 byte a value comes back through pinned memory."""
    x = (images.float() / 2 + 0.5).clamp(0, 1).mul(255).round().to(torch.uint8)
    x = x.permute(0, 2, 3, 1).contiguous()
    if x.device.type != "cuda":
        return x.numpy()
    host = torch.empty(x.shape, dtype=torch.uint8, pin_memory=True)
    host.copy_(x, non_blocking=True)
    torch.cuda.current_stream(x.device).synchronize()
    return host.numpy()


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor onto `device`; to a GPU through pinned memory, without blocking the host."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def create_backend(components: Components, config: EngineConfig) -> Backend:
    """The backend the config names, refused before anything is looked up or built when it cannot run
    here (e.g. no GPU), then handed the artefacts it runs."""
    cls = backend_class(config.backend)
    cls.check_runnable(config)
    backend: Backend = cls(components, config, backend_artefacts(components, config))
    return backend


def load_pipeline(
    config: EngineConfig, backend_factory: Callable[..., Backend] = create_backend
) -> TiUEPipeline:
    """Load the checkpoint named by `config` (or the embedded default) onto the chosen backend."""
    started = time.perf_counter()
    if config.precision is Precision.FP16 and config.device.split(":")[0] == "cpu":
        log.warning(
            "precision fp16 on a CPU runs many times slower than fp32 (CPUs lack fast half-precision "
            "kernels); use --precision fp32 (TIUE_PRECISION) there"
        )
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    components = load_configured(config)
    config = torch_aot.resolve(components, config)  # auto/aot: built packages when usable, else compile
    try:
        backend = backend_factory(components, config)
    except BackendUnavailableError as exc:
        if config.torch_compile is not TorchCompile.AOT:
            raise
        config = torch_aot.fall_back(config, str(exc))  # packages that do not load: as without them
        backend = backend_factory(components, config)
    safety_checker = load_safety_checker(
        components.path, config.safety_checker, config.precision.torch_dtype, backend.device
    )
    pipeline = TiUEPipeline(components, backend, config, safety_checker)
    log.info(
        "loaded model %s from %s on %s/%s/%s in %.1fs (timesteps %s, %s)",
        components.name,
        components.path,
        backend.name,
        config.device,
        config.precision.value,
        time.perf_counter() - started,
        list(components.chain.timesteps),
        "folded DDIM" if components.chain.linear else "DDIM step loop",
    )
    return pipeline
