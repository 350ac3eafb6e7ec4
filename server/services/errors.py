"""Errors of the services (mapped to HTTP status codes in server/http/errors.py)."""

from __future__ import annotations


class PayloadTooLargeError(Exception):
    """A request body (refused by server/body_limit.py before it is read) or an uploaded file over its limit."""

    code = "payload_too_large"

    def __init__(self, limit: int, message: str):
        self.limit = limit
        super().__init__(message)
