"""Graph edits passes share outside the pattern driver: bypassing a node whose output equals one
of its inputs (graphsurgeon does the rest of the heavy lifting)."""

from __future__ import annotations

import onnx_graphsurgeon as gs


def bypass(graph: gs.Graph, node: gs.Node, keep: int = 0) -> bool:
    """Remove ``node``, whose output equals its input ``keep``, rewiring the consumers of the
    output to that input. The node is left without inputs and outputs (the caller drops it from
    ``graph.nodes``, or cleanup does).

    When the output is a graph output its name must survive: the input tensor is renamed to it,
    unless the input is itself a graph input/output or a constant (then the node stays and False
    is returned).
    """
    src, dst = node.inputs[keep], node.outputs[0]
    if dst in graph.outputs:
        if src in graph.inputs or src in graph.outputs or isinstance(src, gs.Constant):
            return False
        src.name = dst.name
        graph.outputs[graph.outputs.index(dst)] = src
    for consumer in list(dst.outputs):
        for i, t in enumerate(consumer.inputs):
            if t is dst:
                consumer.inputs[i] = src
    node.inputs.clear()
    node.outputs.clear()
    return True
