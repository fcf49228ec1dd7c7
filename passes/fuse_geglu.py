"""Pass ``fuse-geglu``: the GEGLU gate -> edgefc ``GeGLU`` (a local function).

Matches, anchored at the ``Gelu`` (erf form, so ``fuse-gelu`` runs first)::

    A = Slice(X, 0, D/2, axis=-1)    B = Slice(X, D/2, D, axis=-1)     (or A, B = Split(X, axis=-1))
    Y = A * Gelu(B)

which is diffusers' ``GEGLU``: ``hidden, gate = proj(x).chunk(2, dim=-1); hidden * gelu(gate)``
(the first half is the value, the second the gate).
Emits: ``edgefc.GeGLU(X)`` (body: ``Split`` in halves, ``A * Gelu(B)``).
Misses: every ``Gelu`` whose output feeds a ``Mul`` and was not absorbed, with the reason.
Paper Sec. 3 (kernel fusion).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from edgefc import functions, ir
from edgefc.composites import GEGLU
from edgefc.passes.fusion_base import activation, node_base
from edgefc.pattern import Pattern
from edgefc.registry import register_pass
from edgefc.rewriter import Fusion, FusionPass, Rewriter, feeds


def _slice_range(node: gs.Node, rank: int, dim: int) -> tuple[int, int] | str:
    """[start, end) of a Slice along the last axis (all other axes untouched), or why not."""
    consts = node.inputs[1:]
    if not all(isinstance(t, gs.Constant) for t in consts):
        return f"{node.op} '{node.name}' has non-constant starts/ends/axes"
    starts, ends = (c.values.reshape(-1).astype(np.int64) for c in consts[:2])
    axes = consts[2].values.reshape(-1) if len(consts) > 2 else np.arange(len(starts))
    steps = consts[3].values.reshape(-1) if len(consts) > 3 else np.ones(len(starts), np.int64)
    if len(starts) != 1 or int(axes[0]) % rank != rank - 1 or int(steps[0]) != 1:
        return f"Slice '{node.name}' does not slice the last axis with step 1"
    s, e = int(starts[0]), int(ends[0])
    s = s + dim if s < 0 else s
    e = e + dim if e < 0 else e
    return max(0, min(s, dim)), max(0, min(e, dim))


def _where_slice(m) -> bool | str:
    shape = ir.static_shape(m["X"])
    if shape is None:
        return f"'{m['X'].name}' has no static shape"
    dim = shape[-1]
    if dim % 2:
        return f"last dimension {dim} of '{m['X'].name}' is odd"
    for name, want in (("slice_a", (0, dim // 2)), ("slice_b", (dim // 2, dim))):
        got = _slice_range(m[name], len(shape), dim)
        if isinstance(got, str):
            return got
        if got != want:
            return f"Slice '{m[name].name}' takes [{got[0]}, {got[1]}) of the last axis, want [{want[0]}, {want[1]})"
    return True


def _where_split(m) -> bool | str:
    shape = ir.static_shape(m["X"])
    node = m["split"]
    if shape is None:
        return f"'{m['X'].name}' has no static shape"
    if int(node.attrs.get("axis", 0)) % len(shape) != len(shape) - 1:
        return f"Split '{node.name}' is not along the last axis"
    halves = [ir.static_shape(o) for o in node.outputs]
    if len(halves) != 2 or any(h is None or h[-1] * 2 != shape[-1] for h in halves):
        return f"Split '{node.name}' does not cut the last axis in two halves"
    return True


def _patterns() -> list[Pattern]:
    p1 = Pattern("geglu-slice", where=_where_slice)
    x = p1.input("X")
    a = p1.op("Slice", x, name="slice_a", extra_inputs=True)
    b = p1.op("Slice", x, name="slice_b", extra_inputs=True)
    p1.op("Mul", a, activation(p1, b, GEGLU.activation), name="mul")
    p2 = Pattern("geglu-split", where=_where_split)
    x = p2.input("X")
    a, b = p2.op(GEGLU.onnx_split, x, name="split", outputs=2, extra_inputs=True)
    p2.op("Mul", a, activation(p2, b, GEGLU.activation), name="mul")
    return [p1, p2]


PATTERNS = _patterns()


def _geglu(m, rw: Rewriter) -> list[gs.Node]:
    name = rw.unique_name(node_base(m[GEGLU.activation.name]) + "/GeGLU")
    return [functions.make_node(GEGLU.fused_op, [m["X"]], m.outputs, name=name)]


#: anchored at the gate's activation (``Gelu``), a candidate when it feeds a ``Mul``.
GEGLU_FUSION = Fusion("geglu", PATTERNS, anchor=GEGLU.activation.name, replacement=_geglu, candidate=feeds("Mul"))


@register_pass("fuse-geglu", namespace="edgefc")
class FuseGeGLU(FusionPass):
    """Fuse the GEGLU gate (halves of the projection, value * Gelu(gate)) into edgefc GeGLU."""

    fusions = (GEGLU_FUSION,)
