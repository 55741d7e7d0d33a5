"""The models one server serves: each a name (from settings), a pipeline, and its own cost model.

All of them share one device thread and one batcher; a batch holds one model (`BatchKey.model`), and
admission prices a request with its own model's cost per image, so a cheap model is not charged what
a dear one costs, nor the other way round.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from engine.types import ModelInfo
from service.errors import ModelNotFound
from service.protocol import Pipeline, PipelineFactory
from service.scheduling.cost import CostModel
from service.settings import check_alias


@dataclass(frozen=True)
class ModelSpec:
    """A model to load: the name it is served under (None: the name its pipeline reports) and its factory."""

    name: str | None
    factory: PipelineFactory


@dataclass
class ServedModel:
    name: str  # what clients send as `model`; from settings (or the pipeline's own name)
    pipeline: Pipeline
    loaded_at: int  # Unix seconds: OpenAI's `created`
    cost: CostModel = field(default_factory=CostModel)

    @property
    def info(self) -> ModelInfo:
        return self.pipeline.info


class Models:
    """Name → served model, in the configured order; filled by `ServiceState.load`, read by the routes."""

    def __init__(self, default: str | None = None, aliases: Mapping[str, str] | None = None):
        self._by_name: dict[str, ServedModel] = {}
        self._default = default  # None: the first model added
        self.aliases = dict(aliases or {})  # alias -> the served model it names (TIUE_MODEL_ALIASES)

    def add(self, model: ServedModel) -> None:
        if model.name in self._by_name:
            raise ValueError(f"two models are named '{model.name}'")
        self._by_name[model.name] = model

    @property
    def default(self) -> str:
        if self._default is not None:
            return self._default
        return next(iter(self._by_name))

    @property
    def names(self) -> list[str]:
        return list(self._by_name)

    def get(self, name: str | None) -> ServedModel:
        """The model called `name` (None: the default); 404 model_not_found, listing the served names."""
        wanted = self.default if name is None else self.aliases.get(name, name)
        model = self._by_name.get(wanted)
        if model is None:
            raise ModelNotFound(wanted, self.names + list(self.aliases))
        return model

    def check_aliases(self) -> None:
        """Once every model is loaded: each alias names one of them (ValueError in one line if not)."""
        for alias, target in self.aliases.items():
            check_alias(alias, target, self.names)

    def __iter__(self) -> Iterator[ServedModel]:
        return iter(self._by_name.values())

    def __len__(self) -> int:
        return len(self._by_name)
