"""Objective weights: a seeded Dirichlet sampler and what writes weights into a prompt.

Two forms, each used alike at training, evaluation and serving, so the policy always sees
weights written one way: the paper's text line (`format_weights`), or one added control token
per objective and weight bin (`format_control_tokens`), whose embeddings are trained.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any, Literal, get_args

import numpy as np

from moalign.config import TOKEN_STYLES, ConditioningConfig, ConditioningStyle, ConfigError

BEGIN = "[Begin System Instruction]"
END = "[End System Instruction]"

Style = ConditioningStyle
STYLES: tuple[str, ...] = get_args(ConditioningStyle)


class WeightsError(ValueError):
    """Objective weights that are negative, do not sum to 1, or do not match the objectives."""


class DirichletSampler:
    """w ~ Dirichlet(alpha) over K objectives; `state_dict` captures the RNG exactly."""

    def __init__(self, n_objectives: int, alpha: float | Sequence[float] = 1.0, seed: int = 0):
        if n_objectives < 1:
            raise WeightsError(f"n_objectives must be >= 1, got {n_objectives}")
        alphas = np.full(n_objectives, float(alpha)) if np.isscalar(alpha) else np.asarray(alpha, dtype=float)
        if alphas.shape != (n_objectives,):
            raise WeightsError(f"alpha has {alphas.size} values for {n_objectives} objectives")
        if not np.all(np.isfinite(alphas)) or np.any(alphas <= 0):
            raise WeightsError(f"every alpha must be finite and > 0, got {alphas.tolist()}")
        self.alpha = alphas
        self._rng = np.random.default_rng(seed)

    def sample(self, batch: int) -> np.ndarray:
        """Draw `batch` weight vectors, shape (batch, K)."""
        if len(self.alpha) == 1:
            return np.ones((batch, 1))
        return self._rng.dirichlet(self.alpha, size=batch)

    def state_dict(self) -> dict[str, Any]:
        return {"alpha": self.alpha.tolist(), "rng": copy.deepcopy(self._rng.bit_generator.state)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if list(state["alpha"]) != self.alpha.tolist():
            raise WeightsError(f"saved sampler alpha {state['alpha']} differs from configured {self.alpha.tolist()}")
        self._rng.bit_generator.state = copy.deepcopy(state["rng"])


class FixedWeights:
    """The same weights for every prompt: a single-objective specialist (a corner) or any fixed
    trade-off, trained as the baseline a steerable policy's front should approach."""

    def __init__(self, weights: Sequence[float]):
        self.weights = check_weights(weights, len(weights))

    def sample(self, batch: int) -> np.ndarray:
        return np.tile(self.weights, (batch, 1))

    def state_dict(self) -> dict[str, Any]:
        return {"fixed": self.weights.tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("fixed") != self.weights.tolist():
            raise WeightsError(f"saved sampler {state} differs from the configured fixed weights {self.weights.tolist()}")


def neglected_corners(weights: np.ndarray, count: int) -> list[np.ndarray]:
    """For each row of (B, K) weights, the corners e_k of its `count` least-weighted objectives
    (ties by objective index), as `count` (B, K) arrays: the weight lines that disagree most
    with the ones the samples were drawn under."""
    w = np.atleast_2d(np.asarray(weights, dtype=float))
    if not 0 < count <= w.shape[1]:
        raise WeightsError(f"need 1..{w.shape[1]} corners, got {count}")
    order = np.lexsort((np.broadcast_to(np.arange(w.shape[1]), w.shape), w), axis=1)
    return [np.eye(w.shape[1])[order[:, j]] for j in range(count)]


def corner_weights(n_objectives: int, batch: int) -> list[np.ndarray]:
    """The K corners as K (B, K) weight sets, corner k's line for every prompt: the order in which
    `moalign.pairs.select_line_answers` numbers their prompts (k * B + b)."""
    return [np.tile(corner, (batch, 1)) for corner in np.eye(n_objectives)]


def cycled_corners(n_objectives: int, batch: int) -> np.ndarray:
    """(B, K) weights, prompt b under corner b mod K: every corner samples about B / K prompts."""
    return np.eye(n_objectives)[np.arange(batch) % n_objectives]


def warm_start_sampling_weights(setting: str, drawn: np.ndarray) -> np.ndarray:
    """The (B, K) weights a warm-start step samples its prompts under, for
    `conditioning.warm_start_weights` `setting`: `drawn`, the (B, K) draw itself; `corners`,
    prompt b under corner b mod K; `corners_and_drawn`, that where b mod 2K < K and the draw
    otherwise, so half the prompts sample the corners and half the weights between them."""
    if setting == "drawn":
        return drawn
    batch, k = np.shape(drawn)
    corners = cycled_corners(k, batch)
    if setting == "corners":
        return corners
    if setting == "corners_and_drawn":
        return np.where((np.arange(batch) % (2 * k) < k)[:, None], corners, drawn)
    raise ValueError(f"conditioning.warm_start_weights: unknown setting {setting!r}")


def check_weights(weights: Sequence[float] | np.ndarray, n_objectives: int, atol: float = 1e-6) -> np.ndarray:
    """Weights must be finite, >= 0, K long and sum to 1."""
    w = np.asarray(weights, dtype=float)
    if w.shape != (n_objectives,):
        raise WeightsError(f"expected {n_objectives} weights, got shape {w.shape}: {w.tolist()}")
    if not np.all(np.isfinite(w)):
        raise WeightsError(f"weights must be finite, got {w.tolist()}")
    if np.any(w < 0):
        raise WeightsError(f"weights must be >= 0, got {w.tolist()}")
    if abs(w.sum() - 1.0) > atol:
        raise WeightsError(f"weights must sum to 1, got {w.tolist()} (sum {w.sum():.6g})")
    return w


def round_weights(weights: np.ndarray, decimals: int) -> np.ndarray:
    """Round to `decimals` digits so that the rounded weights still sum exactly to 1.

    Largest-remainder rounding: naive rounding of (0.333, 0.333, 0.334) to 1 digit would write
    weights summing to 0.9, which the parser (rightly) rejects.
    """
    w = np.atleast_2d(np.asarray(weights, dtype=float))
    totals = w.sum(axis=1, keepdims=True)
    if not np.all(np.isfinite(totals) & (totals > 0)):
        raise WeightsError(f"weights to round must have a positive sum, got {np.asarray(weights).tolist()}")
    # Renormalise first: callers accept weights within a tolerance of sum 1, and floors of
    # weights summing above 1 can already exceed the total, which largest-remainder cannot undo
    # (0.34 x 3 would be written as 0.35, 0.34, 0.34).
    w = w / totals
    scale = 10**decimals
    scaled = w * scale
    floors = np.floor(scaled + 1e-9)
    short = np.rint(scale - floors.sum(axis=1)).astype(int)
    out = floors.copy()
    for i in range(w.shape[0]):
        # Ties broken by objective index so the rounding is deterministic.
        order = np.lexsort((np.arange(w.shape[1]), -(scaled[i] - floors[i])))
        out[i, order[: short[i]]] += 1
    out /= scale
    return out.reshape(np.shape(weights))


def format_weights(names: Sequence[str], weights: Sequence[float] | np.ndarray, decimals: int = 2) -> str:
    """`[Begin System Instruction] A: 0.70, B: 0.30 [End System Instruction]`: weights within the
    rounding tolerance of sum 1 are renormalised, then rounded so the written ones sum to exactly 1."""
    w = check_weights(weights, len(names), atol=10.0 ** (-decimals) * len(names))
    w = round_weights(w, decimals)
    body = ", ".join(f"{name}: {value:.{decimals}f}" for name, value in zip(names, w))
    return f"{BEGIN} {body} {END}"


def control_token(name: str, value: float, decimals: int) -> str:
    """The added token that says "objective `name` weighs `value`" (`value` already rounded)."""
    return f"<|w:{name}={value:.{decimals}f}|>"


def control_token_vocabulary(names: Sequence[str], decimals: int) -> list[str]:
    """Every control token of these objectives, one per objective and weight bin (0, 10^-d, ..., 1),
    objective by objective: the tokens a control-token policy adds to its vocabulary."""
    bins = 10**decimals
    return [control_token(name, i / bins, decimals) for name in names for i in range(bins + 1)]


def format_control_tokens(names: Sequence[str], weights: Sequence[float] | np.ndarray, decimals: int = 2) -> str:
    """The weights as control tokens, one per objective in order, rounded as the text line rounds them."""
    w = check_weights(weights, len(names), atol=10.0 ** (-decimals) * len(names))
    w = round_weights(w, decimals)
    return "".join(control_token(name, value, decimals) for name, value in zip(names, w))


def weight_signal(names: Sequence[str], weights: Sequence[float] | np.ndarray, style: str, decimals: int) -> str:
    """What a prompt carries for these weights in `style`: the text line or the control tokens."""
    if style in TOKEN_STYLES:
        return format_control_tokens(names, weights, decimals)
    return format_weights(names, weights, decimals)


def condition_messages(
    prompt: str,
    names: Sequence[str],
    weights: Sequence[float] | np.ndarray,
    style: Style = "chat_system",
    decimals: int = 2,
) -> list[dict[str, str]]:
    """Chat messages carrying the weights: as the system message, or as a prefix of the user turn."""
    return condition_chat([{"role": "user", "content": prompt}], names, weights, style, decimals)


def condition_chat(
    messages: Sequence[dict[str, str]],
    names: Sequence[str],
    weights: Sequence[float] | np.ndarray,
    style: Style = "chat_system",
    decimals: int = 2,
) -> list[dict[str, str]]:
    """A conversation with the weights written in as training wrote them: `chat_system` puts the
    text line in the system message, `system_prefix` before the last user turn (the one being
    answered); a caller's own system message follows the line. `control_tokens` opens the answer
    with the control tokens (a partial assistant turn, rendered by `render_prompt_ids` so that
    the answer continues it): right before the first token they steer, with the chat template's
    own system prompt left as it is. `control_tokens_system` puts the tokens where `chat_system`
    puts the line (the answer then starts as a fresh turn, not as a continuation of them)."""
    if style not in STYLES:
        raise WeightsError(f"unknown conditioning style {style!r}; allowed: {', '.join(STYLES)}")
    line = weight_signal(names, weights, style, decimals)
    chat = [dict(m) for m in messages]
    if not chat or chat[-1].get("role") != "user":
        raise WeightsError("the conversation must end with a user message for the weights to apply to")
    if style == "control_tokens":
        return [*chat, {"role": "assistant", "content": line}]
    if style in ("chat_system", "control_tokens_system"):
        if chat[0].get("role") == "system":
            chat[0]["content"] = f"{line}\n{chat[0]['content']}"
            return chat
        return [{"role": "system", "content": line}, *chat]
    chat[-1]["content"] = f"{line}\n{chat[-1]['content']}"
    return chat


def render_prompt_ids(tokenizer: Any, messages: Sequence[dict[str, str]]) -> list[int]:
    """Token ids of a conditioned conversation, exactly as training fed them to the generators:
    the chat template's text with the generation prompt (or, when the conversation ends with the
    opening of the answer, that answer left open), tokenised without added special tokens."""
    if messages and messages[-1].get("role") == "assistant":
        text = tokenizer.apply_chat_template(list(messages), continue_final_message=True, tokenize=False)
    else:
        text = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def probe_weights(n_objectives: int, decimals: int, seed: int = 0) -> np.ndarray:
    """Weight vectors whose written lines bound how long any line gets: the corners, the centre
    and a few seeded draws (a tokenizer that splits digits writes every vector equally long)."""
    draws = DirichletSampler(n_objectives, 1.0, seed).sample(8)
    return round_weights(np.vstack([np.eye(n_objectives), np.full(n_objectives, 1.0 / n_objectives), draws]), decimals)


def fit_prompts(
    records: Sequence[Any],
    tokenizer: Any,
    names: Sequence[str],
    style: Style,
    decimals: int,
    max_tokens: int,
    too_long: Literal["skip", "truncate"],
) -> tuple[list[Any], dict[str, Any]]:
    """The prompt records (`.prompt`, `.id`) that fit `max_tokens` once conditioned under any
    weights, and a report counting the others. `skip` leaves them out; `truncate` cuts their
    start (the question usually comes last) until they fit. The rendering is measured under the
    longest probe line, so a kept prompt fits whatever weights are drawn for it."""
    from dataclasses import replace

    probes = probe_weights(len(names), decimals)

    def length(text: str, weights: np.ndarray) -> int:
        return len(render_prompt_ids(tokenizer, condition_messages(text, names, weights, style, decimals)))

    # The weight line and the prompt add up: measure each prompt under one line, plus the
    # longest line's excess over it.
    centre = probes[len(names)]
    excess = max(length("x", w) for w in probes) - length("x", centre)
    kept, over = [], []
    longest = 0
    for record in records:
        tokens = length(record.prompt, centre) + excess
        longest = max(longest, tokens)
        if tokens <= max_tokens:
            kept.append(record)
            continue
        over.append(record.id)
        if too_long == "truncate":
            kept.append(replace(record, prompt=_cut_start(record.prompt, tokenizer, lambda t: length(t, centre) + excess, max_tokens)))
    report = {
        "prompts": len(records),
        "too_long": len(over),
        "too_long_ids": over,
        "longest_tokens": longest,
        "max_prompt_tokens": max_tokens,
        "action": too_long,
        "kept": len(kept),
    }
    return kept, report


def _cut_start(text: str, tokenizer: Any, measure: Any, max_tokens: int) -> str:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    cut = measure(text) - max_tokens
    while cut < len(ids):
        shorter = tokenizer.decode(ids[cut:]).strip()
        overshoot = measure(shorter) - max_tokens
        if shorter and overshoot <= 0:
            return shorter
        # Re-tokenising a cut text can merge or split a token at the cut: cut a little more.
        cut += max(1, overshoot)
    raise ValueError(f"the chat template and weight line alone take {measure('')} of max_prompt_tokens={max_tokens}: no prompt fits")


def render_conditioned(
    tokenizer,
    prompt: str,
    names: Sequence[str],
    weights: Sequence[float] | np.ndarray,
    conditioning: ConditioningConfig,
    max_prompt_tokens: int,
) -> list[int]:
    """The token ids of `prompt` with `weights` written in as `conditioning` says: what a generator
    samples from and the learner trains on; a prompt over `max_prompt_tokens` is an error."""
    ids = render_prompt_ids(tokenizer, condition_messages(prompt, names, weights, conditioning.style, conditioning.decimals))
    if len(ids) > max_prompt_tokens:
        # load_fitted_prompts measured every prompt under the longest weight line: only a
        # prompt that did not pass through it lands here.
        raise ConfigError(
            f"prompt {prompt[:60]!r} is {len(ids)} tokens after conditioning, over model.max_prompt_tokens={max_prompt_tokens}"
        )
    return ids
