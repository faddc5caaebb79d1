"""The error kinds shared by connectors and sink writers."""

from __future__ import annotations


class PlantstreamError(Exception):
    """Base of the project's own errors."""


class RetryableError(PlantstreamError):
    """Temporary trouble (connection lost, server busy): retry with capped backoff."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class FatalError(PlantstreamError):
    """Configuration or environment that will not fix itself: stop and say why."""


class PartialWriteError(PlantstreamError):
    """Some records of a batch were refused for good; the rest was written."""

    def __init__(self, message: str, rejected: list[tuple[object, str]]) -> None:
        super().__init__(message)
        self.rejected = rejected
