"""Hetzner's error answers: `{"error": {"code", "message", "details"}}` with its HTTP statuses."""

from __future__ import annotations

from typing import Any


class ApiError(Exception):
    """An error answer in Hetzner's shape: `{"error": {"code", "message", "details"}}`."""

    def __init__(
        self, status: int, code: str, message: str, details: dict[str, Any] | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.details = status, code, message, details or {}

    def body(self) -> dict[str, Any]:
        """The JSON answer the client reads."""
        return {"error": {"code": self.code, "message": self.message, "details": self.details}}
