"""Errors a user can cause. Each names the offending field so an API layer can report it."""

from __future__ import annotations


class SutraError(Exception):
    """Base class of the engine's user-facing errors."""


class InvalidRequestError(SutraError, ValueError):
    """A request field has a value the engine cannot serve."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def prompt_too_long(num_tokens: int, max_model_len: int, param: str = "prompt") -> InvalidRequestError:
    return InvalidRequestError(
        f"the prompt has {num_tokens} tokens but the model's context length is {max_model_len} "
        f"(at least one token must be left to generate)",
        param=param,
    )


class RequestFailedError(SutraError):
    """The engine could not compute one request (an internal fault, not the request's values). That
    request ends with this error; the requests batched with it carry on."""


class ModelLoadError(SutraError):
    """The model could not be found or is not a kind the engine supports."""
