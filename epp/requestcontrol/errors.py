"""Request errors that become an OpenAI-style JSON `ImmediateResponse`."""

from __future__ import annotations

import orjson

_TYPES = {
    400: "invalid_request_error",
    404: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
}


class RequestError(Exception):
    def __init__(
        self, status: int, message: str, code: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = headers  # extra response headers (e.g. retry-after)

    @property
    def reason(self) -> str:
        """Short label for metrics."""
        return self.code

    def body(self) -> bytes:
        return orjson.dumps(
            {
                "error": {
                    "message": self.message,
                    "type": _TYPES.get(self.status, "server_error"),
                    "code": self.code,
                }
            }
        )


def bad_request(message: str, code: str = "invalid_request") -> RequestError:
    return RequestError(400, message, code)


def model_not_found(model: str) -> RequestError:
    return RequestError(
        404, f"The model '{model}' does not exist or is not served here.", "model_not_found"
    )


def too_large(size: int, limit: int) -> RequestError:
    return RequestError(
        413,
        f"Request body of {size} bytes exceeds the limit of {limit} bytes.",
        "request_too_large",
    )


def shed(reason: str) -> RequestError:
    return RequestError(429, f"Request shed: {reason}. Retry later.", "rate_limit_exceeded")


def rate_limited(reason: str, retry_after_s: int) -> RequestError:
    """429 from flow control: the queue is full or the request waited too long."""
    return RequestError(
        429,
        f"Too many requests: {reason}. Retry after {retry_after_s} s.",
        "rate_limit_exceeded",
        {"retry-after": str(retry_after_s)},
    )


def unavailable(reason: str) -> RequestError:
    return RequestError(503, f"No endpoint available: {reason}.", "no_healthy_upstream")
