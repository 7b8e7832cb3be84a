"""Failover (sutra/cluster/failover.py): the requests of an instance that dies resume on another one by
recompute. A greedy stream, and one that a stop string ends after the failover point, get exactly the
tokens and text of one local run, with no error, gap or duplicate; an n=2 request fails; a request
whose source dies mid-migration follows its move. The text handover is checked at every failover
point without Ray."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
import ray

from sutra.cluster.client import ClusterClient
from sutra.cluster.dispatch import DispatchPolicy
from sutra.cluster.failover import ResumedText
from sutra.cluster.manager import Cluster
from sutra.cluster.migrator import ActorPeer
from sutra.engine.client import CompletionDelta, EngineDeadError, RequestDelta
from sutra.engine.engine import LLMEngine
from sutra.outputs import RequestMetrics, RequestOutput
from sutra.sampling_params import SamplingParams
from tests.cluster.conftest import TINY_CONFIG
from tests.cluster.test_client import _wait_for, _with_client

PROMPT = list(range(200, 260))
GREEDY = SamplingParams(max_tokens=60, ignore_eos=True, temperature=0)


class _FirstAlive(DispatchPolicy):
    """Everything to i0 while it lives, so the tests know which instance to kill."""

    name = "first-alive"

    def _pick(self, loads, request) -> str:
        return min(loads)


@pytest.fixture(scope="module")
def engine() -> LLMEngine:
    return LLMEngine(TINY_CONFIG)


def _steps(engine: LLMEngine, request_id: str, params: SamplingParams) -> tuple[list[str], RequestOutput]:
    """One local run: the output text after each of its steps, and its output."""
    engine.add_request(request_id, PROMPT, params)
    texts = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            texts.append(out.outputs[0].text)
    return texts, out


@pytest.fixture(scope="module")
def greedy_run(engine) -> tuple[list[str], RequestOutput]:
    return _steps(engine, "greedy", GREEDY)


@pytest.fixture(scope="module")
def stop_run(engine, greedy_run) -> tuple[SamplingParams, list[str], RequestOutput]:
    """Greedy, ended by a 12-character stop string about halfway (so 11 characters are held back)."""
    text = greedy_run[1].outputs[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 12]
    assert "\ufffd" not in stop
    params = dataclasses.replace(GREEDY, stop=[stop])
    texts, out = _steps(engine, "stop", params)
    assert out.outputs[0].finish_reason == "stop" and len(out.outputs[0].token_ids) > 20
    return params, texts, out


def _tokens(seen: list[RequestDelta]) -> list[int]:
    return [t for d in seen for t in d.completions[0].token_ids]


def _check(seen: list[RequestDelta], expected: RequestOutput) -> None:
    """One uninterrupted run's tokens and text, one final delta, the original prompt's length."""
    c = expected.outputs[0]
    assert _tokens(seen) == c.token_ids
    assert "".join(d.completions[0].text for d in seen) == c.text
    assert seen[-1].finished and not any(d.finished for d in seen[:-1])
    last = seen[-1].completions[0]
    assert (last.finish_reason, last.stop_reason) == (c.finish_reason, c.stop_reason)
    assert {d.num_prompt_tokens for d in seen} == {len(PROMPT)}


async def _collect(client: ClusterClient, request_id: str, seen: list[RequestDelta]) -> None:
    async for delta in client.stream(request_id):
        seen.append(delta)


async def _idle(client: ClusterClient, instance_id: str) -> None:
    def idle() -> bool:
        load = client.loads().get(instance_id)
        return load is not None and load.used_blocks == 0 and load.num_running == 0

    await _wait_for(idle, what=f"{instance_id} idle with every block free")


def test_the_text_continues_exactly_from_every_failover_point(engine, greedy_run, stop_run):
    """The handover without Ray: after k tokens (and the text AsyncEngine had handed out with them,
    a stop string's length held back), the resumed request's deltas, whose tokens the resumed engine
    request samples without stop strings, are rewritten into exactly one run's remaining text."""
    stop_params, stop_texts, stopped = stop_run
    include = dataclasses.replace(stop_params, include_stop_str_in_output=True)
    continuation = greedy_run[1].outputs[0].token_ids  # greedy: what the resumed request samples
    runs = [
        (GREEDY, *greedy_run),
        (stop_params, stop_texts, stopped),
        (include, *_steps(engine, "inc", include)),
    ]
    for params, texts, expected in runs:
        c = expected.outputs[0]
        holdback = max((len(s) for s in params.stop), default=1) - 1
        handed_out = [0]  # characters handed out after k tokens
        for text in texts[:-1]:
            handed_out.append(max(handed_out[-1], len(text) - holdback))
        for k in range(len(c.token_ids)):
            resumed = ResumedText.replay(engine.tokenizer, PROMPT, params, c.token_ids[:k], handed_out[k])
            text, tokens = c.text[: handed_out[k]], c.token_ids[:k]
            for j in range(k, len(continuation)):
                last = j == len(continuation) - 1
                new = CompletionDelta(0, "", [continuation[j]], None, "length" if last else None, None)
                delta = resumed.rewrite(RequestDelta("r", [new], len(PROMPT) + k, last, RequestMetrics(0.0)))
                text += delta.completions[0].text
                tokens += delta.completions[0].token_ids
                assert delta.num_prompt_tokens == len(PROMPT)
                if delta.finished:
                    break
            assert (text, tokens) == (c.text, c.token_ids), (params.stop, k)
            done = delta.completions[0]
            assert (done.finish_reason, done.stop_reason) == (c.finish_reason, c.stop_reason)


@pytest.mark.ray
def test_streams_on_a_killed_instance_resume_elsewhere_exactly(ray_session, greedy_run, stop_run):
    stop_params, _, stopped = stop_run
    sampled = SamplingParams(max_tokens=60, ignore_eos=True, temperature=0.8, seed=3, n=2)
    cluster = Cluster.start(TINY_CONFIG, 2, threads_per_instance=1, ready_timeout_s=300)
    try:

        async def body(client: ClusterClient):
            jobs = {"greedy": GREEDY, "stop": stop_params, "n2": sampled}
            for request_id, params in jobs.items():
                await client.submit_many([(request_id, PROMPT, params)])
                assert client.instance_of(request_id) == "i0"
            seen = {request_id: [] for request_id in jobs}
            readers = {rid: asyncio.create_task(_collect(client, rid, seen[rid])) for rid in jobs}
            await _wait_for(lambda: len(_tokens(seen["greedy"])) >= 8 and seen["n2"], what="decoding")
            killed_at = len(_tokens(seen["greedy"]))
            ray.kill(client.actor_of("i0"))
            await asyncio.wait_for(asyncio.gather(readers["greedy"], readers["stop"]), 60)
            # n > 1 cannot resume: its samples have diverged (failover.py)
            with pytest.raises(EngineDeadError, match="engine instance i0 died"):
                await asyncio.wait_for(readers["n2"], 60)
            assert client.instance_ids == ["i1"] and client.failover.num_resumed == 2
            # The stop string was found by the front end: the request was aborted on i1 too.
            await _idle(client, "i1")
            return seen, killed_at

        seen, killed_at = asyncio.run(_with_client(cluster, _FirstAlive(), body))
        assert 8 <= killed_at < GREEDY.max_tokens  # killed mid-decode
        _check(seen["greedy"], greedy_run[1])
        _check(seen["stop"], stopped)
    finally:
        cluster.shutdown()


@pytest.mark.ray
def test_a_request_whose_source_dies_mid_migration_follows_its_move(ray_session, engine, monkeypatch):
    """The source dies after the destination took the request over, before its "moved" update:
    the stream follows the move, the tokens the source had sent that never arrived filled in."""
    # Long enough that it cannot finish while the move runs, however busy the machine.
    long_greedy = dataclasses.replace(GREEDY, max_tokens=400)
    expected = _steps(engine, "long", long_greedy)[1]
    cluster = Cluster.start(TINY_CONFIG, 2, threads_per_instance=1, ready_timeout_s=300)
    step = ActorPeer._step

    async def body(client: ClusterClient):
        seen: list[RequestDelta] = []
        lost = {"from": None, "to": None}  # tokens i0 sent that die with it: [from, to)
        route = client._route

        def lossy_route(updates, sender) -> None:
            # From the start of the move, i0's updates are lost (with i0, as it will die); the
            # "moved" update the front end makes up for it goes through.
            if sender != "i0" or lost["from"] is None or updates[0].seq == 0:
                route(updates, sender)

        async def kill_before_commit(peer: ActorPeer, op: str, *args):
            if op == "in_open":
                lost["from"] = len(_tokens(seen))
            if op == "out_commit":  # the destination holds the request now
                lost["to"] = peer.move.moved.sent_tokens
                ray.kill(client.actor_of("i0"))
                await _wait_for(lambda: "i0" not in client.instance_ids, what="i0's death noticed")
            return await step(peer, op, *args)

        client._route = lossy_route
        monkeypatch.setattr(ActorPeer, "_step", kill_before_commit)
        await client.submit_many([("r", PROMPT, long_greedy)])
        reader = asyncio.create_task(_collect(client, "r", seen))
        await _wait_for(lambda: len(_tokens(seen)) >= 8, what="8 tokens")
        result = await client.migrator.migrate("r", "i1", last_stage_blocks=0)
        assert not result.migrated and result.failed
        await asyncio.wait_for(reader, 60)
        assert client.failover.num_resumed == 0  # followed, not resubmitted
        await _idle(client, "i1")
        return seen, lost

    try:
        seen, lost = asyncio.run(_with_client(cluster, _FirstAlive(), body))
        assert lost["to"] > lost["from"]  # a gap to fill
        _check(seen, expected)
    finally:
        cluster.shutdown()
