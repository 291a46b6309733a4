"""Run-directory checkpoints that are complete or absent: written to a staging folder, then
published by one rename. A crash mid-write leaves the previous checkpoint as the latest, and a
checkpoint damaged afterwards (a truncated or altered file) fails its checksums and is passed over
on resume. One process at a time owns a run directory."""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import time
from pathlib import Path
from typing import IO, Any

log = logging.getLogger(__name__)

_STEP_RE = re.compile(r"^step_(\d{8})$")
CHECKSUMS = "checksums.json"


class CheckpointError(RuntimeError):
    """A checkpoint that could not be written; the previous one is still the latest."""


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


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes: a checkpoint's files, or a data file that must not change under a resumed run."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def publish(staging: Path, step: int, state: dict[str, Any], keep_last: int) -> Path:
    """Write the checksums of every file, then state.json last (its presence marks a complete
    checkpoint), rename, prune old ones."""
    files = sorted(p for p in staging.rglob("*") if p.is_file())
    write_json(staging / CHECKSUMS, {str(p.relative_to(staging)): file_sha256(p) for p in files})
    write_json(staging / "state.json", state)
    final = staging.parent / f"step_{step:08d}"
    if final.exists():
        shutil.rmtree(final)
    os.replace(staging, final)
    for _, old in list_checkpoints(staging.parent.parent)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def checkpoint_damage(checkpoint: str | Path) -> str | None:
    """What is wrong with a published checkpoint's files against the checksums written at save
    (None: nothing; checkpoints from before checksums are taken as they are)."""
    checkpoint = Path(checkpoint)
    listed = checkpoint / CHECKSUMS
    if not listed.is_file():
        return None
    try:
        expected = json.loads(listed.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        return f"{CHECKSUMS} is unreadable: {exc}"
    for name, digest in expected.items():
        path = checkpoint / name
        if not path.is_file():
            return f"{name} is missing"
        if file_sha256(path) != digest:
            return f"{name} does not match its checksum (truncated or altered after the save)"
    return None


def latest_sound_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest checkpoint whose files match their checksums; damaged newer ones are named in
    the log and left in place (for a person to inspect), never resumed from."""
    for step, path in reversed(list_checkpoints(run_dir)):
        damage = checkpoint_damage(path)
        if damage is None:
            return path
        log.error("checkpoint of step %d at %s is damaged (%s); passing over it", step, path, damage)
    return None


# Run directories this process owns, with the open lock file that holds each.
_OWNED: dict[Path, IO[str]] = {}


class RunDirInUse(RuntimeError):
    """Another process holds the run directory."""


def own_run_dir(run_dir: str | Path) -> None:
    """Hold `run_dir`'s lock for the life of this process, or raise RunDirInUse naming the holder:
    two orchestrators writing one run directory would interleave checkpoints and metrics.
    An advisory lock on a file (flock): the kernel drops it when the holder exits, however it ends."""
    path = Path(run_dir).resolve() / ".lock"
    if path in _OWNED:
        return
    fh = open(path, "a+")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        holder = fh.read().strip() or "a process that did not say who it is"
        fh.close()
        raise RunDirInUse(f"run_dir {run_dir} is in use by another run ({holder}); wait for it to end, or choose another run_dir") from None
    fh.seek(0)
    fh.truncate()
    fh.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    fh.flush()
    _OWNED[path] = fh


def read_state(checkpoint: str | Path) -> dict[str, Any]:
    path = Path(checkpoint) / "state.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"checkpoint {checkpoint}: cannot read state.json: {exc}") from exc
