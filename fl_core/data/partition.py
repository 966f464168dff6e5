"""Partitioners: split a training set over federated clients, every scheme seeded.

Each partitioner returns a list with one sorted int64 index array per client; together they
hold every training sample exactly once (``check_partition`` verifies this).

- ``iid``: a seeded permutation cut into equal parts (sizes differ by at most one).
- ``lda`` (ZeroFL / FLASH / Flower's ``create_lda_partitions``): every client gets the same
  number of samples (``N // K``, the first ``N % K`` clients one more, so nothing is dropped —
  Flower drops the remainder instead); client k's class mix ``p_k ~ Dir(alpha * 1_C)``; its
  samples are drawn from ``p_k`` without replacement; when a class runs out its probability is
  set to 0 for every client, ``1e-5`` is added to the classes that remain and the rows are
  renormalised (Flower's rule). Flower draws one sample at a time; here a client's remaining
  demand is drawn as one multinomial, capped by what each class has left, and the shortfall
  redrawn from the renormalised mix: identical to Flower's while no class runs out, and
  differing only in the draws around the moment one does.
  Flower's concentration is symmetric (``prior="uniform"``, the default), so on a dataset with
  unequal class sizes even a huge alpha gives every client a uniform class mix until the small
  classes run out, and the last clients get the leftovers; ``prior="global"`` draws
  ``p_k ~ Dir(alpha * C * global_class_share)`` instead, which tends to the dataset's own class
  mix as alpha grows (a sparsefl option, not in the papers).
- ``per_class`` (FedDST): for every class ``q_c ~ Dir(alpha * 1_K)`` over the K clients; the
  class's (shuffled) samples are cut at ``floor(n_c * cumsum(q_c))``. Client sizes vary and a
  client may get nothing (FedDST then ignores it); ``min_size`` redraws until every client has
  at least that many samples.
- ``pathological(k)``: every client holds exactly ``k`` distinct classes: client i takes the
  classes at positions ``i*k .. i*k+k-1`` (mod C) of a seeded class permutation, so each class
  is held by ``floor`` or ``ceil(K*k/C)`` clients, and each class's shuffled samples are split
  evenly among its holders. Needs ``k <= C``, ``K*k >= C`` (every class placed) and enough
  samples per class.
- ``natural``: by writer / speaker / device (``Dataset.groups``). One client per group, or,
  with ``num_clients`` smaller than the number of groups, whole groups dealt out to clients
  in a seeded order (round-robin).

Small ``alpha`` = non-IID, large ``alpha`` (e.g. 1000) ≈ IID.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

SCHEMES = ("iid", "lda", "per_class", "pathological", "natural")


def _check_k(num_clients: int, n: int) -> None:
    if not isinstance(num_clients, (int, np.integer)) or num_clients < 1:
        raise ValueError(f"num_clients must be a positive integer, got {num_clients!r}")
    if num_clients > n:
        raise ValueError(f"num_clients={num_clients} exceeds the {n} training samples")


def _check_alpha(alpha: float | None) -> float:
    if alpha is None or not np.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"alpha must be a positive finite number, got {alpha!r}")
    return float(alpha)


def _equal_sizes(n: int, k: int) -> np.ndarray:
    sizes = np.full(k, n // k, dtype=np.int64)
    sizes[: n % k] += 1
    return sizes


def iid(n: int, num_clients: int, seed: int = 0) -> list[np.ndarray]:
    """Seeded IID split of ``n`` samples into ``num_clients`` near-equal parts."""
    _check_k(num_clients, n)
    perm = np.random.default_rng(seed).permutation(n)
    return [np.sort(p).astype(np.int64) for p in np.array_split(perm, num_clients)]


def lda(
    y: np.ndarray, num_clients: int, alpha: float, seed: int = 0, prior: str = "uniform"
) -> list[np.ndarray]:
    """Equal-size clients, each with a class mix drawn from Dir(alpha) (ZeroFL/FLASH/Flower).

    ``prior="global"`` scales the concentration by the dataset's class shares (see module doc).
    """
    y = np.asarray(y)
    _check_k(num_clients, y.size)
    alpha = _check_alpha(alpha)
    if prior not in ("uniform", "global"):
        raise ValueError(f"lda prior must be 'uniform' or 'global', got {prior!r}")
    rng = np.random.default_rng(seed)
    classes, yc = np.unique(y, return_inverse=True)
    c = classes.size
    pools = [rng.permutation(np.flatnonzero(yc == j)) for j in range(c)]
    left = np.array([p.size for p in pools], dtype=np.int64)
    conc = np.full(c, alpha) if prior == "uniform" else alpha * c * left / left.sum()
    dist = rng.dirichlet(conc, size=num_clients)
    dist = np.where(np.isfinite(dist), dist, 0.0)
    dist[dist.sum(axis=1) <= 0] = 1.0  # degenerate draws (tiny alpha): uniform
    dist /= dist.sum(axis=1, keepdims=True)
    out = []
    for i, need in enumerate(_equal_sizes(y.size, num_clients)):
        got = []
        need = int(need)
        while need > 0:
            p = dist[i]
            take = np.minimum(rng.multinomial(need, p / p.sum()), left)
            for j in np.flatnonzero(take):
                start = pools[j].size - left[j]
                got.append(pools[j][start : start + take[j]])
            before = left > 0
            left -= take
            need -= int(take.sum())
            emptied = before & (left == 0)
            if emptied.any():
                dist[:, emptied] = 0.0
                dist[:, left > 0] += 1e-5
                dist /= dist.sum(axis=1, keepdims=True) + np.finfo(float).eps
        out.append(np.sort(np.concatenate(got)).astype(np.int64) if got else
                   np.empty(0, np.int64))
    return out


def per_class(
    y: np.ndarray, num_clients: int, alpha: float, seed: int = 0,
    min_size: int = 0, max_tries: int = 1000,
) -> list[np.ndarray]:
    """Each class's samples split over the clients by Dir(alpha) (FedDST's partition)."""
    y = np.asarray(y)
    _check_k(num_clients, y.size)
    alpha = _check_alpha(alpha)
    rng = np.random.default_rng(seed)
    classes = np.unique(y)
    for _ in range(max_tries):
        q = rng.dirichlet(np.full(num_clients, alpha), size=classes.size)
        q = np.where(np.isfinite(q), q, 0.0)
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for j, cls in enumerate(classes):
            idx = rng.permutation(np.flatnonzero(y == cls))
            qs = q[j] / q[j].sum() if q[j].sum() > 0 else np.full(num_clients, 1 / num_clients)
            cuts = np.minimum(np.floor(np.cumsum(qs)[:-1] * idx.size), idx.size).astype(np.int64)
            for i, piece in enumerate(np.split(idx, cuts)):
                parts[i].append(piece)
        out = [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]
        if min(o.size for o in out) >= min_size:
            return out
    raise ValueError(
        f"per_class: no draw in {max_tries} tries gave every client >= {min_size} samples "
        f"(alpha={alpha}, num_clients={num_clients}); lower min_size or raise alpha"
    )


def pathological(y: np.ndarray, num_clients: int, k: int, seed: int = 0) -> list[np.ndarray]:
    """Every client holds exactly ``k`` distinct classes, classes spread evenly over clients."""
    y = np.asarray(y)
    _check_k(num_clients, y.size)
    classes = np.unique(y)
    c = classes.size
    if not isinstance(k, (int, np.integer)) or not 1 <= k <= c:
        raise ValueError(f"pathological: k must be an integer in [1, {c}], got {k!r}")
    if num_clients * k < c:
        raise ValueError(
            f"pathological: {num_clients} clients x {k} classes cannot hold all {c} classes"
        )
    rng = np.random.default_rng(seed)
    order = rng.permutation(c)
    holders: list[list[int]] = [[] for _ in range(c)]
    for i in range(num_clients):
        for s in range(i * k, i * k + k):
            holders[order[s % c]].append(i)
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for j, cls in enumerate(classes):
        idx = rng.permutation(np.flatnonzero(y == cls))
        if idx.size < len(holders[j]):
            raise ValueError(
                f"pathological: class {cls} has {idx.size} samples for {len(holders[j])} clients"
            )
        for client, piece in zip(holders[j], np.array_split(idx, len(holders[j])), strict=True):
            parts[client].append(piece)
    return [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]


def natural(
    groups: np.ndarray | None, num_clients: int | None = None, seed: int = 0
) -> list[np.ndarray]:
    """One client per group (writer/speaker/device), or whole groups dealt to ``num_clients``."""
    if groups is None:
        raise ValueError("natural partition needs a dataset with groups (femnist, "
                         "speech_commands, synthetic)")
    groups = np.asarray(groups)
    uniq, inv = np.unique(groups, return_inverse=True)
    order = np.argsort(inv, kind="stable")
    bounds = np.cumsum(np.bincount(inv, minlength=uniq.size))[:-1]
    per_group = [g.astype(np.int64) for g in np.split(order, bounds)]
    if num_clients is None or num_clients == uniq.size:
        return [np.sort(g) for g in per_group]
    if not isinstance(num_clients, (int, np.integer)) or not 1 <= num_clients <= uniq.size:
        raise ValueError(
            f"natural: num_clients must be in [1, {uniq.size}] (the number of groups), "
            f"got {num_clients!r}"
        )
    perm = np.random.default_rng(seed).permutation(uniq.size)
    out = []
    for i in range(num_clients):
        out.append(np.sort(np.concatenate([per_group[g] for g in perm[i::num_clients]])))
    return out


def make_partition(
    scheme: str,
    y: np.ndarray,
    num_clients: int | None,
    *,
    seed: int = 0,
    alpha: float | None = None,
    k: int | None = None,
    groups: np.ndarray | None = None,
    min_size: int = 0,
    prior: str = "uniform",
) -> list[np.ndarray]:
    """Dispatch by scheme name (``iid``, ``lda``, ``per_class``, ``pathological``, ``natural``)."""
    if scheme == "natural":
        return natural(groups, num_clients, seed)
    if num_clients is None:
        raise ValueError(f"partition {scheme!r} needs num_clients")
    if scheme == "iid":
        return iid(np.asarray(y).size, num_clients, seed)
    if scheme == "lda":
        return lda(y, num_clients, alpha, seed, prior=prior)
    if scheme == "per_class":
        return per_class(y, num_clients, alpha, seed, min_size=min_size)
    if scheme == "pathological":
        return pathological(y, num_clients, k, seed)
    raise ValueError(f"unknown partition scheme {scheme!r}; allowed: {', '.join(SCHEMES)}")


def check_partition(parts: list[np.ndarray], n: int) -> None:
    """Raise ValueError unless ``parts`` hold every index in ``range(n)`` exactly once."""
    allidx = np.concatenate(parts) if parts else np.empty(0, np.int64)
    if allidx.size != n or not np.array_equal(np.sort(allidx), np.arange(n)):
        raise ValueError(f"partition does not assign each of the {n} samples exactly once")


def class_counts(parts: list[np.ndarray], y: np.ndarray, num_classes: int | None = None):
    """(clients, classes) int64 matrix of samples per class per client."""
    y = np.asarray(y)
    c = int(num_classes if num_classes is not None else (y.max() + 1 if y.size else 0))
    return np.stack([np.bincount(y[p], minlength=c)[:c] for p in parts]) if parts else \
        np.zeros((0, c), np.int64)


def partition_summary(
    parts: list[np.ndarray], y: np.ndarray, num_classes: int | None = None
) -> pd.DataFrame:
    """Per client: samples, distinct classes, class entropy (nats), and the count per class."""
    import pandas as pd

    counts = class_counts(parts, y, num_classes)
    n = counts.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = np.where(n[:, None] > 0, counts / np.maximum(n[:, None], 1), 0.0)
        ent = -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=1)
    df = pd.DataFrame(
        {"samples": n, "classes": (counts > 0).sum(axis=1), "entropy": ent},
        index=pd.RangeIndex(len(parts), name="client"),
    )
    cls = pd.DataFrame(counts, columns=[f"class_{j}" for j in range(counts.shape[1])],
                       index=df.index)
    return pd.concat([df, cls], axis=1)


def plot_partition(
    parts: list[np.ndarray],
    y: np.ndarray,
    path: str | os.PathLike,
    num_classes: int | None = None,
    *,
    title: str | None = None,
    max_clients: int = 100,
) -> str:
    """Write a classes x clients heat map of sample counts to ``path`` (PNG); return the path.

    Only the first ``max_clients`` clients are drawn (the title says so). matplotlib is
    imported here, with the Agg canvas (no display needed).
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("plot_partition needs matplotlib (pip install 'sparsefl[plot]')") from e

    counts = class_counts(parts, y, num_classes)
    shown = counts[:max_clients].T  # rows = classes, columns = clients
    fig = Figure(figsize=(min(4 + 0.09 * shown.shape[1], 16), min(2 + 0.25 * shown.shape[0], 10)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(shown, aspect="auto", interpolation="nearest", cmap="viridis", origin="lower")
    fig.colorbar(im, ax=ax, label="samples")
    ax.set_xlabel("client")
    ax.set_ylabel("class")
    t = title or "samples per class per client"
    if len(counts) > max_clients:
        t += f" (first {max_clients} of {len(counts)} clients)"
    ax.set_title(t)
    fig.tight_layout()
    path = os.fspath(path)
    fig.savefig(path, format="png", dpi=100)
    return path
