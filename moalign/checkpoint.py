"""Run-directory checkpoints that are complete or absent: written to a staging folder, then
published by one rename. A crash mid-write leaves the previous checkpoint as the latest."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

_STEP_RE = re.compile(r"^step_(\d{8})$")


def checkpoints_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Published checkpoints, oldest first. Staging folders (`.staging-…`) are never listed."""
    root = checkpoints_root(run_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_RE.match(child.name)
        if match and (child / "state.json").is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def staging_dir(run_dir: str | Path, step: int) -> Path:
    root = checkpoints_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    path = root / f".staging-step_{step:08d}"
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir()
    return path


def write_json(path: str | Path, payload: Any) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fh:
        json.dump(payload, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def publish(staging: Path, step: int, state: dict[str, Any], keep_last: int) -> Path:
    """Write state.json last (its presence marks a complete checkpoint), rename, prune old ones."""
    write_json(staging / "state.json", state)
    final = staging.parent / f"step_{step:08d}"
    if final.exists():
        shutil.rmtree(final)
    os.replace(staging, final)
    for _, old in list_checkpoints(staging.parent.parent)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_state(checkpoint: str | Path) -> dict[str, Any]:
    path = Path(checkpoint) / "state.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"checkpoint {checkpoint}: cannot read state.json: {exc}") from exc
