"""One exception tree for every external call; retry decisions read the class, never the message.

BatchflowsError
├── TransientError          retried with backoff, waiting at least the server's retry_after_s if it set one
│   ├── RateLimited         429
│   ├── ServerError         5xx (503 Temporarily Unavailable too), and statuses databricks-sdk has no
│   │                       class for (a gateway's 502)
│   ├── CallTimeout         the call overran its deadline, or the HTTP read timed out
│   └── ConnectionFailed    reset, refused, dropped
└── PermanentError          fails at once
    ├── BadRequest          400, 409 and other 4xx
    ├── Unauthorized        401 / 403
    ├── NotFound            404
    └── InvalidResponse     a 2xx answer we cannot use (malformed JSON, wrong shape)
"""

from __future__ import annotations

import json

import requests
from databricks.sdk.errors import DatabricksError

from blocks.workspace import SdkRetrySuppressed


class BatchflowsError(Exception):
    """Base of every error an external call raises in batchflows."""

    kind = "error"


class TransientError(BatchflowsError):
    """A failure worth retrying; `retry_after_s` is how long the server asked us to wait, if it did."""

    kind = "transient"

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class RateLimited(TransientError):
    """The service asked us to slow down (429)."""

    kind = "rate_limited"


class ServerError(TransientError):
    """The service failed (5xx)."""

    kind = "server_error"


class CallTimeout(TransientError):
    """The call did not finish within its timeout."""

    kind = "timeout"

    def __init__(self, message: str, timeout_s: float) -> None:
        super().__init__(message)
        self.timeout_s = timeout_s


class ConnectionFailed(TransientError):
    """The connection was refused, reset or dropped."""

    kind = "connection"


class PermanentError(BatchflowsError):
    """A failure that retrying will not fix."""

    kind = "permanent"


class BadRequest(PermanentError):
    """The service rejected the request (400, 409, other 4xx)."""

    kind = "bad_request"


class Unauthorized(PermanentError):
    """The credentials were rejected (401/403)."""

    kind = "unauthorized"


class NotFound(PermanentError):
    """The resource does not exist (404)."""

    kind = "not_found"


class InvalidResponse(PermanentError):
    """The service answered, but not with something we can use."""

    kind = "invalid_response"


def classify(exc: BaseException, timeout_s: float = 0) -> BatchflowsError:
    """Translate an SDK/requests exception into our tree (returns `exc` itself if already ours)."""
    if isinstance(exc, BatchflowsError):
        return exc
    if isinstance(exc, SdkRetrySuppressed) and exc.__context__ is not None:
        exc = exc.__context__
    if isinstance(exc, DatabricksError):
        status = _status_of(exc)
        message = f"{status or ''} {exc.error_code or ''}: {exc}".strip()
        if status == 429:
            return RateLimited(message, _retry_after(exc))
        if status is None or status >= 500:  # a status the SDK has no class for: a gateway's 502, say
            return ServerError(message, _retry_after(exc) if status == 503 else None)
        if status in (401, 403):
            return Unauthorized(message)
        if status == 404:
            return NotFound(message)
        return BadRequest(message)
    if isinstance(exc, requests.Timeout | TimeoutError):
        return CallTimeout(f"no answer within {timeout_s:g}s", timeout_s)
    if isinstance(exc, requests.ConnectionError | ConnectionError):
        return ConnectionFailed(f"connection failed: {_short(exc)}")
    if isinstance(exc, json.JSONDecodeError | requests.exceptions.JSONDecodeError | ValueError | KeyError):
        return InvalidResponse(f"unusable response: {_short(exc)}")
    return PermanentError(f"{type(exc).__name__}: {_short(exc)}")


def _status_of(exc: DatabricksError) -> int | None:
    """The HTTP status of an SDK error, from the class databricks-sdk gives each status (its public mapping;
    error codes map to subclasses of these). None for a status the SDK has no class for (502, 405, ...)."""
    from databricks.sdk.errors.platform import STATUS_CODE_MAPPING

    return next((status for status, cls in STATUS_CODE_MAPPING.items() if isinstance(exc, cls)), None)


def _retry_after(exc: DatabricksError) -> float | None:
    """How long a 429 or 503 asked us to wait: the error's RetryInfo detail (the SDK's public error details),
    else its Retry-After header. databricks-sdk 0.156 hands the header on only as `retry_after_secs`, which it
    still reads itself but documents as deprecated, and sets to 1 when the header is missing; it is read here
    alone, and only for the two statuses the SDK sets it for."""
    retry_info = exc.get_error_details().retry_info
    if retry_info is not None:
        return retry_info.retry_delay_seconds
    seconds = exc.retry_after_secs
    return float(seconds) if seconds is not None else None


def _short(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:300]
