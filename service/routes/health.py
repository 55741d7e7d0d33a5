"""Liveness, readiness and metrics; always open, never behind the API key."""

from __future__ import annotations

import time
from typing import Literal

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4
from pydantic import BaseModel, Field

from service.deps import State
from service.state import Phase

router = APIRouter(tags=["health"])

# The text format every Prometheus reads; prometheus_client's "latest" (1.0.0) is refused by Prometheus 2.
METRICS_MEDIA_TYPE = CONTENT_TYPE_PLAIN_0_0_4


class Readiness(BaseModel):
    status: Literal["loading", "ready", "busy", "draining", "failed"] = Field(
        description="busy: the device has been on one batch for longer than the request timeout"
    )
    queued_images: int
    queued_seconds: float = Field(description="estimated device seconds of admitted work not yet done")
    model: str | None = Field(
        default=None, description="the default model's name, once every model is loaded"
    )
    models: dict[str, str] = Field(
        default_factory=dict, description="each configured model by name: loading, ready or failed"
    )
    detail: str | None = Field(default=None, description="why it is not ready")


@router.get("/livez", summary="The process is up and its event loop answers")
async def livez() -> dict[str, str]:
    return {"status": "alive"}


@router.get(
    "/readyz",
    summary="200 only while every model is loaded, warmed, and new work is accepted",
    response_model=None,
    responses={
        200: {"model": Readiness, "description": "Ready: status is `ready`."},
        503: {"model": Readiness, "description": "Not ready: loading, busy, draining or failed."},
    },
)
async def readyz(state: State) -> JSONResponse:
    status: str = state.phase.value
    detail = state.failure
    busy_since = state.worker.busy_since
    timeout = state.settings.request_timeout_s
    if state.phase is Phase.READY and busy_since is not None and time.monotonic() - busy_since > timeout:
        status = "busy"  # a request sent here now would time out: let the load balancer send it elsewhere
        detail = (
            f"the device has been on one batch for {time.monotonic() - busy_since:.0f} s, "
            f"longer than the {timeout:g} s request timeout"
        )
    body = Readiness(
        status=status,  # type: ignore[arg-type]
        queued_images=state.batcher.pending_images,
        queued_seconds=round(state.batcher.ledger.queued_seconds, 3),
        model=state.models.default if state.ready.is_set() else None,
        models={name: phase.value for name, phase in state.model_phases.items()},
        detail=detail,
    )
    return JSONResponse(
        body.model_dump(mode="json", exclude_none=True), status_code=200 if status == "ready" else 503
    )


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={
        200: {
            "description": "The Prometheus text exposition format.",
            "content": {METRICS_MEDIA_TYPE: {"schema": {"type": "string"}}},
        }
    },
)
async def metrics(state: State) -> Response:
    return Response(state.metrics.exposition(), media_type=METRICS_MEDIA_TYPE)
