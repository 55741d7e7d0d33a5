"""Request and response bodies. Types are strict (no "2" for 2); limits that come from settings are
checked in `service.generation`, before anything is queued."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    field_validator,
    model_validator,
)

from engine.types import Decoder, Moderation
from service.images import OutputFormat

MODEL_FIELD = "a model this server serves (GET /v1/models); absent: the default model"
DECODER_FIELD = (
    "full: the model's VAE; tiny: its AutoencoderTiny, faster and a little softer (when the model has one, "
    "GET /v1/models lists its decoders); absent: the server's TIUE_DECODER"
)
MODERATION_FIELD = (
    "the safety checker's strictness where the model has one: auto (diffusers' default) or low (without its "
    "special-care adjustment); without a checker: ignored, with a warning"
)
WITHHELD: Literal["content_policy_violation"] = "content_policy_violation"  # ImageData.withheld: flagged
Seed = Annotated[StrictInt, Field(ge=0, le=2**32 - 1)]
Compression = Annotated[StrictInt, Field(ge=0, le=100)]


def _non_empty_prompt(value: str) -> str:
    if not value.strip():
        raise ValueError("the prompt is empty; describe the image to generate")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate such as "\ud800", which JSON can carry
        raise ValueError(
            f"the prompt holds {value[exc.start]!r} at character {exc.start}, which is not a Unicode "
            "character (a lone surrogate); send text in UTF-8"
        ) from None
    return value


class GenerateRequest(BaseModel):
    """`POST /generate`. Unknown fields are refused, so a misspelt `sede` does not pass silently."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"prompt": "a red circle on a blue square", "n": 2, "seed": 7}]},
    )

    prompt: StrictStr
    model: StrictStr | None = Field(default=None, description=MODEL_FIELD)
    n: Annotated[StrictInt, Field(ge=1)] = 1
    size: StrictStr | None = Field(
        default=None, description='"WIDTHxHEIGHT" in pixels; or give width and height'
    )
    width: Annotated[StrictInt, Field(ge=1)] | None = None
    height: Annotated[StrictInt, Field(ge=1)] | None = None
    seed: Seed | None = Field(
        default=None, description="image i gets seed + i (mod 2**32); random when absent"
    )
    output_format: OutputFormat = "png"
    output_compression: Compression | None = Field(
        default=None, description="jpeg/webp quality, 0-100 (default 90)"
    )
    decoder: Decoder | None = Field(default=None, description=DECODER_FIELD)
    moderation: Moderation | None = Field(default=None, description=MODERATION_FIELD)

    _prompt = field_validator("prompt")(_non_empty_prompt)

    @model_validator(mode="after")
    def _one_way_to_give_size(self) -> GenerateRequest:
        if self.size is not None and (self.width is not None or self.height is not None):
            raise ValueError("give either size or width and height, not both")
        if (self.width is None) != (self.height is None):
            raise ValueError("give both width and height, or neither")
        return self


class OpenAIImageRequest(BaseModel):
    """`POST /v1/images/generations`, OpenAI's images API. Fields this server does not use are accepted,
    and named in the answer's `warnings` (service.compat)."""

    model_config = ConfigDict(extra="allow")

    prompt: StrictStr
    n: Annotated[StrictInt, Field(ge=1)] | None = 1
    size: StrictStr | None = Field(
        default=None, description='"WIDTHxHEIGHT" or "auto" (the model\'s default size)'
    )
    response_format: StrictStr | None = "b64_json"
    output_format: OutputFormat | None = None
    output_compression: Compression | None = None
    background: Literal["auto", "opaque"] | None = None
    model: StrictStr | None = Field(default=None, description=MODEL_FIELD)
    quality: StrictStr | None = Field(
        default=None, description='"low": the tiny decoder when the model has one; other values: ignored'
    )
    style: StrictStr | None = Field(default=None, description="ignored (named in warnings)")
    user: StrictStr | None = Field(default=None, description="ignored (named in warnings)")
    seed: Seed | None = Field(default=None, description="extension: image i gets seed + i (mod 2**32)")
    moderation: Moderation | None = Field(default=None, description=MODERATION_FIELD)
    stream: StrictBool | None = Field(
        default=False,
        description="true: answer text/event-stream, an image_generation.completed event per image "
        "(docs/api.md, Streaming)",
    )
    partial_images: Annotated[StrictInt, Field(ge=0, le=3)] | None = Field(
        default=None, description="accepted with stream; no partial images are sent (a warning says so)"
    )

    _prompt = field_validator("prompt")(_non_empty_prompt)

    @field_validator("response_format")
    @classmethod
    def _b64_only(cls, value: str | None) -> str | None:
        if value not in (None, "b64_json"):
            raise ValueError(f"'{value}' is not supported: this server returns images inline; use 'b64_json'")
        return value


class ImageData(BaseModel):
    b64_json: str | None = Field(description="the image; null when withheld")
    seed: int
    withheld: Literal["content_policy_violation"] | None = Field(
        default=None, description="set when the safety checker flagged the image: it is not returned"
    )


class Timings(BaseModel):
    """Seconds. Device stages are for the whole batch the request rode in (summed if it needed several)."""

    queue_wait: float
    text_encode: float
    denoise: float
    vae_decode: float
    safety_check: float = Field(default=0.0, description="0 when the model has no safety checker")
    image_encode: float
    total: float


class GenerateResponse(BaseModel):
    created: int
    model: str
    decoder: Decoder = Field(description="the decoder that made the images (also the X-Decoder header)")
    size: str
    output_format: OutputFormat
    data: list[ImageData]
    timings: Timings
    warnings: list[str] = Field(default_factory=list)


class OpenAIImagesResponse(BaseModel):
    created: int
    model: str = Field(description="extension: the model that made the images")
    decoder: Decoder = Field(description="extension: the decoder that made them (also X-Decoder)")
    data: list[ImageData]
    size: str
    output_format: OutputFormat
    warnings: list[str] = Field(
        default_factory=list,
        description="extension: what was not done as asked (parameters ignored, a prompt truncated)",
    )


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None
    request_id: str | None = None  # the answer's X-Request-ID


class ErrorResponse(BaseModel):
    error: ErrorDetail
