"""Service settings: one pydantic-settings class, read from `TIUE_*` environment variables."""

from __future__ import annotations

import dataclasses
import os
import re
import resource
import typing
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import Field, SecretStr, create_model, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from engine.config import EngineConfig
from engine.types import TorchCompile, parse_size
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


def _engine_field(f: dataclasses.Field[Any], annotation: Any) -> tuple[Any, Any]:
    """A pydantic field from an EngineConfig field: its type, default (or factory), description, bounds."""
    if typing.get_origin(annotation) is tuple:
        annotation = Annotated[annotation, NoDecode]  # comma-separated in TIUE_*, split by a validator
    default: dict[str, Any] = (
        {"default_factory": f.default_factory}
        if f.default_factory is not dataclasses.MISSING
        else {"default": f.default}
    )
    return annotation, Field(**default, description=f.metadata["help"], **f.metadata["bounds"])


def check_alias(alias: str, target: str, models: list[str]) -> None:
    """An alias names a served model and is not itself one: ValueError in one line saying which."""
    if alias in models:
        raise ValueError(f"model_aliases: '{alias}' is the name of a served model, not an alias")
    if target not in models:
        raise ValueError(
            f"model_aliases: '{alias}' names '{target}', which is not a served model ({', '.join(models)})"
        )


class _SettingsBase(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TIUE_", case_sensitive=False, extra="ignore")


_HINTS = typing.get_type_hints(EngineConfig)
if TYPE_CHECKING:  # type checkers read the engine's settings through `Settings.engine`
    _EngineSettings = _SettingsBase
else:
    _EngineSettings = create_model(
        "_EngineSettings",
        __base__=_SettingsBase,
        **{f.name: _engine_field(f, _HINTS[f.name]) for f in dataclasses.fields(EngineConfig)},
    )


class Settings(_EngineSettings):
    """Everything the service reads from its environment; passed into `create_app`. The engine's own
    settings (model, backend, device, ...) are EngineConfig's fields, declared there with their defaults
    and read here each from its TIUE_* variable; `engine` is them as an EngineConfig."""

    # Several models (each an EngineConfig with its own model_dir).
    models: Annotated[dict[str, Path | None], NoDecode] = Field(
        default_factory=dict,
        description="several models on one device: NAME=DIR,NAME=DIR (an empty DIR: the embedded default "
        "model); instead of model_dir",
    )
    default_model: str | None = Field(
        default=None, description="the model a request without `model` gets (default: the first)"
    )

    # Batching and admission.
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
    max_connections_per_address: int | None = Field(
        default=None,
        ge=1,
        description="open TCP connections from one client address; more are closed as soon as accepted "
        "(default: an eighth of max_connections). Addresses in forwarded_allow_ips are exempt",
    )
    forwarded_allow_ips: str = Field(
        default="",
        description="proxies whose X-Forwarded-For / X-Forwarded-Proto are believed: comma-separated "
        "addresses or CIDR ranges, or * (unset: none; a client's own address is its identity)",
    )
    event_loop_nice: int = Field(
        default=10,
        ge=0,
        le=19,
        description="once ready, the HTTP event loop's (and encoding threads') nice value above the device "
        "thread's: under a flood of requests the device keeps its CPU (0: equal shares)",
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
        return TorchCompile.parse(value)

    @field_validator("warm_batch_sizes", mode="before")
    @classmethod
    def _split_batches(cls, value: Any) -> Any:
        return (
            [part.strip() for part in value.split(",") if part.strip()] if isinstance(value, str) else value
        )

    @field_validator("warm_sizes", mode="before")
    @classmethod
    def _sizes(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        return [parse_size(v, square=True) if isinstance(v, str) else v for v in value]

    @field_validator("forwarded_allow_ips")
    @classmethod
    def _proxies(cls, value: str) -> str:
        from service.edge.connections import TrustedProxies  # noqa: PLC0415 - it imports settings' neighbours

        return TrustedProxies(value).spec

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
        "cache_dir",
        "compile_cache_dir",
        "tiny_decoder_dir",
        "default_model",
        "max_size",
        "max_queue_s",
        "rate_limit_burst",
        "max_connections_per_address",
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
        _ = self.engine  # the engine's own checks (warm batch sizes within max_batch_size)
        if self.max_size is not None and self.min_size > self.max_size:
            raise ValueError(f"min_size ({self.min_size}) is larger than max_size ({self.max_size})")
        if self.models and self.engine.model_dir is not None:
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

    def per_address_limit(self, max_connections: int) -> int:
        """The connections one client address may hold: the setting, else an eighth of the total cap."""
        if self.max_connections_per_address is not None:
            return self.max_connections_per_address
        return max(1, max_connections // 8)

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
        return [(None, self.engine.model_dir)]

    @property
    def engine(self) -> EngineConfig:
        """The engine's settings as the engine takes them (for the one model; `model_dirs` names each)."""
        return EngineConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(EngineConfig)})
