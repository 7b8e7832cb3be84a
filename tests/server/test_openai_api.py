"""The server through the official `openai` client, sync and async, streaming and not: every test
runs against one engine and against two engine instances on Ray behind the same server."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from tests.engine.reference import hf_greedy, hf_model
from tests.server_process import run_server

pytestmark = pytest.mark.slow

PROMPT = "The capital of Japan is"
QUESTION = [{"role": "user", "content": "What is the capital of Japan?"}]


@pytest.fixture(scope="module", params=["one-engine", pytest.param("two-instances", marks=pytest.mark.ray)])
def api_server(request, sutra_server):
    if request.param == "one-engine":
        yield sutra_server
        return
    pytest.importorskip("ray")
    args = ["--dtype", "float32", "--num-kv-blocks", "512", "--instances", "2", "--threads-per-instance", "1"]
    with run_server(*args) as server:
        yield server


@pytest.fixture(scope="module")
def client(api_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{api_server.base_url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def aclient(api_server) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{api_server.base_url}/v1", api_key="unused", max_retries=0)


def test_models_lists_the_served_model(client, api_server):
    models = client.models.list().data
    assert [m.id for m in models] == [api_server.model] == ["SmolLM2-135M-Instruct"]


def test_greedy_completion_matches_transformers(client, api_server, smollm2_hf_tokenizer):
    """Token-identical to Hugging Face transformers' greedy decoding on the same (float32) weights."""
    prompt_ids = smollm2_hf_tokenizer.encode(PROMPT)
    expected_ids, _ = hf_greedy(hf_model(), prompt_ids, 24)
    out = client.completions.create(
        model=api_server.model, prompt=PROMPT, max_tokens=24, temperature=0, extra_body={"ignore_eos": True}
    )
    assert out.choices[0].text == smollm2_hf_tokenizer.decode(expected_ids)
    assert out.usage.prompt_tokens == len(prompt_ids)
    assert out.usage.completion_tokens == 24
    assert out.usage.total_tokens == len(prompt_ids) + 24
    assert out.choices[0].finish_reason == "length"


def test_token_id_prompt_and_batch_of_prompts(client, api_server, smollm2_hf_tokenizer):
    ids = smollm2_hf_tokenizer.encode(PROMPT)
    by_ids = client.completions.create(model=api_server.model, prompt=ids, max_tokens=6, temperature=0)
    by_text = client.completions.create(model=api_server.model, prompt=PROMPT, max_tokens=6, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
    batch = client.completions.create(
        model=api_server.model,
        prompt=[PROMPT, "Once upon a time"],
        max_tokens=6,
        temperature=0,
        n=2,
        extra_body={"ignore_eos": True},
    )
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    assert batch.choices[0].text == batch.choices[1].text == by_text.choices[0].text  # greedy: n copies
    assert batch.choices[2].text == batch.choices[3].text != batch.choices[0].text
    prompt_lens = len(ids) + len(smollm2_hf_tokenizer.encode("Once upon a time"))
    assert batch.usage.completion_tokens == 4 * 6
    assert batch.usage.prompt_tokens == prompt_lens  # each prompt once, not once per choice


def test_chat_greedy_answer(client, api_server):
    out = client.chat.completions.create(
        model=api_server.model, messages=QUESTION, max_tokens=20, temperature=0
    )
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == "The capital of Japan is Tokyo."
    assert out.choices[0].finish_reason == "stop"
    assert out.usage.completion_tokens == 8  # the 7 tokens of the answer and the end-of-turn token


def test_min_tokens_holds_off_the_end_of_turn(client, api_server):
    out = client.chat.completions.create(
        model=api_server.model,
        messages=QUESTION,
        max_tokens=14,
        temperature=0,
        extra_body={"min_tokens": 14},
    )
    # Unconstrained the answer ends after 8 tokens (test_chat_greedy_answer); here it must go on.
    assert out.usage.completion_tokens == 14 and out.choices[0].finish_reason == "length"
    assert out.choices[0].message.content.startswith("The capital of Japan is Tokyo.")


@pytest.mark.parametrize("kind", ["completions", "chat"])
def test_streamed_text_equals_whole_text_for_a_seed(client, api_server, kind):
    kwargs = dict(model=api_server.model, max_tokens=40, temperature=0.9, top_p=0.95, seed=1234)
    if kind == "completions":
        whole = client.completions.create(prompt=PROMPT, **kwargs)
        chunks = list(
            client.completions.create(
                prompt=PROMPT, stream=True, stream_options={"include_usage": True}, **kwargs
            )
        )
        streamed = "".join(c.choices[0].text for c in chunks if c.choices)
        whole_text = whole.choices[0].text
    else:
        whole = client.chat.completions.create(messages=QUESTION, **kwargs)
        chunks = list(
            client.chat.completions.create(
                messages=QUESTION, stream=True, stream_options={"include_usage": True}, **kwargs
            )
        )
        assert chunks[0].choices[0].delta.role == "assistant"
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        whole_text = whole.choices[0].message.content
    assert streamed == whole_text and len(whole_text) > 0
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [whole.choices[0].finish_reason]


def test_stop_string_and_seeded_samples(client, api_server):
    out = client.completions.create(
        model=api_server.model, prompt=PROMPT, max_tokens=20, temperature=0, stop=[" Alps"]
    )
    assert out.choices[0].finish_reason == "stop"
    assert out.choices[0].text == " Tokyo.\n\nThe Japanese"
    assert out.choices[0].model_extra["stop_reason"] == " Alps"
    streamed = client.completions.create(
        model=api_server.model, prompt=PROMPT, max_tokens=20, temperature=0, stop=[" Alps"], stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == out.choices[0].text  # the stop never leaks
    a, b = (
        client.completions.create(
            model=api_server.model, prompt=PROMPT, max_tokens=16, temperature=1.0, seed=7, n=2
        )
        for _ in range(2)
    )
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert a.choices[0].text != a.choices[1].text  # n samples are different streams


def test_logprobs_in_both_apis(client, api_server):
    out = client.completions.create(
        model=api_server.model, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=3
    )
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert "".join(lp.tokens) == out.choices[0].text
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert len(top) == 3 and logprob <= 0
        assert max(top.values()) == pytest.approx(logprob, abs=1e-4) and top[token] == pytest.approx(logprob)
    chat = client.chat.completions.create(
        model=api_server.model,
        messages=QUESTION,
        max_tokens=5,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == 5 and all(len(e.top_logprobs) == 2 for e in content)
    assert "".join(e.token for e in content) == chat.choices[0].message.content
    assert bytes(content[0].bytes).decode() == content[0].token


def test_concurrent_async_requests_all_complete(aclient, api_server):
    async def one(i: int):
        if i % 2:
            return await aclient.completions.create(
                model=api_server.model,
                prompt=f"Count to {i}:",
                max_tokens=12,
                temperature=0,
                extra_body={"ignore_eos": True},
            )
        stream = await aclient.chat.completions.create(
            model=api_server.model,
            messages=[{"role": "user", "content": f"Say {i}"}],
            max_tokens=12,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        return [chunk async for chunk in stream]

    async def main():
        return await asyncio.gather(*(one(i) for i in range(12)))

    results = asyncio.run(main())
    for i, result in enumerate(results):
        usage = result.usage if i % 2 else result[-1].usage
        assert usage.completion_tokens == 12
    api_server.wait_idle()
    assert api_server.metric("sutra:kv_cache_free_blocks") == api_server.metric("sutra:kv_cache_total_blocks")


def test_user_field_is_the_client_in_metrics(client, api_server):
    before = _client_tokens(api_server, "alice")
    client.completions.create(
        model=api_server.model, prompt=PROMPT, max_tokens=4, user="alice", extra_body={"ignore_eos": True}
    )
    assert _client_tokens(api_server, "alice") == before + 4


def _client_tokens(server, client_name: str) -> float:
    return server.metric("sutra:client_generation_tokens_total", default=0.0, client=client_name)


@pytest.mark.parametrize("stream", [False, True])
def test_usage_counts_the_prompt_once_whatever_n_is(client, api_server, smollm2_hf_tokenizer, stream):
    """OpenAI and vLLM count a prompt once, however many choices are sampled from it."""
    prompt_len = len(smollm2_hf_tokenizer.encode(PROMPT))
    chat_len = len(
        smollm2_hf_tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, return_dict=False)
    )
    common = dict(model=api_server.model, max_tokens=3, n=3, extra_body={"ignore_eos": True})
    if stream:
        common.update(stream=True, stream_options={"include_usage": True})
    cmpl = client.completions.create(prompt=PROMPT, **common)
    chat = client.chat.completions.create(messages=QUESTION, **common)
    if stream:
        cmpl, chat = list(cmpl)[-1], list(chat)[-1]
    assert (cmpl.usage.prompt_tokens, cmpl.usage.completion_tokens) == (prompt_len, 9)
    assert (chat.usage.prompt_tokens, chat.usage.completion_tokens) == (chat_len, 9)
    assert cmpl.usage.total_tokens == prompt_len + 9 and chat.usage.total_tokens == chat_len + 9


JAPANESE = [{"role": "user", "content": "Translate 'Tokyo is the capital of Japan' into Japanese."}]
CHINESE = "中文：东京是日本的首都。"  # greedy: ASCII, whole CJK tokens and CJK characters split in two


def _name_bytes(name: str) -> bytes:
    """A token's bytes from its printable name ('bytes:\\xe4\\xbd' for part of a character)."""
    if name.startswith("bytes:"):
        return bytes(int(h, 16) for h in name[len("bytes:") :].split("\\x")[1:])
    return name.encode("utf-8")


@pytest.mark.parametrize("stream", [False, True])
def test_chat_logprob_bytes_join_into_the_reply(client, api_server, stream):
    """Each entry's `bytes` are the token's own UTF-8 bytes, so for a reply whose characters are
    split across tokens the entries' bytes join into exactly the reply (a character cut off by
    max_tokens reads U+FFFD in both)."""
    kwargs = dict(model=api_server.model, messages=JAPANESE, max_tokens=24, temperature=0, logprobs=True)
    if stream:
        chunks = list(client.chat.completions.create(stream=True, **kwargs))
        content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        entries = [
            e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content
        ]
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    else:
        out = client.chat.completions.create(**kwargs)
        content, entries = out.choices[0].message.content, out.choices[0].logprobs.content
        finish = [out.choices[0].finish_reason]
    assert finish == ["length"] and len(entries) == 24
    split = [e for e in entries if e.token.startswith("bytes:")]
    assert split, "the reply should hold characters split across tokens"
    for e in split:
        assert bytes(e.bytes) == _name_bytes(e.token)
        with pytest.raises(UnicodeDecodeError):
            bytes(e.bytes).decode("utf-8")
    joined = b"".join(bytes(e.bytes) for e in entries)
    assert joined.decode("utf-8", errors="replace") == content
    assert any(ord(ch) > 0x3000 for ch in content)


def test_completion_text_offsets_index_into_the_text(client, api_server):
    """text_offset[i] is where token i's text starts in the returned text: the characters the tokens
    before it completed, not the lengths of their printable names. Streaming gives the same."""
    kwargs = dict(model=api_server.model, prompt=CHINESE, max_tokens=16, temperature=0, logprobs=0)
    out = client.completions.create(**kwargs)
    text, lp = out.choices[0].text, out.choices[0].logprobs
    token_bytes = [_name_bytes(t) for t in lp.tokens]
    assert any(t.startswith("bytes:") for t in lp.tokens)
    expected = [
        len(b"".join(token_bytes[:i]).decode("utf-8", errors="ignore")) for i in range(len(lp.tokens))
    ]
    assert lp.text_offset == expected
    for name, at in zip(lp.tokens, lp.text_offset, strict=True):
        if not name.startswith("bytes:"):
            assert text[at : at + len(name)] == name
    streamed = list(client.completions.create(stream=True, **kwargs))
    assert [o for c in streamed for o in c.choices[0].logprobs.text_offset] == lp.text_offset
    assert "".join(c.choices[0].text for c in streamed) == text


def test_a_character_cut_off_by_max_tokens_is_not_dropped(client, api_server):
    """The last token's bytes are flushed when the completion ends: the text is the whole decode of
    its tokens, with the cut-off character as U+FFFD (as decode() renders it)."""
    kwargs = dict(model=api_server.model, prompt=CHINESE, max_tokens=3, temperature=0, logprobs=0)
    out = client.completions.create(**kwargs)
    tokens = out.choices[0].logprobs.tokens
    assert tokens[-1].startswith("bytes:") and out.choices[0].finish_reason == "length"
    whole = b"".join(_name_bytes(t) for t in tokens).decode("utf-8", errors="replace")
    assert whole.endswith("\ufffd") and out.choices[0].text == whole
    streamed = client.completions.create(stream=True, **kwargs)
    assert "".join(c.choices[0].text for c in streamed) == whole


@pytest.mark.parametrize("kind", ["completions", "chat"])
def test_each_streamed_choice_finishes_exactly_once(client, api_server, kind):
    """With n > 1 a choice that finished early is not re-sent in later chunks."""
    kwargs = dict(model=api_server.model, max_tokens=48, temperature=1.0, seed=11, n=4, stream=True)
    if kind == "completions":
        chunks = list(client.completions.create(prompt="Say hi.", stop=["."], **kwargs))
    else:
        chunks = list(
            client.chat.completions.create(messages=[{"role": "user", "content": "Say hi."}], **kwargs)
        )
    finished_at: dict[int, int] = {}
    for at, chunk in enumerate(chunks):
        for choice in chunk.choices:
            assert choice.index not in finished_at, f"choice {choice.index} sent after it finished"
            if choice.finish_reason is not None:
                finished_at[choice.index] = at
    assert sorted(finished_at) == [0, 1, 2, 3]
    assert len(set(finished_at.values())) > 1, "the choices should finish at different times"


def test_cache_salt_keeps_tenants_apart_in_the_prefix_cache(client, api_server):
    """Same salt: the second request is served from the cache. Another salt or none: nothing is
    shared, so `cached_tokens` reveals nothing about other tenants' prompts."""
    prompt = "Salted prefix caching test. " * 12  # several full 16-token blocks

    def cached(salt: str | None) -> int:
        extra = {} if salt is None else {"cache_salt": salt}
        reply = client.completions.create(
            model=api_server.model, prompt=prompt, max_tokens=1, temperature=0, extra_body=extra
        )
        return reply.usage.prompt_tokens_details.cached_tokens

    assert cached("tenant-a") == 0
    assert cached("tenant-a") >= 32
    assert cached("tenant-b") == 0
    assert cached(None) == 0
    assert cached(None) >= 32


def test_logit_bias_echo_and_tokenize_on_any_engine(client, api_server):
    """vLLM's comforts in front of Ray instances too: the front end tokenizes and checks logit_bias by
    its own tokenizer, the instances sample with the bias (tests/server/test_logit_bias.py,
    test_echo.py and test_tokenize.py cover each in depth)."""
    tokenized = httpx.post(
        f"{api_server.base_url}/tokenize", json={"prompt": " Paris", "add_special_tokens": False}, timeout=30
    ).json()
    (paris,) = tokenized["tokens"]
    common = dict(model=api_server.model, prompt=PROMPT, max_tokens=3, temperature=0)
    out = client.completions.create(
        echo=True, logit_bias={str(paris): 100}, extra_body={"ignore_eos": True}, **common
    )
    assert out.choices[0].text == PROMPT + " Paris Paris Paris"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(logit_bias={"49152": 1}, **common)
    assert e.value.body["param"] == "logit_bias" and "outside the vocabulary" in e.value.body["message"]
