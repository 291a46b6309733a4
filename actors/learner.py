"""The learner of every algorithm: a DeepSpeed engine over a causal LM (LoRA via peft, or full
fine-tuning) that takes one optimizer step per batch of pairs.

A plain class with no Ray import: `actors/ray_actors.py` wraps it as a Ray actor, and it also runs
as-is on a GPU box (one process per rank). All ranks of a data-parallel group must call
`train_step`, `save_checkpoint` and `load_checkpoint` together: they are collectives.

Objective per step, over the real pairs i of *all* ranks:  L = sum_i w_i * loss_i / total_weight.
Each rank pads its shard with zero-weight dummy pairs to whole micro-batches, as many as the
largest rank's shard fills (at most the capacity, from `pairs_per_step`), so every rank runs the
same number of forward/backward calls and the optimizer steps exactly once per `train_step`.
What loss_i is belongs to the algorithm (`moalign.objectives`: DPO for MO-ODPO, MODPO, MOPO);
weight export and the broadcast endpoint live in `actors.learner_weights`.

References: the frozen base model (LoRA: adapters off; full fine-tuning: a second copy). MOPO
lags it: `refresh_reference` snapshots the trainable weights, swapped in to score the reference,
while the base stays the behaviour policy the offline data came from.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import math
import os
import random
import socket
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from actors.learner_weights import WeightPublisher
from moalign.actor_io import PAIR_FIELDS, LearnerMetrics, PairBatch
from moalign.config import RunConfig
from moalign.control_tokens import ControlEmbedding, read_manifest
from moalign.logprobs import token_logprobs
from moalign.models import checkpoint_shapes, resolve_model_path
from moalign.objectives import build_objective
from moalign.weight_transport import free_port

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DS_TAG = "learner"
_STATE_FILE = "learner_state_rank{rank}.pt"


def optimizer_groups(model: torch.nn.Module, trainable: Sequence[torch.nn.Parameter], rows_lr: float) -> list[dict]:
    """The optimizer's parameter groups: every trainable parameter at the configured lr, except
    the control tokens' embedding rows, which get `rows_lr` in a group of their own."""
    rows = [m.rows for m in model.modules() if isinstance(m, ControlEmbedding)]
    row_ids = {id(r) for r in rows}
    groups = [{"params": [p for p in trainable if id(p) not in row_ids]}]
    if rows:
        groups.append({"params": rows, "lr": rows_lr})
    return groups


def _skip_inference_collective() -> None:
    """Keep DeepSpeed from compiling its shared-memory all-reduce when the process group opens.

    On CPU hosts `init_distributed` compiles that op (about a minute on 2 cores, in every fresh
    environment) for `inference_all_reduce` alone, which only DeepSpeed's inference tensor
    parallelism calls; training's collectives go through torch.distributed whatever it holds.
    """
    # By module path: the attribute `deepspeed.comm.torch` is torch itself, imported into the package.
    backend = importlib.import_module("deepspeed.comm.torch")
    backend.build_shm_op = lambda: None


class Learner(WeightPublisher):
    """One data-parallel rank of the learner."""

    def __init__(
        self,
        cfg: RunConfig,
        model_path: str,
        rank: int = 0,
        world_size: int = 1,
        master_addr: str = "127.0.0.1",
        master_port: int | None = None,
    ):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in a world of size {world_size}")
        if master_port is None:
            if world_size > 1:
                raise ValueError("master_port is required when world_size > 1: every rank must meet on the same port")
            # A fixed default port collides with a learner that is still shutting down.
            master_port = free_port()
        self.cfg = cfg
        self.rank = rank
        self.world_size = world_size
        self.step = 0
        self.engine: Any = None
        self._broadcast = None
        self._staged = None
        self.objective = build_objective(cfg)
        # MOPO's lagged reference: trainable parameters by name, or None while the base is the reference.
        self._lagged: dict[str, torch.Tensor] | None = None
        self.dtype = _DTYPES[cfg.model.dtype]
        if self.dtype == torch.float16:
            # fp16 training needs dynamic loss scaling, whose skipped steps would break the
            # one-optimizer-step-per-train_step contract; bf16 has the range without it.
            raise ValueError("model.dtype: float16 is not supported by the learner; use bfloat16 or float32")

        use_cuda = torch.cuda.is_available()
        local_rank = rank % torch.cuda.device_count() if use_cuda else 0
        if use_cuda:
            torch.cuda.set_device(local_rank)
            self.device = torch.device("cuda", local_rank)
        else:
            # DeepSpeed otherwise probes for accelerators it cannot use here.
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
            self.device = torch.device("cpu")
        os.environ.update(
            RANK=str(rank),
            WORLD_SIZE=str(world_size),
            LOCAL_RANK=str(local_rank),
            MASTER_ADDR=str(master_addr),
            MASTER_PORT=str(master_port),
        )

        import deepspeed

        _skip_inference_collective()
        deepspeed.init_distributed(dist_backend="nccl" if use_cuda else "gloo", verbose=False)
        try:
            self._setup(model_path)
        except BaseException:
            # A half-built learner must not keep the process group: the next one here could not start.
            self.close()
            raise

    def _setup(self, model_path: str) -> None:
        import deepspeed
        from transformers import AutoModelForCausalLM

        cfg, world_size, rank = self.cfg, self.world_size, self.rank
        lcfg = cfg.learner
        self.micro = lcfg.micro_batch_pairs
        self.grad_accum = math.ceil(cfg.pairs_per_step / (world_size * self.micro))
        self.capacity = self.grad_accum * self.micro
        self.zero_stage = lcfg.zero_stage
        self.lora = lcfg.lora.enabled

        torch.manual_seed(cfg.seed)
        path = resolve_model_path(model_path, cfg.model.cache_dir)
        self.model_path = str(path)
        shapes = checkpoint_shapes(path)
        self._ckpt_keys = set(shapes) if shapes is not None else None
        model = AutoModelForCausalLM.from_pretrained(path, dtype=self.dtype)
        model.config.use_cache = False
        # The base model's dropout off (as TRL's DPO does): with LoRA the reference is this same
        # network run in train mode, and it must not be noisy. LoRA's own dropout still applies.
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
            if isinstance(getattr(module, "attention_dropout", None), float):
                module.attention_dropout = 0.0
        self.vocab_size = model.get_input_embeddings().num_embeddings
        self.max_positions = getattr(model.config, "max_position_embeddings", None)
        eos = model.config.eos_token_id
        self._dummy_token = int((eos[0] if isinstance(eos, list) else eos) or 0)
        if self._ckpt_keys is None:
            # No safetensors to read names from: the model's own names, minus a tied head the
            # checkpoint would not store.
            keys = set(model.state_dict())
            if getattr(model.config, "tie_word_embeddings", False):
                keys -= {n for n in keys if n.startswith("lm_head.")}
            self._ckpt_keys = keys

        self.control = read_manifest(path)
        # Completions are scored over the tokens a policy may write: control tokens are input only.
        self.sampled_vocab = self.control.sampled_vocab if self.control is not None else self.vocab_size
        self.ref_model = None
        if self.lora:
            model = self._with_adapters(model)
        else:
            ref = AutoModelForCausalLM.from_pretrained(path, dtype=self.dtype)
            ref.config.use_cache = False
            ref.requires_grad_(False)
            self.ref_model = ref.eval().to(self.device)

        trainable = [p for p in model.parameters() if p.requires_grad]
        if not trainable:
            raise ValueError("no trainable parameters: check learner.lora.target_modules against the model's module names")
        n_trainable = sum(p.numel() for p in trainable)
        groups = optimizer_groups(model, trainable, lcfg.lr * lcfg.control_token_lr_scale)
        self._has_rows = len(groups) > 1
        optimizer = torch.optim.AdamW(groups, lr=lcfg.lr, weight_decay=lcfg.weight_decay)
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=self._deepspeed_config(n_trainable))
        self.engine.train()
        log.info(
            "learner rank %d/%d on %s: %s, %s, %d trainable params, ZeRO-%d, %d micro-batches x %d pairs per step",
            rank,
            world_size,
            self.device,
            self.model_path,
            f"LoRA r={lcfg.lora.rank}" if self.lora else "full fine-tuning",
            n_trainable,
            self.zero_stage,
            self.grad_accum,
            self.micro,
        )

    def _with_adapters(self, model):
        """`model` with LoRA adapters, the only weights that train (with control tokens, their rows too)."""
        from peft import LoraConfig, get_peft_model

        lc = self.cfg.learner.lora
        model = get_peft_model(
            model,
            LoraConfig(
                r=lc.rank,
                lora_alpha=lc.alpha,
                lora_dropout=lc.dropout,
                target_modules=list(lc.target_modules),
                bias="none",
                task_type="CAUSAL_LM",
            ),
        )
        if self.control is not None:
            # Their rows train beside the adapters (without LoRA the whole embedding trains).
            base = model.get_base_model()
            embedding = base.get_input_embeddings()
            # Every row but the corners' at learner.control_token_between_rate (rows past the tokens: padding).
            between, ends = self.cfg.learner.control_token_between_rate, set(self.control.end_rows)
            n_rows = embedding.num_embeddings - self.control.first_id
            rates = [between if r < len(self.control.tokens) and r not in ends else 1.0 for r in range(n_rows)]
            base.set_input_embeddings(ControlEmbedding(embedding, self.control.first_id, rates, self.control.line_bins))
        return model

    def _deepspeed_config(self, n_trainable: int) -> dict[str, Any]:
        # One bucket holds all LoRA gradients; DeepSpeed's 5e8-element default only matters for full models.
        bucket = int(min(5e8, max(1e6, n_trainable)))
        return {
            "train_micro_batch_size_per_gpu": self.micro,
            "gradient_accumulation_steps": self.grad_accum,
            "train_batch_size": self.micro * self.grad_accum * self.world_size,
            "gradient_clipping": self.cfg.learner.grad_clip,
            "zero_optimization": {
                "stage": self.zero_stage,
                "reduce_bucket_size": bucket,
                "allgather_bucket_size": bucket,
            },
            "bf16": {"enabled": self.dtype == torch.bfloat16},
            # torch AdamW rather than DeepSpeed's fused/CPU Adam, which JIT-compile C++/CUDA at start-up.
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 2**62,
            "wall_clock_breakdown": False,
        }

    # ------------------------------------------------------------------ batches

    def _validate(self, batch: PairBatch) -> tuple[int, list[float], float]:
        if not isinstance(batch, dict):
            raise ValueError(f"batch must be a dict, got {type(batch).__name__}")
        for key in (*PAIR_FIELDS, "total_weight"):
            if key not in batch:
                raise ValueError(f"batch: missing field {key!r}")
        n = len(batch["prompt_ids"])
        for key in PAIR_FIELDS[1:]:
            if len(batch[key]) != n:
                raise ValueError(f"batch[{key!r}] has {len(batch[key])} entries, batch['prompt_ids'] has {n}")
        if n > self.capacity:
            raise ValueError(
                f"batch: {n} pairs exceed this rank's capacity of {self.capacity} "
                f"({self.grad_accum} micro-batches x {self.micro} pairs, from pairs_per_step / num_learners)"
            )
        if ("kl_prompt_ids" in batch) != ("kl_completion_ids" in batch) or len(batch.get("kl_prompt_ids", [])) != len(
            batch.get("kl_completion_ids", [])
        ):
            raise ValueError("batch: kl_prompt_ids and kl_completion_ids must come together, one completion per prompt")
        if "kl_coefs" in batch:
            coefs = batch["kl_coefs"]
            if len(coefs) != len(batch.get("kl_prompt_ids", [])):
                raise ValueError(f"batch: {len(coefs)} kl_coefs for {len(batch.get('kl_prompt_ids', []))} KL samples; one each")
            for i, c in enumerate(coefs):
                if isinstance(c, bool) or not isinstance(c, (int, float)) or not (math.isfinite(c) and c >= 0):
                    raise ValueError(f"batch['kl_coefs'][{i}] is {c!r}; a KL coefficient is a finite number >= 0")
        for key in ("prompt_ids", "chosen_ids", "rejected_ids", "kl_prompt_ids", "kl_completion_ids"):
            # Completions hold only tokens a policy may write (no control token).
            limit = self.vocab_size if key.endswith("prompt_ids") else self.sampled_vocab
            for i, ids in enumerate(batch.get(key, [])):
                if not isinstance(ids, (list, tuple)) or len(ids) == 0:
                    raise ValueError(f"batch[{key!r}][{i}] must be a non-empty list of token ids")
                for t in ids:
                    if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or not 0 <= t < limit:
                        raise ValueError(f"batch[{key!r}][{i}] holds {t!r}, not a token id in [0, {limit})")
        if self.max_positions:
            for prompt_key, keys in (("prompt_ids", ("chosen_ids", "rejected_ids")), ("kl_prompt_ids", ("kl_completion_ids",))):
                for i, p in enumerate(batch.get(prompt_key, [])):
                    for key in keys:
                        if len(p) + len(batch[key][i]) > self.max_positions:
                            raise ValueError(
                                f"batch[{key!r}][{i}]: prompt + completion = {len(p) + len(batch[key][i])} tokens "
                                f"exceeds the model's {self.max_positions} positions"
                            )
        self.objective.validate(batch, n)
        weights = []
        for i, w in enumerate(batch["loss_weights"]):
            try:
                w = float(w)
            except (TypeError, ValueError):
                raise ValueError(f"batch['loss_weights'][{i}] = {w!r} is not a number") from None
            if not math.isfinite(w) or w < 0:
                raise ValueError(f"batch['loss_weights'][{i}] = {w} must be finite and >= 0")
            weights.append(w)
        try:
            total = float(batch["total_weight"])
        except (TypeError, ValueError):
            raise ValueError(f"batch['total_weight'] = {batch['total_weight']!r} is not a number") from None
        if not math.isfinite(total) or total < 0:
            raise ValueError(f"batch['total_weight'] = {total} must be finite and >= 0")
        local = sum(weights)
        if local > total * (1 + 1e-6) + 1e-12:
            raise ValueError(
                f"batch['total_weight'] = {total} is smaller than this rank's sum of loss_weights ({local}); "
                "it must be the sum over all ranks"
            )
        return n, weights, total

    def _encode(self, prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]]):
        """Right-padded ids, attention mask and completion-token mask."""
        lengths = [len(p) + len(c) for p, c in zip(prompts, completions)]
        n, width = len(lengths), max(lengths)
        ids = torch.zeros(n, width, dtype=torch.long)
        attn = torch.zeros(n, width, dtype=torch.long)
        target = torch.zeros(n, width, dtype=torch.bool)
        for i, (p, c) in enumerate(zip(prompts, completions)):
            ids[i, : lengths[i]] = torch.tensor([*p, *c], dtype=torch.long)
            attn[i, : lengths[i]] = 1
            target[i, len(p) : lengths[i]] = True
        first = min(len(p) for p in prompts)
        return ids.to(self.device), attn.to(self.device), target.to(self.device), first

    def _token_logps(self, forward, prompts, completions, whole_vocabulary: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-position log-probs of the completion tokens (0 elsewhere) and their mask; over the
        tokens a policy may write, or with `whole_vocabulary` over every token, control tokens
        included (as vLLM's prompt log-probs count them)."""
        ids, attn, target, first = self._encode(prompts, completions)
        width = ids.shape[1]
        # Logits only from the first completion position on: the vocabulary projection dominates the
        # cost of a small model, and prompt positions are never scored.
        keep = width - first + 1
        logits = forward(input_ids=ids, attention_mask=attn, use_cache=False, logits_to_keep=keep).logits
        if not whole_vocabulary:
            logits = self._sampled(logits)
        start = width - keep
        # The log-softmax over the logits as they are: slicing off the last position first would
        # copy the vocabulary-wide tensor, the largest in the step (and zero-fill another in
        # backward). The last position is scored against a stand-in token and dropped from the
        # small result instead.
        mask = target[:, start + 1 :]
        # Positions that are not a completion's may hold prompt tokens outside the sampled
        # vocabulary (control tokens): token 0 stands in for them, and for the last position.
        tokens = torch.cat([ids[:, start + 1 :].masked_fill(~mask, 0), torch.zeros_like(ids[:, :1])], dim=1)
        logp = token_logprobs(logits, tokens)[:, :-1]
        return torch.where(mask, logp, torch.zeros_like(logp)), mask

    def _sampled(self, logits: torch.Tensor) -> torch.Tensor:
        """The logits of the tokens a policy may write: generators never sample a control token,
        so the learner's distribution leaves them out too."""
        return logits if self.sampled_vocab == logits.shape[-1] else logits[..., : self.sampled_vocab]

    def _sequence_logps(self, forward, prompts, completions) -> torch.Tensor:
        logp, _ = self._token_logps(forward, prompts, completions)
        return logp.sum(-1)

    def _pair_logps(self, forward, prompts, chosen, rejected) -> torch.Tensor:
        """Summed completion log-probs of every chosen, then every rejected completion (2m values),
        each prompt run once: its cached keys and values serve both of its completions, which
        cuts the tokens of a pass by the prompts' share (a third of them in the demo)."""
        m = len(prompts)
        width = max(len(p) for p in prompts)
        # Left-padded prompts, so every completion continues right after its prompt's last token.
        p_ids = torch.zeros(m, width, dtype=torch.long)
        p_mask = torch.zeros(m, width, dtype=torch.long)
        for i, p in enumerate(prompts):
            p_ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            p_mask[i, width - len(p) :] = 1
        p_ids, p_mask = p_ids.to(self.device), p_mask.to(self.device)
        p_pos = (p_mask.cumsum(-1) - 1).clamp(min=0)
        out = forward(input_ids=p_ids, attention_mask=p_mask, position_ids=p_pos, use_cache=True, logits_to_keep=1)
        cache = out.past_key_values
        both = torch.arange(m, device=self.device).repeat(2)
        cache.reorder_cache(both)

        # The completions alone, right-padded (as sequences with empty prompts).
        c_ids, c_mask, _, _ = self._encode([[]] * (2 * m), list(chosen) + list(rejected))
        c_pos = p_mask.sum(-1)[both, None] + torch.arange(c_ids.shape[1], device=self.device)[None]
        mask = torch.cat([p_mask[both], c_mask], dim=1)
        logits = self._sampled(
            forward(input_ids=c_ids, attention_mask=mask, position_ids=c_pos, past_key_values=cache, use_cache=True).logits
        )
        # The prompt's last position predicts the first completion token; completion position j
        # predicts token j+1, and the last position is scored against a stand-in and dropped.
        first = token_logprobs(self._sampled(out.logits[both]), c_ids[:, :1])[:, 0]
        rest = token_logprobs(logits, torch.cat([c_ids[:, 1:], c_ids[:, :1]], dim=1))[:, :-1]
        rest = torch.where(c_mask[:, 1:].bool(), rest, torch.zeros_like(rest))
        return first + rest.sum(-1)

    @contextlib.contextmanager
    def _base_model(self) -> Iterator[Any]:
        """The model before training, gradients off: the frozen copy, or the policy with its LoRA
        adapters disabled."""
        with torch.no_grad():
            if self.ref_model is not None:
                yield self.ref_model
            else:
                with self.engine.module.disable_adapter(), self._starting_control_rows():
                    yield self.engine.module

    @contextlib.contextmanager
    def _starting_control_rows(self) -> Iterator[None]:
        embed = self._hf_model().get_input_embeddings()
        with embed.starting_rows() if isinstance(embed, ControlEmbedding) else contextlib.nullcontext():
            yield

    @contextlib.contextmanager
    def _reference_model(self) -> Iterator[Any]:
        """The reference, gradients off: the lagged policy (MOPO), else the base model."""
        if self._lagged is None:
            with self._base_model() as model:
                yield model
        else:
            with self._eval_mode(), self._swapped_in(self._lagged):
                yield self.engine.module

    def _base_logps(self, prompts, completions) -> torch.Tensor:
        with self._base_model() as model:
            return self._sequence_logps(model, prompts, completions)

    def _reference_logps(self, prompts, completions) -> torch.Tensor:
        with self._reference_model() as model:
            return self._sequence_logps(model, prompts, completions)

    @contextlib.contextmanager
    def _swapped_in(self, weights: dict[str, torch.Tensor]) -> Iterator[None]:
        """The policy runs with `weights` in place of its trainable parameters, restored exactly after."""
        params = dict(self.engine.module.named_parameters())
        saved: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            try:
                for name, value in weights.items():
                    saved[name] = params[name].detach().clone()
                    params[name].copy_(value)
                yield
            finally:
                for name, value in saved.items():
                    params[name].copy_(value)

    def refresh_reference(self) -> None:
        """The reference becomes the current policy (MOPO's lag)."""
        self._lagged = {n: p.detach().clone() for n, p in self.engine.module.named_parameters() if p.requires_grad}
        log.info("step %d: reference lagged to the current policy", self.step)

    def _scored_in_chunks(self, score, prompts, completions) -> torch.Tensor:
        chunk = 2 * self.micro
        parts = [score(prompts[s : s + chunk], completions[s : s + chunk]) for s in range(0, len(prompts), chunk)]
        return torch.cat(parts).float()

    def _policy_logps(self, prompts, completions) -> torch.Tensor:
        """Summed completion log-probs under the policy, dropout and gradients off."""
        with self._eval_mode():
            return self._sequence_logps(self.engine.module, prompts, completions)

    def _prepare_objective(self, batch: PairBatch) -> None:
        """The objective's pass over the whole batch (MOPO's closed-form weights), dropout off."""
        self.objective.prepare(
            batch,
            lambda p, c: self._scored_in_chunks(self._policy_logps, p, c),
            lambda p, c: self._scored_in_chunks(self._reference_logps, p, c),
            lambda p, c: self._scored_in_chunks(self._base_logps, p, c),
        )

    def _kl_logratios(self, prompts, completions, penalised: bool) -> torch.Tensor:
        """log pi(y|x) - log pi_ref(y|x) of each answer. On the policy's own answers under the lines
        they were sampled with (a step's `kl_*` samples, an evaluation's answers) their mean is the
        usual sampled estimate of KL(pi || pi_ref); the pairs' answers are not (picked by reward,
        and relabelled pairs sit under a line they were not sampled with). `penalised`: with
        gradients, for the KL penalty."""
        if not prompts:
            return torch.zeros(0, device=self.device)
        reference = self._scored_in_chunks(self._reference_logps, prompts, completions)
        if penalised:
            return self._sequence_logps(self.engine, prompts, completions).float() - reference
        return self._scored_in_chunks(self._policy_logps, prompts, completions) - reference

    # ------------------------------------------------------------------ training

    def _micro_batch(self, batch: PairBatch, idx: list[int], weights: list[float]):
        """The pairs `idx` of the batch (-1: a zero-weight dummy pair, padding every rank to the
        same number of forward/backward calls) as prompts, chosen, rejected and weights."""
        tok = self._dummy_token
        # A dummy prompt as long as the shortest real one keeps logits_to_keep tight.
        real_lens = [len(batch["prompt_ids"][i]) for i in idx if i >= 0]
        dummy_prompt = [tok] * (min(real_lens) if real_lens else 1)
        dummy = [tok]
        prompts = [batch["prompt_ids"][i] if i >= 0 else dummy_prompt for i in idx]
        chosen = [batch["chosen_ids"][i] if i >= 0 else dummy for i in idx]
        rejected = [batch["rejected_ids"][i] if i >= 0 else dummy for i in idx]
        w = torch.tensor([weights[i] if i >= 0 else 0.0 for i in idx], dtype=torch.float32, device=self.device)
        return prompts, chosen, rejected, w

    def _micro_batches(self, n: int) -> int:
        """Micro-batches every rank runs this step: as many as the largest rank's shard fills, so a
        step smaller than the capacity (a warm-start step beside larger DPO steps, pairs dropped
        for ties) does not pay for dummy pairs. Ranks must agree: ZeRO reduces in each backward."""
        need = max(1, math.ceil(n / self.micro))
        if self.world_size > 1:
            import deepspeed.comm as dist

            count = torch.tensor([need], device=self.device)
            dist.all_reduce(count, op=dist.ReduceOp.MAX)
            need = int(count.item())
        return need

    def _set_phase(self, supervised: bool) -> None:
        """Each step's learning rates from the config (`supervised`: a warm-start step, at
        `learner.warm_start_lr` where set), and which control-token rows train: the DPO
        steps may hold some (`learner.control_token_dpo_rows`). A resumed run follows its config,
        not the rates its optimizer saved."""
        lcfg = self.cfg.learner
        groups = self.engine.optimizer.param_groups
        lr = lcfg.warm_start_lr if supervised and lcfg.warm_start_lr is not None else lcfg.lr
        groups[0]["lr"] = lr
        if not self._has_rows:
            return
        rows = "all" if supervised else lcfg.control_token_dpo_rows
        scale = lcfg.control_token_lr_scale
        if not supervised and lcfg.control_token_dpo_lr_scale is not None:
            scale = lcfg.control_token_dpo_lr_scale
        # `none` by a zero rate, not a stopped gradient: Adam's momentum would carry the rows on.
        groups[1]["lr"] = 0.0 if rows == "none" else lr * scale
        embedding = self.engine.module.get_base_model().get_input_embeddings()
        if rows == "ends":
            ends = set(self.control.end_rows)
            embedding.hold([r for r in range(len(self.control.tokens)) if r not in ends])
        else:
            embedding.hold(None)

    def train_step(self, batch: PairBatch) -> LearnerMetrics:
        """One optimizer step on this rank's shard; every rank must call it with the same total_weight."""
        t0 = time.perf_counter()
        n, weights, total_weight = self._validate(batch)
        self._set_phase(bool(batch.get("supervised") or batch.get("warm_start")))
        # The objective's own per-pair figures sit between the loss and the KL, which every algorithm has.
        pair_metrics = self.objective.pair_metrics
        sums = dict.fromkeys(("loss_sum", *(f"{m}_sum" for m in pair_metrics), "pair_logratio_sum", "unweighted_loss_sum"), 0.0)
        grad_norm = float("nan")
        skipped = total_weight == 0
        # Before the update, on the policy that sampled (up to the rollout's staleness) the answers;
        # with a KL penalty the same pass carries its gradient, in the first micro-batch's backward.
        kl_coef = self.cfg.algorithm.kl_coef
        # Per sample (`algorithm.corner_kl_coef`) only where the batch says so: one coefficient is
        # applied after the mean, as before, so that runs without it repeat bit for bit.
        kl_coefs = torch.tensor(batch["kl_coefs"], device=self.device) if "kl_coefs" in batch else None
        penalised = bool((kl_coefs > 0).any()) if kl_coefs is not None else kl_coef > 0
        logratios = self._kl_logratios(
            batch.get("kl_prompt_ids", []), batch.get("kl_completion_ids", []), penalised=penalised and not skipped
        )
        kl_sum, kl_samples = float(logratios.detach().sum()), len(logratios)
        if skipped:
            # total_weight is global, so every rank skips together; stepping Adam on zero gradients
            # would still move the weights through momentum and weight decay.
            log.warning("train_step %d: no pair carries weight on any rank; optimizer step skipped", self.step + 1)
        else:
            # DeepSpeed averages gradients over data-parallel ranks, hence the world-size factor;
            # backward(scale_wrt_gas=False) keeps it from also dividing by the accumulation steps.
            scale = self.engine.dp_world_size / total_weight
            micro_batches = self._micro_batches(n)
            index = list(range(n)) + [-1] * (micro_batches * self.micro - n)
            own_norm = self.zero_stage == 0 and self.dtype == torch.float32
            self._prepare_objective(batch)
            for k in range(micro_batches):
                idx = index[k * self.micro : (k + 1) * self.micro]
                # The boundary is set by hand: a step runs as many micro-batches as its largest
                # shard needs, not the capacity's, so DeepSpeed's own count would step too late.
                self.engine.set_gradient_accumulation_boundary(k == micro_batches - 1)
                prompts, chosen, rejected, w = self._micro_batch(batch, idx, weights)
                m = len(idx)
                # Chosen and rejected in one pass, behind their prompt run once. The reference
                # first: a lagged one is swapped into the policy's parameters, which must not
                # change between the policy's forward and its backward.
                with self._reference_model() as reference:
                    ref = self._pair_logps(reference, prompts, chosen, rejected).float()
                policy = self._pair_logps(self.engine, prompts, chosen, rejected).float()
                pc, pr, rc, rr = policy[:m], policy[m:], ref[:m], ref[m:]
                losses = self.objective.pair_losses(pc, pr, rc, rr, torch.tensor(idx, dtype=torch.long), batch)
                loss = (w * losses).sum() * scale
                if k == 0 and logratios.requires_grad:
                    # The mean over this rank's samples; DeepSpeed's gradient average over ranks,
                    # undone for the pairs by `scale`, makes it the mean of the ranks' means.
                    if kl_coefs is None:
                        loss = loss + kl_coef * 0.5 * logratios.pow(2).mean()
                    else:
                        loss = loss + 0.5 * (kl_coefs * logratios.pow(2)).mean()
                self.engine.backward(loss, scale_wrt_gas=False)
                if own_norm and k == micro_batches - 1:
                    grad_norm = self._local_grad_norm()
                self.engine.step()
                with torch.no_grad():
                    real = torch.tensor([i >= 0 for i in idx], device=self.device)
                    if real.any():
                        sums["loss_sum"] += float((w * losses)[real].sum())
                        sums["unweighted_loss_sum"] += float(losses[real].sum())
                        for name, value in self.objective.pair_metric_sums(pc[real], pr[real], rc[real], rr[real]).items():
                            sums[f"{name}_sum"] += value
                        sums["pair_logratio_sum"] += float((pc - rc)[real].sum() + (pr - rr)[real].sum())
            ds_norm = self.engine.get_global_grad_norm()
            if ds_norm is not None and not own_norm:
                grad_norm = float(ds_norm)
            self.step += 1
            after = self.objective.step_end()
            if after.get("refresh_reference"):
                self.refresh_reference()

        weight_sum = sum(weights)
        nan = float("nan")
        algorithm_metrics = {} if skipped else after.get("metrics", {})
        unweighted = sums.pop("unweighted_loss_sum")
        metrics = {
            "step": self.step,
            "rank": self.rank,
            "pairs": n,
            "capacity": self.capacity,
            "micro_batches": 0 if skipped else micro_batches,
            "weight_sum": weight_sum,
            "total_weight": total_weight,
            **sums,
            # This rank's share of the global objective: summing it over ranks gives the step's loss.
            "objective": sums["loss_sum"] / total_weight if total_weight > 0 else 0.0,
            "loss": sums["loss_sum"] / weight_sum if weight_sum > 0 else (unweighted / n if n and not skipped else nan),
            **{m: sums[f"{m}_sum"] / n if n and not skipped else nan for m in pair_metrics},
            "kl_sum": kl_sum,
            "kl_samples": kl_samples,
            "kl": kl_sum / kl_samples if kl_samples else nan,
            "pair_logratio": sums["pair_logratio_sum"] / (2 * n) if n and not skipped else nan,
            "grad_norm": grad_norm,
            "lr": float(self.engine.get_lr()[0]),
            "skipped": int(skipped),
            "seconds": time.perf_counter() - t0,
            **algorithm_metrics,
        }
        return metrics

    def _local_grad_norm(self) -> float:
        # ZeRO-0 in fp32 clips inside DeepSpeed without reporting the norm; after the boundary
        # backward the gradients are already all-reduced, so every rank computes the global norm.
        sq = 0.0
        for p in self.engine.module.parameters():
            if p.requires_grad and p.grad is not None:
                sq += float(p.grad.detach().float().pow(2).sum())
        return math.sqrt(sq)

    # ------------------------------------------------------------------ scoring

    @contextlib.contextmanager
    def _eval_mode(self) -> Iterator[None]:
        module = self.engine.module
        was_training = module.training
        module.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            module.train(was_training)

    def adapter_logprobs(self, adapter_dir: str, prompt_ids: list[list[int]], completion_ids: list[list[int]]) -> dict[str, list[float]]:
        """Summed completion log-probs under a PEFT adapter trained on this base with this run's
        LoRA shape (`adapter`), and under the base (`base`): MODPO's implicit margin rewards are
        beta * (adapter - base). The adapter is swapped in for the call; training is untouched."""
        import json

        from safetensors.torch import load_file

        if not self.lora:
            raise ValueError("implicit MODPO margins need learner.lora.enabled: the margin adapter is swapped into the LoRA layers")
        folder = Path(adapter_dir)
        try:
            config = json.loads((folder / "adapter_config.json").read_text())
            saved = load_file(str(folder / "adapter_model.safetensors"))
        except (OSError, ValueError) as exc:
            raise ValueError(f"margin adapter {folder}: not a PEFT adapter folder ({exc})") from None
        lc = self.cfg.learner.lora
        if (config.get("r"), config.get("lora_alpha")) != (lc.rank, lc.alpha):
            raise ValueError(
                f"margin adapter {folder}: rank {config.get('r')}, alpha {config.get('lora_alpha')}; this learner's LoRA is "
                f"rank {lc.rank}, alpha {lc.alpha}: train the adapter with the same learner.lora"
            )
        params = {n: p for n, p in self.engine.module.named_parameters() if p.requires_grad}
        # PEFT saves `...lora_A.weight`; the live parameter is `...lora_A.default.weight`.
        weights = {
            name.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight"): t
            for name, t in saved.items()
        }
        if set(weights) != set(params) or any(weights[n].shape != params[n].shape for n in params):
            missing, extra = sorted(set(params) - set(weights)), sorted(set(weights) - set(params))
            raise ValueError(
                f"margin adapter {folder} does not fit this learner's LoRA layers (missing {missing[:2]}, unexpected {extra[:2]})"
            )
        with self._eval_mode(), self._swapped_in({n: t.to(params[n].device, params[n].dtype) for n, t in weights.items()}):
            adapter = self._scored_in_chunks(lambda p, c: self._sequence_logps(self.engine.module, p, c), prompt_ids, completion_ids)
        base = self._scored_in_chunks(self._base_logps, prompt_ids, completion_ids)
        return {"adapter": adapter.cpu().tolist(), "base": base.cpu().tolist()}

    def token_logprobs(self, token_ids: list[list[int]]) -> list[list[float]]:
        """Log-prob of every token after the first, under the current policy (adapters on, dropout
        off), over the whole vocabulary: what a generator's prompt log-probs are compared with."""
        for i, s in enumerate(token_ids):
            if len(s) < 2:
                raise ValueError(f"token_ids[{i}] needs at least 2 tokens, got {len(s)}")
        out: list[list[float]] = []
        chunk = 2 * self.micro
        with self._eval_mode():
            for s in range(0, len(token_ids), chunk):
                seqs = token_ids[s : s + chunk]
                logp, _ = self._token_logps(self.engine.module, [q[:1] for q in seqs], [q[1:] for q in seqs], whole_vocabulary=True)
                logp = logp.float().cpu()
                out.extend(logp[i, : len(q) - 1].tolist() for i, q in enumerate(seqs))
        return out

    def kl_logratios(self, prompt_ids: list[list[int]], completion_ids: list[list[int]]) -> list[float]:
        """log pi(y|x) - log pi_ref(y|x) of each answer, summed over its tokens, dropout off: on the
        policy's own samples, their mean is the KL the training health figure estimates, here for
        answers the caller chose (an evaluation's, under each weight line apart)."""
        if len(prompt_ids) != len(completion_ids):
            raise ValueError(f"kl_logratios: {len(prompt_ids)} prompts but {len(completion_ids)} completions")
        for i, c in enumerate(completion_ids):
            if not c:
                raise ValueError(f"kl_logratios: completion_ids[{i}] is empty")
        return self._kl_logratios(prompt_ids, completion_ids, penalised=False).cpu().tolist()

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self, path: str) -> None:
        """Module, optimizer and scheduler (DeepSpeed) plus RNG and step; a collective on all ranks."""
        import deepspeed.comm as dist

        Path(path).mkdir(parents=True, exist_ok=True)
        # With LoRA the frozen base is the model file itself: only adapters and their optimizer state
        # are saved. DeepSpeed's exclude_frozen_parameters misses a tied head (named_parameters()
        # lists the shared tensor once), so the state dict is filtered down to trainable names here.
        original = self.engine.module_state_dict
        if self.lora:
            keep = {n for n, p in self.engine.module.named_parameters() if p.requires_grad}

            def trainable_state_dict(*args: Any, **kwargs: Any) -> dict:
                sd = original(*args, **kwargs)
                for name in [k for k in sd if k not in keep]:
                    del sd[name]
                return sd

            self.engine.module_state_dict = trainable_state_dict
        try:
            self.engine.save_checkpoint(path, tag=_DS_TAG, client_state={"learner_step": self.step}, exclude_frozen_parameters=self.lora)
        finally:
            if self.lora:
                del self.engine.module_state_dict
        np_state = np.random.get_state()
        state = {
            "step": self.step,
            "world_size": self.world_size,
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            # Stored as tensors and plain values so the file loads with weights_only=True.
            "numpy_rng": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])),
            "python_rng": random.getstate(),
            "objective": self.objective.state_dict(),
            "lagged_reference": self._lagged,
        }
        # Every rank writes its own RNG; rank 0's file is the one a different world size falls back to.
        target = Path(path) / _STATE_FILE.format(rank=self.rank)
        tmp = target.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, target)
        dist.barrier()
        log.info("rank %d saved learner checkpoint at step %d to %s", self.rank, self.step, path)

    def load_checkpoint(self, path: str, weights_only: bool = False) -> None:
        """Restore what `save_checkpoint` wrote; a collective on all ranks. `weights_only`: the
        policy without optimizer state, enough to export it (and readable at another world size
        with ZeRO-0..2)."""
        state_file = Path(path) / _STATE_FILE.format(rank=self.rank)
        if not state_file.is_file():
            fallback = Path(path) / _STATE_FILE.format(rank=0)
            if not fallback.is_file():
                raise FileNotFoundError(f"{path}: no learner checkpoint ({state_file.name} missing)")
            log.warning("rank %d: %s missing, using rank 0's RNG state", self.rank, state_file.name)
            state_file = fallback
        load_path, client = self.engine.load_checkpoint(
            path,
            tag=_DS_TAG,
            load_module_strict=not self.lora,
            load_optimizer_states=not weights_only,
            load_lr_scheduler_states=not weights_only,
        )
        if load_path is None:
            raise FileNotFoundError(f"{path}: DeepSpeed found no checkpoint with tag {_DS_TAG!r}")
        state = torch.load(state_file, weights_only=True)
        self.step = int(state["step"])
        if client and int(client.get("learner_step", self.step)) != self.step:
            raise RuntimeError(f"{path}: engine checkpoint is at step {client['learner_step']}, learner state at {self.step}")
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] and torch.cuda.is_available() and len(state["cuda_rng"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        name, keys, pos, has_gauss, cached = state["numpy_rng"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
        py = state["python_rng"]
        random.setstate((py[0], tuple(py[1]), py[2]))
        if not weights_only:
            self.objective.load_state_dict(state.get("objective", {}))
            self._lagged = state.get("lagged_reference")
        log.info("rank %d resumed learner from %s at step %d", self.rank, path, self.step)

    # ------------------------------------------------------------------ lifecycle

    def ping(self) -> dict:
        return {
            "rank": self.rank,
            "world_size": self.world_size,
            "step": self.step,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "device": str(self.device),
        }

    def close(self) -> None:
        """Free the engine and the process group, so another Learner can start in this process."""
        import deepspeed.comm as dist

        self.close_broadcast()
        if self.engine is not None:
            destroy = getattr(self.engine, "destroy", None)
            if destroy is not None:
                destroy()
            self.engine = None
        self.ref_model = None
        if dist.is_initialized():
            dist.destroy_process_group()

    def __enter__(self) -> Learner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
