"""Where step metrics go: metrics.jsonl in the run directory, TensorBoard event files, and
`ray.util.metrics` gauges that the Ray dashboard's Prometheus endpoint exports as `ray_moalign_*`
(tagged with the run; rewards and steerability with the objective, phase times with the phase),
which the Grafana dashboard in deploy/grafana/ charts. Each actor also exports, from its own
process, how long its calls take, tagged with its role and index (`record_actor_call`)."""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def _metric_name(key: str) -> str:
    return "moalign_" + re.sub(r"[^a-zA-Z0-9_]", "_", key).lower()


# Step metrics whose key names an objective or a phase become one gauge with that as a tag, so a
# dashboard panel shows every objective (or phase) from one query.
_FAMILIES = (
    ("reward/", "moalign_reward", "objective", "Mean raw reward of the step's samples"),
    ("eval/steerability/", "moalign_eval_steerability", "objective", "Spearman of weight against reward on held-out prompts"),
    ("actors/", "moalign_actors", "role", "Actors of a role serving the run at the step (generators and reward workers scale live)"),
    (
        "time/",
        "moalign_time_seconds",
        "phase",
        "Seconds the step spent in a phase (step: all of it; generation overlapped with learning is hidden)",
    ),
)
DESCRIPTIONS = {
    "moalign_loss": "Learner loss of the step (the algorithm's objective, weighted mean over pairs)",
    "moalign_margin": "Mean DPO margin, beta * (chosen - rejected) log-ratio",
    "moalign_accuracy": "Share of pairs whose chosen completion has the larger implicit reward",
    "moalign_kl": "Estimated KL of the policy from the reference on the step's completions",
    "moalign_pairs": "Chosen/rejected pairs the learner trained on this step",
    "moalign_pairs_per_s": "Pairs per second of step time",
    "moalign_tokens_per_s": "Completion tokens generated per second of step time",
    "moalign_version": "Policy version the generators hold (one per weight sync)",
    "moalign_staleness": "Learner steps between the policy that sampled and the one trained",
    "moalign_actor_restarts": "Generator and reward actor restarts and learner group restarts, over the run",
    "moalign_sync_bytes": "Bytes one weight sync sent",
    "moalign_sync_bytes_fraction": "Bytes one weight sync sent, as a share of the full model",
    "moalign_eval_hypervolume": "Hypervolume of the held-out front against the reference point",
    "moalign_eval_kl_max": "Largest KL to the reference over the held-out lattice's weight vectors (nats per answer)",
}


ACTOR_CALL_METRIC = "moalign_actor_call_seconds"
_ACTOR_NAME = re.compile(r"moalign-([a-z]+)-(\d+)-[0-9a-f]+")
_actor_gauge: list[Any] = []


def record_actor_call(call: str, seconds: float) -> None:
    """In an actor of a run with Ray metrics on: the seconds of its last `call`, as a gauge tagged
    with the run, the actor's role and index (read from its name, `moalign-<role>-<index>-…`) and
    the call, so a slow or idle generator, reward worker or learner rank shows on its own."""
    if os.environ.get("MOALIGN_RAY_METRICS") != "1":
        return
    import ray

    match = _ACTOR_NAME.fullmatch(ray.get_runtime_context().get_actor_name() or "")
    if match is None:
        return
    if not _actor_gauge:
        from ray.util.metrics import Gauge

        description = "Seconds an actor's last call of a kind took, per role, actor index and call"
        _actor_gauge.append(Gauge(ACTOR_CALL_METRIC, description=description, tag_keys=("run", "role", "actor", "call")))
    tags = {"run": os.environ.get("MOALIGN_RUN", ""), "role": match[1], "actor": match[2], "call": call}
    _actor_gauge[0].set(seconds, tags=tags)


def metric_spec(key: str) -> tuple[str, dict[str, str], str]:
    """A step metric's Prometheus name (before Ray's `ray_` prefix), its tags besides `run`, and description."""
    for prefix, name, tag, description in _FAMILIES:
        if key.startswith(prefix):
            value = key[len(prefix) :]
            return name, {tag: value.removesuffix("_s") if tag == "phase" else value}, f"{description}, per {tag}"
    name = _metric_name(key)
    return name, {}, DESCRIPTIONS.get(name, f"moalign step metric {key!r} (see metrics.jsonl)")


class MetricsSink:
    def __init__(self, run_dir: Path, run_name: str, tensorboard: bool, ray_metrics: bool, resume_step: int = 0):
        self.path = run_dir / "metrics.jsonl"
        self.run_name = run_name
        self.tensorboard_dir = run_dir / "tensorboard" if tensorboard else None
        self.writer = None
        self.ray_metrics = ray_metrics
        self._gauges: dict[str, Any] = {}
        self.rewind(resume_step)

    def rewind(self, step: int) -> None:
        """Drop the records of steps after `step`: they were never checkpointed and will be
        trained again, so the history reads like one uninterrupted run."""
        kept = [m for m in read_metrics(self.path.parent) if m["step"] <= step]
        self.path.write_text("".join(json.dumps(m) + "\n" for m in kept))
        if self.tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            if self.writer is not None:
                self.writer.close()
            self.writer = SummaryWriter(log_dir=str(self.tensorboard_dir), purge_step=step + 1 if step else None)

    def _gauge(self, name: str, tags: dict[str, str], description: str):
        if name not in self._gauges:
            from ray.util.metrics import Gauge

            self._gauges[name] = Gauge(name, description=description, tag_keys=("run", *tags))
        return self._gauges[name]

    def log(self, step: int, metrics: dict[str, float]) -> None:
        with open(self.path, "a") as fh:
            fh.write(json.dumps({"step": step, **metrics}) + "\n")
        for key, value in metrics.items():
            if self.writer is not None:
                self.writer.add_scalar(key, value, step)
            if self.ray_metrics:
                name, tags, description = metric_spec(key)
                self._gauge(name, tags, description).set(float(value), tags={"run": self.run_name, **tags})
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
