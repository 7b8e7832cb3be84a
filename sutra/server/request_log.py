"""`--log-requests`: one log line per finished or aborted request.

A line carries the request id, its client, prompt and output token counts, the queue time, time to
first token and end-to-end time, and the finish reason of each completion. Prompt and output text
stay out of the log unless `--log-request-text` asks for them: they are the users' data.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field

from sutra.engine.client import EngineClient, RequestDelta, RequestInfo
from sutra.outputs import RequestMetrics

logger = logging.getLogger("sutra.requests")


@dataclass
class _Seen:
    """A request's output so far, assembled from its deltas."""

    info: RequestInfo | None
    metrics: RequestMetrics
    texts: list[str] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)
    finish_reasons: list[str | None] = field(default_factory=list)

    def add(self, delta: RequestDelta) -> None:
        self.metrics = delta.metrics
        for c in delta.completions:
            while len(self.texts) <= c.index:
                self.texts.append("")
                self.num_tokens.append(0)
                self.finish_reasons.append(None)
            self.texts[c.index] += c.text
            self.num_tokens[c.index] += len(c.token_ids)
            if c.finish_reason is not None:
                self.finish_reasons[c.index] = c.finish_reason


class RequestLog:
    """An EngineListener that logs each request as it ends."""

    def __init__(self, include_text: bool = False) -> None:
        self.include_text = include_text
        # Requests seen in a step and not yet finished: an abort is logged with what they had done.
        self._running: dict[str, _Seen] = {}

    def on_step(self, engine: EngineClient, deltas: list[RequestDelta]) -> None:
        for delta in deltas:
            seen = self._running.get(delta.request_id)
            if seen is None:
                seen = self._running[delta.request_id] = _Seen(
                    engine.request_info(delta.request_id), delta.metrics
                )
            seen.add(delta)
            if delta.finished:
                del self._running[delta.request_id]
                self._log(engine, delta.request_id, seen, seen.info)

    def on_abort(self, engine: EngineClient, request_id: str) -> None:
        seen = self._running.pop(request_id, None)
        self._log(engine, request_id, seen, engine.request_info(request_id) if seen is None else seen.info)

    def _log(
        self, engine: EngineClient, request_id: str, seen: _Seen | None, info: RequestInfo | None
    ) -> None:
        now = time.monotonic()
        prompt_ids = info.prompt_token_ids if info is not None else []
        client = info.client if info is not None else None
        fields = [f"request_id={request_id}", f"client={json.dumps(client or 'anonymous')}"]
        fields.append(f"prompt_tokens={len(prompt_ids)}")
        if seen is None:  # aborted before its first step
            arrival = info.arrival_time if info is not None else now
            fields += ["output_tokens=0", "queue_s=-", "ttft_s=-", f"e2e_s={now - arrival:.3f}"]
            reasons = "abort"
        else:
            m = seen.metrics
            fields.append(f"output_tokens={sum(seen.num_tokens)}")
            fields.append(f"queue_s={_seconds(m.queue_time)}")
            fields.append(f"ttft_s={_seconds(m.time_to_first_token)}")
            fields.append(f"e2e_s={(m.finished_time or now) - m.arrival_time:.3f}")
            # An abort reaches listeners before the engine marks the completions.
            reasons = ",".join(r or "abort" for r in seen.finish_reasons)
        fields.append(f"finish_reason={reasons}")
        if self.include_text:
            prompt = engine.tokenizer.decode(prompt_ids, skip_special_tokens=False)
            fields.append(f"prompt={json.dumps(prompt, ensure_ascii=False)}")
            texts = [] if seen is None else seen.texts
            fields.append(f"output={json.dumps(texts[0] if len(texts) == 1 else texts, ensure_ascii=False)}")
        logger.info("request ended: %s", " ".join(fields))


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def enable_request_log(engine: EngineClient, include_text: bool) -> RequestLog:
    """Attach a RequestLog to the engine; its lines are logged whatever --log-level says."""
    logger.setLevel(logging.INFO)
    request_log = RequestLog(include_text)
    engine.listeners.append(request_log)
    return request_log
