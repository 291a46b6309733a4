"""Pathway proof: the weights written into a prompt reach the gradient, and a trained policy
follows them, through the real loop (Ray actors, a vLLM generator, reward actors, a DeepSpeed
learner with LoRA, adapter weight sync).

The policy is a tiny random Llama that writes only lowercase letters (tests/helpers/letters_model.py);
the two objectives are the share of its letters in a-m and in n-z, which sum to 1: they conflict
directly, and a policy can serve either one. After 30 steps both objectives must follow their
weights on held-out prompts (spread z >= 3) under each weight signal, the text line and control
tokens (opening the answer, or as the system message); the base model does not. The loop uses hindsight relabelling onto the neglected corner:
the paper's loop (pairs under the sampled weights only) did not learn the mapping on this toy in
60 steps (README, "A recipe that steers").

The control-token policy is then exported (merged folder and adapter) and served as `make serve`
serves it: the same request under two weight vectors reaches vLLM as the training-time token ids,
and its answers follow the weights.

`--break-path=NAME` runs the same check with the path deliberately broken, to show it fails:
`learner_unconditioned` (the learner scores every pair under the equal-weights prompt, not the
one the weights were written into), `wrong_relabel_line` (relabelled pairs are trained under the
sampled line instead of their corner's), `sync_drops_adapter` (syncs carry no weights, so the
generators keep the base model).
"""

import json
import logging
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

import loops.online_loop
import orchestrator
from actors.weight_sync import ObjectStoreSync
from moalign.conditioning import render_conditioned
from moalign.config import ServeConfig, load_config
from moalign.control_tokens import read_manifest
from moalign.export_folder import PolicyCard
from moalign.pairs import select_relabelled_pairs
from moalign.pareto_report import load_front, spread_is_clear
from moalign.weight_transport import free_port
from tests.helpers.letters_model import build_letters_model
from tests.helpers.reward_fns import early_letters

pytestmark = pytest.mark.integration
log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
STEPS = 30
NAMES = ("Early", "Late")
# The presets' weight signal: its run also evaluates every 10 steps, for the learning curve; the
# other styles only before step 1 and after the last (each evaluation is time the suite waits).
CURVE_STYLE = "control_tokens_system"


def eval_every(style):
    """Steps between the evaluations of a style's run."""
    return 10 if style == CURVE_STYLE else STEPS


@pytest.fixture(scope="module")
def letters_model(tiny_model, tmp_path_factory):
    return str(build_letters_model(tmp_path_factory.mktemp("letters") / "model", tiny_model, init_std=0.1, constant=3.0))


def pathway_config(model, run_dir, style):
    return load_config(
        None,
        [
            f"run_dir={run_dir}",
            f"model.path={model}",
            "model.max_prompt_tokens=160",
            f"data.train_path={REPO / 'data/prompts/train.jsonl'}",
            f"data.heldout_path={REPO / 'data/prompts/heldout.jsonl'}",
            "objectives=[{name: Early, source: callable, path: 'tests.helpers.reward_fns:early_letters'}, "
            "{name: Late, source: callable, path: 'tests.helpers.reward_fns:late_letters'}]",
            f"conditioning.style={style}",
            "conditioning.decimals=1",
            "algorithm.relabel_weights=1",
            "algorithm.relabel_source=neglected_corner",
            "rollout.prompts_per_step=8",
            "rollout.samples_per_prompt=4",
            "rollout.max_new_tokens=12",
            "learner.lr=0.002",
            "learner.lora.rank=8",
            "learner.micro_batch_pairs=8",
            "actors.cpu_kvcache_gb=0.25",
            f"steps={STEPS}",
            f"checkpoint.every_steps={STEPS}",
            "eval.at_start_and_end=true",
            f"eval.every_steps={eval_every(style)}",
            "eval.during_training_prompts=16",
            "ray_timeout_s=300",
            "logging.progress_bar=false",
        ],
    )


def break_path(name, monkeypatch):
    """Inject one fault into the path from weights to gradient (see the module docstring)."""
    if name == "learner_unconditioned":
        real_render, real_learn = orchestrator.render_conditioned, orchestrator.learn
        unconditioned = {}

        def render(tokenizer, prompt, names, weights, *sections):
            ids = real_render(tokenizer, prompt, names, weights, *sections)
            equal = np.full(len(names), 1.0 / len(names))
            unconditioned[tuple(ids)] = real_render(tokenizer, prompt, names, equal, *sections)
            return ids

        def learn(cfg, learners, prompt_ids, *args):
            return real_learn(cfg, learners, [unconditioned[tuple(ids)] for ids in prompt_ids], *args)

        # The loop writes weights into prompts in both places: rollouts (online_loop) and relabelled pairs (orchestrator).
        monkeypatch.setattr(loops.online_loop, "render_conditioned", render)
        monkeypatch.setattr(orchestrator, "render_conditioned", render)
        monkeypatch.setattr(orchestrator, "learn", learn)
    elif name == "wrong_relabel_line":

        def select(weight_sets, rewards, *args):
            selection = select_relabelled_pairs(weight_sets, rewards, *args)
            batch = np.asarray(rewards).shape[0]
            for i, pair in enumerate(selection.pairs):
                selection.pairs[i] = type(pair)(pair.prompt % batch, pair.chosen, pair.rejected, pair.loss_weight, pair.objective)
            return selection

        monkeypatch.setattr(orchestrator, "select_relabelled_pairs", select)
    elif name == "sync_drops_adapter":
        monkeypatch.setattr(ObjectStoreSync, "_keep", lambda self, step: [])
    elif name is not None:
        raise ValueError(f"unknown --break-path {name!r}")


@pytest.fixture(scope="module")
def trained(letters_model, ray_cluster, tmp_path_factory, request):
    """`trained(style)`: the run directory of the toy policy trained with that weight signal (once per module)."""
    runs = {}

    def get(style):
        if style not in runs:
            run_dir = tmp_path_factory.mktemp(f"pathway-{style}") / "run"
            with pytest.MonkeyPatch.context() as monkeypatch:
                break_path(request.config.getoption("--break-path"), monkeypatch)
                summary = orchestrator.run(pathway_config(letters_model, run_dir, style))
            assert summary["steps"] == STEPS
            runs[style] = run_dir
        return runs[style]

    return get


@pytest.mark.parametrize("style", ["chat_system", "control_tokens", "control_tokens_system"])
def test_a_trained_toy_policy_follows_its_weights(trained, style):
    run_dir = trained(style)
    base = load_front(run_dir / "eval" / "base")["per_objective"]
    trained = load_front(run_dir / "eval" / f"step_{STEPS}")["per_objective"]
    report = {n: (base[n]["spread_z"], trained[n]["spread_z"], trained[n]["spearman"]) for n in NAMES}
    for name in NAMES:
        # The base model writes nearly the same letters under every weight vector...
        assert not spread_is_clear(base[name]), report
        # ...the trained one moves each objective with its weight. (Not its Spearman over the three
        # weight vectors: at equal weights every toy answer scores 0.5, so the centre may go either way.)
        # (A spread of the same size on every prompt has s.e. 0 and no z; it is the clearest.)
        assert spread_is_clear(trained[name]), report

    # The learning curve: steerability at every evaluation, against optimizer steps.
    curve = (run_dir / "eval" / "learning_curve.md").read_text()
    # Shown with `-o log_cli=true --log-cli-level=INFO`: the numbers a refactor must leave unchanged, to the digit.
    losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    log.info("learning curve (%s):\n%s\nlosses by step: %s", style, curve, losses)
    rows = [line.split("|")[1].strip() for line in curve.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert rows == [str(step) for step in range(0, STEPS + 1, eval_every(style))]
    assert (run_dir / "eval" / "learning_curve.png").stat().st_size > 0


def _chat(url, weights):
    body = {
        "messages": [{"role": "user", "content": QUESTION}],
        "objective_weights": weights,
        "max_tokens": 12,
        "seed": 7,
        "return_token_ids": True,
    }
    request = urllib.request.Request(f"{url}/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as response:
        return json.loads(response.read())


QUESTION = "Should everyone learn a second language?"


def test_control_tokens_are_exported_and_served(trained):
    """The control-token policy's export carries its tokens (merged folder and adapter alike), and
    `make serve` on it writes the weights as training did: the same token ids reach vLLM."""
    from peft import PeftModel
    from ray import serve
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from services.deployment import start_serving

    run_dir = trained("control_tokens")
    cfg = load_config(run_dir / "config.yaml")
    final, start = run_dir / "final", run_dir / "base_model"
    card, control = PolicyCard.read(final), read_manifest(final)
    assert card.style == "control_tokens" and card.control_tokens == control.tokens and card.adapter_base == str(start)
    assert read_manifest(start) == control and len(control.tokens) == 2 * 11

    # The merged folder and base + adapter give the same policy, trained rows included.
    tokenizer = AutoTokenizer.from_pretrained(final)
    ids = torch.tensor(
        [render_conditioned(tokenizer, QUESTION, cfg.objective_names, [1.0, 0.0], cfg.conditioning, cfg.model.max_prompt_tokens)]
    )
    assert set(ids[0].tolist()) & set(control.ids), "the prompt carries control tokens"
    merged = AutoModelForCausalLM.from_pretrained(final).eval()
    base = AutoModelForCausalLM.from_pretrained(start).eval()
    adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(start), final / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(adapter(input_ids=ids).logits, merged(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
        assert not torch.allclose(base(input_ids=ids).logits, merged(input_ids=ids).logits, atol=1e-3)
    trained_rows = merged.get_input_embeddings().weight[control.first_id :]
    assert not torch.allclose(trained_rows, base.get_input_embeddings().weight[control.first_id :])
    assert torch.equal(adapter.get_input_embeddings().weight[control.first_id :], trained_rows)

    # Served as `make serve` serves it: the same request under two weight vectors.
    serve_cfg = load_config(
        REPO / "configs/serve/local.yaml", [f"model={final}", f"port={free_port()}", "cpu_kvcache_gb=0.25", "replica_cpus=0.5"], ServeConfig
    )
    url = start_serving(serve_cfg)
    try:
        answers = {name: _chat(url, {name: 1.0}) for name in NAMES}
    finally:
        serve.delete("moalign")
        serve.shutdown()
    for name, corner in zip(NAMES, ([1.0, 0.0], [0.0, 1.0])):
        assert answers[name]["prompt_token_ids"] == render_conditioned(
            tokenizer, QUESTION, cfg.objective_names, corner, cfg.conditioning, cfg.model.max_prompt_tokens
        )
        assert not set(answers[name]["choices"][0]["token_ids"]) & set(control.ids), "a control token was sampled"
    texts = {name: answers[name]["choices"][0]["message"]["content"] for name in NAMES}
    early = {name: early_letters([QUESTION], [text])[0] for name, text in texts.items()}
    assert early["Early"] > early["Late"] + 0.5, texts
