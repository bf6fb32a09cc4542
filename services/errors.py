"""The refusal a service raises: `ServiceError` carries the HTTP status, a message naming what is wrong, an error type
and the offending field. The services' logic raises it without knowing HTTP; services/http.py turns it into the
error envelope."""

from __future__ import annotations


class ServiceError(Exception):
    """A request a service refuses: the HTTP status, a message naming what is wrong, an error type, the field."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type_, param
