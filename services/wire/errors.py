"""The one error model of Luna Stack.

Services raise a `LunaError` subclass; the app turns it into a JSON body
`{"error": {"code", "message", "hint", "details"}}` with the class's HTTP status. The client turns that
body back into the same class, so a caller can `except UnknownModel` whether the error happened in its
own process or in a service.
"""

from __future__ import annotations

from typing import Any, ClassVar


class LunaError(Exception):
    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal"

    def __init__(self, message: str, *, hint: str | None = None, details: dict[str, Any] | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.details = details or {}

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.hint:
            body["hint"] = self.hint
        if self.details:
            body["details"] = self.details
        return {"error": body}

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class BadRequest(LunaError):
    status = 400
    code = "bad_request"


class InvalidTensor(BadRequest):
    code = "invalid_tensor"


class InvalidBody(BadRequest):
    code = "invalid_body"


class Unauthorized(LunaError):
    status = 401
    code = "unauthorized"


class PathNotAllowed(LunaError):
    status = 403
    code = "path_not_allowed"


class NotFound(LunaError):
    status = 404
    code = "not_found"


class UnknownModel(NotFound):
    code = "unknown_model"


class UnknownJob(NotFound):
    code = "unknown_job"


class UnknownIpcBuffer(NotFound):
    code = "unknown_ipc_buffer"


class UnknownReference(LunaError):
    """A request refers to a held tensor the service does not have (restarted, evicted, another
    client's id): the client sends the tensor itself again."""

    status = 409
    code = "unknown_reference"


class LimitExceeded(BadRequest):
    """A request over a cost limit: the message names the limit and the setting that raises it."""

    code = "limit_exceeded"


class TooManyRequests(LunaError):
    status = 429
    code = "too_many_requests"


class RequestTimeout(LunaError):
    status = 408
    code = "request_timeout"


class ClientGone(LunaError):
    """The client disconnected before its request ran: dropped, never computed (nginx's 499)."""

    status = 499
    code = "client_gone"


class NoQueue(LunaError):
    """Queued jobs asked of a replica started without Redis."""

    status = 409
    code = "no_queue"


class IpcUnavailable(LunaError):
    """CUDA IPC cannot work between this client and service; the client falls back to HTTP."""

    status = 409
    code = "ipc_unavailable"


class PayloadTooLarge(LunaError):
    status = 413
    code = "payload_too_large"


class ModelLoadError(LunaError):
    status = 422
    code = "model_load_failed"


class ComputeError(LunaError):
    status = 500
    code = "compute_failed"


class JobFailed(LunaError):
    status = 500
    code = "job_failed"


class Unavailable(LunaError):
    status = 503
    code = "unavailable"


class JobTimeout(LunaError):
    status = 504
    code = "job_timeout"


class ConfigError(Exception):
    """Invalid configuration; the message says which key and how to fix it."""


def _all_subclasses(cls: type[LunaError]) -> list[type[LunaError]]:
    out = [cls]
    for sub in cls.__subclasses__():
        out.extend(_all_subclasses(sub))
    return out


def error_from_json(status: int, body: Any) -> LunaError:
    """Rebuild the typed error a service sent; unknown codes keep the status in a plain LunaError."""
    err = body.get("error") if isinstance(body, dict) else None
    if not isinstance(err, dict):
        generic = LunaError(f"HTTP {status}: {str(body)[:500]}")
        generic.status = status  # type: ignore[misc]
        return generic
    by_code = {c.code: c for c in _all_subclasses(LunaError)}
    cls = by_code.get(str(err.get("code")), LunaError)
    exc = cls(str(err.get("message", "")), hint=err.get("hint"), details=err.get("details"))
    if cls is LunaError:
        exc.status = status  # type: ignore[misc]
    return exc
