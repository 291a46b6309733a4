"""From reward vectors to preference pairs: validation, running normalisation, selection."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from moalign.actor_io import Sample


class RewardError(ValueError):
    """Reward output that cannot be trained on (NaN, inf, wrong shape); names objective and sample."""


def check_rewards(rewards: Any, n_prompts: int, n_samples: int, names: Sequence[str]) -> np.ndarray:
    """Rewards must be a finite (B, n, K) array; the error names the first bad objective and sample."""
    try:
        r = np.asarray(rewards, dtype=float)
    except (TypeError, ValueError) as exc:
        raise RewardError(f"rewards are not numeric: {exc}") from None
    expected = (n_prompts, n_samples, len(names))
    if r.shape != expected:
        raise RewardError(f"rewards have shape {r.shape}, expected (prompts, samples, objectives) = {expected}")
    bad = np.argwhere(~np.isfinite(r))
    if bad.size:
        b, s, k = bad[0]
        raise RewardError(
            f"objective {names[k]!r} returned {r[b, s, k]} for prompt {b}, sample {s} "
            f"({len(bad)} non-finite value(s) in this batch); nothing from this step is trained on"
        )
    return r


class RunningNormalizer:
    """Per-objective running mean/std (Chan et al. parallel update), so objectives on different
    scales weigh what their weights say, not what their units say."""

    def __init__(self, n_objectives: int, eps: float = 1e-6):
        self.count = 0
        self.mean = np.zeros(n_objectives)
        self.m2 = np.zeros(n_objectives)
        self.eps = eps

    def update(self, rewards: np.ndarray) -> None:
        flat = np.asarray(rewards, dtype=float).reshape(-1, self.mean.size)
        n = flat.shape[0]
        if n == 0:
            return
        batch_mean = flat.mean(axis=0)
        batch_m2 = ((flat - batch_mean) ** 2).sum(axis=0)
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean = self.mean + delta * n / total
        self.m2 = self.m2 + batch_m2 + delta**2 * self.count * n / total
        self.count = total

    @property
    def std(self) -> np.ndarray:
        if self.count < 2:
            return np.ones_like(self.mean)
        return np.sqrt(self.m2 / (self.count - 1)) + self.eps

    def normalize(self, rewards: np.ndarray) -> np.ndarray:
        return (np.asarray(rewards, dtype=float) - self.mean) / self.std

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count, "mean": self.mean.tolist(), "m2": self.m2.tolist(), "eps": self.eps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mean = np.asarray(state["mean"], dtype=float)
        if mean.shape != self.mean.shape:
            raise ValueError(f"saved normaliser has {mean.size} objectives, configured {self.mean.size}")
        self.count = int(state["count"])
        self.mean = mean
        self.m2 = np.asarray(state["m2"], dtype=float)
        self.eps = float(state["eps"])


def normalized_rewards(raw: np.ndarray, mode: str, running: RunningNormalizer) -> np.ndarray:
    """A step's (B, n, K) rewards as the pairs are ranked on them (`algorithm.reward_normalization`);
    the running statistics are updated whatever the mode, so the choice can change on a resume."""
    running.update(raw)
    if mode == "running":
        return running.normalize(raw)
    if mode == "batch":
        flat = raw.reshape(-1, raw.shape[-1])
        mean = flat.mean(axis=0)
        std = flat.std(axis=0, ddof=1) if flat.shape[0] > 1 else np.zeros(raw.shape[-1])
        # An objective every sample scored alike (up to rounding) carries no preference: it is 0.
        varies = std > 1e-9 * np.maximum(1.0, np.abs(mean))
        return np.where(varies, (raw - mean) / np.where(varies, std, 1.0), 0.0)
    if mode == "none":
        return np.asarray(raw, dtype=float)
    raise ValueError(f"unknown reward normalization {mode!r}; allowed: running, batch, none")


@dataclass(frozen=True)
class Pair:
    prompt: int
    """Index of the conditioned prompt it is trained under (with relabelling: weight set j's prompt b is j * B + b)."""
    chosen: int
    """Index of the preferred completion among the prompt's samples."""
    rejected: int
    """Index of the dispreferred completion."""
    loss_weight: float
    """1 for scalarised pairs; w_k for the per-objective reading."""
    objective: int | None
    """The objective that ranked the pair (per-objective reading), else None."""
    gap: float = 0.0
    """How much better the chosen answer scored than the rejected one on what ranked them (the
    line's weighted normalised reward, or objective k's): > 0 for DPO pairs, 0 for labels.
    `algorithm.preference_label_scale` turns it into the pair's label."""


@dataclass
class PairSelection:
    pairs: list[Pair]
    dropped_ties: int
    """Candidate pairs whose chosen and rejected scores were equal (no preference to learn)."""
    dropped_zero_weight: int
    """Per-objective candidates whose objective weight was 0 (they add nothing to the loss)."""
    dropped_agreeing: int = 0
    """Pairs of prompts left out because every weight line chose the same answer (`keep="contrasting"`)."""


def select_pairs(
    weights: np.ndarray,
    rewards: np.ndarray,
    mode: Literal["scalarised", "per_objective"] = "scalarised",
    weighting: Literal["uniform", "margin"] = "uniform",
) -> PairSelection:
    """Chosen = argmax, rejected = argmin of the score over each prompt's n >= 2 samples.

    `scalarised`: score = sum_k w_k r_k (the paper's reading). `per_objective`: one pair per
    objective ranked by r_k, trained with loss weight w_k. Ties resolve to the lowest sample index
    (np.argmax/argmin order), so the selection is deterministic.

    `weighting="margin"` multiplies each pair's loss weight by its score gap (chosen minus
    rejected). A line whose objectives pull against each other scores its samples nearly alike,
    and a pair ranked on a small gap is mostly the samples' other differences: at equal weight it
    moves the policy as far as a pair with a clear preference, in a direction the rewards did not ask for.
    """
    w = np.asarray(weights, dtype=float)
    r = np.asarray(rewards, dtype=float)
    if r.ndim != 3 or w.shape != (r.shape[0], r.shape[2]):
        raise RewardError(f"weights {w.shape} and rewards {r.shape} must be (B, K) and (B, n, K)")
    if r.shape[1] < 2:
        raise RewardError(f"need at least 2 samples per prompt to form a pair, got {r.shape[1]}")
    if weighting not in ("uniform", "margin"):
        raise ValueError(f"unknown pair weighting {weighting!r}; allowed: uniform, margin")
    margin = weighting == "margin"
    pairs: list[Pair] = []
    ties = zero = 0
    if mode == "scalarised":
        scores = np.einsum("bnk,bk->bn", r, w)
        for b in range(r.shape[0]):
            hi, lo = int(np.argmax(scores[b])), int(np.argmin(scores[b]))
            if scores[b, hi] == scores[b, lo]:
                ties += 1
                continue
            gap = float(scores[b, hi] - scores[b, lo])
            pairs.append(Pair(b, hi, lo, gap if margin else 1.0, None, gap))
    elif mode == "per_objective":
        for b in range(r.shape[0]):
            for k in range(r.shape[2]):
                if w[b, k] == 0:
                    zero += 1
                    continue
                hi, lo = int(np.argmax(r[b, :, k])), int(np.argmin(r[b, :, k]))
                if r[b, hi, k] == r[b, lo, k]:
                    ties += 1
                    continue
                gap = float(r[b, hi, k] - r[b, lo, k])
                pairs.append(Pair(b, hi, lo, float(w[b, k]) * (gap if margin else 1.0), k, gap))
    else:
        raise ValueError(f"unknown pair mode {mode!r}; allowed: scalarised, per_objective")
    return PairSelection(pairs, ties, zero)


def select_relabelled_pairs(
    weight_sets: Sequence[np.ndarray],
    rewards: np.ndarray,
    mode: Literal["scalarised", "per_objective"] = "scalarised",
    keep: Literal["all", "contrasting"] = "all",
    weighting: Literal["uniform", "margin"] = "uniform",
) -> PairSelection:
    """`select_pairs` under each (B, K) weight set in turn, over the same (B, n, K) samples.

    Set 0 is the weights the samples were drawn under; the others re-rank the same samples
    (hindsight relabelling). Pair j * B + b is trained under weight set j's line for prompt b,
    so the same two completions can be chosen under one line and rejected under another: the
    only way to fit both is to read the line.

    `keep="contrasting"` (scalarised only) keeps a prompt's pairs only where its lines choose
    different answers. Where every line prefers the same answer (an objective that cannot rank
    the samples, such as Conciseness when every answer ran to the cap, leaves the others to
    decide under every line), the pairs teach no mapping from weights to answers, only a push of
    the whole policy, which on such prompts always goes one way.
    """
    if keep not in ("all", "contrasting"):
        raise ValueError(f"unknown relabel keep {keep!r}; allowed: all, contrasting")
    if keep == "contrasting" and mode != "scalarised":
        raise ValueError("keep='contrasting' compares the answers each line chooses: scalarised pairs only")
    batch = np.asarray(rewards).shape[0]
    selections = [select_pairs(weights, rewards, mode, weighting) for weights in weight_sets]
    contrasting = None
    if keep == "contrasting":
        chosen = [{p.prompt: p.chosen for p in selection.pairs} for selection in selections]
        contrasting = {b for b in range(batch) if len({c[b] for c in chosen if b in c}) > 1}
    pairs: list[Pair] = []
    ties = zero = agreeing = 0
    for j, selection in enumerate(selections):
        for p in selection.pairs:
            if contrasting is not None and p.prompt not in contrasting:
                agreeing += 1
                continue
            pairs.append(dataclasses.replace(p, prompt=j * batch + p.prompt))
        ties += selection.dropped_ties
        zero += selection.dropped_zero_weight
    return PairSelection(pairs, ties, zero, agreeing)


def chosen_probability(gap: float, scale: float) -> float:
    """A pair's soft label (`algorithm.preference_label_scale`): the probability that its chosen
    answer is preferred, sigmoid(scale * gap), the Bradley-Terry model on its reward gap."""
    if not math.isfinite(gap) or gap < 0:
        raise ValueError(f"a pair's reward gap must be finite and >= 0, got {gap}")
    return 1.0 / (1.0 + math.exp(-scale * gap))


def cut_past_parting(chosen: Sequence[int], rejected: Sequence[int], keep: int) -> tuple[list[int], list[int]]:
    """Both answers cut `keep` tokens past the first position where they differ (the tokens
    before it are shared, and cancel in DPO's margin). A sentence-end prefix against its own
    longer sample then differs in the stop decision and the few tokens that follow it, not in
    the whole continuation, which is ordinary text under every weight line."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    parting = next((i for i, (a, b) in enumerate(zip(chosen, rejected)) if a != b), min(len(chosen), len(rejected)))
    return list(chosen[: parting + keep]), list(rejected[: parting + keep])


def cut_to_decision_token(chosen: Sequence[int], rejected: Sequence[int], token_id: int) -> tuple[list[int], list[int]]:
    """A decision pair (a prefix closed with the end-of-sequence token against the sample it was
    cut from, or a sample against its line-break variant, in either order) cut so that the two
    differ by the decision's token alone: the side with `token_id` where they part keeps it, the
    other keeps only the shared prefix. DPO's margin is then +-beta times that token's log-ratio,
    and nothing else is trained: where the other side's own next token were in the pair, the
    corner that prefers the decision would push down the text the policy writes (with
    `stop_decisions` cut one token past the parting, the Conciseness corner's answers turned to
    word salad within 20 steps, 44 nats from the reference)."""
    parting = next((i for i, (a, b) in enumerate(zip(chosen, rejected)) if a != b), min(len(chosen), len(rejected)))
    cut = [
        list(ids[: parting + 1]) if parting < len(ids) and ids[parting] == token_id else list(ids[:parting]) for ids in (chosen, rejected)
    ]
    if len(cut[0]) == len(cut[1]):
        raise ValueError(f"not a decision on token {token_id}: neither answer, or both, has it where they part (position {parting})")
    return cut[0], cut[1]


def _scored_lines(rewards: np.ndarray, lines: Sequence[np.ndarray]) -> tuple[int, list[tuple[np.ndarray, np.ndarray]]]:
    """The prompt count B of (B, n, K) `rewards` and, per weight set of `lines` ((B, K) each),
    the set and its weighted rewards (B, n)."""
    r = np.asarray(rewards, dtype=float)
    if r.ndim != 3 or r.shape[1] < 1:
        raise RewardError(f"rewards {r.shape} must be (B, n, K)")
    batch, _, k = r.shape
    scored = []
    for j, line in enumerate(lines):
        w = np.asarray(line, dtype=float)
        if w.shape != (batch, k):
            raise ValueError(f"weight set {j} has shape {w.shape}; the rewards need ({batch}, {k})")
        scored.append((w, np.einsum("bnk,bk->bn", r, w)))
    return batch, scored


def corner_of(w: np.ndarray) -> int | None:
    """The objective k whose corner the weights `w` are (w_k = 1), else None."""
    corner = np.flatnonzero(w == 1)
    return int(corner[0]) if corner.size and w.sum() == 1 else None


def select_line_answers(rewards: np.ndarray, lines: Sequence[np.ndarray]) -> PairSelection:
    """Hindsight labels for a supervised step: for each (B, n, K) prompt b and each weight set j
    of `lines` ((B, K) each), the sample with the best weighted reward under row b, to be trained
    under that weight line. A `Pair` whose chosen and rejected are that sample, prompt index
    j * B + b, loss weight 1, and `objective` k where the line is corner k (else None). A line
    that scores every sample of a prompt alike labels none of them (counted as a tie). With
    `moalign.conditioning.corner_weights` as the lines: each objective's own best answer."""
    batch, scored = _scored_lines(rewards, lines)
    pairs: list[Pair] = []
    ties = 0
    for j, (w, scores) in enumerate(scored):
        for b in range(batch):
            best = int(np.argmax(scores[b]))
            if scores[b, best] == scores[b].min():
                ties += 1
                continue
            pairs.append(Pair(j * batch + b, best, best, 1.0, corner_of(w[b])))
    return PairSelection(pairs, ties, 0)


def select_stop_decisions(
    rewards: np.ndarray, lines: Sequence[np.ndarray], candidates: Sequence[Sequence[Sample]], per_line: int = 1
) -> PairSelection:
    """Warm-start pairs on the decision to stop: for each (B, n, K) prompt b and each weight set j
    of `lines` (the corners), the `per_line` sentence-end prefixes whose rewards under row b differ
    most from those of the samples they were cut from, each against its sample, the better one
    chosen. The two share every token up to the prefix's end, so cut by `cut_to_decision_token` a
    pair trains only the end-of-sequence token there: up under the Conciseness corner, down under
    the Detail corner. Where the candidates hold line-break variants too
    (`moalign.prefixes.with_line_break_variants`), the `per_line` variants that differ most from
    their samples join, each against its sample: the decision to start a new line there. A prompt
    with no prefix or variant, or whose own score as their samples do, gives no pair (a tie); one
    with fewer differing than `per_line` gives what it has."""
    batch, scored = _scored_lines(rewards, lines)
    if len(candidates) != batch:
        raise ValueError(f"{len(candidates)} candidate groups for {batch} prompts")
    kinds = [[{i: c[key] for i, c in enumerate(group) if key in c} for group in candidates] for key in ("prefix_of", "break_of")]
    pairs: list[Pair] = []
    ties = 0
    for j, (w, scores) in enumerate(scored):
        for b in range(batch):
            kept = []
            for parents in kinds:
                gaps = [(scores[b, i] - scores[b, p], i, p) for i, p in parents[b].items()]
                # sorted is stable: among equal gaps the earlier candidate goes first, as max() picked.
                kept += [g for g in sorted(gaps, key=lambda g: -abs(g[0])) if g[0] != 0][:per_line]
            if not kept:
                ties += 1
                continue
            for gap, variant, parent in kept:
                chosen, rejected = (variant, parent) if gap > 0 else (parent, variant)
                pairs.append(Pair(j * batch + b, chosen, rejected, 1.0, corner_of(w[b]), abs(float(gap))))
    return PairSelection(pairs, ties, 0)
