"""A model whose tokenizer has no chat template refuses chat requests with a 400 that says so, and
still serves /v1/completions."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import openai
import pytest

from tests.server_process import run_server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tiny_llama_hf_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    model = tmp_path_factory.mktemp("no-template") / "tiny-llama-base"
    shutil.copytree(tiny_llama_hf_dir, model)
    (model / "chat_template.jinja").unlink(missing_ok=True)
    config_path = model / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config.pop("chat_template", None)
    config_path.write_text(json.dumps(config), encoding="utf-8")
    with run_server("--model", str(model), "--num-kv-blocks", "64") as handle:
        yield handle


def test_chat_without_a_template_is_400_and_completions_work(server):
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="x", max_retries=0)
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(
                model=server.model, messages=[{"role": "user", "content": "hi"}], max_tokens=2, stream=stream
            )
        error = e.value.body
        assert "has no chat template" in error["message"] and "/v1/completions" in error["message"]
        assert error["code"] == "chat_template_missing" and error["type"] == "invalid_request_error"
    out = client.completions.create(model=server.model, prompt="hi", max_tokens=2)
    assert out.usage.completion_tokens == 2
