"""Range observers for W8A16 activation calibration (pass ``quantize``, paper Sec. 4.2).

``minmax`` needs no observer (the running min and max come back from onnxruntime as reductions,
:mod:`edgefc.passes.calib_stats`). ``percentile``: the range that keeps ``percentile`` % of the
values (of |x| for a symmetric range). ``mse``: the clipping threshold that minimises the expected
squared error of INT16 quantization (clipping error + rounding noise step^2/12), evaluated on the
histogram. Both read a :class:`HistogramObserver`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


@dataclass
class HistogramObserver:
    """A fixed-range histogram of the values (of |x| when ``symmetric``) over [lo, hi]."""

    lo: float
    hi: float
    symmetric: bool = True
    bins: int = 4096
    counts: np.ndarray = field(init=False)

    def __post_init__(self):
        if self.symmetric:
            self.lo, self.hi = 0.0, max(abs(self.lo), abs(self.hi))
        if not self.hi > self.lo:
            self.hi = self.lo + 1e-12
        self.counts = np.zeros(self.bins, dtype=np.int64)

    def update(self, values: np.ndarray) -> None:
        v = np.abs(values) if self.symmetric else values
        h, _ = np.histogram(v, bins=self.bins, range=(self.lo, self.hi))
        self.counts += h

    @property
    def edges(self) -> np.ndarray:
        return np.linspace(self.lo, self.hi, self.bins + 1)

    def percentile_range(self, percentile: float) -> tuple[float, float]:
        total = self.counts.sum()
        if total == 0:
            return self.lo, self.hi
        cdf = np.cumsum(self.counts) / total
        edges = self.edges
        if self.symmetric:
            k = int(np.searchsorted(cdf, percentile / 100.0))
            a = float(edges[min(k + 1, self.bins)])
            return -a, a
        tail = (100.0 - percentile) / 200.0
        lo = float(edges[int(np.searchsorted(cdf, tail))])
        hi = float(edges[min(int(np.searchsorted(cdf, 1.0 - tail)) + 1, self.bins)])
        return min(lo, 0.0), max(hi, 0.0)

    def mse_range(self, levels: int = 65535) -> tuple[float, float]:
        """Clipping range minimising E[(x - Q(x))^2]: squared clipping error of the values beyond
        the threshold plus the rounding noise step^2/12 of the values inside."""
        edges = self.edges
        centers = 0.5 * (edges[:-1] + edges[1:])
        c = self.counts.astype(np.float64)
        total = c.sum()
        if total == 0:
            return (-self.hi, self.hi) if self.symmetric else (self.lo, self.hi)
        if self.symmetric:
            # err(a) = sum_{x > a} c (x - a)^2 + total * step(a)^2 / 12, for every bin edge a at once
            s0 = np.cumsum(c[::-1])[::-1]
            s1 = np.cumsum((c * centers)[::-1])[::-1]
            s2 = np.cumsum((c * centers * centers)[::-1])[::-1]
            k = np.arange(self.bins // 16, self.bins)
            a = edges[k]
            err = s2[k] - 2 * a * s1[k] + a * a * s0[k] + total * (2 * a / levels) ** 2 / 12
            full = total * (2 * edges[-1] / levels) ** 2 / 12
            best_a = float(a[int(np.argmin(err))]) if err.size and err.min() < full else float(edges[-1])
            return -best_a, best_a
        best, best_r = math.inf, (self.lo, self.hi)
        zero = int(np.searchsorted(edges, 0.0))
        for shrink in np.linspace(0.0, 0.5, 33):  # shrink both ends by the same fraction of the range
            lo_k = int(round(shrink * zero))
            hi_k = self.bins - int(round(shrink * (self.bins - zero)))
            lo, hi = edges[lo_k], edges[hi_k]
            step = (hi - lo) / levels
            clip = np.sum(c[:lo_k] * (centers[:lo_k] - lo) ** 2) + np.sum(c[hi_k:] * (centers[hi_k:] - hi) ** 2)
            err = clip + total * step * step / 12
            if err < best:
                best, best_r = err, (float(min(lo, 0.0)), float(max(hi, 0.0)))
        return best_r

