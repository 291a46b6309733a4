"""The prompt ledger: written per step, trimmed at a resume, and audited against the cursor."""

import json

from moalign.data import PromptCursor
from moalign.ledger import PromptLedger, audit, main, read_ledger


def train(ledger: PromptLedger, cursor: PromptCursor, steps, batch: int) -> None:
    for step in steps:
        drawn_from = (cursor.epoch, cursor.position)
        ledger.record(step, drawn_from, cursor.next(batch))


def test_a_resumed_run_records_each_prompt_once_and_says_what_was_redone(tmp_path):
    cursor = PromptCursor(10, seed=3)
    ledger = PromptLedger(tmp_path)
    train(ledger, cursor, [1, 2], batch=4)
    saved = cursor.state_dict()  # the checkpoint of step 2
    train(ledger, cursor, [3], batch=4)  # step 3 trained, then the run died before its checkpoint

    cursor.load_state_dict(saved)
    resumed = PromptLedger(tmp_path, resume_step=2, reason="restarted")
    train(resumed, cursor, [3, 4, 5], batch=4)
    report = audit(tmp_path, cursor.state_dict())
    assert report["problems"] == []
    assert report["steps"] == 5 and report["prompts_trained"] == 20 and report["complete_epochs"] == 2
    assert report["resumes"] == 1 and report["redone_steps"] == [3]
    assert [e.get("step") for e in read_ledger(tmp_path)] == [1, 2, None, 3, 4, 5]


def test_a_learner_restart_within_the_run_is_recorded_beside_resumes(tmp_path):
    cursor = PromptCursor(8, seed=1)
    ledger = PromptLedger(tmp_path)
    train(ledger, cursor, [1, 2], batch=2)
    saved = cursor.state_dict()
    train(ledger, cursor, [3, 4], batch=2)
    cursor.load_state_dict(saved)
    ledger.rewind(2, "learner_restarted", "learner actor #0 at step 5, in train_step(): the actor died")
    train(ledger, cursor, [3, 4, 5], batch=2)
    report = audit(tmp_path, cursor.state_dict())
    assert report["problems"] == [] and report["steps"] == 5 and report["prompts_trained"] == 10
    assert report["learner_restarts"] == 1 and report["resumes"] == 0 and report["redone_steps"] == [3, 4]
    event = [e for e in read_ledger(tmp_path) if "event" in e][0]
    assert event["event"] == "learner_restarted" and "train_step" in event["reason"] and event["from_step"] == 2


def test_audit_finds_skipped_and_repeated_prompts(tmp_path):
    cursor = PromptCursor(6, seed=0)
    ledger = PromptLedger(tmp_path)
    train(ledger, cursor, [1], batch=3)
    skipped = cursor.next(1)  # drawn and never trained
    train(ledger, cursor, [2], batch=2)
    report = audit(tmp_path, cursor.state_dict())
    assert any("skipped or drawn twice" in p for p in report["problems"])
    assert any("epoch 0 is over but 1 of its 6 prompts were never trained" in p for p in report["problems"]), (skipped, report)

    lines = (tmp_path / "ledger.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    (tmp_path / "ledger.jsonl").write_text("\n".join([lines[0], json.dumps({**first, "step": 2})]) + "\n")
    report = audit(tmp_path, cursor.state_dict())
    assert any("trained twice in one epoch" in p for p in report["problems"])


def test_command_line_reads_the_cursor_from_the_last_checkpoint(tmp_path, capsys):
    from moalign.checkpoint import publish, staging_dir

    cursor = PromptCursor(5, seed=1)
    train(PromptLedger(tmp_path), cursor, [1, 2], batch=2)
    publish(staging_dir(tmp_path, 2), 2, {"step": 2, "cursor": cursor.state_dict()}, keep_last=1)
    assert main([str(tmp_path)]) == 0
    assert json.loads(capsys.readouterr().out)["prompts_trained"] == 4


def test_a_step_drawn_before_the_ledger_existed_is_reported_not_guessed(tmp_path):
    cursor = PromptCursor(6, seed=0)
    ledger = PromptLedger(tmp_path)
    train(ledger, cursor, [1], batch=2)
    ledger.record(2, None, cursor.next(2))  # a rollout restored from an older checkpoint
    train(ledger, cursor, [3], batch=2)
    report = audit(tmp_path, cursor.state_dict())
    assert report["problems"] == ["step 2: where its prompts were drawn is unknown (a rollout checkpointed before the ledger)"]
    assert report["steps"] == 3 and report["complete_epochs"] == 1
