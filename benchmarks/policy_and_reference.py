"""A run's exported policy and its reference, loaded side by side to score the same text (the
decision probe and the KL split read their log-probs)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from moalign.conditioning import render_conditioned
from moalign.config import RunConfig, load_config
from moalign.control_tokens import read_manifest


@dataclass
class PolicyAndReference:
    cfg: RunConfig
    tokenizer: object
    models: dict[str, torch.nn.Module]
    """`policy` and `reference`, in float32, eval mode."""
    vocab: int | None
    """The sampled vocabulary (control-token rows are never sampled); None: the whole."""

    @classmethod
    def load(cls, run: Path, policy: Path) -> PolicyAndReference:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        manifest = read_manifest(policy)
        models = {
            "policy": AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32).eval(),
            "reference": AutoModelForCausalLM.from_pretrained(run / "base_model", dtype=torch.float32).eval(),
        }
        vocab = manifest.sampled_vocab if manifest is not None else None
        return cls(load_config(run / "config.yaml"), AutoTokenizer.from_pretrained(policy), models, vocab)

    def prompt(self, text: str, weights) -> list[int]:
        """`text` conditioned on `weights` as in training."""
        cfg = self.cfg
        return render_conditioned(self.tokenizer, text, cfg.objective_names, weights, cfg.conditioning, cfg.model.max_prompt_tokens)

    @torch.no_grad()
    def logps(self, model: str, prompt: list[int], completion: list[int]) -> torch.Tensor:
        """(T + 1, V) log-softmax over the sampled vocabulary of the rows from the one predicting
        `completion`'s first token to the one after its last."""
        ids = torch.tensor([prompt + completion])
        return self.models[model](ids).logits[0, len(prompt) - 1 :, : self.vocab].float().log_softmax(-1)
