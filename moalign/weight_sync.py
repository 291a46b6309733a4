"""Helpers for moving full model weights from the learner to the generators.

Pure torch: the learner exports HF-named tensors, these group them into size-bounded buckets
(so a transfer never needs the whole model resident twice) and fingerprint them (so both ends
can check that they hold the same weights).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

NamedTensors = Iterable[tuple[str, torch.Tensor]]

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


def _raw_bytes(tensor: torch.Tensor) -> memoryview:
    # Viewing as uint8 works for every dtype (bf16 and fp8 have no numpy equivalent).
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def checksum(named_tensors: NamedTensors) -> str:
    """sha256 over names, dtypes, shapes and bytes; independent of the order tensors come in.

    Length-prefixed fields keep distinct inputs from hashing the same by concatenation
    (e.g. name "a" + shape (12,) versus name "a1" + shape (2,)).
    """
    by_name: dict[str, torch.Tensor] = {}
    for name, tensor in named_tensors:
        if name in by_name:
            raise ValueError(f"checksum: duplicate tensor name {name!r}")
        by_name[name] = tensor
    h = hashlib.sha256()

    def field(data: bytes) -> None:
        h.update(struct.pack("<Q", len(data)))
        h.update(data)

    for name in sorted(by_name):
        tensor = by_name[name]
        field(name.encode())
        field(str(tensor.dtype).encode())
        field(",".join(map(str, tensor.shape)).encode())
        raw = _raw_bytes(tensor)
        h.update(struct.pack("<Q", raw.nbytes))
        h.update(raw)
    return h.hexdigest()


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
