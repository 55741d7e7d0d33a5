"""Liveness, readiness and metrics; always open, never behind the API key."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4
from pydantic import BaseModel, Field

from service.state import Phase, ServiceState

router = APIRouter(tags=["health"])

# The text format every Prometheus reads; prometheus_client's "latest" (1.0.0) is refused by Prometheus 2.
METRICS_MEDIA_TYPE = CONTENT_TYPE_PLAIN_0_0_4


class Readiness(BaseModel):
    status: Phase
    queued_images: int
    model: str | None = Field(default=None, description="the loaded model's name, once loaded")
    detail: str | None = Field(default=None, description="why loading failed")


def _state(request: Request) -> ServiceState:
    state: ServiceState = request.app.state.tiue
    return state


@router.get("/livez", summary="The process is up and its event loop answers")
async def livez() -> dict[str, str]:
    return {"status": "alive"}


@router.get(
    "/readyz",
    summary="200 only while the model is loaded, warmed, and new work is accepted",
    response_model=None,
    responses={
        200: {"model": Readiness, "description": "Ready: status is `ready`."},
        503: {"model": Readiness, "description": "Not ready: loading, draining or failed."},
    },
)
async def readyz(request: Request) -> JSONResponse:
    state = _state(request)
    body = Readiness(
        status=state.phase,
        queued_images=state.batcher.pending_images,
        model=state.pipeline.info.name if state.pipeline is not None else None,
        detail=state.failure,
    )
    status = 200 if state.phase is Phase.READY else 503
    return JSONResponse(body.model_dump(mode="json", exclude_none=True), status_code=status)


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
async def metrics(request: Request) -> Response:
    return Response(_state(request).metrics.exposition(), media_type=METRICS_MEDIA_TYPE)
