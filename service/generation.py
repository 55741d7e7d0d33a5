"""One generation request's path, shared by both routes: check limits, queue, wait, encode."""

from __future__ import annotations

import asyncio
import base64
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

from starlette.types import Message

from engine.card import fit_warnings
from engine.types import DEVICE_STAGES, Decoder, GeneratedImage, GenerationRequest, ModelInfo, Moderation
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
from service.scheduling.batcher import BatchKey, ItemResult, MicroBatcher
from service.settings import PromptPolicy, Settings
from service.state import ServiceState

_SIZE = re.compile(r"^\s*(\d{1,5})\s*[xX×]\s*(\d{1,5})\s*$")
_SEED_SPACE = 2**32
T = TypeVar("T")


@dataclass(frozen=True)
class Job:
    """A validated request, whichever route it came from."""

    model: ServedModel
    prompt: str
    n: int
    width: int
    height: int
    seed: int
    output_format: OutputFormat
    quality: int | None = None
    decoder: Decoder | None = None  # None: the model's default (TIUE_DECODER)
    moderation: Moderation | None = None  # None: not asked (the checker's default, auto)


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
    if width is not None and height is not None:
        return width, height
    if size is None or size.strip().lower() == "auto":
        return info.default_size, info.default_size
    match = _SIZE.match(size)
    if match is None:
        raise InvalidInput(f"size '{size}' is not WIDTHxHEIGHT in pixels, e.g. '512x512'", param="size")
    return int(match.group(1)), int(match.group(2))


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


def resolve_decoder(info: ModelInfo, decoder: Decoder | None) -> Decoder:
    """The decoder a request gets (None: the model's default); 422 naming the choices when it has not that one."""
    chosen = decoder or info.default_decoder
    if chosen not in info.decoders:
        raise InvalidInput(
            f"decoder '{chosen.value}' is not available for model {info.name}; choose one of: "
            + ", ".join(d.value for d in info.decoders),
            param="decoder",
        )
    return chosen


def openai_decoder(info: ModelInfo, quality: str | None) -> Decoder | None:
    """OpenAI's `quality`: "low" is the tiny decoder where the model has one; anything else, the default."""
    return Decoder.TINY if quality == "low" and Decoder.TINY in info.decoders else None


def random_seed() -> int:
    return secrets.randbelow(_SEED_SPACE)


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
    model = job.model
    pipeline, info = model.pipeline, model.info
    check_limits(state.settings, info, job.prompt, job.n, job.width, job.height)
    decoder = resolve_decoder(info, job.decoder)
    moderation = job.moderation or Moderation.AUTO
    requests = [
        GenerationRequest(
            job.prompt, (job.seed + i) % _SEED_SPACE, job.width, job.height, decoder, moderation
        )
        for i in range(job.n)
    ]
    for request in requests:
        pipeline.validate(request)

    timeout = state.settings.request_timeout_s
    deadline = caller.arrived + timeout
    images_by = device_deadline(caller.arrived, timeout)
    size = requests[0].shape_key
    with state.tracing.span("admission", images=job.n):
        cost = state.admission.admit(
            caller.client, size, job.n, images_by, info.size_multiple, cost_model=model.cost
        )
    # Counted once admitted: a refused request is never tokenized (under overload, most are refused).
    tokens = pipeline.count_tokens(job.prompt)
    warnings = prompt_warnings(state, job.prompt, info, tokens) + moderation_warnings(info, job.moderation)
    warnings += fit_warnings(info, job.prompt, job.width, job.height)
    seeds = [request.seed for request in requests]
    annotate(images=job.n, size=f"{job.width}x{job.height}", seeds=seeds, decoder=decoder.value)
    key = BatchKey(model.name, job.width, job.height, decoder)
    futures = state.batcher.submit(
        key,
        requests,
        images_by,
        client=caller.client,
        request_id=request_id() or "",
        cost_s=cost,
        trace=state.tracing.current(),
    )
    return Submitted(job, futures, deadline, started, decoder, warnings, tokens)


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
