"""The application's errors. Raise them anywhere; middlewares/errors.py writes them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from http import HTTPStatus


class ApiError(Exception):
    status = 500
    code = "internal_error"

    def __init__(
        self,
        detail: str = "",
        *,
        errors: Sequence[Mapping[str, str]] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.errors = list(errors) if errors else None
        self.headers = dict(headers or {})

    @property
    def title(self) -> str:
        return HTTPStatus(self.status).phrase


class BadRequest(ApiError):
    status, code = 400, "bad_request"


class Unauthorized(ApiError):
    status, code = 401, "unauthorized"

    def __init__(self, detail: str = "Authentication required", **kwargs) -> None:
        super().__init__(detail, **kwargs)
        self.headers.setdefault("WWW-Authenticate", 'Bearer realm="herald"')


class Forbidden(ApiError):
    status, code = 403, "forbidden"


class NotFound(ApiError):
    status, code = 404, "not_found"


class MethodNotAllowed(ApiError):
    status, code = 405, "method_not_allowed"


class Conflict(ApiError):
    status, code = 409, "conflict"


class PayloadTooLarge(ApiError):
    status, code = 413, "payload_too_large"


class UnsupportedMediaType(ApiError):
    status, code = 415, "unsupported_media_type"


class ValidationError(ApiError):
    status, code = 422, "validation_error"

    @classmethod
    def field(cls, name: str, message: str) -> ValidationError:
        return cls(f"{name}: {message}", errors=[{"field": name, "message": message}])


class RequestTimeout(ApiError):
    """A body that did not arrive within server.body_timeout (a slow-body attack, or a stalled client)."""

    status, code = 408, "bad_request"


class RateLimited(ApiError):
    status, code = 429, "rate_limited"


class Unavailable(ApiError):
    status, code = 503, "unavailable"


class InternalError(ApiError):
    status, code = 500, "internal_error"


CODES_BY_STATUS = {cls.status: cls.code for cls in ApiError.__subclasses__()}


def code_for_status(status: int) -> str:
    """The PROTOCOL §1 code for any HTTP error status, aiohttp's own ones included."""
    if status in CODES_BY_STATUS:
        return CODES_BY_STATUS[status]
    return "internal_error" if status >= 500 else "bad_request"
