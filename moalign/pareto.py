"""Pareto-front utilities for multi-objective preference alignment.

Conventions used throughout this module:

* Every objective is **maximised**: a larger reward is better.
* A point ``a`` *dominates* ``b`` when ``a >= b`` in every coordinate and
  ``a > b`` in at least one. Equal points therefore never dominate each other.
* Point sets are 2-D arrays of shape ``(N, K)``: ``N`` points, ``K`` objectives.

Only numpy is used so that the math package stays importable without the
rollout / serving stack (Ray, vLLM).
"""

from __future__ import annotations

from itertools import combinations
from numbers import Integral
from typing import Any

import numpy as np

__all__ = [
    "non_dominated_mask",
    "pareto_front",
    "hypervolume",
    "steerability",
    "simplex_lattice",
]

# Tolerance for "weights lie on the simplex": configs often store weights as
# decimal literals, whose float sum is off from 1 by a few ulps.
_SIMPLEX_ATOL = 1e-6

# Upper bound on the number of elements of the boolean temporaries built by the
# pairwise dominance test, so memory stays bounded for large N.
_DOMINANCE_BLOCK_ELEMS = 1 << 22


# --------------------------------------------------------------------------- #
# Validation helpers
# --------------------------------------------------------------------------- #
def _as_float_array(value: Any, name: str) -> np.ndarray:
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError) as exc:  # ragged nested sequences
        raise ValueError(f"{name}: could not be converted to an array ({exc})") from exc
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"{name}: expected real numeric values, got dtype {arr.dtype}")
    arr = arr.astype(np.float64, copy=False)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name}: contains NaN or infinite values")
    return arr


def _as_points(value: Any, name: str, *, allow_empty: bool) -> np.ndarray:
    arr = _as_float_array(value, name)
    if arr.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D array of shape (N, K), got ndim={arr.ndim}")
    if arr.shape[1] == 0:
        raise ValueError(f"{name}: needs at least one objective column, got shape {arr.shape}")
    if not allow_empty and arr.shape[0] == 0:
        raise ValueError(f"{name}: must contain at least one row, got shape {arr.shape}")
    return arr


def _as_positive_int(value: Any, name: str) -> int:
    # bool is an Integral subclass but True/False as a size is almost surely a bug.
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise ValueError(f"{name}: expected an integer, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name}: must be >= 1, got {value}")
    return int(value)


# --------------------------------------------------------------------------- #
# Non-dominated filtering
# --------------------------------------------------------------------------- #
def _nd_mask(p: np.ndarray) -> np.ndarray:
    n, k = p.shape
    mask = np.ones(n, dtype=bool)
    if n <= 1:
        return mask
    block = max(1, _DOMINANCE_BLOCK_ELEMS // (n * k))
    for start in range(0, n, block):
        rows = p[start : start + block, None, :]  # (b, 1, K)
        others = p[None, :, :]  # (1, N, K)
        weakly_better = np.all(others >= rows, axis=2)
        strictly_better = np.any(others > rows, axis=2)
        mask[start : start + block] = ~np.any(weakly_better & strictly_better, axis=1)
    return mask


def non_dominated_mask(points: Any) -> np.ndarray:
    """Return a boolean mask selecting the non-dominated rows of ``points``.

    Args:
        points: array-like of shape ``(N, K)`` with finite values; ``N`` may be 0.

    Returns:
        Boolean array of shape ``(N,)``; ``True`` where no other row dominates
        the row (maximisation convention).

    Duplicates: identical rows do not dominate each other, so every copy of a
    non-dominated point is kept (all copies are ``True``), and every copy of a
    dominated point is ``False``.

    Raises:
        ValueError: if ``points`` is not a real 2-D array with at least one
            column, or contains NaN / inf.
    """
    p = _as_points(points, "points", allow_empty=True)
    return _nd_mask(p)


def pareto_front(points: Any) -> np.ndarray:
    """Return the non-dominated rows of ``points``, in their original order.

    Args:
        points: array-like of shape ``(N, K)`` with finite values; ``N`` may be 0.

    Returns:
        float64 array of shape ``(M, K)``, ``M <= N``. Duplicated
        non-dominated rows are all kept (see :func:`non_dominated_mask`).

    Raises:
        ValueError: same conditions as :func:`non_dominated_mask`.
    """
    p = _as_points(points, "points", allow_empty=True)
    return p[_nd_mask(p)]


# --------------------------------------------------------------------------- #
# Hypervolume
# --------------------------------------------------------------------------- #
# The private kernels below take extents relative to the reference point (so
# the reference is the origin), with every entry > 0.


def _prune(p: np.ndarray) -> np.ndarray:
    # Dominated and duplicate boxes add no volume; dropping them keeps the
    # recursive slicing small.
    p = p[_nd_mask(p)]
    if p.shape[0] > 1:
        p = np.unique(p, axis=0)
    return p


def _hv_2d(p: np.ndarray) -> float:
    # Sweep x from right to left; between consecutive x values the covered
    # height is the best y among boxes reaching at least that far right.
    order = np.argsort(-p[:, 0], kind="stable")
    x = p[order, 0]
    y_best = np.maximum.accumulate(p[order, 1])
    widths = x - np.append(x[1:], 0.0)
    return float(np.dot(widths, y_best))


def _hv_3d(p: np.ndarray) -> float:
    # Slice along z (descending): inside slab (z[i+1], z[i]] exactly the first
    # i+1 boxes are present, so the slab volume is depth * their 2-D area.
    order = np.argsort(-p[:, 2], kind="stable")
    p = p[order]
    z = np.append(p[:, 2], 0.0)
    total = 0.0
    for i in range(p.shape[0]):
        depth = z[i] - z[i + 1]
        if depth > 0.0:
            total += depth * _hv_2d(p[: i + 1, :2])
    return total


def _hv_hso(p: np.ndarray) -> float:
    # Hypervolume by Slicing Objectives: same slab decomposition as _hv_3d,
    # recursing on the last axis until the exact 3-D kernel applies. Cost grows
    # quickly with K and N, which is acceptable for the small sets it targets.
    k = p.shape[1]
    if k == 3:
        return _hv_3d(p)
    order = np.argsort(-p[:, -1], kind="stable")
    p = p[order]
    last = np.append(p[:, -1], 0.0)
    total = 0.0
    for i in range(p.shape[0]):
        depth = last[i] - last[i + 1]
        if depth > 0.0:
            total += depth * _hv_hso(_prune(p[: i + 1, :-1]))
    return total


def hypervolume(points: Any, reference: Any) -> float:
    """Exact hypervolume dominated by ``points`` with respect to ``reference``.

    The hypervolume is the Lebesgue measure of the union of the boxes
    ``[reference, p]`` over all rows ``p`` (maximisation convention).

    Algorithm, dispatched on the number of objectives ``K``:

    * ``K == 1``: ``max(p - reference)``.
    * ``K == 2``: exact O(N log N) sweep.
    * ``K == 3``: exact slicing: sort by the third axis and run the 2-D sweep
      per slab, O(N^2 log N).
    * ``K >= 4``: exact recursive slicing (HSO) down to the 3-D kernel. Its
      cost grows exponentially with ``K``; it is meant for small sets (tens
      of points), e.g. the handful of policies on a weight grid.

    Args:
        points: array-like of shape ``(N, K)``, finite. ``N`` may be 0, which
            gives 0.0. Dominated and duplicate rows are allowed and simply add
            nothing.
        reference: array-like of shape ``(K,)``, finite. Every row of
            ``points`` must weakly dominate it (``points >= reference``
            component-wise). Points worse than the reference are rejected
            rather than clipped, because clipping silently hides a badly
            chosen reference point.

    Returns:
        The hypervolume as a Python float (0.0 if every box is degenerate).

    Raises:
        ValueError: on non-finite values, wrong ndim/shape, a reference whose
            length differs from ``K``, or a point strictly below the reference
            in some coordinate.
    """
    p = _as_points(points, "points", allow_empty=True)
    ref = _as_float_array(reference, "reference")
    k = p.shape[1]
    if ref.ndim != 1:
        raise ValueError(f"reference: expected a 1-D array of shape ({k},), got ndim={ref.ndim}")
    if ref.shape[0] != k:
        raise ValueError(f"reference: length {ref.shape[0]} does not match the {k} objectives of points")
    extents = p - ref
    below = np.any(extents < 0.0, axis=1)
    if np.any(below):
        bad = np.flatnonzero(below)
        shown = ", ".join(str(i) for i in bad[:5]) + (", ..." if bad.size > 5 else "")
        raise ValueError(f"reference: must be weakly dominated by every point, but points row(s) {shown} are below it in some coordinate")
    # A box with zero extent in any coordinate has zero volume.
    extents = extents[np.all(extents > 0.0, axis=1)]
    if extents.shape[0] == 0:
        return 0.0
    if k == 1:
        return float(extents.max())
    if k == 2:
        # The sweep tolerates dominated rows, and O(N^2) pruning would dominate its cost.
        return _hv_2d(extents)
    extents = _prune(extents)
    if k == 3:
        return _hv_3d(extents)
    return _hv_hso(extents)


# --------------------------------------------------------------------------- #
# Steerability
# --------------------------------------------------------------------------- #
def _average_ranks(x: np.ndarray) -> tuple[np.ndarray, int]:
    """1-based ranks with ties given their mean rank, plus the number of distinct values."""
    n = x.shape[0]
    order = np.argsort(x, kind="stable")
    xs = x[order]
    boundaries = np.flatnonzero(xs[1:] != xs[:-1]) + 1
    starts = np.concatenate(([0], boundaries))
    ends = np.concatenate((boundaries, [n]))
    # Positions start..end-1 (0-based) share rank mean(start+1 .. end).
    group_rank = (starts + ends + 1) / 2.0
    ranks = np.empty(n, dtype=np.float64)
    ranks[order] = np.repeat(group_rank, ends - starts)
    return ranks, starts.shape[0]


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    rx, nx = _average_ranks(x)
    ry, ny = _average_ranks(y)
    if nx < 2 or ny < 2:
        return 0.0
    dx = rx - rx.mean()
    dy = ry - ry.mean()
    rho = float(np.dot(dx, dy) / np.sqrt(np.dot(dx, dx) * np.dot(dy, dy)))
    # Rounding can push |rho| a hair above 1 for perfectly monotone data.
    return min(1.0, max(-1.0, rho))


def steerability(weights: Any, rewards: Any) -> dict[str, Any]:
    """How faithfully each objective's realised reward follows its weight.

    For every objective ``k`` this is the Spearman rank correlation between
    ``weights[:, k]`` and ``rewards[:, k]`` across the ``M`` weight settings:
    +1.0 means raising the weight of ``k`` never lowers reward ``k``, -1.0
    means the opposite. Spearman is computed as the Pearson correlation of
    average ranks, so tied values share the mean of the ranks they span.

    Constant columns: if either ``weights[:, k]`` or ``rewards[:, k]`` is
    constant the correlation is undefined; it is reported as 0.0 ("no
    measurable steering") so that the mean stays finite.

    Args:
        weights: array-like of shape ``(M, K)``, ``M >= 2``; every row must be
            on the probability simplex (entries >= 0, row sum 1, both within
            an absolute tolerance of 1e-6).
        rewards: array-like of shape ``(M, K)``, finite; row ``i`` holds the
            mean reward per objective realised when steering with
            ``weights[i]``.

    Returns:
        ``{"per_objective": list[float] of length K, "mean": float}``; plain
        Python floats so the result can be logged as JSON directly.

    Raises:
        ValueError: on non-finite values, wrong ndim, fewer than two rows,
            mismatched shapes, negative weights, or weight rows not summing to 1.
    """
    w = _as_points(weights, "weights", allow_empty=False)
    r = _as_points(rewards, "rewards", allow_empty=False)
    if w.shape[0] < 2:
        raise ValueError(f"weights: need at least 2 weight settings (rows) to rank, got {w.shape[0]}")
    if r.shape != w.shape:
        raise ValueError(f"rewards: shape {r.shape} does not match weights shape {w.shape}")
    if np.any(w < -_SIMPLEX_ATOL):
        raise ValueError("weights: entries must be non-negative")
    row_sums = w.sum(axis=1)
    off = np.flatnonzero(np.abs(row_sums - 1.0) > _SIMPLEX_ATOL)
    if off.size:
        raise ValueError(f"weights: every row must sum to 1, row {off[0]} sums to {row_sums[off[0]]!r}")
    per_objective = [_spearman(w[:, k], r[:, k]) for k in range(w.shape[1])]
    return {"per_objective": per_objective, "mean": float(np.mean(per_objective))}


# --------------------------------------------------------------------------- #
# Weight grids
# --------------------------------------------------------------------------- #
def simplex_lattice(n_objectives: int, divisions: int) -> np.ndarray:
    """The ``{K, d}`` simplex-lattice design of weight vectors.

    All vectors ``w`` of length ``K = n_objectives`` with every entry in
    ``{0, 1/d, 2/d, ..., 1}`` (``d = divisions``) and ``sum(w) == 1``.

    Order: rows are sorted lexicographically ascending by their integer
    numerators, e.g. ``simplex_lattice(2, 2)`` is
    ``[[0, 1], [0.5, 0.5], [1, 0]]``. The order is deterministic so a row
    index can serve as a stable policy / run id.

    Args:
        n_objectives: ``K >= 1``.
        divisions: ``d >= 1``.

    Returns:
        float64 array of shape ``(C(d + K - 1, K - 1), K)``. Entries are
        ``numerator / d``; row sums equal 1 up to float rounding (~1e-15).

    Raises:
        ValueError: if either argument is not an integer >= 1.
    """
    k = _as_positive_int(n_objectives, "n_objectives")
    d = _as_positive_int(divisions, "divisions")
    # Stars and bars: place K-1 bars among d+K-1 slots; the gaps between bars
    # are the numerators. combinations() yields bar positions in lexicographic
    # order, which makes the numerators lexicographically ascending.
    slots = d + k - 1
    bar_sets = list(combinations(range(slots), k - 1))
    n_rows = len(bar_sets)
    # Explicit shape because K == 1 gives a single empty combination.
    bars = np.array(bar_sets, dtype=np.int64).reshape(n_rows, k - 1)
    left = np.full((n_rows, 1), -1, dtype=np.int64)
    right = np.full((n_rows, 1), slots, dtype=np.int64)
    edges = np.hstack((left, bars, right))
    numerators = np.diff(edges, axis=1) - 1
    return numerators / d
