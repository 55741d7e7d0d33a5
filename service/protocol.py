"""What the service needs from a pipeline, so tests and benchmarks can hand `create_app` a fake one."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from engine.types import BatchResult, GenerationRequest, ModelInfo


class Pipeline(Protocol):
    """The slice of `engine.TiUEPipeline` the service uses; `generate` and `warmup` block on the device."""

    @property
    def info(self) -> ModelInfo: ...

    def validate(self, request: GenerationRequest) -> None:
        """Raise engine.errors.InvalidRequestError (or a subclass) with a message a person can act on."""

    def count_tokens(self, prompt: str) -> int:
        """Tokens the prompt encodes to, BOS/EOS included, before truncation."""
        ...

    def generate(self, requests: Sequence[GenerationRequest]) -> BatchResult:
        """One image per request, in order; all requests share one `shape_key`."""
        ...

    def warmup(
        self, batch_sizes: Sequence[int] | None = None, sizes: Sequence[tuple[int, int]] | None = None
    ) -> None:
        """Run each shape once before serving (default: what the pipeline is configured to warm)."""


PipelineFactory = Callable[[], Pipeline]
"""Builds a pipeline; called once, in the device thread, during the app's startup."""
