"""The machinery under the MO-ODPO loop of `orchestrator.py`: a step's rollout (drawn and sent to
the generators ahead of the step that trains on it), the loop's resumable state and how it
starts (fresh, from a checkpoint, or after a learner restart), live scaling requests, the
learner's batches from the selected pairs, the step's metrics, and the closing summary.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from actors.calls import Generation, chunks, merge_rank_metrics
from actors.ray_actors import ActorFailure
from actors.weight_sync import make_weight_sync
from moalign.actor_io import PairBatch, Sample, StepLearnerMetrics
from moalign.checkpoint import latest_sound_checkpoint, read_state
from moalign.conditioning import (
    DirichletSampler,
    FixedWeights,
    corner_weights,
    neglected_corners,
    render_conditioned,
    round_weights,
    warm_start_sampling_weights,
)
from moalign.config import ConfigError, RunConfig
from moalign.data import DataError, PromptCursor
from moalign.health import METRICS as HEALTH_METRICS
from moalign.health import HealthMonitor
from moalign.objectives import OBJECTIVES
from moalign.pairs import Pair, RunningNormalizer, chosen_probability, corner_of, cut_past_parting, cut_to_decision_token
from moalign.scaling import ScaleRequestError, due_requests, mark_done

# The orchestrator's own logger: its lines read as they did when this lived in orchestrator.py.
log = logging.getLogger("moalign")


@dataclass
class Rollout:
    """One step's prompts, their weights and conditioned token ids, and their samples, drawn and
    sent to the generators up to `rollout.max_staleness` steps before the step trains on them."""

    step: int
    prompt_indices: list[int]
    weights: np.ndarray
    prompt_ids: list[list[int]]
    version: int
    """The policy version the generators hold when they reach this rollout."""
    policy_step: int
    """The learner step that produced that policy (0: the base model)."""
    drawn_from: tuple[int, int] | None = None
    """The prompt cursor's (epoch, position) before these prompts were drawn, for the ledger."""
    generation: Generation | None = None
    samples: list[list[Sample]] | None = None
    drawn_weights: np.ndarray | None = None
    """The Dirichlet draw, where the warm start samples under the corners instead
    (`conditioning.warm_start_weights: corners`); None: `weights` are the draw."""
    kl_prompt_ids: list[list[int]] | None = None
    """The prompts under their draws, where KL samples are taken under them apart from the
    samples (`algorithm.kl_sample_weights`); None: none are."""
    kl_generation: Generation | None = None
    kl_samples: list[list[Sample]] | None = None

    def wait(self) -> list[list[Sample]]:
        if self.samples is None:
            self.samples = self.generation.samples()
            if self.kl_prompt_ids is not None:
                self.kl_samples = self.kl_generation.samples()
            tags = {s["version"] for group in self.samples + (self.kl_samples or []) for s in group}
            if tags != {self.version}:
                # The overlap's correctness rests on generators running calls in the order sent.
                raise RuntimeError(f"step {self.step}: samples from policy version(s) {sorted(tags)}, expected {self.version}")
        return self.samples

    def state_dict(self) -> dict[str, Any]:
        if self.samples is None:
            raise RuntimeError(f"rollout of step {self.step} is still generating; wait() before checkpointing")
        return {
            "step": self.step,
            "prompt_indices": self.prompt_indices,
            "weights": self.weights.tolist(),
            "prompt_ids": self.prompt_ids,
            "version": self.version,
            "policy_step": self.policy_step,
            "drawn_from": self.drawn_from,
            "samples": self.samples,
            "drawn_weights": None if self.drawn_weights is None else self.drawn_weights.tolist(),
            "kl_prompt_ids": self.kl_prompt_ids,
            "kl_samples": self.kl_samples,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Rollout:
        drawn_from = tuple(state["drawn_from"]) if state.get("drawn_from") is not None else None
        drawn = state.get("drawn_weights")
        return cls(
            **{
                **state,
                "weights": np.asarray(state["weights"]),
                "drawn_from": drawn_from,
                "drawn_weights": None if drawn is None else np.asarray(drawn),
            }
        )


@dataclass
class LoopState:
    """Everything besides the learner that a resumed run needs to continue as if never stopped."""

    sampler: DirichletSampler | FixedWeights
    cursor: PromptCursor
    normalizer: RunningNormalizer
    health: HealthMonitor
    step: int = 0
    version: int = 0
    synced_step: int = 0
    """The learner step whose weights the generators got with `version`."""
    rollouts: deque[Rollout] = field(default_factory=deque)
    """Rollouts drawn for steps after `step` (at most `rollout.max_staleness`)."""
    prompts_sha256: str = ""
    """Of the training prompt file: the cursor's positions mean something only in that file."""

    def state_dict(self) -> dict[str, Any]:
        return {
            "prompts_sha256": self.prompts_sha256,
            "step": self.step,
            "version": self.version,
            "synced_step": self.synced_step,
            "rollouts": [r.state_dict() for r in self.rollouts],
            "sampler": self.sampler.state_dict(),
            "cursor": self.cursor.state_dict(),
            "normalizer": self.normalizer.state_dict(),
            "health": self.health.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.version = state["step"], state["version"]
        # Checkpoints from before overlapped generation: synced at the checkpoint, nothing drawn ahead.
        self.synced_step = state.get("synced_step", state["step"])
        self.rollouts = deque(Rollout.from_state(r) for r in state.get("rollouts", []))
        self.sampler.load_state_dict(state["sampler"])
        self.cursor.load_state_dict(state["cursor"])
        self.normalizer.load_state_dict(state["normalizer"])
        # Checkpoints written before the health monitor existed: it starts afresh.
        if "health" in state:
            self.health.load_state_dict(state["health"])


def apply_scale_requests(run_dir: Path, step: int, state: LoopState, actors, sync_weights) -> None:
    """Resize the generator and reward groups as the requests due at `step` ask. A request that
    cannot be met is refused, with why, and the run goes on as it was."""
    for request in due_requests(run_dir, step):
        if isinstance(request, tuple):
            path, why = request
            log.error("scale request refused: %s", why)
            mark_done(path, step, f"refused: {why}", applied=False)
            continue
        done = []
        try:
            for role, count in request.counts.items():
                group = actors.generators if role == "generator" else actors.scorers
                if role == "generator" and count != len(group):
                    if count > len(group) and not sync_weights.can_seed_new_generators():
                        raise ScaleRequestError(
                            f"a new generator could not be given policy version {state.version}: sync.backend={sync_weights.backend} "
                            "with a full payload keeps no copy of it (use sync.backend=object_store, or LoRA adapters)"
                        )
                    # The rollouts sent ahead are collected first: a generator is never removed
                    # with samples still to give, and nothing is sampled twice.
                    for ahead in state.rollouts:
                        ahead.wait()
                done.append(group.resize(count, step))
                if role == "generator":
                    sync_weights.members_changed()
        except (ActorFailure, ScaleRequestError) as exc:
            outcome = f"refused after {'; '.join(done) or 'no change'}: {exc}"
            log.error("scale request at step %d %s", step, outcome)
            mark_done(request.path, step, outcome, applied=False)
            continue
        log.warning("scaled at step %d: %s", step, "; ".join(done))
        mark_done(request.path, step, "; ".join(done), applied=True)


def restart_learners(cfg: RunConfig, actors, run_dir: Path, n_prompts: int, prompts_sha256: str, failure: Exception, count: int):
    """A fresh learner group from the newest sound checkpoint, the loop's state from the same one,
    the generators synced back to its weights; returns the state, the new sync and what happened."""
    started = time.perf_counter()
    log.error("%s; starting the learners again from the last checkpoint (restart %d of at most %d)",
              failure, count, cfg.actors.max_learner_restarts)  # fmt: skip
    sync_weights = make_weight_sync(cfg, actors.replace_learners(), actors.generators)
    checkpoint = latest_sound_checkpoint(run_dir)
    saved = read_state(checkpoint) if checkpoint is not None else None
    state = start_state(cfg, n_prompts, prompts_sha256, checkpoint, saved, actors.learners, sync_weights, after_failure=True)
    why = f"learner restart {count} after: {failure}; back at step {state.step} in {time.perf_counter() - started:.1f}s"
    log.warning("%s", why)
    return state, sync_weights, why


def start_state(
    cfg: RunConfig,
    n_prompts: int,
    prompts_sha256: str,
    checkpoint: Path | None,
    saved: dict[str, Any] | None,
    learners,
    sync_weights,
    after_failure: bool = False,
) -> LoopState:
    """The loop's state at step 0, or at `checkpoint` (whose state.json the caller read: `saved`)
    with the learners restored; the generators are synced to the weights they held then (after a
    failure, also at step 0: they hold later ones)."""
    names = cfg.objective_names
    state = LoopState(
        sampler=(
            FixedWeights(cfg.conditioning.fixed_weights)
            if cfg.conditioning.fixed_weights is not None
            else DirichletSampler(len(names), cfg.conditioning.alpha, seed=cfg.seed)
        ),
        cursor=PromptCursor(n_prompts, seed=cfg.seed, shuffle=cfg.data.shuffle),
        normalizer=RunningNormalizer(len(names)),
        health=HealthMonitor(**cfg.health.model_dump()),
        prompts_sha256=prompts_sha256,
    )
    if checkpoint is not None:
        state.load_state_dict(saved)
        learners.call("load_checkpoint", str(checkpoint / "learner"), step=state.step)
        log.info("resumed from %s at step %d (policy version %d)", checkpoint, state.step, state.version)
    if checkpoint is not None or after_failure:
        sync_weights(state.version, state.step)
    return state


def _window_mean(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [h[key] for h in rows if key in h]
    return float(np.mean(values)) if values else None


def summarize(history: list[dict[str, Any]], names: list[str], health: HealthMonitor) -> dict[str, Any]:
    """First- vs last-quarter means of the rewards and the health figures, and the health verdict."""
    # Per-step means of 32 samples are noisy: compare the first and last quarter of the run.
    window = max(1, len(history) // 4)
    first, last = history[:window], history[-window:]
    return {
        "reward_start": {n: _window_mean(first, f"reward/{n}") for n in names},
        "reward_end": {n: _window_mean(last, f"reward/{n}") for n in names},
        "reward_window_steps": window,
        # A figure is None where no step of the window measured it (KL without a learner update).
        "health_start": {m: _window_mean(first, f"health/{m}") for m in HEALTH_METRICS},
        "health_end": {m: _window_mean(last, f"health/{m}") for m in HEALTH_METRICS},
        "health_warnings": [w["message"] for w in health.warnings],
        "health_crossed_at_end": health.crossed,
        "health_window_steps": health.window_steps,
    }


def check_same_prompts(cfg: RunConfig, saved: dict[str, Any], sha256: str) -> None:
    # Checkpoints from before the hash was kept are taken on trust.
    if saved.get("prompts_sha256", sha256) != sha256:
        raise DataError(
            f"data.train_path {cfg.data.train_path} changed since the checkpoint of step {saved['step']} was written "
            f"(sha256 {saved['prompts_sha256'][:12]}... then, {sha256[:12]}... now): the resumed run would draw other prompts "
            "than the ones it counted as seen; put the file back, or start a new run_dir"
        )


def check_supported(cfg: RunConfig, config_path: str | None = None) -> None:
    """The online loop trains MO-ODPO only: an offline config is refused with the command that
    trains it (naming `config_path`, the --config given, when there is one)."""
    if cfg.is_offline:
        raise ConfigError(
            f"algorithm.name: {cfg.algorithm.name!r} is an offline algorithm, which orchestrator.py does not train; "
            f"train it with: python offline.py --config {config_path or '<the same config>'} [key=value ...]"
        )


def training_lines(
    cfg: RunConfig,
    sampler: DirichletSampler | FixedWeights,
    weights: np.ndarray,
    supervised: bool,
    drawn: np.ndarray | None,
    step: int,
) -> list[np.ndarray]:
    """The weight sets a step trains, one (B, K) array each, in the order its pairs number their
    prompts (set j's prompt b is j * B + b). DPO: the drawn weights, then `relabel_weights` more
    (each prompt's neglected corners, or fresh draws). The warm start: the corners still training
    at `step` (`algorithm.corner_warm_start_steps`), after the drawn weights with
    `warm_start_lines: drawn_and_corners` (`drawn`, the draw, where the samples were taken under
    the corners instead); with `sampled`, the weights sampled under alone."""
    if supervised:
        if cfg.algorithm.warm_start_lines == "sampled":
            return [weights]
        last = cfg.algorithm.corner_warm_start_steps
        corners = [
            line
            for name, line in zip(cfg.objective_names, corner_weights(weights.shape[1], len(weights)))
            if step <= last.get(name, cfg.algorithm.warm_start_steps)
        ]
        if cfg.algorithm.warm_start_lines == "drawn_and_corners":
            return [weights if drawn is None else drawn, *corners]
        return corners
    count = cfg.algorithm.relabel_weights
    if count == 0:
        return [weights]
    if cfg.algorithm.relabel_source == "neglected_corner":
        return [weights, *neglected_corners(weights, count)]
    return [weights, *(round_weights(sampler.sample(len(weights)), cfg.conditioning.decimals) for _ in range(count))]


def draw_rollout(cfg: RunConfig, state: LoopState, prompts, tokenizer, generators) -> Rollout:
    """The next undrawn step's prompts and weights (rounded as written; in the warm start, with
    `conditioning.warm_start_weights: corners`, the corners), sent to the generators."""
    step = state.step + len(state.rollouts) + 1
    drawn_from = (state.cursor.epoch, state.cursor.position)
    indices = state.cursor.next(cfg.prompts_for_step(step))
    weights = drawn = round_weights(state.sampler.sample(len(indices)), cfg.conditioning.decimals)
    if step <= cfg.algorithm.warm_start_steps:
        # Drawn all the same, so the DPO steps draw what they would have without these settings;
        # `warm_start_lines: drawn_and_corners` trains the draw on the corners' samples.
        weights = warm_start_sampling_weights(cfg.conditioning.warm_start_weights, drawn)

    def rendered(lines: np.ndarray) -> list[list[int]]:
        return [
            render_conditioned(tokenizer, prompts[i].prompt, cfg.objective_names, w, cfg.conditioning, cfg.model.max_prompt_tokens)
            for i, w in zip(indices, lines)
        ]

    prompt_ids = rendered(weights)
    seeds = step_seeds(cfg, step, len(prompt_ids))
    generation = Generation(cfg.rollout, generators, prompt_ids, seeds, cfg.rollout.samples_per_prompt, step)
    kl_prompt_ids = kl_generation = None
    if cfg.algorithm.kl_sample_weights != "sampled" and drawn is not weights:
        # Sent after the samples, so the same generator call order (and policy version) holds.
        kl_prompt_ids = rendered(drawn)
        kl_seeds = step_seeds(cfg, step, len(kl_prompt_ids), stream=1)
        kl_generation = Generation(cfg.rollout, generators, kl_prompt_ids, kl_seeds, cfg.algorithm.kl_samples_per_prompt, step)
    return Rollout(
        step,
        list(indices),
        weights,
        prompt_ids,
        state.version,
        state.synced_step,
        drawn_from,
        generation,
        drawn_weights=None if drawn is weights else drawn,
        kl_prompt_ids=kl_prompt_ids,
        kl_generation=kl_generation,
    )


def step_seeds(cfg: RunConfig, step: int, count: int, stream: int = 0) -> list[int]:
    # Per-prompt seeds depend only on (seed, step, prompt): the same completions whatever the
    # number of generators, and again after a resume. A `stream` above 0 is a second set of
    # draws for the same prompts (the KL samples under the draw).
    extra = [stream] if stream else []
    return [int(np.random.SeedSequence([cfg.seed, step, i, *extra]).generate_state(1)[0]) for i in range(count)]


class KLProbe(NamedTuple):
    """One KL sample: the prompt as the generators saw it, the policy's answer, and the penalty's
    coefficient on it (`algorithm.kl_coef`, or `algorithm.corner_kl_coef` under a corner)."""

    prompt_ids: list[int]
    completion_ids: list[int]
    coef: float


def kl_coefs(cfg: RunConfig, weights: np.ndarray) -> list[float]:
    """The KL penalty's coefficient for samples under each row of `weights`: the corner's own
    (`algorithm.corner_kl_coef`) where the row is that objective's corner, else `algorithm.kl_coef`."""
    own = cfg.algorithm.corner_kl_coef
    coefs = []
    for w in np.asarray(weights, dtype=float):
        corner = corner_of(w)
        coefs.append(own.get(cfg.objective_names[corner], cfg.algorithm.kl_coef) if corner is not None else cfg.algorithm.kl_coef)
    return coefs


def kl_probes(cfg: RunConfig, rollout: Rollout) -> list[KLProbe]:
    """The step's KL samples: each prompt's first `algorithm.kl_samples_per_prompt` samples under
    the weights it was sampled with, and (`algorithm.kl_sample_weights`) those taken under its
    draw instead or too, each with its penalty's coefficient under those weights (`kl_coefs`)."""
    per_prompt = cfg.algorithm.kl_samples_per_prompt
    samples = rollout.wait()
    groups = []
    if rollout.kl_prompt_ids is None or cfg.algorithm.kl_sample_weights == "sampled_and_drawn":
        groups.append((rollout.prompt_ids, rollout.weights, samples))
    if rollout.kl_prompt_ids is not None:
        groups.append((rollout.kl_prompt_ids, rollout.drawn_weights, rollout.kl_samples))
    return [
        KLProbe(ids, s["token_ids"], coef)
        for prompt_ids, weights, samples in groups
        for ids, coef, group in zip(prompt_ids, kl_coefs(cfg, weights), samples)
        for s in group[:per_prompt]
    ]


def learn(
    cfg: RunConfig,
    learners,
    prompt_ids: list[list[int]],
    samples: list[list[Sample]],
    pairs: list[Pair],
    step: int,
    supervised: bool = False,
    probes: list[KLProbe] | None = None,
    stop_decisions: bool = False,
    eos_id: int | None = None,
    newline_id: int | None = None,
) -> StepLearnerMetrics | dict:
    """One learner step on `pairs` (each learner rank a contiguous part), the ranks' metrics merged;
    {} when every candidate pair was a tie. `supervised`: each pair's chosen answer is trained
    alone (the warm start), so its rejected side is a one-token stand-in. `stop_decisions`: a warm
    start of DPO pairs on the decision to stop (`moalign.pairs.select_stop_decisions`), each cut
    to differ by the `eos_id` token alone, and on line breaks (a pair with a line-break variant),
    each cut to differ by the `newline_id` token alone. `probes`: the KL samples (`kl_probes`), on which the
    learner estimates the KL (and takes `algorithm.kl_coef`'s penalty)."""
    if cfg.algorithm.kl_penalty_tokens == "text" and eos_id is None:
        raise ValueError("learn: algorithm.kl_penalty_tokens: text leaves out the end-of-sequence token; pass eos_id")
    if stop_decisions and eos_id is None:
        raise ValueError("learn: stop_decisions cuts each pair at the end-of-sequence token; pass eos_id")
    if not pairs:
        log.warning("step %d: every candidate pair was a tie; no learner update", step)
        return {}
    total_weight = float(sum(p.loss_weight for p in pairs))
    scale = cfg.algorithm.preference_label_scale
    probes = probes or []
    if cfg.algorithm.kl_penalty_tokens == "text":
        # The decision to stop left out: the log-ratio of the text written before it.
        probes = [
            probe._replace(completion_ids=probe.completion_ids[:-1]) if probe.completion_ids[-1:] == [eos_id] else probe for probe in probes
        ]
    probes = [probe for probe in probes if probe.completion_ids]
    probe_parts = chunks(len(probes), len(learners))
    shards = []
    for r, s in enumerate(chunks(len(pairs), len(learners))):
        part = pairs[s]
        # Relabelled pairs (prompt index j * B + b) train on sample group b.
        sides = [(samples[p.prompt % len(samples)][p.chosen], samples[p.prompt % len(samples)][p.rejected]) for p in part]
        answers = [(c["token_ids"], r["token_ids"]) for c, r in sides]
        if supervised:
            answers = [(c, r[:1]) for c, r in answers]
        elif stop_decisions:
            tokens = [newline_id if "break_of" in c or "break_of" in r else eos_id for c, r in sides]
            if None in tokens:
                raise ValueError("learn: a line-break pair is cut at the line-break token; pass newline_id")
            answers = [cut_to_decision_token(c, r, t) for (c, r), t in zip(answers, tokens)]
        elif cfg.algorithm.pair_tokens_past_parting:
            answers = [cut_past_parting(c, r, cfg.algorithm.pair_tokens_past_parting) for c, r in answers]
        batch: PairBatch = {
            "prompt_ids": [prompt_ids[p.prompt] for p in part],
            "chosen_ids": [c for c, _ in answers],
            "rejected_ids": [r for _, r in answers],
            "loss_weights": [p.loss_weight for p in part],
            "total_weight": total_weight,
        }
        if scale is not None and not supervised:
            batch["chosen_probability"] = [chosen_probability(p.gap, scale) for p in part]
        if supervised:
            batch["supervised"] = True
        if stop_decisions:
            batch["warm_start"] = True
        if probes:
            mine = probes[probe_parts[r]]
            batch["kl_prompt_ids"] = [probe.prompt_ids for probe in mine]
            batch["kl_completion_ids"] = [probe.completion_ids for probe in mine]
            if cfg.algorithm.corner_kl_coef:
                batch["kl_coefs"] = [probe.coef for probe in mine]
        shards.append((batch,))
    return merge_rank_metrics(learners.call_each("train_step", shards, step=step), OBJECTIVES[cfg.algorithm.name])


def step_metrics(names, raw, samples, selection, learner_metrics, timings, version) -> dict[str, float]:
    metrics: dict[str, float] = {f"reward/{n}": float(raw[:, :, k].mean()) for k, n in enumerate(names)}
    tokens = sum(len(s["token_ids"]) for group in samples for s in group)
    metrics.update(
        {
            "version": version,
            "pairs": len(selection.pairs),
            "dropped_ties": selection.dropped_ties,
            "dropped_zero_weight": selection.dropped_zero_weight,
            "dropped_agreeing": selection.dropped_agreeing,
            "tokens_generated": tokens,
            # Throughput: with generation overlapped, time/generate_s is only the part not hidden.
            "tokens_per_s": tokens / max(timings["time/step_s"], 1e-9),
            "pairs_per_s": len(selection.pairs) / max(timings["time/step_s"], 1e-9),
            "completion_tokens_mean": tokens / max(1, sum(len(g) for g in samples)),
        }
    )
    metrics.update(timings)
    metrics.update({k: float(v) for k, v in learner_metrics.items()})
    return metrics


def report(summary: dict[str, Any]) -> None:
    log.info("run directory: %s (checkpoint %s)", summary["run_dir"], summary["checkpoint"])
    log.info("exported policy: %s (serve it: make serve MODEL=%s)", summary["export"], summary["export"])
    history = summary["history"]
    if history:
        keys = ["time/generate_s", "time/score_s", "time/learn_s", "time/sync_s", "time/step_s", "pairs_per_s", "tokens_per_s"]
        means = {k: np.mean([h[k] for h in history if k in h]) for k in keys if any(k in h for h in history)}
        log.info("mean per step: " + ", ".join(f"{k}={v:.2f}" for k, v in means.items()))
    log.info("mean reward per objective, first vs last %d step(s):", summary["reward_window_steps"])
    for name, start in summary["reward_start"].items():
        end = summary["reward_end"].get(name)
        log.info("reward %-12s start %+.4f  end %+.4f  change %+.4f", name, start, end, end - start)
    # The verdict sits right under the reward changes: a collapsing policy can raise rewards too.
    warnings, crossed = summary["health_warnings"], summary["health_crossed_at_end"]
    if warnings:
        log.warning(
            "health bounds were crossed %d time(s) during this run (%s), so the reward changes above may come from a "
            "collapsing policy rather than a better one; see the health figures and warnings below",
            len(warnings),
            f"still crossed at the end: {', '.join(crossed)}" if crossed else "all recovered by the end",
        )
    elif summary["steps"] < summary["health_window_steps"]:
        log.info(
            "health: too few steps to judge (%d, bounds are judged over health.window_steps=%d)",
            summary["steps"],
            summary["health_window_steps"],
        )
    else:
        log.info("health: no bound crossed during this run")
    log.info("health, first vs last %d step(s):", summary["reward_window_steps"])
    for metric, start in summary["health_start"].items():
        end = summary["health_end"][metric]
        change = f"{end - start:+.3f}" if start is not None and end is not None else "n/a"
        log.info("health %-22s start %8s  end %8s  change %s", metric, _fmt(start), _fmt(end), change)
    for message in warnings:
        log.warning("health warning: %s", message)
    if not warnings:
        log.info("health warnings: none")


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
