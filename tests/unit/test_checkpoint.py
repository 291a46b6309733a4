import pytest

from moalign.checkpoint import latest_checkpoint, list_checkpoints, publish, read_state, staging_dir


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
