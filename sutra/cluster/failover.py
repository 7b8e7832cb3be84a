"""Failover: the requests of an engine instance that dies resume on another one by recompute
(ServerlessLLM's token-level migration), and their streams carry on as if nothing happened.

The front end knows all a single-sample request needs to go on: its prompt, SamplingParams and
RequestSpec, and the output tokens its reader has been handed (recorded from the deltas as they are
routed). It resubmits the request, under the same id, to an instance the dispatch policy picks, with
prompt = prompt + those tokens and max_tokens / min_tokens reduced by their number: the new instance
recomputes their KV in its prefill and samples the next token. Greedy output is that of one
uninterrupted run (exactly, with batch-invariant kernels); seeded sampling is not (the sampler's
positions shift), nor is output under presence or frequency penalties, which count output tokens
only and so no longer see those handed out before the failover (they are prompt now).

Text: from the failover on, the front end makes the request's text itself, from its tokens, with the
detokenizer one uninterrupted run would have had (rebuilt by replaying the tokens handed out), and
checks the stop strings on it. So the reader gets the text the dead instance held back (text that
might have begun a stop string, or bytes of an unfinished character), a stop string that spans the
failover point still stops the request, and the text matches one run exactly. The resumed engine
request therefore runs without stop strings; when one is found here, the request is aborted there.

A request whose source dies while it moves to another instance waits for the move to end: if the
destination took it over, it carries on there (the tokens the source sent but the front end never
got are filled in from the moved state); otherwise it is resubmitted. A request with n > 1 ends with
EngineDeadError: its samples have diverged, and one engine request cannot resume n prompts.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sutra.cluster.messages import Update
from sutra.engine.client import CompletionDelta, EngineDeadError, RequestDelta
from sutra.engine.detokenizer import IncrementalDetokenizer
from sutra.engine.engine_stream import stop_holdback
from sutra.model.tokenizer import Tokenizer
from sutra.outputs import CompletionOutput, RequestMetrics
from sutra.sampling_params import SamplingParams

if TYPE_CHECKING:
    from sutra.cluster.client import ClusterClient, _Stream
    from sutra.cluster.migrator import Move

logger = logging.getLogger(__name__)


@dataclass
class ResumedText:
    """The text of a resumed request, made from its tokens as one uninterrupted run would make it."""

    detokenizer: IncrementalDetokenizer
    output: CompletionOutput  # every token and all the text so far (stop strings applied)
    sent: int  # characters handed to the reader
    holdback: int  # characters kept back while a stop string may still be forming (as AsyncEngine)
    num_prompt_tokens: int  # of the original prompt: what the reader is told
    base: RequestMetrics | None  # the metrics handed out before the current engine request
    offset: int = 0  # tokens handed out before the current engine request

    @classmethod
    def replay(
        cls,
        tokenizer: Tokenizer,
        prompt_token_ids: list[int],
        params: SamplingParams,
        tokens: list[int],
        sent: int,
    ) -> ResumedText:
        """Rebuild the detokenizer of the original run from the tokens handed out (`sent`: the
        characters handed out with them). None of them can have completed a stop string: the request
        would have finished on it."""
        detokenizer = IncrementalDetokenizer(tokenizer, prompt_token_ids, params)
        output = CompletionOutput(0)
        for token in tokens:
            output.token_ids.append(token)
            detokenizer.add(output, token)
        holdback = stop_holdback(params)
        return cls(detokenizer, output, sent, holdback, len(prompt_token_ids), None)

    def rewrite(self, delta: RequestDelta) -> RequestDelta:
        """The delta the reader gets for one from the resumed engine request: its text made here,
        ending at a stop string found here, and counts and times as of the original request."""
        c = delta.completions[0]
        tokens, logprobs = c.token_ids, c.logprobs
        finish_reason, stop_reason, finished = c.finish_reason, c.stop_reason, delta.finished
        for j, token in enumerate(c.token_ids):
            self.output.token_ids.append(token)
            final = delta.finished and j == len(c.token_ids) - 1
            stop = self.detokenizer.add(self.output, token, final=final)
            if stop is not None:
                tokens = c.token_ids[: j + 1]
                logprobs = None if logprobs is None else logprobs[: j + 1]
                finish_reason, stop_reason, finished = "stop", stop, True
                break
        text = self.output.text
        end = len(text) if finished else max(self.sent, len(text) - self.holdback)
        new_text, self.sent = text[self.sent : end], end
        completion = CompletionDelta(0, new_text, tokens, logprobs, finish_reason, stop_reason)
        # A resumed request's prompt holds the tokens generated before: its first entries are the
        # original prompt's.
        scored = None if delta.prompt_logprobs is None else delta.prompt_logprobs[: self.num_prompt_tokens]
        return RequestDelta(
            delta.request_id,
            [completion],
            self.num_prompt_tokens,
            finished,
            self.metrics(delta),
            scored,
            delta.embedding,
        )

    def metrics(self, delta: RequestDelta) -> RequestMetrics:
        """Arrival, first token and prefix-cache hits are the original request's; the rest is the
        current engine request's. (Times are each instance's clock, as after a live migration.)"""
        new, base = delta.metrics, self.base
        if base is None:
            return new
        return dataclasses.replace(
            new,
            arrival_time=base.arrival_time,
            first_scheduled_time=base.first_scheduled_time,
            first_token_time=new.first_token_time if base.first_token_time is None else base.first_token_time,
            num_cached_tokens=base.num_cached_tokens,
            num_preemptions=base.num_preemptions + new.num_preemptions,
        )


@dataclass
class Progress:
    """What a single-sample request's reader has been handed: where it would resume."""

    params: SamplingParams
    tokens: list[int] = field(default_factory=list)
    text_len: int = 0
    metrics: RequestMetrics | None = None  # of the last delta handed out
    resumed: ResumedText | None = None  # set by its first failover


class Failover:
    """The ClusterClient's failover (see the module docstring); it works on the client's streams."""

    def __init__(self, client: ClusterClient) -> None:
        self.client = client
        self._tasks: set[asyncio.Task[None]] = set()
        self.num_resumed = 0  # requests resubmitted after their instance died

    @staticmethod
    def track(params: SamplingParams) -> Progress | None:
        """What to record of a new request's stream: nothing for n > 1, which cannot resume."""
        return Progress(params) if params.n == 1 else None

    def handed_out(self, stream: _Stream, delta: RequestDelta) -> RequestDelta:
        """Record a delta its reader is about to get; returns the delta it gets (rewritten once the
        request has been resumed)."""
        progress = stream.progress
        if progress is None:
            return delta
        if progress.resumed is not None:
            rewritten = progress.resumed.rewrite(delta)
            if rewritten.finished and not delta.finished and stream.instance_id is not None:
                # A stop string found here: the engine request knows none, so it would go on.
                self.client._send_abort(stream.instance_id, delta.request_id)
            delta = rewritten
        completion = delta.completions[0]
        progress.tokens.extend(completion.token_ids)
        progress.text_len += len(completion.text)
        progress.metrics = delta.metrics
        return delta

    def rescue(self, request_id: str, stream: _Stream, error: EngineDeadError) -> None:
        """The instance holding the request is dead: resume it elsewhere, or end it with `error`
        when it cannot resume (n > 1, no instance left, the client closing)."""
        client = self.client
        if stream.progress is None or client._closed or not client.instance_ids:
            self._fail(request_id, stream, error)
            return
        task = asyncio.get_running_loop().create_task(self._resume(request_id, stream, error))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def resume(self, request_id: str, stream: _Stream, why: str) -> None:
        """Resume a request its instance let go (ClusterClient.relocate) on another instance, as a
        failover does; it ends with EngineDeadError only if it cannot."""
        holder = stream.instance_id
        self.rescue(
            request_id, stream, EngineDeadError(f"request {request_id} left instance {holder}: {why}")
        )

    async def close(self) -> None:
        """Stop the failovers under way (the client is shutting down)."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)

    async def _resume(self, request_id: str, stream: _Stream, error: EngineDeadError) -> None:
        client = self.client
        move = client.migrator.moving.get(request_id)
        if move is not None and move.source == stream.instance_id:
            await move.ended.wait()  # whether the destination took it over is known only then
            if move.committed and self.follow(request_id, move):
                return
        if client._streams.get(request_id) is not stream:
            return  # aborted meanwhile
        progress = stream.progress
        assert progress is not None
        try:
            if progress.resumed is None:
                # Off the event loop: a long output is a decode call per token.
                progress.resumed = await asyncio.to_thread(
                    ResumedText.replay,
                    client.tokenizer,
                    stream.prompt_token_ids,
                    progress.params,
                    list(progress.tokens),
                    progress.text_len,
                )
                if client._streams.get(request_id) is not stream:
                    return
            done = len(progress.tokens)
            progress.resumed.offset, progress.resumed.base = done, progress.metrics
            params = dataclasses.replace(
                progress.params,
                max_tokens=progress.params.max_tokens - done,
                min_tokens=max(0, progress.params.min_tokens - done),
                stop=[],  # checked here, on the text of the whole output
            )
            prompt = stream.prompt_token_ids + progress.tokens
            # Held by no instance until the resubmit returns: its new instance's updates may come
            # first, and are taken from whichever sends them, as for a new request.
            stream.instance_id = None
            stream.early.clear()
            if not client.loads():
                await client._refresh_loads()
            target = await client._place([(request_id, prompt, params)], stream.spec)
        except Exception as e:
            self._fail(request_id, stream, EngineDeadError(f"{error} (resuming it elsewhere failed: {e})"))
            return
        if client._streams.get(request_id) is not stream:  # aborted (or ended) while it was placed
            client._send_abort(target, request_id)
            return
        stream.instance_id = target
        self.num_resumed += 1
        logger.info(
            "request %s resumed on engine instance %s after %d tokens (%s)", request_id, target, done, error
        )
        inst = client._instances[target]
        if not inst.alive:  # it died before its answer was read: no one else will see to this one
            self.rescue(request_id, stream, instance_died_error(target, inst.dead_reason))

    def follow(self, request_id: str, move: Move) -> bool:
        """The move committed, but its source's "moved" update will not come (the source died, or
        failed to commit): follow the request to the destination as that update would have, filling
        in what the source handed out that never arrived. False when the destination is dead too
        (then the request is resubmitted)."""
        client = self.client
        client.migrator.moved_seen(request_id, move.source)
        stream = client._streams.get(request_id)
        if stream is None:  # aborted meanwhile, at the source: the destination lets it go too
            client._send_abort(move.destination, request_id)
            return True
        if stream.instance_id != move.source:
            return True  # followed already
        if not client._instances[move.destination].alive or move.moved is None:
            return False
        updates = []
        gap = self._gap(stream, move)
        if gap is not None:
            updates.append(Update(0, request_id, "delta", delta=gap))
        updates.append(Update(0, request_id, "moved", destination=move.destination))
        client._route(updates, move.source)
        logger.info(
            "request %s followed its move to %s without word from %s",
            request_id,
            move.destination,
            move.source,
        )
        return True

    @staticmethod
    def _gap(stream: _Stream, move: Move) -> RequestDelta | None:
        """What the source handed out before the pause that the reader never got, as a delta."""
        moved, progress = move.moved, stream.progress
        assert moved is not None and progress is not None
        offset = 0 if progress.resumed is None else progress.resumed.offset
        have = len(progress.tokens) - offset  # tokens of the current engine request the reader has
        tokens = moved.output_token_ids[have : moved.sent_tokens]
        # Resumed: the text is made from the tokens anyway.
        text = "" if progress.resumed is not None else moved.text[progress.text_len : moved.sent_text]
        if not tokens and not text:
            return None
        logprobs = None if moved.logprobs is None else moved.logprobs[have : moved.sent_tokens]
        completion = CompletionDelta(0, text, tokens, logprobs, None, None)
        return RequestDelta(
            moved.request_id,
            [completion],
            len(moved.prompt_token_ids),
            False,
            moved.metrics,
            moved.prompt_logprobs,
        )

    def _fail(self, request_id: str, stream: _Stream, error: EngineDeadError) -> None:
        if self.client._streams.get(request_id) is stream:
            self.client._end_stream(request_id, error, tell_instance=False)


def instance_died_error(instance_id: str, reason: str | None) -> EngineDeadError:
    """What a request ends with when the instance holding it died and it could not resume."""
    return EngineDeadError(f"engine instance {instance_id} died ({reason}); retry the request")
