import dataclasses
import json
import math

import numpy as np
import pytest

from actors.calls import chunks, merge_rank_metrics
from actors.cluster import actor_env
from loops.online_loop import Rollout, check_same_prompts, check_supported, kl_probes, learn, report, summarize, training_lines
from moalign.config import ConfigError, check_resume_config, load_config, save_resolved
from moalign.health import HealthMonitor
from moalign.objectives import DPOObjective
from moalign.pairs import Pair


def test_chunks_cover_range_evenly():
    parts = chunks(10, 3)
    assert [(s.start, s.stop) for s in parts] == [(0, 3), (3, 7), (7, 10)]
    sizes = [s.stop - s.start for s in chunks(2, 4)]
    assert sum(sizes) == 2 and max(sizes) - min(sizes) <= 1


def _rank(pairs, objective, chosen, kl, seconds, kl_samples=0, logratio=0.0):
    return {
        "pairs": pairs,
        "micro_batches": pairs,
        "objective": objective,
        "chosen_reward_sum": chosen,
        "rejected_reward_sum": 0.0,
        "margin_sum": chosen,
        "accuracy_sum": pairs,
        "kl_sum": kl,
        "kl_samples": kl_samples,
        "pair_logratio_sum": logratio,
        "grad_norm": 2.0,
        "lr": 0.1,
        "step": 5,
        "seconds": seconds,
    }


def test_merge_rank_metrics_from_sums():
    merged = merge_rank_metrics([_rank(3, 0.4, 3.0, 6.0, 1.0, 4, 12.0), _rank(1, 0.2, 1.0, 2.0, 2.0, 4, -4.0)], DPOObjective)
    assert merged["loss"] == pytest.approx(0.6)
    assert merged["chosen_reward"] == pytest.approx(1.0) and merged["accuracy"] == 1.0
    # The KL over the ranks' samples (8), the pairs' log-ratio over their answers (2 x 4 pairs).
    assert merged["kl"] == pytest.approx(1.0) and merged["pair_logratio"] == pytest.approx(1.0)
    assert math.isnan(merge_rank_metrics([_rank(1, 0.2, 1.0, 0.0, 1.0)], DPOObjective)["kl"])
    assert merged["grad_norm"] == 2.0 and merged["time/learner_compute_s"] == 2.0 and merged["micro_batches"] == 3
    # The order metrics.jsonl has always had: the objective's own figures between the loss and the KL.
    assert list(merged) == [
        "loss", "chosen_reward", "rejected_reward", "margin", "accuracy", "kl", "pair_logratio", "grad_norm", "lr", "learner_step",
        "micro_batches", "time/learner_compute_s",
    ]  # fmt: skip


def test_resume_config_check(tmp_path):
    saved = load_config(None, ["steps=2"])
    save_resolved(saved, tmp_path / "config.yaml")
    check_resume_config(
        load_config(None, ["steps=10", "logging.level=DEBUG", "checkpoint.keep_last=5", "health.max_kl=20"]), tmp_path / "config.yaml"
    )
    with pytest.raises(ConfigError, match=r"changed: rollout\.temperature\)"):
        check_resume_config(load_config(None, ["rollout.temperature=0.5"]), tmp_path / "config.yaml")
    with pytest.raises(ConfigError, match=r"changed: checkpoint\.every_steps"):
        check_resume_config(load_config(None, ["checkpoint.every_steps=3"]), tmp_path / "config.yaml")


def test_offline_algorithms_are_not_run_as_mo_odpo():
    check_supported(load_config(None, []))
    with pytest.raises(ConfigError, match="algorithm.name: 'mopo' is an offline algorithm.*python offline.py --config"):
        check_supported(load_config(None, ["algorithm.name=mopo"]))


def test_each_command_refuses_the_other_loops_config_and_names_the_right_command(tmp_path, caplog):
    import offline
    from orchestrator import main

    assert main([f"run_dir={tmp_path / 'a'}", "algorithm.name=mopo"]) == 2
    assert "python offline.py --config" in caplog.text and not (tmp_path / "a").exists()
    caplog.clear()
    assert offline.main([f"run_dir={tmp_path / 'b'}"]) == 2
    assert "python orchestrator.py --config" in caplog.text and not (tmp_path / "b").exists()


def test_main_reports_bad_config_and_exits_2(caplog):
    from orchestrator import main

    assert main(["rollout.samples_per_prompt=1"]) == 2
    assert "rollout.samples_per_prompt" in caplog.text


def _history(kl_values):
    return [
        {
            "step": i + 1,
            "reward/Relevance": 0.1 * i,
            "health/distinct_fraction": 1.0 - 0.1 * i,
            "health/tied_share": 0.0,
            "health/completion_tokens_mean": 38.0 - 3 * i,
            "health/length_capped_share": 0.0,
            "health/empty_share": 0.0,
            **({"health/kl": kl} if kl is not None else {}),
        }
        for i, kl in enumerate(kl_values)
    ]


def _summary(history, monitor):
    return {
        "run_dir": "r",
        "checkpoint": "c",
        "export": "r/final",
        "steps": len(history),
        "version": 1,
        **summarize(history, ["Relevance"], monitor),
        "history": history,
    }


def test_summary_compares_health_of_first_and_last_quarter():
    summary = summarize(_history([None, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]), ["Relevance"], HealthMonitor())
    assert summary["reward_window_steps"] == 2
    assert summary["reward_start"]["Relevance"] == pytest.approx(0.05) and summary["reward_end"]["Relevance"] == pytest.approx(0.65)
    assert summary["health_start"]["distinct_fraction"] == pytest.approx(0.95)
    assert summary["health_end"]["completion_tokens_mean"] == pytest.approx(18.5)
    # Step 1 took no learner update: the first quarter's KL is step 2's alone.
    assert summary["health_start"]["kl"] == 1.0 and summary["health_end"]["kl"] == 6.5
    assert summary["health_warnings"] == [] and summary["health_crossed_at_end"] == []
    assert summarize(_history([None, None]), ["Relevance"], HealthMonitor())["health_start"]["kl"] is None


def test_report_puts_a_warning_under_the_rewards_when_a_bound_was_crossed(caplog):
    monitor = HealthMonitor(max_kl=5.0, window_steps=1)
    monitor.observe(7, {"kl": 27.0})
    history = _history([1.0, 27.0])
    with caplog.at_level("INFO", logger="moalign"):
        report(_summary(history, monitor))
    lines = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "moalign"]
    after_rewards = lines[[i for i, (_, m) in enumerate(lines) if m.startswith("reward Relevance")][-1] + 1]
    assert after_rewards[0] == "WARNING" and "crossed 1 time(s)" in after_rewards[1] and "still crossed at the end: kl" in after_rewards[1]
    assert any(level == "WARNING" and "step 7" in m and "KL runaway" in m for level, m in lines)
    assert any(m.startswith("health kl") and "start    1.000" in m and "+26.000" in m for _, m in lines)


def test_report_says_none_when_healthy(caplog):
    with caplog.at_level("INFO", logger="moalign"):
        report(_summary(_history([1.0] * 8), HealthMonitor()))
    assert "health: no bound crossed" in caplog.text and "health warnings: none" in caplog.text
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


class _DoneGeneration:
    def __init__(self, samples):
        self._samples = samples

    def samples(self):
        return self._samples


def _rollout(version, tags):
    samples = [[{"token_ids": [1, 2], "text": "a", "finish_reason": "stop", "version": v} for v in tags]]
    return Rollout(3, [4], np.array([[0.25, 0.75]]), [[7, 8, 9]], version, 1, (0, 8), _DoneGeneration(samples))


def _done_rollout(prompt_ids, samples, kl_prompt_ids=None, kl_samples=None, weights=None, drawn=None):
    weights = np.full((len(prompt_ids), 2), 0.5) if weights is None else np.asarray(weights, dtype=float)
    kl_generation = None if kl_samples is None else _DoneGeneration(kl_samples)
    if kl_prompt_ids is not None and drawn is None:
        drawn = np.full((len(kl_prompt_ids), 2), 0.5)
    return Rollout(
        1,
        list(range(len(prompt_ids))),
        weights,
        prompt_ids,
        0,
        0,
        None,
        _DoneGeneration(samples),
        drawn_weights=drawn,
        kl_prompt_ids=kl_prompt_ids,
        kl_generation=kl_generation,
    )


def test_kl_samples_are_taken_under_the_sampled_weights_the_draw_or_both():
    """`kl_probes`: each prompt's first kl_samples_per_prompt samples under the prompt it was
    sampled with; with KL samples taken under the draw too, those (`drawn`) or both."""
    samples, under_draw = _samples(2, 3), [[{**s, "token_ids": [s["token_ids"][0] + 50]} for s in g[:2]] for g in _samples(2, 2)]
    sampled, drawn = [[1, b] for b in range(2)], [[9, b] for b in range(2)]
    mine = [(sampled[b], [100 * b + j, 7], 0.0) for b in range(2) for j in range(2)]
    theirs = [(drawn[b], [100 * b + j + 50], 0.0) for b in range(2) for j in range(2)]
    settings = ["algorithm.kl_samples_per_prompt=2", "algorithm.warm_start_steps=1", "conditioning.warm_start_weights=corners"]
    for setting, want in (("sampled", mine), ("drawn", theirs), ("sampled_and_drawn", mine + theirs)):
        cfg = load_config(None, [*settings, f"algorithm.kl_sample_weights={setting}"])
        # A step sampled under its draw has no KL samples of its own: every setting reads its samples.
        assert kl_probes(cfg, _done_rollout(sampled, samples)) == mine
        if setting != "sampled":
            assert kl_probes(cfg, _done_rollout(sampled, samples, drawn, under_draw)) == want
    # Checkpointed with the samples, as the samples are.
    rollout = _done_rollout(sampled, samples, drawn, under_draw)
    rollout.wait()
    again = Rollout.from_state(json.loads(json.dumps(rollout.state_dict())))
    assert (again.kl_prompt_ids, again.kl_samples) == (drawn, under_draw) and kl_probes(cfg, again) == mine + theirs
    for bad, why in (
        (["algorithm.kl_samples_per_prompt=0"], "set algorithm.kl_samples_per_prompt above 0"),
        (["conditioning.warm_start_weights=drawn"], "only warm-start steps that sample under the corners have a draw"),
    ):
        with pytest.raises(ConfigError, match=f"kl_sample_weights: drawn takes KL samples under the draw; {why}"):
            load_config(None, [*settings, "algorithm.kl_sample_weights=drawn", *bad])


def test_a_corner_can_have_its_own_kl_coefficient():
    """`algorithm.corner_kl_coef`: KL samples under an objective's corner (sampled there, or drawn
    there) take that objective's coefficient, every other sample `kl_coef`; the learner is sent
    one per sample, through the text trimming, and none are sent without the setting."""
    settings = ["algorithm.kl_samples_per_prompt=2", "algorithm.kl_coef=0.015", "algorithm.kl_penalty_tokens=text"]
    cfg = load_config(None, [*settings, "algorithm.corner_kl_coef={Conciseness: 0.05}"])
    assert cfg.objective_names == ["Relevance", "Conciseness", "Positivity"]
    samples = _samples(4, 3)
    sampled = [[1, b] for b in range(4)]
    # Relevance's corner, Conciseness', between them, and Conciseness' again.
    weights = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.3, 0.7, 0.0], [0.0, 1.0, 0.0]]
    probes = kl_probes(cfg, _done_rollout(sampled, samples, weights=weights))
    assert [p.coef for p in probes] == [0.015] * 2 + [0.05] * 2 + [0.015] * 2 + [0.05] * 2
    assert [(p.prompt_ids, p.completion_ids) for p in probes] == [(sampled[b], [100 * b + j, 7]) for b in range(4) for j in range(2)]
    # Under the draw the draw's corners count, not the sampled weights'.
    drawn_cfg = load_config(
        None,
        [
            *settings,
            "algorithm.corner_kl_coef={Conciseness: 0.05}",
            "algorithm.warm_start_steps=1",
            "conditioning.warm_start_weights=corners",
            "algorithm.kl_sample_weights=drawn",
        ],
    )
    draw = [[0.0, 1.0, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]]
    under_draw = kl_probes(drawn_cfg, _done_rollout(sampled, samples, sampled, samples, weights=weights, drawn=draw))
    assert [p.coef for p in under_draw] == [0.05] * 2 + [0.015] * 4 + [0.05] * 2
    learners = _RecordingLearners(2)
    pairs = [Pair(prompt=p, chosen=1, rejected=2, loss_weight=1.0, objective=None) for p in (0, 1, 2, 3)]
    learn(cfg, learners, sampled, samples, pairs, 3, False, probes, eos_id=7)
    sent = [(c, k) for b in learners.batches for c, k in zip(b["kl_completion_ids"], b["kl_coefs"])]
    assert sent == [([100 * b + j], 0.05 if b % 2 else 0.015) for b in range(4) for j in range(2)]
    plain = load_config(None, settings)
    learn(plain, learners, sampled, samples, pairs, 3, False, kl_probes(plain, _done_rollout(sampled, samples, weights=weights)), eos_id=7)
    assert all("kl_prompt_ids" in b and "kl_coefs" not in b for b in learners.batches)
    for bad, why in (
        (["algorithm.corner_kl_coef={Detial: 0.05}"], "'Detial' is not an objective; the objectives are"),
        (
            ["algorithm.corner_kl_coef={Conciseness: -1}"],
            "algorithm.corner_kl_coef.Conciseness: Input should be greater than or equal to 0",
        ),
        (
            ["algorithm.corner_kl_coef={Conciseness: .nan}"],
            "algorithm.corner_kl_coef.Conciseness: Input should be less than or equal to 100",
        ),
        (["algorithm.corner_kl_coef={Conciseness: 0.05}", "algorithm.kl_samples_per_prompt=0"], "set that above 0"),
        (["algorithm.name=mopo", "algorithm.corner_kl_coef={Conciseness: 0.05}"], "algorithm.corner_kl_coef: not used by mopo"),
    ):
        with pytest.raises(ConfigError, match=why):
            load_config(None, ["algorithm.kl_samples_per_prompt=2", *bad])


def test_rollout_round_trips_through_a_checkpoint_once_generated():
    rollout = _rollout(2, [2, 2])
    with pytest.raises(RuntimeError, match="step 3 is still generating"):
        rollout.state_dict()
    rollout.wait()
    again = Rollout.from_state(json.loads(json.dumps(rollout.state_dict())))
    assert again.samples == rollout.samples and again.wait() == rollout.samples
    assert (again.step, again.prompt_indices, again.prompt_ids, again.version, again.policy_step) == (3, [4], [[7, 8, 9]], 2, 1)
    assert again.drawn_from == (0, 8)
    np.testing.assert_array_equal(again.weights, rollout.weights)
    assert again.drawn_weights is None
    rollout.drawn_weights = np.array([[0.6, 0.4]])
    again = Rollout.from_state(json.loads(json.dumps(rollout.state_dict())))
    np.testing.assert_array_equal(again.drawn_weights, rollout.drawn_weights)


def test_rollout_from_another_policy_version_is_refused():
    with pytest.raises(RuntimeError, match=r"step 3: samples from policy version\(s\) \[1, 2\], expected 2"):
        _rollout(2, [1, 2]).wait()


def test_actor_threads_follow_the_cpu_allotment_unless_set():
    cfg = load_config(None, [])
    assert [actor_env(cfg, cpus)["env_vars"]["OMP_NUM_THREADS"] for cpus in (0.5, 1, 2, 2.5)] == ["1", "1", "2", "3"]
    assert actor_env(load_config(None, ["actors.omp_threads=4"]), 1)["env_vars"]["OMP_NUM_THREADS"] == "4"
    # Idle threads sleep: spinning pools that share cores stalled steps 5x beside a busy process.
    assert actor_env(cfg, 1)["env_vars"]["OMP_WAIT_POLICY"] == "PASSIVE"


def test_a_resumed_run_refuses_a_changed_prompt_file(tmp_path):
    from moalign.checkpoint import file_sha256
    from moalign.data import DataError

    prompts = tmp_path / "train.jsonl"
    prompts.write_text('{"prompt": "a"}\n{"prompt": "b"}\n')
    cfg = load_config(None, [f"data.train_path={prompts}"])
    saved = {"step": 6, "prompts_sha256": file_sha256(prompts)}
    check_same_prompts(cfg, saved, file_sha256(prompts))
    check_same_prompts(cfg, {"step": 6}, file_sha256(prompts))  # a checkpoint from before the hash
    prompts.write_text('{"prompt": "b"}\n{"prompt": "a"}\n')
    with pytest.raises(DataError, match=r"train\.jsonl changed since the checkpoint of step 6"):
        check_same_prompts(cfg, saved, file_sha256(prompts))


def test_metrics_rewind_drops_the_steps_to_be_redone(tmp_path):
    from actors.metrics import MetricsSink, read_metrics

    sink = MetricsSink(tmp_path, "run", tensorboard=True, ray_metrics=False)
    for step in (1, 2, 3):
        sink.log(step, {"loss": float(step)})
    sink.rewind(1)
    sink.log(2, {"loss": 20.0})
    sink.close()
    assert [(m["step"], m["loss"]) for m in read_metrics(tmp_path)] == [(1, 1.0), (2, 20.0)]
    # A resume opens the history where its checkpoint left it.
    MetricsSink(tmp_path, "run", tensorboard=False, ray_metrics=False, resume_step=1).close()
    assert [m["step"] for m in read_metrics(tmp_path)] == [1]


def test_node_labels_become_a_label_selector_only_when_given():
    from actors.cluster import _placed

    assert _placed({}) == {}
    assert _placed({"moalign-role": "generator"}) == {"label_selector": {"moalign-role": "generator"}}


class _RecordingLearners:
    """Stands in for a learner group: records each rank's batch and answers with neutral sums."""

    def __init__(self, ranks):
        self.ranks, self.batches = ranks, []

    def __len__(self):
        return self.ranks

    def call_each(self, method, shards, step):
        assert method == "train_step" and len(shards) == self.ranks
        self.batches = [batch for (batch,) in shards]
        return [
            _rank(len(b["prompt_ids"]), 0.1, 0.0, float(len(b.get("kl_prompt_ids", []))), 1.0, len(b.get("kl_prompt_ids", [])))
            for b in self.batches
        ]


def _samples(prompts, n):
    return [[{"token_ids": [100 * b + j, 7], "text": "x", "finish_reason": "stop", "version": 0} for j in range(n)] for b in range(prompts)]


def test_learn_builds_the_warm_start_batch_and_the_kl_samples():
    """`learn` on two ranks: pairs split in order; the warm start's rejected side is one token;
    the KL samples are each prompt's first draws under the prompt they were sampled with."""
    cfg = load_config(None, ["algorithm.kl_samples_per_prompt=2"])
    samples = _samples(3, 4)
    sampled = [[1, b] for b in range(3)]
    # Relabelled layout: weight set j's prompt b is j * 3 + b (the corner lines in the warm start).
    lines = [[2, j, b] for j in range(2) for b in range(3)]
    pairs = [Pair(prompt=p, chosen=1, rejected=2, loss_weight=1.0, objective=None) for p in (0, 4, 5, 2)]
    learners = _RecordingLearners(2)
    probes = kl_probes(cfg, _done_rollout(sampled, samples))
    merged = learn(cfg, learners, lines, samples, pairs, 3, True, probes)
    first, second = learners.batches
    assert first["prompt_ids"] == [[2, 0, 0], [2, 1, 1]] and second["prompt_ids"] == [[2, 1, 2], [2, 0, 2]]
    assert first["chosen_ids"] == [[1, 7], [101, 7]] and first["rejected_ids"] == [[2], [102]]
    assert first["supervised"] and first["total_weight"] == second["total_weight"] == 4.0
    probes = [(p, c) for b in learners.batches for p, c in zip(b["kl_prompt_ids"], b["kl_completion_ids"])]
    assert probes == [([1, b], [100 * b + j, 7]) for b in range(3) for j in range(2)]
    assert merged["kl"] == pytest.approx(1.0)
    # The penalty on the text alone: each KL sample's closing end-of-sequence token (7 here) left
    # out, and a sample that is nothing but that token dropped.
    text = load_config(None, ["algorithm.kl_samples_per_prompt=2", "algorithm.kl_coef=0.01", "algorithm.kl_penalty_tokens=text"])
    ended = [[{**s, "token_ids": [7]} if (b, j) == (2, 0) else s for j, s in enumerate(group)] for b, group in enumerate(samples)]
    learn(text, learners, lines, ended, pairs, 3, True, kl_probes(text, _done_rollout(sampled, ended)), eos_id=7)
    probes = [(p, c) for b in learners.batches for p, c in zip(b["kl_prompt_ids"], b["kl_completion_ids"])]
    assert probes == [([1, b], [100 * b + j]) for b in range(3) for j in range(2) if (b, j) != (2, 0)]
    with pytest.raises(ValueError, match="kl_penalty_tokens: text leaves out the end-of-sequence token; pass eos_id"):
        learn(text, learners, lines, samples, pairs, 3, True, probes)
    with pytest.raises(ConfigError, match="kl_penalty_tokens: text shapes the KL penalty; set algorithm.kl_coef above 0"):
        load_config(None, ["algorithm.kl_penalty_tokens=text"])

    # DPO steps keep the whole rejected answer; without KL samples none are sent.
    learn(cfg, learners, lines, samples, pairs, 4)
    assert learners.batches[0]["rejected_ids"] == [[2, 7], [102, 7]] and "supervised" not in learners.batches[0]
    assert "kl_prompt_ids" not in learners.batches[0]
    # With pair_tokens_past_parting both answers end that many tokens past where they differ
    # (here their first token); the warm start's labels stay whole.
    cut = load_config(None, ["algorithm.pair_tokens_past_parting=1"])
    learn(cut, learners, lines, samples, pairs, 4)
    assert learners.batches[0]["chosen_ids"] == [[1], [101]] and learners.batches[0]["rejected_ids"] == [[2], [102]]
    learn(cut, learners, lines, samples, pairs, 3, True)
    assert learners.batches[0]["chosen_ids"] == [[1, 7], [101, 7]] and learners.batches[0]["rejected_ids"] == [[2], [102]]
    # A warm start on stop decisions: DPO pairs that differ by the end-of-sequence token alone,
    # whichever side stops, marked as warm-start steps (the rows' rate) and not supervised.
    stops = [[{"token_ids": ids, "text": "x", "finish_reason": "stop", "version": 0} for ids in ([5, 6, 7, 8], [5, 6, 0])]]
    for chosen, rejected, want in ((1, 0, ([5, 6, 0], [5, 6])), (0, 1, ([5, 6], [5, 6, 0]))):
        pair = Pair(prompt=0, chosen=chosen, rejected=rejected, loss_weight=1.0, objective=0)
        learn(cfg, learners, [[2, 0, 0]], stops, [pair], 3, stop_decisions=True, eos_id=0)
        [batch] = [b for b in learners.batches if b["prompt_ids"]]
        assert (batch["chosen_ids"][0], batch["rejected_ids"][0]) == want
        assert batch["warm_start"] and "supervised" not in batch
    with pytest.raises(ValueError, match="stop_decisions cuts each pair at the end-of-sequence token; pass eos_id"):
        learn(cfg, learners, [[2, 0, 0]], stops, [pair], 3, stop_decisions=True)
    # A line-break variant against its sample: cut at the line-break token (9 here), not the EOS.
    breaks = [[*stops[0], {"token_ids": [5, 6, 9, 7, 8], "text": "x", "finish_reason": "stop", "version": 0, "break_of": 0}]]
    learn(
        cfg, learners, [[2, 0, 0]], breaks, [Pair(0, 2, 0, 1.0, 1), Pair(0, 1, 0, 1.0, 0)], 3, stop_decisions=True, eos_id=0, newline_id=9
    )
    cut = [(c, r) for b in learners.batches for c, r in zip(b["chosen_ids"], b["rejected_ids"])]
    assert cut == [([5, 6, 9], [5, 6]), ([5, 6, 0], [5, 6])]
    with pytest.raises(ValueError, match="a line-break pair is cut at the line-break token; pass newline_id"):
        learn(cfg, learners, [[2, 0, 0]], breaks, [Pair(0, 2, 0, 1.0, 1)], 3, stop_decisions=True, eos_id=0)
    # Soft labels: each DPO pair (and stop decision) carries sigmoid(scale * gap); labels have none.
    soft = load_config(None, ["algorithm.preference_label_scale=0.5"])
    gapped = [dataclasses.replace(p, gap=g) for p, g in zip(pairs, (2.0, 0.0, 4.0, 1.0))]
    learn(soft, learners, lines, samples, gapped, 4)
    labels = [v for b in learners.batches for v in b["chosen_probability"]]
    assert labels == pytest.approx([1 / (1 + math.exp(-0.5 * g)) for g in (2.0, 0.0, 4.0, 1.0)])
    learn(soft, learners, [[2, 0, 0]], stops, [dataclasses.replace(pair, gap=2.0)], 3, stop_decisions=True, eos_id=0)
    assert [b["chosen_probability"] for b in learners.batches if b["prompt_ids"]] == [[pytest.approx(1 / (1 + math.exp(-1.0)))]]
    learn(soft, learners, lines, samples, gapped, 3, True)
    assert all("chosen_probability" not in b for b in learners.batches)


def test_sentence_prefixes_need_an_eos_token_before_any_actor_starts(monkeypatch, tmp_path):
    """A tokenizer without an end-of-sequence token cannot close a prefix: a config error naming
    the setting and the model, raised before the prompts are read or any actor starts."""
    import orchestrator

    class NoEos:
        eos_token_id = None

    def fail(*args, **kwargs):
        raise AssertionError("reached past the check")

    monkeypatch.setattr(orchestrator, "open_run", lambda cfg, address: (tmp_path, None, "the/model", NoEos()))
    monkeypatch.setattr(orchestrator, "load_fitted_prompts", fail)
    with pytest.raises(ConfigError, match="algorithm.sentence_prefixes: the tokenizer of the/model names no end-of-sequence token"):
        orchestrator.run(load_config(None, ["algorithm.sentence_prefixes=2"]))
    # Without prefixes the same tokenizer passes the check.
    with pytest.raises(AssertionError, match="reached past the check"):
        orchestrator.run(load_config(None, []))
    # Line-break decisions need a line break that is one token: checked there too.

    class TwoTokenBreak:
        eos_token_id = 0

        def encode(self, text, add_special_tokens=True):
            return [5, 6]

    monkeypatch.setattr(orchestrator, "open_run", lambda cfg, address: (tmp_path, None, "the/model", TwoTokenBreak()))
    stops = ["steps=2", "algorithm.warm_start_steps=2", "algorithm.warm_start_pairs=stop_decisions", "algorithm.sentence_prefixes=2"]
    with pytest.raises(ConfigError, match=r"algorithm.line_break_variants: the tokenizer of the/model: a line break encodes as 2 tokens"):
        orchestrator.run(load_config(None, [*stops, "algorithm.line_break_variants=2"]))
    with pytest.raises(AssertionError, match="reached past the check"):
        orchestrator.run(load_config(None, stops))


def test_training_lines_number_the_prompts_of_each_kind_of_step():
    from moalign.conditioning import DirichletSampler

    drawn = np.array([[0.7, 0.3], [0.2, 0.8]])
    corners = [np.array([[1.0, 0.0], [1.0, 0.0]]), np.array([[0.0, 1.0], [0.0, 1.0]])]

    def lines(supervised, *overrides, sampled_under=None):
        cfg = load_config("configs/default.yaml", list(overrides))
        weights = drawn if sampled_under is None else sampled_under
        return [line.tolist() for line in training_lines(cfg, DirichletSampler(2), weights, supervised, drawn, 1)]

    # The demo's warm start: the corners alone; its DPO: the drawn line, then each prompt's neglected corner.
    assert lines(True) == [c.tolist() for c in corners]
    assert lines(False) == [drawn.tolist(), [[0.0, 1.0], [1.0, 0.0]]]
    assert lines(True, "algorithm.warm_start_lines=drawn_and_corners") == [drawn.tolist(), *(c.tolist() for c in corners)]
    # Sampled under the corners, the drawn line is still the draw, not the corner it was sampled under.
    cycled = np.eye(2)
    both = lines(True, "algorithm.warm_start_lines=drawn_and_corners", sampled_under=cycled)
    assert both == [drawn.tolist(), *(c.tolist() for c in corners)]
    # `sampled`: each prompt under the weights it was sampled with, alone.
    assert lines(True, "algorithm.warm_start_lines=sampled", sampled_under=cycled) == [cycled.tolist()]
    assert lines(False, "algorithm.relabel_weights=0", "algorithm.relabel_keep=all") == [drawn.tolist()]
    fresh = lines(False, "algorithm.relabel_source=dirichlet")
    assert fresh[0] == drawn.tolist() and len(fresh) == 2 and np.allclose(np.sum(fresh[1], axis=1), 1)


def test_a_corner_can_end_its_warm_start_before_the_others():
    """`algorithm.corner_warm_start_steps`: a corner's line trains up to its own step and is left
    out after it (the pairs then number the remaining lines' prompts); bad settings are refused."""
    from moalign.conditioning import DirichletSampler

    drawn = np.array([[0.7, 0.3], [0.2, 0.8]])
    conciseness, detail = ([[1.0, 0.0], [1.0, 0.0]], [[0.0, 1.0], [0.0, 1.0]])
    cfg = load_config("configs/default.yaml", ["algorithm.corner_warm_start_steps={Detail: 30}"])
    assert cfg.algorithm.warm_start_steps == 40

    def lines(step, config=cfg):
        return [line.tolist() for line in training_lines(config, DirichletSampler(2), drawn, True, drawn, step)]

    assert lines(1) == lines(30) == [conciseness, detail]
    assert lines(31) == lines(40) == [conciseness]
    both = load_config(
        "configs/default.yaml", ["algorithm.corner_warm_start_steps={Detail: 30}", "algorithm.warm_start_lines=drawn_and_corners"]
    )
    assert lines(31, both) == [drawn.tolist(), conciseness]
    # The DPO steps after the warm start keep their lines.
    assert [line.tolist() for line in training_lines(cfg, DirichletSampler(2), drawn, False, None, 41)][0] == drawn.tolist()
    for bad, why in (
        (["algorithm.corner_warm_start_steps={Detial: 30}"], "'Detial' is not an objective; the objectives are"),
        (["algorithm.corner_warm_start_steps={Detail: 0}"], "corner_warm_start_steps.Detail: Input should be greater than or equal to 1"),
        (["algorithm.corner_warm_start_steps={Detail: 40}"], "Detail: 40 ends the corner's warm start at or after"),
        (["algorithm.corner_warm_start_steps={Detail: 30, Conciseness: 20}"], "steps 31-40 would train nothing"),
        (
            ["algorithm.corner_warm_start_steps={Detail: 30}", "algorithm.warm_start_lines=sampled"],
            "warm_start_lines: sampled trains the lines sampled under",
        ),
    ):
        with pytest.raises(ConfigError, match=why):
            load_config("configs/default.yaml", bad)
    with pytest.raises(ConfigError, match="algorithm.corner_warm_start_steps: not used by mopo"):
        load_config(None, ["algorithm.name=mopo", "algorithm.corner_warm_start_steps={Conciseness: 1}"])


class _RecordingGenerators:
    """Stands in for the generator group: records what each step was sent."""

    policy_version = 0

    def __len__(self):
        return 1

    def __init__(self):
        self.sent = []

    def submit_each(self, method, args):
        self.sent += [len(a[0]) for a in args]
        return [None] * len(args)


def test_the_warm_start_draws_its_own_batch_then_the_dpo_steps_theirs(tiny_model):
    from transformers import AutoTokenizer

    from loops.online_loop import LoopState, draw_rollout
    from moalign.conditioning import DirichletSampler
    from moalign.data import PromptCursor, PromptRecord
    from moalign.pairs import RunningNormalizer

    cfg = load_config(
        None,
        [
            f"model.path={tiny_model}",
            "conditioning.style=system_prefix",
            "algorithm.warm_start_steps=2",
            "rollout.warm_start_prompts_per_step=2",
            "rollout.prompts_per_step=8",
            "learner.micro_batch_pairs=2",
        ],
    )
    k = len(cfg.objectives)
    assert [cfg.prompts_for_step(s) for s in (1, 2, 3, 4)] == [2, 2, 8, 8]
    # The learner's capacity is the larger phase: 8 DPO pairs against 2 prompts x k corners.
    assert (cfg.pairs_in_step(True), cfg.pairs_in_step(False), cfg.pairs_per_step) == (2 * k, 8, max(2 * k, 8))
    prompts = [PromptRecord(str(i), f"prompt {i}", None) for i in range(9)]
    state = LoopState(DirichletSampler(k, 1.0, 0), PromptCursor(9, 0), RunningNormalizer(k), HealthMonitor(**cfg.health.model_dump()))
    generators = _RecordingGenerators()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    for _ in range(4):
        state.rollouts.append(draw_rollout(cfg, state, prompts, tokenizer, generators))
    assert generators.sent == [2, 2, 8, 8]
    assert [len(r.prompt_indices) for r in state.rollouts] == [2, 2, 8, 8]
    # Every prompt once before any repeats: the cursor moved on by the batch each step drew.
    drawn = sum((r.prompt_indices for r in state.rollouts), [])
    assert sorted(drawn[:9]) == list(range(9))


def test_the_warm_start_can_sample_under_the_corners(tiny_model):
    from transformers import AutoTokenizer

    from loops.online_loop import LoopState, draw_rollout
    from moalign.conditioning import DirichletSampler
    from moalign.data import PromptCursor, PromptRecord
    from moalign.pairs import RunningNormalizer

    base = [f"model.path={tiny_model}", "conditioning.style=system_prefix", "algorithm.warm_start_steps=1", "learner.micro_batch_pairs=1"]
    prompts = [PromptRecord(str(i), f"prompt {i}", None) for i in range(9)]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    runs = {}
    for setting in ("drawn", "corners", "corners_and_drawn"):
        cfg = load_config(None, [*base, f"conditioning.warm_start_weights={setting}"])
        k = len(cfg.objectives)
        state = LoopState(DirichletSampler(k, 1.0, 0), PromptCursor(9, 0), RunningNormalizer(k), HealthMonitor(**cfg.health.model_dump()))
        for _ in range(2):
            state.rollouts.append(draw_rollout(cfg, state, prompts, tokenizer, _RecordingGenerators()))
        runs[setting] = list(state.rollouts)
    batch = cfg.rollout.prompts_per_step
    # Step 1 (the warm start): prompt b under corner b mod K; step 2 (DPO) draws what it would have.
    np.testing.assert_array_equal(runs["corners"][0].weights, np.eye(k)[np.arange(batch) % k])
    assert not np.array_equal(runs["drawn"][0].weights, runs["corners"][0].weights)
    np.testing.assert_array_equal(runs["drawn"][1].weights, runs["corners"][1].weights)
    # The draw the corners replaced is kept for `warm_start_lines: drawn_and_corners`, and only then.
    np.testing.assert_array_equal(runs["corners"][0].drawn_weights, runs["drawn"][0].weights)
    assert runs["drawn"][0].drawn_weights is None and runs["corners"][1].drawn_weights is None
    assert runs["corners"][0].kl_prompt_ids is None
    # KL samples under the draw: a second generation of kl_samples_per_prompt each, after the
    # samples, on the prompts rendered under the draw; in the DPO step there is none.
    cfg = load_config(None, [*base, "conditioning.warm_start_weights=corners", "algorithm.kl_sample_weights=drawn"])
    state = LoopState(DirichletSampler(k, 1.0, 0), PromptCursor(9, 0), RunningNormalizer(k), HealthMonitor(**cfg.health.model_dump()))
    generators = _RecordingGenerators()
    for _ in range(2):
        state.rollouts.append(draw_rollout(cfg, state, prompts, tokenizer, generators))
    warm, dpo = state.rollouts
    assert generators.sent == [batch, batch, batch] and dpo.kl_prompt_ids is None
    assert warm.kl_prompt_ids == runs["drawn"][0].prompt_ids != warm.prompt_ids
    # Half the prompts under the corners, half under their draws.
    mixed = runs["corners_and_drawn"][0].weights
    on_corner = np.arange(batch) % (2 * k) < k
    np.testing.assert_array_equal(mixed[on_corner], np.eye(k)[np.arange(batch) % k][on_corner])
    np.testing.assert_array_equal(mixed[~on_corner], runs["drawn"][0].weights[~on_corner])
