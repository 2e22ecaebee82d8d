"""One error base and a few subclasses. Every message tells the caller what to change.

Transports map them: MCP raises `ToolError(str(err))`, REST answers `http_status` with
`{"error": {"code", "message", "param"}}`.
"""

from __future__ import annotations

from typing import Any


class WeightsmithError(Exception):
    code = "error"
    http_status = 400

    def __init__(self, message: str, *, param: str | None = None, details: dict[str, Any] | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.details = details or {}

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "param": self.param, **self.details}

    def __str__(self) -> str:
        where = f" (param: {self.param})" if self.param else ""
        return f"{self.code}: {self.message}{where}"


class InvalidRequest(WeightsmithError):
    code = "invalid_request"
    http_status = 422


class InvalidDataset(WeightsmithError):
    code = "invalid_dataset"
    http_status = 422


class NotFound(WeightsmithError):
    """Also what an agent gets for another agent's object: its existence is not disclosed."""

    code = "not_found"
    http_status = 404


class Conflict(WeightsmithError):
    code = "conflict"
    http_status = 409


class LimitExceeded(WeightsmithError):
    code = "limit_exceeded"
    http_status = 429


class Unauthorized(WeightsmithError):
    code = "unauthorized"
    http_status = 401
