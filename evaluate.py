"""Pareto evaluation of a steerable policy: does it follow the objective weights in its prompt?

    python evaluate.py --run RUN_DIR [--step N] [--base] [--compare OTHER_RUN_DIR ...] [key=value ...]
    make eval RUN=runs/demo [STEP=N] [BASE=1] [COMPARE="runs/a runs/b"]

For every weight vector of a simplex lattice (plus the corners and the centre), the first
`eval.heldout_prompts` held-out prompts are conditioned on the weights exactly as in training,
sampled with the training's generation settings and seeds that depend only on (eval seed,
prompt, sample), and scored on the unconditioned prompt. The base model goes to
RUN_DIR/eval/base (reused when it exists with the same settings), the checkpoint of step N
(default: the latest) to RUN_DIR/eval/step_N: front.json, front.md, samples.jsonl, front.png.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path

from actors.ray_actors import ActorFailure
from loops.pareto_eval import evaluate_offline, evaluate_run
from moalign.config import ConfigError, RunConfig, load_config
from moalign.data import DataError
from moalign.pairs import RewardError

log = logging.getLogger("moalign.evaluate")


def _setup_logging(cfg: RunConfig, run_dir: Path) -> None:
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=cfg.logging.level, format=fmt, force=True)
    (run_dir / "eval").mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(run_dir / "eval" / "evaluate.log")
    handler.setFormatter(logging.Formatter(fmt))
    logging.getLogger().addHandler(handler)


_OVERRIDE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*=")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="run directory (holds config.yaml and checkpoints/)")
    parser.add_argument("--step", type=int, help="checkpoint step to evaluate (default: the latest)")
    parser.add_argument("--base", action="store_true", help="evaluate the base model only")
    parser.add_argument("--all-steps", action="store_true", help="evaluate every kept checkpoint (a learning curve at these settings)")
    parser.add_argument("--compare", nargs="+", default=[], metavar="RUN_DIR", help="add these runs' latest fronts to the plot and table")
    parser.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local cluster)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the run's config, e.g. eval.heldout_prompts=16")
    args = parser.parse_args(argv)
    # `--compare A B key=value` would read the override as a run directory.
    args.overrides += [c for c in args.compare if _OVERRIDE.match(c)]
    args.compare = [c for c in args.compare if not _OVERRIDE.match(c)]
    run_dir = Path(args.run)
    try:
        if sum((args.base, args.step is not None, args.all_steps)) > 1:
            raise ConfigError("--base, --step and --all-steps exclude each other")
        cfg = load_config(run_dir / "config.yaml", args.overrides)
        cfg.run_dir = str(run_dir)
    except ConfigError as exc:
        logging.basicConfig(format="%(levelname)s: %(message)s")
        log.error("%s", exc)
        return 2
    _setup_logging(cfg, run_dir)
    try:
        if cfg.is_offline:
            if args.base or args.step is not None:
                raise ConfigError("--base and --step are for MO-ODPO runs; an offline run is evaluated at its last checkpoints")
            evaluate_offline(cfg, run_dir, args.compare, args.address)
        else:
            evaluate_run(cfg, run_dir, args.step, args.base, args.compare, args.address, args.all_steps)
    except (ConfigError, DataError, FileNotFoundError) as exc:
        log.error("%s", exc)
        return 2
    except (ActorFailure, RewardError) as exc:
        log.error("evaluation failed: %s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
