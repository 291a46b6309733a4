"""Pareto evaluation end to end: during training (base before step 1, policy after the last step)
and from `evaluate.py` on the run directory, with real vLLM, reward and learner actors around a
tiny model. Small lattices (divisions 1: the 3 corners and the centre) keep it cheap."""

import json
import math

import pytest

from actors.metrics import metric_spec, read_metrics
from evaluate import main as evaluate_main
from orchestrator import run
from tests.integration.test_loop import tiny_config
from tests.unit.test_grafana import dashboard_metrics

pytestmark = pytest.mark.integration

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
OBJECTIVES = (
    "objectives=[{name: Length, source: callable, path: 'tests.helpers.reward_fns:length_reward'}, "
    "{name: Conciseness, source: conciseness}, {name: Positivity, source: positivity}]"
)
NAMES = ["Length", "Conciseness", "Positivity"]
WEIGHTS = 4  # K = 3, divisions 1: three corners plus the centre


def samples_by_key(path):
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return rows, {(tuple(r["weights"]), r["prompt_id"], r["sample"]): r["text"] for r in rows}


def test_fronts_during_training_and_from_the_command(tiny_model, ray_cluster, tmp_path):
    run_dir = tmp_path / "run"
    cfg = tiny_config(
        tiny_model,
        run_dir,
        "steps=2",
        "checkpoint.every_steps=2",
        OBJECTIVES,
        "eval.at_start_and_end=true",
        "eval.during_training_divisions=1",
        "eval.during_training_prompts=2",
        "eval.samples_per_weight=2",
        "eval.lattice_divisions=1",
        "eval.heldout_prompts=3",
    )
    summary = run(cfg)

    # During training: base before step 1, the policy after step 2, metrics on step 2's record only.
    history = read_metrics(run_dir)
    assert [h["step"] for h in history] == [1, 2]
    assert not any(k.startswith("eval/") for k in history[0])
    assert math.isfinite(history[1]["eval/hypervolume"]) and history[1]["time/eval_s"] > 0
    for name in NAMES:
        assert -1 <= history[1][f"eval/steerability/{name}"] <= 1
    assert "| objective | base Spearman |" in summary["steerability_table"] and "step 2 Spearman" in summary["steerability_table"]
    assert {m for m in dashboard_metrics() if m.startswith("moalign_eval_")} <= {metric_spec(k)[0] for k in history[1]}
    training_base = json.loads((run_dir / "eval" / "base" / "front.json").read_text())
    assert (training_base["n_weights"], training_base["n_prompts"], training_base["samples_per_prompt"]) == (WEIGHTS, 2, 2)
    _, training_base_texts = samples_by_key(run_dir / "eval" / "base" / "samples.jsonl")
    assert (run_dir / "eval" / "step_2" / "front.png").read_bytes()[:8] == PNG_MAGIC

    # The command with its own (larger) settings: the base is evaluated again, then step 2's checkpoint.
    assert evaluate_main(["--run", str(run_dir)]) == 0
    for folder, label in (("base", "base"), ("step_2", "step 2")):
        out = run_dir / "eval" / folder
        front = json.loads((out / "front.json").read_text())
        assert front["label"] == label and front["objectives"] == NAMES
        assert (front["n_weights"], front["n_prompts"], front["samples_per_prompt"]) == (WEIGHTS, 3, 2)
        assert front["meta"]["prompts"]["count"] == 3 and front["meta"]["lattice"]["divisions"] == 1
        assert (out / "front.md").read_text().startswith(f"# Pareto front: {label}")
        rows, _ = samples_by_key(out / "samples.jsonl")
        assert len(rows) == WEIGHTS * 3 * 2
        assert all(set(r["rewards"]) == set(NAMES) and r["finish_reason"] in ("stop", "length") for r in rows)
    assert json.loads((run_dir / "eval" / "step_2" / "front.json").read_text())["meta"]["step"] == 2
    assert (run_dir / "eval" / "step_2" / "front.png").read_bytes()[:8] == PNG_MAGIC

    # Seeds depend on (eval seed, prompt, sample) only: the base model gives the same completions
    # to the prompts both evaluations share, whatever else was in the calls.
    _, command_base_texts = samples_by_key(run_dir / "eval" / "base" / "samples.jsonl")
    shared = training_base_texts.keys() & command_base_texts.keys()
    assert len(shared) == WEIGHTS * 2 * 2
    assert all(training_base_texts[k] == command_base_texts[k] for k in shared)

    # A second invocation reuses the base front (same settings) and starts no actors for it.
    base_front = run_dir / "eval" / "base" / "front.json"
    before = base_front.stat().st_mtime_ns
    assert evaluate_main(["--run", str(run_dir), "--base"]) == 0
    assert base_front.stat().st_mtime_ns == before
    assert "base front: reusing" in (run_dir / "eval" / "evaluate.log").read_text()
