"""The one part of a learner step that differs between algorithms, one module per algorithm with
its maths beside its learner-side objective.

The learner (`actors/learner.py`) runs the same step for every algorithm: micro-batches of
pairs, summed completion log-probs under the policy and the reference, `backward` of
sum_i w_i loss_i / total_weight, one optimizer step. An objective (the interface: `base.Objective`)
says which extra per-pair fields a batch carries, turns log-probs into per-pair losses, sums the
per-pair figures a step reports, and keeps whatever state the algorithm needs between steps
(MOPO's dual variables), which the learner checkpoints.

- `dpo.DPOObjective` (MO-ODPO; offline DPO): the DPO-family losses.
- `modpo.MODPOObjective`: DPO with the margin of the other objectives' rewards (seed 000).
- `mopo.MOPOLearnerObjective`: importance-weighted behaviour cloning towards the closed-form MOPO
  policy (seeds 002/003, reconstructed in `mopo`); it needs the whole step's batch before the
  first micro-batch, so it asks the learner for a scoring pass (`prepare`).

Only torch is imported here; the learner hands in what it computed.
"""

from __future__ import annotations

from moalign.config import RunConfig
from moalign.objectives.base import Objective, Scorer
from moalign.objectives.dpo import DPOObjective
from moalign.objectives.modpo import MODPOObjective
from moalign.objectives.mopo import MOPOLearnerObjective

__all__ = ["OBJECTIVES", "DPOObjective", "MODPOObjective", "MOPOLearnerObjective", "Objective", "Scorer", "build_objective"]

OBJECTIVES: dict[str, type[DPOObjective]] = {
    "mo_odpo": DPOObjective,
    "modpo": MODPOObjective,
    "mopo": MOPOLearnerObjective,
}


def build_objective(cfg: RunConfig) -> DPOObjective:
    """The run's algorithm's objective, from its own section and the objectives' names."""
    return OBJECTIVES[cfg.algorithm.name](cfg.algorithm, cfg.objective_names)
