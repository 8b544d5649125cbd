"""Class prototypes on the unit hypersphere, placed as far apart as possible.

Layout: prototypes are class-major. With C classes and k prototypes per class there are C*k
prototypes and prototype j belongs to class j // k (`group_ids(C, k)`). A total count
(`model.prototype_count`, the seed project's `num_prototypes`) maps to classes by one of two
rules (`prototype_classes`): `per_class` splits it evenly, the first `count % C` classes taking
one more; `extra_negatives` (the seed's) gives prototype c to class c and leaves the rest to no
class, as extra negatives in the softmax. A class scores its best prototype.

`fixed_prototypes` places them before training (the paper's fixed prototypes). The optimum is
known in closed form while count <= 2*dim: a regular simplex (count <= dim + 1) and then a
subset of the cross-polytope +-e_i (90 degrees, Rankin's bound); in 2 dims it is the regular
polygon. Beyond that it optimises:
a smooth max (per-prototype log-sum-exp with annealed sharpness) from a few random restarts,
then a penalty polish that pushes every pair above a rising angle threshold. This ends
degrees above the paper's subgradient method (e.g. 100 prototypes in 10 dims: ~70.2 vs ~67.6).
`separation_loss` is the differentiable term for learned prototypes trained with the head.
`regression_prototypes` places the two opposite ends of a regression output (p and -p).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from hpn import cache_files
from hpn.errors import ConfigError

__all__ = ["NO_CLASS", "fixed_prototypes", "group_ids", "prototype_classes",
           "regression_prototypes", "separation", "separation_loss"]

#: The class id of an extra-negative prototype (it belongs to no class).
NO_CLASS = -1


def group_ids(num_classes: int, per_class: int) -> np.ndarray:
    """Class id of each of num_classes*per_class prototypes: prototype j is class j // per_class."""
    if num_classes < 1 or per_class < 1:
        raise ConfigError(
            f"num_classes ({num_classes}) and model.prototypes_per_class ({per_class}) must be >= 1"
        )
    return np.repeat(np.arange(num_classes, dtype=np.int64), per_class)


def prototype_classes(
    num_classes: int, per_class: int = 1, count: int = 0, assignment: str = "per_class"
) -> np.ndarray:
    """(count,) class id of each prototype, NO_CLASS for an extra negative.

    `count` 0 means `num_classes x per_class`. With a total count, `per_class` gives every
    class `count // C` prototypes and the first `count % C` classes one more (so the total is
    the one asked for: the seed grid's 50 over 14 classes is 4 x 8 + 3 x 6); `extra_negatives`
    gives prototype c to class c (c < C) and no class to the rest.
    """
    if count <= 0:  # (config validation refuses extra_negatives without a count)
        return group_ids(num_classes, per_class)
    if count < num_classes:
        raise ConfigError(
            f"model.prototype_count={count} is below the corpus's {num_classes} classes; every "
            f"class needs a prototype, so use >= {num_classes}"
        )
    if assignment == "extra_negatives":
        rest = np.full(count - num_classes, NO_CLASS, dtype=np.int64)
        return np.concatenate([np.arange(num_classes, dtype=np.int64), rest])
    sizes = np.full(num_classes, count // num_classes)
    sizes[: count % num_classes] += 1
    return np.repeat(np.arange(num_classes, dtype=np.int64), sizes)


def separation(
    prototypes: np.ndarray | torch.Tensor, groups: np.ndarray | None = None
) -> dict[str, float]:
    """Smallest angle and largest cosine over pairs (only different-class pairs when groups given)."""
    if isinstance(prototypes, torch.Tensor):
        prototypes = prototypes.detach().cpu().double().numpy()
    u = np.asarray(prototypes, dtype=np.float64)
    u = u / np.linalg.norm(u, axis=1, keepdims=True)
    pairs = np.triu(np.ones((len(u), len(u)), dtype=bool), k=1)
    if groups is not None:
        groups = np.asarray(groups)
        pairs &= groups[:, None] != groups[None, :]
    if not pairs.any():
        return {"min_angle_deg": 180.0, "max_cosine": -1.0}
    max_cos = float(np.clip((u @ u.T)[pairs].max(), -1.0, 1.0))
    return {"min_angle_deg": math.degrees(math.acos(max_cos)), "max_cosine": max_cos}


def separation_loss(prototypes: torch.Tensor, groups: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over prototypes of the cosine to its nearest other (different-class) prototype.

    The paper's separation loss; minimising it pushes each prototype away from its nearest rival.
    """
    # Cosines near 1 lose too much precision in bf16/fp16, so leave autocast and use fp32.
    with torch.autocast(device_type=prototypes.device.type, enabled=False):
        u = F.normalize(prototypes.float(), dim=-1)
        cos = u @ u.T  # (count, count)
        rival = ~torch.eye(len(u), dtype=torch.bool, device=u.device)
        if groups is not None:
            g = torch.as_tensor(groups, device=u.device)
            rival &= g[:, None] != g[None, :]
        has_rival = rival.any(dim=1)
        if not has_rival.any():
            return prototypes.float().sum() * 0.0  # keeps the graph for a 1-class model
        # -2 is below any cosine, so masked entries never win the max and get no gradient.
        nearest = cos.masked_fill(~rival, -2.0).amax(dim=1)
        return nearest[has_rival].mean()


def fixed_prototypes(
    count: int, dim: int, seed: int = 0, cache_dir: str | Path | None = None
) -> np.ndarray:
    """(count, dim) float32 unit vectors placed to minimise the largest pairwise cosine.

    With a cache_dir the result is cached per (count, dim, seed) in a file that checks itself
    (hpn/cache_files.py); beyond the checksum, the rows must be unit vectors no worse
    separated than when written, so a file of ones or zeros is rebuilt, not trained on.
    """
    if dim < 2:
        raise ConfigError(f"model.prototype_dim must be >= 2, got {dim}")
    if count < 1:
        raise ConfigError(f"prototype count must be >= 1, got count={count}")
    path = None
    if cache_dir is not None:
        name = f"count{count}_dim{dim}_seed{seed}{cache_files.SUFFIX}"
        path = Path(cache_dir) / "prototypes" / name
        cached = cache_files.load(path, (count, dim), fields={"seed": seed}, check=_check_cached)
        if cached is not None:
            return cached
    rng = np.random.default_rng(seed)
    if count <= 2 * dim or dim == 2:
        # Closed-form optimum; the random rotation keeps seeds distinct without changing angles.
        if count <= dim + 1:
            points = _simplex(count, dim)
        elif count <= 2 * dim:
            points = _cross_polytope(count, dim)
        else:  # on a circle points cannot pass each other, so descent can jam; use the polygon
            angles = 2.0 * np.pi * np.arange(count) / count
            points = np.stack([np.cos(angles), np.sin(angles)], axis=1)
        points = points @ _random_rotation(dim, rng)
    else:
        points = _optimise(count, dim, seed)
    points = (points / np.linalg.norm(points, axis=1, keepdims=True)).astype(np.float32)
    if path is not None:
        cache_files.save(path, points, seed=seed, max_cosine=separation(points)["max_cosine"])
    return points


def regression_prototypes(dim: int, seed: int = 0) -> np.ndarray:
    """(2, dim) float32: a unit vector p and its opposite -p, the regression output's two ends.

    The paper ties a regression target to two opposite prototypes: the upper end of the target
    range sits at p, the lower at -p, so a cosine to p in [-1, 1] reads as a position in the
    range. Any direction is optimal (they are 180 degrees apart); the seed only picks it.
    """
    if dim < 2:
        raise ConfigError(f"model.prototype_dim must be >= 2, got {dim}")
    p = np.random.default_rng(seed).standard_normal(dim)
    p = p / np.linalg.norm(p)
    return np.stack([p, -p]).astype(np.float32)


def _check_cached(points: np.ndarray, header: dict[str, Any]) -> str | None:
    """Why cached prototypes are unusable (not unit vectors, or worse separated than recorded)."""
    norms = np.linalg.norm(points.astype(np.float64), axis=1)
    if np.abs(norms - 1.0).max() > 1e-4:
        return f"rows are not unit vectors (norms {norms.min():.3g} to {norms.max():.3g})"
    recorded = header.get("max_cosine")
    if not isinstance(recorded, (int, float)):
        return "header records no max_cosine"
    worst = separation(points)["max_cosine"]
    if worst > recorded + 1e-6:
        return f"max pairwise cosine {worst:.4f} is worse than the recorded {recorded:.4f}"
    return None


def _simplex(count: int, dim: int) -> np.ndarray:
    if count == 1:
        return np.eye(1, dim)
    # Centred basis vectors of R^count form a regular simplex in a (count-1)-dim subspace;
    # express them in an orthonormal basis of that subspace and pad to dim.
    centred = np.eye(count) - 1.0 / count
    basis = np.linalg.svd(centred)[2][: count - 1].T  # (count, count-1)
    points = np.zeros((count, dim))
    points[:, : count - 1] = centred @ basis
    return points


def _cross_polytope(count: int, dim: int) -> np.ndarray:
    # All of +e_i, then -e_i for the first count-dim axes: every pair is orthogonal or antipodal.
    return np.concatenate([np.eye(dim), -np.eye(dim)[: count - dim]])


def _random_rotation(dim: int, rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((dim, dim)))
    return q * np.sign(np.diag(r))  # sign fix makes q uniformly (Haar) distributed


def _optimise(count: int, dim: int, seed: int, steps: int = 1500, rounds: int = 10) -> np.ndarray:
    threads = torch.get_num_threads()
    # Small matrices run faster on one thread (no sync); big ones keep the user's setting.
    torch.set_num_threads(1 if count <= 256 else threads)
    try:
        # A private generator leaves the global torch RNG (training's seed) untouched.
        gen = torch.Generator().manual_seed(seed)
        # Restarts pick the best of several local optima; cap the cost at about 1 s (2 CPUs).
        restarts = min(4, max(1, 1_000_000 // (count * count * dim)))
        u = torch.randn(restarts, count, dim, generator=gen, dtype=torch.float64)
        u = _smooth_max_descent(F.normalize(u, dim=-1), steps)
        best, best_cos = u, _max_cosine(u)
        # Polish: minimise the squared excess of every cosine over a target just below the
        # current worst pair; accept only true improvements and tighten the target.
        margin = 0.01
        for _ in range(rounds):
            u = _penalty_descent(best, (best_cos - margin)[:, None, None])
            cos = _max_cosine(u)
            better = cos < best_cos
            best[better], best_cos = u[better], torch.minimum(best_cos, cos)
            margin *= 0.6
        return best[best_cos.argmin()].numpy()
    finally:
        torch.set_num_threads(threads)


def _max_cosine(u: torch.Tensor) -> torch.Tensor:
    """(restarts, count, dim) -> (restarts,) largest cosine between distinct points."""
    cos = u @ u.transpose(1, 2) - 4.0 * torch.eye(u.shape[1], dtype=u.dtype)
    return cos.flatten(1).amax(dim=1)


def _tangent_step(
    u: torch.Tensor, grad: torch.Tensor, velocity: torch.Tensor, lr: float
) -> torch.Tensor:
    """Momentum step along the sphere, then back onto it."""
    grad = grad - (grad * u).sum(-1, keepdim=True) * u  # radial part only changes the norm
    velocity.mul_(0.9).add_(grad)
    return F.normalize(u - lr * velocity, dim=-1)


def _smooth_max_descent(u: torch.Tensor, steps: int, lr: float = 0.1) -> torch.Tensor:
    """Minimise sum_i LSE_t(cos(u_i, u_j)) / t: each point flees its nearest neighbours.

    Low sharpness t at first spreads the points like an energy; high t at the end targets the
    worst pairs. Gradients are written out by hand (no autograd): it is 3x faster here.
    """
    eye = 4.0 * torch.eye(u.shape[1], dtype=u.dtype)  # keeps a point out of its own softmax
    velocity = torch.zeros_like(u)
    for step in range(steps):
        frac = step / steps
        sharpness = 10.0 * 100.0**frac  # 10 -> 1000
        step_lr = lr * (0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * frac)))
        w = torch.softmax(sharpness * (u @ u.transpose(1, 2) - eye), dim=2)  # (r, count, count)
        u = _tangent_step(u, (w + w.transpose(1, 2)) @ u, velocity, step_lr)
    return u


def _penalty_descent(
    u: torch.Tensor, target: torch.Tensor, steps: int = 100, lr: float = 0.1
) -> torch.Tensor:
    """Minimise sum_ij relu(cos_ij - target)^2: all pairs above the target move at once."""
    eye = 4.0 * torch.eye(u.shape[1], dtype=u.dtype)
    velocity = torch.zeros_like(u)
    for _ in range(steps):
        excess = torch.relu(u @ u.transpose(1, 2) - eye - target)
        u = _tangent_step(u, 2.0 * excess @ u, velocity, lr)
    return u
