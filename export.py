"""Export a run's checkpoint as folders other tools load: a merged Hugging Face model, a PEFT
adapter (with LoRA) and `moalign.json`, the card a server needs to write the weights as training did.

    python export.py --run RUN_DIR [--step N] [--out DIR]
    make export RUN=runs/demo [STEP=N] [OUT=dir]

Every run already exports its last step to RUN_DIR/final; this exports any kept checkpoint
(default: the latest) to RUN_DIR/export/step_N. The checkpoint is read by the project's own
learner in this process (no Ray), so LoRA is merged exactly as weight sync merges it; a ZeRO-3
checkpoint of several learners by as many learner processes on this machine, which gather it together.
"""

from __future__ import annotations

import argparse
import logging
import sys

from loops.export_checkpoint import export_checkpoint
from moalign.config import ConfigError

log = logging.getLogger("moalign.export")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="run directory (holds config.yaml and checkpoints/)")
    parser.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    parser.add_argument("--out", help="destination folder (default: RUN/export/step_N)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        dest = export_checkpoint(args.run, args.step, args.out)
    except (FileNotFoundError, ConfigError, ValueError) as exc:
        log.error("%s", exc)
        return 2
    log.info("exported to %s; serve it with: make serve MODEL=%s", dest, dest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
