"""What the lowering needs of the target besides speeds (DESIGN.md "Target"): the layout and
granularity numbers and work counts (:class:`Geometry`, from the target file), padding to the
engine granularity, and the operand precision of a tensor-engine op (the ``[tensor.rate]`` key,
from its operands' element types -- never from a byte count).
"""

from __future__ import annotations

from dataclasses import dataclass

from edgefc.dtypes import DTYPE_BYTES as BYTES
from edgefc.targets.placement import VECTOR_CLASS


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



@dataclass(frozen=True)
class Geometry:
    """The target numbers the lowering itself needs (layout, granularity and work counts, not
    speeds): ``passes`` maps a vector op class to its ((vector class, passes), ...)."""

    channel_granularity: int
    row_granularity: int
    sram_bytes: int
    weight_buffer_bytes: int
    passes: dict
    handoffs_matmul: int
    handoffs_softmax: int
    dtypes: tuple = ("fp32", "fp16", "int16", "int8")
    resident_weights: bool = False
    cascade: bool = True
    ops: object = None   # the target's [ops] table (edgefc.targets.op_support.OpSupport)

    @classmethod
    def from_target(cls, t) -> Geometry:
        from edgefc.targets.description import PASS_CLASSES

        passes = {c: tuple(sorted((k, int(n)) for k, n in t[f"vector.passes.{c}"].items() if n))
                  for c in PASS_CLASSES}
        return cls(int(t["tensor.channel_granularity"]), int(t["tensor.row_granularity"]),
                   int(t["sram.bytes"]), int(t["sram.weight_buffer_bytes"]), passes,
                   int(t["handoff.per_matmul"]), int(t["handoff.per_softmax"]), tuple(t["tensor.dtypes"]),
                   bool(t["sram.resident_weights"]), bool(t["sram.cascade"]), t.ops)

    def vector_passes(self, op_type: str) -> tuple:
        """The element passes of one op of ``op_type`` (its class's, ``copy`` if unlisted)."""
        return self.passes[VECTOR_CLASS.get(op_type, "copy")]
