"""A run directory as a crash would have left it, for the resume tests."""

import shutil
from pathlib import Path

from moalign.checkpoint import list_checkpoints


def crashed_copy(run_dir: Path, after_step: int, into: Path) -> Path:
    """A copy of `run_dir` holding only what existed when step `after_step`'s checkpoint had been
    written: later checkpoints and the final export are gone, and the metrics of later steps are
    dropped by the resumed run itself. Resuming it must reproduce `run_dir`'s later steps; one
    run fewer than stopping a second run at `after_step`."""
    shutil.copytree(run_dir, into)
    kept = [s for s, _ in list_checkpoints(into)]
    assert after_step in kept, f"no checkpoint of step {after_step} in {run_dir} (kept: {kept})"
    for step, path in list_checkpoints(into):
        if step > after_step:
            shutil.rmtree(path)
    shutil.rmtree(into / "final", ignore_errors=True)
    return into
