"""The command line, run as a user would: a real process on the default model."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def _sutra(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sutra.cli", *args], input=stdin, capture_output=True, text=True, timeout=300
    )


def test_generate_chat_prompt():
    result = _sutra("generate", "What is the capital of Japan?", "--chat", "--max-tokens", "20")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "The capital of Japan is Tokyo."


def test_chat_session_over_stdin():
    result = _sutra("chat", "--max-tokens", "20", stdin="What is the capital of Japan?\n\n")
    assert result.returncode == 0, result.stderr
    assert "The capital of Japan is Tokyo." in result.stdout


def test_bad_sampling_value_is_a_clean_error():
    result = _sutra("generate", "hi", "--top-p", "1.5")
    assert result.returncode != 0
    assert "top_p must be in (0, 1], got 1.5" in result.stderr
    assert "Traceback" not in result.stderr
