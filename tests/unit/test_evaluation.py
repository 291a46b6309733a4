"""Pareto evaluation statistics on constructed fronts, the files they are written to, and the
parts of `evaluate.py` that need no actors (settings, base reuse, exit codes)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from moalign.config import load_config, save_resolved
from moalign.pareto_report import (
    eval_weights,
    front_metrics,
    front_stats,
    kl_stats,
    plot_fronts,
    spread_is_clear,
    steerability_table,
    weights_label,
    write_front,
)

REPO = Path(__file__).resolve().parents[2]
NAMES3 = ["A", "B", "C"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def synthetic_front(slope: float, n_prompts: int = 24, samples: int = 2, noise: float = 0.1, seed: int = 0):
    """reward_k = 0.3 + slope * w_k + a per-prompt offset + sample noise, on the K=3, d=3 lattice."""
    rng = np.random.default_rng(seed)
    weights = eval_weights(3, 3)
    prompt_offset = rng.normal(0, 0.05, (1, n_prompts, 1, 3))
    rewards = 0.3 + slope * weights[:, None, None, :] + prompt_offset + rng.normal(0, noise, (len(weights), n_prompts, samples, 3))
    return weights, rewards


# ------------------------------------------------------------------------------------ weights


@pytest.mark.parametrize("k", [2, 3, 4])
@pytest.mark.parametrize("divisions", [1, 2, 3, 4])
def test_eval_weights_hold_lattice_corners_and_centre(k, divisions):
    w = eval_weights(k, divisions)
    rows = {tuple(r) for r in w.tolist()}
    assert len(rows) == len(w), "duplicates"
    for corner in np.eye(k):
        assert tuple(corner) in rows
    centre = np.full(k, 1.0 / k)
    assert np.any(np.all(np.abs(w - centre) <= 0.01 + 1e-12, axis=1)), "centre missing"
    assert np.allclose(w.sum(axis=1), 1.0) and np.all(w >= 0)
    # Rounded as the conditioning writes them: two decimals.
    assert np.allclose(w, np.round(w, 2))


def test_eval_weights_adds_the_centre_only_when_missing():
    assert len(eval_weights(3, 3)) == 10  # the lattice already holds (1/3, 1/3, 1/3)
    assert len(eval_weights(3, 2)) == 7  # 6 lattice points + the centre
    assert eval_weights(2, 1).tolist() == [[0.0, 1.0], [1.0, 0.0], [0.5, 0.5]]
    assert eval_weights(3, 3, decimals=1).tolist()[5] == [0.4, 0.3, 0.3]


# ------------------------------------------------------------------------------------ statistics


def test_steerable_front_has_high_spearman_and_positive_spread():
    weights, rewards = synthetic_front(slope=0.5)
    stats = front_stats(weights, rewards, NAMES3)
    for name in NAMES3:
        o = stats["per_objective"][name]
        assert o["spearman"] > 0.9
        assert o["spread"] == pytest.approx(0.5, abs=0.1)
        assert o["spread_z"] > 5
    json.dumps(stats, allow_nan=False)


def test_constant_front_has_spread_within_its_standard_error():
    weights, rewards = synthetic_front(slope=0.0, seed=3)
    stats = front_stats(weights, rewards, NAMES3)
    for name in NAMES3:
        o = stats["per_objective"][name]
        assert o["spread_se"] > 0
        assert abs(o["spread"]) <= 2 * o["spread_se"], o
        assert abs(o["spread_z"]) <= 2


def test_standard_error_is_over_prompts_of_sample_means():
    weights = np.array([[1.0, 0.0], [0.0, 1.0]])
    # Prompt means 1, 2, 3 (samples differ, but only their mean counts); same for both vectors.
    per_prompt = np.array([[1.0, 0.0], [2.0, 1.0], [3.0, 2.0]])
    rewards = np.broadcast_to(per_prompt[None, :, None, :], (2, 3, 2, 2)).copy()
    rewards[:, :, 0, :] -= 0.5
    rewards[:, :, 1, :] += 0.5
    stats = front_stats(weights, rewards, ["X", "Y"])
    assert stats["mean"][0] == pytest.approx([2.0, 1.0])
    assert stats["se"][0] == pytest.approx([1.0 / np.sqrt(3), 1.0 / np.sqrt(3)])
    # Identical rows: the paired differences are all zero, so the spread has no z.
    assert stats["per_objective"]["X"]["spread"] == 0.0
    assert stats["per_objective"]["X"]["spread_se"] == 0.0 and stats["per_objective"]["X"]["spread_z"] is None


def test_spread_pairs_prompts():
    # Prompt difficulty varies a lot, the w=1 vs w=0 difference hardly: paired, the s.e. is small.
    weights = np.array([[1.0, 0.0], [0.0, 1.0]])
    difficulty = np.array([0.0, 10.0, 20.0, 30.0])
    rewards = np.zeros((2, 4, 1, 2))
    rewards[0, :, 0, 0] = difficulty + 1.0 + np.array([0.0, 0.1, -0.1, 0.0])
    rewards[1, :, 0, 0] = difficulty
    stats = front_stats(weights, rewards, ["X", "Y"])
    x = stats["per_objective"]["X"]
    assert x["spread"] == pytest.approx(1.0)
    assert x["spread_se"] == pytest.approx(np.std([1.0, 1.1, 0.9, 1.0], ddof=1) / 2)
    assert x["spread_z"] > 10


def two_objective_front(means, n_prompts=2, samples=2):
    means = np.asarray(means, dtype=float)
    weights = np.array([[0.0, 1.0], [0.25, 0.75], [0.5, 0.5], [1.0, 0.0]])
    rewards = np.broadcast_to(means[:, None, None, :], (len(means), n_prompts, samples, 2)).copy()
    return weights, rewards


def test_non_dominated_set_and_hypervolume_by_hand():
    weights, rewards = two_objective_front([[1, 4], [2, 2], [3, 3], [4, 1]])
    stats = front_stats(weights, rewards, ["X", "Y"])
    assert stats["non_dominated"] == [0, 2, 3]  # (2, 2) is dominated by (3, 3)
    # Staircase from the right: 4 x 1 + 3 x (3 - 1) + 1 x (4 - 3).
    assert stats["hypervolume"] == pytest.approx(11.0)
    assert stats["reference_point"] == [0.0, 0.0] and stats["below_reference"] == []
    shifted = front_stats(weights, rewards, ["X", "Y"], [0.5, 0.5])
    assert shifted["hypervolume"] == pytest.approx(3.5 * 0.5 + 2.5 * 2.0 + 0.5 * 1.0)


def test_points_below_the_reference_add_no_volume_and_are_named():
    weights, rewards = two_objective_front([[1, 4], [2, 2], [3, 3], [4, 1]])
    stats = front_stats(weights, rewards, ["X", "Y"], [1.5, 0.0])
    assert stats["below_reference"] == [0]
    assert stats["hypervolume"] == pytest.approx(2.5 * 1.0 + 1.5 * 2.0)


def test_front_stats_rejects_mismatched_shapes_and_nan():
    weights, rewards = synthetic_front(slope=0.5, n_prompts=3)
    with pytest.raises(ValueError, match="do not fit"):
        front_stats(weights, rewards, ["A", "B"])
    with pytest.raises(ValueError, match="reference point"):
        front_stats(weights, rewards, NAMES3, [0.0, 0.0])
    rewards[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        front_stats(weights, rewards, NAMES3)


def test_single_prompt_has_no_standard_errors_but_stays_json():
    weights, rewards = synthetic_front(slope=0.5, n_prompts=1)
    stats = front_stats(weights, rewards, NAMES3)
    assert stats["se"][0] == [None, None, None]
    assert stats["per_objective"]["A"]["spread_z"] is None
    json.dumps(stats, allow_nan=False)
    assert set(front_metrics(stats)) == {"eval/hypervolume", "eval/steerability/A", "eval/steerability/B", "eval/steerability/C"}


def test_front_metrics_names():
    weights, rewards = synthetic_front(slope=0.5)
    metrics = front_metrics(front_stats(weights, rewards, NAMES3))
    assert set(metrics) == {"eval/hypervolume"} | {f"eval/{m}/{n}" for m in ("steerability", "spread_z") for n in NAMES3}
    assert all(isinstance(v, float) for v in metrics.values())
    # With the KL measured: the largest weight vector's mean.
    stats = {**front_stats(weights, rewards, NAMES3), "kl": {"mean": [0.5, 7.25, 2.0]}}
    assert front_metrics(stats)["eval/kl_max"] == 7.25


# ------------------------------------------------------------------------------------ files


def test_write_front_writes_json_and_markdown(tmp_path):
    weights, rewards = synthetic_front(slope=0.5)
    stats = front_stats(weights, rewards, NAMES3)
    meta = {"model": "tiny", "step": 7, "prompts": {"path": "p.jsonl", "count": 24, "ids": [str(i) for i in range(24)]}}
    write_front(tmp_path / "out", stats, "step 7", meta)
    saved = json.loads((tmp_path / "out" / "front.json").read_text())
    assert saved["label"] == "step 7" and saved["meta"] == meta
    assert saved["mean"] == stats["mean"] and saved["per_objective"] == stats["per_objective"]
    md = (tmp_path / "out" / "front.md").read_text()
    assert md.startswith("# Pareto front: step 7")
    table = [line for line in md.splitlines() if line.startswith("| ") and "/" in line.split("|")[1] and "±" in line]
    assert len(table) == len(weights)
    assert sum("✓" in line for line in table) == len(stats["non_dominated"])
    assert "| objective | Spearman | spread ± s.e. | z |" in md
    assert "Hypervolume:" in md and "24 items" in md
    assert not list((tmp_path / "out").glob(".*.tmp")), "temporary files left behind"


def test_plot_fronts_writes_a_png(tmp_path):
    weights, rewards = synthetic_front(slope=0.5)
    base = front_stats(weights, rewards, NAMES3)
    trained = front_stats(*synthetic_front(slope=1.0, seed=1), NAMES3)
    plot_fronts(tmp_path / "front.png", [("base", base), ("step 120", trained)], NAMES3)
    assert (tmp_path / "front.png").read_bytes()[:8] == PNG_MAGIC
    with pytest.raises(ValueError, match="two objectives"):
        plot_fronts(tmp_path / "one.png", [("base", base)], ["A"])


def test_steerability_table_compares_models_side_by_side():
    base = front_stats(*synthetic_front(slope=0.0), NAMES3)
    trained = front_stats(*synthetic_front(slope=0.5), NAMES3)
    table = steerability_table([("base", base), ("step 2", trained)]).splitlines()
    assert table[0] == "| objective | base Spearman | base spread ± s.e. | step 2 Spearman | step 2 spread ± s.e. |"
    rows = [line for line in table[2:] if line.startswith("|")]
    assert [row.split("|")[1].strip() for row in rows] == NAMES3 + ["hypervolume"]
    # Under the table, a plain verdict on the last front, objective by objective.
    verdict = [line for line in table if line.startswith("- ")]
    assert len(verdict) == 3 and all("follows its weight" in line for line in verdict), verdict
    flat = [line for line in steerability_table([("base", base)]).splitlines() if line.startswith("- ")]
    assert all("does not follow its weight yet" in line for line in flat[:3]), flat


def test_a_spread_equal_on_every_prompt_follows_although_it_has_no_z():
    # Every answer scores its weight exactly (a toy policy that serves each corner perfectly):
    # the paired differences are all 1, their s.e. is 0 and z is undefined, yet it follows.
    weights, _ = synthetic_front(slope=1.0)
    exact = np.broadcast_to(weights[:, None, None, :], (len(weights), 24, 2, 3)).copy()
    stats = front_stats(weights, exact, NAMES3)
    first = stats["per_objective"][NAMES3[0]]
    assert first["spread"] == pytest.approx(1.0) and first["spread_se"] == 0 and first["spread_z"] is None
    assert spread_is_clear(first) and not spread_is_clear({**first, "spread": 0.0})
    verdict = [line for line in steerability_table([("toy", stats)]).splitlines() if line.startswith("- ")]
    assert verdict[0] == f"- {NAMES3[0]} **follows its weight** (toy: spread +1.000 on every prompt, Spearman +1.00).", verdict
    # A flat objective (the same score everywhere) has s.e. 0 too, and does not follow.
    flat = front_stats(weights, np.full_like(exact, 0.5), NAMES3)["per_objective"][NAMES3[0]]
    assert flat["spread_se"] == 0 and not spread_is_clear(flat)


def test_weights_label_is_short():
    assert weights_label([0.7, 0.3, 0.0]) == "0.7/0.3/0"
    assert weights_label([1 / 3, 1 / 3, 1 / 3]) == "0.33/0.33/0.33"
    assert weights_label([1.0, 0.0]) == "1/0"


def test_module_does_not_pull_in_ray_vllm_or_matplotlib():
    code = (
        "import sys, moalign.pareto_report; bad = [m for m in ('ray', 'vllm', 'matplotlib') if m in sys.modules]; sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60, cwd=REPO)
    assert proc.returncode == 0, proc.stderr.decode()


# ------------------------------------------------------------------------------------ evaluate.py without actors


def run_config(run_dir, *extra):
    cfg = load_config(None, [f"run_dir={run_dir}", f"data.heldout_path={REPO / 'data/prompts/heldout.jsonl'}", *extra])
    save_resolved(cfg, Path(run_dir) / "config.yaml")
    return cfg


def saved_base_front(cfg, run_dir):
    """A base front in RUN_DIR/eval/base made with the config's evaluation settings."""
    from moalign.data import load_prompts
    from moalign.pareto_report import eval_settings

    e = cfg.eval
    prompts = load_prompts(cfg.data.heldout_path)[: e.heldout_prompts]
    settings = eval_settings(cfg, prompts, e.lattice_divisions, e.samples_per_weight)
    weights = np.array(settings["lattice"]["weights"])
    rewards = 0.5 + 0.1 * weights[:, None, None, :] + np.random.default_rng(0).normal(0, 0.05, (len(weights), len(prompts), 2, 3))
    write_front(Path(run_dir) / "eval" / "base", front_stats(weights, rewards, cfg.objective_names), "base", {"step": None, **settings})


def test_base_front_is_reused_only_with_the_same_settings(tmp_path):
    from moalign.data import load_prompts
    from moalign.pareto_report import eval_settings, load_front

    cfg = run_config(tmp_path / "run", "eval.heldout_prompts=4")
    saved_base_front(cfg, tmp_path / "run")
    prompts = load_prompts(cfg.data.heldout_path)
    assert load_front(tmp_path / "run" / "eval" / "base", eval_settings(cfg, prompts[:4], 3, 2)) is not None
    assert load_front(tmp_path / "run" / "eval" / "base", eval_settings(cfg, prompts[:5], 3, 2)) is None
    assert load_front(tmp_path / "run" / "eval" / "base", eval_settings(cfg, prompts[:4], 2, 2)) is None
    other_seed = load_config(None, [f"data.heldout_path={cfg.data.heldout_path}", "eval.seed=1"])
    assert load_front(tmp_path / "run" / "eval" / "base", eval_settings(other_seed, prompts[:4], 3, 2)) is None
    assert load_front(tmp_path / "run" / "eval" / "nothing") is None


def test_cli_base_only_reuses_the_saved_front_without_actors(tmp_path, monkeypatch):
    import loops.pareto_eval
    from evaluate import main

    # Checked on the calls, not on ray.is_initialized(): another test may have started Ray already.
    def refuse(*args, **kwargs):
        raise AssertionError("started Ray or actors although nothing needed evaluating")

    monkeypatch.setattr(loops.pareto_eval, "start_ray", refuse)
    monkeypatch.setattr(loops.pareto_eval, "actor_groups", refuse)

    cfg = run_config(tmp_path / "run", "eval.heldout_prompts=4")
    saved_base_front(cfg, tmp_path / "run")
    front = tmp_path / "run" / "eval" / "base" / "front.json"
    before = front.stat().st_mtime_ns
    other = tmp_path / "other"
    saved_base_front(cfg, other)
    (other / "eval" / "base").rename(other / "eval" / "step_5")
    # The override after --compare is an override, not a run directory.
    assert main(["--run", str(tmp_path / "run"), "--base", "--compare", str(other), "eval.heldout_prompts=4"]) == 0
    assert front.stat().st_mtime_ns == before
    assert (tmp_path / "run" / "eval" / "base" / "front.png").read_bytes()[:8] == PNG_MAGIC
    log = (tmp_path / "run" / "eval" / "evaluate.log").read_text()
    assert "reusing" in log and "| other Spearman |" in log


def test_cli_exit_codes(tmp_path, caplog):
    from evaluate import main

    assert main(["--run", str(tmp_path / "missing")]) == 2
    assert "config.yaml" in caplog.text
    run_config(tmp_path / "run")
    assert main(["--run", str(tmp_path / "run")]) == 2  # no checkpoint to evaluate
    assert "no checkpoint" in (tmp_path / "run" / "eval" / "evaluate.log").read_text()
    assert main(["--run", str(tmp_path / "run"), "eval.lattice_divisions=0"]) == 2
    assert main(["--run", str(tmp_path / "run"), "--base", "--step", "3"]) == 2
    assert main(["--run", str(tmp_path / "run"), "data.heldout_path=/no/such/file.jsonl", "--base"]) == 2


class WordTokenizer:
    """Just enough of a tokenizer for moalign.conditioning.render_conditioned: one token per word."""

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        return " ".join(m["content"] for m in messages)

    def __call__(self, text, add_special_tokens):
        return {"input_ids": list(range(len(text.split())))}


def test_training_evaluation_schedule(tmp_path):
    from loops.pareto_eval import TrainingEvaluation

    def schedule(*overrides):
        cfg = load_config(None, [f"run_dir={tmp_path}", f"data.heldout_path={REPO / 'data/prompts/heldout.jsonl'}", "steps=10", *overrides])
        evaluation = TrainingEvaluation(cfg, tmp_path, WordTokenizer())
        return [s for s in range(1, 11) if evaluation.due(s)]

    assert schedule() == []
    assert schedule("eval.every_steps=4") == [4, 8]
    assert schedule("eval.at_start_and_end=true") == [10]
    assert schedule("eval.every_steps=5", "eval.at_start_and_end=true") == [5, 10]


def test_training_evaluation_checks_prompt_lengths_up_front(tmp_path):
    from loops.pareto_eval import TrainingEvaluation
    from moalign.data import DataError

    cfg = load_config(None, [f"data.heldout_path={REPO / 'data/prompts/heldout.jsonl'}", "eval.every_steps=1", "model.max_prompt_tokens=8"])
    with pytest.raises(DataError, match="every prompt is over model.max_prompt_tokens=8"):
        TrainingEvaluation(cfg, tmp_path, WordTokenizer())
    TrainingEvaluation(load_config(None, ["model.max_prompt_tokens=8"]), tmp_path, WordTokenizer())  # off: nothing checked


def test_eval_config_checks():
    from moalign.config import ConfigError

    with pytest.raises(ConfigError, match=r"eval\.reference_point: 2 values given for 3 objectives"):
        load_config(None, ["eval.reference_point=[0, 0]"])
    with pytest.raises(ConfigError, match=r"eval\.every_steps: 3 is not a multiple of sync\.every_steps \(2\)"):
        load_config(None, ["eval.every_steps=3", "sync.every_steps=2"])
    assert load_config(None, ["eval.every_steps=4", "sync.every_steps=2", "eval.reference_point=[0, -1, 0.5]"]).eval.every_steps == 4


def test_conflicts_tell_trade_offs_from_agreement_and_say_so_plainly():
    from moalign.pareto_report import conflict_summary, front_markdown, front_stats, objective_conflicts

    rng = np.random.default_rng(3)
    x = rng.random((3, 6, 4))  # weight vectors, prompts, samples
    rewards = np.stack([x, 1 - x, x + 1e-3 * rng.random(x.shape)], axis=-1)
    conflicts = {tuple(c["objectives"]): c for c in objective_conflicts(rewards, ["Short", "Long", "Twin"])}
    assert conflicts[("Short", "Long")]["disagreement"] == 1.0 and conflicts[("Short", "Long")]["correlation"] < -0.99
    assert conflicts[("Short", "Twin")]["disagreement"] < 0.05
    summary = conflict_summary(list(conflicts.values()))
    assert any("Short and Long **trade off**" in line for line in summary) and not summary[0].startswith("**Nothing")
    agreeing = objective_conflicts(np.stack([x, x + 1e-3 * rng.random(x.shape)], axis=-1), ["A", "B"])
    assert conflict_summary(agreeing)[0].startswith("**Nothing to steer:**")
    weights = [[1, 0, 0], [0, 1, 0], [0, 0, 1]]
    markdown = front_markdown(front_stats(weights, rewards, ["Short", "Long", "Twin"]), "base")
    assert "## Do the objectives trade off?" in markdown and "| Short / Long | 100% |" in markdown


def test_learning_curve_lists_steerability_by_optimizer_step(tmp_path):
    from moalign.pareto_report import front_stats, learning_curve_markdown, plot_learning_curve

    rng = np.random.default_rng(0)
    weights = [[1, 0], [0.5, 0.5], [0, 1]]
    flat = rng.random((3, 8, 2, 2))
    steering = flat + np.array([[[[0.5, 0.0]]], [[[0.25, 0.25]]], [[[0.0, 0.5]]]])
    points = [(10, front_stats(weights, steering, ["A", "B"])), (0, front_stats(weights, flat, ["A", "B"]))]
    table = learning_curve_markdown(points, "curve")
    rows = [line for line in table.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [r.split("|")[1].strip() for r in rows] == ["0", "10"], "sorted by step, the base model as step 0"
    assert float(rows[1].split("|")[3]) > 3, "the steered policy's z for A"
    plot_learning_curve(tmp_path / "curve.png", points, "curve")
    assert (tmp_path / "curve.png").stat().st_size > 1000


def test_kl_is_reported_per_weight_vector_against_the_health_bound(tmp_path):
    weights, rewards = synthetic_front(slope=0.5)
    stats = front_stats(weights, rewards, NAMES3)
    rng = np.random.default_rng(0)
    # Log-ratios (W, P, S): the last weight vector far from the reference, the others near it.
    logratios = rng.normal(1.0, 0.5, (len(weights), 24, 2))
    logratios[-1] += 8.0
    stats["kl"] = kl_stats(logratios, bound=5.0)
    kl = stats["kl"]
    assert np.allclose(kl["mean"], logratios.mean(axis=(1, 2)))
    assert kl["largest"] == len(weights) - 1 and kl["overall_mean"] == pytest.approx(logratios.mean())
    assert kl["se"][0] == pytest.approx(logratios[0].mean(axis=1).std(ddof=1) / np.sqrt(24))
    write_front(tmp_path, stats, "step 3", {})
    md = (tmp_path / "front.md").read_text()
    assert "KL to the reference (mean ± s.e., median; nats per answer)" in md
    assert f"above health.max_kl=5 at {weights_label(weights[-1])}." in md
    table = steerability_table([("step 3", stats)])
    assert "| KL to the reference (lattice mean) |" in table and "above health.max_kl=5" in table
    # Within the bound everywhere, it says so; a front without the figure says nothing of it.
    stats["kl"] = kl_stats(logratios - 8.0 * (np.arange(len(weights)) == len(weights) - 1)[:, None, None], bound=5.0)
    assert "within health.max_kl=5 at every weight vector" in steerability_table([("step 3", stats)])
    del stats["kl"]
    assert "KL" not in steerability_table([("step 3", stats)])
    with pytest.raises(ValueError, match="logratios"):
        kl_stats(np.zeros((3, 4)))
    with pytest.raises(ValueError, match="NaN"):
        kl_stats(np.full((3, 4, 2), np.nan))


class _RecordingLearners:
    """Each rank's kl_logratios answers the completions' first token ids, so the order shows."""

    def __init__(self, ranks):
        self.ranks, self.calls = ranks, []

    def __len__(self):
        return self.ranks

    def call_each(self, method, args, step=None):
        self.calls.append([len(c) for _, c in args])
        return [[float(ids[0]) for ids in c] for _, c in args]

    def call(self, method, prompts, completions, step=None):
        self.calls.append([len(completions)])
        return [[float(ids[0]) for ids in completions]] * self.ranks


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_the_kl_of_an_evaluation_is_scored_in_calls_of_bounded_size(zero_stage):
    from loops.pareto_eval import KL_ANSWERS_PER_CALL, _kl_logratios

    cfg = load_config(None, [f"learner.zero_stage={zero_stage}", "logging.progress_bar=false"])
    samples, prompts = 2, 100
    completions = [[i] for i in range(prompts * samples)]
    learners = _RecordingLearners(2)
    values = _kl_logratios(cfg, learners, [[7]] * prompts, completions, samples, 5, "step 5")
    # Every answer once, in order, whatever the calls.
    assert values == [float(i) for i in range(prompts * samples)]
    assert sum(map(sum, learners.calls)) == prompts * samples
    assert max(max(c) for c in learners.calls) <= KL_ANSWERS_PER_CALL and len(learners.calls) > 1
