"""What every loop does before its first step and around it: the run directory (checked against
a checkpoint it holds), Ray, the starting model and its tokenizer, the log file and the progress bar."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from actors.cluster import start_ray
from moalign.checkpoint import latest_sound_checkpoint, own_run_dir
from moalign.config import RunConfig, check_resume_config, save_resolved

log = logging.getLogger(__name__)


def open_run(cfg: RunConfig, ray_address: str | None) -> tuple[Path, Path | None, str, Any]:
    """The run directory (with the resolved config saved, after checking that a resumed run trains
    the same problem), its latest checkpoint or None, Ray, the model's local path and tokenizer."""
    from transformers import AutoTokenizer

    from moalign.models import starting_model

    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    own_run_dir(run_dir)
    resume_from = latest_sound_checkpoint(run_dir)
    if resume_from is not None:
        check_resume_config(cfg, run_dir / "config.yaml")
    save_resolved(cfg, run_dir / "config.yaml")
    warn_if_only_warm_start(cfg)
    start_ray(cfg.actors, ray_address)
    model_path = str(starting_model(cfg, run_dir))
    return run_dir, resume_from, model_path, AutoTokenizer.from_pretrained(model_path)


def warn_if_only_warm_start(cfg: RunConfig) -> None:
    # A supervised warm start (hindsight labels) is allowed on its own, to measure it, but is easy to
    # run by mistake when shortening a run. Stop decisions are DPO pairs themselves: a run of them
    # alone is a recipe (configs/steer_length_dial_cpu.yaml), not a slip.
    if cfg.algorithm.warm_start_steps >= cfg.steps and cfg.algorithm.warm_start_pairs == "labels":
        log.warning(
            "steps: %d is not above algorithm.warm_start_steps (%d): every step is a supervised warm-start step, none is a DPO step",
            cfg.steps,
            cfg.algorithm.warm_start_steps,
        )


def setup_logging(cfg: RunConfig) -> None:
    """Log at logging.level to stderr and to RUN_DIR/orchestrator.log (the name every training
    run's log has had, online or offline)."""
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=cfg.logging.level, format=fmt, force=True)
    handler = logging.FileHandler(run_dir / "orchestrator.log")
    handler.setFormatter(logging.Formatter(fmt))
    logging.getLogger().addHandler(handler)


def progress_bar(cfg: RunConfig, start: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=cfg.steps, initial=start, desc=desc, unit="step", disable=not cfg.logging.progress_bar, file=sys.stderr)
