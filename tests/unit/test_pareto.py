"""Unit tests for moalign.pareto (maximisation convention throughout)."""

from __future__ import annotations

import subprocess
import sys
from itertools import combinations
from math import comb, sqrt
from pathlib import Path

import numpy as np
import pytest

from moalign.pareto import (
    hypervolume,
    non_dominated_mask,
    pareto_front,
    simplex_lattice,
    steerability,
)


def _hv_inclusion_exclusion(points, reference):
    """Independent oracle: |union of boxes| via inclusion-exclusion.

    The intersection of boxes [ref, p_i] over a subset S is [ref, min_S p_i],
    so the union volume is sum_S (-1)^(|S|+1) prod_k (min_S p_ik - ref_k).
    Exponential in N, hence only for the tiny random sets below.
    """
    p = np.asarray(points, dtype=float)
    ref = np.asarray(reference, dtype=float)
    total = 0.0
    for size in range(1, p.shape[0] + 1):
        sign = 1.0 if size % 2 else -1.0
        for subset in combinations(range(p.shape[0]), size):
            total += sign * np.prod(p[list(subset)].min(axis=0) - ref)
    return total


# --------------------------------------------------------------------------- #
# Non-dominated filtering
# --------------------------------------------------------------------------- #
class TestParetoFront:
    def test_single_point_is_its_own_front(self):
        assert non_dominated_mask([[0.3, -1.0]]).tolist() == [True]
        np.testing.assert_array_equal(pareto_front([[0.3, -1.0]]), [[0.3, -1.0]])

    def test_chain_keeps_only_the_top(self):
        pts = [[1, 1], [3, 3], [2, 2]]
        assert non_dominated_mask(pts).tolist() == [False, True, False]
        np.testing.assert_array_equal(pareto_front(pts), [[3, 3]])

    def test_trade_off_points_all_survive(self):
        pts = [[1, 3], [2, 2], [3, 1], [1.5, 1.5]]
        assert non_dominated_mask(pts).tolist() == [True, True, True, False]

    def test_duplicates_of_front_point_are_all_kept(self):
        # Equal points never dominate each other, so both copies must remain,
        # while both copies of a dominated point go.
        pts = [[1, 2], [1, 2], [2, 1], [0, 0], [0, 0]]
        assert non_dominated_mask(pts).tolist() == [True, True, True, False, False]
        np.testing.assert_array_equal(pareto_front(pts), [[1, 2], [1, 2], [2, 1]])

    def test_tie_in_one_coordinate_still_dominates(self):
        # (1, 1) is equal in x and strictly worse in y: weak dominance suffices.
        assert non_dominated_mask([[1, 2], [1, 1]]).tolist() == [True, False]

    def test_three_objectives(self):
        pts = [[1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 0, 0.5], [1, 1, 0]]
        assert non_dominated_mask(pts).tolist() == [False, False, True, False, True]

    def test_front_preserves_input_order_and_dtype(self):
        pts = np.array([[3, 1], [0, 0], [1, 3]], dtype=np.int32)
        front = pareto_front(pts)
        assert front.dtype == np.float64
        np.testing.assert_array_equal(front, [[3, 1], [1, 3]])

    def test_empty_set_is_allowed(self):
        assert non_dominated_mask(np.zeros((0, 3))).shape == (0,)
        assert pareto_front(np.zeros((0, 3))).shape == (0, 3)

    def test_matches_brute_force_on_random_sets(self):
        rng = np.random.default_rng(0)
        # Integer grid values force many ties and duplicates.
        pts = rng.integers(0, 4, size=(60, 3)).astype(float)
        expected = [not any(np.all(q >= p) and np.any(q > p) for q in pts) for p in pts]
        assert non_dominated_mask(pts).tolist() == expected

    @pytest.mark.parametrize(
        "bad, match",
        [
            ([1.0, 2.0], "ndim"),
            ([[[1.0]]], "ndim"),
            (np.zeros((2, 0)), "objective column"),
            ([[1.0, np.nan]], "NaN"),
            ([[1.0, np.inf]], "NaN or infinite"),
            ([[1.0, 2.0], [3.0]], "converted"),
            ([["a", "b"]], "numeric"),
        ],
    )
    def test_bad_points_raise(self, bad, match):
        with pytest.raises(ValueError, match=match):
            non_dominated_mask(bad)
        with pytest.raises(ValueError, match="points"):
            pareto_front(bad)


# --------------------------------------------------------------------------- #
# Hypervolume
# --------------------------------------------------------------------------- #
class TestHypervolume:
    def test_2d_staircase(self):
        # Sweep x from the right: x in (2,3] height 1, (1,2] height 2,
        # (0,1] height 3  ->  1*1 + 1*2 + 1*3 = 6.
        assert hypervolume([[1, 3], [2, 2], [3, 1]], [0, 0]) == pytest.approx(6.0)

    def test_2d_staircase_ignores_dominated_and_duplicates(self):
        pts = [[1, 3], [2, 2], [2, 2], [3, 1], [1, 1], [0.5, 2.5]]
        assert hypervolume(pts, [0, 0]) == pytest.approx(6.0)

    def test_2d_nonzero_reference(self):
        # Relative to (-1, 0) the points are (2,3), (3,2), (4,1):
        # (3,4] h=1 -> 1, (2,3] h=2 -> 2, (0,2] h=3 -> 6; total 9.
        assert hypervolume([[1, 3], [2, 2], [3, 1]], [-1, 0]) == pytest.approx(9.0)

    def test_2d_uneven_staircase(self):
        # Relative to (0,0): (0.5,4), (2,1.5), (4,0.25):
        # (2,4] h=0.25 -> 0.5, (0.5,2] h=1.5 -> 2.25, (0,0.5] h=4 -> 2; total 4.75.
        pts = [[4, 0.25], [0.5, 4], [2, 1.5]]
        assert hypervolume(pts, [0, 0]) == pytest.approx(4.75)

    def test_1d_is_best_minus_reference(self):
        assert hypervolume([[2.0], [5.0], [3.0]], [1.0]) == pytest.approx(4.0)

    def test_unit_cube_corner(self):
        assert hypervolume([[1, 1, 1]], [0, 0, 0]) == pytest.approx(1.0)

    def test_two_3d_boxes_with_overlap(self):
        # 2x1x1 + 1x2x1 minus their 1x1x1 intersection = 3.
        assert hypervolume([[2, 1, 1], [1, 2, 1]], [0, 0, 0]) == pytest.approx(3.0)
        # 2x2x1 (=4) + 1x1x3 (=3) minus the 1x1x1 overlap = 6.
        assert hypervolume([[2, 2, 1], [1, 1, 3]], [0, 0, 0]) == pytest.approx(6.0)

    def test_three_3d_arms(self):
        # Three 2x1x1 arms: 3*2 - 3 pairwise unit overlaps + 1 triple overlap = 4.
        pts = [[2, 1, 1], [1, 2, 1], [1, 1, 2]]
        assert hypervolume(pts, [0, 0, 0]) == pytest.approx(4.0)

    def test_3d_shifted_reference(self):
        # Same arms translated by (-1, 2, 0.5) with the reference moved alike.
        shift = np.array([-1.0, 2.0, 0.5])
        pts = np.array([[2, 1, 1], [1, 2, 1], [1, 1, 2]]) + shift
        assert hypervolume(pts, shift) == pytest.approx(4.0)

    def test_4d_arms(self):
        # Four 2x1x1x1 arms: 4*2 - C(4,2) + C(4,3) - 1 = 5.
        pts = np.ones((4, 4)) + np.eye(4)
        assert hypervolume(pts, np.zeros(4)) == pytest.approx(5.0)

    def test_points_on_reference_boundary_add_nothing(self):
        assert hypervolume([[0, 5], [1, 1]], [0, 0]) == pytest.approx(1.0)
        assert hypervolume([[0, 0, 0]], [0, 0, 0]) == 0.0

    def test_empty_set_has_zero_volume(self):
        assert hypervolume(np.zeros((0, 3)), [0, 0, 0]) == 0.0

    def test_returns_python_float(self):
        assert type(hypervolume([[1, 1]], [0, 0])) is float

    @pytest.mark.parametrize("k, n", [(2, 9), (3, 9), (4, 8), (5, 7)])
    def test_random_sets_match_inclusion_exclusion(self, k, n):
        rng = np.random.default_rng(1000 + k)
        ref = rng.normal(size=k)
        pts = ref + rng.uniform(0.0, 1.0, size=(n, k))
        assert hypervolume(pts, ref) == pytest.approx(_hv_inclusion_exclusion(pts, ref), rel=1e-10, abs=1e-12)

    def test_random_4d_with_ties_matches_inclusion_exclusion(self):
        # Shared coordinate values exercise zero-depth slabs and duplicates.
        rng = np.random.default_rng(7)
        pts = rng.integers(1, 4, size=(9, 4)).astype(float)
        ref = np.zeros(4)
        assert hypervolume(pts, ref) == pytest.approx(_hv_inclusion_exclusion(pts, ref))

    def test_4d_path_agrees_with_3d_path_under_embedding(self):
        # A constant extra objective c over reference r turns every box into a
        # prism, so HV_4 = HV_3 * (c - r) exactly.
        rng = np.random.default_rng(3)
        pts3 = rng.uniform(0.0, 1.0, size=(12, 3))
        hv3 = hypervolume(pts3, np.zeros(3))
        pts4 = np.hstack([pts3, np.full((12, 1), 2.5)])
        assert hypervolume(pts4, [0, 0, 0, 0.5]) == pytest.approx(hv3 * 2.0, rel=1e-12)
        # Placing the constant axis first exercises a different slicing order.
        pts4_front = np.hstack([np.full((12, 1), 2.5), pts3])
        assert hypervolume(pts4_front, [0.5, 0, 0, 0]) == pytest.approx(hv3 * 2.0, rel=1e-12)

    def test_3d_path_agrees_with_2d_path_under_embedding(self):
        rng = np.random.default_rng(4)
        pts2 = rng.uniform(0.0, 1.0, size=(15, 2))
        hv2 = hypervolume(pts2, np.zeros(2))
        pts3 = np.hstack([pts2, np.full((15, 1), 3.0)])
        assert hypervolume(pts3, np.zeros(3)) == pytest.approx(hv2 * 3.0, rel=1e-12)

    def test_invariant_to_row_order(self):
        rng = np.random.default_rng(5)
        pts = rng.uniform(0.0, 1.0, size=(10, 4))
        expected = hypervolume(pts, np.zeros(4))
        assert hypervolume(pts[::-1], np.zeros(4)) == pytest.approx(expected, rel=1e-12)

    def test_point_below_reference_raises(self):
        with pytest.raises(ValueError, match=r"reference: .*row\(s\) 1"):
            hypervolume([[1, 1], [2, -0.1]], [0, 0])

    @pytest.mark.parametrize(
        "points, reference, match",
        [
            ([[1, 1]], [0, 0, 0], "reference: length 3"),
            ([[1, 1]], [[0, 0]], "reference: expected a 1-D"),
            ([[1, 1]], [0, np.nan], "reference: contains NaN"),
            ([[1, np.inf]], [0, 0], "points: contains NaN"),
            ([1, 1], [0, 0], "points: expected a 2-D"),
            (np.zeros((1, 0)), [], "points: needs at least one objective"),
        ],
    )
    def test_bad_inputs_raise(self, points, reference, match):
        with pytest.raises(ValueError, match=match):
            hypervolume(points, reference)


# --------------------------------------------------------------------------- #
# Steerability
# --------------------------------------------------------------------------- #
class TestSteerability:
    def test_perfectly_monotone_is_one(self):
        w = simplex_lattice(2, 4)
        # Any strictly increasing transform must give rho = 1; exp is nonlinear
        # so this also checks that ranks, not raw values, are correlated.
        r = np.exp(3.0 * w)
        out = steerability(w, r)
        assert out["per_objective"] == pytest.approx([1.0, 1.0])
        assert out["mean"] == pytest.approx(1.0)

    def test_reversed_is_minus_one(self):
        w = simplex_lattice(2, 4)
        out = steerability(w, -w)
        assert out["per_objective"] == pytest.approx([-1.0, -1.0])
        assert out["mean"] == pytest.approx(-1.0)

    def test_ties_in_rewards_use_average_ranks(self):
        # w0 ranks (1,2,3,4); rewards (1,1,2,3) rank (1.5,1.5,3,4).
        # Centred: dx=(-1.5,-.5,.5,1.5), dy=(-1,-1,.5,1.5); sum dx*dy = 4.5,
        # sum dx^2 = 5, sum dy^2 = 4.5  ->  rho = 4.5/sqrt(22.5) = sqrt(0.9).
        w0 = np.array([0.0, 1 / 3, 2 / 3, 1.0])
        w = np.column_stack([w0, 1.0 - w0])
        r = np.column_stack([[1.0, 1.0, 2.0, 3.0], [7.0, 7.0, 7.0, 7.0]])
        out = steerability(w, r)
        # Objective 1 has constant rewards: documented to count as 0.0.
        assert out["per_objective"] == pytest.approx([sqrt(0.9), 0.0])
        assert out["mean"] == pytest.approx(sqrt(0.9) / 2)

    def test_ties_in_weights_use_average_ranks(self):
        # w0 = (0,0,1) ranks (1.5,1.5,3); rewards (1,2,3) rank (1,2,3).
        # dx=(-.5,-.5,1), dy=(-1,0,1): 1.5 / sqrt(1.5 * 2) = sqrt(3)/2.
        # Objective 1 is the mirror image and gives the same value.
        w = [[0.0, 1.0], [0.0, 1.0], [1.0, 0.0]]
        r = [[1.0, 3.0], [2.0, 2.0], [3.0, 1.0]]
        out = steerability(w, r)
        assert out["per_objective"] == pytest.approx([sqrt(3) / 2, sqrt(3) / 2])
        assert out["mean"] == pytest.approx(sqrt(3) / 2)

    def test_constant_weight_column_is_zero(self):
        # Objective 2 is never steered, so its correlation is undefined -> 0.0.
        w = [[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.0, 1.0, 0.0]]
        r = [[3.0, 1.0, 5.0], [2.0, 2.0, 4.0], [1.0, 3.0, 6.0]]
        out = steerability(w, r)
        assert out["per_objective"] == pytest.approx([1.0, 1.0, 0.0])
        assert out["mean"] == pytest.approx(2 / 3)

    def test_three_objective_lattice_monotone(self):
        w = simplex_lattice(3, 4)
        out = steerability(w, 10.0 * w + 1.0)
        assert out["per_objective"] == pytest.approx([1.0, 1.0, 1.0])

    def test_result_is_json_friendly(self):
        out = steerability([[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [0.0, 1.0]])
        assert set(out) == {"per_objective", "mean"}
        assert all(type(v) is float for v in out["per_objective"])
        assert type(out["mean"]) is float

    def test_tiny_float_error_in_weights_is_accepted(self):
        w = [[0.1, 0.2, 0.7], [0.7, 0.2, 0.1]]
        w[0][2] = 1.0 - 0.1 - 0.2  # 0.7000000000000001, sum off by an ulp
        steerability(w, [[0, 0, 1], [1, 0, 0]])

    @pytest.mark.parametrize(
        "weights, rewards, match",
        [
            ([[1.0, 0.0]], [[1.0, 0.0]], "weights: need at least 2"),
            ([[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], "rewards: shape"),
            ([[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0]], "rewards: shape"),
            ([[1.5, -0.5], [0.0, 1.0]], [[1.0, 0.0], [0.0, 1.0]], "weights: .*non-negative"),
            ([[0.5, 0.4], [0.0, 1.0]], [[1.0, 0.0], [0.0, 1.0]], "weights: .*sum to 1.*row 0"),
            ([[np.nan, 1.0], [0.0, 1.0]], [[1.0, 0.0], [0.0, 1.0]], "weights: contains NaN"),
            ([[1.0, 0.0], [0.0, 1.0]], [[np.inf, 0.0], [0.0, 1.0]], "rewards: contains NaN"),
            ([1.0, 0.0], [1.0, 0.0], "weights: expected a 2-D"),
            (np.zeros((0, 2)), np.zeros((0, 2)), "weights: must contain at least one row"),
        ],
    )
    def test_bad_inputs_raise(self, weights, rewards, match):
        with pytest.raises(ValueError, match=match):
            steerability(weights, rewards)


# --------------------------------------------------------------------------- #
# Simplex lattice
# --------------------------------------------------------------------------- #
class TestSimplexLattice:
    @pytest.mark.parametrize("k, d", [(2, 1), (2, 4), (2, 10), (3, 2), (3, 6), (5, 3), (5, 4)])
    def test_count_values_and_sums(self, k, d):
        lat = simplex_lattice(k, d)
        assert lat.shape == (comb(d + k - 1, k - 1), k)
        np.testing.assert_allclose(lat.sum(axis=1), 1.0, atol=1e-12)
        numerators = lat * d
        np.testing.assert_allclose(numerators, np.round(numerators), atol=1e-9)
        assert lat.min() >= 0.0 and lat.max() <= 1.0
        # Every lattice point exactly once.
        assert np.unique(np.round(numerators), axis=0).shape[0] == lat.shape[0]

    def test_k2_explicit(self):
        np.testing.assert_array_equal(
            simplex_lattice(2, 4),
            [[0, 1], [0.25, 0.75], [0.5, 0.5], [0.75, 0.25], [1, 0]],
        )

    def test_k3_explicit_order(self):
        np.testing.assert_array_equal(
            simplex_lattice(3, 2),
            [[0, 0, 1], [0, 0.5, 0.5], [0, 1, 0], [0.5, 0, 0.5], [0.5, 0.5, 0], [1, 0, 0]],
        )

    def test_order_is_deterministic_and_lexicographic(self):
        lat = simplex_lattice(5, 3)
        np.testing.assert_array_equal(lat, simplex_lattice(5, 3))
        # np.lexsort sorts by the last key first, so reverse the columns.
        order = np.lexsort(lat.T[::-1])
        np.testing.assert_array_equal(order, np.arange(lat.shape[0]))

    def test_single_objective(self):
        np.testing.assert_array_equal(simplex_lattice(1, 5), [[1.0]])

    def test_numpy_integers_accepted(self):
        assert simplex_lattice(np.int64(3), np.int32(2)).shape == (6, 3)

    @pytest.mark.parametrize(
        "k, d, match",
        [
            (0, 3, "n_objectives: must be >= 1"),
            (-2, 3, "n_objectives: must be >= 1"),
            (3, 0, "divisions: must be >= 1"),
            (2.0, 3, "n_objectives: expected an integer"),
            (2, 1.5, "divisions: expected an integer"),
            (True, 3, "n_objectives: expected an integer"),
            (2, "4", "divisions: expected an integer"),
        ],
    )
    def test_bad_inputs_raise(self, k, d, match):
        with pytest.raises(ValueError, match=match):
            simplex_lattice(k, d)


def test_module_does_not_pull_in_ray_or_vllm():
    # The math package must stay importable on machines without the serving
    # stack; a fresh interpreter is needed because pytest plugins may import them.
    code = "import sys, moalign.pareto; bad = [m for m in ('ray', 'vllm') if m in sys.modules]; sys.exit(1 if bad else 0)"
    repo_root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=30, cwd=repo_root)
    assert proc.returncode == 0, proc.stderr.decode()
