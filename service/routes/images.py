"""`POST /generate` (this server's API) and `POST /v1/images/generations` (OpenAI's)."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Depends, Request, Security
from fastapi.responses import Response

from service.compat import compression_warnings, openai_warnings
from service.deps import CallerDep, State
from service.edge.auth import bearer_scheme
from service.errors import NotAcceptable, UnsupportedMediaType
from service.generation import (
    Job,
    JobOutput,
    finish_job,
    openai_decoder,
    parse_size,
    random_seed,
    resolve_model,
    run_job,
    submit_job,
)
from service.images import MEDIA_TYPES, ImagePreference, OutputFormat, negotiate
from service.schemas import (
    WITHHELD,
    ErrorResponse,
    GenerateRequest,
    GenerateResponse,
    ImageData,
    OpenAIImageRequest,
    OpenAIImagesResponse,
    Timings,
)
from service.streaming import PARTIAL_IMAGES_WARNING, stream_job


async def require_json(request: Request) -> None:
    """415 for a body that is not declared JSON (curl -d sends a form unless told otherwise)."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media != "application/json" and not media.endswith("+json"):
        raise UnsupportedMediaType(
            f"the body must be JSON, sent with 'Content-Type: application/json' (got '{media or 'none'}')"
        )


router = APIRouter(tags=["images"], dependencies=[Security(bearer_scheme), Depends(require_json)])

_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse} for status in (400, 401, 404, 406, 413, 415, 422, 429, 500, 503, 504)
}
_IMAGE_CONTENT = {media: {"schema": {"type": "string", "format": "binary"}} for media in MEDIA_TYPES.values()}


def _headers(output: JobOutput) -> dict[str, str]:
    headers = {"Server-Timing": output.server_timing(), "X-Decoder": output.decoder.value}
    if output.warnings:
        headers["X-Warning"] = " | ".join(output.warnings)
    return headers


def _data(output: JobOutput) -> list[ImageData]:
    return [
        ImageData(b64_json=None, seed=image.seed, withheld=WITHHELD)
        if image.data is None
        else ImageData(b64_json=image.data.decode("ascii"), seed=image.seed)
        for image in output.images
    ]


def _output_format(body: GenerateRequest, preference: ImagePreference) -> OutputFormat:
    """The format to encode in; 406 when raw bytes cannot carry the answer or disagree with the body."""
    if not preference.raw:
        return body.output_format
    if body.n != 1:
        raise NotAcceptable(
            f"Accept asks for raw image bytes, which carry one image, but n is {body.n}; ask for application/json",
            param="n",
        )
    wanted = preference.output_format
    if wanted is None:
        return body.output_format
    if "output_format" in body.model_fields_set and wanted != body.output_format:
        raise NotAcceptable(
            f"Accept asks for image/{wanted} but output_format is {body.output_format}", param="output_format"
        )
    return wanted


@router.post(
    "/generate",
    summary="Generate images; JSON with base64 images, or raw bytes for `Accept: image/*` and n = 1",
    response_model=None,
    responses={200: {"model": GenerateResponse, "content": _IMAGE_CONTENT}, **_ERRORS},
)
async def generate(body: GenerateRequest, request: Request, state: State, caller: CallerDep) -> Response:
    model = resolve_model(state, body.model)
    preference = negotiate(request.headers.get("accept"))
    output_format = _output_format(body, preference)
    width, height = parse_size(body.size, body.width, body.height, model.info)
    seed = random_seed() if body.seed is None else body.seed
    job = Job(
        model,
        body.prompt,
        body.n,
        width,
        height,
        seed,
        output_format,
        body.output_compression,
        body.decoder,
        body.moderation,
    )
    output = await run_job(state, job, caller, request.receive, b64=not preference.raw)
    output.warnings[:0] = compression_warnings(output_format, body.output_compression)

    headers = _headers(output)
    if preference.raw:
        image = output.images[0]
        headers["X-Seed"] = str(image.seed)
        headers["X-Model"] = model.name
        return Response(image.data, media_type=MEDIA_TYPES[output_format], headers=headers)
    response = GenerateResponse(
        created=int(time.time()),
        model=model.name,
        decoder=output.decoder,
        size=f"{width}x{height}",
        output_format=job.output_format,
        data=_data(output),
        timings=Timings(**output.timings),
        warnings=output.warnings,
    )
    return Response(response.model_dump_json(), media_type="application/json", headers=headers)


@router.post(
    "/v1/images/generations",
    summary="OpenAI-compatible image generation (response_format b64_json; stream: server-sent events)",
    response_model=None,
    responses={
        200: {
            "model": OpenAIImagesResponse,
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
        },
        **{k: v for k, v in _ERRORS.items() if k != 406},
    },
)
async def openai_generations(
    body: OpenAIImageRequest, request: Request, state: State, caller: CallerDep
) -> Response:
    model = resolve_model(state, body.model)
    width, height = parse_size(body.size, None, None, model.info)
    seed = random_seed() if body.seed is None else body.seed
    output_format: OutputFormat = body.output_format or "png"
    decoder = openai_decoder(model.info, body.quality)
    n = body.n or 1
    job = Job(
        model,
        body.prompt,
        n,
        width,
        height,
        seed,
        output_format,
        body.output_compression,
        decoder,
        body.moderation,
    )
    submitted = submit_job(state, job, caller)  # what refuses the job does so here, before any stream
    submitted.warnings[:0] = openai_warnings(body, model.info)
    if body.partial_images:
        submitted.warnings.append(PARTIAL_IMAGES_WARNING)
    if body.stream:
        echo = {
            "size": f"{width}x{height}",
            "output_format": output_format,
            "background": body.background or "auto",
            "quality": body.quality or "auto",
        }
        return stream_job(state, submitted, echo)
    output = await finish_job(state, submitted, request.receive, b64=True)
    response = OpenAIImagesResponse(
        created=int(time.time()),
        model=model.name,
        decoder=output.decoder,
        data=_data(output),
        size=f"{width}x{height}",
        output_format=output_format,
        warnings=output.warnings,
    )
    return Response(response.model_dump_json(), media_type="application/json", headers=_headers(output))
