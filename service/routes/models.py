"""`GET /v1/models` and `GET /v1/models/{id}`: OpenAI's models API, plus what a client needs to ask well.

An alias (TIUE_MODEL_ALIASES) is listed after the models as an entry of its own, with `alias_of` naming
the model it stands for, so a tool that checks for `gpt-image-1` in the list finds it.

Behind the API key when keys are set, as OpenAI's are (the model names are the server's own business).
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Security
from pydantic import BaseModel, Field

from engine.types import Decoder
from service.deps import State
from service.edge.auth import bearer_scheme
from service.models import ServedModel
from service.schemas import ErrorResponse

OWNER = "tiue-serve"


class ModelObject(BaseModel):
    """OpenAI's model object (`id`, `object`, `created`, `owned_by`); the rest are this server's."""

    id: str
    object: Literal["model"] = "model"
    created: int = Field(description="Unix seconds: when this server loaded the model")
    owned_by: str = OWNER
    default: bool = Field(description="the model a request without `model` gets")
    native_size: str = Field(description='"WxH": the size of `"size": "auto"`')
    size_multiple: int = Field(description="width and height must be multiples of this (pixels)")
    steps: int
    backend: str
    precision: str
    device: str
    max_prompt_tokens: int
    decoders: list[Decoder] = Field(description='what `"decoder"` in /generate may name')
    default_decoder: Decoder = Field(description="the decoder of a request that names none")
    trained_sizes: list[str] = Field(
        description='"WxH" sizes the model was trained at and draws well; others get a warning'
    )
    vocabulary: list[str] | None = Field(
        description="the words the model was trained on (others get a warning); null: not known"
    )
    safety_checker: bool = Field(
        default=False, description="its images pass a safety checker (flagged ones are withheld)"
    )
    alias_of: str | None = Field(
        default=None, description="set on an alias (TIUE_MODEL_ALIASES): the served model it names"
    )


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelObject]


router = APIRouter(tags=["models"], dependencies=[Security(bearer_scheme)])

_ERRORS: dict[int | str, dict[str, Any]] = {status: {"model": ErrorResponse} for status in (401, 503)}


def model_object(model: ServedModel, default: str, alias: str | None = None) -> ModelObject:
    """The model, or under `alias` the same model named by that alias (`alias_of` names the model)."""
    info = model.info
    return ModelObject(
        id=alias or model.name,
        alias_of=model.name if alias else None,
        created=model.loaded_at,
        default=alias is None and model.name == default,
        native_size=f"{info.default_size}x{info.default_size}",
        size_multiple=info.size_multiple,
        steps=info.steps,
        backend=info.backend,
        precision=info.precision,
        device=info.device,
        max_prompt_tokens=info.max_prompt_tokens,
        decoders=list(info.decoders),
        default_decoder=info.default_decoder,
        trained_sizes=[f"{w}x{h}" for w, h in info.trained_sizes],
        vocabulary=None if info.vocabulary is None else list(info.vocabulary),
        safety_checker=info.safety_checker,
    )


@router.get("/v1/models", summary="The models this server serves", responses=_ERRORS)
async def list_models(state: State) -> ModelList:
    state.require_model(None)  # 503 until every model is loaded
    default = state.models.default
    models = state.models
    aliases = [model_object(models.get(alias), default, alias) for alias in models.aliases]
    return ModelList(data=[*(model_object(model, default) for model in models), *aliases])


@router.get(
    "/v1/models/{model_id}",
    summary="One model this server serves",
    responses={**_ERRORS, 404: {"model": ErrorResponse}},
)
async def retrieve_model(model_id: str, state: State) -> ModelObject:
    alias = model_id if model_id in state.models.aliases else None
    return model_object(state.require_model(model_id), state.models.default, alias)
