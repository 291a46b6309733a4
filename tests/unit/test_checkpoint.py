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


def test_a_killed_owner_leaves_the_run_dir_to_the_next_run(tmp_path):
    import signal
    import subprocess
    import sys

    # An orchestrator killed outright (SIGKILL, a lost node) cannot clean up: its lock must go
    # with its process, or resubmitting the job would be refused.
    script = f"import os, signal; from moalign.checkpoint import own_run_dir; own_run_dir({str(tmp_path)!r}); os.kill(os.getpid(), signal.SIGKILL)"
    died = subprocess.run([sys.executable, "-c", script], timeout=120)
    assert died.returncode == -signal.SIGKILL and (tmp_path / ".lock").read_text().startswith("pid ")
    own_run_dir(tmp_path)
    assert f"pid {os.getpid()} " in (tmp_path / ".lock").read_text()


class _Learners:
    """Stands in for the learner group: its save writes a shard, then fails as `fail` says."""

    def __init__(self, fail):
        self.fail = fail

    def call(self, method, path, step):
        os.makedirs(path)
        with open(os.path.join(path, "shard.pt"), "wb") as fh:
            fh.write(b"\0" * 4096)
        raise self.fail


class _State:
    def __init__(self, step):
        self.step = step

    def state_dict(self):
        return {"step": self.step}


def test_a_full_disk_during_a_checkpoint_leaves_the_previous_one_the_latest(tmp_path):
    import errno

    from actors.calls import save_checkpoint
    from moalign.checkpoint import CheckpointError
    from moalign.config import load_config

    cfg = load_config(None, [f"run_dir={tmp_path}"])
    previous = publish(staging_dir(tmp_path, 2), 2, {"step": 2}, keep_last=1)
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    with pytest.raises(CheckpointError, match=r"step 4 could not be written \(\[Errno 28\] No space left on device\).*latest is still"):
        save_checkpoint(tmp_path, _Learners(full), _State(4), cfg.checkpoint.keep_last)
    # What was written of step 4 is gone (it would hold the space the next save needs).
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == [previous.name]
    assert latest_sound_checkpoint(tmp_path) == previous


def test_a_failed_publish_removes_the_staging_folder(tmp_path, monkeypatch):
    import errno

    import moalign.checkpoint
    from actors.calls import save_checkpoint
    from moalign.checkpoint import CheckpointError
    from moalign.config import load_config

    cfg = load_config(None, [f"run_dir={tmp_path}"])

    class Saves:
        def call(self, method, path, step):
            os.makedirs(path)

    def full(path, payload):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(moalign.checkpoint, "write_json", full)
    with pytest.raises(CheckpointError, match="there is no earlier checkpoint"):
        save_checkpoint(tmp_path, Saves(), _State(1), cfg.checkpoint.keep_last)
    assert list((tmp_path / "checkpoints").iterdir()) == [] and latest_checkpoint(tmp_path) is None


def test_a_learner_lost_while_saving_is_not_a_write_failure(tmp_path):
    from ray.exceptions import ActorDiedError

    from actors.calls import save_checkpoint
    from actors.ray_actors import ActorFailure
    from moalign.config import load_config

    lost = ActorFailure("learner", 0, 3, "save_checkpoint", "the actor died")
    lost.__cause__ = ActorDiedError()
    with pytest.raises(ActorFailure) as err:
        save_checkpoint(tmp_path, _Learners(lost), _State(3), load_config(None, [f"run_dir={tmp_path}"]).checkpoint.keep_last)
    assert err.value.actor_lost and list((tmp_path / "checkpoints").iterdir()) == []
