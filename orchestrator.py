"""moalign orchestrator: the MO-ODPO loop on Ray, top to bottom.

    python orchestrator.py --config configs/default.yaml [key=value ...]
    ray job submit --working-dir . -- python orchestrator.py --config configs/default.yaml

(MODPO and MOPO, the offline algorithms, train with `python offline.py --config ...`; a config
naming one is refused here with that command.)

One step: draw prompts and Dirichlet weights -> write the weights into the prompts -> vLLM
generator actors sample n completions each -> reward actors score them on K objectives ->
normalise, scalarise, pick chosen/rejected -> DeepSpeed learner actors take a DPO step ->
every `sync.every_steps` the learner's weights go to the generators. A run directory that
already holds a checkpoint is resumed. The machinery under each step is `loops.online_loop`;
the calls on the actors are `actors.calls`.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Any

from actors.calls import export_policy, save_checkpoint, score
from actors.cluster import actor_groups
from actors.metrics import MetricsSink, read_metrics
from actors.ray_actors import ActorFailure
from actors.weight_sync import make_weight_sync
from loops.online_loop import (
    apply_scale_requests,
    check_same_prompts,
    check_supported,
    draw_rollout,
    kl_probes,
    learn,
    report,
    restart_learners,
    start_state,
    step_metrics,
    step_seeds,
    summarize,
    training_lines,
)
from loops.pareto_eval import TrainingEvaluation
from loops.run_setup import open_run, progress_bar, setup_logging
from moalign.checkpoint import CheckpointError, RunDirInUse, file_sha256, latest_checkpoint, read_state
from moalign.conditioning import render_conditioned
from moalign.config import ConfigError, RunConfig, load_config
from moalign.data import DataError, load_fitted_prompts
from moalign.ledger import PromptLedger
from moalign.pairs import RewardError, normalized_rewards, select_line_answers, select_relabelled_pairs, select_stop_decisions
from moalign.prefixes import newline_token, with_line_break_variants, with_sentence_prefixes

log = logging.getLogger("moalign")


def run(cfg: RunConfig, ray_address: str | None = None) -> dict[str, Any]:
    """Train for cfg.steps (resuming from cfg.run_dir if it holds a checkpoint); returns a summary."""
    check_supported(cfg)
    run_dir, resume_from, model_path, tokenizer = open_run(cfg, ray_address)
    if cfg.algorithm.sentence_prefixes and tokenizer.eos_token_id is None:
        raise ConfigError(
            f"algorithm.sentence_prefixes: the tokenizer of {model_path} names no end-of-sequence token to close a prefix with"
        )
    try:
        newline_id = newline_token(tokenizer) if cfg.algorithm.line_break_variants else None
    except ValueError as e:
        raise ConfigError(f"algorithm.line_break_variants: the tokenizer of {model_path}: {e}") from e
    prompts = load_fitted_prompts(cfg, cfg.data.train_path, tokenizer, run_dir / "data_report.json")
    prompts_sha256 = file_sha256(cfg.data.train_path)
    saved = read_state(resume_from) if resume_from is not None else None
    if saved is not None:
        check_same_prompts(cfg, saved, prompts_sha256)
    names = cfg.objective_names
    evaluation = TrainingEvaluation(cfg, run_dir, tokenizer)

    # Wiring: three independently sized actor groups, killed when the run ends or fails.
    with actor_groups(cfg, model_path) as actors:
        generators, scorers = actors.generators, actors.scorers
        sync_weights = make_weight_sync(cfg, actors.learners, generators)
        state = start_state(cfg, len(prompts), prompts_sha256, resume_from, saved, actors.learners, sync_weights)
        sink = MetricsSink(run_dir, run_dir.name, cfg.logging.tensorboard, cfg.logging.ray_metrics, resume_step=state.step)
        ledger = PromptLedger(run_dir, state.step, f"restarted; steps after the checkpoint of step {state.step} were never checkpointed")
        progress = progress_bar(cfg, state.step, "mo-odpo")
        learner_restarts = 0
        try:
            evaluation.at_start(generators, scorers, state.step)
            while state.step < cfg.steps:
                step = state.step + 1
                try:
                    timings: dict[str, float] = {}
                    t0 = time.perf_counter()

                    # 0. Generators and reward workers grown or shrunk as asked while the run goes
                    #    on (`python -m moalign.scaling`, `deploy/moalign-job scale`).
                    apply_scale_requests(run_dir, step, state, actors, sync_weights)

                    # 1-3. Prompts, Dirichlet weights, conditioned prompts, sent to the generators for n
                    #      samples each. With max_staleness s > 0 they are sent s steps early, so the
                    #      generators sample step t+s while the learner trains step t.
                    while len(state.rollouts) <= cfg.rollout.max_staleness and state.step + len(state.rollouts) < cfg.steps:
                        state.rollouts.append(draw_rollout(cfg, state, prompts, tokenizer, generators))
                    rollout = state.rollouts.popleft()
                    batch = [prompts[i] for i in rollout.prompt_indices]
                    weights = rollout.weights
                    t = time.perf_counter()
                    samples = rollout.wait()
                    timings["time/generate_s"] = time.perf_counter() - t
                    timings["staleness"] = step - 1 - rollout.policy_step

                    # 4. Rewards on the unconditioned prompt; per-objective normalisation. The candidate
                    #    answers are the samples and, with `algorithm.sentence_prefixes`, some of their
                    #    prefixes cut at a sentence end (after the samples, so indices below n are samples).
                    t = time.perf_counter()
                    candidates = samples
                    seeds = step_seeds(cfg, step, len(samples))
                    if cfg.algorithm.sentence_prefixes:
                        lines = cfg.algorithm.prefix_ends == "sentences_and_lines"
                        candidates = with_sentence_prefixes(
                            samples, tokenizer, cfg.algorithm.sentence_prefixes, tokenizer.eos_token_id, seeds, lines
                        )
                    # ... and, with `algorithm.line_break_variants`, samples with one break flipped
                    # between the same line and a new one (only the warm start trains on them).
                    if newline_id is not None and step <= cfg.algorithm.warm_start_steps:
                        candidates = with_line_break_variants(
                            candidates,
                            len(samples[0]),
                            tokenizer,
                            cfg.algorithm.line_break_variants,
                            tokenizer.eos_token_id,
                            newline_id,
                            seeds,
                        )
                    raw = score(names, scorers, [p.prompt for p in batch], candidates, len(candidates[0]), step)
                    normalized = normalized_rewards(raw, cfg.algorithm.reward_normalization, state.normalizer)
                    timings["time/score_s"] = time.perf_counter() - t

                    # 5. Chosen / rejected by the weighted (normalised) reward, under the sampled weights
                    #    and under `relabel_weights` extra ones, each prompt rendered again under each
                    #    set's weight line. During the warm start instead: each objective's best answer,
                    #    to be trained alone under its corner's line, and with `warm_start_lines:
                    #    drawn_and_corners` the best under each prompt's sampled weights (hindsight labels).
                    #    With `warm_start_pairs: stop_decisions` the warm start trains DPO pairs on
                    #    the decision to stop under the same lines instead of labels. A corner's line
                    #    trains to its own `algorithm.corner_warm_start_steps` where one is set.
                    warm_start = step <= cfg.algorithm.warm_start_steps
                    lines = training_lines(cfg, state.sampler, weights, warm_start, rollout.drawn_weights, step)
                    stop_decisions = warm_start and cfg.algorithm.warm_start_pairs == "stop_decisions"
                    supervised = warm_start and not stop_decisions
                    if stop_decisions:
                        selection = select_stop_decisions(normalized, lines, candidates, cfg.algorithm.stop_decisions_per_line)
                    elif supervised:
                        selection = select_line_answers(normalized, lines)
                    else:
                        selection = select_relabelled_pairs(
                            lines, normalized, cfg.algorithm.pair_mode, cfg.algorithm.relabel_keep, cfg.algorithm.pair_weighting
                        )
                    prompt_ids = [
                        render_conditioned(tokenizer, p.prompt, names, w, cfg.conditioning, cfg.model.max_prompt_tokens)
                        for line in lines
                        for p, w in zip(batch, line)
                    ]

                    # 6. One learner step on the conditioned prompts; its KL estimate is on a few samples
                    #    under the lines they were sampled with (or under the draw,
                    #    `algorithm.kl_sample_weights`).
                    t = time.perf_counter()
                    learner_metrics = learn(
                        cfg,
                        actors.learners,
                        prompt_ids,
                        candidates,
                        selection.pairs,
                        step,
                        supervised,
                        kl_probes(cfg, rollout),
                        stop_decisions,
                        tokenizer.eos_token_id,
                        newline_id,
                    )
                    timings["time/learn_s"] = time.perf_counter() - t

                    # 7. Weight sync; also before every checkpoint so a resumed run's generators hold
                    #    exactly the weights the uninterrupted run's generators held, and before every
                    #    evaluation (eval.every_steps is a multiple of sync.every_steps, so this adds none).
                    checkpoint_due = step % cfg.checkpoint.every_steps == 0 or step == cfg.steps
                    timings["time/sync_s"] = 0.0
                    if step % cfg.sync.every_steps == 0 or checkpoint_due or evaluation.due(step):
                        # The generators finish the rollouts sent ahead first (they are older than
                        # this policy); waiting here keeps that time out of the sync's.
                        t = time.perf_counter()
                        for ahead in state.rollouts:
                            ahead.wait()
                        timings["time/generate_s"] += time.perf_counter() - t
                        state.version += 1
                        state.synced_step = step
                        timings.update(sync_weights(state.version, step))
                    timings["actor_restarts"] = generators.restarts + scorers.restarts + learner_restarts
                    timings.update({f"actors/{group.role}": len(group) for group in actors})

                    # 7b. Pareto evaluation on held-out prompts, on the weights just synced, with the
                    #     KL at each weight vector. Before state.step moves on, so a failure here is
                    #     reported as this step's; its time is left out of time/step_s (it is time/eval_s).
                    due = evaluation.due(step)
                    eval_metrics = evaluation.evaluate(generators, scorers, actors.learners, step) if due else {}
                    t0 += eval_metrics.get("time/eval_s", 0.0)

                    # 8. Metrics, progress, checkpoint.
                    state.step = step
                    timings["time/step_s"] = time.perf_counter() - t0
                    metrics = step_metrics(
                        names, raw[:, : cfg.rollout.samples_per_prompt], samples, selection, learner_metrics, timings, state.version
                    )
                    metrics.update(state.health.update(step, samples, selection, learner_metrics))
                    if due:
                        state.health.judge_front(step, evaluation.latest_front)
                    metrics.update(eval_metrics)
                    sink.log(step, metrics)
                    ledger.record(step, rollout.drawn_from, rollout.prompt_indices)
                    progress.update(1)
                    progress.set_postfix(loss=f"{metrics.get('loss', float('nan')):.3f}", pairs=metrics["pairs"], v=state.version)
                    if checkpoint_due:
                        save_checkpoint(run_dir, actors.learners, state, cfg.checkpoint.keep_last)
                except ActorFailure as exc:
                    # A learner that died or hangs: a fresh learner group goes on from the last
                    # checkpoint, and the steps after it are trained again from the same state.
                    if not (exc.role == "learner" and exc.actor_lost) or learner_restarts >= cfg.actors.max_learner_restarts:
                        raise
                    learner_restarts += 1
                    state, sync_weights, why = restart_learners(cfg, actors, run_dir, len(prompts), prompts_sha256, exc, learner_restarts)
                    sink.rewind(state.step)
                    ledger.rewind(state.step, "learner_restarted", why)
                    progress.n = state.step
                    progress.refresh()
        except (ActorFailure, RewardError) as exc:
            log.error("step %d failed and was not checkpointed; a resume repeats it from the last checkpoint: %s", state.step + 1, exc)
            raise
        finally:
            progress.close()
            sink.close()

        # 9. The last policy as folders that transformers, PEFT and vLLM load (`make serve` serves it).
        exported = export_policy(cfg, actors.learners, run_dir / "final", state.step)

    history = read_metrics(run_dir)
    steerability = evaluation.closing_table()
    if steerability:
        log.info("steerability on held-out prompts, base vs trained (RUN_DIR/eval):\n%s", steerability)
    return {
        "run_dir": str(run_dir),
        "steps": state.step,
        "version": state.version,
        "learner_restarts": learner_restarts,
        **summarize(history, names, state.health),
        "history": history,
        "checkpoint": str(latest_checkpoint(run_dir)),
        "export": exported,
        "steerability_table": steerability,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML preset (see configs/); defaults apply when omitted")
    parser.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local cluster)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. rollout.prompts_per_step=16")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        check_supported(cfg, args.config)
    except ConfigError as exc:
        logging.basicConfig(format="%(levelname)s: %(message)s")
        log.error("%s", exc)
        return 2
    setup_logging(cfg)
    try:
        summary = run(cfg, args.address)
    except (ConfigError, DataError, FileNotFoundError, RunDirInUse) as exc:
        log.error("%s", exc)
        return 2
    except (ActorFailure, RewardError):
        # Already logged with its step; the traceback adds nothing for the user.
        return 1
    except CheckpointError as exc:
        log.error("%s", exc)
        return 1
    report(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
