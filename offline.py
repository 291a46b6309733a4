"""moalign offline: MODPO and MOPO on a fixed preference set, on the same learner actors as MO-ODPO.

    python offline.py --config configs/modpo_cpu.yaml [key=value ...]
    python offline.py --config configs/mopo_cpu.yaml [key=value ...]
    ray job submit --working-dir . -- python offline.py --config configs/mopo_cpu.yaml

The loop is `loops.offline_loop`: read and check every preference row, build the examples, then
one learner step per `offline.pairs_per_step` examples; checkpoints, resume, metrics and the
export to RUN_DIR/final as for MO-ODPO. A MODPO sweep trains one policy per weight vector, each
in RUN_DIR/w_<weights>. Evaluate the result with `make eval RUN=RUN_DIR`.
"""

from __future__ import annotations

import argparse
import logging
import sys

from actors.ray_actors import ActorFailure
from loops.offline_loop import report, run
from loops.run_setup import setup_logging
from moalign.checkpoint import CheckpointError, RunDirInUse
from moalign.config import ConfigError, load_config
from moalign.data import DataError
from moalign.pairs import RewardError

log = logging.getLogger("moalign")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML preset (see configs/modpo_cpu.yaml, configs/mopo_cpu.yaml)")
    parser.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local cluster)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. offline.pairs_per_step=16")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if not cfg.is_offline:
            raise ConfigError(
                f"algorithm.name: {cfg.algorithm.name!r} is the online loop, which offline.py does not train; "
                f"train it with: python orchestrator.py --config {args.config or '<the same config>'} [key=value ...]"
            )
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
