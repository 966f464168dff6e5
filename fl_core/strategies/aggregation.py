"""Aggregation helpers shared by the strategies (pure numpy, float64 accumulation).

Conventions (../shared/ALGORITHMS.md):

* client weights are ``n_k / Σ n``; when every client reports 0 samples they count equally;
* batch-norm ``weight``/``bias`` aggregate like every other parameter (the strategy's rule);
  ``running_mean``/``running_var`` always by the sample-weighted mean; ``num_batches_tracked``
  is never aggregated: the server keeps its own counter (``is_server_owned``);
* results are float32 (the wire and the trainer's dtype).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

RUNNING_SUFFIXES = (".running_mean", ".running_var")
SERVER_OWNED_SUFFIXES = (".num_batches_tracked",)


def is_running_stat(name: str) -> bool:
    """Batch-norm running mean / variance (always the sample-weighted mean)."""
    return name.endswith(RUNNING_SUFFIXES)


def is_server_owned(name: str) -> bool:
    """Tensors the server keeps as they are (``num_batches_tracked``)."""
    return name.endswith(SERVER_OWNED_SUFFIXES)


def sample_weights(num_samples: Sequence[int]) -> np.ndarray:
    """``n_k / Σ n`` as float64; equal weights when the total is 0. Empty input -> empty."""
    n = np.asarray(num_samples, dtype=np.float64)
    if n.size == 0:
        return n
    if (n < 0).any():
        raise ValueError(f"sample counts must be >= 0, got {n.tolist()}")
    tot = n.sum()
    return n / tot if tot > 0 else np.full(n.size, 1.0 / n.size)


def uniform_weights(k: int) -> np.ndarray:
    """``1/K`` each (FLASH's unweighted mean)."""
    return np.full(k, 1.0 / k) if k else np.zeros(0)


def weighted_mean(arrays: Sequence[np.ndarray], weights: np.ndarray) -> np.ndarray:
    """``Σ w_k a_k`` (weights already normalised), float32."""
    if len(arrays) != len(weights) or not arrays:
        raise ValueError(f"weighted_mean: {len(arrays)} arrays for {len(weights)} weights")
    acc = np.zeros(np.shape(arrays[0]), dtype=np.float64)
    for a, w in zip(arrays, weights, strict=True):
        acc += float(w) * np.asarray(a, dtype=np.float64)
    return acc.astype(np.float32)


def masked_mean(arrays: Sequence[np.ndarray], masks: Sequence[np.ndarray | None],
                weights: np.ndarray, empty: np.ndarray | float = 0.0) -> np.ndarray:
    """Per element ``Σ w_k a_k m_k / Σ w_k m_k`` (FedDST); ``empty`` where no client holds it.

    A mask of ``None`` means the client holds every element.
    """
    if len(arrays) != len(weights) or len(masks) != len(arrays) or not arrays:
        raise ValueError("masked_mean: arrays, masks and weights must have the same length")
    shape = np.shape(arrays[0])
    num = np.zeros(shape, dtype=np.float64)
    den = np.zeros(shape, dtype=np.float64)
    for a, m, w in zip(arrays, masks, weights, strict=True):
        mk = np.ones(shape, dtype=np.float64) if m is None else np.asarray(m, dtype=np.float64)
        num += float(w) * mk * np.asarray(a, dtype=np.float64)
        den += float(w) * mk
    out = np.broadcast_to(np.asarray(empty, dtype=np.float64), shape).copy()
    held = den > 0
    out[held] = num[held] / den[held]
    return out.astype(np.float32)


def nonzero_mean(arrays: Sequence[np.ndarray], weights: np.ndarray,
                 empty: np.ndarray | float = 0.0) -> np.ndarray:
    """``Σ w_k a_k [a_k≠0] / Σ w_k [a_k≠0]`` (ZeroFL's re-implementation); ``empty`` where all
    clients have 0."""
    return masked_mean(arrays, [np.asarray(a) != 0 for a in arrays], weights, empty)


def union_masks(masks: Sequence[np.ndarray]) -> np.ndarray:
    """Element-wise OR of bool masks."""
    out = np.zeros(np.shape(masks[0]), dtype=bool)
    for m in masks:
        out |= np.asarray(m, dtype=bool)
    return out


def topk_mask(score: np.ndarray, k: int, within: np.ndarray | None = None) -> np.ndarray:
    """Bool mask of the ``k`` largest ``|score|`` (restricted to ``within`` if given).

    Ties are broken by the lower flat index (stable sort), so the result is deterministic and
    masks of decreasing ``k`` on the same score are nested.
    """
    s = np.abs(np.asarray(score, dtype=np.float64)).ravel()
    cand = np.arange(s.size) if within is None else np.flatnonzero(np.asarray(within).ravel())
    k = max(0, min(int(k), cand.size))
    order = np.argsort(-s[cand], kind="stable")
    out = np.zeros(s.size, dtype=bool)
    out[cand[order[:k]]] = True
    return out.reshape(np.shape(score))


def density_count(density: float, n: int) -> int:
    """Elements kept at ``density`` of ``n``: ``round(density · n)`` half up, in [1, n]."""
    return max(1, min(n, int(np.floor(density * n + 0.5))))


def rescale_densities(densities: Mapping[str, float], sizes: Mapping[str, int],
                      total: float) -> dict[str, float]:
    """Scale per-layer densities so ``Σ d_l N_l = total · Σ N_l``, capping at 1 (repeatedly)."""
    if not 0.0 < total <= 1.0:
        raise ValueError(f"total density: expected (0, 1], got {total!r}")
    names = list(densities)
    fixed: set[str] = set()
    out = dict(densities)
    for _ in range(len(names) + 1):
        budget = total * sum(sizes[n] for n in names) - sum(sizes[n] for n in fixed)
        free = [n for n in names if n not in fixed]
        cur = sum(densities[n] * sizes[n] for n in free)
        scale = budget / cur if cur > 0 else 0.0
        over = [n for n in free if densities[n] * scale > 1.0]
        for n in free:
            out[n] = min(1.0, densities[n] * scale)
        if not over:
            break
        fixed.update(over)
        for n in over:
            out[n] = 1.0
    return out


__all__ = ["density_count", "is_running_stat", "is_server_owned", "masked_mean", "nonzero_mean",
           "rescale_densities", "sample_weights", "topk_mask", "uniform_weights", "union_masks",
           "weighted_mean"]
