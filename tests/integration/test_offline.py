"""MODPO and MOPO end to end on a local Ray cluster: the offline loop, the DeepSpeed learner
actor, the reward actors for margins, checkpoints, resume and export, on a tiny model."""

import json
from pathlib import Path

import pytest

from actors.metrics import read_metrics
from loops.offline_loop import REWARD_CACHE, run
from moalign.config import load_config
from moalign.export_folder import PolicyCard
from tests.helpers.crash import crashed_copy

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
TWO = "[{name: Relevance, source: relevance}, {name: Conciseness, source: conciseness}]"


@pytest.fixture(scope="module")
def preference_file(tmp_path_factory):
    """Eight rows on training prompts; Relevance rewards cached in the rows, Conciseness not (so
    MODPO scores it on the reward actors)."""
    prompts = [json.loads(line)["prompt"] for line in (REPO / "data/prompts/train.jsonl").read_text().splitlines()[:8]]
    rows = []
    for i, prompt in enumerate(prompts):
        rows.append(
            {
                "id": f"t{i}",
                "prompt": prompt,
                "responses": [f"A short answer number {i}.", f"A much longer and more winding answer, number {i}, that goes on."],
                "labels": {"Relevance": i % 2, "Conciseness": 0 if i % 3 else 0.5},
                "rewards": {"Relevance": [0.1 * i, 0.05 * i]},
            }
        )
    path = tmp_path_factory.mktemp("prefs") / "prefs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def offline_config(tiny_model, run_dir, data, *extra):
    return load_config(
        None,
        [
            f"run_dir={run_dir}",
            f"model.path={tiny_model}",
            "model.max_prompt_tokens=160",
            f"objectives={TWO}",
            f"offline.path={data}",
            "offline.pairs_per_step=4",
            "offline.max_response_tokens=24",
            "learner.micro_batch_pairs=2",
            "learner.lr=0.01",
            "learner.lora.rank=4",
            "checkpoint.every_steps=2",
            "ray_timeout_s=300",
            "logging.progress_bar=false",
            "logging.tensorboard=false",
            *extra,
        ],
    )


def same_losses(reference_dir, resumed_dir):
    reference, history = read_metrics(reference_dir), read_metrics(resumed_dir)
    assert [h["step"] for h in history] == [h["step"] for h in reference] == [1, 2, 3, 4]
    for a, b in zip(reference, history):
        assert a["loss"] == b["loss"], (a["step"], a["loss"], b["loss"])
    return history


def test_mopo_resume_equals_uninterrupted(tiny_model, ray_cluster, tmp_path, preference_file):
    # The reference is lagged at step 2, before the crash: the resumed run must restore it.
    mopo = ("steps=4", "algorithm.name=mopo", "algorithm.mopo.lag_steps=2", "algorithm.mopo.dual_lr=0.5")
    straight = run(offline_config(tiny_model, tmp_path / "straight", preference_file, *mopo))
    crashed_copy(tmp_path / "straight", 2, tmp_path / "resumed")
    run(offline_config(tiny_model, tmp_path / "resumed", preference_file, *mopo))
    history = same_losses(tmp_path / "straight", tmp_path / "resumed")
    assert straight["examples"] == 8 and history[-1]["epoch"] == 2
    assert [h["mopo/reference_refreshes"] for h in history] == [0, 1, 1, 2]
    assert "mopo/lambda/Conciseness" in history[-1] and "mopo/threshold/Conciseness" in history[-1]
    card = PolicyCard.read(straight["export"])
    assert (card.style, card.algorithm, card.default_weights, card.step) == ("none", "mopo", [1.0, 0.0], 4)


def test_modpo_sweep_resume_and_pareto_evaluation(tiny_model, ray_cluster, tmp_path, preference_file):
    """A sweep trains one policy per weight vector with margins scored once for all; one of its
    runs, resumed after a crash, repeats its losses; the evaluation puts each policy's point on
    held-out prompts without a weight line."""
    from loops.offline_loop import sweep_members, train
    from loops.pareto_eval import evaluate_offline

    cfg = offline_config(
        tiny_model,
        tmp_path / "sweep",
        preference_file,
        "steps=4",
        "algorithm.name=modpo",
        "algorithm.modpo.sweep_divisions=2",
        f"data.heldout_path={REPO / 'data/prompts/heldout.jsonl'}",
        "eval.heldout_prompts=2",
        "eval.samples_per_weight=1",
        "rollout.max_new_tokens=8",
        "actors.cpu_kvcache_gb=0.25",
    )
    summary = run(cfg)
    assert [m["weights"] for m in summary["sweep"]] == [[0.5, 0.5], [1.0, 0.0]]
    for member in summary["sweep"]:
        # All 8 rows carry a 0/1 Relevance label; the Conciseness ties only matter as margins.
        assert member["examples"] == 8 and member["data"]["ties"] == {"Relevance": 0, "Conciseness": 3}
        card = PolicyCard.read(member["export"])
        assert (card.style, card.algorithm, card.default_weights) == ("none", "modpo", member["weights"])
    # Margin rewards (Conciseness is not cached in the rows) were scored once, at the sweep's root.
    assert (tmp_path / "sweep" / REWARD_CACHE).is_file() and not list((tmp_path / "sweep").glob(f"w_*/{REWARD_CACHE}"))

    mixed = sweep_members(cfg)[0]
    crashed_copy(Path(mixed.run_dir), 2, tmp_path / "resumed")
    train(mixed.model_copy(update={"run_dir": str(tmp_path / "resumed")}), reward_cache=tmp_path / "sweep" / REWARD_CACHE)
    same_losses(mixed.run_dir, tmp_path / "resumed")

    (base_label, base), (label, front) = evaluate_offline(cfg, tmp_path / "sweep")
    assert (base_label, label) == ("base", "modpo sweep")
    assert front["weights"] == [[0.5, 0.5], [1.0, 0.0]] and len(front["mean"]) == 2 and len(base["mean"]) == 1
    samples = [json.loads(line) for line in (tmp_path / "sweep" / "eval" / "offline" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2 * 2 and {tuple(s["weights"]) for s in samples} == {(0.5, 0.5), (1.0, 0.0)}
    assert (tmp_path / "sweep" / "eval" / "offline" / "front.png").is_file()
