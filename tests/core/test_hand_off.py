"""Disaggregated serving's hand-off in the core: a prefill instance parks a request after its first
token, holding its KV; a decode instance takes it with a pre-copy-free migration; calling it off
leaves it parked; nothing parked is ever scheduled or preempted, and no block leaks."""

from __future__ import annotations

import pytest

from sutra.core.migration import MigrationAborted, MigrationInbox, OutgoingMigration
from sutra.core.request import Request, RequestStatus
from tests.core.fake_runner import make_request, run_to_completion
from tests.core.test_migration import BLOCK, NUM_BLOCKS, Instance, moved_copy


def prefill_instance(**options) -> Instance:
    return Instance(hand_off_after_prefill=True, **options)


def parked_request(src: Instance, prompt_len: int = 40, max_tokens: int = 30) -> Request:
    request = make_request(prompt_len, max_tokens, hand_off=True)
    src.scheduler.add_request(request)
    for _ in range(100):
        if request.request_id in src.scheduler.parked:
            return request
        src.step()
    raise AssertionError("the request never parked")


def hand_off(src: Instance, dst: Instance, request: Request, mid: str = "h") -> list[int]:
    """The whole hand-off; returns the source blocks copied, in order."""
    inbox = MigrationInbox(dst.scheduler.kv)
    mig = OutgoingMigration.begin(src.scheduler, request.request_id, mid)
    inbox.open(mid, request.request_id)
    assert mig.next_stage(src.scheduler) is None  # parked: nothing runs, so no pre-copy
    paused, blocks = mig.pause(src.scheduler)
    inbox.reserve(mid, len(blocks))
    inbox.commit(mid, dst.scheduler, moved_copy(paused))
    mig.commit(src.scheduler)
    return blocks


def test_a_request_parks_after_its_first_token_holding_its_kv():
    src = prefill_instance()
    mate = make_request(12, 20)  # not a hand-off request: it decodes here as usual
    src.scheduler.add_request(mate)
    request = parked_request(src, prompt_len=40)
    assert request.status is RequestStatus.PAUSED and request.num_output_tokens == 1
    assert request not in src.scheduler.running
    assert request.num_computed_tokens == 40  # the prompt's KV; the first token's comes on the decode side
    assert len(src.scheduler.kv.block_ids(request.request_id)) == 40 // BLOCK
    stats, load = src.scheduler.stats(), src.scheduler.load_summary()
    assert stats.num_parked == load.num_parked == 1
    for _ in range(5):
        assert request.request_id not in src.step().num_scheduled_tokens  # never scheduled again
    assert mate.num_output_tokens > 1


def test_a_handed_off_request_decodes_on_the_destination_from_its_prompt_kv():
    src, dst = prefill_instance(), Instance()
    request = parked_request(src, prompt_len=40, max_tokens=30)
    blocks = hand_off(src, dst, request)
    assert len(blocks) == -(-40 // BLOCK)  # the prompt's blocks, the partial one included
    assert request.status is RequestStatus.MIGRATED and not src.scheduler.parked
    assert request.request_id in src.step().finished_request_ids  # the runner drops its state
    out = dst.step()
    (new,) = out.new_requests
    assert new.num_computed_tokens == 40 and out.num_scheduled_tokens[request.request_id] == 1
    adopted = dst.scheduler.requests[request.request_id]
    assert not adopted.hand_off  # it does not park again
    run_to_completion(dst.scheduler, dst.runner)
    assert adopted.status is RequestStatus.FINISHED_LENGTH and adopted.num_output_tokens == 30
    assert src.free == dst.free == NUM_BLOCKS


def test_output_matches_the_colocated_run():
    colocated = Instance()
    reference = make_request(40, 25)
    colocated.scheduler.add_request(reference)
    run_to_completion(colocated.scheduler, colocated.runner)
    src, dst = prefill_instance(), Instance()
    request = make_request(40, 25, tokens=list(reference.prompt_token_ids), hand_off=True)
    src.scheduler.add_request(request)
    while request.request_id not in src.scheduler.parked:
        src.step()
    hand_off(src, dst, request)
    adopted = dst.scheduler.requests[request.request_id]
    run_to_completion(dst.scheduler, dst.runner)
    assert adopted.output_token_ids == reference.output_token_ids


@pytest.mark.parametrize("point", ["after_begin", "after_pause", "refused_by_destination"])
def test_a_called_off_hand_off_leaves_the_request_parked_for_another_try(point: str):
    src, dst = prefill_instance(), Instance()
    request = parked_request(src)
    held = src.scheduler.kv.block_ids(request.request_id)
    inbox = MigrationInbox(
        dst.scheduler.kv, min_free_blocks=NUM_BLOCKS if point == "refused_by_destination" else 0
    )
    mig = OutgoingMigration.begin(src.scheduler, request.request_id, "h1")
    inbox.open("h1", request.request_id)
    if point != "after_begin":
        _, blocks = mig.pause(src.scheduler)
        if point == "refused_by_destination":
            with pytest.raises(MigrationAborted, match="refused"):
                inbox.reserve("h1", len(blocks))
        else:
            inbox.reserve("h1", len(blocks))
    inbox.abort("h1")
    mig.abort(src.scheduler)
    assert request.request_id in src.scheduler.parked and request.status is RequestStatus.PAUSED
    assert src.scheduler.kv.block_ids(request.request_id) == held
    assert dst.free == NUM_BLOCKS and dst.scheduler.kv.num_reserved_blocks == 0
    hand_off(src, Instance(), request, mid="h2")  # a second try, elsewhere, succeeds
    assert src.free == NUM_BLOCKS


def test_an_aborted_parked_request_frees_its_blocks_and_cannot_be_handed_off():
    src = prefill_instance()
    request = parked_request(src)
    mig = OutgoingMigration.begin(src.scheduler, request.request_id, "h")
    src.scheduler.abort_requests([request.request_id])  # its client left while it waited
    assert not src.scheduler.parked and src.free == NUM_BLOCKS
    with pytest.raises(MigrationAborted, match="no longer parked"):
        mig.pause(src.scheduler)


def test_a_request_that_ends_with_its_first_token_never_parks():
    src = prefill_instance()
    request = make_request(20, 1, hand_off=True)
    src.scheduler.add_request(request)
    run_to_completion(src.scheduler, src.runner)
    assert request.status is RequestStatus.FINISHED_LENGTH and not src.scheduler.parked
    assert src.free == NUM_BLOCKS


def test_a_full_prefill_instance_makes_new_prompts_wait_and_preempts_no_parked_request():
    src = prefill_instance()
    # Each parks with 40 prompt tokens of KV: 10 blocks of 4; six hold 60 of the 64 blocks.
    parked = [parked_request(src, prompt_len=40) for _ in range(6)]
    waiting = make_request(40, 10, hand_off=True)
    src.scheduler.add_request(waiting)
    for _ in range(5):
        out = src.step()
        assert not out.num_scheduled_tokens  # no room: the prompt waits, nothing is evicted
    assert all(r.request_id in src.scheduler.parked for r in parked)
    assert src.scheduler.num_preemptions == 0 and waiting.status is RequestStatus.WAITING
    hand_off(src, Instance(), parked[0])  # a decode instance took one: room for the prompt
    src.step()
    assert waiting.request_id in src.scheduler.parked  # prefilled in one step, parked in turn


def test_an_unparked_request_decodes_where_it_prefilled():
    src = prefill_instance()
    request = parked_request(src, prompt_len=40, max_tokens=12)
    src.scheduler.unpark(request.request_id)  # no decode instance is left to take it
    assert not src.scheduler.parked and request.status is RequestStatus.RUNNING
    run_to_completion(src.scheduler, src.runner)
    assert request.status is RequestStatus.FINISHED_LENGTH and request.num_output_tokens == 12
    assert src.free == NUM_BLOCKS
    with pytest.raises(ValueError, match="not parked"):
        src.scheduler.unpark(request.request_id)
