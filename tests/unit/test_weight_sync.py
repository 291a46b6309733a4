import functools
import pickle

import pytest
import torch

from moalign.weight_sync import LazyBuckets, bucketize, checksum, tensor_nbytes

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
