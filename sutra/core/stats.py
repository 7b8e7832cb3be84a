"""What an engine instance reports about itself: a stats snapshot for metrics, and the load summary a
global scheduler places requests by (Llumnix's virtual usage and freeness). Plain data, made between
steps, so a reader never looks into a scheduler while a step changes it, and it can cross processes."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class InstanceLoad:
    """Llumnix's load summary of one instance, in KV blocks.

    Virtual usage counts what the instance is committed to, not only what it holds: each running
    request's blocks, plus the blocks the head of the waiting queue needs (so an instance with a long
    prompt stuck at the head looks full, and migration frees room for it: de-fragmentation), plus
    headroom kept for high-priority requests. A draining instance is infinitely loaded, so it gets no
    new work and everything leaves it. Freeness = (total - virtual usage) / batch size: the blocks each
    running request could still grow into; dispatch goes to the freest instance.
    """

    total_blocks: int
    used_blocks: int  # held by requests now (cached-but-unreferenced blocks count as free)
    num_running: int
    num_waiting: int
    head_demand_blocks: int  # blocks the head of the waiting queue needs to start
    headroom_blocks: int = 0  # kept free for high-priority requests
    draining: bool = False
    num_preemptions: int = 0  # since start: a rise between two summaries means memory pressure
    num_parked: int = 0  # prefilled requests holding KV until a decode instance takes them

    @property
    def free_blocks(self) -> int:
        return self.total_blocks - self.used_blocks

    @property
    def virtual_used_blocks(self) -> float:
        if self.draining:
            return float("inf")
        return self.used_blocks + self.head_demand_blocks + self.headroom_blocks

    @property
    def freeness(self) -> float:
        return (self.total_blocks - self.virtual_used_blocks) / max(1, self.num_running)


@dataclass(frozen=True)
class EngineStats:
    """Counters and gauges of one instance (or the sum over a cluster's instances)."""

    num_running: int
    num_waiting: int
    num_preemptions: int  # since start
    kv_total_blocks: int
    kv_free_blocks: int
    prefix_queries: int  # prompt tokens looked up in the prefix cache, since start
    prefix_hits: int  # of which found
    num_parked: int = 0  # prefilled, waiting for a decode instance (disaggregated serving)

    @property
    def kv_usage(self) -> float:
        return 1.0 - self.kv_free_blocks / self.kv_total_blocks if self.kv_total_blocks else 0.0

    @property
    def prefix_hit_rate(self) -> float | None:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else None

    @staticmethod
    def total(parts: list[EngineStats]) -> EngineStats:
        return EngineStats(
            num_running=sum(p.num_running for p in parts),
            num_waiting=sum(p.num_waiting for p in parts),
            num_preemptions=sum(p.num_preemptions for p in parts),
            kv_total_blocks=sum(p.kv_total_blocks for p in parts),
            kv_free_blocks=sum(p.kv_free_blocks for p in parts),
            prefix_queries=sum(p.prefix_queries for p in parts),
            prefix_hits=sum(p.prefix_hits for p in parts),
            num_parked=sum(p.num_parked for p in parts),
        )
