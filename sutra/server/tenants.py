"""What an operator allows each API-key tenant: here, how urgent a `priority` its requests may ask for.

Under the priority policies a lower `priority` is served first and may preempt, and the client picks
it. `--tenant-priority TENANT:N` caps a tenant at N: a request asking for a more urgent (lower) value
is served at N, not refused, so clients that always send their favourite priority keep working.
`--default-tenant-priority N` caps every tenant without an entry (and, without API keys, every
request). Less urgent values are always honoured.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class PriorityCaps:
    caps: dict[str, int] = field(default_factory=dict)  # tenant -> its most urgent priority
    default: int | None = None  # for tenants without an entry; None: no cap

    def clamp(self, tenant: str | None, priority: int) -> int:
        cap = self.caps.get(tenant, self.default) if tenant is not None else self.default
        return priority if cap is None else max(priority, cap)


def parse_priority_caps(specs: list[str], default: int | None, tenants: set[str]) -> PriorityCaps:
    """TENANT:N specs -> PriorityCaps; `tenants` are those the API keys name. Raises ValueError."""
    caps: dict[str, int] = {}
    for spec in specs:
        tenant, sep, value = spec.rpartition(":")
        try:
            cap = int(value)
        except ValueError:
            cap = None
        if not sep or not tenant or cap is None:
            raise ValueError(f"--tenant-priority {spec!r} must be TENANT:N with N an integer")
        if tenant not in tenants:
            known = ", ".join(sorted(tenants)) or "none: give --api-key TENANT:KEY"
            raise ValueError(f"--tenant-priority {spec!r} names no API-key tenant (tenants: {known})")
        caps[tenant] = cap
    return PriorityCaps(caps, default)
