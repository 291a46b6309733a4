"""A fault drill: the same MO-ODPO run twice, undisturbed and with its actors killed from outside
(SIGKILL by process id, as an OOM killer or a lost node would), then what the disturbed run did
about it. Prints each fault (when, which process), what the log says of its recovery and how
long it took, each step's time beside the undisturbed run's, the ledger's totals, and how far
the disturbed run's final policy and losses are from the undisturbed run's.

    python benchmarks/fault_drill.py                       # the demo preset, 6 steps
    python benchmarks/fault_drill.py --steps 6 --config configs/default.yaml rollout.prompts_per_step=4

Faults (steps are those whose metrics have just been written when the kill is sent): every
generator after step 1, the reward actor after step 2, the learner after step 5 (the last
checkpoint is step 4: step 5 is trained again).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

log = logging.getLogger("drill")
FAULTS = {1: "GeneratorActor", 2: "RewardActor", 5: "LearnerActor"}
RECOVERY = re.compile(r"^(\S+ \S+) \w+ \S+: (.*(?:restarted at step|back at step|starting the learners again).*)$")


def actor_pids(cls: str) -> list[int]:
    """Processes whose title Ray set to one of `cls`'s workers (`ray::GeneratorActor...`)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                title = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if title.startswith(f"ray::{cls}"):
                pids.append(int(entry.name))
    return pids


def steps_logged(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return sum(1 for line in path.read_text().splitlines() if line.strip()) if path.is_file() else 0


def train(run_dir: Path, args, faults: dict[int, str]) -> tuple[float, list[dict]]:
    overrides = [
        f"run_dir={run_dir}",
        f"steps={args.steps}",
        "checkpoint.every_steps=2",
        "eval.at_start_and_end=false",
        "eval.every_steps=0",
        "logging.progress_bar=false",
        *args.overrides,
    ]
    started = time.monotonic()
    run_dir.mkdir(parents=True)
    # Ray's and vLLM's console noise goes beside the run's own log, not into the report.
    console = open(run_dir / "console.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "orchestrator.py", "--config", args.config, *overrides], cwd=REPO, stdout=console, stderr=subprocess.STDOUT
    )
    injected = []
    pending = dict(faults)
    while proc.poll() is None:
        done = steps_logged(run_dir)
        for step in [s for s in pending if s <= done]:
            cls = pending.pop(step)
            pids = actor_pids(cls)
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
            injected.append({"after_step": step, "actor": cls, "pids": pids, "at_s": round(time.monotonic() - started, 1)})
            log.info("after step %d: SIGKILL %s %s", step, cls, pids)
        time.sleep(0.5)
    console.close()
    if proc.returncode != 0:
        raise SystemExit(f"the run in {run_dir} failed (exit {proc.returncode}); see {run_dir / 'orchestrator.log'}")
    if pending:
        raise SystemExit(f"faults never injected: {pending}")
    return time.monotonic() - started, injected


def max_weight_difference(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    left, right = load_file(str(a / "final" / "model.safetensors")), load_file(str(b / "final" / "model.safetensors"))
    if left.keys() != right.keys():
        raise SystemExit("the two runs exported different tensors")
    return max(float((left[k].double() - right[k].double()).abs().max()) for k in left)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/default.yaml")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--out", default="runs/fault_drill", help="the two run directories go here (emptied first)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for both runs")
    args = parser.parse_args()
    if args.steps < max(FAULTS) + 1:
        raise SystemExit(f"--steps must be at least {max(FAULTS) + 1}: the learner is killed after step {max(FAULTS)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from actors.metrics import read_metrics
    from moalign.checkpoint import latest_checkpoint, read_state
    from moalign.ledger import audit

    out = REPO / args.out
    subprocess.run(["rm", "-rf", str(out)], check=True)
    calm_s, _ = train(out / "undisturbed", args, {})
    drill_s, injected = train(out / "disturbed", args, FAULTS)

    calm, drill = read_metrics(out / "undisturbed"), read_metrics(out / "disturbed")
    lines = (out / "disturbed" / "orchestrator.log").read_text().splitlines()
    recoveries = [m.groups() for m in map(RECOVERY.match, lines) if m]
    ledger = audit(out / "disturbed", read_state(latest_checkpoint(out / "disturbed"))["cursor"])
    print("\n## Faults injected")
    for fault in injected:
        print(f"- after step {fault['after_step']} ({fault['at_s']} s into the run): SIGKILL {fault['actor']} pid(s) {fault['pids']}")
    print("\n## What the disturbed run logged")
    for when, message in recoveries:
        print(f"- {when}: {message}")
    print("\n## Step times (s), undisturbed vs disturbed")
    print("| step | undisturbed | disturbed | extra | actor_restarts |")
    print("|---|---|---|---|---|")
    for a, b in zip(calm, drill):
        extra = b["time/step_s"] - a["time/step_s"]
        print(f"| {a['step']} | {a['time/step_s']:.1f} | {b['time/step_s']:.1f} | {extra:+.1f} | {b['actor_restarts']:.0f} |")
    print(f"\nwhole run: undisturbed {calm_s:.0f} s, disturbed {drill_s:.0f} s ({drill_s - calm_s:+.0f} s)")
    print("\n## Ledger (python -m moalign.ledger)")
    print(json.dumps(ledger, indent=1))
    losses = [abs(a.get("loss", 0.0) - b.get("loss", 0.0)) for a, b in zip(calm, drill)]
    print("\n## Against the undisturbed run")
    print(f"- steps: {[h['step'] for h in drill]} (undisturbed {[h['step'] for h in calm]})")
    print(f"- largest loss difference over the steps: {max(losses):.2e}")
    print(f"- largest difference of a final exported weight: {max_weight_difference(out / 'undisturbed', out / 'disturbed'):.2e}")


if __name__ == "__main__":
    main()
