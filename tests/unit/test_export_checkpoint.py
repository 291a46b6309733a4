"""The export command's check that a checkpoint's learner state belongs to it; the learner is a
stand-in here (the real export is tested end to end in tests/integration/test_loop.py)."""

from __future__ import annotations

import pytest

from loops import export_checkpoint as export


class StandInLearner:
    def __init__(self, updates: int):
        self.updates = updates
        self.exported = []

    def __call__(self, *args, **kwargs):
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def load_checkpoint(self, path, weights_only=False):
        self.step = self.updates

    def export_policy(self, dest, card):
        self.exported.append((dest, card))


def test_a_step_without_pairs_leaves_the_learner_behind_and_still_exports(monkeypatch, tmp_path):
    # Step 97 of a run kept no pair, so its step-160 checkpoint holds the learner's 159th update.
    learner = StandInLearner(updates=159)
    monkeypatch.setattr(export, "Learner", learner)
    export._export_rank(None, "model", tmp_path, 160, tmp_path / "out", {"step": 160}, 0, 1, None)
    assert learner.exported == [(str(tmp_path / "out"), {"step": 160})]


def test_a_learner_ahead_of_its_checkpoint_is_refused(monkeypatch, tmp_path):
    monkeypatch.setattr(export, "Learner", StandInLearner(updates=161))
    with pytest.raises(RuntimeError, match="update 161, past the checkpoint's step 160"):
        export._export_rank(None, "model", tmp_path, 160, tmp_path / "out", {}, 0, 1, None)
