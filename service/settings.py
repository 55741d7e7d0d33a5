"""Service settings: one pydantic-settings class, read from `TIUE_*` environment variables."""

from __future__ import annotations

import os
import re
import resource
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from engine.config import EngineConfig, available_cpus
from engine.types import BackendName, Decoder, Precision, SafetyCheck, TorchCompile
from service.edge.logs import LogFormat


class PromptPolicy(str, Enum):
    """What to do with a prompt longer than the text encoder's window."""

    TRUNCATE = "truncate"  # generate from the first tokens and say so in the response
    REJECT = "reject"  # answer 422


class LogLevel(str, Enum):
    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


def _default_encode_threads() -> int:
    return max(1, min(4, os.cpu_count() or 1))


MODEL_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")

FD_RESERVE = 128  # descriptors for all but client connections (model files, CUDA, logs, probe slots)
_MAX_CONNECTIONS_CAP = 1024  # far more than a replica's queue needs; idle kept-alive connections are cheap


def default_max_connections() -> int:
    """From the open-file limit the server raises itself to (the hard one): every connection costs one."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        return _MAX_CONNECTIONS_CAP
    return max(1, min(_MAX_CONNECTIONS_CAP, hard - FD_RESERVE))


def _parse_size(text: str) -> tuple[int, int]:
    """'512x768' (width x height) or '512' (square) -> (width, height)."""
    parts = text.lower().split("x")
    try:
        width, height = (int(parts[0]), int(parts[-1])) if len(parts) <= 2 else (0, 0)
    except ValueError:
        width = height = 0
    if width <= 0 or height <= 0:
        raise ValueError(f"a warm size must look like 512 or 512x768, got {text!r}")
    return width, height


def check_alias(alias: str, target: str, models: list[str]) -> None:
    """An alias names a served model and is not itself one: ValueError in one line saying which."""
    if alias in models:
        raise ValueError(f"model_aliases: '{alias}' is the name of a served model, not an alias")
    if target not in models:
        raise ValueError(
            f"model_aliases: '{alias}' names '{target}', which is not a served model ({', '.join(models)})"
        )


class Settings(BaseSettings):
    """Everything the service reads from its environment; passed into `create_app`."""

    model_config = SettingsConfigDict(env_prefix="TIUE_", case_sensitive=False, extra="ignore")

    # The model and how it runs (forwarded to engine.EngineConfig).
    model_dir: Path | None = Field(
        default=None, description="a diffusers pipeline folder (unset: the embedded default model)"
    )
    models: Annotated[dict[str, Path | None], NoDecode] = Field(
        default_factory=dict,
        description="several models on one device: NAME=DIR,NAME=DIR (an empty DIR: the embedded default "
        "model); instead of model_dir",
    )
    default_model: str | None = Field(
        default=None, description="the model a request without `model` gets (default: the first)"
    )
    backend: BackendName = Field(default=BackendName.TORCH, description="what runs the model")
    device: str = Field(default="cpu", description="cpu, cuda, cuda:1, ...")
    precision: Precision = Field(default=Precision.FP32, description="weights and activations")
    steps: int = Field(default=4, ge=1, le=50, description="TiUE decoder steps")
    engine_dir: Path | None = Field(
        default=None, description="compiled-artefact cache (unset: the cache root's engines/)"
    )
    build_engines: bool = Field(
        default=False, description="compiled backends: build missing artefacts at load instead of refusing"
    )
    torch_compile: TorchCompile = Field(
        default=TorchCompile.AUTO,
        description="torch backend: compile the text encoder, denoiser and decoders for each warmed batch "
        "size and size before the server is ready (reduce-overhead: CUDA graphs too; aot: the AOTInductor "
        "packages `tiue build-engines --backend torch` built; auto: on CUDA those packages when usable, else "
        "reduce-overhead, on the CPU off; true/false: default/off)",
    )
    compile_cache_dir: Path | None = Field(
        default=None,
        description="torch.compile's inductor/Triton caches, kept across restarts (unset: the cache root's compile/)",
    )
    warm_batch_sizes: Annotated[list[int], NoDecode] = Field(
        default_factory=list,
        description="batch sizes compiled at warm-up, comma-separated; a batch runs padded to the next "
        "(unset: on CUDA 1, 2, 4, 8, 16 below max_batch_size, elsewhere the powers of two below it; and max_batch_size)",
    )
    warm_sizes: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="image sizes warmed (compiled) before ready, comma-separated WxH or N (unset: the native size)",
    )
    prompt_cache_size: int = Field(
        default=1024,
        ge=0,
        description="prompts whose text-encoder output is kept (LRU by token ids; at SD size about 160 KB "
        "each on the device); 0: off",
    )
    decoder: Decoder = Field(
        default=Decoder.FULL,
        description="the decoder of requests that name none: full (the model's VAE) or tiny (its "
        "AutoencoderTiny; the server fails to start without one)",
    )
    tiny_decoder_dir: Path | None = Field(
        default=None,
        description="a diffusers AutoencoderTiny folder to use as the tiny decoder (unset: <model>/vae_tiny "
        "when present); checked against the model's VAE at load",
    )
    safety_checker: SafetyCheck = Field(
        default=SafetyCheck.AUTO,
        description="check every image with the model folder's safety_checker/ and withhold flagged ones "
        "(auto: when the folder has one; on: the server fails to start without one; off)",
    )
    threads: int = Field(
        default_factory=available_cpus,
        ge=0,
        le=256,
        description="CPU intra-op threads (unset: the container's CPU limit, else the usable CPUs; "
        "0: the library's own default)",
    )

    # Batching and admission.
    max_batch_size: int = Field(default=4, ge=1, le=256, description="images per engine call")
    max_wait_ms: float = Field(
        default=10.0, ge=0, le=10_000, description="how long the oldest request may wait"
    )
    queue_size: int = Field(default=64, ge=1, description="images waiting, beyond which requests get 429")
    request_timeout_s: float = Field(
        default=120.0, gt=0, description="from a request's arrival to its answer; 504 after it"
    )
    shutdown_grace_s: float = Field(
        default=30.0,
        ge=0,
        description="after SIGTERM: how long queued and running work may take before it is answered 503",
    )

    # Connections (service.edge.server, service.edge.connections): bounds that hold behind a load balancer and
    # against slow or idle clients. The timeouts are uvicorn's missing ones; docs/api.md, Connections.
    max_connections: int = Field(
        default_factory=default_max_connections,
        ge=1,
        description="open TCP connections; one more is closed as soon as accepted (a few extra serve only "
        "the health routes). Default: the open-file limit less a reserve, at most 1024",
    )
    max_in_flight: int = Field(
        default=256,
        ge=1,
        description="generation requests handled at once (queued, on the device, encoding); more get 503 "
        "with Retry-After. Above the queue's size, so that a full queue answers 429 first",
    )
    header_timeout_s: float = Field(
        default=10.0,
        gt=0,
        description="from a connection's opening, or a kept-alive connection's next request's first byte, "
        "to the end of the request's headers; then the connection is closed (408 if part was sent)",
    )
    body_timeout_s: float = Field(
        default=30.0, gt=0, description="to receive a whole request body once its headers are in; then 408"
    )
    keep_alive_timeout_s: float = Field(
        # Above the idle timeout of the load balancers in front (AWS ALB and nginx: 60 s), so that they,
        # not we, close an idle connection: otherwise one may send a request just as we close it (a 502).
        # Behind Google Cloud's load balancers (600 s) set 620.
        default=75.0,
        gt=0,
        description="how long an idle kept-alive connection stays open; above the load balancer's idle timeout",
    )

    # Admission by cost: estimated device seconds (service.scheduling.cost), not request counts.
    max_queue_s: float | None = Field(
        default=None,
        gt=0,
        description="device seconds of admitted work, beyond which requests get 429 (default: request_timeout_s)",
    )
    max_request_s: float = Field(
        default=30.0, gt=0, description="device seconds one request may cost; dearer ones get 422 too_costly"
    )
    client_share: float = Field(
        default=0.5,
        gt=0,
        le=1,
        description="share of max_queue_s one client (API key, else address) may hold",
    )
    rate_limit_per_minute: float = Field(
        default=0, ge=0, description="images per minute per client (API key, else address); 0: no limit"
    )
    rate_limit_burst: int | None = Field(
        default=None, ge=1, description="images a client may ask for at once (default: max_n)"
    )

    # Request limits.
    max_n: int = Field(default=8, ge=1, le=64)
    min_size: int = Field(default=64, ge=8)
    max_size: int | None = Field(
        default=None, ge=8, description="pixels per side (default: twice the model's native size)"
    )
    max_body_bytes: int = Field(default=65_536, ge=1024)
    max_prompt_chars: int = Field(default=4_000, ge=1)
    prompt_policy: PromptPolicy = PromptPolicy.TRUNCATE

    # Edge.
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65_535)
    encode_threads: int = Field(default_factory=_default_encode_threads, ge=1, le=64)
    log_level: LogLevel = LogLevel.INFO
    log_format: LogFormat = LogFormat.TEXT  # json: one object per line, for log collectors
    playground: bool = Field(default=True, description="serve the browser playground at GET / (false: 404)")

    # Browsers and tools written for other image APIs (docs/api.md, Browsers and tools).
    docs: bool = Field(
        default=True, description="serve the API docs at /docs, from packaged assets (false: 404)"
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="origins whose pages may call the API, comma-separated (https://app.example.com; *: any); "
        "unset: none",
    )
    model_aliases: Annotated[dict[str, str], NoDecode] = Field(
        default_factory=dict,
        description="other names for served models, ALIAS=MODEL,... (gpt-image-1=default): requests and "
        "/v1/models accept the alias",
    )

    @field_validator("torch_compile", mode="before")
    @classmethod
    def _compile_mode(cls, value: Any) -> Any:
        """The setting was a boolean once: true/false (1/0, yes/no, on) still mean default/off."""
        if isinstance(value, bool):
            return TorchCompile.DEFAULT if value else TorchCompile.OFF
        if isinstance(value, str):
            text = value.strip().lower()
            legacy = {"true": "default", "1": "default", "yes": "default", "on": "default"}
            return legacy.get(text, {"false": "off", "0": "off", "no": "off"}.get(text, text))
        return value

    @field_validator("warm_batch_sizes", "warm_sizes", mode="before")
    @classmethod
    def _split_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("warm_sizes")
    @classmethod
    def _sizes(cls, value: list[str]) -> list[str]:
        for text in value:
            _parse_size(text)
        return value

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [key.strip() for key in value.split(",") if key.strip()]
        return value

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [origin.strip().rstrip("/") for origin in value.split(",") if origin.strip()]
        return value

    @field_validator("model_aliases", mode="before")
    @classmethod
    def _split_aliases(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        aliases: dict[str, str] = {}
        for entry in (part.strip() for part in value.split(",")):
            if not entry:
                continue
            alias, sep, target = (text.strip() for text in entry.partition("="))
            if not sep or not target:
                raise ValueError(f"'{entry}' is not ALIAS=MODEL (e.g. gpt-image-1=default)")
            if alias in aliases:
                raise ValueError(f"the alias '{alias}' is given twice")
            aliases[alias] = target
        return aliases

    @field_validator("model_aliases")
    @classmethod
    def _alias_names(cls, value: dict[str, str]) -> dict[str, str]:
        for alias in value:
            if not MODEL_NAME.fullmatch(alias):
                raise ValueError(f"the alias '{alias}' is not 1-64 letters, digits, '.', '_' or '-'")
        return value

    @field_validator("models", mode="before")
    @classmethod
    def _split_models(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        models: dict[str, str | None] = {}
        for entry in (part.strip() for part in value.split(",")):
            if not entry:
                continue
            name, sep, folder = entry.partition("=")
            if not sep:
                raise ValueError(f"'{entry}' is not NAME=DIR (e.g. sd15=/models/loopfree-sd1.5)")
            if name.strip() in models:
                raise ValueError(f"the model name '{name.strip()}' is given twice")
            models[name.strip()] = folder.strip() or None
        return models

    @field_validator("models")
    @classmethod
    def _model_names(cls, value: dict[str, Path | None]) -> dict[str, Path | None]:
        for name in value:
            if not MODEL_NAME.fullmatch(name):
                raise ValueError(
                    f"the model name '{name}' is not 1-64 letters, digits, '.', '_' or '-' (it is a URL "
                    "path segment and a metric label)"
                )
        return value

    @field_validator(
        "model_dir",
        "engine_dir",
        "compile_cache_dir",
        "tiny_decoder_dir",
        "default_model",
        "max_size",
        "max_queue_s",
        "rate_limit_burst",
        mode="before",
    )
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator(
        "backend", "precision", "log_level", "log_format", "prompt_policy", "safety_checker", mode="before"
    )
    @classmethod
    def _lowercase(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        outside = [b for b in self.warm_batch_sizes if not 1 <= b <= self.max_batch_size]
        if outside:
            raise ValueError(
                f"warm_batch_sizes {outside} must be within 1..max_batch_size ({self.max_batch_size})"
            )
        if self.max_size is not None and self.min_size > self.max_size:
            raise ValueError(f"min_size ({self.min_size}) is larger than max_size ({self.max_size})")
        if self.models and self.model_dir is not None:
            raise ValueError("set models (TIUE_MODELS) or model_dir (TIUE_MODEL_DIR), not both")
        if self.models and self.default_model is not None and self.default_model not in self.models:
            raise ValueError(
                f"default_model '{self.default_model}' is not one of the models: {', '.join(self.models)}"
            )
        if self.models:  # otherwise the one model's name is known once it is loaded (ServiceState.load)
            for alias, target in self.model_aliases.items():
                check_alias(alias, target, list(self.models))
        if self.queue_size < self.max_n:
            raise ValueError(
                f"queue_size ({self.queue_size} images) is smaller than max_n ({self.max_n}): "
                "a request for max_n images could never be admitted"
            )
        return self

    @property
    def queue_limit_s(self) -> float:
        return self.max_queue_s if self.max_queue_s is not None else self.request_timeout_s

    def size_limit(self, native_size: int) -> int:
        """The largest width or height served: the setting, else twice the model's native size."""
        return self.max_size if self.max_size is not None else 2 * native_size

    @property
    def max_wait_s(self) -> float:
        return self.max_wait_ms / 1000.0

    @property
    def auth_enabled(self) -> bool:
        return bool(self.api_keys)

    def model_dirs(self) -> list[tuple[str | None, Path | None]]:
        """The models to serve, in order: (name, folder); name None is the single model named by itself."""
        if self.models:
            return list(self.models.items())
        return [(None, self.model_dir)]

    def engine_config(self) -> EngineConfig:
        return EngineConfig(
            model_dir=self.model_dir,
            backend=self.backend,
            device=self.device,
            precision=self.precision,
            steps=self.steps,
            engine_dir=self.engine_dir,
            build_engines=self.build_engines,
            torch_compile=self.torch_compile,
            compile_cache_dir=self.compile_cache_dir,
            warm_batch_sizes=tuple(self.warm_batch_sizes),
            warm_sizes=tuple(_parse_size(text) for text in self.warm_sizes),
            max_batch_size=self.max_batch_size,
            threads=self.threads,
            decoder=self.decoder,
            tiny_decoder_dir=self.tiny_decoder_dir,
            safety_checker=self.safety_checker,
            prompt_cache_size=self.prompt_cache_size,
        )
