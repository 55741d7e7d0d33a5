"""The served OpenAPI schema, patched to tell the truth: the limits this server was started with,
and every status its edge can answer with the headers that come with it.

The routes declare their bodies; what only the running app knows (settings, middleware) is added here,
once, when the schema is first built.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

from fastapi import FastAPI

from service.settings import Settings

JsonObject = dict[str, Any]

_ERROR_REF = {"$ref": "#/components/schemas/ErrorResponse"}
_FASTAPI_422 = {"application/json": {"schema": {"$ref": "#/components/schemas/HTTPValidationError"}}}

# What each error status means at this server's edge (service/errors.py, service/edge/middleware.py).
ERROR_DESCRIPTIONS: dict[str, str] = {
    "400": "The body is not valid JSON (or not UTF-8).",
    "401": "API keys are configured and the request carries none, or a wrong one.",
    "404": "No model of that name is served (code model_not_found).",
    "406": "Accept asks for raw image bytes that cannot carry this answer.",
    "408": "The body did not arrive within the body timeout; the connection is closed.",
    "413": "The body is larger than the server accepts.",
    "415": "The body is not declared as JSON (Content-Type).",
    "422": "Not a valid request: a field's or parameter's type or value, a limit of this server, or more "
    "device time than one request may take (code too_costly).",
    "429": "The queue is full, or this client's share of it or its rate limit is used up; retry after "
    "Retry-After seconds.",
    "500": "The server failed; the error is in its log.",
    "503": "Not ready (the model is loading or failed to load), draining, or handling as many requests "
    "as it may (code overloaded).",
    "504": "The images were not made within the request timeout.",
}
# Errors any operation may answer: the middleware's plain 500; and where a body is read, 408 and 413.
_APP_ERRORS = ("500",)
_BODY_ERRORS = ("408", "413")

_GENERIC_DESCRIPTIONS = (None, "Additional Response")  # FastAPI's defaults, besides the status's phrase

_RETRY_AFTER = {
    "description": "Seconds to wait before retrying.",
    "schema": {"type": "integer", "minimum": 1},
}
# On every answer the app makes (service.edge.middleware): the caller's own ID when it is a sane token, else a
# new one. Not required: the answers the connection guard writes itself (service.edge.connections: over the
# connection cap, a header timeout, a request cut off by shutdown) are made outside the app and carry none.
_REQUEST_ID = {
    "X-Request-ID": {
        "description": "This request's ID, as in the server's logs and the error body's request_id.",
        "schema": {"type": "string"},
    }
}
_HEADERS: dict[str, JsonObject] = {
    "401": {"WWW-Authenticate": {"description": "Always `Bearer`.", "schema": {"type": "string"}}},
    "408": {"Connection": {"description": "Always `close`.", "schema": {"type": "string"}}},
    "429": {"Retry-After": {**_RETRY_AFTER, "required": True}},
    "503": {"Retry-After": _RETRY_AFTER},
}


def install_openapi(app: FastAPI, settings: Settings) -> None:
    """Make `app.openapi()` (and so `/openapi.json`) serve the patched schema."""

    def openapi() -> JsonObject:
        if app.openapi_schema is None:
            schema = FastAPI.openapi(app)
            document_limits(schema, settings)
            document_auth(schema, settings)
            document_errors(schema)
            document_request_ids(schema)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def document_limits(schema: JsonObject, settings: Settings) -> None:
    """Copy the request limits from settings into the request bodies' schemas; a bound that is None is skipped."""
    components = schema.get("components", {}).get("schemas", {})
    sides: JsonObject = {"minimum": settings.min_size, "maximum": settings.max_size}
    for name in ("GenerateRequest", "OpenAIImageRequest"):
        properties = components.get(name, {}).get("properties", {})
        _bound(properties.get("n"), "integer", maximum=settings.max_n)
        _bound(properties.get("prompt"), "string", maxLength=settings.max_prompt_chars)
        for side in ("width", "height"):
            _bound(properties.get(side), "integer", **sides)
        size = properties.get("size")
        if size is not None:
            size["description"] = f"{size.get('description', '')}; {_sides(settings)}".lstrip("; ")


def _sides(settings: Settings) -> str:
    if settings.max_size is None:
        return f"each side at least {settings.min_size} px and at most twice the model's native size"
    return f"each side {settings.min_size} to {settings.max_size} px"


def _bound(prop: JsonObject | None, kind: str, **bounds: Any) -> None:
    """Set `bounds` on the branch of `prop` (itself, or one of its anyOf) that has type `kind`."""
    if prop is None:
        return
    for branch in [prop, *prop.get("anyOf", [])]:
        if branch.get("type") == kind:
            branch.update({key: value for key, value in bounds.items() if value is not None})


def document_auth(schema: JsonObject, settings: Settings) -> None:
    """Without API keys nothing asks for a key, and nothing answers 401: say so."""
    if settings.auth_enabled:
        return
    schema.get("components", {}).pop("securitySchemes", None)
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            if operation.pop("security", None) is not None:
                operation.get("responses", {}).pop("401", None)


def document_errors(schema: JsonObject) -> None:
    """Every error response: the error body, a description, and the headers that come with its status.

    A response a route declared with its own body (e.g. `/readyz`'s 503) is left as the route wrote it.
    """
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            responses: JsonObject = operation.setdefault("responses", {})
            statuses = [*_APP_ERRORS, *(_BODY_ERRORS if "requestBody" in operation else ())]
            for status in statuses:
                responses.setdefault(status, {})
            for status, response in responses.items():
                if not status.isdigit() or int(status) < 400:
                    continue
                content = response.setdefault("content", {"application/json": {"schema": dict(_ERROR_REF)}})
                if content == _FASTAPI_422:  # the app's handler answers validation errors in the error shape
                    response["content"] = content = {"application/json": {"schema": dict(_ERROR_REF)}}
                    response["description"] = None
                if content != {"application/json": {"schema": _ERROR_REF}}:
                    continue
                if response.get("description") in _GENERIC_DESCRIPTIONS + (HTTPStatus(int(status)).phrase,):
                    response["description"] = ERROR_DESCRIPTIONS.get(
                        status, response.get("description", "Error")
                    )
                if status in _HEADERS:
                    response["headers"] = {**response.get("headers", {}), **_HEADERS[status]}
    _drop_unused_validation_schemas(schema)


def document_request_ids(schema: JsonObject) -> None:
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            for response in operation.get("responses", {}).values():
                response["headers"] = {**response.get("headers", {}), **_REQUEST_ID}


def _drop_unused_validation_schemas(schema: JsonObject) -> None:
    """FastAPI's default 422 body (`HTTPValidationError`) is never sent here; drop it once nothing refers to it."""
    components = schema.get("components", {}).get("schemas", {})
    if "#/components/schemas/HTTPValidationError" not in repr(schema.get("paths", {})):
        components.pop("HTTPValidationError", None)
        components.pop("ValidationError", None)
