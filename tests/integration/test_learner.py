"""The DeepSpeed learner on a tiny random Llama (CPU, gloo).

Only one Learner (one process group) lives at a time in this process: each test closes its own.
The data-parallel test runs its two ranks as subprocesses.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from actors.learner import Learner
from moalign.config import load_config
from moalign.lora_sync import AdapterMerger, parse_adapter_name
from moalign.models import checkpoint_shapes
from tests.helpers.learner_probes import sequence_logprobs
from tests.helpers.tiny_model import build_tiny_model

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
BASE = ["learner.micro_batch_pairs=2", "rollout.prompts_per_step=4", "learner.lora.rank=4", "learner.lora.alpha=8"]

# Hand-made pairs with different prompt/completion lengths, so padding and masking matter.
PAIRS = [
    ([1, 2, 3], [10, 11], [20]),
    ([4, 5], [12], [21, 22, 23]),
    ([6, 7, 8, 9], [13, 14, 15], [24, 25]),
    ([30, 31], [32, 33, 34, 35], [36]),
]


def make_batch(pairs, weights, total=None) -> dict:
    return {
        "prompt_ids": [list(p) for p, _, _ in pairs],
        "chosen_ids": [list(c) for _, c, _ in pairs],
        "rejected_ids": [list(r) for _, _, r in pairs],
        "loss_weights": list(weights),
        "total_weight": float(sum(weights) if total is None else total),
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def new_learner(model_dir, overrides=(), **kw) -> Learner:
    cfg = load_config(None, [*BASE, *overrides])
    return Learner(cfg, str(model_dir), master_port=free_port(), **kw)


def trainable(learner: Learner) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in learner.engine.module.named_parameters() if p.requires_grad}


def assert_finite_metrics(m: dict) -> None:
    for key in ("loss", "chosen_reward", "rejected_reward", "margin", "accuracy", "pair_logratio", "grad_norm", "objective"):
        assert math.isfinite(m[key]), (key, m[key])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="module")
def tiny_weights(tiny) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(tiny / "model.safetensors"))


def _seq_logp(model, prompt, completion) -> torch.Tensor:
    ids = torch.tensor([prompt + completion])
    logp = F.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
    picked = logp.gather(-1, ids[0, 1:, None]).squeeze(-1)
    return picked[len(prompt) - 1 :].sum()


def test_first_step_matches_closed_form(tiny):
    """At step 0 policy == reference, so every pair's sigmoid loss is log 2; the gradient norm the
    learner reports must be that of sum_i w_i l_i / total_weight computed by plain HF forwards."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    learner = new_learner(tiny)
    try:
        pairs, weights = PAIRS[:2], [1.0, 3.0]
        before = trainable(learner)

        # An independent computation: no padding, no logits_to_keep, one sequence at a time.
        lc = learner.cfg.learner.lora
        manual = get_peft_model(
            AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32),
            LoraConfig(r=lc.rank, lora_alpha=lc.alpha, lora_dropout=0.0, target_modules=list(lc.target_modules), task_type="CAUSAL_LM"),
        )
        params = dict(manual.named_parameters())
        with torch.no_grad():
            for n, t in before.items():
                params[n].copy_(t)
        beta = learner.cfg.algorithm.beta
        total = 0.0
        for (p, c, r), w in zip(pairs, weights):
            pc, pr = _seq_logp(manual, p, c), _seq_logp(manual, p, r)
            with torch.no_grad(), manual.disable_adapter():
                rc, rr = _seq_logp(manual, p, c), _seq_logp(manual, p, r)
            loss_i = -F.logsigmoid(beta * ((pc - rc) - (pr - rr)))
            assert loss_i.item() == pytest.approx(math.log(2), abs=1e-6)
            total = total + w * loss_i / sum(weights)
        grads = torch.autograd.grad(total, [params[n] for n in before])
        manual_norm = torch.sqrt(sum(g.pow(2).sum() for g in grads)).item()
        assert manual_norm > 0

        m = learner.train_step(make_batch(pairs, weights))
        assert_finite_metrics(m)
        assert m["step"] == 1 and m["pairs"] == 2 and m["capacity"] == 4
        assert m["loss"] == pytest.approx(math.log(2), abs=1e-6)
        assert m["objective"] == pytest.approx(total.item(), abs=1e-6)
        assert m["chosen_reward"] == pytest.approx(0.0, abs=1e-6) and m["pair_logratio"] == pytest.approx(0.0, abs=1e-6)
        # No samples of the policy came with the batch, so there is no KL estimate to report.
        assert math.isnan(m["kl"]) and m["kl_samples"] == 0
        assert m["grad_norm"] == pytest.approx(manual_norm, rel=1e-4)

        after = trainable(learner)
        assert any(not torch.equal(before[n], after[n]) for n in before if "lora_B" in n)
        assert learner.ping()["step"] == 1

        m2 = learner.train_step(make_batch(pairs, weights))
        assert_finite_metrics(m2)
        assert m2["step"] == 2 and m2["loss"] < m["loss"] and m2["margin"] > 0

        # The training pass runs each prompt once for both completions (cached keys and values,
        # left-padded prompts): the same log-probs as whole sequences, for the policy and the reference.
        prompts, chosen, rejected = ([list(x[k]) for x in PAIRS] for k in range(3))
        with torch.no_grad():
            shared = learner._pair_logps(learner.engine.module, prompts, chosen, rejected)
            whole = learner._sequence_logps(learner.engine.module, prompts + prompts, chosen + rejected)
            torch.testing.assert_close(shared, whole, rtol=0, atol=1e-5)
            with learner._reference_model() as reference:
                reference_shared = learner._pair_logps(reference, prompts, chosen, rejected)
            torch.testing.assert_close(reference_shared, learner._base_logps(prompts + prompts, chosen + rejected), rtol=0, atol=1e-5)
    finally:
        learner.close()


def _one_step(model_dir, overrides, batch) -> tuple[dict, dict[str, torch.Tensor]]:
    learner = new_learner(model_dir, overrides)
    try:
        metrics = learner.train_step(batch)
        return metrics, trainable(learner)
    finally:
        learner.close()


LR = 1e-3
# Adam's first update is lr * g / (|g| + eps): scale-free (grad_norm checks the scale), and for the
# rare element with |g| near eps it turns float-level differences of g into ~1e-7-sized ones.
WEIGHT_ATOL = 1e-2 * LR


def _assert_same_step(a: tuple[dict, dict], b: tuple[dict, dict]) -> None:
    (ma, wa), (mb, wb) = a, b
    assert ma["loss"] == pytest.approx(mb["loss"], abs=1e-6)
    assert ma["grad_norm"] == pytest.approx(mb["grad_norm"], rel=1e-5)
    assert wa.keys() == wb.keys()
    for n in wa:
        torch.testing.assert_close(wa[n], wb[n], rtol=0, atol=WEIGHT_ATOL, msg=n)


def _run_ranks(worker: str, specs: list[dict], extensions_dir: Path) -> None:
    procs = []
    for spec in specs:
        # Where DeepSpeed would compile ops just in time: the callers check it stays empty.
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TORCH_EXTENSIONS_DIR": str(extensions_dir)}
        cmd = [sys.executable, "-c", f"from tests.integration.test_learner import {worker}; {worker}({json.dumps(spec)!r})"]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for p in procs:
        out, _ = p.communicate(timeout=240)
        assert p.returncode == 0, out[-3000:]


def test_zero_weight_padding_changes_nothing(tiny, tmp_path):
    """3 real pairs in a capacity-4 step (one dummy, 2 accumulation steps) == the same 3 pairs in a
    capacity-3 step (no dummy, 3 accumulation steps); a 2-rank run of them must agree too."""
    weights = [1.0, 0.5, 2.0]
    batch = make_batch(PAIRS[:3], weights)
    padded = _one_step(tiny, [f"learner.lr={LR}"], batch)
    exact = _one_step(tiny, [f"learner.lr={LR}", "learner.micro_batch_pairs=1", "rollout.prompts_per_step=3"], batch)
    assert padded[0]["capacity"] == 4 and exact[0]["capacity"] == 3
    _assert_same_step(padded, exact)

    # A step far below the capacity (a warm-start step beside larger DPO steps) runs only the
    # micro-batches its pairs fill, and still steps the optimizer once, step after step.
    def two_steps(overrides):
        learner = new_learner(tiny, [f"learner.lr={LR}", *overrides])  # one process group at a time
        try:
            metrics = [learner.train_step(batch) for _ in range(2)]
            return metrics, trainable(learner), learner.engine.global_steps
        finally:
            learner.close()

    small, sized = two_steps(["rollout.prompts_per_step=8"]), two_steps([])
    assert [(m["capacity"], m["micro_batches"]) for m in small[0] + sized[0]] == [(8, 2)] * 2 + [(4, 2)] * 2
    assert small[2] == sized[2] == 2
    _assert_same_step((small[0][1], small[1]), (sized[0][1], sized[1]))

    # Data parallel: rank 0 holds two pairs, rank 1 one pair and a dummy; total_weight is global.
    port = free_port()
    shards = [make_batch(PAIRS[:2], weights[:2], total=sum(weights)), make_batch(PAIRS[2:3], weights[2:], total=sum(weights))]
    _run_ranks(
        "_dp_worker",
        [{"model": str(tiny), "rank": r, "port": port, "batch": shards[r], "out": str(tmp_path / f"rank{r}.pt")} for r in (0, 1)],
        tmp_path / "torch_extensions",
    )
    # Two CPU ranks open a process group without compiling anything (DeepSpeed would build its
    # inference all-reduce here, a minute of compiler that training never uses).
    assert not list((tmp_path / "torch_extensions").rglob("*"))
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert [r["metrics"]["pairs"] for r in results] == [2, 1]
    assert sum(r["metrics"]["objective"] for r in results) == pytest.approx(padded[0]["objective"], abs=1e-6)
    for r in results:
        assert r["metrics"]["grad_norm"] == pytest.approx(padded[0]["grad_norm"], rel=1e-5)
        for n, t in padded[1].items():
            torch.testing.assert_close(r["weights"][n], t, rtol=0, atol=WEIGHT_ATOL, msg=n)


def _dp_worker(spec_json: str) -> None:
    spec = json.loads(spec_json)
    cfg = load_config(None, [*BASE, f"learner.lr={LR}", "actors.num_learners=2"])
    learner = Learner(cfg, spec["model"], rank=spec["rank"], world_size=2, master_port=spec["port"])
    try:
        metrics = learner.train_step(spec["batch"])
        torch.save({"metrics": metrics, "weights": trainable(learner)}, spec["out"])
    finally:
        learner.close()


def test_zero3_ranks_gather_the_export_together(tiny, tmp_path):
    """Two ZeRO-3 ranks, each holding half of every weight, export the policy together: rank 0's
    full and adapter payloads equal a single learner's after the same step; rank 1 gets none."""
    batch = make_batch(PAIRS, [1.0, 0.5, 2.0, 1.0])
    single = new_learner(tiny, [f"learner.lr={LR}"])
    try:
        single.train_step(batch)
        want = {payload: dict(nt for b in single.export_weights(0.05, payload) for nt in b) for payload in ("full", "adapter")}
    finally:
        single.close()
    port, total = free_port(), sum(batch["loss_weights"])
    shards = [make_batch(PAIRS[:2], [1.0, 0.5], total=total), make_batch(PAIRS[2:], [2.0, 1.0], total=total)]
    _run_ranks(
        "_zero3_worker",
        [{"model": str(tiny), "rank": r, "port": port, "batch": shards[r], "out": str(tmp_path / f"rank{r}.pt")} for r in (0, 1)],
        tmp_path / "torch_extensions",
    )
    got = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert got[1]["full"] == {} and got[1]["adapter"] == {}
    # Partitioned: each rank holds about half of a weight, not all of it.
    q = "model.layers.0.self_attn.q_proj.weight"
    assert 0 < got[0]["partition_numel"] < want["full"][q].numel()
    for payload in ("full", "adapter"):
        assert got[0][payload].keys() == want[payload].keys()
        for name, t in want[payload].items():
            torch.testing.assert_close(got[0][payload][name], t, rtol=0, atol=WEIGHT_ATOL, msg=name)


def _zero3_worker(spec_json: str) -> None:
    spec = json.loads(spec_json)
    cfg = load_config(None, [*BASE, f"learner.lr={LR}", "actors.num_learners=2", "learner.zero_stage=3"])
    learner = Learner(cfg, spec["model"], rank=spec["rank"], world_size=2, master_port=spec["port"])
    try:
        learner.train_step(spec["batch"])
        q = learner.engine.module.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight
        out = {payload: dict(nt for b in learner.export_weights(0.05, payload) for nt in b) for payload in ("full", "adapter")}
        torch.save({**out, "partition_numel": q.ds_tensor.numel()}, spec["out"])
    finally:
        learner.close()


def test_export_weights_match_checkpoint_and_policy(tiny, tiny_weights):
    from transformers import AutoModelForCausalLM

    learner = new_learner(tiny, ["learner.lr=1e-2"])
    try:
        learner.train_step(make_batch(PAIRS, [1.0, 1.0, 1.0, 1.0]))
        buckets = learner.export_weights(bucket_mb=0.05)
        assert len(buckets) > 1
        flat = [nt for b in buckets for nt in b]
        exported = dict(flat)
        assert len(exported) == len(flat)
        assert set(exported) == set(tiny_weights) == set(checkpoint_shapes(tiny))
        for name, t in exported.items():
            assert t.shape == tiny_weights[name].shape and t.dtype == torch.float32, name
            assert t.device.type == "cpu" and t.is_contiguous() and not t.requires_grad, name
        # LoRA targets moved, everything else is the checkpoint's.
        assert not torch.equal(exported["model.layers.0.self_attn.q_proj.weight"], tiny_weights["model.layers.0.self_attn.q_proj.weight"])
        torch.testing.assert_close(exported["model.embed_tokens.weight"], tiny_weights["model.embed_tokens.weight"], rtol=0, atol=0)

        # The merge is out of place: the training base weights are still the checkpoint's, and the
        # exported tensors share no storage with them.
        base = learner.engine.module.get_base_model()
        q = base.model.layers[0].self_attn.q_proj
        torch.testing.assert_close(q.base_layer.weight.detach(), tiny_weights["model.layers.0.self_attn.q_proj.weight"], rtol=0, atol=0)
        exported["model.embed_tokens.weight"].add_(1.0)
        torch.testing.assert_close(base.model.embed_tokens.weight.detach(), tiny_weights["model.embed_tokens.weight"], rtol=0, atol=0)
        exported["model.embed_tokens.weight"].sub_(1.0)

        plain = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
        missing, unexpected = plain.load_state_dict(exported, strict=False)
        assert not unexpected and set(missing) <= {"lm_head.weight"}
        seqs = [[1, 5, 9, 200, 3000, 7], [42, 43, 44]]
        ours = learner.token_logprobs(seqs)
        with torch.no_grad():
            for seq, lp in zip(seqs, ours):
                ids = torch.tensor([seq])
                ref = F.log_softmax(plain(input_ids=ids).logits[0, :-1], -1).gather(-1, ids[0, 1:, None]).squeeze(-1)
                torch.testing.assert_close(torch.tensor(lp), ref, rtol=0, atol=1e-5)
        # Summed completion log-probs agree with the per-token ones.
        seq_lp = sequence_logprobs(learner, [seqs[0][:2]], [seqs[0][2:]])
        assert seq_lp[0] == pytest.approx(sum(ours[0][1:]), abs=1e-5)

        # The adapter payload, merged as a generator merges it, gives the same bits.
        adapters = [nt for b in learner.export_weights(bucket_mb=0.05, payload="adapter") for nt in b]
        assert {parse_adapter_name(n)[2] for n, _ in adapters} == {"A", "B", "scale"}
        sent = sum(t.numel() * t.element_size() for _, t in adapters)
        assert sent < learner.full_weight_bytes() / 10
        merged = dict(AdapterMerger(lambda n: tiny_weights[n], tiny_weights, torch.float32)(iter(adapters)))
        assert set(merged) == {n for n in tiny_weights if ".self_attn." in n or ".mlp." in n}
        for name, t in merged.items():
            assert torch.equal(t, exported[name]), name
    finally:
        learner.close()


def test_full_finetuning_keeps_reference_frozen(tiny, tiny_weights):
    learner = new_learner(tiny, ["learner.lora.enabled=false", "learner.lr=1e-3"])
    try:
        assert learner.ref_model is not None and not any(p.requires_grad for p in learner.ref_model.parameters())
        batch = make_batch(PAIRS, [1.0, 2.0, 1.0, 0.5])
        m1 = learner.train_step(batch)
        m2 = learner.train_step(batch)
        for m in (m1, m2):
            assert_finite_metrics(m)
        assert m1["loss"] == pytest.approx(math.log(2), abs=1e-6)
        assert m2["loss"] < m1["loss"] and m2["pair_logratio"] != 0.0

        # The KL estimate: the mean of log pi - log pi_ref over the given samples, before the update.
        probes = [(list(p), list(c)) for p, c, _ in PAIRS[:3]]
        module = learner.engine.module
        module.eval()
        with torch.no_grad():
            manual = [float(_seq_logp(module, p, c) - _seq_logp(learner.ref_model, p, c)) for p, c in probes]
        module.train()
        with_probes = {**batch, "kl_prompt_ids": [p for p, _ in probes], "kl_completion_ids": [c for _, c in probes]}
        m3 = learner.train_step(with_probes)
        assert m3["kl_samples"] == 3 and m3["kl"] == pytest.approx(sum(manual) / 3, abs=1e-4) and m3["kl"] > 0
        with pytest.raises(ValueError, match="kl_prompt_ids and kl_completion_ids"):
            learner.train_step({**with_probes, "kl_completion_ids": with_probes["kl_completion_ids"][:2]})
        ref = dict(learner.ref_model.named_parameters())
        for name in ("model.layers.0.self_attn.q_proj.weight", "model.embed_tokens.weight", "model.norm.weight"):
            torch.testing.assert_close(ref[name].detach(), tiny_weights[name], rtol=0, atol=0)
        exported = dict(nt for b in learner.export_weights(64) for nt in b)
        assert set(exported) == set(tiny_weights)
        assert not torch.equal(exported["model.layers.0.mlp.up_proj.weight"], tiny_weights["model.layers.0.mlp.up_proj.weight"])
    finally:
        learner.close()


def test_resume_matches_uninterrupted_run(tiny, tmp_path):
    # LoRA dropout makes step 3 depend on the restored RNG, not only on weights and Adam state.
    overrides = ["learner.lr=1e-2", "learner.lora.dropout=0.1"]
    batches = [make_batch(PAIRS[i:] + PAIRS[:i], [1.0, 0.5, 2.0, 1.5]) for i in range(3)]
    ckpt = tmp_path / "ckpt"
    learner = new_learner(tiny, overrides)
    try:
        learner.train_step(batches[0])
        learner.train_step(batches[1])
        learner.save_checkpoint(str(ckpt))
        straight = learner.train_step(batches[2])
    finally:
        learner.close()
    assert (ckpt / "learner_state_rank0.pt").is_file()
    # Only adapters are saved: the tied embedding (12.6 MB here) must not sneak in as lm_head.weight.
    assert (ckpt / "learner" / "mp_rank_00_model_states.pt").stat().st_size < 1_000_000

    resumed = new_learner(tiny, overrides)
    try:
        resumed.load_checkpoint(str(ckpt))
        assert resumed.ping()["step"] == 2
        again = resumed.train_step(batches[2])
    finally:
        resumed.close()
    assert again["step"] == straight["step"] == 3
    assert again["loss"] == pytest.approx(straight["loss"], abs=1e-6)
    assert again["grad_norm"] == pytest.approx(straight["grad_norm"], rel=1e-5)


def test_bad_batches_raise_value_error(tiny, tmp_path):
    # A learner that fails to start releases its process group, so the next one can start.
    with pytest.raises(FileNotFoundError, match="no config.json"):
        new_learner(tmp_path / "missing")
    learner = new_learner(tiny)
    try:
        good = make_batch(PAIRS[:2], [1.0, 1.0])
        cases = {
            "chosen_ids": {**good, "chosen_ids": [[10]]},
            r"rejected_ids'\]\[1\]": {**good, "rejected_ids": [[20], []]},
            r"loss_weights'\]\[0\]": {**good, "loss_weights": [float("nan"), 1.0]},
            r"loss_weights'\]\[1\]": {**good, "loss_weights": [1.0, -1.0]},
            "total_weight": {**good, "total_weight": 1.0},
            "capacity": make_batch(PAIRS + PAIRS[:1], [1.0] * 5),
            "prompt_ids": {**good, "prompt_ids": [[1], [10**9]]},
            "missing field": {k: v for k, v in good.items() if k != "loss_weights"},
        }
        for pattern, batch in cases.items():
            with pytest.raises(ValueError, match=pattern):
                learner.train_step(batch)
        assert learner.step == 0
        m = learner.train_step(make_batch(PAIRS[:1], [0.0], total=0.0))
        assert m["skipped"] == 1 and learner.step == 0
    finally:
        learner.close()


def with_margins(batch: dict, chosen, rejected) -> dict:
    return {**batch, "margin_chosen": [list(m) for m in chosen], "margin_rejected": [list(m) for m in rejected]}


def test_modpo_at_a_corner_trains_exactly_like_dpo(tiny, tmp_path):
    """MODPO with w = (1, 0, 0): the margin term vanishes, so losses and weights after three steps
    equal a DPO learner's on the same pairs, bit for bit, whatever the margin rewards say. The DPO
    learner's adapter then serves as an implicit margin model: scored by the other learner, it
    gives the DPO policy's log-probs, and the base's."""
    from moalign.export_folder import PolicyCard

    batch = make_batch(PAIRS, [1.0] * 4)
    prompts, completions = [list(p) for p, _, _ in PAIRS], [list(c) for _, c, _ in PAIRS]
    noisy = with_margins(batch, [[0.3, -1.2], [2.0, 0.1], [-0.5, 0.5], [1.0, 1.0]], [[-0.7, 0.4], [0.0, 0.0], [1.5, -2.0], [0.2, 3.0]])
    runs = {}
    for name, extra, data in (
        ("dpo", (), batch),
        ("modpo", ("algorithm.name=modpo", "algorithm.modpo.weights=[1, 0, 0]"), noisy),
    ):
        learner = new_learner(tiny, ["learner.lr=0.01", *extra])
        try:
            if name == "modpo":
                scored = learner.adapter_logprobs(str(tmp_path / "dpo" / "adapter"), prompts, completions)
                base = sequence_logprobs(learner, prompts, completions)
            losses = [learner.train_step(data)["loss"] for _ in range(3)]
            runs[name] = (losses, trainable(learner))
            if name == "dpo":
                learner.export_policy(str(tmp_path / "dpo"), PolicyCard.from_run(learner.cfg, 3).model_dump())
                dpo_logps = sequence_logprobs(learner, prompts, completions)
            else:
                with pytest.raises(ValueError, match="missing field 'margin_chosen'"):
                    learner.train_step(batch)
        finally:
            learner.close()
    assert scored["adapter"] == pytest.approx(dpo_logps, abs=1e-5) and scored["base"] == pytest.approx(base, abs=1e-5)
    assert scored["adapter"] != pytest.approx(scored["base"], abs=1e-3)
    assert runs["dpo"][0] == runs["modpo"][0]
    for key, value in runs["dpo"][1].items():
        assert torch.equal(value, runs["modpo"][1][key]), key


def test_mopo_lags_the_reference_and_resumes_exactly(tiny, tmp_path):
    """MOPO on the learner: the dual variables move, the reference is lagged every 2 steps, and a
    run resumed from step 2 takes steps 3-4 exactly as the uninterrupted run (losses, multipliers)."""
    labels = {**make_batch(PAIRS, [1.0] * 4), "labels": [[1.0, 0.0, 0.5], [0.0, 1.0, 1.0], [1.0, 1.0, 0.0], [0.5, 0.0, 1.0]]}
    mopo = ["algorithm.name=mopo", "algorithm.mopo.lag_steps=2", "algorithm.mopo.dual_lr=0.5", "learner.lr=0.01"]

    learner = new_learner(tiny, mopo)
    try:
        straight = [learner.train_step(labels) for _ in range(2)]
        # Saving changes nothing in the run; the checkpoint is the resumed learner's start.
        learner.save_checkpoint(str(tmp_path / "ckpt"))
        straight += [learner.train_step(labels) for _ in range(2)]
        with pytest.raises(ValueError, match=r"labels are probabilities"):
            learner.train_step({**labels, "labels": [[2.0, 0.0, 0.0]] * 4})
    finally:
        learner.close()
    assert straight[1]["mopo/reference_refreshes"] == 1 and straight[3]["mopo/reference_refreshes"] == 2
    assert any(m["mopo/lambda/Conciseness"] > 0 or m["mopo/lambda/Positivity"] > 0 for m in straight)
    for m in straight:
        assert math.isfinite(m["loss"]) and 0 < m["mopo/ess_fraction"] <= 1

    learner = new_learner(tiny, mopo)
    try:
        learner.load_checkpoint(str(tmp_path / "ckpt"))
        resumed = [learner.train_step(labels) for _ in range(2)]
    finally:
        learner.close()
    for a, b in zip(straight[2:], resumed):
        assert a["loss"] == b["loss"]
        assert {k: v for k, v in a.items() if k.startswith("mopo/")} == {k: v for k, v in b.items() if k.startswith("mopo/")}


def test_kl_penalty_holds_the_policy_near_the_reference(tiny):
    """DPO on the same pairs drives the chosen answers' log-ratio up; with algorithm.kl_coef the
    penalty on those answers (as the policy's samples) holds the measured KL well below that."""
    pairs = PAIRS[:4]
    batch = make_batch(pairs, [1.0] * 4)
    batch["kl_prompt_ids"] = [list(p) for p, _, _ in pairs]
    batch["kl_completion_ids"] = [list(c) for _, c, _ in pairs]
    kls = {}
    for coef in (0.0, 5.0):
        learner = new_learner(tiny, ["learner.lr=2e-2", f"algorithm.kl_coef={coef}"])
        try:
            kls[coef] = [learner.train_step(batch)["kl"] for _ in range(8)]
        finally:
            learner.close()
    assert kls[0.0][0] == pytest.approx(0.0, abs=1e-6) and kls[5.0][0] == pytest.approx(0.0, abs=1e-6)
    assert kls[0.0][-1] > 1.0, kls
    assert kls[5.0][-1] < 0.5 * kls[0.0][-1], kls


def test_kl_coefficients_per_sample_replace_the_configured_one(tiny):
    """`kl_coefs` in the batch (`algorithm.corner_kl_coef`): each KL sample's own coefficient, in
    place of algorithm.kl_coef; a configured 0 with 5 on every sample holds the policy as a
    configured 5 does, and a count that does not match the samples is refused."""
    pairs = PAIRS[:4]
    batch = make_batch(pairs, [1.0] * 4)
    batch["kl_prompt_ids"] = [list(p) for p, _, _ in pairs]
    batch["kl_completion_ids"] = [list(c) for _, c, _ in pairs]
    kls = {}
    for name, coef, coefs in (("configured", 5.0, None), ("per sample", 0.0, [5.0] * 4), ("zeros", 5.0, [0.0] * 4)):
        learner = new_learner(tiny, ["learner.lr=2e-2", f"algorithm.kl_coef={coef}"])
        try:
            if name == "zeros":
                with pytest.raises(ValueError, match="batch: 3 kl_coefs for 4 KL samples; one each"):
                    learner.train_step({**batch, "kl_coefs": coefs[:3]})
                with pytest.raises(ValueError, match=r"batch\['kl_coefs'\]\[1\] is nan"):
                    learner.train_step({**batch, "kl_coefs": [0.0, float("nan"), 0.0, 0.0]})
            step = batch if coefs is None else {**batch, "kl_coefs": coefs}
            kls[name] = [learner.train_step(step)["kl"] for _ in range(8)]
        finally:
            learner.close()
    assert kls["per sample"] == pytest.approx(kls["configured"], rel=1e-3, abs=1e-4), kls
    assert kls["zeros"][-1] > 2 * kls["configured"][-1], kls


def test_kl_logratios_of_chosen_answers_match_the_training_estimate(tiny):
    """The evaluation's per-answer log-ratios are the ones the training step's KL figure averages."""
    pairs = PAIRS[:4]
    batch = make_batch(pairs, [1.0] * 4)
    prompts, completions = [list(p) for p, _, _ in pairs], [list(c) for _, c, _ in pairs]
    learner = new_learner(tiny, ["learner.lr=2e-2"])
    try:
        assert learner.kl_logratios(prompts, completions) == pytest.approx([0.0] * 4, abs=1e-6)
        for _ in range(4):
            learner.train_step(batch)
        ratios = learner.kl_logratios(prompts, completions)
        # Trained up, so the chosen answers gained log-probability against the reference.
        assert all(r > 0 for r in ratios), ratios
        probe = {**batch, "kl_prompt_ids": prompts, "kl_completion_ids": completions}
        # The next step reports its KL on the policy before its update: the same answers, the same figure.
        assert learner.train_step(probe)["kl"] == pytest.approx(sum(ratios) / 4, rel=1e-4)
        with pytest.raises(ValueError, match="2 prompts but 1 completions"):
            learner.kl_logratios(prompts[:2], completions[:1])
        with pytest.raises(ValueError, match=r"completion_ids\[0\] is empty"):
            learner.kl_logratios(prompts[:1], [[]])
    finally:
        learner.close()


@pytest.mark.parametrize("dpo_rows", ["none", "ends"])
def test_dpo_steps_train_only_the_control_rows_the_config_names(tiny, tmp_path, dpo_rows):
    """`learner.control_token_dpo_rows`: the supervised steps train every row they use; the DPO
    steps after them train the corners' rows only (`ends`) or none, while the adapters train in both."""
    from moalign.control_tokens import add_control_tokens

    control = add_control_tokens(tiny, tmp_path / "with-tokens", ["A", "B"], 1)
    first, ends = control.first_id, control.end_rows
    assert ends == [0, 10, 11, 21]
    # The warm start trains the corners' lines (rows 0 / 21 and 10 / 11); the DPO pairs are under
    # lines between them as well: A=0.3 beside B=1.0 (a corner's row), and A=0.6 / B=0.4.
    corners = [([1, 2, first + 0, first + 21], [10, 11], [20]), ([5, 6, first + 10, first + 11], [12], [21, 22])]
    drawn = [([1, 2, first + 3, first + 21], [10, 11], [20]), ([5, 6, first + 6, first + 15], [12], [21, 22])]
    between = [3, 6, 15]
    overrides = ["conditioning.style=control_tokens", "learner.lr=1e-2", f"learner.control_token_dpo_rows={dpo_rows}"]
    phases = ["learner.control_token_dpo_lr_scale=2", "algorithm.warm_start_steps=1", "learner.warm_start_lr=2e-2"]
    learner = new_learner(tmp_path / "with-tokens", [*overrides, *phases])
    try:

        def rows() -> torch.Tensor:
            return next(p for n, p in learner.engine.module.named_parameters() if n.endswith("rows")).detach().clone()

        def lora() -> torch.Tensor:
            return torch.cat([p.detach().flatten() for n, p in learner.engine.module.named_parameters() if "lora_" in n])

        start_rows, start_lora = rows(), lora()
        learner.train_step({**make_batch(corners, [1.0, 1.0]), "supervised": True})
        warm_rows, warm_lora = rows(), lora()
        assert all(not torch.equal(warm_rows[r], start_rows[r]) for r in ends)
        assert not torch.equal(warm_lora, start_lora)
        for _ in range(2):
            learner.train_step(make_batch(drawn, [1.0, 1.0]))
        after = rows()
        assert all(torch.equal(after[r], start_rows[r]) for r in between), "a DPO step moved a row between the corners"
        assert torch.equal(after[21], warm_rows[21]) == (dpo_rows == "none")
        assert not torch.equal(lora(), warm_lora)
        # learner.control_token_dpo_lr_scale: the rows' own rate in the DPO steps (10x lr before).
        groups = learner.engine.optimizer.param_groups
        assert groups[1]["lr"] == (0.0 if dpo_rows == "none" else pytest.approx(1e-2 * 2))
        assert groups[0]["lr"] == pytest.approx(1e-2)
        # learner.warm_start_lr: the warm start's own rate, which the rows' scale multiplies.
        learner.train_step({**make_batch(corners, [1.0, 1.0]), "supervised": True})
        assert (groups[0]["lr"], groups[1]["lr"]) == (pytest.approx(2e-2), pytest.approx(2e-2 * 10))
    finally:
        learner.close()


def test_rows_between_the_corners_move_at_their_rate_and_export_as_embedded(tiny, tmp_path):
    """`learner.control_token_between_rate`: the rows between the corners embed as their start plus
    the rate times the parameter's move, and the weights the generators get are those rows."""
    from moalign.control_tokens import add_control_tokens

    control = add_control_tokens(tiny, tmp_path / "with-tokens", ["A", "B"], 1)
    first = control.first_id
    drawn = [([1, 2, first + 3, first + 21], [10, 11], [20]), ([5, 6, first + 6, first + 15], [12], [21, 22])]
    learner = new_learner(
        tmp_path / "with-tokens", ["conditioning.style=control_tokens", "learner.lr=1e-2", "learner.control_token_between_rate=0.1"]
    )
    try:
        embed = learner.engine.module.get_base_model().get_input_embeddings()
        start = embed.weight.detach()[first:].clone()
        for _ in range(2):
            learner.train_step(make_batch(drawn, [1.0, 1.0]))
        param = embed.rows.detach()
        for r in (3, 6, 15):
            assert not torch.equal(param[r], start[r])
            torch.testing.assert_close(embed.trained_rows[r], start[r] + 0.1 * (param[r] - start[r]))
        torch.testing.assert_close(embed.trained_rows[21], param[21])
        exported = dict(learner._named_full_weights())
        weight = next(t for n, t in exported.items() if n.endswith("embed_tokens.weight"))
        torch.testing.assert_close(weight[first:], embed.trained_rows.detach().to(weight.dtype))
    finally:
        learner.close()
