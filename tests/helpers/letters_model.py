"""A tiny random Llama that writes only lowercase letters: the pathway test's policy.

A random model over SmolLM2's 49k-token vocabulary spreads its samples so thinly that no toy
objective on them can be learned in minutes: a rewarded token is rarely sampled twice. This one
keeps SmolLM2's tokenizer and chat template (so prompts, weight lines and control tokens are
tokenised as for the real model) but its output layer (untied) gives every token other than the
26 single-letter ones a logit far below theirs. Every input embedding carries a constant first
coordinate, which the final norm turns into a steady component of every hidden state: the output
rows of the other tokens point against it, so they stay out of reach however the rest moves.
"""

from __future__ import annotations

import string
from pathlib import Path


def letter_token_ids(tokenizer) -> list[int]:
    ids = [tokenizer.convert_tokens_to_ids(c) for c in string.ascii_lowercase]
    if any(i is None or i == tokenizer.unk_token_id for i in ids):
        raise ValueError("the tokenizer has no single-token lowercase letters")
    return ids


def build_letters_model(
    dest: str | Path,
    tokenizer_dir: str | Path,
    seed: int = 0,
    hidden_size: int = 128,
    layers: int = 2,
    letter_scale: float = 0.2,
    embed_scale: float = 0.3,
    init_std: float = 0.02,
    constant: float = 1.0,
) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    dest = Path(dest)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=init_std,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        embed = model.model.embed_tokens.weight
        embed.normal_(0.0, embed_scale)
        embed[:, 0] = constant
        head = model.lm_head.weight
        head.zero_()
        head[:, 0] = -6.0
        letters = letter_token_ids(tokenizer)
        head[letters] = torch.randn(len(letters), hidden_size) * letter_scale
        head[letters, 0] = 0.0
    model.save_pretrained(dest, safe_serialization=True)
    tokenizer.save_pretrained(dest)
    AutoTokenizer.from_pretrained(dest)  # fails here, not in a test, if the folder cannot be read back
    return dest
