"""Hugging Face transformers as the reference implementation for greedy decoding and logprobs."""

from __future__ import annotations

import functools
import os

import torch

from sutra.model.loader import default_model_path


@functools.lru_cache(maxsize=2)
def hf_model(source: str | None = None):
    """transformers' own loading of the same weights: the bundled GGUF (None) or an HF directory."""
    from transformers import AutoModelForCausalLM

    if source is None:
        path = default_model_path()
        model = AutoModelForCausalLM.from_pretrained(
            os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
        )
    else:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    return model.eval()


@torch.inference_mode()
def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens (EOS ignored) and the log-softmax of each step's logits."""
    ids = torch.tensor([prompt_ids])
    out = model(input_ids=ids, use_cache=True)
    tokens, logprobs = [], []
    for _ in range(max_new_tokens):
        logits = out.logits[0, -1].float()
        logprobs.append(torch.log_softmax(logits, -1))
        token = int(logits.argmax())
        tokens.append(token)
        out = model(input_ids=torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True)
    return tokens, logprobs
