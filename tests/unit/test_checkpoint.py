import os

import pytest

from moalign.checkpoint import (
    checkpoint_damage,
    latest_checkpoint,
    latest_sound_checkpoint,
    list_checkpoints,
    own_run_dir,
    publish,
    read_state,
    staging_dir,
)


def test_only_published_checkpoints_count(tmp_path):
    staging = staging_dir(tmp_path, 2)
    (staging / "learner").mkdir()
    # A crash here (before publish) must leave no checkpoint behind.
    assert latest_checkpoint(tmp_path) is None
    final = publish(staging, 2, {"step": 2}, keep_last=2)
    assert final.name == "step_00000002" and not staging.exists()
    assert read_state(final) == {"step": 2}
    assert latest_checkpoint(tmp_path) == final


def test_keep_last_prunes_oldest(tmp_path):
    for step in (1, 2, 3, 4):
        publish(staging_dir(tmp_path, step), step, {"step": step}, keep_last=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [3, 4]


def test_half_written_checkpoint_is_ignored(tmp_path):
    publish(staging_dir(tmp_path, 1), 1, {"step": 1}, keep_last=5)
    (tmp_path / "checkpoints" / "step_00000002").mkdir()
    assert latest_checkpoint(tmp_path).name == "step_00000001"


def test_unreadable_state(tmp_path):
    (tmp_path / "state.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot read state.json"):
        read_state(tmp_path)


def _checkpoint_with_weights(run_dir, step, payload: bytes):
    staging = staging_dir(run_dir, step)
    (staging / "learner").mkdir()
    (staging / "learner" / "weights.bin").write_bytes(payload)
    return publish(staging, step, {"step": step}, keep_last=5)


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda p: p.write_bytes(p.read_bytes()[:-3]), "does not match its checksum"),
        (lambda p: p.write_bytes(b"X" + p.read_bytes()[1:]), "does not match its checksum"),
        (lambda p: p.unlink(), "is missing"),
    ],
)
def test_damaged_checkpoint_is_named_and_passed_over(tmp_path, caplog, damage, reason):
    first = _checkpoint_with_weights(tmp_path, 1, b"one" * 1000)
    second = _checkpoint_with_weights(tmp_path, 2, b"two" * 1000)
    assert checkpoint_damage(second) is None and latest_sound_checkpoint(tmp_path) == second
    damage(second / "learner" / "weights.bin")
    assert reason in checkpoint_damage(second) and "learner/weights.bin" in checkpoint_damage(second)
    assert latest_sound_checkpoint(tmp_path) == first
    assert "step 2" in caplog.text and reason in caplog.text
    # Left in place for a person to look at; the run overwrites it when it reaches that step again.
    assert second.is_dir() and latest_checkpoint(tmp_path) == second
    damage(first / "learner" / "weights.bin")
    assert latest_sound_checkpoint(tmp_path) is None


def test_checkpoint_without_checksums_is_taken_as_it_is(tmp_path):
    old = _checkpoint_with_weights(tmp_path, 1, b"old")
    (old / "checksums.json").unlink()
    assert checkpoint_damage(old) is None and latest_sound_checkpoint(tmp_path) == old


def test_a_second_process_cannot_own_the_run_dir(tmp_path):
    import subprocess
    import sys
    import textwrap

    own_run_dir(tmp_path)
    own_run_dir(tmp_path)  # the owner may open it again (a resumed run in the same process)
    script = textwrap.dedent(
        f"""
        from moalign.checkpoint import RunDirInUse, own_run_dir
        try:
            own_run_dir({str(tmp_path)!r})
        except RunDirInUse as exc:
            print("refused:", exc)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True).stdout
    assert out.startswith("refused:") and f"pid {os.getpid()}" in out and "choose another run_dir" in out
