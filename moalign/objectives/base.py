"""What every objective shares: the interface the learner calls, and checks of a batch's extra fields.

The learner (`actors/learner.py`) runs the same step for every algorithm; an objective says
which extra per-pair fields a batch carries (`validate`), may score the whole batch first
(`prepare`), turns log-probs into per-pair losses (`pair_losses`), sums the per-pair figures
the step reports (`pair_metric_sums`, named by `pair_metrics`), and keeps whatever state the
algorithm needs between steps (`step_end`, `state_dict`), which the learner checkpoints.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch

from moalign.actor_io import PairBatch

# (prompts, completions) -> summed completion log-probs, no gradient; given to `prepare`.
Scorer = Callable[[list, list], torch.Tensor]


def check_tensor(name: str, t: torch.Tensor, shape: torch.Size | None = None) -> None:
    if not torch.is_tensor(t):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if shape is not None and t.shape != shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contains NaN or inf")


def float_rows(batch: PairBatch, key: str, n: int, width: int) -> list[list[float]]:
    """batch[key], checked: n rows of `width` finite numbers (a per-pair extra field)."""
    rows = batch.get(key)
    if rows is None:
        raise ValueError(f"batch: missing field {key!r}")
    if len(rows) != n:
        raise ValueError(f"batch[{key!r}] has {len(rows)} entries, batch['prompt_ids'] has {n}")
    for i, row in enumerate(rows):
        if len(row) != width:
            raise ValueError(f"batch[{key!r}][{i}] has {len(row)} values, expected {width}")
        for v in row:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"batch[{key!r}][{i}] holds {v!r}, not a finite number")
    return rows


class Objective:
    """The interface; the defaults are what an algorithm without state or extra fields needs."""

    pair_metrics: tuple[str, ...] = ()
    """Per-pair figures `pair_metric_sums` adds up; a step reports each as `<name>` (the mean
    over the step's pairs) beside the rank's `<name>_sum`."""
    metrics_prefix: str | None = None
    """The prefix of the figures `step_end` reports (the same on every rank), if any."""

    def validate(self, batch: PairBatch, n: int) -> None:
        """Check the batch's extra per-pair fields."""

    def prepare(self, batch: PairBatch, score_policy: Scorer, score_reference: Scorer, score_behaviour: Scorer) -> None:
        """A pass over the whole batch before the micro-batches."""

    def pair_losses(self, pc, pr, rc, rr, index: torch.Tensor, batch: PairBatch) -> torch.Tensor:
        """Per-pair losses of one micro-batch from the summed log-probs of chosen and rejected
        under the policy (pc, pr) and the reference (rc, rr); `index` is each row's pair in the
        batch, -1 for padding rows (which must come out finite: their weight is 0)."""
        raise NotImplementedError

    def pair_metric_sums(self, pc, pr, rc, rr) -> dict[str, float]:
        """Sums over the real pairs of one micro-batch of each of `pair_metrics` (no gradient)."""
        return {}

    def step_end(self) -> dict[str, Any]:
        """After the optimizer step: metrics, and `refresh_reference` when the reference moves."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass
