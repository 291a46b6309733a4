"""A tiny random model for tests (and the sync benchmark), built from a config: no download."""

from __future__ import annotations

import os
from pathlib import Path

from moalign.models import smollm2_gguf


def build_tiny_model(dest: str | os.PathLike, seed: int = 0, hidden_size: int = 128, layers: int = 2) -> Path:
    """A random 2-layer Llama with SmolLM2's real tokenizer and chat template, for tests.

    It produces gibberish, but through exactly the code paths (vLLM, DeepSpeed, peft, weight
    sync) that the full model takes.
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    dest = Path(dest)
    gguf = smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(dest, safe_serialization=True)
    tokenizer.save_pretrained(dest)
    return dest
