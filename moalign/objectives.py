"""The one part of a learner step that differs between algorithms: the per-pair loss.

The learner (`actors/learner.py`) runs the same step for every algorithm: micro-batches of
pairs, summed completion log-probs under the policy and the reference, `backward` of
sum_i w_i loss_i / total_weight, one optimizer step. An objective says which extra per-pair
fields a batch carries, turns log-probs into per-pair losses, and keeps whatever state the
algorithm needs between steps (MOPO's dual variables), which the learner checkpoints.

- `DPOObjective` (MO-ODPO; offline DPO): the DPO-family loss of `moalign.losses`.
- `MODPOObjective`: DPO with the margin of the other objectives' rewards (seed 000).
- `MOPOLearnerObjective`: importance-weighted behaviour cloning towards the closed-form MOPO
  policy (seeds 002/003, reconstructed in `moalign.mopo`); it needs the whole step's batch
  before the first micro-batch, so it asks the learner for a scoring pass (`prepare`).

Only torch is imported here; the learner hands in what it computed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch

from moalign.config import RunConfig
from moalign.losses import dpo_margin, modpo_loss, preference_loss
from moalign.mopo import MOPOObjective

# (prompts, completions) -> summed completion log-probs, no gradient; given to `prepare`.
Scorer = Callable[[list, list], torch.Tensor]


def _float_rows(batch: dict, key: str, n: int, width: int) -> list[list[float]]:
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


class DPOObjective:
    """Sigmoid / IPO / hinge DPO on (chosen, rejected): MO-ODPO's loss."""

    def __init__(self, cfg: RunConfig):
        a = cfg.algorithm
        self.beta, self.kind, self.label_smoothing = a.beta, a.loss, a.label_smoothing

    def validate(self, batch: dict, n: int) -> None:
        """Extra per-pair fields; DPO needs none."""

    def prepare(self, batch: dict, score_policy: Scorer, score_reference: Scorer, score_behaviour: Scorer) -> None:
        """A pass over the whole batch before the micro-batches; DPO needs none."""

    def pair_losses(self, pc, pr, rc, rr, index: torch.Tensor, batch: dict) -> torch.Tensor:
        """Per-pair losses of one micro-batch; `index` is each row's pair in the batch, -1 for
        padding rows (which must come out finite: their weight is 0)."""
        return preference_loss(dpo_margin(pc, pr, rc, rr), self.beta, self.kind, self.label_smoothing)

    def step_end(self) -> dict[str, Any]:
        """After the optimizer step: metrics, and `refresh_reference` when the reference moves."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass


class MODPOObjective(DPOObjective):
    """MODPO for objective k at the run's fixed weights: each pair carries the other objectives'
    rewards of its chosen and rejected response (`margin_chosen`, `margin_rejected`, K-1 values
    each, objective order with k left out), which `moalign.losses.modpo_loss` subtracts."""

    def __init__(self, cfg: RunConfig):
        super().__init__(cfg)
        m = cfg.algorithm.modpo
        if m.weights is None:
            raise ValueError("algorithm.modpo.weights: a MODPO learner trains one weight vector; a sweep runs one learner per vector")
        self.weights = torch.tensor(m.weights, dtype=torch.float32)
        self.objective = m.objective
        self.width = len(m.weights) - 1

    def validate(self, batch: dict, n: int) -> None:
        _float_rows(batch, "margin_chosen", n, self.width)
        _float_rows(batch, "margin_rejected", n, self.width)

    def pair_losses(self, pc, pr, rc, rr, index: torch.Tensor, batch: dict) -> torch.Tensor:
        rows = index.tolist()
        # Padding rows get zero margins: finite, and their weight is 0.
        zeros = [0.0] * self.width
        chosen = torch.tensor([batch["margin_chosen"][i] if i >= 0 else zeros for i in rows], dtype=pc.dtype, device=pc.device)
        rejected = torch.tensor([batch["margin_rejected"][i] if i >= 0 else zeros for i in rows], dtype=pc.dtype, device=pc.device)
        return modpo_loss(pc, pr, rc, rr, chosen, rejected, self.weights.to(pc.device), self.objective, self.beta)


class MOPOLearnerObjective(DPOObjective):
    """MOPO on pairs (response 0 as `chosen_ids`, response 1 as `rejected_ids`) with per-pair
    `labels` (K values: the probability that response 0 is preferred on each objective).

    `prepare` scores the whole batch under the policy, the (lagged) reference and the behaviour
    policy and computes the closed-form importance weights w*; a pair's loss is then
    -(w*_0 log pi(y_0) + w*_1 log pi(y_1)) / 2, so the mean over the step's pairs is the
    self-normalised BC loss of `MOPOObjective.loss` over the step's batch.

    Where the seed text is silent about an LLM learner (the equations' own reconstruction is in
    `moalign.mopo`), these are choices, also listed in the README:
    - The behaviour policy mu (the data's sampler) is the base model: the shipped pairs are its
      samples; for other data it is an assumption, as the sampler is rarely known.
    - w* is computed once per optimizer step over all 2 x pairs_per_step completions of the
      step (one self-normalised batch), not per micro-batch; log-probs are summed over a
      response's tokens (sequence-level ratios), with dropout off.
    - An objective a row does not judge counts as a tie (0.5) on that row.
    - Thresholds and multipliers start at 0, so the constraints bind only from the first
      schedule update, after `lag_steps` steps; reference lag and schedule update follow the
      optimizer step whose index is a multiple of `lag_steps`.
    - The lagged reference is a copy of the trainable weights (LoRA: the adapters), swapped in
      to score the reference; hence ZeRO-3 is refused.
    - One learner rank: the multipliers would otherwise need an all-reduce of the bounds.
    """

    def __init__(self, cfg: RunConfig):
        super().__init__(cfg)
        m = cfg.algorithm.mopo
        self.names = cfg.objective_names
        self.mopo = MOPOObjective(
            tau=m.tau,
            lb_radius=m.lb_radius,
            relaxation=m.relaxation,
            lag_steps=m.lag_steps,
            dual_lr=m.dual_lr,
            n_objectives=len(self.names),
            primary=m.primary,
            max_lambda=m.max_lambda,
        )
        self._weights: torch.Tensor | None = None
        self._metrics: dict[str, float] = {}

    def validate(self, batch: dict, n: int) -> None:
        for i, row in enumerate(_float_rows(batch, "labels", n, len(self.names))):
            if any(not 0 <= v <= 1 for v in row):
                raise ValueError(f"batch['labels'][{i}] = {row}: labels are probabilities in [0, 1]")

    def prepare(self, batch: dict, score_policy: Scorer, score_reference: Scorer, score_behaviour: Scorer) -> None:
        prompts = list(batch["prompt_ids"]) * 2
        completions = list(batch["chosen_ids"]) + list(batch["rejected_ids"])
        n = len(batch["prompt_ids"])

        def pairs(scores: torch.Tensor) -> torch.Tensor:
            return torch.stack([scores[:n], scores[n:]], dim=1).double().cpu()

        policy, reference = pairs(score_policy(prompts, completions)), pairs(score_reference(prompts, completions))
        # Until the first lag the reference is the behaviour policy: one pass fewer.
        behaviour = pairs(score_behaviour(prompts, completions)) if self.mopo.n_refreshes else None
        labels = torch.tensor(batch["labels"], dtype=torch.float64)
        w_star, metrics = self.mopo.sample_weights(policy, reference, labels, behaviour)
        self._weights = w_star.reshape(2, n).T.contiguous()
        self._metrics = self._named(metrics)

    def _named(self, metrics: Mapping[str, float]) -> dict[str, float]:
        out = {}
        for key, value in metrics.items():
            head, _, tail = key.partition("/")
            out[f"mopo/{head}/{self.names[int(tail)]}" if tail.isdigit() else f"mopo/{key}"] = float(value)
        return out

    def pair_losses(self, pc, pr, rc, rr, index: torch.Tensor, batch: dict) -> torch.Tensor:
        if self._weights is None:
            raise RuntimeError("MOPO: pair_losses before prepare; the learner must score the batch first")
        rows = index.clamp_min(0)
        w = self._weights[rows].to(device=pc.device, dtype=pc.dtype)
        return -(w[:, 0] * pc + w[:, 1] * pr) / 2

    def step_end(self) -> dict[str, Any]:
        self._weights = None
        out = self.mopo.step_end()
        metrics = dict(self._metrics)
        for j, k in enumerate(self.mopo.secondary):
            # After the dual step: the multipliers the next step trains with.
            metrics[f"mopo/lambda/{self.names[k]}"] = float(out["lambdas"][j])
            metrics[f"mopo/threshold/{self.names[k]}"] = float(out["thresholds"][j])
        metrics["mopo/reference_refreshes"] = float(self.mopo.n_refreshes)
        return {"refresh_reference": out["refresh_reference"], "metrics": metrics}

    def state_dict(self) -> dict[str, Any]:
        return self.mopo.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.mopo.load_state_dict(state)


OBJECTIVES: dict[str, type[DPOObjective]] = {
    "mo_odpo": DPOObjective,
    "modpo": MODPOObjective,
    "mopo": MOPOLearnerObjective,
}


def build_objective(cfg: RunConfig) -> DPOObjective:
    return OBJECTIVES[cfg.algorithm.name](cfg)
