"""Retrieval metrics from ground-truth ranks: R@k, mAP@10, mean and median rank.

Each query has exactly one relevant audio, so every metric is a function of that audio's
1-based rank among all indexed audios. Rank 0 means the ground truth is not in the index.
"""

from __future__ import annotations

import numpy as np

from larcq_ray.core.errors import LarcqError

KS: tuple[int, ...] = (1, 5, 10)
MAP_K = 10


def _validated_ranks(gt_rank: np.ndarray, n_audios: int) -> np.ndarray:
    """The ranks as a 1-D int64 array, checked against the index size."""
    ranks = np.asarray(gt_rank)
    if ranks.ndim != 1:
        raise LarcqError(f"gt_rank must be one-dimensional, got shape {ranks.shape}")
    if ranks.size == 0:
        raise LarcqError("no queries to evaluate: gt_rank is empty")
    if n_audios < 1:
        raise LarcqError(f"n_audios must be at least 1, got {n_audios}")
    # Floats holding whole numbers are fine (pandas may hand them over); fractions are not.
    if not np.issubdtype(ranks.dtype, np.integer):
        if not np.issubdtype(ranks.dtype, np.floating) or not np.all(np.isfinite(ranks)) \
                or not np.all(ranks == np.round(ranks)):
            raise LarcqError("gt_rank must hold whole-number ranks")
    ranks = ranks.astype(np.int64)
    if ranks.min() < 0 or ranks.max() > n_audios:
        raise LarcqError(
            f"gt_rank values must lie in 0..{n_audios} (0 = ground truth not indexed), "
            f"got {int(ranks.min())}..{int(ranks.max())}"
        )
    return ranks


def _hits_at(ranks: np.ndarray, k: int) -> np.ndarray:
    # Rank 0 (missing ground truth) must never count as a hit, hence the lower bound.
    return (ranks >= 1) & (ranks <= k)


def retrieval_metrics(gt_rank: np.ndarray, n_audios: int) -> dict[str, float | int]:
    """R@1/5/10 and mAP@10 (percent), mean/median rank, query and missing counts.

    A missing ground truth (rank 0) counts as a miss for every R@k and for mAP@10, and as
    rank n_audios + 1 (one past the last place) for the mean and median rank.
    With one relevant item per query, AP@10 = 1/rank if rank <= 10 else 0.
    Values are plain Python numbers so the dict is JSON-serializable.
    """
    ranks = _validated_ranks(gt_rank, n_audios)
    out: dict[str, float | int] = {}
    for k in KS:
        out[f"R@{k}"] = round(float(_hits_at(ranks, k).mean() * 100.0), 2)
    in_top = _hits_at(ranks, MAP_K)
    ap = np.zeros(ranks.size, dtype=np.float64)
    ap[in_top] = 1.0 / ranks[in_top]
    out[f"mAP@{MAP_K}"] = round(float(ap.mean() * 100.0), 2)
    effective = np.where(ranks == 0, n_audios + 1, ranks)
    out["mean_rank"] = round(float(effective.mean()), 2)
    out["median_rank"] = float(np.median(effective))
    out["n_queries"] = int(ranks.size)
    out["n_missing_gt"] = int((ranks == 0).sum())
    return out


def recall_curve(gt_rank: np.ndarray, max_k: int) -> np.ndarray:
    """Percent recall at k = 1..max_k (index i holds R@(i+1)); missing ground truth is a miss."""
    if max_k < 1:
        raise LarcqError(f"max_k must be at least 1, got {max_k}")
    ranks = np.asarray(gt_rank)
    if ranks.ndim != 1 or ranks.size == 0:
        raise LarcqError("gt_rank must be a non-empty one-dimensional array")
    ranks = ranks.astype(np.int64)
    # Count hits per rank once, then cumulate: O(n + max_k) rather than one pass per k.
    found = ranks[(ranks >= 1) & (ranks <= max_k)]
    counts = np.bincount(found, minlength=max_k + 1)[1:]
    return np.cumsum(counts) / ranks.size * 100.0
