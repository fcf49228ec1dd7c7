"""Pass ``canonicalize``: make the graph static, folded and clean before any other pass.

Matches: the whole graph. Does, once:
  * brings the standard domain to opset 23 (``--opset``), the opset of the standard fused ops
    later passes emit (Attention-23, GroupNormalization-21, Gelu-20, int16 QDQ-21);
then, until nothing changes:
  * static input shapes (from ``--shape NAME=D1xD2..``, else the model's own static shapes; a
    dynamic input with no ``--shape`` is a :class:`ShapeError`);
  * ONNX shape inference, then constant and shape folding (graphsurgeon
    ``fold_constants(fold_shapes=True)``);
  * removal of dead nodes, Identity, Cast to the input's own type, and Reshape to the input's
    own shape;
  * topological order.
Emits: the same computation with only static shapes, which TVM Relax's ONNX importer needs
(DESIGN.md, "TVM lowering"). Not a paper pass: every later pass assumes its output.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from edgefc import ir
from edgefc.errors import ShapeError
from edgefc.pass_base import Pass, PassContext
from edgefc.registry import register_pass
from edgefc.rewrite import bypass


def apply_input_shapes(graph: gs.Graph, shapes: dict[str, tuple[int, ...]]) -> None:
    """Fix the graph's input shapes; raise ShapeError for an unknown name or a still-dynamic input."""
    by_name = {t.name: t for t in graph.inputs}
    for name, shape in (shapes or {}).items():
        if name not in by_name:
            raise ShapeError(f"--shape names input '{name}', but the model's inputs are: {', '.join(by_name) or 'none'}")
        by_name[name].shape = list(shape)
    for t in graph.inputs:
        if ir.static_shape(t) is None:
            shown = "x".join(str(d) if isinstance(d, (int, np.integer)) and d >= 0 else "?" for d in (t.shape or []))
            raise ShapeError(f"input '{t.name}' has a dynamic shape [{shown or 'unknown'}]; give it with --shape {t.name}=D1xD2x...")


def _is_noop(node: gs.Node) -> bool:
    if node.op == "Identity":
        return True
    if node.op == "Cast" and node.inputs and node.inputs[0].dtype is not None:
        to = onnx.helper.tensor_dtype_to_np_dtype(node.attrs["to"])
        return np.dtype(node.inputs[0].dtype) == np.dtype(to)
    if node.op == "Reshape":
        a, b = ir.static_shape(node.inputs[0]), ir.static_shape(node.outputs[0])
        return a is not None and a == b
    return False


@register_pass("canonicalize", namespace="edgefc")
class Canonicalize(Pass):
    """Static shapes, shape inference, constant/shape folding, no-op removal, topological order."""

    max_rounds = 6
    opset = 23

    def run(self, graph: gs.Graph, ctx: PassContext) -> gs.Graph:
        apply_input_shapes(graph, ctx.option("shapes", {}))
        graph = ir.upgrade_opset(graph, int(ctx.option("opset", self.opset)))
        for _ in range(self.max_rounds):
            before = (len(graph.nodes), sum(ir.static_shape(t) is None for t in graph.tensors().values()))
            ir.infer_shapes(graph)
            graph.fold_constants(fold_shapes=True, error_ok=True)
            graph.cleanup(remove_unused_graph_inputs=False)
            for node in [n for n in graph.nodes if _is_noop(n)]:
                bypass(graph, node)
            graph.cleanup(remove_unused_graph_inputs=False).toposort()
            ir.infer_shapes(graph)
            after = (len(graph.nodes), sum(ir.static_shape(t) is None for t in graph.tensors().values()))
            if after == before:
                break
        return graph
