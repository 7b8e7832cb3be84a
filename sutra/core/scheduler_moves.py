"""The scheduler's request moves: a request leaving or joining an instance with its KV (live migration,
sutra/core/migration.py) and the prefill-to-decode hand-off (a request parked after its first token).

A mixin of Scheduler (sutra/core/scheduler.py). Call these between steps (after update_from_output,
before the next schedule()), except _park, which update_from_output calls itself.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sutra.core.request import Request, RequestStatus

if TYPE_CHECKING:
    from sutra.core.scheduler import Scheduler


class SchedulerMoves:
    def pause(self: Scheduler, request_id: str) -> Request:
        """Stop scheduling a running request; it keeps its KV blocks and its runner state."""
        request = self._moving(request_id, RequestStatus.RUNNING)
        self.running.remove(request)
        request.status = RequestStatus.PAUSED
        return request

    def resume(self: Scheduler, request_id: str) -> None:
        """A paused request runs on here (its move was called off)."""
        request = self._moving(request_id, RequestStatus.PAUSED)
        request.status = RequestStatus.RUNNING
        self.running.append(request)

    def release(self: Scheduler, request_id: str) -> Request:
        """A paused request now lives on another instance: drop it here, its blocks and runner state
        with it, without finishing it."""
        request = self._moving(request_id, RequestStatus.PAUSED)
        request.status = RequestStatus.MIGRATED
        self.parked.pop(request_id, None)
        self.policy.on_finished(request)
        self.kv.free(request)
        del self.requests[request_id]
        if self._runner_blocks.pop(request_id, None) is not None:
            self._finished_for_runner.append(request_id)
        return request

    def adopt(self: Scheduler, request: Request, block_ids: list[int]) -> None:
        """A request arrives running, its first num_computed_tokens tokens' KV already written into
        these reserved blocks (kv.reserve); it continues from there without recomputing anything."""
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        if not 0 < request.num_computed_tokens < request.num_tokens:
            raise ValueError(
                f"an adopted request needs KV for some but not all of its tokens, got "
                f"{request.num_computed_tokens} of {request.num_tokens}"
            )
        self.kv.adopt(request, block_ids)
        request.status = RequestStatus.RUNNING
        self.requests[request.request_id] = request
        self.running.append(request)
        self.policy.adopt(request)

    def unpark(self: Scheduler, request_id: str) -> None:
        """Decode a parked request here after all (no decode instance is left to take it)."""
        request = self.parked.pop(request_id, None)
        if request is None:
            raise ValueError(f"request {request_id!r} is not parked here")
        request.hand_off = False
        request.status = RequestStatus.RUNNING
        self.running.append(request)

    def _park(self: Scheduler, request: Request) -> None:
        """The prompt is done and its first token out: hold the KV for a decode instance."""
        self.running.remove(request)
        request.status = RequestStatus.PAUSED
        self.parked[request.request_id] = request

    def _moving(self: Scheduler, request_id: str, status: RequestStatus) -> Request:
        request = self.requests.get(request_id)
        if request is None or request.status is not status:
            found = "not here" if request is None else request.status.value
            raise ValueError(f"request {request_id!r} is {found}, not {status.value}")
        return request
