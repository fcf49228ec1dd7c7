"""Layout arithmetic the lowering shares (DESIGN.md "Target"): padding to the engine
granularity, the padded contraction of a convolution, and the operand precision of a
tensor-engine op (the ``[tensor.rate]`` key, from its operands' element types -- never from a
byte count). The granularities themselves are the target's
(:class:`~edgefc.targets.description.TensorEngine`).
"""

from __future__ import annotations

from edgefc.dtypes import DTYPE_BYTES as BYTES


def is_float(code: str) -> bool:
    return code.startswith("fp")


def pad(n: int, g: int) -> int:
    return -(-int(n) // g) * g if g > 1 else int(n)


def precision_key(weight: str, act: str) -> str:
    """Operand precision of a tensor-engine op (a key of [tensor.rate])."""
    if is_float(weight) or is_float(act):
        widest = max((c for c in (weight, act) if is_float(c)), key=lambda c: BYTES[c])
        return "fp16" if BYTES[widest] <= 2 else "fp32"
    a, b = sorted((min(BYTES[weight], 2) * 8, min(BYTES[act], 2) * 8))
    return f"int{a}xint{b}"


def contraction(cin: int, taps: int, g: int) -> int:
    """Padded contraction length of a convolution with ``cin`` input channels (per group) and
    ``taps`` kernel taps: channels padded to the granularity, times the taps; a layer with fewer
    input channels than the granularity folds the taps into the contraction instead (im2col of a
    first layer: 3 channels x 9 taps = 27 -> 32, not 3 -> 32 x 9)."""
    return pad(cin * taps, g) if cin < g else pad(cin, g) * taps
