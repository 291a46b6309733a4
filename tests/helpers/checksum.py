"""A fingerprint of named tensors, to check that two ends of a weight transfer hold the same weights."""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable

import torch


def _raw_bytes(tensor: torch.Tensor) -> memoryview:
    # Viewing as uint8 works for every dtype (bf16 and fp8 have no numpy equivalent).
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def checksum(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
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
