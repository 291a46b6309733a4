"""What Spearman a perfect policy reaches on a three-objective set, before any run.

    python -m benchmarks.steer_geometry [--draws 200] [--sd 10]

A model of the policy, not a run: at each of the evaluation's weight vectors
(`moalign.pareto_report.eval_weights(3, 3, 1)`) the answer's length is the weighted mean of the
length targets (what a dial trained at the corners gives between them), and its layout, the share
of its sentence breaks that start a new line, rises from the base's 0.25 with the layout weight.
Each answer's length is drawn around that mean (`--sd` words) and its share from three breaks;
each objective's reward is averaged over 96 answers a weight vector, as the evaluation's 48
prompts x 2 samples, and scored as `make eval` scores it (`moalign.pareto.steerability`).

Three sets:
- `one axis`: three length targets (12, 30, 48 words; width 36, Medium 18), the best length the
  weighted mean of the targets;
- `independent third`: the two length targets, and a third objective the length does not touch
  (Warmth), whose corner answers at the base's length (35 words);
- `two axes`: the two length targets scored as paragraphs (`prose`: times one minus the layout
  share) and Layout (`line_breaks`), whose corner answers at 30 words;
- `two axes, Detail prose`: as `two axes`, but only Detail scored as a paragraph, so that one
  corner trains the line break down and one up (Conciseness is indifferent to it).

For each: the mean Spearman per objective and the share of draws in which all three reach 0.8.
"""

from __future__ import annotations

import argparse
import logging

import numpy as np

from moalign.pareto import steerability
from moalign.pareto_report import eval_weights

log = logging.getLogger("steer_geometry")

BASE_SHARE = 0.25
ANSWERS = 96
BREAKS = 3


def quadratic(words: np.ndarray, target: float, width: float) -> np.ndarray:
    return np.maximum(0.0, 1.0 - ((words - target) / width) ** 2)


def rewards(kind: str, weights: np.ndarray, rng: np.random.Generator, sd: float) -> np.ndarray:
    """(W, 3) mean rewards of the modelled policy at each weight vector."""
    rows = []
    for w in weights:
        if kind == "one axis":
            targets, widths = np.array([12.0, 30.0, 48.0]), np.array([36.0, 18.0, 36.0])
            words = np.clip(rng.normal(w @ targets, sd, ANSWERS), 1, 64)
            rows.append([quadratic(words, t, s).mean() for t, s in zip(targets, widths)])
            continue
        third_words = 35.0 if kind == "independent third" else 30.0
        words = np.clip(rng.normal(w @ np.array([12.0, 48.0, third_words]), sd, ANSWERS), 1, 64)
        # The third objective's behaviour (warmth or layout) from the base's level to 1 at its corner.
        share = rng.binomial(BREAKS, BASE_SHARE + w[2] * (1 - BASE_SHARE), ANSWERS) / BREAKS
        prose = 1.0 - share if kind.startswith("two axes") else 1.0
        short_prose = prose if kind == "two axes" else 1.0
        rows.append([(quadratic(words, 12, 36) * short_prose).mean(), (quadratic(words, 48, 36) * prose).mean(), share.mean()])
    return np.array(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=200, help="noisy evaluations per set")
    parser.add_argument("--sd", type=float, default=10.0, help="spread of an answer's length around its weight vector's, in words")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    weights = eval_weights(3, 3, 1)
    rng = np.random.default_rng(args.seed)
    log.info("%-24s %28s  %s", "set", "mean Spearman per objective", "all three >= 0.8")
    for kind in ("one axis", "independent third", "two axes", "two axes, Detail prose"):
        spearman = np.array([steerability(weights, rewards(kind, weights, rng, args.sd))["per_objective"] for _ in range(args.draws)])
        mean = " / ".join(f"{v:+.2f}" for v in spearman.mean(axis=0))
        log.info("%-24s %28s  %5.1f %%", kind, mean, 100 * float((spearman.min(axis=1) >= 0.8).mean()))


if __name__ == "__main__":
    main()
