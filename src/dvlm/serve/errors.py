"""The server's errors: one exception type carrying its HTTP status and an OpenAI-style error object.

Every refusal of the HTTP layer is an `APIError`; the app turns it into

    HTTP <status>  {"error": {"message": ..., "type": ..., "param": ..., "code": ...}}

which is what OpenAI clients parse (the `openai` package raises `BadRequestError`, `RateLimitError`,
... with that message). A bad request is never a 500 and never shows a stack trace.
"""

from __future__ import annotations

from typing import Any

CLIENT_GONE = 499  # nginx's status for a request whose client closed the connection (no one reads it)


class APIError(Exception):
    """A request the server refuses or cannot finish, with the status and error object to send."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.code, self.param)


def error_body(message: str, type: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    """The OpenAI error object, `{"error": {...}}`, also sent as the last event of a failed stream."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(message: str, *, code: str = "invalid_request", param: str | None = None) -> APIError:
    return APIError(400, message, code=code, param=param)


def too_large(message: str, *, param: str | None = None) -> APIError:
    return APIError(413, message, code="payload_too_large", param=param)


def queue_full(message: str, retry_after_s: float) -> APIError:
    # Retry-After is whole seconds (RFC 9110); never 0, which would invite an instant retry storm.
    seconds = max(1, int(-(-retry_after_s // 1)))
    return APIError(429, message, type="rate_limit_error", code="queue_full",
                    headers={"Retry-After": str(seconds)})


def unavailable(message: str) -> APIError:
    return APIError(503, message, type="server_error", code="unavailable")
