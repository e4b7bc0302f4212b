"""HAIA's own error types and the one place that renders an error body.

Every error a client sees is `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

from typing import Any

from app.redact import scrub


class HaiaError(Exception):
    """A failure with an HTTP status and an OpenAI-shaped body."""

    status = 500
    type = "server_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.retry_after = retry_after

    def __reduce__(self) -> tuple[Any, ...]:
        # Errors cross arq pickled; keep the keyword arguments.
        return (_rebuild, (type(self), self.message, self.param, self.code, self.retry_after))

    def body(self) -> dict[str, Any]:
        # Scrubbed: an upstream's message may quote the key HAIA sent it.
        return error_body(scrub(self.message), type_=self.type, param=self.param, code=self.code)

    def headers(self) -> dict[str, str]:
        if self.retry_after is None:
            return {}
        return {"Retry-After": str(max(1, round(self.retry_after)))}


def _rebuild(
    cls: type[HaiaError],
    message: str,
    param: str | None,
    code: str | None,
    retry_after: float | None,
) -> HaiaError:
    return cls(message, param=param, code=code, retry_after=retry_after)


def error_body(
    message: str, *, type_: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class InvalidRequest(HaiaError):
    status = 400
    type = "invalid_request_error"


class Unauthorized(HaiaError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class NotFound(HaiaError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class ModelNotFound(HaiaError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


class BodyTimeout(HaiaError):
    status = 408
    type = "invalid_request_error"
    code = "request_timeout"


class BodyTooLarge(HaiaError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class RateLimited(HaiaError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"


class UpstreamError(HaiaError):
    """The model's server failed or answered something HAIA cannot use."""

    status = 502
    type = "api_error"
    code = "upstream_error"


class Unavailable(HaiaError):
    """Something HAIA needs (the model's server, Redis, the database, a worker) is not there."""

    status = 503
    type = "api_error"
    code = "service_unavailable"


class UpstreamTimeout(HaiaError):
    status = 504
    type = "api_error"
    code = "upstream_timeout"


ERROR_TYPES: dict[str, type[HaiaError]] = {
    cls.__name__: cls
    for cls in (
        HaiaError,
        InvalidRequest,
        Unauthorized,
        NotFound,
        ModelNotFound,
        RateLimited,
        BodyTimeout,
        BodyTooLarge,
        UpstreamError,
        Unavailable,
        UpstreamTimeout,
    )
}


class RelayedError(HaiaError):
    """An error the worker reported, re-raised in the web with the status it chose."""

    def __init__(self, detail: dict[str, Any], *, status: int, retry_after: float | None) -> None:
        super().__init__(
            str(detail.get("message", "The generation failed.")),
            param=detail.get("param"),
            code=detail.get("code"),
            retry_after=retry_after,
        )
        self.status = status
        self.type = str(detail.get("type", "api_error"))
