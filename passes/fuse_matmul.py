"""Pass ``fuse-matmul-bias``: MatMul with a constant weight + bias Add -> edgefc ``FusedMatMul``.

Matches (anchored at the ``MatMul``)::

    Y = Add(MatMul(A, W), bias)       W a constant [K, N]; bias a constant of N values that
                                      broadcasts along the last axis only ([N], [1, N], ...)

which is every ``nn.Linear`` with bias as the legacy exporter writes it for 3D activations (the
Q/K/V projections of CLIP and the VAE, attention output projections, feed-forward layers).
Emits: ``edgefc.FusedMatMul(A, W, bias[N]; activation="none")``; ``fuse-epilogue`` may later
fold an activation and a residual add into it.
Misses: every MatMul with a constant 2D weight whose output feeds an ``Add`` and was not
absorbed, with the reason (kind ``matmul_bias``). Bias-free projections (the U-Net's to_q/to_k/
to_v) stay plain MatMuls. Paper Sec. 3 (kernel fusion).
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from edgefc import composites, functions, ir
from edgefc.passes.fusion_base import const, last_axis_vector, node_base
from edgefc.pattern import Pattern
from edgefc.registry import register_pass
from edgefc.rewriter import Fusion, FusionPass, Rewriter, feeds


def _weight(c: gs.Constant) -> bool | str:
    return True if len(c.shape) == 2 else f"weight of shape {list(c.shape)} is not 2D"


def _where(m) -> bool | str:
    out = ir.static_shape(m["add"].outputs[0])
    mm = ir.static_shape(m["matmul"].outputs[0])
    n = m["W"].shape[1]
    if out is None or mm is None:
        return "MatMul output has no static shape"
    if out != mm:
        return f"the Add broadcasts the MatMul output {list(mm)} to {list(out)}"
    if last_axis_vector(m.const("bias"), n, len(out)) is None:
        return f"bias of shape {list(m.const('bias').shape)} is not one value per output column ({n})"
    return True


#: MatMul + bias Add: the ``matmul_bias`` composite (edgefc.composites).
PATTERN = Pattern(composites.epilogue(composites.MATMUL, None, False).name, where=_where)
_a = PATTERN.input("A")
_mm = PATTERN.op("MatMul", _a, PATTERN.const("W", _weight), name="matmul")
PATTERN.op("Add", _mm, PATTERN.const("bias"), name="add")


def _linear(node: gs.Node) -> bool:
    """A candidate: a MatMul with a constant 2D weight whose output feeds an Add."""
    w = node.inputs[1] if len(node.inputs) == 2 else None
    return isinstance(w, gs.Constant) and len(w.shape) == 2 and feeds("Add")(node)


def _fused_matmul(m, rw: Rewriter) -> list[gs.Node]:
    w, bias = m["W"], m["bias"]
    n = w.shape[1]
    if tuple(bias.shape) != (n,):
        bias = const(bias.name + ".vec", bias.values.reshape(n))
    name = rw.unique_name(node_base(m["matmul"]) + "/FusedMatMul")
    return [functions.make_node("FusedMatMul", [m["A"], w, bias], m.outputs, name=name, attrs={"activation": "none"})]


MATMUL_BIAS = Fusion("matmul_bias", [PATTERN], anchor="matmul", replacement=_fused_matmul, candidate=_linear)


@register_pass("fuse-matmul-bias", namespace="edgefc")
class FuseMatMulBias(FusionPass):
    """Fuse MatMul(A, W) + bias (constant W and bias) into edgefc FusedMatMul."""

    fusions = (MATMUL_BIAS,)
