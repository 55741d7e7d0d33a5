"""OpenAI image streaming: `stream: true` on `/v1/images/generations` answers `text/event-stream`.

The events are those the official client parses (openai-python `ImageGenStreamEvent`): one
`image_generation.completed` per image returned, or one `error` event (`{"type": "error", "error":
{...}}`, the body of a JSON error) when the job fails after the stream began. What can refuse a job
(validation, admission) does so before the stream, as an ordinary JSON error.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.responses import StreamingResponse
from starlette.types import Message, Receive, Scope, Send

from service.errors import ClientDisconnected, error_body
from service.generation import JobOutput, Submitted, finish_job
from service.state import ServiceState

logger = logging.getLogger(__name__)

COMPLETED = "image_generation.completed"
PARTIAL_IMAGES_WARNING = (
    "partial_images was not honoured: every image is sent once, complete (decoding each step's prediction "
    "besides the final image cost 1.4-1.8x the batch's device time with the tiny decoder)"
)


def sse(event: str, data: dict[str, Any]) -> bytes:
    """One server-sent event; the JSON is on one line, so one `data:` field carries it."""
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def usage(prompt_tokens: int) -> dict[str, Any]:
    """OpenAI's token usage: the prompt's tokens (BOS/EOS included); images are not counted in tokens."""
    return {
        "input_tokens": prompt_tokens,
        "input_tokens_details": {"image_tokens": 0, "text_tokens": prompt_tokens},
        "output_tokens": 0,
        "total_tokens": prompt_tokens,
    }


def completed_events(output: JobOutput, echo: dict[str, Any]) -> list[bytes]:
    """An `image_generation.completed` event per image returned; a withheld image has none (the
    events' `warnings` name it). `echo`: the request's size, output_format, background, quality."""
    created = int(time.time())
    events = []
    for image in output.images:
        if image.data is None:
            continue
        data = {
            "type": COMPLETED,
            "b64_json": image.data.decode("ascii"),
            "created_at": created,
            **echo,
            "usage": usage(output.prompt_tokens),
            "seed": image.seed,  # extensions, as on the JSON answer
            "decoder": output.decoder.value,
            "warnings": output.warnings,
        }
        events.append(sse(COMPLETED, data))
    return events


async def _never() -> Message:
    """The stream's `receive`: the response itself watches for the client's disconnect."""
    await asyncio.Event().wait()
    raise AssertionError("unreachable")


async def events(state: ServiceState, submitted: Submitted, echo: dict[str, Any]) -> AsyncIterator[bytes]:
    try:
        output = await finish_job(state, submitted, _never, b64=True)
    except asyncio.CancelledError:  # the client hung up (the response cancels its stream)
        state.metrics.rejected.labels(reason=ClientDisconnected.reason, model=submitted.job.model.name).inc()
        raise
    except Exception as exc:  # answered in the stream: its status line has gone
        _error, body = error_body(exc, state.metrics)
        yield sse("error", {"type": "error", **body})
        return
    for event in completed_events(output, echo):
        yield event


class EventStream(StreamingResponse):
    """`text/event-stream` that runs `on_close` however it ends: a client that hangs up before the first
    event cancels its queued work too (Starlette then cancels the stream before it starts)."""

    def __init__(self, content: AsyncIterator[bytes], on_close: Callable[[], None], headers: dict[str, str]):
        super().__init__(
            content,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **headers},
        )
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


def stream_job(state: ServiceState, submitted: Submitted, echo: dict[str, Any]) -> EventStream:
    def cancel() -> None:
        for future in submitted.futures:
            future.cancel()

    headers = {"X-Decoder": submitted.decoder.value}
    if submitted.warnings:
        headers["X-Warning"] = " | ".join(submitted.warnings)
    return EventStream(events(state, submitted, echo), cancel, headers)
