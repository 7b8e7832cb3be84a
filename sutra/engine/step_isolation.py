"""When a step raises, fail only the requests that make it raise.

The step's slices are run again in halves, recursively, until every slice that still raises is alone;
those requests fail with RequestFailedError and every other slice of the step completes normally.
The halves keep the scheduler's order, so a request admitted in this step that reuses prefix-cache
blocks another one writes in this step still runs after its writer. ModelRunner.run changes no
request's state when it raises, so a slice can be run again as often as the search needs; the common
path is a single run inside a try.

A failed request may have written none of its KV in this step, so a request of the same step that read
those blocks (a same-step prefix-cache hit) computed on garbage: `tainted_requests` finds them, and
the engine sends them back to recompute instead of keeping what they sampled.
"""

from __future__ import annotations

import logging
from collections.abc import Collection

from sutra.core.kv_cache import KVCacheManager
from sutra.core.output import RunnerOutput
from sutra.core.request import Request
from sutra.engine.runner import ModelRunner
from sutra.errors import RequestFailedError

logger = logging.getLogger(__name__)


def run_isolating(runner: ModelRunner, scheduled: dict[str, int]) -> RunnerOutput:
    """runner.run(scheduled), except that slices whose run raises come back in `failed`."""
    try:
        return runner.run(scheduled)
    except Exception as e:
        if len(scheduled) == 1:
            (request_id,) = scheduled
            logger.exception("request %s failed in the engine step; the rest of the step goes on", request_id)
            out = RunnerOutput()
            out.failed[request_id] = RequestFailedError(
                f"the engine failed while computing this request: {type(e).__name__}: {e}"
            )
            return out
        logger.warning("a step of %d requests failed (%s); rerunning it in halves", len(scheduled), e)
    # Outside the except block, so deep searches do not chain every traceback.
    items = list(scheduled.items())
    half = len(items) // 2
    out = run_isolating(runner, dict(items[:half]))
    out.merge(run_isolating(runner, dict(items[half:])))
    return out


def tainted_requests(
    failed: Collection[str],
    scheduled: dict[str, int],
    kv: KVCacheManager,
    requests: dict[str, Request],
) -> list[str]:
    """Requests of this step (not failed) that read blocks a failed request, or a request tainted
    before them, was to write in this step. Call before the scheduler advances num_computed_tokens:
    a request writes its blocks from num_computed_tokens // block_size on."""
    block_size = kv.block_size

    def written(request_id: str) -> list[int]:
        return kv.block_ids(request_id)[requests[request_id].num_computed_tokens // block_size :]

    unwritten = {b for request_id in failed if request_id in requests for b in written(request_id)}
    tainted: list[str] = []
    # Only a request admitted later in the same step can read such a block, and the step's order is
    # admission order, so one pass also catches requests that read a tainted request's blocks.
    for request_id in scheduled:
        if request_id in failed or request_id not in requests:
            continue
        if not unwritten.isdisjoint(kv.block_ids(request_id)):
            tainted.append(request_id)
            unwritten.update(written(request_id))
    return tainted
