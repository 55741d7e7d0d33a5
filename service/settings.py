"""Service settings: one pydantic-settings class, read from `TIUE_*` environment variables."""

from __future__ import annotations

import os
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from engine.config import EngineConfig
from engine.types import BackendName, Precision


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


class Settings(BaseSettings):
    """Everything the service reads from its environment; passed into `create_app`."""

    model_config = SettingsConfigDict(env_prefix="TIUE_", case_sensitive=False, extra="ignore")

    # The model and how it runs (forwarded to engine.EngineConfig).
    model_dir: Path | None = None  # None: the embedded default model
    backend: BackendName = BackendName.TORCH
    device: str = "cpu"
    dtype: Precision = Precision.FP32
    steps: int = Field(default=4, ge=1, le=50)
    engine_dir: Path | None = None
    build_engines: bool = False
    torch_compile: bool = False
    threads: int = Field(default=0, ge=0, le=256, description="CPU intra-op threads; 0: the library default")

    # Batching and admission.
    max_batch_size: int = Field(default=4, ge=1, le=256, description="images per engine call")
    max_wait_ms: float = Field(
        default=10.0, ge=0, le=10_000, description="how long the oldest request may wait"
    )
    queue_size: int = Field(default=64, ge=1, description="images waiting, beyond which requests get 429")
    request_timeout_s: float = Field(default=120.0, gt=0)
    shutdown_grace_s: float = Field(default=30.0, ge=0)

    # Request limits.
    max_n: int = Field(default=8, ge=1, le=64)
    min_size: int = Field(default=64, ge=8)
    max_size: int = Field(default=1024, ge=8)
    max_body_bytes: int = Field(default=65_536, ge=1024)
    max_prompt_chars: int = Field(default=4_000, ge=1)
    prompt_policy: PromptPolicy = PromptPolicy.TRUNCATE

    # Edge.
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65_535)
    encode_threads: int = Field(default_factory=_default_encode_threads, ge=1, le=64)
    log_level: LogLevel = LogLevel.INFO

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [key.strip() for key in value.split(",") if key.strip()]
        return value

    @field_validator("model_dir", "engine_dir", mode="before")
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("backend", "dtype", "log_level", "prompt_policy", mode="before")
    @classmethod
    def _lowercase(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.min_size > self.max_size:
            raise ValueError(f"min_size ({self.min_size}) is larger than max_size ({self.max_size})")
        if self.queue_size < self.max_n:
            raise ValueError(
                f"queue_size ({self.queue_size} images) is smaller than max_n ({self.max_n}): "
                "a request for max_n images could never be admitted"
            )
        return self

    @property
    def max_wait_s(self) -> float:
        return self.max_wait_ms / 1000.0

    @property
    def auth_enabled(self) -> bool:
        return bool(self.api_keys)

    def engine_config(self) -> EngineConfig:
        return EngineConfig(
            model_dir=self.model_dir,
            backend=self.backend,
            device=self.device,
            precision=self.dtype,
            steps=self.steps,
            engine_dir=self.engine_dir,
            build_engines=self.build_engines,
            torch_compile=self.torch_compile,
            max_batch_size=self.max_batch_size,
            threads=self.threads,
        )
