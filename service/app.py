"""The app factory: settings in, FastAPI app out. No module-level app, engine or settings."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager, suppress
from dataclasses import replace

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response

from engine.config import EngineConfig
from engine.errors import EngineError
from service.edge.caller import ClientMiddleware, EarlyRefusalMiddleware
from service.edge.middleware import (
    BodyLimitMiddleware,
    InFlightMiddleware,
    RequestMetricsMiddleware,
    cors_options,
)
from service.edge.openapi import install_openapi
from service.edge.paths import RoutePaths
from service.errors import ServiceError, error_response
from service.models import ModelSpec
from service.protocol import Pipeline, PipelineFactory
from service.routes import docs, health, images, models, playground
from service.settings import Settings
from service.state import ServiceState
from service.tracing import Tracing

logger = logging.getLogger(__name__)


def engine_factory(config: EngineConfig) -> PipelineFactory:
    """The real pipeline, imported only when it is built (on the device thread, at startup)."""

    def build() -> Pipeline:
        from engine.pipeline import load_pipeline

        pipeline: Pipeline = load_pipeline(config)
        return pipeline

    return build


def model_specs(
    settings: Settings,
    pipeline_factory: PipelineFactory | None,
    pipeline_factories: Mapping[str, PipelineFactory] | None,
) -> list[ModelSpec]:
    """What to load, in order: the factories given (tests, benchmarks), else the models in settings."""
    if pipeline_factories:
        return [ModelSpec(name, factory) for name, factory in pipeline_factories.items()]
    if pipeline_factory is not None:
        return [ModelSpec(None, pipeline_factory)]  # one model, named by its own info
    config = settings.engine
    return [
        ModelSpec(name, engine_factory(replace(config, model_dir=folder)))
        for name, folder in settings.model_dirs()
    ]


def create_app(
    settings: Settings | None = None,
    pipeline_factory: PipelineFactory | None = None,
    on_fatal: Callable[[BaseException], None] | None = None,
    pipeline_factories: Mapping[str, PipelineFactory] | None = None,
    tracing: Tracing | None = None,
) -> FastAPI:
    """Build the app. `pipeline_factory` (one model, named by its info) or `pipeline_factories` (name →
    factory) replace the engine (tests, benchmarks); `on_fatal` hears a failed load; `tracing` replaces
    the tracer `OTEL_*` configures (tests)."""
    settings = settings or Settings()
    tracing = tracing or Tracing.from_env()
    state = ServiceState(settings, on_fatal=on_fatal, tracing=tracing)
    specs = model_specs(settings, pipeline_factory, pipeline_factories)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loading = asyncio.create_task(state.load(specs), name="tiue-load")
        try:
            yield
        finally:
            if not loading.done():
                loading.cancel()  # the device thread finishes its load call; nothing will use the result
                with suppress(asyncio.CancelledError):
                    await loading
            await state.shutdown()
            tracing.shutdown()

    app = FastAPI(
        title="tiue-serve",
        summary="Text-to-image generation with TiUE-distilled diffusion models, micro-batched.",
        version="0.1.0",
        lifespan=lifespan,
        docs_url=None,  # served from packaged assets by service.routes.docs, or not at all
        redoc_url=None,
    )
    app.state.tiue = state
    app.include_router(health.router)
    app.include_router(images.router)
    app.include_router(models.router)
    pages = [*([playground.router] if settings.playground else []), *([docs.router] if settings.docs else [])]
    for router in pages:
        app.include_router(router)
    install_openapi(app, settings)

    async def handle(request: Request, exc: Exception) -> Response:
        return error_response(exc, state.metrics)

    for exc_type in (ServiceError, EngineError, RequestValidationError, StarletteHTTPException):
        app.add_exception_handler(exc_type, handle)

    routes = RoutePaths.of(health.router, images.router, models.router, *pages)
    app.add_middleware(
        BodyLimitMiddleware,
        metrics=state.metrics,
        max_bytes=settings.max_body_bytes,
        timeout_s=settings.body_timeout_s,
    )
    generation = frozenset(getattr(route, "path", "") for route in images.router.routes)
    app.add_middleware(
        InFlightMiddleware,
        track=state.request_scope,
        paths=generation,
        limit=settings.max_in_flight,
        metrics=state.metrics,
    )
    app.add_middleware(
        EarlyRefusalMiddleware, check=state.refuse_early, metrics=state.metrics, paths=generation
    )
    keyed = RoutePaths.of(images.router, models.router)  # behind the API key, when keys are set
    app.add_middleware(ClientMiddleware, api_keys=state.api_keys, metrics=state.metrics, paths=keyed)
    if settings.cors_origins:  # outside auth and the body limit: a preflight carries neither key nor body
        app.add_middleware(CORSMiddleware, **cors_options(settings.cors_origins))
    probes = frozenset(getattr(route, "path", "") for route in health.router.routes)
    app.add_middleware(
        RequestMetricsMiddleware, metrics=state.metrics, routes=routes, quiet=probes, tracing=tracing
    )
    return app
