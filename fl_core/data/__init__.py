"""fl_core.data — datasets and partitions for federations.

``load_dataset(name, path=None, **opts) -> Dataset`` loads a real dataset (bundled MNIST subset
and digits, Fashion-MNIST / MNIST IDX, FEMNIST LEAF JSON, CIFAR-10 binary, Speech Commands v2)
or generates the synthetic(alpha, beta) benchmark; ``make_partition`` splits its training set
over clients (iid, lda, per_class, pathological, natural). Nothing is downloaded or unpickled.
"""

from .base import DataError, Dataset, stratified_split
from .partition import (
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
from .registry import DATASETS, FASHION_MNIST_DEFAULT, dataset_options, load_dataset

__all__ = [
    "DATASETS",
    "FASHION_MNIST_DEFAULT",
    "SCHEMES",
    "DataError",
    "Dataset",
    "check_partition",
    "class_counts",
    "dataset_options",
    "iid",
    "lda",
    "load_dataset",
    "make_partition",
    "natural",
    "partition_summary",
    "pathological",
    "per_class",
    "plot_partition",
    "stratified_split",
]
