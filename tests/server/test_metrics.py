"""No client name can break /metrics or grow it: per-client label values are printable and short, at
most --max-client-metric-series clients get series of their own (the rest share client="other"), and
a client unseen for --client-metric-idle-s loses its series."""

from __future__ import annotations

import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from sutra.server.client_series import MAX_LABEL_CHARS, OTHER, ClientSeries, safe_label
from sutra.server.metrics import ServerMetrics
from tests.server_process import run_server

CAP = 8
CLIENT_FAMILIES = (
    "sutra:client_generation_tokens",
    "sutra:client_prompt_tokens",
    "sutra:client_request_queue_time_seconds",
)
HOSTILE_USERS = [
    "a" * 256,  # the longest `user` the default request limit lets through
    "line\nbreak",
    "carriage\rreturn",
    "nul\x00byte",
    "escape\x1b[31mred",
    "tab\there",
    'quote"} 1\nsutra:injected_total 1\n#',
    "back\\slash\\",
    "\u202eright-to-left override",
    "line\u2028separator",
    "next\x85line",
    "zero\u200bwidth",
    "\ufeffbyte order mark",
    "rocket 🚀",
    "用户名",
    "e\u0301",
    " ",
    "other",
] + [f"user-{i}" for i in range(24)]


def _client_labels(text: str) -> dict[str, float]:
    """client label value -> generated tokens, from a /metrics body (which must parse)."""
    tokens: dict[str, float] = {}
    seen: set[str] = set()
    for family in text_string_to_metric_families(text):
        assert family.name.startswith("sutra:"), family.name  # nothing injected
        for sample in family.samples:
            if "client" in sample.labels:
                assert family.name in CLIENT_FAMILIES
                seen.add(sample.labels["client"])
                if sample.name == "sutra:client_generation_tokens_total":
                    tokens[sample.labels["client"]] = sample.value
    assert seen == set(tokens)
    return tokens


@pytest.mark.slow
def test_hostile_user_names_keep_metrics_parseable_and_bounded():
    args = ("--num-kv-blocks", "64", "--max-client-metric-series", str(CAP))
    with run_server(*args) as server:
        client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)
        for user in HOSTILE_USERS:
            reply = client.completions.create(
                model=server.model, prompt="Hi", max_tokens=2, user=user, extra_body={"ignore_eos": True}
            )
            assert reply.usage.completion_tokens == 2
        response = httpx.get(f"{server.base_url}/metrics", timeout=30)
        assert response.status_code == 200
        tokens = _client_labels(response.text)
        assert len(tokens) <= CAP + 1
        for label in tokens:
            assert label.isprintable() and 0 < len(label) <= MAX_LABEL_CHARS, repr(label)
        assert sum(tokens.values()) == 2 * len(HOSTILE_USERS)  # every token is counted somewhere
        assert tokens[OTHER] >= 2 * (len(HOSTILE_USERS) - CAP)
        assert server.process.poll() is None


@pytest.mark.slow
def test_idle_clients_lose_their_series():
    with run_server("--num-kv-blocks", "64", "--client-metric-idle-s", "1") as server:
        client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)
        client.completions.create(model=server.model, prompt="Hi", max_tokens=1, user="early")
        assert "early" in _client_labels(httpx.get(f"{server.base_url}/metrics", timeout=30).text)
        time.sleep(1.5)
        client.completions.create(
            model=server.model, prompt="Hi", max_tokens=1, user="late", extra_body={"ignore_eos": True}
        )
        labels = _client_labels(httpx.get(f"{server.base_url}/metrics", timeout=30).text)
        assert "early" not in labels and labels["late"] == 1


def test_labels_are_printable_utf8_whatever_the_name():
    assert safe_label("alice") == "alice"
    assert safe_label("a\nb\x00c\u202ed\ud800") == "a?b?c?d?"  # a lone surrogate too
    assert safe_label("x" * 1000) == "x" * MAX_LABEL_CHARS
    assert safe_label("") == "anonymous"
    metrics = ServerMetrics("m", max_client_series=2)
    for name in ["\ud800", "\udfff\n", "third", None]:
        label = metrics.clients.label(name)
        metrics.client_tokens.labels(model_name="m", client=label).inc()
    text = metrics.render().decode("utf-8")
    assert _client_labels(text) == {"?": 1.0, "??": 1.0, OTHER: 2.0}


def test_series_cap_and_idle_expiry_without_a_scan():
    now = [0.0]
    dropped: list[str] = []
    series = ClientSeries(max_series=3, idle_s=10.0, on_drop=dropped.append, clock=lambda: now[0])
    assert [series.label(f"c{i}") for i in range(5)] == ["c0", "c1", "c2", OTHER, OTHER]
    now[0] = 5.0
    assert series.label("c1") == "c1"  # seen again: its idle time starts over
    now[0] = 12.0
    assert series.label("c9") == "c9" and dropped == ["c0", "c2"]
    assert len(series) == 2
