"""How far the weights move each decision the warm start trains, read from the policy's log-probs.

    python -m benchmarks.decision_probe --run runs/t3 [--model runs/t3/export/step_30] [--answers 48]

The sampled evaluation says whether the answers differ between weight vectors; this says, more
finely, whether the two decisions the warm start trains (`algorithm.warm_start_pairs:
stop_decisions` and `algorithm.line_break_variants`) depend on the weights at all. At each
sentence end (`moalign.prefixes.sentence_ends`) of the base model's first ANSWERS held-out answers
(RUN/eval/base/samples.jsonl, the first weight vector's), the exported policy (RUN/final, or a
checkpoint's export by `make export`, `--model`) and the
reference (RUN/base_model) give, under each corner's conditioning, the probability of the next
token being the end of the sequence (stop) and the line-break token (a new line). The text is
fixed, so a difference between corners is the control tokens' doing alone.

Two tables:
- each corner's mean probability of either decision, the reference's beside the policy's;
- for each pair of corners, the mean difference of the decision's log-odds between them (paired
  by sentence end) with its standard error: how far the weights separate it. A decision the
  weights steer separates where its two corners want opposite things.
Runs on the CPU in a minute or two.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
from pathlib import Path

import numpy as np
import torch

from moalign.conditioning import corner_weights, render_conditioned
from moalign.config import load_config
from moalign.control_tokens import read_manifest
from moalign.prefixes import newline_token, sentence_ends

log = logging.getLogger("decision_probe")


def decision_logodds(logps: torch.Tensor, sites: list[int], token_id: int) -> np.ndarray:
    """log p / (1 - p) of `token_id` at each of `sites`, rows of the (T, V) log-softmax `logps`;
    p is clamped away from 0 and 1 so a certain decision gives a large finite value."""
    p = logps[sites, token_id].exp().clamp(1e-7, 1 - 1e-7)
    return (p.log() - torch.log1p(-p)).numpy().astype(float)


def separation(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Mean of the paired differences a - b and its standard error."""
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    if d.size < 2:
        raise ValueError(f"{d.size} sites: a standard error needs two or more")
    return float(d.mean()), float(d.std(ddof=1) / np.sqrt(d.size))


def main(argv: list[str] | None = None) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, type=Path)
    ap.add_argument("--model", type=Path, help="the exported policy to probe (default RUN/final)")
    ap.add_argument(
        "--base-answers",
        type=Path,
        help="the base answers to probe (default RUN/eval/base/samples.jsonl; another run's, for a run without a base evaluation)",
    )
    ap.add_argument("--answers", type=int, default=48, help="base answers whose sentence ends are probed (default 48)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    samples = args.base_answers or args.run / "eval" / "base" / "samples.jsonl"
    policy = args.model or args.run / "final"
    for need in (samples, policy, args.run / "base_model", args.run / "config.yaml"):
        if not need.exists():
            raise SystemExit(
                f"decision_probe: {need} does not exist (a run with its base evaluation and final export, or --base-answers and --model)"
            )
    cfg = load_config(args.run / "config.yaml")
    names = cfg.objective_names
    tokenizer = AutoTokenizer.from_pretrained(policy)
    manifest = read_manifest(policy)
    vocab = manifest.sampled_vocab if manifest is not None else None
    models = {
        "reference": AutoModelForCausalLM.from_pretrained(args.run / "base_model", dtype=torch.float32).eval(),
        "policy": AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32).eval(),
    }
    decisions = {"stop": tokenizer.eos_token_id, "new line": newline_token(tokenizer)}
    corners = [w[0] for w in corner_weights(len(names), 1)]

    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    first = rows[0]["weights"]
    answers = [r for r in rows if r["weights"] == first][: args.answers]
    # odds[model][decision][corner]: the log-odds at every probed sentence end, in one order.
    odds = {m: {d: [[] for _ in corners] for d in decisions} for m in models}
    for row in answers:
        completion = tokenizer(row["text"], add_special_tokens=False)["input_ids"]
        sites = sentence_ends([tokenizer.decode([t]) for t in completion])
        if not sites:
            continue
        for c, weights in enumerate(corners):
            prompt = render_conditioned(tokenizer, row["prompt"], names, weights, cfg.conditioning, cfg.model.max_prompt_tokens)
            ids = torch.tensor([prompt + completion])
            for m, model in models.items():
                with torch.no_grad():
                    # Row i predicts the token after completion token i.
                    logps = model(ids).logits[0, len(prompt) :, :vocab].float().log_softmax(-1)
                for d, token in decisions.items():
                    odds[m][d][c].extend(decision_logodds(logps, sites, token))
    n_sites = len(odds["policy"]["stop"][0])
    if n_sites < 2:
        raise SystemExit(f"decision_probe: {n_sites} sentence ends in {len(answers)} answers; too few to compare")
    log.info("%s: %d sentence ends in %d base answers of %s", policy, n_sites, len(answers), args.run)

    def mean_p(values: list[float]) -> float:
        return float(np.mean(1 / (1 + np.exp(-np.asarray(values)))))

    log.info("\n| corner | P(stop) reference | P(stop) policy | P(new line) reference | P(new line) policy |\n|---|---|---|---|---|")
    for c, name in enumerate(names):
        cells = [mean_p(odds[m][d][c]) for d in decisions for m in models]
        log.info("| %s | %.3f | %.3f | %.3f | %.3f |", name, *cells)
    log.info("\n| decision | corners | log-odds apart, reference | log-odds apart, policy |\n|---|---|---|---|")
    for d in decisions:
        for a, b in itertools.combinations(range(len(names)), 2):
            cells = [separation(odds[m][d][a], odds[m][d][b]) for m in models]
            log.info("| %s | %s − %s | %+.2f ± %.2f | %+.2f ± %.2f |", d, names[a], names[b], *cells[0], *cells[1])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
