"""`--log-requests`: one log line per finished or aborted request.

A line carries the request id, its client, prompt and output token counts, the queue time, time to
first token and end-to-end time, and the finish reason of each completion. Prompt and output text
stay out of the log unless `--log-request-text` asks for them: they are the users' data.
"""

from __future__ import annotations

import json
import logging
import time

from sutra.engine.async_engine import AsyncEngine, RequestInfo
from sutra.outputs import RequestOutput

logger = logging.getLogger("sutra.requests")


class RequestLog:
    """An EngineListener that logs each request as it ends."""

    def __init__(self, include_text: bool = False) -> None:
        self.include_text = include_text
        # Requests seen in a step and not yet finished: an abort is logged with what they had done.
        self._running: dict[str, RequestOutput] = {}

    def on_step(self, engine: AsyncEngine, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            if out.finished:
                self._running.pop(out.request_id, None)
                self._log(engine, out.request_id, out, engine.client_of(out.request_id), None)
            else:
                self._running[out.request_id] = out

    def on_abort(self, engine: AsyncEngine, request_id: str) -> None:
        info = engine.request_info(request_id)
        self._log(
            engine,
            request_id,
            self._running.pop(request_id, None),
            None if info is None else info.client,
            info,
        )

    def _log(
        self,
        engine: AsyncEngine,
        request_id: str,
        out: RequestOutput | None,
        client: str | None,
        info: RequestInfo | None,
    ) -> None:
        now = time.monotonic()
        prompt_ids = out.prompt_token_ids if out is not None else (info.prompt_token_ids if info else [])
        fields = [f"request_id={request_id}", f"client={json.dumps(client or 'anonymous')}"]
        fields.append(f"prompt_tokens={len(prompt_ids)}")
        if out is None:  # aborted before its first step
            arrival = info.arrival_time if info is not None else now
            fields += ["output_tokens=0", "queue_s=-", "ttft_s=-", f"e2e_s={now - arrival:.3f}"]
            reasons = "abort"
        else:
            m = out.metrics
            fields.append(f"output_tokens={sum(len(c.token_ids) for c in out.outputs)}")
            fields.append(f"queue_s={_seconds(m.queue_time)}")
            fields.append(f"ttft_s={_seconds(m.time_to_first_token)}")
            fields.append(f"e2e_s={(m.finished_time or now) - m.arrival_time:.3f}")
            # An abort reaches listeners before the engine marks the completions.
            reasons = ",".join(c.finish_reason or "abort" for c in out.outputs)
        fields.append(f"finish_reason={reasons}")
        if self.include_text:
            prompt = engine.tokenizer.decode(prompt_ids, skip_special_tokens=False)
            fields.append(f"prompt={json.dumps(prompt, ensure_ascii=False)}")
            texts = [] if out is None else [c.text for c in out.outputs]
            fields.append(f"output={json.dumps(texts[0] if len(texts) == 1 else texts, ensure_ascii=False)}")
        logger.info("request ended: %s", " ".join(fields))


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def enable_request_log(engine: AsyncEngine, include_text: bool) -> RequestLog:
    """Attach a RequestLog to the engine; its lines are logged whatever --log-level says."""
    logger.setLevel(logging.INFO)
    request_log = RequestLog(include_text)
    engine.listeners.append(request_log)
    return request_log
