"""One generation request's path, shared by both routes: check limits, queue, wait, encode."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

from starlette.types import Message

from engine.card import fit_warnings
from engine.types import (
    DEVICE_STAGES,
    Decoder,
    GeneratedImage,
    GenerationRequest,
    ModelInfo,
    Moderation,
    random_seed,
)
from engine.types import parse_size as parse_engine_size
from service.edge.caller import Caller
from service.edge.logs import annotate, request_id
from service.errors import (
    BatchFailed,
    ClientDisconnected,
    ContentPolicyViolation,
    DeadlineExceeded,
    InvalidInput,
)
from service.images import OutputFormat, encode_image
from service.metrics import IMAGE_ENCODE
from service.models import ServedModel
from service.scheduling.admission import device_deadline
from service.scheduling.batcher import ItemResult, MicroBatcher
from service.schemas import GenerateRequest, OpenAIImageRequest
from service.settings import PromptPolicy, Settings
from service.state import ServiceState

ImageRequestBody = GenerateRequest | OpenAIImageRequest
T = TypeVar("T")


@dataclass(frozen=True, kw_only=True)
class Job:
    """A request with every default resolved (`resolve_job`): the model that serves it, one engine request
    per image, and how to encode the answer. The batcher, the worker and the engine take it as it is."""

    model: ServedModel
    images: tuple[GenerationRequest, ...]  # image i has seed + i (mod 2**32); all else is shared
    output_format: OutputFormat
    quality: int | None = None
    warnings: tuple[str, ...] = ()  # what resolving it found to say (a parameter ignored)

    @property
    def request(self) -> GenerationRequest:
        """The first image's request: what all its images share."""
        return self.images[0]

    @property
    def decoder(self) -> Decoder:
        decoder = self.request.decoder
        assert decoder is not None, "resolve_job resolves the decoder"
        return decoder


@dataclass
class EncodedImage:
    data: bytes | None  # the encoded file, or its base64 when the answer is JSON; None: withheld
    seed: int

    @property
    def withheld(self) -> bool:
        """The safety checker flagged it: the answer says so in its place."""
        return self.data is None


@dataclass
class JobOutput:
    images: list[EncodedImage]
    timings: dict[str, float]
    warnings: list[str] = field(default_factory=list)
    decoder: Decoder = Decoder.FULL
    prompt_tokens: int = 0  # BOS/EOS included, before truncation (the stream's usage)

    def server_timing(self) -> str:
        """The `Server-Timing` header: the same timings in milliseconds, readable in browser dev tools."""
        return ", ".join(f"{name};dur={seconds * 1000:.1f}" for name, seconds in self.timings.items())


def parse_size(size: str | None, width: int | None, height: int | None, info: ModelInfo) -> tuple[int, int]:
    """The size a request asks for: width and height, or "WIDTHxHEIGHT" (engine.types.parse_size: strict),
    or none (or OpenAI's "auto"): the model's native size."""
    if width is not None and height is not None:
        return width, height
    if size is None or size.strip().lower() == "auto":
        return info.default_size, info.default_size
    try:
        return parse_engine_size(size)
    except ValueError as exc:
        raise InvalidInput(str(exc), param="size") from None


# GenerationRequest's fields resolve_job fills (defaults to resolve); the others are copied from the body.
RESOLVED = frozenset({"seed", "width", "height", "decoder", "moderation"})


def engine_fields(body: ImageRequestBody) -> dict[str, Any]:
    """The body's fields GenerationRequest has too, copied as they are: a new per-request field is declared
    in the schema and in GenerationRequest, and nowhere between."""
    shared = {f.name for f in dataclasses.fields(GenerationRequest)} - RESOLVED
    return {name: getattr(body, name) for name in shared if name in type(body).model_fields}


def resolve_job(
    state: ServiceState,
    model: ServedModel,
    body: ImageRequestBody,
    *,
    size: tuple[int, int],
    n: int,
    decoder: Decoder | None,
    output_format: OutputFormat,
) -> Job:
    """Every default resolved once (size, seed, decoder, moderation; the model already is), within the
    server's limits: 422 naming the parameter otherwise."""
    width, height = size
    check_limits(state.settings, model.info, body.prompt, n, width, height)
    request = GenerationRequest(
        **engine_fields(body),
        seed=random_seed() if body.seed is None else body.seed,
        width=width,
        height=height,
        decoder=model.info.decoder_for(decoder),
        moderation=body.moderation or Moderation.AUTO,
    )
    return Job(
        model=model,
        images=request.images(n),
        output_format=output_format,
        quality=body.output_compression,
        warnings=tuple(moderation_warnings(model.info, body.moderation)),
    )


def check_limits(settings: Settings, info: ModelInfo, prompt: str, n: int, width: int, height: int) -> None:
    """The limits that protect the device, from settings; the model's own rules come from validate()."""
    max_size = settings.size_limit(info.default_size)
    if n > settings.max_n:
        raise InvalidInput(
            f"n is {n}; this server makes at most {settings.max_n} images per request", param="n"
        )
    for name, value in (("width", width), ("height", height)):
        if not settings.min_size <= value <= max_size:
            raise InvalidInput(
                f"{name} is {value} px; this server accepts {settings.min_size} to {max_size} px",
                param="size",
            )
    if len(prompt) > settings.max_prompt_chars:
        raise InvalidInput(
            f"the prompt is {len(prompt)} characters; this server accepts at most {settings.max_prompt_chars}",
            param="prompt",
        )


def prompt_warnings(state: ServiceState, prompt: str, info: ModelInfo, tokens: int) -> list[str]:
    """Apply the prompt policy: a warning when truncating, 422 when refusing."""
    window = info.max_prompt_tokens
    if tokens <= window:
        return []
    message = (
        f"the prompt is {tokens} tokens; the text encoder reads {window} including its start and end "
        f"tokens, so the last {tokens - window} tokens were ignored"
    )
    if state.settings.prompt_policy is PromptPolicy.REJECT:
        raise InvalidInput(message.replace("were ignored", "would be ignored; shorten it"), param="prompt")
    state.metrics.prompts_truncated.inc()
    return [message]


def resolve_model(state: ServiceState, name: str | None) -> ServedModel:
    """The model a request asks for (None: the default), named on its access line and in its metrics
    from here on; an unknown name is a 404 and never becomes a label."""
    model = state.require_model(name)
    annotate(model=model.name)
    return model


def openai_decoder(info: ModelInfo, quality: str | None) -> Decoder | None:
    """OpenAI's `quality`: "low" is the tiny decoder where the model has one; anything else, the default."""
    return Decoder.TINY if quality == "low" and Decoder.TINY in info.decoders else None


@dataclass
class Submitted:
    """A job admitted and queued: what `finish_job` waits for."""

    job: Job
    futures: list[asyncio.Future[ItemResult]]
    deadline: float  # monotonic: the request's arrival plus the timeout
    started: float  # perf_counter at the job's start
    decoder: Decoder
    warnings: list[str]
    prompt_tokens: int


async def run_job(
    state: ServiceState, job: Job, caller: Caller, receive: Callable[[], Awaitable[Message]], b64: bool
) -> JobOutput:
    """Validate against the model, admit by cost, queue, wait for the images (or a disconnect or the
    deadline, counted from the request's arrival), encode."""
    return await finish_job(state, submit_job(state, job, caller), receive, b64)


def moderation_warnings(info: ModelInfo, moderation: Moderation | None) -> list[str]:
    if moderation is None or info.safety_checker:
        return []
    return [f"moderation '{moderation.value}' was ignored: model {info.name} runs no safety checker"]


def submit_job(state: ServiceState, job: Job, caller: Caller) -> Submitted:
    """Everything that can refuse a job before its answer starts: limits, the model's rules, admission."""
    started = time.perf_counter()
    model, request, n = job.model, job.request, len(job.images)
    model.pipeline.validate(request)  # its images differ only in their seeds, each within range

    timeout = state.settings.request_timeout_s
    deadline = caller.arrived + timeout
    images_by = device_deadline(caller.arrived, timeout)
    key = request.batch_key
    with state.tracing.span("admission", images=n):
        cost = state.admission.admit(
            caller.client, key, n, images_by, model.info.size_multiple, cost_model=model.cost
        )
    # Counted once admitted: a refused request is never tokenized (under overload, most are refused).
    tokens = model.pipeline.count_tokens(request.prompt)
    warnings = prompt_warnings(state, request.prompt, model.info, tokens) + list(job.warnings)
    warnings += fit_warnings(model.info, request.prompt, key.width, key.height)
    seeds = [image.seed for image in job.images]
    annotate(images=n, size=f"{key.width}x{key.height}", seeds=seeds, decoder=job.decoder.value)
    futures = state.batcher.submit(
        model,
        job.images,
        images_by,
        client=caller.client,
        request_id=request_id() or "",
        cost_s=cost,
        trace=state.tracing.current(),
    )
    return Submitted(job, futures, deadline, started, job.decoder, warnings, tokens)


async def finish_job(
    state: ServiceState, submitted: Submitted, receive: Callable[[], Awaitable[Message]], b64: bool
) -> JobOutput:
    """Wait for a submitted job's images (or a disconnect, or the deadline), then encode those not withheld."""
    job, futures, deadline = submitted.job, submitted.futures, submitted.deadline
    timeout = state.settings.request_timeout_s
    try:
        results = await _unless_gone(
            MicroBatcher.results(futures), receive, deadline - time.monotonic(), timeout
        )
    except BatchFailed as exc:
        annotate(batch_ids=[exc.batch_id])
        raise
    finally:
        for future in futures:
            future.cancel()  # whatever ended the wait, nothing of it stays queued (a no-op once done)
    annotate(
        queue_wait_s=round(max(result.queue_wait_s for result in results), 4),
        batch_ids=sorted({result.batch_id for result in results}),
    )

    made = [image for result in results for image in result.images]
    warnings = submitted.warnings + _withheld_warnings(made)
    if all(image.flagged for image in made):
        annotate(withheld=len(made))
        raise ContentPolicyViolation(
            ("the image was" if len(made) == 1 else f"all {len(made)} images were")
            + " flagged by the safety checker and withheld; try another prompt or seed",
            param="prompt",
        )
    encode_started = time.perf_counter()
    shown = [image for image in made if not image.flagged]
    with state.tracing.span("image_encode", images=len(shown), format=job.output_format):
        encoded = iter(
            await asyncio.gather(*(state.run_encode(_encoder(p.pixels, job, b64, state)) for p in shown))
        )
    encode_s = time.perf_counter() - encode_started
    images = []
    for image in made:
        data = None if image.flagged else next(encoded)[0]
        images.append(EncodedImage(data, image.seed))
    timings = _timings(results, encode_s, time.perf_counter() - submitted.started)
    return JobOutput(images, timings, warnings, submitted.decoder, submitted.prompt_tokens)


def _withheld_warnings(images: list[GeneratedImage]) -> list[str]:
    return [
        f"image {index} (seed {image.seed}) was withheld: the safety checker flagged it"
        for index, image in enumerate(images)
        if image.flagged
    ]


def _encoder(pixels: Any, job: Job, b64: bool, state: ServiceState) -> Callable[[], tuple[bytes, float]]:
    def encode() -> tuple[bytes, float]:
        started = time.perf_counter()
        data = encode_image(pixels, job.output_format, job.quality)
        if b64:
            data = base64.b64encode(data)
        seconds = time.perf_counter() - started
        state.metrics.stage_duration.labels(stage=IMAGE_ENCODE, model=job.model.name).observe(seconds)
        return data, seconds

    return encode


def _timings(results: list[ItemResult], encode_s: float, total_s: float) -> dict[str, float]:
    timings = {"queue_wait": max(result.queue_wait_s for result in results)}
    for stage in DEVICE_STAGES:
        timings[stage] = sum(result.timings.get(stage, 0.0) for result in results)
    timings[IMAGE_ENCODE] = encode_s
    timings["total"] = total_s
    return timings


async def _unless_gone(
    work: Coroutine[Any, Any, T], receive: Callable[[], Awaitable[Message]], left: float, timeout: float
) -> T:
    """Await `work` for `left` seconds; cancel it (so its queued items are skipped) if the client
    disconnects or time runs out (`timeout` is the whole budget, for the message)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(receive))
    try:
        done, _pending = await asyncio.wait(
            {task, watcher}, timeout=max(left, 0.0), return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    if task in done:
        return task.result()
    if watcher in done:
        watcher.exception()  # retrieved, so asyncio does not log it; either way the client is gone
        raise ClientDisconnected("the client disconnected before its images were made")
    raise DeadlineExceeded(f"the request timed out after {timeout:g} s")


async def _disconnected(receive: Callable[[], Awaitable[Message]]) -> None:
    """Returns when the client goes away; the request body has already been read."""
    while (await receive())["type"] != "http.disconnect":
        pass
