"""How weights travel from the learner to the generators, whatever the backend (the pure half of
weight sync; the backends are `actors.weight_sync`, the two ends `actors.learner_weights` and
`actors.generator_weights`, LoRA payloads `moalign.lora_sync`).

Pure torch: the learner exports HF-named tensors, these group them into size-bounded buckets
(so a transfer never needs the whole model resident twice). For the broadcast path, a bucket
travels as one flat byte buffer described by a manifest, over a standalone process group (gloo
on CPU, NCCL on GPU).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

NamedTensors = Iterable[tuple[str, torch.Tensor]]

log = logging.getLogger(__name__)

_MIB = 1 << 20


def tensor_nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def bucketize(named_tensors: NamedTensors, bucket_mb: float) -> list[list[tuple[str, torch.Tensor]]]:
    """Split `named_tensors` into consecutive buckets of at most `bucket_mb` MiB each.

    Order is preserved (the generator processes a layer as soon as all of its tensors have
    arrived, so keeping the exporter's layer order keeps the generator's buffers small).
    A tensor larger than a bucket travels alone rather than being split: a receiver then
    never has to reassemble a tensor.
    """
    if not bucket_mb > 0:
        raise ValueError(f"bucket_mb must be > 0, got {bucket_mb!r}")
    cap = bucket_mb * _MIB
    buckets: list[list[tuple[str, torch.Tensor]]] = []
    current: list[tuple[str, torch.Tensor]] = []
    current_bytes = 0
    for name, tensor in named_tensors:
        size = tensor_nbytes(tensor)
        if current and current_bytes + size > cap:
            buckets.append(current)
            current, current_bytes = [], 0
        current.append((name, tensor))
        current_bytes += size
        if current_bytes >= cap:
            buckets.append(current)
            current, current_bytes = [], 0
    if current:
        buckets.append(current)
    return buckets


class LazyBuckets:
    """An iterable that fetches one bucket at a time: `LazyBuckets(refs, ray.get)`.

    Ray resolves only top-level task arguments, and a generator cannot be pickled; this
    object can (with `fetch` a module-level function or a functools.partial of one, such as
    `partial(ray.get, timeout=60)`), so it can be handed to `Generator.load_weights` on a
    remote actor, which then holds roughly one bucket at a time instead of the whole model.
    """

    def __init__(self, handles: Sequence[Any], fetch: Callable[[Any], list[tuple[str, torch.Tensor]]]):
        self.handles = list(handles)
        self.fetch = fetch

    def __len__(self) -> int:
        return len(self.handles)

    def __iter__(self):
        for handle in self.handles:
            yield self.fetch(handle)


# ---------------------------------------------------------------------------- flat buckets

# Byte offsets inside a flat bucket are rounded up to this, so every tensor's slice can be
# reinterpreted as its dtype in place (`.view(dtype)` needs an offset divisible by the element
# size) and starts on a cache line / CUDA transaction boundary.
_ALIGN = 64

# (name, shape, dtype name, byte offset, numel): plain Python values, so a manifest pickles
# through Ray and reads the same on a machine with a different torch build.
ManifestEntry = tuple[str, tuple[int, ...], str, int, int]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"manifest: {name!r} is not a torch dtype")
    return dtype


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def bucket_manifest(named: NamedTensors) -> list[ManifestEntry]:
    """Where each tensor of a bucket lives in its flat byte buffer, without copying anything."""
    manifest: list[ManifestEntry] = []
    offset = 0
    for name, tensor in named:
        manifest.append((name, tuple(int(d) for d in tensor.shape), _dtype_name(tensor.dtype), offset, tensor.numel()))
        offset = _aligned(offset + tensor_nbytes(tensor))
    return manifest


def manifest_nbytes(manifest: Sequence[ManifestEntry]) -> int:
    """Size of the flat buffer a bucket's manifest describes."""
    end = 0
    for _, _, dtype, offset, numel in manifest:
        end = max(end, offset + numel * dtype_from_name(dtype).itemsize)
    return _aligned(end)


def flatten_bucket(named: NamedTensors, device: torch.device | str | None = None) -> tuple[torch.Tensor, list[ManifestEntry]]:
    """One flat uint8 buffer holding every tensor of a bucket, and its manifest.

    Bytes rather than one buffer per dtype: a bucket may mix dtypes (e.g. a float32 norm next to
    bfloat16 matrices, an int buffer), and a single buffer is a single collective per bucket.
    `device` places the buffer (e.g. CUDA for NCCL); default: the first tensor's device.
    """
    named = list(named)
    manifest = bucket_manifest(named)
    if device is None:
        device = named[0][1].device if named else "cpu"
    flat = torch.empty(manifest_nbytes(manifest), dtype=torch.uint8, device=device)
    for (_, tensor), (_, _, _, offset, numel) in zip(named, manifest):
        if numel:
            # reshape(-1) before the uint8 view: a non-contiguous tensor is copied, not misread.
            src = tensor.detach().reshape(-1).view(torch.uint8)
            flat[offset : offset + src.numel()].copy_(src)
    return flat, manifest


def unflatten_bucket(flat: torch.Tensor, manifest: Sequence[ManifestEntry]) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) views into `flat`, in manifest order; nothing is copied, so the views keep
    `flat` alive and must not outlive a reuse of it."""
    if flat.dtype != torch.uint8 or flat.dim() != 1:
        raise ValueError(f"flat bucket must be a 1-D uint8 tensor, got {flat.dtype} with shape {tuple(flat.shape)}")
    need = manifest_nbytes(manifest)
    if flat.numel() < need:
        raise ValueError(f"flat bucket holds {flat.numel()} bytes, its manifest needs {need}")
    out = []
    for name, shape, dtype_name, offset, numel in manifest:
        dtype = dtype_from_name(dtype_name)
        chunk = flat[offset : offset + numel * dtype.itemsize]
        out.append((name, chunk.view(dtype).view(shape)))
    return out


# ---------------------------------------------------------------------------- broadcast group


class BroadcastError(RuntimeError):
    """A collective of a BroadcastGroup failed (peer gone, timeout); the group is unusable after it."""


def _local_ip_towards(addr: str, port: int) -> str:
    # The address this host uses to reach `addr`: gloo's default (the hostname's address) is
    # often 127.0.1.1 from /etc/hosts, which works on one node and silently fails across nodes.
    import socket

    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.connect((addr, port))  # UDP: no packet is sent, only a route is chosen
        return s.getsockname()[0]


def free_port(host: str = "") -> int:
    """A TCP port that was free a moment ago on this host (the caller binds it soon after)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class BroadcastGroup:
    """A process group of its own for one-to-all broadcasts, outside torch.distributed's global state.

    The learner (DeepSpeed) and the generator (vLLM) each already own their process's default
    group, so this one is built from a TCPStore and a backend object directly and is used only
    through that object: nothing here reads or changes `torch.distributed`'s default group.
    """

    def __init__(self, store: Any, backend: Any, rank: int, world_size: int, backend_name: str, timeout_s: float):
        self._store = store
        self._backend = backend
        self.rank = rank
        self.world_size = world_size
        self.backend = backend_name
        self.timeout_s = timeout_s
        self.broken = False

    @property
    def is_open(self) -> bool:
        return self._backend is not None and not self.broken

    def broadcast(self, tensor: torch.Tensor, root: int = 0) -> torch.Tensor:
        """In place: `tensor` on `root` is copied into `tensor` on every other rank. Blocks until
        this rank's part is done (NCCL: until the current stream is ordered after it)."""
        from datetime import timedelta

        if self._backend is None:
            raise BroadcastError("broadcast group is closed")
        if self.broken:
            raise BroadcastError("broadcast group is broken by an earlier failure; open a new one")
        if not 0 <= root < self.world_size:
            raise ValueError(f"root {root} is not a rank of a group of {self.world_size}")
        opts = torch.distributed.BroadcastOptions()
        opts.rootRank = root
        opts.rootTensor = 0
        opts.timeout = timedelta(seconds=self.timeout_s)
        try:
            self._backend.broadcast([tensor], opts).wait()
        except Exception as exc:
            # A failed collective leaves peers at different points of the sequence: never reuse it.
            self.broken = True
            raise BroadcastError(f"broadcast (rank {self.rank} of {self.world_size}, {self.backend}, root {root}) failed: {exc}") from exc
        return tensor

    def close(self) -> None:
        backend, self._backend = self._backend, None
        if backend is not None:
            try:
                # abort, not shutdown, after a failure: shutdown may wait on a peer that is gone.
                backend.abort() if self.broken else backend.shutdown()
            except Exception as exc:
                log.warning("closing broadcast group (rank %d): %s", self.rank, exc)
        self._store = None

    def __del__(self) -> None:
        if getattr(self, "_backend", None) is not None:
            self.close()


def open_broadcast_group(
    master_addr: str,
    master_port: int,
    rank: int,
    world_size: int,
    backend: str = "gloo",
    timeout_s: float = 300.0,
) -> BroadcastGroup:
    """Join (rank 0: host) a standalone broadcast group; blocks until all `world_size` ranks joined.

    Every rank must call this concurrently with the same address, port, world size and backend
    ("gloo" for CPU tensors, "nccl" for CUDA tensors). A rank that does not arrive within
    `timeout_s` makes the others raise instead of waiting forever; a backend mismatch is
    reported by name instead of hanging.
    """
    from datetime import timedelta

    import torch.distributed as dist

    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of size {world_size}")
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
    timeout = timedelta(seconds=timeout_s)
    store = dist.TCPStore(master_addr, int(master_port), world_size, is_master=rank == 0, timeout=timeout, wait_for_workers=False)
    # A fresh namespace per group: the same port may be reused by a later group.
    prefix = dist.PrefixStore(f"moalign-broadcast/{master_addr}:{master_port}/", store)
    prefix.set(f"backend/{rank}", backend)
    if rank == 0:
        others = {r: prefix.get(f"backend/{r}").decode() for r in range(1, world_size)}
        wrong = {r: b for r, b in others.items() if b != backend}
    else:
        root = prefix.get("backend/0").decode()
        wrong = {0: root} if root != backend else {}
    if wrong:
        raise ValueError(f"broadcast group: rank {rank} uses {backend!r} but rank(s) {wrong} differ; every rank needs the same backend")

    if backend == "gloo":
        opts = dist.ProcessGroupGloo._Options()
        opts._timeout = timeout
        iface = os.environ.get("GLOO_SOCKET_IFNAME")
        if iface:
            opts._devices = [dist.ProcessGroupGloo.create_device(interface=iface.split(",")[0])]
        else:
            opts._devices = [dist.ProcessGroupGloo.create_device(hostname=_local_ip_towards(master_addr, int(master_port)))]
        pg = dist.ProcessGroupGloo(prefix, rank, world_size, opts)
    else:
        if not (torch.cuda.is_available() and dist.is_nccl_available()):
            raise RuntimeError("backend 'nccl' needs CUDA and a torch build with NCCL")
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        pg = dist.ProcessGroupNCCL(prefix, rank, world_size, opts)
    log.info("joined broadcast group %s:%s as rank %d/%d (%s)", master_addr, master_port, rank, world_size, backend)
    return BroadcastGroup(store, pg, rank, world_size, backend, timeout_s)
