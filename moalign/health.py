"""Training-health signals for the online loop: is the policy collapsing or running away?

A rising reward is not success when the policy gets there by collapsing: completions shrinking to
a few tokens, every sample of a prompt the same answer (so every pair is a tie and nothing is
learned), or a KL to the reference that keeps climbing. `step_health` measures one step;
`HealthMonitor` smooths those measurements, compares them with configured bounds, and warns once
per crossing.

Smoothing: a bound is judged on the median of the last `window_steps` observed values, and only
once that many are in. A median of N values crosses a bound only when more than half of them do,
so one outlier step (however extreme) never warns, and a sustained drift warns about N/2 steps
after it starts. A mean or an exponential moving average would let a single extreme value (a KL
spike of 30 against a bound of 5) drag the smoothed value across on its own.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from moalign.actor_io import Sample
from moalign.pairs import PairSelection
from moalign.pareto_report import weights_label

log = logging.getLogger(__name__)

METRICS = ("distinct_fraction", "tied_share", "completion_tokens_mean", "length_capped_share", "empty_share", "kl")
"""Health metric names; each is logged per step as `health/<name>`."""
KL_BY_WEIGHT = "kl_by_weight"
"""The bound on the KL at each evaluated weight vector (`HealthMonitor.judge_front`), judged per evaluation."""


def step_health(samples: Sequence[Sequence[Sample]], selection: PairSelection, learn: dict[str, float]) -> dict[str, float]:
    """One step's health figures. A figure with nothing to measure is left out rather than made up:
    `kl` when the learner took no update, `tied_share` when no candidate pair was ranked.

    samples: per prompt, the generators' completions (`moalign.actor_io.Sample`).
    """
    groups = [g for g in samples if len(g) > 0]
    flat = [s for g in groups for s in g]
    out: dict[str, float] = {}
    if flat:
        out["distinct_fraction"] = float(np.mean([len({tuple(s["token_ids"]) for s in g}) / len(g) for g in groups]))
        out["completion_tokens_mean"] = float(np.mean([len(s["token_ids"]) for s in flat]))
        out["length_capped_share"] = float(np.mean([s["finish_reason"] == "length" for s in flat]))
        out["empty_share"] = float(np.mean([not s["text"].strip() for s in flat]))
    # Zero-weight candidates are dropped before they are ranked, so they could not have tied:
    # the share is of the candidates that were ranked.
    ranked = len(selection.pairs) + selection.dropped_ties
    if ranked:
        out["tied_share"] = selection.dropped_ties / ranked
    # A NaN would poison the median window; the learner reports one when it skipped the update.
    if "kl" in learn and np.isfinite(learn["kl"]):
        out["kl"] = float(learn["kl"])
    return out


@dataclass(frozen=True)
class Bound:
    metric: str
    kind: Literal["min", "max"]
    limit: float
    setting: str
    """The config field that sets the limit, named in the warning."""
    meaning: str
    """What crossing it likely means, for the user reading the warning."""

    def crossed(self, value: float) -> bool:
        return value < self.limit if self.kind == "min" else value > self.limit


class HealthMonitor:
    """Smoothed health figures against bounds; one WARNING per crossing, recorded for the summary.

    Construct with the fields of `HealthConfig` (`HealthMonitor(**cfg.health.model_dump())`).
    A bound that stays crossed does not warn again; once its smoothed value is back within the
    bound it is re-armed, and the next crossing warns again.
    """

    def __init__(
        self,
        min_distinct_fraction: float = 0.5,
        max_tied_share: float = 0.5,
        min_completion_tokens: float = 4,
        max_length_capped_share: float = 0.9,
        max_kl: float = 5.0,
        window_steps: int = 5,
    ):
        if window_steps < 1:
            raise ValueError(f"window_steps must be >= 1, got {window_steps}")
        self.window_steps = window_steps
        self.bounds = (
            Bound(
                "distinct_fraction",
                "min",
                min_distinct_fraction,
                "health.min_distinct_fraction",
                "samples per prompt are collapsing to one answer (mode collapse: their pairs become ties)",
            ),
            Bound(
                "tied_share",
                "max",
                max_tied_share,
                "health.max_tied_share",
                "most candidate pairs are ties, so few pairs reach the learner",
            ),
            Bound(
                "completion_tokens_mean",
                "min",
                min_completion_tokens,
                "health.min_completion_tokens",
                "completions are shrinking toward nothing (length collapse)",
            ),
            Bound(
                "length_capped_share",
                "max",
                max_length_capped_share,
                "health.max_length_capped_share",
                "most completions run into rollout.max_new_tokens (rambling or repetition, or the cap is too low)",
            ),
            Bound(
                "kl",
                "max",
                max_kl,
                "health.max_kl",
                "KL runaway: the policy drifted far from the reference (consider a lower learner.lr, fewer steps, or a larger rollout.prompts_per_step)",
            ),
        )
        # Judged per evaluation (`judge_front`), not per step: no window.
        self._front_kl = Bound(
            KL_BY_WEIGHT,
            "max",
            max_kl,
            "health.max_kl",
            "the policy drifted far from the reference under those weights, which the training's own KL figure reads "
            "seldom when they are corners",
        )
        self._windows: dict[str, deque[float]] = {m: deque(maxlen=window_steps) for m in METRICS}
        self._crossed: set[str] = set()
        self.warnings: list[dict[str, Any]] = []
        """Every warning raised, oldest first: step, metric, value, bound, kind, setting, meaning, message."""

    def smoothed(self, metric: str) -> float | None:
        """Median of the last `window_steps` values, or None until that many were observed."""
        window = self._windows[metric]
        return float(np.median(window)) if len(window) == self.window_steps else None

    @property
    def crossed(self) -> list[str]:
        """Metrics whose smoothed value is beyond its bound now (`kl_by_weight`: the last evaluation's)."""
        return [b.metric for b in (*self.bounds, self._front_kl) if b.metric in self._crossed]

    def judge_front(self, step: int, front: dict[str, Any] | None) -> None:
        """Judge an evaluation's KL to the reference at each weight vector against `health.max_kl`
        (nothing when there is no front or it has no KL). Each weight vector's figure is already a mean over the
        evaluated prompts, so it is judged as it comes; the bound warns once while it stays crossed."""
        kl = front.get("kl") if front else None
        if not kl:
            return
        bound = self._front_kl
        over = [(weights_label(w), m) for w, m in zip(front["weights"], kl["mean"]) if bound.crossed(m)]
        if not over:
            if bound.metric in self._crossed:
                self._crossed.discard(bound.metric)
                log.info(
                    "health: step %d: the evaluation's KL is within %s=%g at every weight vector again", step, bound.setting, bound.limit
                )
            return
        if bound.metric in self._crossed:
            return
        self._crossed.add(bound.metric)
        where = ", ".join(f"{label} ({m:.2f} nats per answer)" for label, m in over)
        message = (
            f"step {step}: the held-out evaluation's KL to the reference is above {bound.setting}={bound.limit:g} "
            f"at weights {where}: {bound.meaning}"
        )
        self._warn(step, bound, max(m for _, m in over), message)

    def update(self, step: int, samples: Sequence[Sequence[Sample]], selection: PairSelection, learn: dict[str, float]) -> dict[str, float]:
        """Measure one step, judge the bounds; returns the step's figures as `health/<name>` metrics."""
        return self.observe(step, step_health(samples, selection, learn))

    def observe(self, step: int, values: dict[str, float]) -> dict[str, float]:
        """Judge already-measured figures (the names in METRICS; absent ones are skipped)."""
        for metric, value in values.items():
            self._windows[metric].append(float(value))
        for bound in self.bounds:
            if bound.metric not in values:
                continue
            value = self.smoothed(bound.metric)
            if value is None:
                continue
            if bound.crossed(value):
                if bound.metric not in self._crossed:
                    self._crossed.add(bound.metric)
                    self._warn(step, bound, value)
            elif bound.metric in self._crossed:
                self._crossed.discard(bound.metric)
                log.info("health: step %d: %s recovered to %.4g (bound %s=%g)", step, bound.metric, value, bound.setting, bound.limit)
        return {f"health/{k}": float(v) for k, v in values.items()}

    def _warn(self, step: int, bound: Bound, value: float, message: str | None = None) -> None:
        side = "below" if bound.kind == "min" else "above"
        message = message or (
            f"step {step}: {bound.metric} {value:.4g} (median of the last {self.window_steps} steps) is {side} "
            f"{bound.setting}={bound.limit:g}: {bound.meaning}"
        )
        self.warnings.append(
            {
                "step": step,
                "metric": bound.metric,
                "value": value,
                "bound": bound.limit,
                "kind": bound.kind,
                "setting": bound.setting,
                "meaning": bound.meaning,
                "message": message,
            }
        )
        log.warning("health: %s", message)

    def state_dict(self) -> dict[str, Any]:
        return {
            "windows": {m: list(w) for m, w in self._windows.items()},
            "crossed": sorted(self._crossed),
            "warnings": [dict(w) for w in self.warnings],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # Bounds and window length come from the current config (changing them on resume is
        # allowed); a shorter window keeps the most recent values.
        for metric, values in state["windows"].items():
            if metric in self._windows:
                self._windows[metric] = deque((float(v) for v in values), maxlen=self.window_steps)
        self._crossed = set(state["crossed"])
        self.warnings = [dict(w) for w in state["warnings"]]
