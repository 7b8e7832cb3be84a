"""Migration state machines on two schedulers with fake runners: pre-copy stages, pause, commit, and
an abort at every stage leaving both instances' blocks at baseline."""

from __future__ import annotations

import pytest

from sutra.core.migration import MigrationAborted, MigrationInbox, OutgoingMigration
from sutra.core.request import Request, RequestStatus
from sutra.core.scheduler import Scheduler
from tests.core.fake_runner import FakeRunner, make_request, make_scheduler, run_to_completion, step

NUM_BLOCKS = 64
BLOCK = 4


class Instance:
    def __init__(self, policy: str = "fcfs", **options) -> None:
        self.scheduler: Scheduler = make_scheduler(
            num_blocks=NUM_BLOCKS, block_size=BLOCK, policy=policy, **options
        )
        self.runner = FakeRunner()

    def step(self):
        return step(self.scheduler, self.runner)

    @property
    def free(self) -> int:
        return self.scheduler.kv.num_free_blocks


def running_request(src: Instance, prompt_len: int = 40, max_tokens: int = 30, **kw) -> Request:
    request = make_request(prompt_len, max_tokens, **kw)
    src.scheduler.add_request(request)
    while request.is_prefilling or request.num_output_tokens < 2:
        src.step()
    return request


def moved_copy(request: Request) -> Request:
    """The destination's Request, built from what crosses: tokens, progress, params, spec."""
    moved = Request(
        request.request_id,
        request.prompt_token_ids,
        request.sampling_params,
        arrival_time=request.arrival_time,
        spec=request.spec,
    )
    moved.token_ids = list(request.token_ids)
    moved.num_computed_tokens = request.num_computed_tokens
    return moved


def migrate(
    src: Instance, dst: Instance, request: Request, steps_between: int = 1, **limits
) -> tuple[list[int], list[int]]:
    """Runs a whole migration, stepping the source between stages; returns the source block ids in
    the order they were copied, and the request's source block table when it paused."""
    inbox = MigrationInbox(dst.scheduler.kv)
    mig = OutgoingMigration.begin(src.scheduler, request.request_id, "m1", **limits)
    inbox.open("m1", request.request_id)
    copied: list[int] = []
    while (ids := mig.next_stage(src.scheduler)) is not None:
        inbox.reserve("m1", len(ids))
        copied += ids
        for _ in range(steps_between):
            src.step()  # the request keeps decoding while its blocks are copied
    paused, rest = mig.pause(src.scheduler)
    table = src.scheduler.kv.block_ids(request.request_id)
    inbox.reserve("m1", len(rest))
    copied += rest
    inbox.commit("m1", dst.scheduler, moved_copy(paused))
    mig.commit(src.scheduler)
    return copied, table


def test_a_migrated_request_continues_on_the_destination_without_recomputing():
    src, dst = Instance(), Instance()
    other = make_request(12, 40)
    src.scheduler.add_request(other)  # a batch mate that stays
    request = running_request(src)
    copied, table = migrate(src, dst, request, last_stage_blocks=2)
    # The stages copied the source's whole table in order, the partial last block included.
    assert copied == table and len(table) == -(-request.num_computed_tokens // BLOCK)
    assert request.status is RequestStatus.MIGRATED
    assert request.request_id not in src.scheduler.requests
    assert request.request_id in src.step().finished_request_ids  # the runner drops its state
    # On the destination it decodes at once: a 1-token slice, from its num_computed_tokens.
    out = dst.step()
    (new,) = out.new_requests
    adopted = dst.scheduler.requests[request.request_id]
    assert new.num_computed_tokens == adopted.num_tokens - 2  # one decode ran since
    assert out.num_scheduled_tokens[request.request_id] == 1
    run_to_completion(dst.scheduler, dst.runner)
    run_to_completion(src.scheduler, src.runner)
    assert adopted.num_output_tokens == 30 and adopted.status is RequestStatus.FINISHED_LENGTH
    assert src.free == dst.free == NUM_BLOCKS


def test_pre_copy_runs_stages_while_the_request_decodes_then_a_short_last_stage():
    src = Instance()
    request = running_request(src, prompt_len=120, max_tokens=60)
    mig = OutgoingMigration.begin(src.scheduler, request.request_id, "m", last_stage_blocks=2)
    first = mig.next_stage(src.scheduler)
    assert first is not None and len(first) == 120 // BLOCK
    for _ in range(12):  # 12 decodes fill 3 more blocks
        src.step()
    second = mig.next_stage(src.scheduler)
    assert second is not None and len(second) == 3
    assert mig.next_stage(src.scheduler) is None  # nothing new: time to pause
    paused, rest = mig.pause(src.scheduler)
    assert len(rest) <= 2 and paused.status is RequestStatus.PAUSED
    assert paused not in src.scheduler.running  # holds its blocks, not a seat
    for _ in range(3):
        assert request.request_id not in src.step().num_scheduled_tokens  # paused: never scheduled


def test_a_paused_request_resumes_when_the_move_is_called_off():
    src = Instance()
    request = running_request(src)
    mig = OutgoingMigration.begin(src.scheduler, request.request_id, "m")
    mig.pause(src.scheduler)
    src.step()
    mig.abort(src.scheduler)
    mig.abort(src.scheduler)  # twice is harmless
    run_to_completion(src.scheduler, src.runner)
    assert request.status is RequestStatus.FINISHED_LENGTH and request.num_output_tokens == 30
    assert src.free == NUM_BLOCKS


ABORT_POINTS = [
    "after_open",
    "mid_precopy",
    "paused",
    "refused_by_destination",
    "lease_expired",
    "request_finished",
    "request_aborted",
    "request_preempted",
    "source_gone",
]


@pytest.mark.parametrize("point", ABORT_POINTS)
def test_an_abort_at_any_stage_leaves_both_instances_at_baseline(point: str):
    src, dst = Instance(), Instance()
    now = [0.0]
    inbox = MigrationInbox(
        dst.scheduler.kv,
        min_free_blocks=NUM_BLOCKS if point == "refused_by_destination" else 0,
        clock=lambda: now[0],
    )
    dst_local = make_request(20, 10)
    dst.scheduler.add_request(dst_local)  # the destination's own work goes on throughout
    request = running_request(src, prompt_len=60, max_tokens=20 if point == "request_finished" else 40)
    mig = OutgoingMigration.begin(src.scheduler, request.request_id, "m", last_stage_blocks=0)
    inbox.open("m", request.request_id)
    if point == "refused_by_destination":
        with pytest.raises(MigrationAborted, match="refused"):
            inbox.reserve("m", len(mig.next_stage(src.scheduler)))
        mig.abort(src.scheduler)
    elif point == "after_open":
        inbox.abort("m")
        mig.abort(src.scheduler)
    else:
        inbox.reserve("m", len(mig.next_stage(src.scheduler)))
        dst.step()
        if point == "mid_precopy":
            inbox.abort("m")
            mig.abort(src.scheduler)
        elif point == "paused":
            _, rest = mig.pause(src.scheduler)
            inbox.reserve("m", len(rest))
            src.step()
            inbox.abort("m")
            mig.abort(src.scheduler)
        elif point == "lease_expired" or point == "source_gone":
            now[0] += 11.0  # the source never calls again
            assert inbox.expire() == ["m"]
            with pytest.raises(MigrationAborted, match="not open"):
                inbox.reserve("m", 1)
            mig.abort(src.scheduler)
        elif point in ("request_finished", "request_aborted", "request_preempted"):
            if point == "request_finished":
                run_to_completion(src.scheduler, src.runner)
            elif point == "request_aborted":
                src.scheduler.abort_requests([request.request_id])
            else:
                src.scheduler.preempt_request(request.request_id)
            with pytest.raises(MigrationAborted):
                mig.next_stage(src.scheduler)
            inbox.abort("m")
            mig.abort(src.scheduler)
    assert dst.scheduler.kv.num_reserved_blocks == 0
    run_to_completion(src.scheduler, src.runner)
    run_to_completion(dst.scheduler, dst.runner)
    assert src.free == dst.free == NUM_BLOCKS
    assert dst_local.status is RequestStatus.FINISHED_LENGTH
    if point not in ("request_aborted",):
        assert request.status is RequestStatus.FINISHED_LENGTH  # it stayed on the source and ended


@pytest.mark.parametrize("policy", ["fcfs", "vtc", "priority", "priority-vtc", "lcf"])
def test_every_policy_adopts_a_running_request(policy: str):
    src, dst = Instance(policy), Instance(policy)
    request = running_request(src, client="a", priority=1)
    dst.scheduler.add_request(make_request(16, 8, client="b"))
    migrate(src, dst, request)
    run_to_completion(dst.scheduler, dst.runner)
    assert dst.free == NUM_BLOCKS and dst.scheduler.policy.num_tracked_clients >= 0
    assert dst.scheduler.num_waiting == 0 and not dst.scheduler.running


def test_a_prefilling_request_or_an_unknown_one_cannot_start_moving():
    src = Instance()
    request = make_request(40, 4)
    src.scheduler.add_request(request)
    with pytest.raises(MigrationAborted, match="not running"):
        OutgoingMigration.begin(src.scheduler, request.request_id, "m")
    with pytest.raises(MigrationAborted, match="not running"):
        OutgoingMigration.begin(src.scheduler, "nobody", "m")


def test_the_destination_bounds_its_open_migrations_and_checks_ids():
    dst = Instance()
    inbox = MigrationInbox(dst.scheduler.kv, max_open=1)
    inbox.open("a", "r1")
    with pytest.raises(MigrationAborted, match="already open"):
        inbox.open("a", "r1")
    with pytest.raises(MigrationAborted, match="already takes 1"):
        inbox.open("b", "r2")
    with pytest.raises(MigrationAborted, match="not open"):
        inbox.reserve("zzz", 1)


def test_pinned_blocks_outlive_their_request_until_unpinned():
    src = Instance()
    request = running_request(src)
    blocks = src.scheduler.kv.block_ids(request.request_id)[:2]
    src.scheduler.kv.pin(blocks)  # a pre-copy stage reading them off the step thread
    src.scheduler.abort_requests([request.request_id])
    assert src.free == NUM_BLOCKS - 2  # not reusable while they are read
    src.scheduler.kv.unpin(blocks)
    assert src.free == NUM_BLOCKS


def test_a_high_priority_request_reserves_headroom_in_the_load_summary():
    src = Instance(priority_headroom_blocks=20)
    running_request(src, priority=0)
    calm = src.scheduler.load_summary()
    assert calm.headroom_blocks == 0
    urgent = make_request(8, 4, priority=-1)
    src.scheduler.add_request(urgent)
    pressed = src.scheduler.load_summary()
    assert pressed.headroom_blocks == 20 and pressed.freeness < calm.freeness
    run_to_completion(src.scheduler, src.runner)
    assert src.scheduler.load_summary().headroom_blocks == 0


def test_a_destination_with_no_free_seat_refuses_a_migration():
    src, dst = Instance(), Instance(max_seqs=2)
    for _ in range(2):
        running_request(dst)  # its two seats are taken
    request = running_request(src)
    inbox = MigrationInbox(dst.scheduler.kv)
    with pytest.raises(MigrationAborted, match="no free seat"):
        inbox.open("m", request.request_id, dst.scheduler)
    assert not inbox.open_migrations and request.status is RequestStatus.RUNNING
