"""How close a model's outputs are to a reference's: SQNR in dB and cosine similarity.

One definition for every consumer: the quantize pass's report (paper Sec. 4.2, "no performance
degradation after applying the W8A16 quantization"), ``edgefc run`` (a TVM build against
onnxruntime) and ``bench/quant_vs_ort.py``.
"""

from __future__ import annotations

import math

import numpy as np


def sqnr_db(ref: np.ndarray, out: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio of ``out`` against ``ref`` in dB:
    10 log10(sum ref^2 / sum (ref - out)^2); inf when they are equal, -inf for a zero signal."""
    ref = np.asarray(ref, dtype=np.float64)
    noise = float(np.sum((ref - np.asarray(out, dtype=np.float64)) ** 2))
    signal = float(np.sum(ref ** 2))
    if noise == 0:
        return math.inf
    return 10 * math.log10(signal / noise) if signal > 0 else -math.inf


def cosine(ref: np.ndarray, out: np.ndarray) -> float:
    """Cosine similarity of the two (flattened) arrays; 1.0 when either is all zeros."""
    r = np.asarray(ref, dtype=np.float64).ravel()
    o = np.asarray(out, dtype=np.float64).ravel()
    denom = float(np.linalg.norm(r) * np.linalg.norm(o))
    return float(r @ o) / denom if denom > 0 else 1.0
