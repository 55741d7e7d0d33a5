"""Service errors and the one place that turns any exception into an HTTP answer.

Every error body has OpenAI's shape, `{"error": {"message", "type", "param", "code"}}` (plus the
`request_id`), so the clients of `/v1/images/generations` read our errors as they read OpenAI's.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse

from engine.errors import InvalidRequestError
from service.edge.logs import current_request, printable, request_id
from service.metrics import NO_MODEL, ServiceMetrics

logger = logging.getLogger(__name__)


class ServiceError(Exception):
    """An error with a known HTTP answer. `reason` labels tiue_requests_rejected_total (None: not counted)."""

    status_code = 500
    error_type = "server_error"
    reason: str | None = None

    def __init__(self, message: str, *, param: str | None = None, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.headers = dict(headers or {})


class MalformedBody(ServiceError):
    status_code = 400
    error_type = "invalid_request_error"
    reason = "invalid"


class InvalidInput(ServiceError):
    status_code = 422
    error_type = "invalid_request_error"
    reason = "invalid"


class ModelNotFound(ServiceError):
    """A `model` this server does not serve; OpenAI answers such a request 404 `model_not_found`."""

    status_code = 404
    error_type = "invalid_request_error"
    reason = "model_not_found"

    def __init__(self, name: str, served: Sequence[str]):
        super().__init__(
            f"the model '{name}' does not exist on this server; it serves {', '.join(served)}", param="model"
        )


class ContentPolicyViolation(ServiceError):
    """Every image of the request was flagged by the safety checker, so none is returned."""

    status_code = 422
    error_type = "invalid_request_error"
    reason = "content_policy_violation"


class NotAcceptable(ServiceError):
    status_code = 406
    error_type = "invalid_request_error"
    reason = "invalid"


class UnsupportedMediaType(ServiceError):
    status_code = 415
    error_type = "invalid_request_error"
    reason = "invalid"


class PayloadTooLarge(ServiceError):
    """Answered once the body is read and dropped (up to a bound), then the connection is closed."""

    status_code = 413
    error_type = "invalid_request_error"
    reason = "invalid"

    def __init__(self, message: str, *, param: str | None = "body"):
        super().__init__(message, param=param, headers={"Connection": "close"})


class MalformedRequest(ServiceError):
    """The request's framing or headers are ambiguous (a smuggling risk behind a proxy): answered, then the
    connection is closed, since where the next request would start is not known."""

    status_code = 400
    error_type = "invalid_request_error"
    reason = "invalid"

    def __init__(self, message: str, *, status_code: int = 400):
        super().__init__(message, headers={"Connection": "close"})
        self.status_code = status_code


class Unauthorized(ServiceError):
    status_code = 401
    error_type = "authentication_error"
    reason = "unauthorized"

    def __init__(self, message: str):
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"})


def _retry_after(seconds: float) -> dict[str, str]:
    return {"Retry-After": str(max(1, math.ceil(seconds)))}


class QueueFull(ServiceError):
    status_code = 429
    error_type = "rate_limit_error"
    reason = "queue_full"

    def __init__(self, message: str, *, retry_after_s: float):
        super().__init__(message, headers=_retry_after(retry_after_s))


class RateLimited(QueueFull):
    reason = "rate_limited"


class TooCostly(InvalidInput):
    """One request that would hold the device longer than the server allows any request to."""

    reason = "too_costly"


class NotReady(ServiceError):
    status_code = 503
    error_type = "service_unavailable"
    reason = "not_ready"

    def __init__(self, message: str, *, retry_after_s: float | None = None):
        super().__init__(message, headers=_retry_after(retry_after_s) if retry_after_s else None)


class ShuttingDown(NotReady):
    """Draining: this replica takes no new work; another replica should (a retry goes elsewhere)."""

    def __init__(self, message: str, *, retry_after_s: float | None = 1):
        super().__init__(message, retry_after_s=retry_after_s)


class Overloaded(ServiceError):
    """TIUE_MAX_IN_FLIGHT generation requests are being handled; a retry may find room, here or elsewhere."""

    status_code = 503
    error_type = "service_unavailable"
    reason = "overloaded"

    def __init__(self, message: str, *, retry_after_s: float = 1):
        super().__init__(message, headers=_retry_after(retry_after_s))


class RequestTimeout(ServiceError):
    """The client sent its request slower than the server waits; the connection is closed after the answer."""

    status_code = 408
    error_type = "invalid_request_error"
    reason = "request_timeout"

    def __init__(self, message: str):
        super().__init__(message, headers={"Connection": "close"})


class DeadlineExceeded(ServiceError):
    status_code = 504
    error_type = "timeout"
    reason = "timeout"


class ClientDisconnected(ServiceError):
    """The client went away before its images were made; nobody reads this answer."""

    status_code = 499
    error_type = "cancelled"
    reason = "cancelled"


class BatchFailed(ServiceError):
    """The engine failed on a batch; every request in that batch gets this (logged once, by the worker)."""

    status_code = 500

    def __init__(self, batch_id: int):
        super().__init__(f"image generation failed (batch {batch_id}); the error is in the server log")
        self.batch_id = batch_id


_HTTP_CODES = {400: "invalid", 404: "not_found", 405: "method_not_allowed"}


class _HttpError(ServiceError):
    """Starlette's own HTTP errors (unknown route, wrong method, a body that is not UTF-8)."""

    def __init__(self, status_code: int, message: str, headers: Mapping[str, str] | None):
        super().__init__(message, headers=headers)
        self.status_code = status_code
        self.error_type = "invalid_request_error" if status_code < 500 else "server_error"
        self.reason = _HTTP_CODES.get(status_code, "invalid" if status_code < 500 else None)


def _param(loc: Sequence[Any]) -> str:
    parts = [str(part) for part in loc if part != "body"]
    return ".".join(parts) if parts else "body"


def _from_validation(exc: RequestValidationError) -> ServiceError:
    errors = list(exc.errors())
    for error in errors:
        if error.get("type") == "json_invalid":
            detail = (error.get("ctx") or {}).get("error", "")
            return MalformedBody(f"the request body is not valid JSON ({detail})", param="body")
    messages = []
    for error in errors:
        param = _param(error.get("loc", ()))
        kind = error.get("type")
        if kind == "extra_forbidden":
            messages.append(f"{param}: unknown field")
        elif kind == "missing" and param == "body":
            messages.append("a JSON object body is required")
        elif param == "body" and kind in ("model_attributes_type", "dict_type"):
            messages.append("the request body must be a JSON object")
        else:
            message = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
            messages.append(f"{param}: {message}")
    first = _param(errors[0].get("loc", ())) if errors else None
    return InvalidInput("; ".join(messages) or "invalid request", param=first)


def as_service_error(exc: BaseException) -> ServiceError | None:
    """The known HTTP answer for `exc`, or None when it is a bug."""
    if isinstance(exc, ServiceError):
        return exc
    if isinstance(exc, InvalidRequestError):
        return InvalidInput(str(exc), param=exc.param)
    if isinstance(exc, RequestValidationError):
        return _from_validation(exc)
    if isinstance(exc, StarletteHTTPException):
        if exc.status_code == 400 and exc.detail == "There was an error parsing the body":
            return MalformedBody("the request body could not be read as JSON; send it as UTF-8", param="body")
        return _HttpError(exc.status_code, str(exc.detail), exc.headers)
    return None


def error_response(exc: BaseException, metrics: ServiceMetrics | None) -> JSONResponse:
    """The only exception-to-HTTP mapping; unexpected errors are logged with traceback and get a plain 500."""
    error, body = error_body(exc, metrics)
    return JSONResponse(body, status_code=error.status_code, headers=error.headers)


def error_body(exc: BaseException, metrics: ServiceMetrics | None) -> tuple[ServiceError, dict[str, Any]]:
    """The error `exc` is answered with and its body (counted once); a stream sends the body as an event."""
    error = as_service_error(exc)
    if error is None:
        logger.error("unhandled error while serving a request", exc_info=exc)
        error = ServiceError("internal server error")
    if error.reason is not None and metrics is not None:
        record = current_request()
        metrics.rejected.labels(reason=error.reason, model=record.model if record else NO_MODEL).inc()
    detail: dict[str, str | None] = {  # messages and params may quote the request: escaped, any code point
        "message": printable(error.message),
        "type": error.error_type,
        "param": None if error.param is None else printable(error.param),
        "code": error.reason,
    }
    rid = request_id()
    if rid is not None:
        detail["request_id"] = rid  # what to quote when asking about this answer: it is in every log line
    return error, {"error": detail}
