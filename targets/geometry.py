"""What the lowering needs of the target besides speeds (DESIGN.md "Target"): the layout and
granularity numbers and work counts (:class:`Geometry`, from the target file) and padding to the
engine granularity. The operand precision of a tensor-engine op (the ``[tensor.rate]`` key) is
:func:`edgefc.precision.rate_key`, read per op by :class:`edgefc.deployed_types.DeployedTypes`.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgefc.targets.placement import VECTOR_CLASS


def pad(n: int, g: int) -> int:
    return -(-int(n) // g) * g if g > 1 else int(n)


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

    @classmethod
    def from_target(cls, t) -> Geometry:
        from edgefc.targets.description import PASS_CLASSES

        passes = {c: tuple(sorted((k, int(n)) for k, n in t[f"vector.passes.{c}"].items() if n))
                  for c in PASS_CLASSES}
        return cls(int(t["tensor.channel_granularity"]), int(t["tensor.row_granularity"]),
                   int(t["sram.bytes"]), int(t["sram.weight_buffer_bytes"]), passes,
                   int(t["handoff.per_matmul"]), int(t["handoff.per_softmax"]), tuple(t["tensor.dtypes"]),
                   bool(t["sram.resident_weights"]), bool(t["sram.cascade"]))

    def vector_passes(self, op_type: str) -> tuple:
        """The element passes of one op of ``op_type`` (its class's, ``copy`` if unlisted)."""
        return self.passes[VECTOR_CLASS.get(op_type, "copy")]
