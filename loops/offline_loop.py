"""The offline loop: MODPO and MOPO on a fixed preference set, on the same learner actors as
MO-ODPO (its command line is `offline.py`).

Before step 1: read and check every row of `offline.path` (a bad row stops the run here, named by
file and line), tokenise, apply `offline.too_long`, and build the training examples:
- MODPO (seed 000) for objective k at weights w: the rows k judged, chosen/rejected by k's label,
  each response carrying the other objectives' rewards (z-scored over the data) as the margin.
- MOPO (seeds 002/003): every row, both responses, a label per objective.
One step: the next `offline.pairs_per_step` examples (a seeded, resumable order, epoch after
epoch) -> one learner step. Checkpoints, resume, metrics and the export of the last policy to
RUN_DIR/final work as for MO-ODPO. A MODPO sweep (`algorithm.modpo.sweep_divisions`) trains one
policy per simplex-lattice weight vector, each a run of its own in RUN_DIR/w_<weights>.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from actors.calls import chunks, export_policy, merge_rank_metrics, save_checkpoint
from actors.cluster import actor_groups
from actors.metrics import MetricsSink, read_metrics
from actors.ray_actors import ActorFailure
from loops.run_setup import open_run, progress_bar
from moalign.actor_io import PairBatch
from moalign.checkpoint import latest_checkpoint, read_state, write_json
from moalign.config import ConfigError, RunConfig, save_resolved
from moalign.data import PromptCursor
from moalign.objectives import OBJECTIVES
from moalign.pairs import check_rewards
from moalign.pareto import simplex_lattice
from moalign.pareto_report import weights_label
from moalign.preferences import EncodedRow, encode_rows, load_preferences, modpo_pairs, mopo_labels, normalized_rewards

log = logging.getLogger("moalign.offline")

REWARD_CACHE = "margin_rewards.npz"


@dataclass
class OfflineState:
    """What a resumed offline run needs besides the learner: the data order and the step."""

    cursor: PromptCursor
    step: int = 0

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "cursor": self.cursor.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = state["step"]
        self.cursor.load_state_dict(state["cursor"])


def run(cfg: RunConfig, ray_address: str | None = None) -> dict[str, Any]:
    """Train cfg's offline algorithm (one MODPO weight vector, a MODPO sweep, or MOPO)."""
    if cfg.algorithm.name == "modpo" and cfg.algorithm.modpo.sweep_divisions:
        return run_sweep(cfg, ray_address)
    return train(cfg, ray_address)


def train(cfg: RunConfig, ray_address: str | None = None, reward_cache: Path | None = None) -> dict[str, Any]:
    """One offline policy for cfg.steps steps (resuming from cfg.run_dir if it holds a checkpoint)."""
    run_dir, resume_from, model_path, tokenizer = open_run(cfg, ray_address)
    # Every row is read and checked before any actor starts.
    o, names = cfg.offline, cfg.objective_names
    rows, report = load_preferences(o.path, names, o.response_fields, o.label_fields)
    encoded = encode_rows(rows, tokenizer, cfg.model.max_prompt_tokens, o.max_response_tokens, o.too_long, report)
    with actor_groups(cfg, model_path, roles=("learner",)) as (_, _, learners):
        # Margins may need the learner (implicit rewards), so the examples are built here.
        examples, left_out = _examples(cfg, encoded, reward_cache or run_dir / REWARD_CACHE, learners)
        log.info(
            "%s: %s; %d examples (%d rows left out: %s)", o.path, "; ".join(report.lines()), len(examples), left_out, _left_out_reason(cfg)
        )
        write_json(run_dir / "data_report.json", {**report.__dict__, "examples": len(examples), "left_out": left_out})
        state = OfflineState(PromptCursor(len(examples), seed=cfg.seed, shuffle=cfg.data.shuffle))
        if resume_from is not None:
            state.load_state_dict(read_state(resume_from))
            learners.call("load_checkpoint", str(resume_from / "learner"), step=state.step)
            log.info("resumed from %s at step %d", resume_from, state.step)
        sink = MetricsSink(run_dir, run_dir.name, cfg.logging.tensorboard, cfg.logging.ray_metrics, resume_step=state.step)
        progress = progress_bar(cfg, state.step, cfg.algorithm.name)
        try:
            for step in range(state.step + 1, cfg.steps + 1):
                t0 = time.perf_counter()
                batch = [examples[i] for i in state.cursor.next(o.pairs_per_step)]
                shards = [(_batch(batch[s], len(batch)),) for s in chunks(len(batch), len(learners))]
                metrics = merge_rank_metrics(learners.call_each("train_step", shards, step=step), OBJECTIVES[cfg.algorithm.name])
                state.step = step
                metrics.update({"pairs": len(batch), "epoch": state.cursor.epoch, "time/step_s": time.perf_counter() - t0})
                sink.log(step, metrics)
                progress.update(1)
                progress.set_postfix(loss=f"{metrics['loss']:.3f}")
                if step % cfg.checkpoint.every_steps == 0 or step == cfg.steps:
                    save_checkpoint(run_dir, learners, state, cfg.checkpoint.keep_last)
        except ActorFailure as exc:
            log.error("step %d failed and was not checkpointed; a resume repeats it from the last checkpoint: %s", state.step + 1, exc)
            raise
        finally:
            progress.close()
            sink.close()
        exported = export_policy(cfg, learners, run_dir / "final", state.step)

    history = read_metrics(run_dir)
    window = max(1, len(history) // 4)
    return {
        "run_dir": str(run_dir),
        "algorithm": cfg.algorithm.name,
        "weights": cfg.algorithm.modpo.weights if cfg.algorithm.name == "modpo" else None,
        "steps": state.step,
        "examples": len(examples),
        "data": report.__dict__,
        "loss_start": float(np.mean([h["loss"] for h in history[:window]])) if history else None,
        "loss_end": float(np.mean([h["loss"] for h in history[-window:]])) if history else None,
        "history": history,
        "checkpoint": str(latest_checkpoint(run_dir)),
        "export": exported,
    }


def run_sweep(cfg: RunConfig, ray_address: str | None = None) -> dict[str, Any]:
    """One MODPO policy per lattice weight vector (weight > 0 on the trained objective), one after
    another, each in RUN_DIR/w_<weights>; the margin rewards are scored once for all of them."""
    root = Path(cfg.run_dir)
    root.mkdir(parents=True, exist_ok=True)
    save_resolved(cfg, root / "config.yaml")
    members = [_member(cfg, w) for w in sweep_weights(cfg)]
    log.info("MODPO sweep: %d weight vectors: %s", len(members), ", ".join(weights_label(m.algorithm.modpo.weights) for m in members))
    summaries = [train(member, ray_address, reward_cache=root / REWARD_CACHE) for member in members]
    return {"run_dir": str(root), "algorithm": "modpo", "sweep": [{k: v for k, v in s.items() if k != "history"} for s in summaries]}


def sweep_weights(cfg: RunConfig) -> list[list[float]]:
    m = cfg.algorithm.modpo
    lattice = simplex_lattice(len(cfg.objectives), m.sweep_divisions)
    return [[float(v) for v in w] for w in lattice if w[m.objective] > 0]


def sweep_members(cfg: RunConfig) -> list[RunConfig]:
    """The run configs of a sweep's policies (or [cfg] for a single offline run)."""
    if cfg.algorithm.name == "modpo" and cfg.algorithm.modpo.sweep_divisions:
        return [_member(cfg, w) for w in sweep_weights(cfg)]
    return [cfg]


def _member(cfg: RunConfig, weights: list[float]) -> RunConfig:
    tree = cfg.model_dump(mode="json")
    tree["run_dir"] = str(Path(cfg.run_dir) / ("w_" + "_".join(f"{v:.2f}" for v in weights)))
    tree["algorithm"]["modpo"].update(weights=weights, sweep_divisions=0)
    return RunConfig.model_validate(tree)


def _left_out_reason(cfg: RunConfig) -> str:
    if cfg.algorithm.name == "modpo":
        return f"a tie or no label on {cfg.objective_names[cfg.algorithm.modpo.objective]!r}"
    return "none: MOPO trains on every row"


def _examples(cfg: RunConfig, encoded: list[EncodedRow], reward_cache: Path, learners) -> tuple[list[dict[str, Any]], int]:
    if cfg.algorithm.name == "mopo":
        return [
            {"prompt_ids": e.prompt_ids, "chosen_ids": e.response_ids[0], "rejected_ids": e.response_ids[1], "labels": mopo_labels(e.row)}
            for e in encoded
        ], 0
    k = cfg.algorithm.modpo.objective
    others = [j for j in range(len(cfg.objectives)) if j != k]
    pairs, left_out = modpo_pairs(encoded, k)
    z = normalized_rewards(_margin_rewards(cfg, encoded, others, reward_cache, learners))
    examples = []
    for i, preferred in pairs:
        e = encoded[i]
        examples.append(
            {
                "prompt_ids": e.prompt_ids,
                "chosen_ids": e.response_ids[preferred],
                "rejected_ids": e.response_ids[1 - preferred],
                "margin_chosen": [float(z[i, preferred, j]) for j in others],
                "margin_rejected": [float(z[i, 1 - preferred, j]) for j in others],
            }
        )
    if not examples:
        raise ConfigError(f"MODPO: no row has a 0/1 label on {cfg.objective_names[k]!r}; nothing to train on")
    return examples, left_out


def _margin_rewards(cfg: RunConfig, encoded: list[EncodedRow], others: list[int], cache: Path, learners) -> np.ndarray:
    """Raw rewards [rows, 2, K] of the margin objectives (NaN on the trained one). Explicit: the
    rows' cached values where every row has them, else the reward sources; implicit: each
    objective's adapter. Whatever is scored here is scored once and kept in `cache`."""
    out = np.full((len(encoded), 2, len(cfg.objectives)), np.nan)
    implicit = cfg.algorithm.modpo.margin_rewards == "implicit"
    to_score = others if implicit else [j for j in others if any(e.row.rewards[j] is None for e in encoded)]
    for j in set(others) - set(to_score):
        out[:, :, j] = [e.row.rewards[j] for e in encoded]
    if not to_score:
        return out
    key = _cache_key(cfg, encoded, to_score)
    if cache.is_file():
        with np.load(cache) as saved:
            if str(saved["key"]) == key:
                log.info("margin rewards: reusing %s", cache)
                out[:, :, to_score] = saved["rewards"][:, :, to_score]
                return out
    started = time.perf_counter()
    scored = _implicit_rewards(cfg, encoded, to_score, learners) if implicit else _score_responses(cfg, encoded)
    log.info(
        "margin rewards: scored %d responses (%s) in %.1fs",
        2 * len(encoded),
        "implicit" if implicit else "explicit",
        time.perf_counter() - started,
    )
    tmp = cache.with_name(cache.name + ".tmp.npz")
    np.savez(tmp, key=key, rewards=scored)
    tmp.replace(cache)
    out[:, :, to_score] = scored[:, :, to_score]
    return out


def _cache_key(cfg: RunConfig, encoded: list[EncodedRow], scored: list[int]) -> str:
    m = cfg.algorithm.modpo
    h = hashlib.sha256()
    h.update(json.dumps([cfg.objectives[j].model_dump(mode="json") for j in scored]).encode())
    if m.margin_rewards == "implicit":
        for j in scored:
            adapter = Path(m.margin_adapters[cfg.objective_names[j]]) / "adapter_model.safetensors"
            h.update(json.dumps([str(adapter.resolve()), adapter.stat().st_mtime_ns if adapter.exists() else None, m.margin_beta]).encode())
    for e in encoded:
        h.update(json.dumps([e.row.id, e.row.prompt_text, *e.row.responses]).encode())
    return h.hexdigest()


def _score_responses(cfg: RunConfig, encoded: list[EncodedRow]) -> np.ndarray:
    """Every response scored by every objective's source on its (last-turn) prompt, on the reward actors."""
    prompts = [e.row.prompt_text for e in encoded for _ in range(2)]
    texts = [t for e in encoded for t in e.row.responses]
    finished = [f for e in encoded for f in e.row.finished]
    with actor_groups(cfg, "", roles=("reward",)) as (_, scorers, _):
        parts = [s for s in chunks(len(texts), len(scorers)) if s.stop > s.start]
        scores = scorers.call_each("score", [(prompts[s], texts[s], finished[s]) for s in parts])
    return check_rewards(np.concatenate(scores, axis=0).reshape(len(encoded), 2, -1), len(encoded), 2, cfg.objective_names)


def _implicit_rewards(cfg: RunConfig, encoded: list[EncodedRow], objectives: list[int], learners) -> np.ndarray:
    """beta * (log pi_j - log pi_ref) of every response under objective j's adapter, on learner 0."""
    m = cfg.algorithm.modpo
    prompts = [e.prompt_ids for e in encoded for _ in range(2)]
    completions = [r for e in encoded for r in e.response_ids]
    out = np.full((len(encoded), 2, len(cfg.objectives)), np.nan)
    for j in objectives:
        adapter = m.margin_adapters[cfg.objective_names[j]]
        ref = learners.actors[0].adapter_logprobs.remote(adapter, prompts, completions)
        logps = learners.wait([ref], "adapter_logprobs", None)[0]
        out[:, :, j] = m.margin_beta * (np.asarray(logps["adapter"]) - np.asarray(logps["base"])).reshape(len(encoded), 2)
    return out


def _batch(examples: list[dict[str, Any]], total: int) -> PairBatch:
    """A learner rank's batch of examples (every pair weighs 1; `total`: the step's pairs on all ranks)."""
    batch: PairBatch = {key: [e[key] for e in examples] for key in examples[0]}
    batch["loss_weights"] = [1.0] * len(examples)
    batch["total_weight"] = float(total)
    return batch


def report(summary: dict[str, Any]) -> None:
    """The closing lines of an offline run or sweep."""
    for s in summary.get("sweep", [summary]):
        weights = f" at weights {s['weights']}" if s.get("weights") else ""
        log.info(
            "%s%s: %d steps on %d examples, loss %.4f -> %.4f; policy %s (serve it: make serve MODEL=%s)",
            s["algorithm"],
            weights,
            s["steps"],
            s["examples"],
            s["loss_start"] if s["loss_start"] is not None else float("nan"),
            s["loss_end"] if s["loss_end"] is not None else float("nan"),
            s["export"],
            s["export"],
        )
    log.info("evaluate on held-out prompts: make eval RUN=%s", summary["run_dir"])
