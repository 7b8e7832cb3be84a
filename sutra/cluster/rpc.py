"""Calls to instance actors: every wait has a timeout, and a Ray error reads in one line."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def call(ref: Awaitable[T], timeout_s: float) -> T:
    """Await an actor call's result for at most timeout_s (TimeoutError). asyncio.wait, not
    wait_for: before Python 3.12 wait_for can swallow a cancellation."""
    future = asyncio.ensure_future(ref)
    try:
        done, _ = await asyncio.wait([future], timeout=timeout_s)
    finally:
        if not future.done():
            future.cancel()
    if not done:
        raise TimeoutError(f"no answer within {timeout_s:g} s")
    return future.result()


def summarize_error(error: BaseException) -> str:
    """A Ray error in one line: its first and last lines (between them its full text holds a
    traceback and the actor's address; the last line says why, e.g. killed, or the exception)."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    text = lines[0] if len(lines) == 1 else f"{lines[0]} {lines[-1]}"
    return text[:300]
