"""The prompt ledger: which step trained on which prompts, across restarts and resumes.

`<run dir>/ledger.jsonl` holds one line per trained step (the cursor position its prompts were
drawn from, and the prompt indices) and one per resume or learner restart (which steps were
dropped to be redone, and why). `audit` proves from it alone, with the prompt cursor's seed, that the steps drew the
cursor's sequence without a gap or a repeat: every prompt of an epoch trained exactly once.

    python -m moalign.ledger RUN_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from moalign.data import PromptCursor

LEDGER = "ledger.jsonl"


def read_ledger(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / LEDGER
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class PromptLedger:
    """Appends a run's ledger; opened at a resume, it drops the steps after the checkpoint (they
    will be trained again) and says so in a `resumed` line."""

    def __init__(self, run_dir: str | Path, resume_step: int = 0, reason: str = ""):
        self.path = Path(run_dir) / LEDGER
        if resume_step or read_ledger(run_dir):
            self.rewind(resume_step, "resumed", reason)
        else:
            self.path.write_text("")

    def rewind(self, step: int, event: str, reason: str) -> None:
        """Drop the steps after `step` (they will be trained again) and record which and why:
        `event` is `resumed` (a new process) or `learner_restarted` (within the run)."""
        entries = read_ledger(self.path.parent)
        kept = [e for e in entries if e.get("step", 0) <= step or "event" in e]
        dropped = sorted(e["step"] for e in entries if "event" not in e and e["step"] > step)
        kept.append({"event": event, "from_step": step, "redone_steps": dropped, "reason": reason})
        tmp = self.path.with_name(LEDGER + ".tmp")
        tmp.write_text("".join(json.dumps(e) + "\n" for e in kept))
        tmp.replace(self.path)

    def record(self, step: int, drawn_from: tuple[int, int] | None, prompt_indices: list[int]) -> None:
        """`drawn_from`: the cursor's (epoch, position) before the draw; None for rollouts restored
        from a checkpoint written before the ledger existed (the audit then reports the gap)."""
        epoch, position = drawn_from if drawn_from is not None else (None, None)
        entry = {"step": step, "epoch": epoch, "position": position, "prompts": list(prompt_indices)}
        with open(self.path, "a") as fh:
            fh.write(json.dumps(entry) + "\n")


def audit(run_dir: str | Path, cursor_state: dict[str, Any]) -> dict[str, Any]:
    """Check the ledger against the cursor (`cursor_state`: a checkpoint's saved cursor, whose
    seed and prompt count fix the draw order). Returns totals and every problem found."""
    ledger = read_ledger(run_dir)
    entries = [e for e in ledger if "event" not in e]
    resumes = [e for e in ledger if e.get("event") == "resumed"]
    restarts = [e for e in ledger if e.get("event") == "learner_restarted"]
    cursor = PromptCursor(cursor_state["n"], cursor_state["seed"], cursor_state["shuffle"])
    problems: list[str] = []
    steps = [e["step"] for e in entries]
    if steps != list(range(1, len(steps) + 1)):
        problems.append(f"steps are not 1..{len(steps)} once each: {steps}")
    trained: dict[tuple[int, int], int] = {}
    for e in entries:
        if e["epoch"] is None:
            problems.append(f"step {e['step']}: where its prompts were drawn is unknown (a rollout checkpointed before the ledger)")
        elif (cursor.epoch, cursor.position) != (e["epoch"], e["position"]):
            problems.append(
                f"step {e['step']} drew from epoch {e['epoch']} position {e['position']}, but the steps before it "
                f"end at epoch {cursor.epoch} position {cursor.position}: prompts were skipped or drawn twice"
            )
            cursor.epoch, cursor.position = e["epoch"], e["position"]
        expected = []
        for index in e["prompts"]:
            epoch = cursor.epoch
            expected += cursor.next(1)
            trained[(epoch, index)] = trained.get((epoch, index), 0) + 1
        if expected != e["prompts"]:
            problems.append(f"step {e['step']} trained prompts {e['prompts']}, the cursor's order says {expected}")
    twice = sorted(k for k, count in trained.items() if count > 1)
    if twice:
        problems.append(f"{len(twice)} prompt(s) trained twice in one epoch, e.g. (epoch, prompt) {twice[:5]}")
    for epoch in range(cursor.epoch):
        missing = cursor.n - sum(1 for (ep, _) in trained if ep == epoch)
        if missing:
            problems.append(f"epoch {epoch} is over but {missing} of its {cursor.n} prompts were never trained")
    return {
        "steps": len(entries),
        "prompts_trained": sum(len(e["prompts"]) for e in entries),
        "distinct_prompts": len({i for e in entries for i in e["prompts"]}),
        "complete_epochs": cursor.epoch,
        "resumes": len(resumes),
        "learner_restarts": len(restarts),
        "redone_steps": sorted({s for r in resumes + restarts for s in r["redone_steps"]}),
        "problems": problems,
    }


def main(argv: list[str] | None = None) -> int:
    from moalign.checkpoint import latest_checkpoint, read_state

    args = argv if argv is not None else sys.argv[1:]
    if len(args) != 1:
        print(__doc__.strip().splitlines()[-1].strip(), file=sys.stderr)
        return 2
    checkpoint = latest_checkpoint(args[0])
    if checkpoint is None:
        print(f"{args[0]} holds no checkpoint to read the prompt cursor from", file=sys.stderr)
        return 2
    report = audit(args[0], read_state(checkpoint)["cursor"])
    print(json.dumps(report, indent=1))
    return 1 if report["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
