import pytest

from moalign.config import ConfigError, load_config, save_resolved
from orchestrator import _check_resume_config, _check_supported, _chunks, _merge_rank_metrics


def test_chunks_cover_range_evenly():
    parts = _chunks(10, 3)
    assert [(s.start, s.stop) for s in parts] == [(0, 3), (3, 7), (7, 10)]
    sizes = [s.stop - s.start for s in _chunks(2, 4)]
    assert sum(sizes) == 2 and max(sizes) - min(sizes) <= 1


def _rank(pairs, objective, chosen, kl, seconds):
    return {
        "pairs": pairs, "objective": objective, "chosen_reward_sum": chosen, "rejected_reward_sum": 0.0, "margin_sum": chosen,
        "accuracy_sum": pairs, "kl_sum": kl, "grad_norm": 2.0, "lr": 0.1, "step": 5, "seconds": seconds,
    }


def test_merge_rank_metrics_from_sums():
    merged = _merge_rank_metrics([_rank(3, 0.4, 3.0, 6.0, 1.0), _rank(1, 0.2, 1.0, 2.0, 2.0)])
    assert merged["loss"] == pytest.approx(0.6)
    assert merged["chosen_reward"] == pytest.approx(1.0) and merged["accuracy"] == 1.0
    assert merged["kl"] == pytest.approx(1.0)
    assert merged["grad_norm"] == 2.0 and merged["time/learner_compute_s"] == 2.0


def test_resume_config_check(tmp_path):
    saved = load_config(None, ["steps=2"])
    save_resolved(saved, tmp_path / "config.yaml")
    _check_resume_config(load_config(None, ["steps=10", "logging.level=DEBUG", "checkpoint.keep_last=5"]), tmp_path / "config.yaml")
    with pytest.raises(ConfigError, match=r"changed: rollout\.temperature\)"):
        _check_resume_config(load_config(None, ["rollout.temperature=0.5"]), tmp_path / "config.yaml")
    with pytest.raises(ConfigError, match=r"changed: checkpoint\.every_steps"):
        _check_resume_config(load_config(None, ["checkpoint.every_steps=3"]), tmp_path / "config.yaml")


def test_offline_algorithms_are_not_run_as_mo_odpo():
    _check_supported(load_config(None, []))
    with pytest.raises(ConfigError, match="algorithm.name: 'mopo'"):
        _check_supported(load_config(None, ["algorithm.name=mopo"]))


def test_main_reports_bad_config_and_exits_2(caplog):
    from orchestrator import main

    assert main(["rollout.samples_per_prompt=1"]) == 2
    assert "rollout.samples_per_prompt" in caplog.text
