"""Errors that services raise and turn into JSON responses.

    ServiceError                 500 internal_error
    ├── ValidationFailed         422 validation_failed   (names the field)
    ├── NotFound                 404 not_found
    ├── Conflict                 409 conflict
    │   └── InvalidTransition    409 invalid_transition
    ├── Unauthorized             401 invalid_token
    ├── Forbidden                403 insufficient_scope
    └── Unavailable              503 unavailable         (a dependency such as Redis is down)

Every response body has the same shape on every service, so clients see the same error whichever
side of the migration served them: ``{"error": code, "message": sentence, "field": path?}``.
"""

from typing import Any


class ServiceError(Exception):
    status_code = 500
    code = "internal_error"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def to_body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"error": self.code, "message": self.message}
        if self.field is not None:
            body["field"] = self.field
        return body


class ValidationFailed(ServiceError):
    status_code = 422
    code = "validation_failed"


class NotFound(ServiceError):
    status_code = 404
    code = "not_found"


class Conflict(ServiceError):
    status_code = 409
    code = "conflict"


class InvalidTransition(Conflict):
    code = "invalid_transition"


class Unauthorized(ServiceError):
    status_code = 401
    code = "invalid_token"


class Forbidden(ServiceError):
    status_code = 403
    code = "insufficient_scope"


class Unavailable(ServiceError):
    status_code = 503
    code = "unavailable"
