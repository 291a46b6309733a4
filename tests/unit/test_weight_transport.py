import functools
import os
import pickle
import time

import pytest
import torch

from moalign.weight_transport import (
    BroadcastError,
    LazyBuckets,
    bucket_manifest,
    bucketize,
    flatten_bucket,
    free_port,
    manifest_nbytes,
    open_broadcast_group,
    tensor_nbytes,
    unflatten_bucket,
)
from tests.helpers.checksum import checksum

MIB = 1 << 20


def _t(n_floats: int, value: float = 0.0) -> torch.Tensor:
    return torch.full((n_floats,), value, dtype=torch.float32)


def test_empty_input_gives_no_buckets():
    assert bucketize([], 1.0) == []
    assert bucketize(iter(()), 1.0) == []


def test_order_preserved_and_buckets_bounded():
    # 0.25 MiB each: four fit in a 1 MiB bucket.
    named = [(f"w{i}", _t(MIB // 16)) for i in range(10)]
    buckets = bucketize(iter(named), 1.0)
    assert [n for b in buckets for n, _ in b] == [n for n, _ in named]
    assert [len(b) for b in buckets] == [4, 4, 2]
    for b in buckets:
        assert sum(tensor_nbytes(t) for _, t in b) <= MIB
    # The tensors are passed through, not copied.
    assert buckets[0][0][1] is named[0][1]


def test_oversized_tensor_travels_alone():
    small, big = _t(MIB // 16), _t(MIB)  # 0.25 MiB and 4 MiB
    buckets = bucketize([("a", small), ("big", big), ("b", small), ("c", small)], 1.0)
    assert [[n for n, _ in b] for b in buckets] == [["a"], ["big"], ["b", "c"]]


def test_exactly_full_bucket_is_closed():
    quarter = _t(MIB // 16)
    buckets = bucketize([(str(i), quarter) for i in range(8)], 1.0)
    assert [len(b) for b in buckets] == [4, 4]


@pytest.mark.parametrize("bad", [0, -1.0, float("nan")])
def test_bucket_size_must_be_positive(bad):
    with pytest.raises(ValueError, match="bucket_mb"):
        bucketize([("a", _t(4))], bad)


def test_checksum_is_order_independent_and_sensitive():
    a, b = _t(8, 1.0), torch.arange(6, dtype=torch.float32).reshape(2, 3)
    ref = checksum([("a", a), ("b", b)])
    assert ref == checksum([("b", b.clone()), ("a", a.clone())])
    assert len(ref) == 64
    changed = b.clone()
    changed[1, 2] += 1e-6
    assert checksum([("a", a), ("b", changed)]) != ref
    assert checksum([("a", a), ("c", b)]) != ref  # name
    assert checksum([("a", a), ("b", b.double())]) != ref  # dtype
    assert checksum([("a", a), ("b", b.reshape(3, 2))]) != ref  # shape, same bytes
    assert checksum([("a", a)]) != ref  # missing tensor


def test_checksum_handles_bf16_views_and_scalars():
    base = torch.arange(12, dtype=torch.bfloat16).reshape(3, 4)
    # A non-contiguous view hashes like its contiguous copy.
    assert checksum([("x", base.t())]) == checksum([("x", base.t().contiguous())])
    assert checksum([("s", torch.tensor(3.0))]) != checksum([("s", torch.tensor(4.0))])
    assert checksum([]) == checksum(iter(()))


def test_checksum_rejects_duplicate_names():
    with pytest.raises(ValueError, match="duplicate tensor name 'a'"):
        checksum([("a", _t(2)), ("a", _t(2))])


_STORE = {"k0": [("a", torch.ones(2))], "k1": [("b", torch.zeros(3))]}


def _fetch(key, store=_STORE):
    return store[key]


def test_lazy_buckets_fetch_on_demand_and_pickle():
    calls = []
    lazy = LazyBuckets(["k0", "k1"], lambda k: calls.append(k) or _STORE[k])
    it = iter(lazy)
    assert calls == [] and len(lazy) == 2
    assert next(it) == _STORE["k0"] and calls == ["k0"]
    assert [n for b in lazy for n, _ in b] == ["a", "b"]
    # What a remote actor receives: handles and a fetch function travel by pickle.
    clone = pickle.loads(pickle.dumps(LazyBuckets(["k1"], functools.partial(_fetch))))
    assert [n for b in clone for n, _ in b] == ["b"]


# ---------------------------------------------------------------------------- flat buckets


def _mixed() -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(5, 7, generator=g)
    return [
        ("f32", torch.randn(3, 4, generator=g)),
        ("bf16", torch.randn(9, generator=g).to(torch.bfloat16)),  # 18 bytes: the next offset must be realigned
        ("i64", torch.arange(5, dtype=torch.int64)),
        ("scalar", torch.tensor(2.5, dtype=torch.float64)),
        ("empty", torch.empty(0, 3)),
        ("f16", torch.randn(2, 3, generator=g).half()),
        ("transposed", base.t()),  # non-contiguous
        ("flag", torch.tensor([True, False, True])),
    ]


def test_flatten_round_trip_mixed_dtypes():
    named = _mixed()
    flat, manifest = flatten_bucket(named)
    assert flat.dtype == torch.uint8 and flat.dim() == 1
    assert manifest == bucket_manifest(named)
    assert flat.numel() == manifest_nbytes(manifest) >= sum(tensor_nbytes(t) for _, t in named)
    back = unflatten_bucket(flat, manifest)
    assert [n for n, _ in back] == [n for n, _ in named]
    for (_, want), (_, got) in zip(named, back):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert torch.equal(got, want)
    assert checksum(back) == checksum(named)
    # Views, not copies: the receiver's vLLM load reads straight out of the received buffer.
    assert back[0][1].untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()


def test_manifest_is_plain_and_picklable():
    _, manifest = flatten_bucket(_mixed())
    assert manifest[1][:3] == ("bf16", (9,), "bfloat16")
    assert all(entry[3] % 64 == 0 for entry in manifest)
    assert pickle.loads(pickle.dumps(manifest)) == manifest


def test_flatten_bucket_into_a_copy_receiver_side():
    # What a receiver does: allocate from the manifest alone, fill, unflatten.
    named = _mixed()
    flat, manifest = flatten_bucket(named)
    received = torch.empty(manifest_nbytes(manifest), dtype=torch.uint8)
    received.copy_(flat)
    del flat
    assert checksum(unflatten_bucket(received, manifest)) == checksum(named)


def test_unflatten_rejects_bad_buffers():
    flat, manifest = flatten_bucket(_mixed())
    with pytest.raises(ValueError, match="needs"):
        unflatten_bucket(flat[:-128], manifest)
    with pytest.raises(ValueError, match="uint8"):
        unflatten_bucket(flat.float(), manifest)
    with pytest.raises(ValueError, match="not a torch dtype"):
        unflatten_bucket(flat, [("x", (1,), "nonsense", 0, 1)])


def test_empty_bucket():
    flat, manifest = flatten_bucket([])
    assert flat.numel() == 0 and manifest == [] and unflatten_bucket(flat, manifest) == []


# ---------------------------------------------------------------------------- real gloo broadcasts


def _buckets() -> list[list[tuple[str, torch.Tensor]]]:
    named = _mixed() + [(f"w{i}", torch.full((MIB // 16,), float(i))) for i in range(6)]
    return bucketize(named, 0.5)


def _broadcast_worker(rank: int, world: int, port: int, manifests, results) -> None:
    group = open_broadcast_group("127.0.0.1", port, rank, world, "gloo", timeout_s=60)
    try:
        for round_ in range(2):  # a second round reuses the group
            got = []
            for i, manifest in enumerate(manifests):
                flat = torch.empty(manifest_nbytes(manifest), dtype=torch.uint8)
                group.broadcast(flat, root=0)
                got += unflatten_bucket(flat, manifest)
            results.put((rank, round_, checksum(got)))
    finally:
        group.close()


def test_gloo_broadcast_reaches_every_rank():
    import torch.multiprocessing as mp

    buckets = _buckets()
    assert len(buckets) > 2
    manifests = [bucket_manifest(b) for b in buckets]
    want = checksum(t for b in buckets for t in b)
    world, port = 3, free_port()
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_broadcast_worker, args=(r, world, port, manifests, results), daemon=True) for r in (1, 2)]
    for p in procs:
        p.start()
    # This test process is rank 0. Whether it holds a default process group depends on which
    # tests ran before in it (an in-process DeepSpeed learner opens one): the group must not change that.
    default_group_before = torch.distributed.is_initialized()
    group = open_broadcast_group("127.0.0.1", port, 0, world, "gloo", timeout_s=60)
    try:
        assert torch.distributed.is_initialized() == default_group_before
        for _ in range(2):
            for bucket in buckets:
                flat, _ = flatten_bucket(bucket)
                group.broadcast(flat, root=0)
        got = sorted(results.get(timeout=60) for _ in range(4))
    finally:
        group.close()
        for p in procs:
            p.join(timeout=30)
    assert got == [(1, 0, want), (1, 1, want), (2, 0, want), (2, 1, want)]
    assert all(p.exitcode == 0 for p in procs)
    assert torch.distributed.is_initialized() == default_group_before, "the default group must stay untouched"


def _join_and_die(port: int) -> None:
    open_broadcast_group("127.0.0.1", port, 1, 2, "gloo", timeout_s=30)
    os._exit(0)  # gone without closing anything, like a killed actor


def test_broadcast_to_a_dead_peer_raises_instead_of_hanging():
    import torch.multiprocessing as mp

    port = free_port()
    peer = mp.get_context("spawn").Process(target=_join_and_die, args=(port,), daemon=True)
    peer.start()
    group = open_broadcast_group("127.0.0.1", port, 0, 2, "gloo", timeout_s=10)
    peer.join(timeout=30)
    started = time.monotonic()
    try:
        with pytest.raises(BroadcastError, match="rank 0 of 2"):
            for _ in range(4):  # a send may still land in the socket buffer once
                group.broadcast(torch.ones(MIB), root=0)
        assert group.broken
        with pytest.raises(BroadcastError, match="broken"):
            group.broadcast(torch.ones(4))
    finally:
        group.close()
    assert time.monotonic() - started < 30


def test_missing_peer_times_out():
    started = time.monotonic()
    with pytest.raises(RuntimeError):
        open_broadcast_group("127.0.0.1", free_port(), 0, 2, "gloo", timeout_s=2)
    assert time.monotonic() - started < 20


def test_open_broadcast_group_validates_arguments():
    with pytest.raises(ValueError, match="backend"):
        open_broadcast_group("127.0.0.1", 1, 0, 1, "mpi")
    with pytest.raises(ValueError, match="rank 2"):
        open_broadcast_group("127.0.0.1", 1, 2, 2, "gloo")


def test_single_rank_group_broadcast_is_identity():
    group = open_broadcast_group("127.0.0.1", free_port(), 0, 1, "gloo", timeout_s=10)
    try:
        t = torch.arange(6.0)
        assert torch.equal(group.broadcast(t), torch.arange(6.0))
    finally:
        group.close()
    with pytest.raises(BroadcastError, match="closed"):
        group.broadcast(torch.ones(1))
