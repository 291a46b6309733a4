"""Where step metrics go: metrics.jsonl in the run directory, TensorBoard event files, and
`ray.util.metrics` gauges that the Ray dashboard's Prometheus endpoint exports as `ray_moalign_*`."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def _metric_name(key: str) -> str:
    return "moalign_" + re.sub(r"[^a-zA-Z0-9_]", "_", key).lower()


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

    def _gauge(self, key: str):
        if key not in self._gauges:
            from ray.util.metrics import Gauge

            self._gauges[key] = Gauge(_metric_name(key), description=f"moalign {key}", tag_keys=("run",))
        return self._gauges[key]

    def log(self, step: int, metrics: dict[str, float]) -> None:
        with open(self.path, "a") as fh:
            fh.write(json.dumps({"step": step, **metrics}) + "\n")
        for key, value in metrics.items():
            if self.writer is not None:
                self.writer.add_scalar(key, value, step)
            if self.ray_metrics:
                self._gauge(key).set(float(value), tags={"run": self.run_name})
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
