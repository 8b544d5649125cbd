"""Prototype placement is judged by the angles of the returned vectors, never by a loss value."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch

from hpn import cache_files, prototypes
from hpn.errors import ConfigError
from hpn.prototypes import fixed_prototypes, group_ids, separation, separation_loss


def pairwise_angles_deg(points: np.ndarray) -> np.ndarray:
    """Every pairwise angle, computed independently of `separation`."""
    u = points.astype(np.float64)
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    i, j = np.triu_indices(len(u), k=1)
    return np.degrees(np.arccos(np.clip(np.sum(u[i] * u[j], axis=1), -1.0, 1.0)))


def min_angle(points: np.ndarray) -> float:
    return float(pairwise_angles_deg(points).min())


@pytest.mark.parametrize("count,dim", [(1, 8), (5, 4), (100, 10)])
def test_fixed_prototypes_are_unit_float32_rows_of_the_requested_shape(
    count: int, dim: int
) -> None:
    p = fixed_prototypes(count, dim)
    assert p.shape == (count, dim) and p.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(p, axis=1), 1.0, atol=1e-6)


@pytest.mark.parametrize("count,dim", [(2, 2), (3, 2), (4, 3), (5, 4), (11, 10), (9, 64), (65, 64)])
def test_fixed_prototypes_form_a_regular_simplex_up_to_dim_plus_one(count: int, dim: int) -> None:
    p = fixed_prototypes(count, dim, seed=3)
    angles = pairwise_angles_deg(p)
    expected = math.degrees(math.acos(-1.0 / (count - 1)))
    assert np.cos(np.radians(angles)).max() == pytest.approx(-1.0 / (count - 1), abs=1e-5)
    assert angles.max() - angles.min() < 1e-2  # all pairs equal: regular, not merely good
    assert separation(p)["min_angle_deg"] == pytest.approx(expected, abs=1e-3)


@pytest.mark.parametrize(
    "count,dim", [(4, 2), (5, 3), (12, 10), (20, 10), (50, 25), (100, 64), (128, 64)]
)
def test_fixed_prototypes_are_orthogonal_between_dim_plus_two_and_twice_dim(
    count: int, dim: int
) -> None:
    p = fixed_prototypes(count, dim, seed=1)
    assert separation(p)["max_cosine"] <= 1e-3
    assert min_angle(p) >= 89.9


def test_fixed_prototypes_in_two_dims_form_the_regular_polygon() -> None:
    assert min_angle(fixed_prototypes(7, 2)) == pytest.approx(360.0 / 7, abs=1e-3)


def test_twelve_prototypes_in_three_dims_form_the_icosahedron() -> None:
    # The icosahedron's nearest neighbours are arctan(2) = 63.435 degrees apart (Tammes, N=12).
    assert min_angle(fixed_prototypes(12, 3)) == pytest.approx(
        math.degrees(math.atan(2.0)), abs=0.5
    )


@pytest.mark.parametrize("dim,least_angle", [(10, 70.0), (25, 83.5)])
def test_hundred_prototypes_beat_the_papers_optimiser_quickly(dim: int, least_angle: float) -> None:
    # The paper's subgradient method reaches about 67.6 (10 dims) and 82.0 (25 dims) degrees.
    start = time.perf_counter()
    p = fixed_prototypes(100, dim)
    elapsed = time.perf_counter() - start
    assert min_angle(p) >= least_angle
    assert elapsed < 20.0  # typically about 1 s; the bound only catches a runaway loop


@pytest.mark.parametrize("count,dim", [(12, 3), (30, 3), (40, 8)])
def test_no_two_prototypes_are_closer_than_the_reported_separation(count: int, dim: int) -> None:
    p = fixed_prototypes(count, dim)
    reported = separation(p)
    angles = pairwise_angles_deg(p)
    assert angles.min() > 1.0  # no duplicates
    assert angles.min() == pytest.approx(reported["min_angle_deg"], abs=1e-4)
    assert math.cos(math.radians(reported["min_angle_deg"])) == pytest.approx(
        reported["max_cosine"], abs=1e-6
    )


def test_the_same_seed_gives_the_same_prototypes_and_another_seed_does_not() -> None:
    for count, dim in [(6, 4), (30, 4)]:
        a, b = fixed_prototypes(count, dim, seed=7), fixed_prototypes(count, dim, seed=7)
        np.testing.assert_array_equal(a, b)
        assert not np.allclose(a, fixed_prototypes(count, dim, seed=8))


def test_the_cache_file_is_written_and_reused(tmp_path, monkeypatch) -> None:
    p = fixed_prototypes(20, 6, seed=2, cache_dir=tmp_path)
    path = tmp_path / "prototypes" / "count20_dim6_seed2.npyh"
    np.testing.assert_array_equal(cache_files.load(path, (20, 6)), p)

    def refuse(*args, **kwargs):
        raise AssertionError("recomputed although the prototypes are cached")

    monkeypatch.setattr(prototypes, "_optimise", refuse)  # a later call must read the file
    np.testing.assert_array_equal(fixed_prototypes(20, 6, seed=2, cache_dir=str(tmp_path)), p)
    assert list((tmp_path / "prototypes").iterdir()) == [path]  # no temporary files left behind


def test_bad_sizes_raise_config_errors_that_name_the_key() -> None:
    with pytest.raises(ConfigError, match="model.prototype_dim"):
        fixed_prototypes(10, 1)
    with pytest.raises(ConfigError, match="count"):
        fixed_prototypes(0, 8)
    with pytest.raises(ConfigError):
        group_ids(0, 2)


def test_group_ids_are_class_major() -> None:
    ids = group_ids(3, 2)
    np.testing.assert_array_equal(ids, [0, 0, 1, 1, 2, 2])
    # The model's reshape (C*k,) -> (C, k) must put each class's prototypes on its own row.
    np.testing.assert_array_equal(ids.reshape(3, 2), [[0, 0], [1, 1], [2, 2]])


def test_separation_with_groups_only_counts_pairs_from_different_classes() -> None:
    p = np.array([[1.0, 0.0], [0.99, 0.141], [0.0, 1.0], [-1.0, 0.0]])
    assert separation(p)["min_angle_deg"] < 10.0  # the near pair counts without groups
    between = separation(p, groups=np.array([0, 0, 1, 2]))
    assert between["min_angle_deg"] == pytest.approx(min_angle(p[[1, 2]]), abs=1e-6)


def test_separation_with_fewer_than_two_prototypes_or_classes_is_the_empty_default() -> None:
    empty = {"min_angle_deg": 180.0, "max_cosine": -1.0}
    assert separation(np.ones((1, 4))) == empty
    assert separation(np.random.default_rng(0).normal(size=(5, 4)), groups=np.zeros(5)) == empty


def test_separation_accepts_tensors_with_gradients() -> None:
    p = torch.tensor(fixed_prototypes(5, 4), requires_grad=True)
    assert separation(p)["max_cosine"] == pytest.approx(-0.25, abs=1e-5)


def test_separation_loss_is_the_mean_nearest_cosine_of_unnormalised_prototypes() -> None:
    p = torch.tensor([[2.0, 0.0], [0.0, 3.0], [-5.0, 0.0]])
    # Nearest rival of each: 90, 90 and 90 degrees -> cosine 0 for all three.
    assert separation_loss(p).item() == pytest.approx(0.0, abs=1e-6)
    p = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    c = 1 / math.sqrt(2)
    assert separation_loss(p).item() == pytest.approx(c, abs=1e-6)
    # Same-class pairs are ignored: prototypes 0 and 1 share a class.
    groups = torch.tensor([0, 0, 1])
    assert separation_loss(p, groups).item() == pytest.approx((0.0 + c + c) / 3, abs=1e-6)


def test_separation_loss_of_a_single_class_is_zero_and_still_differentiable() -> None:
    p = torch.randn(3, 4, requires_grad=True)
    loss = separation_loss(p, torch.zeros(3, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0.0 and p.grad is not None


def test_training_learned_prototypes_on_separation_loss_widens_their_angle() -> None:
    torch.manual_seed(0)
    p = torch.randn(20, 8, requires_grad=True)
    before = separation(p)["min_angle_deg"]
    opt = torch.optim.SGD([p], lr=0.1)
    for _ in range(100):
        opt.zero_grad()
        separation_loss(p).backward()
        opt.step()
    assert separation(p)["min_angle_deg"] > before + 10.0  # about 41 -> 55 degrees


def test_separation_loss_runs_in_float32_under_autocast() -> None:
    p = torch.randn(10, 8, requires_grad=True)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        loss = separation_loss(p, torch.as_tensor(group_ids(5, 2)))
    assert loss.dtype == torch.float32
    loss.backward()
    assert torch.isfinite(p.grad).all()
