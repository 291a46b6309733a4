"""Where a trained policy's KL to its reference sits: in the decision to stop, or in the text.

    python -m benchmarks.kl_parts --run runs/demo --step 30 [--answers 40]

For each weight vector of the run's evaluation at STEP (RUN/eval/step_STEP/samples.jsonl, written
by `make eval`), the first ANSWERS answers are scored again by the exported policy (RUN/final)
and the reference (RUN/base_model) on the sampled vocabulary, as the evaluation's KL is. Each
token's log-ratio log pi(y) - log pi_ref(y) splits exactly into

- the stop part: at a closing end-of-sequence token its own log-ratio, elsewhere
  log(1 - pi(EOS)) - log(1 - pi_ref(EOS)), what not stopping there costs;
- the text part: the rest, log-ratio of the token among the tokens that are not EOS, how far
  what the policy writes has moved from the reference.

A dial that only learned where to stop has its KL in the stop part. The answers are re-tokenized
from their text, so the totals match the evaluation's per-answer KL closely but not bit for bit.
Runs on the CPU in about a minute a weight vector.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import torch

from moalign.conditioning import render_conditioned
from moalign.config import load_config
from moalign.control_tokens import read_manifest

log = logging.getLogger("kl_parts")


def kl_parts(policy_logps: torch.Tensor, reference_logps: torch.Tensor, tokens: torch.Tensor, eos_id: int) -> tuple[float, float, float]:
    """(total, stop part, text part) of one answer's summed log-ratio; `*_logps` are (T, V)
    log-softmaxes of the positions predicting the T `tokens`. total = stop + text exactly."""
    if policy_logps.shape != reference_logps.shape or policy_logps.shape[0] != tokens.shape[0]:
        raise ValueError(f"log-probs {tuple(policy_logps.shape)} and {tuple(reference_logps.shape)} do not fit {tokens.shape[0]} tokens")
    at = torch.arange(tokens.shape[0])
    ratio = policy_logps[at, tokens] - reference_logps[at, tokens]

    def go_on(logps: torch.Tensor) -> torch.Tensor:
        # log(1 - p(EOS)); clamped so a reference certain to stop gives a large finite cost.
        return torch.log1p(-logps[:, eos_id].exp().clamp(max=1 - 1e-7))

    stop = torch.where(tokens == eos_id, ratio, go_on(policy_logps) - go_on(reference_logps))
    total, stop_sum = float(ratio.sum()), float(stop.sum())
    return total, stop_sum, total - stop_sum


def main(argv: list[str] | None = None) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, type=Path)
    ap.add_argument("--step", required=True, type=int, help="the evaluated step whose answers are split")
    ap.add_argument("--answers", type=int, default=40, help="answers per weight vector (default 40)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    samples = args.run / "eval" / f"step_{args.step}" / "samples.jsonl"
    for need in (samples, args.run / "final", args.run / "base_model", args.run / "config.yaml"):
        if not need.exists():
            raise SystemExit(f"kl_parts: {need} does not exist (train the run and `make eval RUN={args.run} STEP={args.step}` first)")
    cfg = load_config(args.run / "config.yaml")
    tokenizer = AutoTokenizer.from_pretrained(args.run / "final")
    manifest = read_manifest(args.run / "final")
    vocab = manifest.sampled_vocab if manifest is not None else None
    policy = AutoModelForCausalLM.from_pretrained(args.run / "final", dtype=torch.float32).eval()
    reference = AutoModelForCausalLM.from_pretrained(args.run / "base_model", dtype=torch.float32).eval()
    eos = tokenizer.eos_token_id

    by_weights: dict[tuple[float, ...], list[dict]] = {}
    for line in samples.read_text().splitlines():
        row = json.loads(line)
        by_weights.setdefault(tuple(row["weights"]), []).append(row)
    log.info("| weights | answers | KL (evaluation) | KL (here) | stop part | text part |\n|---|---|---|---|---|---|")
    for weights, rows in sorted(by_weights.items()):
        parts = []
        for row in rows[: args.answers]:
            prompt = render_conditioned(
                tokenizer, row["prompt"], cfg.objective_names, row["weights"], cfg.conditioning, cfg.model.max_prompt_tokens
            )
            completion = tokenizer(row["text"], add_special_tokens=False)["input_ids"] + ([eos] if row["finish_reason"] == "stop" else [])
            ids = torch.tensor([prompt + completion])
            with torch.no_grad():
                lp, lr = (m(ids).logits[0, len(prompt) - 1 : -1, :vocab].float().log_softmax(-1) for m in (policy, reference))
            # An evaluation run without its KL (the base model's) leaves that column empty.
            evaluated = float("nan") if row.get("kl") is None else row["kl"]
            parts.append((evaluated, *kl_parts(lp, lr, torch.tensor(completion), eos)))
        mean = np.mean(parts, axis=0)
        log.info("| %s | %d | %.2f | %.2f | %.2f | %.2f |", "/".join(f"{w:g}" for w in weights), len(parts), *mean)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
