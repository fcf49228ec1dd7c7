"""Pass ``fuse-identity``: remove arithmetic with an identity constant (x*1, x/1, x+0, x-0).

Matches: ``Mul``/``Div`` by a scalar constant 1, ``Add``/``Sub`` of a scalar constant 0, where
the result has the other input's shape and dtype (no broadcasting). Vectors of zeros are left
alone: a zero bias is still a bias (``fuse-matmul-bias`` folds it).
Emits: nothing; consumers read the other input directly.
Why in the fusion pipeline: diffusers divides every residual sum by ``output_scale_factor`` /
``rescale_output_factor`` (1.0 in Stable Diffusion), and that ``Div`` sits between a residual
``Add`` and the conv or matmul that feeds it, hiding the epilogue from ``fuse-epilogue``. Runs
first in ``fuse``. Paper Sec. 3 (kernel fusion): a precondition, not a fusion by itself.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from edgefc import ir
from edgefc.pass_base import PassContext
from edgefc.passes.fusion_base import FusionPass
from edgefc.registry import register_pass
from edgefc.rewrite import bypass
from edgefc.rewriter import RewriteLog

IDENTITY = {"Mul": 1.0, "Div": 1.0, "Add": 0.0, "Sub": 0.0}
COMMUTATIVE = {"Mul", "Add"}


def identity_operand(node: gs.Node) -> int | None:
    """Index of the input that passes through ``node`` unchanged, or None."""
    if node.op not in IDENTITY or len(node.inputs) != 2 or len(node.outputs) != 1:
        return None
    out_shape = ir.static_shape(node.outputs[0])
    sides = (1, 0) if node.op in COMMUTATIVE else (1,)
    for const_idx in sides:
        c, x = node.inputs[const_idx], node.inputs[1 - const_idx]
        if not isinstance(c, gs.Constant) or int(np.prod(c.shape, dtype=np.int64)) != 1:
            continue  # scalars only: a zero bias vector is a bias (fuse-matmul-bias takes it)
        if not np.all(c.values == IDENTITY[node.op]):
            continue
        if out_shape is None or ir.static_shape(x) != out_shape:
            continue
        if x.dtype is None or node.outputs[0].dtype is None or np.dtype(x.dtype) != np.dtype(node.outputs[0].dtype):
            continue
        return 1 - const_idx
    return None


@register_pass("fuse-identity", namespace="edgefc")
class FuseIdentity(FusionPass):
    """Remove x*1, x/1, x+0 and x-0 (the U-Net's divisions by output_scale_factor=1)."""

    kinds = ("identity",)

    def fuse(self, graph: gs.Graph, ctx: PassContext, log: RewriteLog) -> None:
        removed = set()
        for node in [n for n in graph.nodes if n.op in IDENTITY]:
            keep = identity_operand(node)
            if keep is None:
                continue
            if keep != 0:  # bypass passes input 0 through
                node.inputs[0], node.inputs[1] = node.inputs[1], node.inputs[0]
            if bypass(graph, node):
                removed.add(id(node))
                log.count("identity")
        if removed:
            graph.nodes = [n for n in graph.nodes if id(n) not in removed]
