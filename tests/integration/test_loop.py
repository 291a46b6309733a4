"""The MO-ODPO loop end to end on a local Ray cluster: real vLLM, reward and DeepSpeed actors
around a tiny model built from a config."""

import math
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from actors.metrics import ACTOR_CALL_METRIC, metric_spec, read_metrics
from actors.ray_actors import ActorFailure
from loops.export_checkpoint import export_checkpoint
from moalign.checkpoint import list_checkpoints, read_state
from moalign.config import load_config
from moalign.export_folder import PolicyCard
from moalign.ledger import audit
from moalign.scaling import read_done, write_request
from orchestrator import run
from tests.helpers.crash import crashed_copy
from tests.helpers.reward_fns import kill_marker
from tests.unit.test_grafana import dashboard_metrics

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def tiny_config(tiny_model, run_dir, *extra):
    return load_config(
        None,
        [
            f"run_dir={run_dir}",
            f"model.path={tiny_model}",
            "model.max_prompt_tokens=160",
            f"data.train_path={REPO / 'data/prompts/train.jsonl'}",
            f"data.heldout_path={REPO / 'data/prompts/heldout.jsonl'}",
            "rollout.prompts_per_step=4",
            "rollout.samples_per_prompt=3",
            "rollout.max_new_tokens=8",
            "learner.micro_batch_pairs=2",
            "learner.lr=0.01",
            "learner.lora.rank=4",
            "actors.cpu_kvcache_gb=0.25",
            "ray_timeout_s=300",
            "logging.progress_bar=false",
            "logging.tensorboard=true",
            *extra,
        ],
    )


def scrape_until(port, needles, seconds=60):
    """Prometheus text from the cluster's metrics endpoint once every needle shows up (Ray
    exports on an interval, so poll)."""
    body = ""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        except OSError:
            body = ""
        if all(n in body for n in needles):
            return body
        time.sleep(2)
    raise AssertionError(f"metrics {needles} not exported within {seconds}s; got {len(body)} bytes")


def test_steps_checkpoints_metrics_export_and_resume(tiny_model, ray_cluster, metrics_port, tmp_path):
    """One uninterrupted run checked for what a step records and exports; a copy crashed after
    step 2's checkpoint then resumes, through killed actors, to the same losses, rewards and
    weights (one run serves both: each run starts its own actors, the largest cost here). With
    max_staleness 1 the checkpoint holds the rollout already generated for step 3, from the
    policy before step 2's update: the harder case (max_staleness 0 runs in the other loop tests)."""
    objectives = (
        "objectives=[{name: Relevance, source: relevance}, {name: Conciseness, source: conciseness}, "
        "{name: Length, source: callable, path: 'tests.helpers.reward_fns:length_or_kill'}]"
    )
    # Sentence-end prefixes join the samples as candidates: seeded, so a resumed step draws the same.
    extra = ("checkpoint.every_steps=2", "sync.every_steps=2", "rollout.max_staleness=1", "algorithm.sentence_prefixes=2", objectives)
    cfg = tiny_config(tiny_model, tmp_path / "run", "steps=4", *extra)
    summary = run(cfg)
    reference = read_metrics(tmp_path / "run")
    assert [h["step"] for h in reference] == [1, 2, 3, 4]
    for h in reference:
        assert h["pairs"] + h["dropped_ties"] == 4
        assert math.isfinite(h["loss"]) and h["tokens_generated"] > 0
        for name in cfg.objective_names:
            assert math.isfinite(h[f"reward/{name}"])
        for key in ("time/generate_s", "time/score_s", "time/learn_s", "time/sync_s"):
            assert h[key] >= 0
        assert 0 < h["health/distinct_fraction"] <= 1 and h["health/completion_tokens_mean"] > 0
    # The generators get new weights every second step; samples lag the learner by up to
    # max_staleness + sync.every_steps - 1 steps.
    assert [h["version"] for h in reference] == [0, 1, 1, 2]
    assert [h["staleness"] for h in reference] == [0, 1, 2, 1]
    assert summary["version"] == 2
    # Four steps are fewer than health.window_steps: nothing is judged yet.
    assert summary["health_warnings"] == [] and set(summary["health_start"]) >= {"distinct_fraction", "kl"}
    assert "health" in read_state(list_checkpoints(tmp_path / "run")[-1][1])
    assert [s for s, _ in list_checkpoints(tmp_path / "run")] == [2, 4]
    assert (tmp_path / "run" / "config.yaml").is_file()
    assert list((tmp_path / "run" / "tensorboard").glob("events.*"))
    # This run's label among the series: an earlier test's run may have been exported first.
    scrape_until(
        metrics_port,
        ["ray_moalign_loss{", 'objective="Relevance"', 'phase="sync"', "ray_moalign_version{", 'run="run"'],
    )
    # Every gauge the Grafana dashboard charts is one this run exports (held-out evaluation aside:
    # off here): the step metrics from the driver, the per-actor call times from the actors (read
    # from the endpoint by the job test, while its actors live).
    exported_names = {metric_spec(k)[0] for h in reference for k in h if k != "step"} | {ACTOR_CALL_METRIC}
    assert {m for m in dashboard_metrics() if not m.startswith("moalign_eval_")} <= exported_names

    # The run exported its last policy; exporting the kept checkpoint afterwards gives the same weights.
    final = tmp_path / "run" / "final"
    assert summary["export"] == str(final)
    card = PolicyCard.read(final)
    assert card.step == 4 and card.objectives == cfg.objective_names and card.style == cfg.conditioning.style
    assert PolicyCard.read(final / "adapter") == card
    again = export_checkpoint(tmp_path / "run", dest=tmp_path / "again")
    exported, reread = load_file(str(final / "model.safetensors")), load_file(str(again / "model.safetensors"))
    assert exported.keys() == reread.keys() == set(load_file(str(Path(tiny_model) / "model.safetensors")))
    for name, tensor in exported.items():
        assert torch.equal(tensor, reread[name]), name

    assert all(h["actor_restarts"] == 0 for h in reference)

    # A crash right after step 2's checkpoint; the resumed run picks up from it. In its step 3 the
    # generator and the reward actor are killed (SIGKILL) while the reward actor scores: Ray
    # restarts both, the scoring is sent again, the generator gets the synced weights back before
    # it samples again; then the learner is killed while step 4 is scored: a new learner group
    # starts from step 2's checkpoint and steps 3 and 4 are trained again. The run goes on to the
    # same losses, rewards and weights by itself.
    crashed_copy(tmp_path / "run", 2, tmp_path / "resumed")
    kill_marker().write_text("generators+self\n-\nlearner")
    try:
        resumed = run(tiny_config(tiny_model, tmp_path / "resumed", "steps=4", *extra))
    finally:
        assert not kill_marker().exists(), "the faults were never injected"
        kill_marker().unlink(missing_ok=True)
    history = read_metrics(tmp_path / "resumed")
    assert [h["step"] for h in history] == [1, 2, 3, 4]
    # Cumulative over the run: the reward actor at step 3, the generator when step 4's samples
    # are collected, and the learner group before steps 3 and 4 were redone.
    assert [h["actor_restarts"] for h in history[2:]] == [3, 3]
    assert resumed["learner_restarts"] == 1
    # The ledger: steps 3 and 4 of the copied run were dropped and redone, every prompt once.
    ledger = audit(tmp_path / "resumed", read_state(list_checkpoints(tmp_path / "resumed")[-1][1])["cursor"])
    assert ledger["problems"] == [] and ledger["steps"] == 4 and ledger["prompts_trained"] == 16
    assert ledger["resumes"] == 1 and ledger["redone_steps"] == [3, 4] and ledger["learner_restarts"] == 1
    # The policy the resumed, disturbed run exported is the undisturbed run's.
    redone = load_file(str(tmp_path / "resumed" / "final" / "model.safetensors"))
    for name, tensor in exported.items():
        assert torch.allclose(redone[name], tensor, rtol=0, atol=1e-6), (name, (redone[name] - tensor).abs().max().item())
    for a, b in zip(reference, history):
        assert a["pairs"] == b["pairs"] and a["version"] == b["version"] and a["staleness"] == b["staleness"]
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6), f"step {a['step']}"
        for name in cfg.objective_names:
            assert b[f"reward/{name}"] == pytest.approx(a[f"reward/{name}"], rel=1e-6, abs=1e-9)


def test_resume_rejects_changed_config(tiny_model, ray_cluster, tmp_path):
    from moalign.config import ConfigError

    (tmp_path / "run" / "checkpoints" / "step_00000001").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "step_00000001" / "state.json").write_text("{}")
    from moalign.config import save_resolved

    save_resolved(tiny_config(tiny_model, tmp_path / "run", "steps=1"), tmp_path / "run" / "config.yaml")
    with pytest.raises(ConfigError, match="changed: algorithm"):
        run(tiny_config(tiny_model, tmp_path / "run", "steps=2", "algorithm.beta=0.3"))


def test_failing_reward_stops_the_step_with_a_named_error(tiny_model, ray_cluster, tmp_path):
    cfg = tiny_config(
        tiny_model,
        tmp_path / "run",
        "steps=2",
        "objectives=[{name: Broken, source: callable, path: 'tests.helpers.reward_fns:nan_reward'}]",
    )
    with pytest.raises(ActorFailure) as err:
        run(cfg)
    msg = str(err.value)
    assert "reward actor #0 at step 1" in msg and "'Broken'" in msg and "sample 0" in msg
    assert read_metrics(tmp_path / "run") == []
    assert list_checkpoints(tmp_path / "run") == []


def test_actor_groups_scale_independently_and_live_with_broadcast_and_per_objective_pairs(tiny_model, ray_cluster, tmp_path):
    """Two data-parallel ZeRO-3 learners (each holding half of every weight, so every sync and the
    final export gather from both), two reward workers and a broadcast group; while the run goes on
    the generators go from 1 to 2 (the new one given the current policy before it samples) and
    back to 1, and the reward workers from 2 to 1, as queued requests ask; a bad request, and one
    the cluster has no room for, are refused and change nothing. Each role, and each batch added,
    is reserved in a placement group of its own; the learners meet in theirs."""
    run_dir = tmp_path / "run"
    cfg = tiny_config(
        tiny_model,
        run_dir,
        "steps=3",
        "actors.num_generators=1",
        "actors.num_reward_workers=2",
        "actors.num_learners=2",
        "learner.zero_stage=3",
        "learner.micro_batch_pairs=1",
        "sync.backend=broadcast",
        "algorithm.pair_mode=per_objective",
        "objectives=[{name: Conciseness, source: conciseness}, {name: Positivity, source: positivity}]",
    )
    (run_dir / "scale" / "requests").mkdir(parents=True)
    (run_dir / "scale" / "requests" / "0-by-hand.json").write_text('{"learners": 2}')
    write_request(run_dir, {"generators": 2, "from_step": 2})
    write_request(run_dir, {"generators": 50, "from_step": 2})
    write_request(run_dir, {"generators": 1, "reward_workers": 1, "from_step": 3})
    groups_before = set(ray_cluster.util.placement_group_table())
    run(cfg)
    # A placement group per role, and one for the generator added live; none left behind.
    groups = [g for pg_id, g in ray_cluster.util.placement_group_table().items() if pg_id not in groups_before]
    assert sorted(g["name"].rsplit("-", 1)[0] for g in groups) == [
        "moalign-generator-0-0", "moalign-generator-1-1", "moalign-learner-0-1", "moalign-reward-0-1",
    ]  # fmt: skip
    assert {g["strategy"] for g in groups} == {"PACK"} and {g["state"] for g in groups} == {"REMOVED"}
    history = read_metrics(run_dir)
    assert [h["step"] for h in history] == [1, 2, 3]
    assert [(h["actors/generator"], h["actors/reward"], h["actors/learner"]) for h in history] == [(1, 2, 2), (2, 2, 2), (1, 1, 2)]
    handled = read_done(run_dir)
    assert [(d["handled_at_step"], d["applied"]) for d in handled] == [(1, False), (2, True), (2, False), (3, True)]
    assert "unknown key(s) ['learners']" in handled[0]["outcome"]
    assert handled[1]["outcome"].startswith("generator actors 1 -> 2 (added in") and "at policy version 1)" in handled[1]["outcome"]
    # More than the cluster has room for: refused at once, not waited for.
    assert "48 more generator actor(s) need" in handled[2]["outcome"] and "CPU free. Add nodes" in handled[2]["outcome"]
    assert handled[3]["outcome"] == "generator actors 2 -> 1; reward actors 2 -> 1"
    # Strictly on-policy (max_staleness 0, a sync every step): every pair from the current policy,
    # the added generator's too (a sample tagged with another version stops the step).
    assert all(math.isfinite(h["loss"]) and h["version"] == h["step"] for h in history)
    assert [h["staleness"] for h in history] == [0, 0, 0] and all(h["actor_restarts"] == 0 for h in history)
    # One candidate pair per prompt and objective (2 x 4), less ties and zero weights.
    assert all(h["pairs"] + h["dropped_ties"] + h["dropped_zero_weight"] == 8 for h in history)
    ledger = audit(run_dir, read_state(list_checkpoints(run_dir)[-1][1])["cursor"])
    assert ledger["problems"] == [] and ledger["steps"] == 3 and ledger["prompts_trained"] == 12
    # Gathered from both ZeRO-3 ranks: every tensor, the trained ones moved; the partitioned
    # checkpoint, loaded into a new pair of learners and exported again, gives the same weights.
    exported, base = load_file(str(run_dir / "final" / "model.safetensors")), load_file(str(Path(tiny_model) / "model.safetensors"))
    assert exported.keys() == base.keys()
    q = "model.layers.0.self_attn.q_proj.weight"
    assert exported[q].shape == base[q].shape and not torch.equal(exported[q], base[q])
    reread = load_file(str(export_checkpoint(run_dir, dest=tmp_path / "again") / "model.safetensors"))
    assert all(torch.equal(exported[name], reread[name]) for name in exported)
