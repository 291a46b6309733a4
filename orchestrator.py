"""moalign orchestrator: the MO-ODPO loop on Ray.

    python orchestrator.py --config configs/default.yaml [key=value ...]
    ray job submit --working-dir . -- python orchestrator.py --config configs/default.yaml

(A config with algorithm.name modpo or mopo is handed to the offline loop, `offline.py`.)

One step: draw prompts and Dirichlet weights -> write the weights into the prompts -> vLLM
generator actors sample n completions each -> reward actors score them on K objectives ->
normalise, scalarise, pick chosen/rejected -> DeepSpeed learner actors take a DPO step ->
every `sync.every_steps` the learner's weights go to the generators. A run directory that
already holds a checkpoint is resumed.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from moalign.checkpoint import latest_checkpoint, publish, read_state, staging_dir
from moalign.conditioning import (
    DirichletSampler,
    FixedWeights,
    condition_messages,
    neglected_corners,
    render_prompt_ids,
    round_weights,
)
from moalign.config import ConfigError, RunConfig, load_config, save_resolved
from moalign.data import DataError, PromptCursor, load_prompts
from moalign.health import METRICS as HEALTH_METRICS
from moalign.health import HealthMonitor
from moalign.pairs import RewardError, RunningNormalizer, check_rewards, select_relabelled_pairs

log = logging.getLogger("moalign")


@dataclass
class LoopState:
    """Everything besides the learner that a resumed run needs to continue as if never stopped."""

    sampler: DirichletSampler | FixedWeights
    cursor: PromptCursor
    normalizer: RunningNormalizer
    health: HealthMonitor
    step: int = 0
    version: int = 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "version": self.version,
            "sampler": self.sampler.state_dict(),
            "cursor": self.cursor.state_dict(),
            "normalizer": self.normalizer.state_dict(),
            "health": self.health.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.version = state["step"], state["version"]
        self.sampler.load_state_dict(state["sampler"])
        self.cursor.load_state_dict(state["cursor"])
        self.normalizer.load_state_dict(state["normalizer"])
        # Checkpoints written before the health monitor existed: it starts afresh.
        if "health" in state:
            self.health.load_state_dict(state["health"])


def run(cfg: RunConfig, ray_address: str | None = None) -> dict[str, Any]:
    """Train for cfg.steps (resuming from cfg.run_dir if it holds a checkpoint); returns a summary."""
    from actors.metrics import MetricsSink, read_metrics
    from actors.ray_actors import ActorFailure
    from evaluate import TrainingEvaluation

    _check_supported(cfg)
    run_dir, resume_from, model_path, tokenizer = open_run(cfg, ray_address)
    prompts = load_prompts(cfg.data.train_path)
    names = cfg.objective_names
    evaluation = TrainingEvaluation(cfg, run_dir, tokenizer)

    # Wiring: three independently sized actor groups, killed when the run ends or fails.
    with _actor_groups(cfg, model_path) as (generators, scorers, learners):
        state = LoopState(
            sampler=(
                FixedWeights(cfg.conditioning.fixed_weights)
                if cfg.conditioning.fixed_weights is not None
                else DirichletSampler(len(names), cfg.conditioning.alpha, seed=cfg.seed)
            ),
            cursor=PromptCursor(len(prompts), seed=cfg.seed, shuffle=cfg.data.shuffle),
            normalizer=RunningNormalizer(len(names)),
            health=HealthMonitor(**cfg.health.model_dump()),
        )
        if resume_from is not None:
            state.load_state_dict(read_state(resume_from))
            learners.call("load_checkpoint", str(resume_from / "learner"), step=state.step)
            _sync_weights(cfg, learners, generators, state.version, state.step)
            log.info("resumed from %s at step %d (policy version %d)", resume_from, state.step, state.version)

        sink = MetricsSink(run_dir, run_dir.name, cfg.logging.tensorboard, cfg.logging.ray_metrics, resume_step=state.step)
        progress = _progress(cfg, state.step)
        try:
            evaluation.at_start(generators, scorers, state.step)
            for step in range(state.step + 1, cfg.steps + 1):
                timings: dict[str, float] = {}
                t0 = time.perf_counter()

                # 1-2. Prompts, Dirichlet weights (rounded as written), conditioned prompt token ids.
                batch = [prompts[i] for i in state.cursor.next(cfg.rollout.prompts_per_step)]
                weights = round_weights(state.sampler.sample(len(batch)), cfg.conditioning.decimals)
                prompt_ids = [_render(tokenizer, p.prompt, names, w, cfg) for p, w in zip(batch, weights)]

                # 3. On-policy samples, n per prompt, tagged with the policy version.
                t = time.perf_counter()
                samples = _generate(
                    cfg, generators, prompt_ids, _step_seeds(cfg, step, len(prompt_ids)), cfg.rollout.samples_per_prompt, step
                )
                timings["time/generate_s"] = time.perf_counter() - t

                # 4. Rewards on the unconditioned prompt; per-objective running normalisation.
                t = time.perf_counter()
                raw = _score(cfg, scorers, [p.prompt for p in batch], samples, cfg.rollout.samples_per_prompt, step)
                state.normalizer.update(raw)
                normalized = state.normalizer.normalize(raw)
                timings["time/score_s"] = time.perf_counter() - t

                # 5. Chosen / rejected by the weighted (normalised) reward, under the sampled weights
                #    and under `relabel_weights` extra ones (each with its own weight line).
                weight_sets = [weights] + _relabel_weights(cfg, state.sampler, weights)
                for extra in weight_sets[1:]:
                    prompt_ids += [_render(tokenizer, p.prompt, names, w, cfg) for p, w in zip(batch, extra)]
                selection = select_relabelled_pairs(weight_sets, normalized, cfg.algorithm.pair_mode)

                # 6. One learner step on the conditioned prompts.
                t = time.perf_counter()
                learn = _learn(cfg, learners, prompt_ids, samples, selection.pairs, step)
                timings["time/learn_s"] = time.perf_counter() - t

                # 7. Weight sync; also before every checkpoint so a resumed run's generators hold
                #    exactly the weights the uninterrupted run's generators held, and before every
                #    evaluation (eval.every_steps is a multiple of sync.every_steps, so this adds none).
                checkpoint_due = step % cfg.checkpoint.every_steps == 0 or step == cfg.steps
                t = time.perf_counter()
                if step % cfg.sync.every_steps == 0 or checkpoint_due or evaluation.due(step):
                    state.version += 1
                    timings.update(_sync_weights(cfg, learners, generators, state.version, step))
                timings["time/sync_s"] = time.perf_counter() - t

                # 7b. Pareto evaluation on held-out prompts, on the weights just synced. Before
                #     state.step moves on, so a failure here is reported as this step's; its time
                #     is left out of time/step_s (it is time/eval_s).
                eval_metrics = evaluation.evaluate(generators, scorers, step) if evaluation.due(step) else {}
                t0 += eval_metrics.get("time/eval_s", 0.0)

                # 8. Metrics, progress, checkpoint.
                state.step = step
                timings["time/step_s"] = time.perf_counter() - t0
                metrics = _step_metrics(names, raw, samples, selection, learn, timings, state.version)
                metrics.update(state.health.update(step, samples, selection, learn))
                metrics.update(eval_metrics)
                sink.log(step, metrics)
                progress.update(1)
                progress.set_postfix(loss=f"{metrics.get('loss', float('nan')):.3f}", pairs=metrics["pairs"], v=state.version)
                if checkpoint_due:
                    _checkpoint(cfg, run_dir, learners, state)
        except (ActorFailure, RewardError) as exc:
            log.error("step %d failed and was not checkpointed; a resume repeats it from the last checkpoint: %s", state.step + 1, exc)
            raise
        finally:
            progress.close()
            sink.close()

        # 9. The last policy as folders that transformers, PEFT and vLLM load (`make serve` serves it).
        exported = _export(cfg, learners, run_dir / "final", state.step)

    history = read_metrics(run_dir)
    steerability = evaluation.closing_table()
    if steerability:
        log.info("steerability on held-out prompts, base vs trained (RUN_DIR/eval):\n%s", steerability)
    return {
        "run_dir": str(run_dir),
        "steps": state.step,
        "version": state.version,
        **_summarize(history, names, state.health),
        "history": history,
        "checkpoint": str(latest_checkpoint(run_dir)),
        "export": exported,
        "steerability_table": steerability,
    }


def open_run(cfg: RunConfig, ray_address: str | None) -> tuple[Path, Path | None, str, Any]:
    """The run directory (with the resolved config saved, after checking that a resumed run trains
    the same problem), its latest checkpoint or None, Ray, the model's local path and tokenizer."""
    from transformers import AutoTokenizer

    from moalign.models import resolve_model_path

    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    resume_from = latest_checkpoint(run_dir)
    if resume_from is not None:
        _check_resume_config(cfg, run_dir / "config.yaml")
    save_resolved(cfg, run_dir / "config.yaml")
    _start_ray(cfg, ray_address)
    model_path = str(resolve_model_path(cfg.model.path, cfg.model.cache_dir))
    return run_dir, resume_from, model_path, AutoTokenizer.from_pretrained(model_path)


def _window_mean(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [h[key] for h in rows if key in h]
    return float(np.mean(values)) if values else None


def _summarize(history: list[dict[str, Any]], names: list[str], health: HealthMonitor) -> dict[str, Any]:
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


def _check_supported(cfg: RunConfig) -> None:
    if cfg.is_offline:
        raise ConfigError(
            f"algorithm.name: {cfg.algorithm.name!r} is an offline algorithm; offline.run trains it (orchestrator.py --config picks it)"
        )


# Changing these between the stop and the resume does not change what is trained (the
# checkpoint interval does: every checkpoint forces a weight sync). Health bounds only decide
# when to warn. Evaluations run only after regular syncs and sample with their own seeds. A run
# directory may be moved or copied and resumed where it lies.
_RESUMABLE_CHANGES = ("run_dir", "steps", "logging.", "ray_timeout_s", "checkpoint.keep_last", "health.", "eval.")


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_flatten(value, f"{prefix}{key}."))
    return out


def _check_resume_config(cfg: RunConfig, saved_path: Path) -> None:
    """A resumed run must train the same problem; otherwise 'continue as if never stopped' is false."""
    saved = _flatten(load_config(saved_path).model_dump(mode="json"))
    now = _flatten(cfg.model_dump(mode="json"))
    changed = sorted(
        k.rstrip(".") for k in now.keys() | saved.keys() if not k.startswith(_RESUMABLE_CHANGES) and now.get(k) != saved.get(k)
    )
    if changed:
        raise ConfigError(
            f"run_dir {cfg.run_dir} holds a checkpoint made with a different configuration (changed: {', '.join(changed)}); "
            f"resume with the saved {saved_path} or choose a new run_dir"
        )


def _start_ray(cfg: RunConfig, address: str | None) -> None:
    import ray

    if ray.is_initialized():
        return
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address or os.environ["RAY_ADDRESS"])
        return
    # A local cluster: logical CPUs are scheduling tokens; the loop's phases run one after
    # another, so reserving more tokens than cores oversubscribes nothing at a time.
    a = cfg.actors
    wanted = a.num_generators * a.generator_cpus + a.num_reward_workers * a.reward_cpus + a.num_learners * a.learner_cpus
    ray.init(num_cpus=max(os.cpu_count() or 1, int(np.ceil(wanted))), include_dashboard=False)


@contextlib.contextmanager
def _actor_groups(cfg: RunConfig, model_path: str, roles: tuple[str, ...] = ("generator", "reward", "learner")):
    """The actor groups named in `roles` (the others are None), killed when the block ends."""
    groups: list = []
    try:
        yield _build_actors(cfg, model_path, groups, roles)
    finally:
        for group in groups:
            group.kill()


def _build_actors(cfg: RunConfig, model_path: str, started: list, roles: tuple[str, ...]):
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from actors.ray_actors import ActorGroup, LearnerActor, RewardActor
    from moalign.weight_sync import free_port

    a = cfg.actors
    threads = {"OMP_NUM_THREADS": str(a.omp_threads or os.cpu_count() or 1)}
    env = {
        "env_vars": {**threads, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_LOGGING_LEVEL": "WARNING", "TOKENIZERS_PARALLELISM": "false"}
    }
    timeout = cfg.ray_timeout_s
    generators = scorers = learners = None
    if "generator" in roles:
        generators = _generator_group(cfg, model_path, env)
        started.append(generators)
    if "reward" in roles:
        scorers = ActorGroup(
            "reward",
            RewardActor,
            a.num_reward_workers,
            {"num_cpus": a.reward_cpus, "num_gpus": a.reward_gpus, "runtime_env": env},
            lambda i: ((cfg.objectives,), {}),
            timeout,
        )
        started.append(scorers)
    if "learner" in roles:
        # Data-parallel ranks meet at learner 0, which is pinned to this (the driver's) node so the
        # rendezvous address and port picked here are the right ones.
        address, port = ray.util.get_node_ip_address(), free_port()
        here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
        learners = ActorGroup(
            "learner",
            LearnerActor,
            a.num_learners,
            {"num_cpus": a.learner_cpus, "num_gpus": a.learner_gpus, "runtime_env": env},
            lambda i: ((cfg, model_path), {"rank": i, "world_size": a.num_learners, "master_addr": address, "master_port": port}),
            timeout,
            first_actor_options={"scheduling_strategy": here} if a.num_learners > 1 else None,
        )
        started.append(learners)
    # Construction errors (bad model path, OOM) surface here, named by role, not at step 1.
    for group in (generators, scorers, learners):
        if group is not None:
            group.call("ping")
    return generators, scorers, learners


def _generator_group(cfg: RunConfig, model_path: str, env: dict):
    from actors.ray_actors import ActorGroup, GeneratorActor

    a = cfg.actors
    return ActorGroup(
        "generator",
        GeneratorActor,
        a.num_generators,
        {"num_cpus": a.generator_cpus, "num_gpus": a.generator_gpus * a.tensor_parallel_size, "runtime_env": env},
        lambda i: (
            (model_path,),
            {
                "seed": cfg.seed + i,
                "dtype": cfg.model.dtype,
                "max_model_len": cfg.model.max_prompt_tokens + cfg.rollout.max_new_tokens,
                "tensor_parallel_size": a.tensor_parallel_size,
                "gpu_memory_utilization": a.gpu_memory_utilization,
                "cpu_kvcache_gb": a.cpu_kvcache_gb,
            },
        ),
        cfg.ray_timeout_s,
    )


def _render(tokenizer, prompt: str, names: list[str], weights: np.ndarray, cfg: RunConfig) -> list[int]:
    ids = render_prompt_ids(tokenizer, condition_messages(prompt, names, weights, cfg.conditioning.style, cfg.conditioning.decimals))
    if len(ids) > cfg.model.max_prompt_tokens:
        raise ConfigError(
            f"prompt {prompt[:60]!r} is {len(ids)} tokens after conditioning, over model.max_prompt_tokens={cfg.model.max_prompt_tokens}"
        )
    return ids


def _relabel_weights(cfg: RunConfig, sampler: DirichletSampler | FixedWeights, weights: np.ndarray) -> list[np.ndarray]:
    count = cfg.algorithm.relabel_weights
    if count == 0:
        return []
    if cfg.algorithm.relabel_source == "neglected_corner":
        return neglected_corners(weights, count)
    return [round_weights(sampler.sample(len(weights)), cfg.conditioning.decimals) for _ in range(count)]


def _chunks(n: int, parts: int) -> list[slice]:
    """`parts` contiguous slices covering range(n), sizes differing by at most one."""
    bounds = np.linspace(0, n, parts + 1).round().astype(int)
    return [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


def _step_seeds(cfg: RunConfig, step: int, count: int) -> list[int]:
    # Per-prompt seeds depend only on (seed, step, prompt): the same completions whatever the
    # number of generators, and again after a resume.
    return [int(np.random.SeedSequence([cfg.seed, step, i]).generate_state(1)[0]) for i in range(count)]


def _generate(cfg: RunConfig, generators, prompt_ids: list[list[int]], seeds: list[int], n: int, step: int | None) -> list[list[dict]]:
    r = cfg.rollout
    parts = [s for s in _chunks(len(prompt_ids), len(generators)) if s.stop > s.start]
    args = [(prompt_ids[s], n, r.temperature, r.top_p, r.max_new_tokens, seeds[s]) for s in parts]
    out: list[list[dict]] = []
    for chunk in generators.call_each("generate", args, step=step):
        out += chunk
    return out


def _score(cfg: RunConfig, scorers, prompts: list[str], samples: list[list[dict]], n: int, step: int | None) -> np.ndarray:
    flat_prompts = [p for p, group in zip(prompts, samples) for _ in group]
    flat_texts = [s["text"] for group in samples for s in group]
    # vLLM says "stop" for EOS or a stop string, "length" when the token cap cut the answer off.
    flat_finished = [s["finish_reason"] == "stop" for group in samples for s in group]
    parts = [s for s in _chunks(len(flat_texts), len(scorers)) if s.stop > s.start]
    scores = scorers.call_each("score", [(flat_prompts[s], flat_texts[s], flat_finished[s]) for s in parts], step=step)
    stacked = np.concatenate(scores, axis=0)
    return check_rewards(stacked.reshape(len(prompts), n, -1), len(prompts), n, cfg.objective_names)


def _learn(cfg: RunConfig, learners, prompt_ids, samples, pairs, step: int) -> dict[str, float]:
    if not pairs:
        log.warning("step %d: every candidate pair was a tie; no learner update", step)
        return {}
    total_weight = float(sum(p.loss_weight for p in pairs))
    shards = []
    for s in _chunks(len(pairs), len(learners)):
        part = pairs[s]
        shards.append(
            (
                {
                    "prompt_ids": [prompt_ids[p.prompt] for p in part],
                    # Relabelled pairs (prompt index j * B + b) train on sample group b.
                    "chosen_ids": [samples[p.prompt % len(samples)][p.chosen]["token_ids"] for p in part],
                    "rejected_ids": [samples[p.prompt % len(samples)][p.rejected]["token_ids"] for p in part],
                    "loss_weights": [p.loss_weight for p in part],
                    "total_weight": total_weight,
                },
            )
        )
    return _merge_rank_metrics(learners.call_each("train_step", shards, step=step))


def _merge_rank_metrics(per_rank: list[dict[str, float]]) -> dict[str, float]:
    """Step metrics from the data-parallel ranks' sums: the loss is sum_i w_i l_i / sum_i w_i over
    all ranks' pairs; per-pair means divide the ranks' sums by the total pair count."""
    pairs = sum(m["pairs"] for m in per_rank)
    per_pair = max(pairs, 1)
    first = per_rank[0]
    return {
        "loss": sum(m["objective"] for m in per_rank),
        "chosen_reward": sum(m["chosen_reward_sum"] for m in per_rank) / per_pair,
        "rejected_reward": sum(m["rejected_reward_sum"] for m in per_rank) / per_pair,
        "margin": sum(m["margin_sum"] for m in per_rank) / per_pair,
        "accuracy": sum(m["accuracy_sum"] for m in per_rank) / per_pair,
        "kl": sum(m["kl_sum"] for m in per_rank) / (2 * per_pair),
        "grad_norm": first["grad_norm"],
        "lr": first["lr"],
        "learner_step": first["step"],
        "time/learner_compute_s": max(m["seconds"] for m in per_rank),
        # The algorithm's own figures (MOPO's multipliers) are the same on every rank.
        **{k: v for k, v in first.items() if k.startswith("mopo/")},
    }


def _sync_weights(cfg: RunConfig, learners, generators, version: int, step: int) -> dict[str, float]:
    if cfg.sync.backend == "broadcast":
        from actors.ray_actors import broadcast_sync

        # The collective's own timeout below the Ray one: a dead peer is then reported as the cause.
        return broadcast_sync(learners, generators, cfg.sync.bucket_mb, version, step, timeout_s=0.8 * cfg.ray_timeout_s)
    t = time.perf_counter()
    refs = learners.wait([learners.actors[0].export_weight_refs.remote(cfg.sync.bucket_mb)], "export_weight_refs", step)[0]
    exported = time.perf_counter() - t
    loaded = generators.call("load_weight_refs", refs, version, cfg.ray_timeout_s, step=step)
    return {"time/sync_export_s": exported, "sync/buckets": len(refs), "sync/bytes": loaded[0].get("bytes", 0)}


def _step_metrics(names, raw, samples, selection, learn, timings, version) -> dict[str, float]:
    metrics: dict[str, float] = {f"reward/{n}": float(raw[:, :, k].mean()) for k, n in enumerate(names)}
    tokens = sum(len(s["token_ids"]) for group in samples for s in group)
    metrics.update(
        {
            "version": version,
            "pairs": len(selection.pairs),
            "dropped_ties": selection.dropped_ties,
            "dropped_zero_weight": selection.dropped_zero_weight,
            "tokens_generated": tokens,
            "tokens_per_s": tokens / max(timings["time/generate_s"], 1e-9),
            "pairs_per_s": len(selection.pairs) / max(timings["time/step_s"], 1e-9),
            "completion_tokens_mean": tokens / max(1, sum(len(g) for g in samples)),
        }
    )
    metrics.update(timings)
    metrics.update({k: float(v) for k, v in learn.items()})
    return metrics


def _checkpoint(cfg: RunConfig, run_dir: Path, learners, state: LoopState) -> None:
    staging = staging_dir(run_dir, state.step)
    learners.call("save_checkpoint", str(staging / "learner"), step=state.step)
    final = publish(staging, state.step, state.state_dict(), cfg.checkpoint.keep_last)
    log.info("checkpoint %s", final)


def _export(cfg: RunConfig, learners, dest: Path, step: int) -> str:
    from moalign.export import PolicyCard

    card = PolicyCard.from_run(cfg, step).model_dump()
    learners.call("export_policy", str(dest), card, step=step)
    return str(dest)


def _progress(cfg: RunConfig, start: int):
    from tqdm import tqdm

    return tqdm(total=cfg.steps, initial=start, desc="mo-odpo", unit="step", disable=not cfg.logging.progress_bar, file=sys.stderr)


def _setup_logging(cfg: RunConfig) -> None:
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=cfg.logging.level, format=fmt, force=True)
    handler = logging.FileHandler(run_dir / "orchestrator.log")
    handler.setFormatter(logging.Formatter(fmt))
    logging.getLogger().addHandler(handler)


def _report(summary: dict[str, Any]) -> None:
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML preset (see configs/); defaults apply when omitted")
    parser.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local cluster)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. rollout.prompts_per_step=16")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        logging.basicConfig(format="%(levelname)s: %(message)s")
        log.error("%s", exc)
        return 2
    _setup_logging(cfg)
    import offline
    from actors.ray_actors import ActorFailure

    try:
        summary = offline.run(cfg, args.address) if cfg.is_offline else run(cfg, args.address)
    except (ConfigError, DataError, FileNotFoundError) as exc:
        log.error("%s", exc)
        return 2
    except (ActorFailure, RewardError):
        # Already logged with its step; the traceback adds nothing for the user.
        return 1
    offline.report(summary) if cfg.is_offline else _report(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
