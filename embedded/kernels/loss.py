"""Softmax cross-entropy (mean over the batch, torch's default) and its gradient, in Numba.

Row-wise log-sum-exp in float64 (max-shifted), so the loss is accurate for any logit scale;
the gradient ``(softmax - onehot) / N`` is written into a caller-given float32 buffer.
Serial: a (N, classes) logit matrix is far too small to pay for a parallel launch.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

_OPTS = {"cache": True, "nogil": True}


@njit(**_OPTS)
def softmax_xent(logits, labels, grad):
    """Mean cross-entropy of ``logits`` (N, K) float32 against int64 ``labels``; writes
    d loss / d logits into ``grad`` (N, K) float32 and returns the loss (float64)."""
    n, k = logits.shape
    total = 0.0
    inv_n = 1.0 / n
    for i in range(n):
        m = -np.inf
        for j in range(k):
            v = np.float64(logits[i, j])
            if v > m:
                m = v
        s = 0.0
        for j in range(k):
            s += math.exp(np.float64(logits[i, j]) - m)
        lse = m + math.log(s)
        t = labels[i]
        total += lse - np.float64(logits[i, t])
        for j in range(k):
            p = math.exp(np.float64(logits[i, j]) - lse)
            if j == t:
                p -= 1.0
            grad[i, j] = np.float32(p * inv_n)
    return total * inv_n


@njit(**_OPTS)
def xent_and_correct(logits, labels):
    """Summed cross-entropy (float64) and number of rows whose argmax equals the label
    (first maximum wins, as ``np.argmax``)."""
    n, k = logits.shape
    total = 0.0
    correct = 0
    for i in range(n):
        m = -np.inf
        am = 0
        for j in range(k):
            v = np.float64(logits[i, j])
            if v > m:
                m = v
                am = j
        s = 0.0
        for j in range(k):
            s += math.exp(np.float64(logits[i, j]) - m)
        total += m + math.log(s) - np.float64(logits[i, labels[i]])
        if am == labels[i]:
            correct += 1
    return total, correct
