"""The learner's DPO step, timed: the project's `Learner.train_step` beside a plain DeepSpeed step
(the same peft LoRA model, ZeRO stage, dtype and batch, with the textbook log-softmax loss),
interleaved in one process so machine noise hits both alike. Prints seconds per step, tokens/s,
TFLOP/s and MFU for each, and their ratio.

    python benchmarks/learner_step.py                         # tiny random model, CPU, seconds
    python benchmarks/learner_step.py --shape 0.5b --dtype bfloat16 --pairs 16 --seq-tokens 256

FLOPs per step are counted as 8·N·T: the policy's forward and backward (6·N·T, the usual training
count) plus the reference forward (2·N·T), with N the parameters a token's matrix products use
(every weight but the embedding lookup; the output projection counted once even when tied) and T
the tokens in the step (2 sequences per pair). MFU divides by the chip's dense bf16 peak
(--peak-tflops; 989 for an H100 or H200 SXM).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

log = logging.getLogger("bench")

# Llama shapes with SmolLM2's vocabulary: `0.5b` has 0.50B parameters (about Qwen2.5-0.5B's size).
SHAPES = {
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2},
    "135m": {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3},
    "0.5b": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16, "num_key_value_heads": 16},
}
VOCAB = 49152


def build_model(dest: Path, shape: str, dtype: str) -> tuple[Path, int]:
    """A random Llama of the named shape saved at `dest`, and its matrix-product parameter count."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, max_position_embeddings=4096, tie_word_embeddings=True, eos_token_id=2, **SHAPES[shape])
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    model.save_pretrained(dest, safe_serialization=True)
    total = sum(p.numel() for p in model.parameters())
    # The tied embedding is counted once in `total`; as the output projection it is a matrix product.
    return dest, total


def make_batch(pairs: int, seq_tokens: int, seed: int = 0) -> dict:
    import torch

    g = torch.Generator().manual_seed(seed)
    half = seq_tokens // 2

    def ids(n: int) -> list[int]:
        return torch.randint(3, VOCAB, (n,), generator=g).tolist()

    return {
        "prompt_ids": [ids(half) for _ in range(pairs)],
        "chosen_ids": [ids(seq_tokens - half) for _ in range(pairs)],
        "rejected_ids": [ids(seq_tokens - half) for _ in range(pairs)],
        "loss_weights": [1.0] * pairs,
        "total_weight": float(pairs),
    }


class PlainStep:
    """The same LoRA model under DeepSpeed, stepped the textbook way: no trimming of prompt logits,
    full log-softmax, reference by disabling the adapter."""

    def __init__(self, cfg, model_path: str):
        import deepspeed
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dtype = getattr(torch, cfg.model.dtype)
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
        model.config.use_cache = False
        lc = cfg.learner.lora
        model = get_peft_model(
            model,
            LoraConfig(r=lc.rank, lora_alpha=lc.alpha, lora_dropout=0.0, target_modules=list(lc.target_modules), task_type="CAUSAL_LM"),
        )
        trainable = [p for p in model.parameters() if p.requires_grad]
        pairs = cfg.pairs_per_step
        ds_config = {
            "train_micro_batch_size_per_gpu": pairs,
            "gradient_accumulation_steps": 1,
            "train_batch_size": pairs,
            "gradient_clipping": cfg.learner.grad_clip,
            "zero_optimization": {"stage": cfg.learner.zero_stage},
            "bf16": {"enabled": dtype == torch.bfloat16},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 2**62,
        }
        optimizer = torch.optim.AdamW(trainable, lr=cfg.learner.lr)
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
        self.beta = cfg.algorithm.beta

    def _logps(self, forward, ids, mask):
        import torch

        logits = forward(input_ids=ids).logits[:, :-1].float()
        logp = torch.gather(logits.log_softmax(-1), -1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        return (logp * mask[:, 1:]).sum(-1)

    def train_step(self, batch: dict) -> float:
        import torch
        import torch.nn.functional as F

        seqs = [p + c for p, c in zip(batch["prompt_ids"], batch["chosen_ids"])]
        seqs += [p + r for p, r in zip(batch["prompt_ids"], batch["rejected_ids"])]
        ids = torch.tensor(seqs, device=self.device)
        mask = torch.zeros_like(ids, dtype=torch.float32)
        mask[:, len(batch["prompt_ids"][0]) :] = 1
        m = len(batch["prompt_ids"])
        with torch.no_grad(), self.engine.module.disable_adapter():
            ref = self._logps(self.engine.module, ids, mask)
        policy = self._logps(self.engine, ids, mask)
        margin = (policy[:m] - ref[:m]) - (policy[m:] - ref[m:])
        loss = -F.logsigmoid(self.beta * margin).mean()
        self.engine.backward(loss)
        self.engine.step()
        return float(loss.detach())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--pairs", type=int, default=4, help="pairs per step (2 sequences each)")
    parser.add_argument("--seq-tokens", type=int, default=64, help="tokens per sequence: half prompt, half completion")
    parser.add_argument("--micro-batch-pairs", type=int, default=0, help="0: the whole step in one micro-batch")
    parser.add_argument("--zero-stage", type=int, default=2)
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5, help="timed steps of each, interleaved")
    parser.add_argument("--compile", action="store_true", help="torch.compile both engines' modules (DeepSpeed's engine.compile)")
    parser.add_argument("--profile", action="store_true", help="also print the learner step's top operators")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="the chip's dense bf16 peak (H100/H200 SXM: 989)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    import torch

    from actors.learner import Learner
    from moalign.config import load_config

    path, n_params = build_model(Path(tempfile.mkdtemp()) / args.shape, args.shape, args.dtype)
    cfg = load_config(
        None,
        [
            f"model.path={path}",
            f"model.dtype={args.dtype}",
            f"model.max_prompt_tokens={args.seq_tokens}",
            f"rollout.prompts_per_step={args.pairs}",
            f"learner.micro_batch_pairs={args.micro_batch_pairs or args.pairs}",
            f"learner.zero_stage={args.zero_stage}",
            f"learner.lora.rank={args.lora_rank}",
            "learner.lr=1e-5",
        ],
    )
    batch = make_batch(args.pairs, args.seq_tokens)
    tokens = 2 * args.pairs * args.seq_tokens
    flops = 8 * n_params * tokens
    contenders = {"learner": Learner(cfg, str(path)), "plain": PlainStep(cfg, str(path))}
    if args.compile:
        for c in contenders.values():
            c.engine.compile()
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for name, c in contenders.items():
        for _ in range(args.warmup):
            c.train_step(batch)
        sync()
        log.info("warmed up %s", name)
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(args.reps):
        for name, c in contenders.items():
            sync()
            t0 = time.perf_counter()
            c.train_step(batch)
            sync()
            times[name].append(time.perf_counter() - t0)

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
    print(f"\n{device}; {args.shape}: {n_params / 1e6:.1f}M parameters, {args.dtype}, ZeRO-{args.zero_stage}, LoRA r{args.lora_rank}")
    print(
        f"{args.pairs} pairs = {2 * args.pairs} sequences x {args.seq_tokens} tokens = {tokens} tokens a step; peak GPU memory {peak:.1f} GiB"
    )
    print(f"{'':10} {'s/step':>8} {'tokens/s':>10} {'TFLOP/s':>8} {'MFU':>6}   (median of {args.reps}; all: s)")
    median = {}
    for name, ts in times.items():
        median[name] = statistics.median(ts)
        tf = flops / median[name] / 1e12
        print(
            f"{name:10} {median[name]:8.3f} {tokens / median[name]:10.0f} {tf:8.1f} {tf / args.peak_tflops:6.1%}   "
            + " ".join(f"{t:.3f}" for t in ts)
        )
    print(f"learner / plain time: {median['learner'] / median['plain']:.2f}")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        with profile(activities=activities) as prof:
            contenders["learner"].train_step(batch)
            sync()
        key = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
        print(prof.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=60))


if __name__ == "__main__":
    main()
