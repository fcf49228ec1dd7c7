"""Layout arithmetic the lowering shares (DESIGN.md "Target"): padding to the engine
granularity and the padded contraction of a convolution. The granularities themselves are the
target's (:class:`~edgefc.targets.description.TensorEngine`). The operand precision of a
tensor-engine op (the ``[tensor.rate]`` key, from element types -- never from a byte count) is
:func:`edgefc.precision.rate_key`, read per op by :class:`edgefc.deployed_types.DeployedTypes`.
"""

from __future__ import annotations


def pad(n: int, g: int) -> int:
    return -(-int(n) // g) * g if g > 1 else int(n)


def contraction(cin: int, taps: int, g: int) -> int:
    """Padded contraction length of a convolution with ``cin`` input channels (per group) and
    ``taps`` kernel taps: channels padded to the granularity, times the taps; a layer with fewer
    input channels than the granularity folds the taps into the contraction instead (im2col of a
    first layer: 3 channels x 9 taps = 27 -> 32, not 3 -> 32 x 9)."""
    return pad(cin * taps, g) if cin < g else pad(cin, g) * taps
