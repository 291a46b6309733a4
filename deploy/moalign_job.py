"""moalign runs as Ray jobs: submit, follow, stop and resume them over the cluster's Jobs API.

    deploy/moalign-job submit configs/default.yaml run_dir=/shared/runs/demo steps=50 [--no-resource-check]
    deploy/moalign-job status|logs|stop JOB_ID
    deploy/moalign-job resume /shared/runs/demo          # the run directory's saved config.yaml
    deploy/moalign-job scale JOB_ID generators=2 [reward_workers=3] [from_step=N]
    deploy/moalign-job list

The cluster is `--address`, else $RAY_ADDRESS, else http://127.0.0.1:8265 (the dashboard of a
head started on this machine). A cluster started with token authentication (Ray's default for
new clusters) is reached with the token Ray keeps for this user (~/.ray/auth_token, or
$RAY_AUTH_TOKEN / $RAY_AUTH_TOKEN_PATH): nothing to set by hand. `submit` checks that the cluster's
nodes can hold what the config's actors ask (CPUs, GPUs, node labels) before it sends anything.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

log = logging.getLogger("moalign-job")
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
# The working directory travels to the cluster (Ray caps it; ours is about 2 MB without these).
EXCLUDES = [".venv", "runs", ".git", ".whl", "**/__pycache__", "**/*.egg-info", ".pytest_cache", ".ruff_cache"]
FINISHED = ("SUCCEEDED", "FAILED", "STOPPED")
AGENT_WAIT_S = 120
SCALE_WAIT_S = 600  # how long a scale request waits for a just-submitted run to write its run directory
STATE_API_TIMEOUT_S = 30
# The phrases of actors.ray_actors (WAITING_FOR_ROOM, PLACED_AFTER) that a run's log carries while
# a role waits for room and once it is placed; kept here so that this command needs no Ray actors.
WAITING_FOR_ROOM = "cannot be placed yet"
PLACED_AFTER = "placed after waiting"


class JobError(RuntimeError):
    """A submission that would not work, or a cluster that cannot be reached; says what to do."""


def token_available() -> bool:
    """Whether Ray would find an authentication token for this user (its own lookup order)."""
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return True
    return (Path.home() / ".ray" / "auth_token").is_file()


def client(address: str | None):
    """A Jobs API client for the cluster, in token mode when a token is at hand (the client does
    not switch to it by itself, and a token cluster refuses it: 'Missing authentication token')."""
    address = address or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS
    if "RAY_AUTH_MODE" not in os.environ and token_available():
        # Read once, when Ray is first imported: set before that.
        os.environ["RAY_AUTH_MODE"] = "token"
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except Exception as exc:  # Ray raises ConnectionError, AuthenticationError or RuntimeError here
        hint = (
            "the cluster wants a token: copy ~/.ray/auth_token from the head (`ray get-auth-token` prints it) or set RAY_AUTH_TOKEN"
            if "auth" in str(exc).lower()
            else "is the head running (`ray start --head`), and is this its dashboard address (port 8265 by default)?"
        )
        raise JobError(f"cannot reach the Ray Jobs API at {address}: {exc}; {hint}") from exc


def checked_config(config: str, overrides: list[str]):
    """The resolved config, checked here before anything is sent, with an absolute run directory
    (a relative one would land in the job's temporary copy of the working directory and vanish
    with it)."""
    from moalign.config import load_config

    cfg = load_config(config, overrides)
    if not Path(cfg.run_dir).is_absolute():
        raise JobError(
            f"run_dir={cfg.run_dir} is relative: a Ray job runs in a temporary copy of this directory that is deleted when it "
            "ends, so checkpoints, metrics and the exported policy would vanish. Give a path on storage every node sees, "
            f"e.g. run_dir=/shared/runs/{Path(cfg.run_dir).name}"
        )
    return cfg


def cluster_nodes(jobs) -> list[dict]:
    """The cluster's live nodes as {"resources_total": {...}, "labels": {...}}, read through the
    state API of the dashboard the Jobs client talks to (with the same token)."""
    from ray.util.state import list_nodes

    address = jobs.get_address()
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        try:
            nodes = list_nodes(
                address=address, filters=[("state", "=", "ALIVE")], timeout=STATE_API_TIMEOUT_S, raise_on_missing_output=False
            )
        except Exception as exc:  # the state API raises RayStateApiException, ConnectionError, ...
            raise JobError(
                f"cannot read the cluster's nodes from {address} to check the config's resources: {exc}; "
                "--no-resource-check submits without the check"
            ) from exc
        # A head that has just started answers before its own node is listed.
        if nodes or time.monotonic() > deadline:
            break
        log.info("the cluster lists no node yet; asking again")
        time.sleep(2)
    return [{"resources_total": dict(n.resources_total or {}), "labels": dict(n.labels or {})} for n in nodes]


def room_problem(cfg, nodes: Sequence[dict], source: str = "the config") -> str | None:
    """Why the cluster's `nodes` cannot hold the actors `cfg` runs at once, with the numbers, or
    None when they fit. Judged on the nodes' totals: what other jobs hold now is the run's own
    wait to report (actors.placement_timeout_s)."""
    from actors.cluster import run_asks

    asks = run_asks(cfg)
    have_cpu = sum(n["resources_total"].get("CPU", 0.0) for n in nodes)
    have_gpu = sum(n["resources_total"].get("GPU", 0.0) for n in nodes)
    need_cpu = sum(a.total_cpus for a in asks)
    need_gpu = sum(a.total_gpus for a in asks)
    arithmetic = " + ".join(f"{a.role} {a.count} x {a.cpus:g}" for a in asks)
    has = f"the cluster has {have_cpu:g} CPU, {have_gpu:g} GPU on {len(nodes)} node(s)"
    if len(nodes) > 1:
        per_node = ", ".join(f"{n['resources_total'].get('CPU', 0.0):g}" for n in nodes)
        has += f" ({per_node} CPU)"
    problems = []
    if need_cpu > have_cpu + 1e-9 or need_gpu > have_gpu + 1e-9:
        hint = "add nodes or lower actors.<role>_cpus / _gpus"
        if need_cpu > have_cpu + 1e-9:
            hint = (
                f"on one machine, start the head with that many logical CPUs, `ray start --head --num-cpus={math.ceil(need_cpu - 1e-9)}` "
                f"(a logical CPU is a scheduling token, not a core: the roles' threads share the cores); else {hint}"
            )
        problems.append(f"its actors ask {need_cpu:g} CPU ({arithmetic}) and {need_gpu:g} GPU in all, and {has}: {hint}")
    for a in asks:
        fits_one = [
            n for n in nodes
            if all(n["labels"].get(k) == v for k, v in a.labels.items())
            and n["resources_total"].get("CPU", 0.0) + 1e-9 >= a.cpus and n["resources_total"].get("GPU", 0.0) + 1e-9 >= a.gpus
        ]  # fmt: skip
        if not fits_one:
            problems.append(f"no node can hold one of {a.describe()}")
        elif a.strategy == "STRICT_PACK" and not any(
            n["resources_total"].get("CPU", 0.0) + 1e-9 >= a.total_cpus and n["resources_total"].get("GPU", 0.0) + 1e-9 >= a.total_gpus
            for n in fits_one
        ):
            problems.append(f"no node can hold all of {a.describe()} together")
        elif a.strategy == "STRICT_SPREAD" and len(fits_one) < a.count:
            problems.append(f"{len(fits_one)} node(s) can hold one of {a.describe()}, one per node")
    if not problems:
        return None
    return f"{source} does not fit the cluster: " + "; ".join(problems) + ". Nothing was submitted (--no-resource-check submits anyway)"


def training_script(offline: bool) -> str:
    """The command that trains a config: the MO-ODPO loop, or the offline one (MODPO, MOPO)."""
    return "offline.py" if offline else "orchestrator.py"


def submit(jobs, config: str, overrides: list[str], wait: bool, nodes: Callable[[], list[dict]] | None = None) -> int:
    """Check the config and, given `nodes` (the cluster's nodes, see `cluster_nodes`), that they
    can hold its actors; then submit it as a job running orchestrator.py (offline.py for MODPO, MOPO)."""
    cfg = checked_config(config, overrides)
    if nodes is not None:
        problem = room_problem(cfg, nodes(), config + (" with its overrides" if overrides else ""))
        if problem:
            raise JobError(problem)
    args = [training_script(cfg.is_offline), "--config", config, *overrides]
    return _submit(jobs, args, str(cfg.run_dir), {"config": config}, wait)


def resume(jobs, run_dir: str, overrides: list[str], wait: bool) -> int:
    """Submit the run again with the config it saved: it resumes from its last checkpoint (the
    run's lock refuses it while the previous job still holds the run directory)."""
    if not Path(run_dir).is_absolute():
        raise JobError(f"{run_dir}: give the run directory's absolute path, as the cluster sees it")
    saved = Path(run_dir) / "config.yaml"
    # The saved config says which loop trained the run where this machine sees the run directory
    # too; otherwise orchestrator.py, which names offline.py should the run be an offline one.
    offline = False
    if saved.is_file():
        from moalign.config import load_config

        offline = load_config(saved).is_offline
    args = [training_script(offline), "--config", str(saved), f"run_dir={run_dir}", *overrides]
    return _submit(jobs, args, run_dir, {"resumed": "true"}, wait)


def scale(jobs, job_id: str, counts: list[str]) -> int:
    """Ask a running job for more or fewer generator or reward actors: a one-line job writes the
    request into the run directory, on the head node where the run's driver reads it at its next step."""
    from moalign.scaling import parse_cli, parse_request

    fields = parse_cli(counts)
    parse_request(fields, "scale")
    info = jobs.get_job_info(job_id)
    if str(info.status.value) in FINISHED:
        raise JobError(f"job {job_id} is {info.status.value}: there is no run to scale")
    run_dir = (info.metadata or {}).get("run_dir")
    if not run_dir:
        raise JobError(f"job {job_id} was not submitted by this command (no run_dir in its metadata)")
    # A run that is still starting has not written its run directory yet: the request waits for it.
    args = ["-m", "moalign.scaling", "--wait-for-run-s", str(SCALE_WAIT_S), run_dir, *counts]
    code = _submit(jobs, args, run_dir, {"scales": job_id}, wait=True, kind="scale")
    if code == 0:
        log.info("the run applies it at the start of a step; what happened: %s/scale/done/ and its log", run_dir)
    return code


def _submit(jobs, args: list[str], run_dir: str, metadata: dict[str, str], wait: bool, kind: str = "") -> int:
    command = " ".join(shlex.quote(a) for a in ["python", *args])
    submission_id = f"moalign-{kind + '-' if kind else ''}{Path(run_dir).name}-{time.strftime('%Y%m%d-%H%M%S')}"
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        try:
            job_id = jobs.submit_job(
                entrypoint=command,
                submission_id=submission_id,
                runtime_env={"working_dir": str(REPO), "excludes": EXCLUDES},
                metadata={"run_dir": run_dir, **metadata},
            )
            break
        except RuntimeError as exc:
            # A head that has just started answers before its job agent has: Ray says to try again.
            if "No available agent" not in str(exc) or time.monotonic() > deadline:
                raise
            log.info("the head's job agent is not up yet; trying again")
            time.sleep(3)
    log.info("submitted %s: %s", job_id, command)
    log.info("run directory (on the cluster): %s", run_dir)
    log.info("dashboard: %s/#/jobs/%s", jobs.get_address().rstrip("/"), job_id)
    if not kind:
        log.info("follow: deploy/moalign-job logs %s --follow; stop: deploy/moalign-job stop %s", job_id, job_id)
    return follow(jobs, job_id) if wait else 0


def follow(jobs, job_id: str, poll_s: float = 2.0) -> int:
    """Print the job's log as it grows until it finishes; 0 if it succeeded."""
    shown = 0
    while True:
        status = str(jobs.get_job_status(job_id).value)
        logs = jobs.get_job_logs(job_id)
        sys.stdout.write(logs[shown:])
        sys.stdout.flush()
        shown = len(logs)
        if status in FINISHED:
            info = jobs.get_job_info(job_id)
            log.info("job %s", describe_status(job_id, status, info.message or "", logs))
            return 0 if status == "SUCCEEDED" else 1
        time.sleep(poll_s)


def describe_status(job_id: str, status: str, message: str, logs: str) -> str:
    """`JOB_ID STATUS`, and what the user needs from there: while it runs, the run's report of a
    role that waits for room (when that is the latest word on placement); once failed, Ray's first
    line and the run's last error (Ray's message carries up to 20,000 characters of log tail)."""
    lines = logs.splitlines()
    if status not in FINISHED:
        placement = [line for line in lines if WAITING_FOR_ROOM in line or PLACED_AFTER in line]
        if placement and WAITING_FOR_ROOM in placement[-1]:
            return f"{job_id} {status}; waiting for room: {placement[-1].strip()}"
        return f"{job_id} {status}" + (f": {message}" if message else "")
    if status == "FAILED":
        errors = [line.strip() for line in (message or logs).splitlines() if " ERROR " in line]
        if errors:
            return f"{job_id} FAILED: {message.splitlines()[0] if message else 'the run failed'}\n  {errors[-1]}"
    return f"{job_id} {status}" + (f": {message}" if message else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--address", help=f"the cluster's dashboard (default: $RAY_ADDRESS, else {DEFAULT_ADDRESS})")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("submit", help="submit a training run")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--no-wait", action="store_true", help="return once submitted instead of following the log")
    p.add_argument(
        "--no-resource-check",
        action="store_true",
        help="submit even when the cluster's nodes cannot hold the config's actors now (a cluster that adds nodes on demand)",
    )
    p = sub.add_parser("resume", help="submit a run directory's run again; it resumes from its last checkpoint")
    p.add_argument("run_dir")
    p.add_argument("overrides", nargs="*", help="only what a resume may change (steps, logging.*, eval.*, ...)")
    p.add_argument("--no-wait", action="store_true")
    p = sub.add_parser("scale", help="grow or shrink a running job's generator or reward actors")
    p.add_argument("job_id")
    p.add_argument("counts", nargs="+", help="generators=N and/or reward_workers=N, optionally from_step=S")
    for name in ("status", "stop"):
        sub.add_parser(name).add_argument("job_id")
    p = sub.add_parser("logs")
    p.add_argument("job_id")
    p.add_argument("--follow", action="store_true")
    sub.add_parser("list")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from moalign.config import ConfigError
    from moalign.scaling import ScaleRequestError

    try:
        jobs = client(args.address)
        if args.command == "submit":
            nodes = None if args.no_resource_check else (lambda: cluster_nodes(jobs))
            return submit(jobs, args.config, args.overrides, not args.no_wait, nodes)
        if args.command == "resume":
            return resume(jobs, args.run_dir, args.overrides, not args.no_wait)
        if args.command == "scale":
            return scale(jobs, args.job_id, args.counts)
        if args.command == "status":
            info = jobs.get_job_info(args.job_id)
            status = str(info.status.value)
            logs = jobs.get_job_logs(args.job_id) if status not in FINISHED or not info.message else ""
            print(describe_status(args.job_id, status, info.message or "", logs))
            return 0
        if args.command == "logs":
            if args.follow:
                return follow(jobs, args.job_id)
            print(jobs.get_job_logs(args.job_id), end="")
            return 0
        if args.command == "stop":
            print(f"{args.job_id}: {'stop requested' if jobs.stop_job(args.job_id) else 'already finished'}")
            return 0
        for job in jobs.list_jobs():
            if (job.submission_id or "").startswith("moalign-"):
                print(f"{job.submission_id} {job.status.value} run_dir={(job.metadata or {}).get('run_dir', '?')}")
        return 0
    except (JobError, ConfigError, ScaleRequestError) as exc:
        log.error("%s", exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
