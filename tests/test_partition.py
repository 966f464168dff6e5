"""Partitioners: coverage, reproducibility, and each scheme's statistical semantics."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import kstest

from fl_core.data import (
    SCHEMES,
    check_partition,
    class_counts,
    iid,
    lda,
    make_partition,
    natural,
    partition_summary,
    pathological,
    per_class,
    plot_partition,
)

RNG = np.random.default_rng(12345)
Y = RNG.choice(10, size=3000, p=np.linspace(0.05, 0.15, 10) / np.linspace(0.05, 0.15, 10).sum())
GROUPS = RNG.integers(0, 37, size=3000)


def entropy_rows(counts: np.ndarray) -> np.ndarray:
    p = counts / counts.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        return -np.nansum(np.where(p > 0, p * np.log(p), 0.0), axis=1)


ALL = [
    ("iid", {}),
    ("lda", {"alpha": 0.5}),
    ("per_class", {"alpha": 0.5}),
    ("pathological", {"k": 2}),
    ("natural", {"groups": GROUPS}),
]


@pytest.mark.parametrize("scheme,opts", ALL)
def test_every_sample_assigned_once_and_seeded(scheme, opts):
    k = None if scheme == "natural" else 20
    parts = make_partition(scheme, Y, k, seed=3, **opts)
    assert sum(p.size for p in parts) == Y.size
    allidx = np.concatenate(parts)
    assert np.unique(allidx).size == Y.size and allidx.min() == 0 and allidx.max() == Y.size - 1
    check_partition(parts, Y.size)
    again = make_partition(scheme, Y, k, seed=3, **opts)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    other = make_partition(scheme, Y, k, seed=4, **opts)
    if scheme != "natural":  # one client per writer does not depend on the seed
        assert not all(np.array_equal(a, b) for a, b in zip(parts, other, strict=True))
    assert all(p.dtype == np.int64 for p in parts)


def test_check_partition_rejects_overlap_and_gaps():
    with pytest.raises(ValueError, match="exactly once"):
        check_partition([np.array([0, 1]), np.array([1, 2])], 4)
    with pytest.raises(ValueError, match="exactly once"):
        check_partition([np.array([0, 1])], 3)


def test_iid_equal_sizes():
    sizes = [p.size for p in iid(3000, 7, seed=0)]
    assert max(sizes) - min(sizes) <= 1


def test_lda_equal_client_sizes_and_alpha_controls_concentration():
    y = np.repeat(np.arange(10), 300)  # balanced, like CIFAR-10 / Fashion-MNIST
    ent = {}
    for alpha in (1000.0, 1.0, 0.1, 0.01):
        parts = lda(y, 30, alpha, seed=1)
        sizes = np.array([p.size for p in parts])
        assert sizes.max() - sizes.min() <= 1 and sizes.sum() == y.size
        counts = class_counts(parts, y, 10)
        ent[alpha] = entropy_rows(counts).mean()
        if alpha == 1000.0:  # ~ IID: clients' mixes as close to 10 % each as an iid split's
            dev = np.abs(counts / sizes[:, None] - 0.1).max(axis=1)
            base = np.abs(class_counts(iid(y.size, 30, seed=1), y, 10) / 100 - 0.1).max(axis=1)
            assert np.median(dev) < base.mean() + 0.015
    # 100 samples per client from a uniform mix: entropy ~ ln(10) - (C-1)/(2n) = 2.26
    assert ent[1000.0] > np.log(10) - 0.1
    assert ent[1000.0] > ent[1.0] > ent[0.1] > ent[0.01]
    assert ent[0.01] < 0.6


def test_lda_global_prior_follows_unequal_class_sizes():
    global_p = np.bincount(Y, minlength=10) / Y.size  # shares 0.05 .. 0.15
    dev = {}
    for prior in ("uniform", "global", "iid"):
        parts = iid(Y.size, 30, seed=1) if prior == "iid" else \
            lda(Y, 30, 1000.0, seed=1, prior=prior)
        counts = class_counts(parts, Y, 10)
        dev[prior] = np.abs(counts / counts.sum(axis=1, keepdims=True) - global_p).max(axis=1)
    base = dev["iid"].mean()  # sampling noise of 100-sample clients
    # Flower's symmetric prior: uniform mixes first, leftovers for the last clients
    assert np.median(dev["uniform"]) > base + 0.015
    assert np.median(dev["global"]) < base + 0.01
    with pytest.raises(ValueError, match="prior"):
        lda(Y, 30, 1.0, prior="flat")


def test_lda_class_mix_is_dirichlet():
    """Two classes, alpha=1: a client's class-0 share ~ Dir(1, 1) = Uniform(0, 1).

    Only the first half of the clients is tested: no class can run out before their demand
    (half of the data) is met, so Flower's exhaustion rule has not yet acted.
    """
    y = np.repeat([0, 1], 50000)
    parts = lda(y, 200, 1.0, seed=3)
    share = [float((y[p] == 0).mean()) for p in parts[:100]]
    assert kstest(share, "uniform").pvalue > 0.01
    # and not the same for a concentrated alpha
    parts = lda(y, 200, 0.05, seed=3)
    share = np.array([float((y[p] == 0).mean()) for p in parts[:100]])
    assert np.mean((share < 0.05) | (share > 0.95)) > 0.7


def test_per_class_each_class_split_by_dirichlet():
    """K=2 clients, alpha=1: each class's share going to client 0 ~ Uniform(0, 1)."""
    y = np.repeat(np.arange(300), 200)
    counts = class_counts(per_class(y, 2, 1.0, seed=3), y, 300)
    assert kstest(counts[0] / 200.0, "uniform").pvalue > 0.01
    # the test can tell: alpha=3 gives Beta(3, 3) shares, not uniform ones
    counts3 = class_counts(per_class(y, 2, 3.0, seed=3), y, 300)
    assert kstest(counts3[0] / 200.0, "uniform").pvalue < 1e-3
    # huge alpha: every class cut into near-equal pieces over the clients
    counts = class_counts(per_class(Y, 10, 1e5, seed=0), Y, 10)
    per = np.bincount(Y, minlength=10) / 10.0
    assert np.abs(counts - per[None, :]).max() <= 3
    # small alpha: each class sits mostly with one client; client sizes then vary
    counts = class_counts(per_class(Y, 10, 0.01, seed=0), Y, 10)
    assert (counts.max(axis=0) / counts.sum(axis=0)).mean() > 0.8
    assert counts.sum(axis=1).std() > 50


def test_per_class_min_size():
    parts = per_class(Y, 20, 0.1, seed=0, min_size=20)
    assert min(p.size for p in parts) >= 20
    check_partition(parts, Y.size)
    with pytest.raises(ValueError, match="min_size"):
        per_class(Y, 20, 0.01, seed=0, min_size=200, max_tries=5)


@pytest.mark.parametrize("num_clients,k", [(20, 2), (7, 3), (10, 1), (5, 10), (3, 4)])
def test_pathological_exactly_k_classes(num_clients, k):
    parts = pathological(Y, num_clients, k, seed=2)
    counts = class_counts(parts, Y, 10)
    assert ((counts > 0).sum(axis=1) == k).all()
    check_partition(parts, Y.size)
    holders = (counts > 0).sum(axis=0)  # classes spread evenly over clients
    assert holders.max() - holders.min() <= 1


def test_pathological_errors():
    with pytest.raises(ValueError, match="k must be"):
        pathological(Y, 10, 11)
    with pytest.raises(ValueError, match="cannot hold all 10 classes"):
        pathological(Y, 3, 3)


def test_natural_by_writer():
    parts = natural(GROUPS)
    assert len(parts) == 37
    for g, p in enumerate(parts):
        np.testing.assert_array_equal(p, np.flatnonzero(GROUPS == g))
    merged = natural(GROUPS, num_clients=5, seed=1)
    assert len(merged) == 5
    check_partition(merged, Y.size)
    owner = np.empty(Y.size, np.int64)
    for i, p in enumerate(merged):
        owner[p] = i
    for g in range(37):  # every writer's samples stay together
        assert np.unique(owner[GROUPS == g]).size == 1
    with pytest.raises(ValueError, match="needs a dataset with groups"):
        natural(None)
    with pytest.raises(ValueError, match=r"num_clients must be in \[1, 37\]"):
        natural(GROUPS, num_clients=38)


def test_natural_on_a_dataset_with_writers():
    from fl_core.data import load_dataset

    ds = load_dataset("synthetic", seed=1, num_devices=12, max_samples_per_device=200)
    parts = make_partition("natural", ds.y, None, groups=ds.groups)
    assert len(parts) == 12
    assert all(np.unique(ds.groups[p]).size == 1 for p in parts)


def test_make_partition_errors():
    with pytest.raises(ValueError, match="unknown partition scheme 'shards'.*pathological"):
        make_partition("shards", Y, 10)
    with pytest.raises(ValueError, match="alpha must be"):
        make_partition("lda", Y, 10)
    with pytest.raises(ValueError, match="exceeds"):
        make_partition("iid", Y[:5], 10)
    assert set(SCHEMES) == {"iid", "lda", "per_class", "pathological", "natural"}


def test_summary_counts():
    y = np.array([0, 0, 1, 1, 2, 2, 2])
    parts = [np.array([0, 1]), np.array([2, 4]), np.array([3, 5, 6])]
    df = partition_summary(parts, y, 3)
    assert list(df["samples"]) == [2, 2, 3]
    assert list(df["classes"]) == [1, 2, 2]
    assert df.loc[0, "entropy"] == 0.0
    assert df.loc[1, "entropy"] == pytest.approx(np.log(2))
    assert df[["class_0", "class_1", "class_2"]].to_numpy().tolist() == [[2, 0, 0],
                                                                          [0, 1, 1],
                                                                          [0, 1, 2]]


def test_heatmap_png_written(tmp_path):
    parts = lda(Y, 120, 0.3, seed=0)
    out = plot_partition(parts, Y, tmp_path / "lda.png", 10, title="lda 0.3")
    data = open(out, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000
    from matplotlib.image import imread

    img = imread(out)
    assert img.shape[0] > 100 and img.shape[1] > 100
    assert img[..., :3].std() > 0.05  # not a blank canvas
