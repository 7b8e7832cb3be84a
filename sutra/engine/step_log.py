"""StepLog: every served engine step's batch and what it cost the serving loop, as JSON lines
(`sutra serve --step-log FILE`), so the simulator's cost model can be calibrated on a served run
(`sutra profile --calibrate PROFILE --step-log FILE`).

A profile times the model runner alone. A served step costs more: the scheduler, the outputs handed
to the streams (detokenization, stop strings), new requests taken in and their completion estimates,
and the event loop's turns between the step thread and the server. Each line holds:

- "t": when the step started (Unix time), to line steps up with requests and runs;
- "slices": the step's (cached context, new tokens) per request, as the cost model reads a batch;
- "step_s": LLMEngine.step (scheduler, runner, outputs), on the step thread;
- "cycle_s": from this step's start to the next one's, less the time the loop waited for work in
  between: what the step cost the served loop. Absent on the last line.

Lines stop after `max_steps` (the file of a long-running server stays bounded).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:
    from sutra.engine.engine import LLMEngine
    from sutra.outputs import RequestOutput

DEFAULT_MAX_STEPS = 1_000_000


class StepLog:
    def __init__(self, path: str | Path, max_steps: int = DEFAULT_MAX_STEPS) -> None:
        if max_steps < 1:
            raise ValueError(f"a step log needs room for at least one step, got {max_steps}")
        self.path = Path(path)
        self.max_steps = max_steps
        self.num_steps = 0
        # Line-buffered: a reader (a calibration while the server runs) sees every step written.
        self._file: IO[str] | None = self.path.open("w", encoding="utf-8", buffering=1)
        self._pending: dict | None = None  # the last step, until the next one starts
        self._started = 0.0
        self._started_at = 0.0
        self._waited = 0.0

    def waited(self, seconds: float) -> None:
        """The loop waited this long for work since the last step started."""
        self._waited += seconds

    def step_started(self) -> None:
        now = time.perf_counter()
        if self._pending is not None:
            self._pending["cycle_s"] = max(0.0, now - self._started - self._waited)
            self._write(self._pending)
            self._pending = None
        self._started, self._waited = now, 0.0
        self._started_at = time.time()

    def step_ended(self, slices: list[tuple[int, int]], step_seconds: float) -> None:
        if slices and self.num_steps < self.max_steps:
            self._pending = {"t": round(self._started_at, 4), "slices": slices, "step_s": step_seconds}

    def run_step(self, engine: LLMEngine) -> list[RequestOutput]:
        """engine.step(), logged (the engine records its slices: record_step_slices)."""
        self.step_started()
        start = time.perf_counter()
        outputs = engine.step()
        self.step_ended(engine.last_step_slices, time.perf_counter() - start)
        return outputs

    def close(self) -> None:
        if self._pending is not None:
            self._write(self._pending)
            self._pending = None
        if self._file is not None:
            self._file.close()
            self._file = None

    def _write(self, record: dict) -> None:
        if self._file is None:
            return
        self._file.write(json.dumps(record, separators=(",", ":")) + "\n")
        self.num_steps += 1


def read_step_log(path: str | Path) -> list[tuple[list[tuple[int, int]], float]]:
    """The (slices, cycle seconds) of every complete line of a step log."""
    steps = []
    with Path(path).open(encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a server still writing
                continue
            seconds = record.get("cycle_s")
            if seconds and seconds > 0:
                steps.append(([(int(c), int(n)) for c, n in record["slices"]], float(seconds)))
    return steps
