"""The invariants a soak run (`soak.py`) must keep, judged from its report alone.

Each is {"ok": bool, "detail": str}; the run passes only if all hold. Kept apart from the driver so
the judgement can be checked on reports that break each rule.
"""

from __future__ import annotations

from typing import Any

from soak_requests import ABORT, BAD_INPUT, CUT_AT_DEADLINE, WELL_FORMED


def _inv(ok: bool, detail: str) -> dict[str, Any]:
    return {"ok": bool(ok), "detail": detail}


def check_invariants(report: dict[str, Any], max_rss_growth_mib: float | None = None) -> dict[str, Any]:
    by_category: dict[str, dict[str, int]] = report["by_category"]
    failed: dict[str, int] = report["failures_by_category"]
    final = report["final"]
    all_outcomes = [(o, n) for outcomes in by_category.values() for o, n in outcomes.items()]
    server_errors = sum(n for o, n in all_outcomes if o.startswith("http_5"))
    bad = by_category.get(BAD_INPUT, {})
    # A request cut by the run's end was dropped on purpose and owes no answer.
    bad_not_4xx = sum(n for o, n in bad.items() if not o.startswith("http_4") and o != CUT_AT_DEADLINE)
    free, total = final["kv_free_blocks"], final["kv_total_blocks"]
    out = {
        "requests_sent": _inv(report["num_requests"] > 0, f"{report['num_requests']} requests"),
        "well_formed_finished_or_aborted": _inv(
            failed.get(WELL_FORMED, 0) == 0,
            f"{failed.get(WELL_FORMED, 0)} of {sum(by_category.get(WELL_FORMED, {}).values())} failed",
        ),
        "aborts_ended_cleanly": _inv(
            failed.get(ABORT, 0) == 0,
            f"{failed.get(ABORT, 0)} of {sum(by_category.get(ABORT, {}).values())} failed",
        ),
        "no_5xx": _inv(server_errors == 0, f"{server_errors} answers were 5xx"),
        "bad_inputs_got_4xx": _inv(bad_not_4xx == 0, f"{bad_not_4xx} of {sum(bad.values())} were not 4xx"),
        "bad_inputs_got_documented_error": _inv(
            failed.get(BAD_INPUT, 0) == 0,
            f"{failed.get(BAD_INPUT, 0)} without the documented status and an OpenAI error body",
        ),
        "nothing_running_or_waiting": _inv(
            final["running"] == 0 and final["waiting"] == 0,
            f"running {final['running']}, waiting {final['waiting']}",
        ),
        "no_leaked_kv_blocks": _inv(
            free is not None and free == total, f"{free} of {total} KV blocks free at idle"
        ),
        "metrics_valid": _inv(final["metrics_valid"], final["metrics_error"] or "/metrics parses"),
        "server_healthy": _inv(
            final["server_alive"] and final["health_status"] == 200,
            f"alive {final['server_alive']}, /health {final['health_status']}",
        ),
    }
    if max_rss_growth_mib is not None:
        growth = report["rss_mib"].get("growth_after_warmup")
        out["rss_growth"] = _inv(
            growth is not None and growth <= max_rss_growth_mib,
            f"{growth} MiB after warm-up (at most {max_rss_growth_mib})",
        )
    return out
