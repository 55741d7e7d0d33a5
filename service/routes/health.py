"""Liveness, readiness and metrics; always open, never behind the API key."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from service.state import Phase, ServiceState

router = APIRouter(tags=["health"])


def _state(request: Request) -> ServiceState:
    state: ServiceState = request.app.state.tiue
    return state


@router.get("/livez", summary="The process is up and its event loop answers")
async def livez() -> dict[str, str]:
    return {"status": "alive"}


@router.get("/readyz", summary="200 only while the model is loaded, warmed, and new work is accepted")
async def readyz(request: Request) -> JSONResponse:
    state = _state(request)
    body: dict[str, Any] = {"status": state.phase.value, "queued_images": state.batcher.pending_images}
    if state.pipeline is not None:
        body["model"] = state.pipeline.info.name
    if state.failure is not None:
        body["detail"] = state.failure
    return JSONResponse(body, status_code=200 if state.phase is Phase.READY else 503)


@router.get("/metrics", summary="Prometheus metrics")
async def metrics(request: Request) -> Response:
    return Response(_state(request).metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
