"""A real `sutra serve` process on loopback, for tests that talk to it over HTTP."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx


@dataclass
class ServerHandle:
    base_url: str  # http://127.0.0.1:PORT, no /v1
    model: str
    api_key: str | None
    process: subprocess.Popen
    log_path: Path | None = None  # the server's stdout and stderr after startup
    stopped: bool = False  # a test stopped it on purpose

    def log(self) -> str:
        return "" if self.log_path is None else self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Send a signal (SIGTERM drains); wait_exit() then says how the process ended."""
        self.stopped = True
        self.process.send_signal(sig)

    def wait_exit(self, timeout: float = 60.0) -> int:
        return self.process.wait(timeout=timeout)

    def metric(self, name: str, default: float | None = None, **labels: str) -> float:
        """One sample from /metrics (labels given must match; model_name is implied). A labelled
        series appears only once observed: `default` stands in for it until then."""
        text = httpx.get(f"{self.base_url}/metrics", timeout=10).text
        for line in text.splitlines():
            match = re.fullmatch(rf"{re.escape(name)}(?:\{{(.*)\}})? (\S+)", line)
            if match and all(f'{k}="{v}"' in (match.group(1) or "") for k, v in labels.items()):
                return float(match.group(2))
        if default is not None:
            return default
        raise KeyError(f"{name} {labels} not in /metrics")

    def wait_idle(self, timeout: float = 30.0) -> None:
        """Until no request runs or waits (aborts are applied between steps)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if (
                self.metric("sutra:num_requests_running") == 0
                and self.metric("sutra:num_requests_waiting") == 0
            ):
                return
            time.sleep(0.1)
        raise TimeoutError("the server still has requests in flight")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def run_server(
    *args: str, api_key: str | None = None, startup_timeout: float = 300.0
) -> Iterator[ServerHandle]:
    port = _free_port()
    cmd = [sys.executable, "-m", "sutra.cli", "serve", "--port", str(port), *args]
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    try:
        deadline = time.monotonic() + startup_timeout
        assert process.stdout is not None
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                raise RuntimeError(f"sutra serve exited ({process.wait()}):\n{''.join(lines)}")
            lines.append(line)
            if match := re.search(r"Sutra is serving (\S+) at (http://\S+)/v1", line):
                break
        else:
            raise TimeoutError(f"sutra serve did not start:\n{''.join(lines)}")
        # Keep draining output so the server never blocks on a full pipe; keep it for tests to read.
        fd, log_name = tempfile.mkstemp(prefix="sutra-serve-", suffix=".log")
        with os.fdopen(fd, "w") as log_file:
            drain = subprocess.Popen(["cat"], stdin=process.stdout, stdout=log_file)
        handle = ServerHandle(
            base_url=match.group(2),
            model=match.group(1),
            api_key=api_key,
            process=process,
            log_path=Path(log_name),
        )
        yield handle
        assert handle.stopped or process.poll() is None, "the server died during the tests"
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
        with contextlib.suppress(NameError):
            drain.wait(timeout=5)
            os.unlink(log_name)
