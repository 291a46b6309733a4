"""A kept checkpoint exported as the folders other tools load (`moalign.export_folder`): read by
the project's own learner in this process (no Ray), so LoRA is merged exactly as weight sync
merges it; a ZeRO-3 checkpoint of several learners by as many learner processes on this machine,
which gather it together. `export.py` is its command line; a run's last policy is exported by
the run itself (`actors.calls.export_policy`), each learner writing through
`actors.learner_weights.WeightPublisher.export_policy`.
"""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

from actors.learner import Learner
from moalign.checkpoint import list_checkpoints, read_state
from moalign.config import load_config
from moalign.export_folder import PolicyCard
from moalign.models import starting_model
from moalign.weight_transport import free_port


def export_checkpoint(run_dir: str | Path, step: int | None = None, dest: str | Path | None = None) -> Path:
    """Export the checkpoint of `step` (default: the latest) of `run_dir`; returns the folder."""
    run_dir = Path(run_dir)
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise FileNotFoundError(f"{run_dir}: no config.yaml; is this a run directory?")
    cfg = load_config(config_path)
    found = dict(list_checkpoints(run_dir))
    if not found:
        raise FileNotFoundError(f"{run_dir}: no checkpoint to export")
    step = max(found) if step is None else step
    if step not in found:
        raise FileNotFoundError(f"{run_dir}: no checkpoint of step {step}; kept: {sorted(found)}")
    checkpoint = found[step]
    saved_step = int(read_state(checkpoint)["step"])
    dest = Path(dest) if dest is not None else run_dir / "export" / f"step_{step}"
    card = PolicyCard.from_run(cfg, saved_step).model_dump()
    # The model the run trained from (with control tokens, the run's own copy that has them).
    model_path = str(starting_model(cfg, run_dir))
    ranks = cfg.actors.num_learners if cfg.learner.zero_stage == 3 else 1
    if ranks == 1:
        _export_rank(cfg, model_path, checkpoint, saved_step, dest, card, 0, 1, None)
        return dest
    # ZeRO-3 partitions every weight over the run's learners: as many ranks, each a process of
    # its own, load their partitions and gather the export together.
    port = free_port()
    context = multiprocessing.get_context("spawn")
    procs = [
        context.Process(target=_export_rank, args=(cfg, model_path, checkpoint, saved_step, dest, card, r, ranks, port))
        for r in range(ranks)
    ]
    for proc in procs:
        proc.start()
    deadline = time.monotonic() + cfg.ray_timeout_s
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
    for proc in procs:
        if proc.is_alive():
            proc.kill()  # its peers failed or hang: a collective would wait for them forever
            proc.join()
    failed = {r: proc.exitcode for r, proc in enumerate(procs) if proc.exitcode != 0}
    if failed:
        raise RuntimeError(f"{checkpoint}: the export's learner rank(s) failed (rank: exit code) {failed}; the log above says why")
    return dest


def _export_rank(
    cfg, model_path: str, checkpoint: Path, saved_step: int, dest: Path, card: dict, rank: int, world: int, port: int | None
) -> None:
    with Learner(cfg, model_path, rank=rank, world_size=world, master_port=port) as learner:
        learner.load_checkpoint(str(checkpoint / "learner"), weights_only=True)
        # The loop counts steps, the learner its updates: a step whose pairs were all dropped (ties,
        # or no contrasting pair) takes none, so the learner may be behind, never ahead.
        if learner.step > saved_step:
            raise RuntimeError(f"{checkpoint}: learner state is at update {learner.step}, past the checkpoint's step {saved_step}")
        learner.export_policy(str(dest), card)
