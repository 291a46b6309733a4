"""Live scaling requests: how many generator and reward actors a running MO-ODPO loop should have.

A request is a small JSON file in `<run dir>/scale/requests/`; the loop reads them at the start of
each step, in the order written, applies each (a request may wait for a later step with
`from_step`) and moves it to `<run dir>/scale/done/` with what happened. Files, not calls, so a
request reaches a run on a cluster through a one-line job on the head node, where the run's
driver and its run directory live (`deploy/moalign-job scale`), and locally through:

    python -m moalign.scaling [--wait-for-run-s S] RUN_DIR generators=2 [reward_workers=1] [from_step=5]
    python -m moalign.scaling RUN_DIR --done      # what became of the requests handled so far
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROLES = {"generators": "generator", "reward_workers": "reward"}
"""Request keys and the actor roles they size (the learners' data-parallel group is fixed for a run)."""
MAX_ACTORS = 256


class ScaleRequestError(ValueError):
    """A request that names no role, an unknown one, or a count that is not a positive integer."""


@dataclass(frozen=True)
class ScaleRequest:
    path: Path
    counts: dict[str, int]
    """Actor role ("generator" or "reward") -> the number wanted."""
    from_step: int = 0
    """Apply at the start of this step or a later one (0: the next step)."""


def parse_request(fields: dict[str, Any], where: str) -> tuple[dict[str, int], int]:
    """Counts by role and from_step from a request's fields; raises ScaleRequestError naming `where`."""
    unknown = sorted(set(fields) - set(ROLES) - {"from_step", "requested_at"})
    if unknown:
        raise ScaleRequestError(f"{where}: unknown key(s) {unknown}; a request sets {sorted(ROLES)} and optionally from_step")
    counts = {}
    for key, role in ROLES.items():
        if key in fields:
            value = fields[key]
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_ACTORS:
                raise ScaleRequestError(f"{where}: {key}={value!r} must be an integer from 1 to {MAX_ACTORS}")
            counts[role] = value
    if not counts:
        raise ScaleRequestError(f"{where}: names no role; set {' and/or '.join(sorted(ROLES))}")
    from_step = fields.get("from_step", 0)
    if isinstance(from_step, bool) or not isinstance(from_step, int) or from_step < 0:
        raise ScaleRequestError(f"{where}: from_step={from_step!r} must be a step number (0: the next step)")
    return counts, from_step


def write_request(run_dir: str | Path, fields: dict[str, Any]) -> Path:
    """Queue a request for the run in `run_dir` (checked first); returns its file."""
    parse_request(fields, "scale request")
    requests = Path(run_dir) / "scale" / "requests"
    requests.mkdir(parents=True, exist_ok=True)
    # Named so that sorting by name is the order written; written whole, then renamed into place,
    # so the loop never reads half a request.
    name = f"{time.time_ns():020d}-{uuid.uuid4().hex[:6]}.json"
    staging = requests / f".{name}.tmp"
    staging.write_text(json.dumps({**fields, "requested_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}))
    os.replace(staging, requests / name)
    return requests / name


def due_requests(run_dir: str | Path, step: int) -> list[ScaleRequest | tuple[Path, str]]:
    """The requests to apply at the start of `step`, in the order written, up to the first that waits
    for a later step. A file that cannot be read as a request comes back as (path, why)."""
    requests = Path(run_dir) / "scale" / "requests"
    if not requests.is_dir():
        return []
    due: list[ScaleRequest | tuple[Path, str]] = []
    for path in sorted(p for p in requests.glob("*.json") if not p.name.startswith(".")):
        try:
            fields = json.loads(path.read_text())
            if not isinstance(fields, dict):
                raise ScaleRequestError(f"{path}: not a JSON object")
            counts, from_step = parse_request(fields, str(path))
        except (OSError, json.JSONDecodeError, ScaleRequestError) as exc:
            due.append((path, str(exc)))
            continue
        if from_step > step:
            break
        due.append(ScaleRequest(path, counts, from_step))
    return due


def mark_done(path: Path, step: int, outcome: str, applied: bool) -> None:
    """Move a request to `scale/done/` with the step it was handled at and what happened."""
    done = path.parent.parent / "done"
    done.mkdir(exist_ok=True)
    try:
        fields = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        fields = {"unreadable": path.read_text(errors="replace") if path.is_file() else ""}
    fields.update(handled_at_step=step, applied=applied, outcome=outcome)
    (done / path.name).write_text(json.dumps(fields, indent=1) + "\n")
    path.unlink(missing_ok=True)


def read_done(run_dir: str | Path) -> list[dict[str, Any]]:
    """Handled requests, in the order written."""
    done = Path(run_dir) / "scale" / "done"
    return [json.loads(p.read_text()) for p in sorted(done.glob("*.json"))] if done.is_dir() else []


def parse_cli(args: list[str]) -> dict[str, int]:
    fields: dict[str, int] = {}
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep or not value.strip().lstrip("-").isdigit():
            raise ScaleRequestError(f"{arg!r}: expected key=integer, e.g. generators=2")
        fields[key.strip()] = int(value)
    return fields


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    wait_s = 0.0
    if argv[:1] == ["--wait-for-run-s"] and len(argv) > 1:
        # A job asked to scale right after it was submitted may not have written its run
        # directory yet: wait for it rather than refuse.
        wait_s, argv = float(argv[1]), argv[2:]
    if len(argv) < 2:
        print("\n".join(line.strip() for line in __doc__.strip().splitlines()[-2:]), file=sys.stderr)
        return 2
    run_dir = Path(argv[0])
    if argv[1:] == ["--done"]:
        for fields in read_done(run_dir):
            asked = " ".join(f"{k}={fields[k]}" for k in (*ROLES, "from_step") if k in fields)
            print(f"step {fields['handled_at_step']}: {asked or '(unreadable request)'} -> {fields['outcome']}")
        return 0
    deadline = time.monotonic() + wait_s
    while not (run_dir / "config.yaml").is_file():
        if time.monotonic() >= deadline:
            waited = f" after waiting {wait_s:g}s for the run to write it" if wait_s else ""
            print(f"{run_dir}: not a run directory (no config.yaml{waited})", file=sys.stderr)
            return 2
        time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
    try:
        path = write_request(run_dir, parse_cli(argv[1:]))
    except ScaleRequestError as exc:
        print(exc, file=sys.stderr)
        return 2
    print(f"queued {path}; the run applies it at the start of a step and moves it to {path.parent.parent / 'done'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
