"""The learner's weights leaving it: merged full weights for a sync, a Hugging Face export, and
the broadcast endpoint the generators receive from.

A mixin of `actors.learner.Learner`, kept apart because none of it depends on the algorithm:
it reads the engine (`engine`, `lora`, `zero_stage`, `dtype`, `device`, `rank`, `step`,
`model_path`, `cfg`) and the names the base checkpoint stores (`_ckpt_keys`). LoRA is merged out
of place, so the training weights are never touched.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import torch

from moalign.control_tokens import ControlEmbedding
from moalign.lora_sync import adapter_tensors, add_lora, rows_name
from moalign.weight_transport import BroadcastGroup, bucket_manifest, bucketize, flatten_bucket, open_broadcast_group

log = logging.getLogger(__name__)

NamedTensors = list[tuple[str, torch.Tensor]]


class WeightPublisher:
    """Weight export and broadcast for a learner rank."""

    engine: Any
    lora: bool
    zero_stage: int
    dtype: torch.dtype
    device: torch.device
    rank: int
    step: int
    model_path: str
    cfg: Any
    _ckpt_keys: set[str]
    _broadcast: BroadcastGroup | None
    # Buckets computed by weight_manifest() for the broadcast_weights() that follows: (step, bucket_mb, payload, buckets).
    _staged: tuple[int, float, str, list[NamedTensors]] | None

    def _hf_model(self) -> torch.nn.Module:
        module = self.engine.module
        return module.get_base_model() if self.lora else module

    def _gathered(self, params: list[torch.nn.Parameter]):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=self.zero_stage == 3)

    def _export_copy(self, t: torch.Tensor) -> torch.Tensor:
        # copy=True: on CPU .to() may return the training storage itself, which the caller must never alias.
        return t.detach().to(device="cpu", dtype=self.dtype, copy=True).contiguous()

    def _merged_lora_weight(self, module: torch.nn.Module) -> torch.Tensor:
        """W + sum_adapters scaling * B @ A, into a new tensor: the training weights are never touched."""
        from peft.tuners.lora import Linear as LoraLinear

        weight = module.base_layer.weight
        merged = weight.detach().float().clone()
        for adapter in module.active_adapters:
            if adapter not in module.lora_A:
                continue
            if module.use_dora.get(adapter, False):
                raise NotImplementedError("exporting DoRA adapters is not supported")
            if isinstance(module, LoraLinear) and not module.fan_in_fan_out:
                add_lora(merged, module.lora_A[adapter].weight, module.lora_B[adapter].weight, module.scaling[adapter])
                continue
            delta = module.get_delta_weight(adapter).float()
            merged += delta.to(merged.device).reshape(merged.shape)
        return merged.to(device="cpu", dtype=self.dtype).contiguous()

    def _named_full_weights(self) -> NamedTensors:
        return self._named_payload(adapters=False)

    def _named_payload(self, adapters: bool) -> NamedTensors:
        """The policy as named CPU tensors: every checkpoint tensor under its Hugging Face name,
        LoRA merged; or, with `adapters`, each plain LoRA linear layer as its factors (see
        moalign.lora_sync) and only the trainable rest, the frozen weights staying behind.

        A collective under ZeRO-3: every rank must call it, as each module's partitions are
        gathered in turn (the same gathers in the same order on every rank); only rank 0 copies
        the weights out, the others return nothing."""
        from peft.tuners.lora import Linear as LoraLinear
        from peft.tuners.lora import LoraLayer

        wanted = self._ckpt_keys
        keep = self.rank == 0
        out: NamedTensors = []

        def as_adapters(module: torch.nn.Module, name: str) -> bool:
            active = [a for a in module.active_adapters if a in module.lora_A]
            if not (type(module) is LoraLinear and not module.fan_in_fan_out and not any(module.use_dora.get(a) for a in active)):
                return False
            for i, adapter in enumerate(active if keep else ()):
                a, b = (t.weight.detach().to("cpu", copy=True) for t in (module.lora_A[adapter], module.lora_B[adapter]))
                out.extend(adapter_tensors(name, i, a, b, module.scaling[adapter]))
            return True

        def walk(module: torch.nn.Module, prefix: str) -> None:
            if isinstance(module, ControlEmbedding):
                # Control tokens: the trained rows alone with adapters, else the whole embedding.
                name = prefix + "weight"
                with self._gathered([module.base.weight, module.rows]):
                    if keep:
                        out.append(
                            (rows_name(name, module.first_id), self._export_copy(module.trained_rows))
                            if adapters
                            else (name, self._export_copy(module.weight))
                        )
                return
            if isinstance(module, LoraLayer):
                with self._gathered(list(module.parameters())):
                    if adapters and as_adapters(module, prefix.removesuffix(".")):
                        return
                    for pname, p in module.base_layer.named_parameters(recurse=False):
                        name = prefix + pname
                        if name in wanted and keep:
                            out.append((name, self._merged_lora_weight(module) if pname == "weight" else self._export_copy(p)))
                return
            own = [(prefix + k, p) for k, p in module._parameters.items() if p is not None and (p.requires_grad or not adapters)]
            if not adapters:
                own += [
                    (prefix + k, b) for k, b in module._buffers.items() if b is not None and k not in module._non_persistent_buffers_set
                ]
            own = [(k, t) for k, t in own if k in wanted]
            if own:
                with self._gathered([t for _, t in own if isinstance(t, torch.nn.Parameter)]):
                    out.extend((k, self._export_copy(t)) for k, t in own if keep)
            for cname, child in module.named_children():
                walk(child, f"{prefix}{cname}.")

        walk(self._hf_model(), "")
        if not keep:
            return out
        names = [k for k, _ in out]
        missing, dupes = (set() if adapters else wanted - set(names)), len(names) - len(set(names))
        if missing or dupes:
            raise RuntimeError(
                f"weight export does not match the checkpoint's names: {len(missing)} missing "
                f"(e.g. {sorted(missing)[:3]}), {dupes} duplicated"
            )
        return out

    def _sync_payload(self, payload: str) -> NamedTensors:
        if payload not in ("adapter", "full"):
            raise ValueError(f"weight payload must be 'adapter' or 'full', got {payload!r}")
        if payload == "adapter" and not self.lora:
            raise ValueError("an adapter payload needs learner.lora.enabled; this learner trains all weights")
        return self._named_payload(adapters=payload == "adapter")

    def full_weight_bytes(self) -> int:
        """Bytes of every checkpoint tensor in the model dtype: what a full sync sends."""
        from moalign.models import checkpoint_shapes

        shapes = checkpoint_shapes(self.model_path) or {}
        return sum(math.prod(shape) for name, shape in shapes.items() if name in self._ckpt_keys) * self.dtype.itemsize

    @torch.no_grad()
    def export_weights(self, bucket_mb: float, payload: str = "full") -> list[NamedTensors]:
        """The policy for a sync, in buckets of about `bucket_mb` MiB of detached CPU tensors:
        `full`, every weight (LoRA merged out of place) under the checkpoint's Hugging Face
        names in the model dtype; `adapter`, the LoRA factors (see moalign.lora_sync). Every
        rank calls it (a collective under ZeRO-3); ranks other than 0 get no buckets."""
        return bucketize(self._sync_payload(payload), bucket_mb)

    @torch.no_grad()
    def export_policy(self, dest: str, card: dict) -> dict:
        """Write the policy as a merged Hugging Face folder at `dest` (plus `dest/adapter` with
        LoRA) and its card (`moalign.json`); a collective on all ranks, rank 0 writes."""
        from moalign.export_folder import ADAPTER_DIR, PolicyCard, add_adapter_token_rows, publish_folder, write_card, write_model_folder

        policy_card = PolicyCard.model_validate({**card, "adapter_base": self.model_path} if self.lora else card)
        named = self._named_full_weights()
        trainable = [p for p in self.engine.module.parameters() if p.requires_grad]
        with self._gathered(trainable):
            if self.rank != 0:
                return {}

            def write(folder: Path) -> None:
                write_model_folder(folder, named, self.model_path, self.cfg.model.dtype)
                write_card(folder, policy_card)
                if self.lora:
                    adapter = folder / ADAPTER_DIR
                    self.engine.module.save_pretrained(str(adapter), safe_serialization=True)
                    model = self._hf_model()
                    embed = model.get_input_embeddings()
                    if isinstance(embed, ControlEmbedding):
                        module = next(name for name, m in model.named_modules() if m is embed)
                        add_adapter_token_rows(adapter, module, embed.first_id, self._export_copy(embed.trained_rows))
                    write_card(adapter, policy_card)

            started = time.perf_counter()
            publish_folder(dest, write)
        size = sum(f.stat().st_size for f in Path(dest).rglob("*") if f.is_file())
        log.info("exported the step-%d policy to %s (%.1f MB) in %.1fs", self.step, dest, size / 1e6, time.perf_counter() - started)
        return {"path": str(dest), "bytes": size, "step": self.step}

    # ------------------------------------------------------------------ broadcast weight sync

    def open_broadcast(self, master_addr: str, master_port: int, world_size: int, timeout_s: float, backend: str | None = None) -> dict:
        """Host a broadcast group as its rank 0 (the generators are ranks 1..world_size-1); blocks
        until every rank joined. `backend`: default NCCL when this learner is on CUDA, else gloo."""
        if self.rank != 0:
            raise RuntimeError(f"only learner rank 0 broadcasts weights; this is rank {self.rank}")
        self.close_broadcast()
        backend = backend or ("nccl" if self.device.type == "cuda" else "gloo")
        self._broadcast = open_broadcast_group(master_addr, master_port, 0, world_size, backend, timeout_s)
        return {"backend": backend, "world_size": world_size}

    def close_broadcast(self) -> None:
        group, self._broadcast = self._broadcast, None
        self._staged = None
        if group is not None:
            group.close()

    @torch.no_grad()
    def weight_manifest(self, bucket_mb: float, payload: str = "full") -> list[list[tuple]]:
        """Per bucket, the flat-buffer manifest (name, shape, dtype, byte offset, numel) that the
        next `broadcast_weights(bucket_mb)` sends, in order. The receivers need it before the
        broadcast starts to allocate their buffers, so this is a separate call; the weights it
        computes are kept for that broadcast rather than merged twice. Every rank calls it (a
        collective under ZeRO-3); only rank 0's manifest has buckets, and only rank 0 broadcasts."""
        buckets = bucketize(self._sync_payload(payload), bucket_mb)
        self._staged = (self.step, bucket_mb, payload, buckets)
        return [bucket_manifest(b) for b in buckets]

    @torch.no_grad()
    def broadcast_weights(self, bucket_mb: float, payload: str = "full") -> dict:
        """Broadcast the weights described by the last `weight_manifest(bucket_mb, payload)`, one flat
        buffer per bucket; every generator must be in `receive_weights` with that manifest."""
        group = self._broadcast
        if group is None or not group.is_open:
            raise RuntimeError("no open broadcast group: call open_broadcast first (a failed broadcast closes it)")
        staged, self._staged = self._staged, None
        if staged is not None and staged[:3] == (self.step, bucket_mb, payload):
            buckets = staged[3]
        else:
            # Names, shapes and order never change between steps, so the receivers' manifest
            # still matches; only the values are recomputed.
            log.warning("broadcast_weights: no %s weights staged for step %d at %s MiB; recomputing", payload, self.step, bucket_mb)
            buckets = bucketize(self._sync_payload(payload), bucket_mb)
        device = self.device if group.backend == "nccl" else torch.device("cpu")
        started, sent = time.perf_counter(), 0
        try:
            for i in range(len(buckets)):
                flat, _ = flatten_bucket(buckets[i], device=device)
                buckets[i] = []  # the CPU copy is in `flat` now; drop it so memory shrinks as we go
                group.broadcast(flat, root=0)
                sent += flat.numel()
        except BaseException:
            # The peers are at unknown points of the sequence: the group cannot be reused.
            self.close_broadcast()
            raise
        seconds = time.perf_counter() - started
        log.info("broadcast %d buckets (%.1f MB) over %s in %.2fs", len(buckets), sent / 1e6, group.backend, seconds)
        return {"seconds": seconds, "bytes": sent, "buckets": len(buckets)}
