"""The calls every loop makes on a run's actor groups: generate, score, take a learner step's
metrics from its ranks, checkpoint, export. Work is split over a group's actors in contiguous
parts (`chunks`); each call waits with the group's timeout and names the actor that failed.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from moalign.actor_io import LearnerMetrics, Sample, StepLearnerMetrics
from moalign.checkpoint import CheckpointError, latest_checkpoint, publish, staging_dir
from moalign.config import RolloutConfig, RunConfig
from moalign.objectives import Objective
from moalign.pairs import check_rewards

log = logging.getLogger("moalign")


def chunks(n: int, parts: int) -> list[slice]:
    """`parts` contiguous slices covering range(n), sizes differing by at most one."""
    bounds = np.linspace(0, n, parts + 1).round().astype(int)
    return [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


class Generation:
    """Completions being sampled on the generators: submitted now, collected by `samples()`.

    A generator runs its calls in the order they were sent, so a generation sent before a weight
    sync samples from the weights before it, however long either takes.
    """

    def __init__(self, rollout: RolloutConfig, generators, prompt_ids: list[list[int]], seeds: list[int], n: int, step: int | None):
        parts = [s for s in chunks(len(prompt_ids), len(generators)) if s.stop > s.start]
        self._args = [(prompt_ids[s], n, rollout.temperature, rollout.top_p, rollout.max_new_tokens, seeds[s]) for s in parts]
        self._refs = generators.submit_each("generate", self._args)
        self._generators, self._step = generators, step
        self._version = generators.policy_version
        self._samples: list[list[Sample]] | None = None

    def _stale(self, chunk: list[list[Sample]]) -> str | None:
        versions = {s["version"] for group in chunk for s in group}
        if versions != {self._version}:
            return f"it sampled from policy version {sorted(versions)}, not {self._version}: its process was restarted"
        return None

    def samples(self) -> list[list[Sample]]:
        """n samples per prompt, waiting for them (with the generators' timeout) the first time.
        A generator that died, or was restarted since this was sent, gets its weights back and
        samples its part again: the same seeds and weights give the same samples."""
        if self._samples is None:
            chunks_ = self._generators.collect(self._refs, "generate", self._args, self._step, stale=self._stale)
            self._samples = [group for chunk in chunks_ for group in chunk]
        return self._samples


def generate(
    rollout: RolloutConfig, generators, prompt_ids: list[list[int]], seeds: list[int], n: int, step: int | None
) -> list[list[Sample]]:
    return Generation(rollout, generators, prompt_ids, seeds, n, step).samples()


def score(names: list[str], scorers, prompts: list[str], samples: list[list[Sample]], n: int, step: int | None) -> np.ndarray:
    """Rewards [prompts, n, K] of every sample, scored on its (unconditioned) prompt by the reward
    actors, each a contiguous part; checked (shape, finite) before anything trains on them."""
    flat_prompts = [p for p, group in zip(prompts, samples) for _ in group]
    flat_texts = [s["text"] for group in samples for s in group]
    # vLLM says "stop" for EOS or a stop string, "length" when the token cap cut the answer off.
    flat_finished = [s["finish_reason"] == "stop" for group in samples for s in group]
    parts = [s for s in chunks(len(flat_texts), len(scorers)) if s.stop > s.start]
    scores = scorers.call_each("score", [(flat_prompts[s], flat_texts[s], flat_finished[s]) for s in parts], step=step)
    stacked = np.concatenate(scores, axis=0)
    return check_rewards(stacked.reshape(len(prompts), n, -1), len(prompts), n, names)


def merge_rank_metrics(per_rank: list[LearnerMetrics], objective: type[Objective]) -> StepLearnerMetrics:
    """Step metrics from the data-parallel ranks' sums: the loss is sum_i w_i l_i / sum_i w_i over
    all ranks' pairs; per-pair means (the objective's own figures, the pairs' log-ratio) divide the
    ranks' sums by the total pair count, the KL its sum by the ranks' KL samples."""
    pairs = sum(m["pairs"] for m in per_rank)
    per_pair = max(pairs, 1)
    kl_samples = sum(m["kl_samples"] for m in per_rank)
    first = per_rank[0]
    return {
        "loss": sum(m["objective"] for m in per_rank),
        **{name: sum(m[f"{name}_sum"] for m in per_rank) / per_pair for name in objective.pair_metrics},
        "kl": sum(m["kl_sum"] for m in per_rank) / kl_samples if kl_samples else float("nan"),
        "pair_logratio": sum(m["pair_logratio_sum"] for m in per_rank) / (2 * per_pair),
        "grad_norm": first["grad_norm"],
        "lr": first["lr"],
        "learner_step": first["step"],
        # The slowest rank's passes: with uneven shards it sets the step's compute time.
        "micro_batches": max(m["micro_batches"] for m in per_rank),
        "time/learner_compute_s": max(m["seconds"] for m in per_rank),
        # The algorithm's own figures (MOPO's multipliers) are the same on every rank.
        **({k: v for k, v in first.items() if k.startswith(objective.metrics_prefix)} if objective.metrics_prefix else {}),
    }


def save_checkpoint(run_dir: Path, learners, state: Any, keep_last: int) -> None:
    """Write and publish step `state.step`'s checkpoint, or raise CheckpointError having removed
    what was written: a full disk or a failed write leaves the previous checkpoint the latest."""
    from actors.ray_actors import ActorFailure

    staging = staging_dir(run_dir, state.step)
    try:
        learners.call("save_checkpoint", str(staging / "learner"), step=state.step)
        final = publish(staging, state.step, state.state_dict(), keep_last)
    except (OSError, ActorFailure) as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(exc, ActorFailure) and exc.actor_lost:
            raise  # the learner is gone: restarting it is the loop's business, not a write failure
        latest = latest_checkpoint(run_dir)
        raise CheckpointError(
            f"the checkpoint of step {state.step} could not be written ({exc}); "
            f"{f'the latest is still {latest}' if latest else 'there is no earlier checkpoint'}, and what was written of this one "
            f"is removed. Free space under {run_dir} (or fix the cause) and run the same command again: it resumes from there"
        ) from exc
    log.info("checkpoint %s", final)


def export_policy(cfg: RunConfig, learners, dest: Path, step: int) -> str:
    """The learners' policy as the folders of `moalign.export_folder` at `dest` (its card is the run's)."""
    from moalign.export_folder import PolicyCard

    card = PolicyCard.from_run(cfg, step).model_dump()
    learners.call("export_policy", str(dest), card, step=step)
    return str(dest)
