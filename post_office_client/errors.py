"""Errors raised by :class:`post_office_client.PostOfficeClient`.

Every error carries the HTTP ``status`` (0 when the API could not be reached) and the API's
error ``code`` (``{"error": {"code", "message"}}``)::

    Exception
     └── PostOfficeError            status, code, message
          ├── BadRequest            400  malformed id, parameter or body
          ├── Unauthorized          401  no realm key, or an unknown one
          ├── Forbidden             403  the realm lacks the capability (message names it)
          ├── NotFound              404  unknown connection or channel
          ├── Gone                  410  the connection no longer exists
          ├── TooLarge              413  body larger than the API accepts
          ├── RateLimited           429  retry_after: seconds the API asked to wait
          ├── Unavailable           503  Redis down, queue full, no gateway; also status 0:
          │                              the API could not be reached
          └── StreamError           an SSE stream ended with an error event (e.g. too_slow)
"""

from __future__ import annotations

__all__ = [
    "BadRequest",
    "Forbidden",
    "Gone",
    "NotFound",
    "PostOfficeError",
    "RateLimited",
    "StreamError",
    "TooLarge",
    "Unauthorized",
    "Unavailable",
    "error_for",
]


class PostOfficeError(Exception):
    """An API call failed; ``status`` is the HTTP status (0: not reached), ``code`` the API's,
    ``retry_after`` the seconds of the answer's ``Retry-After`` header (None without one)."""

    def __init__(
        self, status: int, code: str, message: str, *, retry_after: float | None = None
    ) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after


class BadRequest(PostOfficeError):
    pass


class Unauthorized(PostOfficeError):
    pass


class Forbidden(PostOfficeError):
    pass


class NotFound(PostOfficeError):
    pass


class Gone(PostOfficeError):
    pass


class TooLarge(PostOfficeError):
    pass


class RateLimited(PostOfficeError):
    pass


class Unavailable(PostOfficeError):
    pass


class StreamError(PostOfficeError):
    pass


_BY_STATUS: dict[int, type[PostOfficeError]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    410: Gone,
    413: TooLarge,
    429: RateLimited,
    502: Unavailable,
    503: Unavailable,
    504: Unavailable,
}


def error_for(
    status: int, code: str, message: str, *, retry_after: float | None = None
) -> PostOfficeError:
    """The most specific error class for ``status``."""
    cls = _BY_STATUS.get(status, PostOfficeError)
    if cls is PostOfficeError and status == 0:
        cls = Unavailable
    return cls(status, code, message, retry_after=retry_after)
