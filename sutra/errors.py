"""Errors a user can cause. Each names the offending field so an API layer can report it."""

from __future__ import annotations


class SutraError(Exception):
    """Base class of the engine's user-facing errors."""


class InvalidRequestError(SutraError, ValueError):
    """A request field has a value the engine cannot serve."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class ModelLoadError(SutraError):
    """The model could not be found or is not a kind the engine supports."""
