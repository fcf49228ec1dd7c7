"""Constant and shape folding: static inputs give static intermediates.

An exported model often computes shapes from its inputs at run time (``Shape -> Gather ->
Concat -> Reshape``, ``Range`` over a dimension, an ``If`` on a shape test); with static input
shapes all of these are constants, and later passes (fusion, tiling, the cost model, TVM's
importer) need them folded. :func:`fold` does, in order:

* ``Shape`` (with its ``start``/``end``) and ``Size`` of a tensor with a static shape become
  constants;
* ``If`` with a constant condition is replaced by the branch it takes (inlined);
* every other node whose inputs are all constants is evaluated in onnxruntime (one session for
  all of them, node by node where that fails) and its tensor outputs become constants.

Never folded: nodes outside the standard domain, random ops, nodes with subgraphs (other than
``If`` above), outputs that are not plain numeric tensors (sequences, optionals, strings: so a
sequence-valued node never reaches a tensor folder), and outputs larger than both
``MAX_ELEMENTS`` and the node's inputs (a folded ``Expand`` or ``ConstantOfShape`` would only
make the model bigger; a transposed or cast weight folds at any size).
A node that onnxruntime cannot evaluate stays as it is. Replaces graphsurgeon's
``fold_constants``, whose shape folding ignores ``Shape``'s ``start``/``end`` (a wrong answer
for opset-15+ models) and which fails on sequence values.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter

from edgefc import ir

#: largest output (elements) worth storing as a constant
MAX_ELEMENTS = 1 << 16
#: ops whose result is not a function of their inputs
NONDETERMINISTIC = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Bernoulli",
                    "Multinomial"}
#: numeric dtypes numpy and onnxruntime exchange exactly
_FOLDABLE_KINDS = "biuf"


def _is_constant(t: gs.Tensor) -> bool:
    return isinstance(t, gs.Constant) or (isinstance(t, gs.Variable) and not t.name)  # "" = omitted optional


def _set_constant(t: gs.Variable, value: np.ndarray) -> None:
    value = np.asarray(value)
    t.to_constant(value if value.flags.c_contiguous else value.copy())  # (ascontiguousarray makes scalars 1-d)
    t.inputs.clear()


def fold_shapes(graph: gs.Graph) -> int:
    """``Shape``/``Size`` of statically shaped tensors -> constants. Returns how many."""
    n = 0
    for node in list(graph.nodes):
        if node.op not in ("Shape", "Size") or (node.domain or "") not in ("", "ai.onnx") or not node.inputs:
            continue
        shape = ir.static_shape(node.inputs[0])
        out = node.outputs[0]
        if shape is None or not isinstance(out, gs.Variable):
            continue
        if node.op == "Shape":
            start, end = int(node.attrs.get("start", 0)), node.attrs.get("end")
            value = np.array(shape[start:None if end is None else int(end)], dtype=np.int64)  # ONNX clamps like Python
        else:
            value = np.array(int(np.prod(shape, dtype=np.int64)), dtype=np.int64)
        node.outputs.clear()
        _set_constant(out, value)
        n += 1
    return n


def fold_if(graph: gs.Graph) -> int:
    """``If`` nodes with a constant condition -> the nodes of the branch taken. Returns how many."""
    n = 0
    for node in list(graph.nodes):
        if node.op != "If" or not isinstance(node.inputs[0], gs.Constant):
            continue
        cond = node.inputs[0].values
        if cond.size != 1:
            continue
        branch: gs.Graph = node.attrs["then_branch" if bool(cond.reshape(-1)[0]) else "else_branch"]
        if len(branch.outputs) != len(node.outputs):
            continue
        outs = list(node.outputs)
        node.outputs.clear()
        node.inputs.clear()
        graph.nodes.remove(node)
        for inner in branch.nodes:
            for t in inner.outputs:   # shapes the branch had as a body: inferred again in the graph
                if isinstance(t, gs.Variable) and ir.static_shape(t) is None:
                    t.shape = None
            graph.nodes.append(inner)
        for src, dst in zip(branch.outputs, outs):  # Identity keeps the If's output names (canonicalize removes it)
            graph.nodes.append(gs.Node("Identity", name=f"{dst.name}_branch", inputs=[src], outputs=[dst]))
        n += 1
    return n


def _foldable(node: gs.Node, constant: set[str]) -> bool:
    """Standard-domain, deterministic, no subgraph, every input constant (or produced by a node
    that folds: names in ``constant``)."""
    return ((node.domain or "") in ("", "ai.onnx") and node.op not in NONDETERMINISTIC and node.op != "If"
            and not any(isinstance(v, gs.Graph) for v in node.attrs.values()) and bool(node.outputs)
            and all(_is_constant(t) or t.name in constant for t in node.inputs))


def _evaluate(graph: gs.Graph, nodes: list[gs.Node], known: dict[str, np.ndarray]) -> dict[str, np.ndarray] | None:
    """Outputs of ``nodes`` by name (inputs: constants, ``known`` values, or produced among
    ``nodes``), or None when onnxruntime cannot evaluate them."""
    from edgefc import ort

    inits, seen = [], set()
    produced = {t.name for n in nodes for t in n.outputs}
    for n in nodes:
        for t in n.inputs:
            if not t.name or t.name in seen or t.name in produced:
                continue
            seen.add(t.name)
            if isinstance(t, gs.Constant):
                inits.append(OnnxExporter.export_tensor_proto(t))
            elif t.name in known and isinstance(known[t.name], np.ndarray):
                inits.append(onnx.numpy_helper.from_array(known[t.name], t.name))
            else:
                return None
    names = [t.name for n in nodes for t in n.outputs if t.name]
    g = onnx.helper.make_graph([OnnxExporter.export_node(n) for n in nodes], "fold", [],
                               [onnx.ValueInfoProto(name=name) for name in names], initializer=inits)
    model = onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid(d.domain, d.version)
                                                     for d in _domains(graph)])
    if graph.ir_version is not None:
        model.ir_version = graph.ir_version
    try:
        sess = ort.session(model)
        return dict(zip(names, sess.run(names, {})))
    except Exception:  # noqa: BLE001 - onnxruntime cannot evaluate these nodes: leave them
        return None


def _domains(graph: gs.Graph):
    domains = list(graph.import_domains or [])
    if not any(d.domain in ("", "ai.onnx") for d in domains):
        domains.append(onnx.helper.make_opsetid("", int(graph.opset)))
    return domains


def _usable(t: gs.Tensor, value, limit: int) -> bool:
    if not isinstance(value, np.ndarray) or value.dtype.kind not in _FOLDABLE_KINDS or value.size > limit:
        return False
    if t.dtype is not None:
        try:
            if np.dtype(t.dtype) != value.dtype:
                return False
        except TypeError:
            return False
    return True


def fold_constants(graph: gs.Graph) -> int:
    """Evaluate every node whose inputs are (or fold to) constants; their outputs become
    constants. Returns how many nodes were folded."""
    graph.toposort()
    constant: set[str] = set()
    nodes = []
    for node in graph.nodes:
        if _foldable(node, constant):
            nodes.append(node)
            constant.update(t.name for t in node.outputs if t.name)
    if not nodes:
        return 0
    values = _evaluate(graph, nodes, {})
    if values is None:  # one of them fails: node by node, in order
        values = {}
        for node in nodes:
            values.update(_evaluate(graph, [node], values) or {})
    n = 0
    for node in nodes:
        outs = [t for t in node.outputs if t.name]
        # a weight transformed in place (Transpose, Cast, DequantizeLinear ...) folds at any size;
        # an op that makes more data than it reads only up to MAX_ELEMENTS
        read = sum(int(np.prod(t.shape)) if isinstance(t, gs.Constant) else getattr(values.get(t.name), "size", 0)
                   for t in node.inputs if t.name)
        if not outs or not all(t.name in values and _usable(t, values[t.name], max(MAX_ELEMENTS, read)) for t in outs):
            continue
        node.outputs.clear()
        for t in outs:
            _set_constant(t, values[t.name])
        n += 1
    return n


def fold(graph: gs.Graph, max_rounds: int = 8) -> int:
    """Shapes, constant ``If`` conditions and constant subgraphs, until nothing changes (shape
    inference between rounds). Returns the nodes folded."""
    total = 0
    for _ in range(max_rounds):
        n = fold_shapes(graph) + fold_if(graph) + fold_constants(graph)
        if not n:
            break
        total += n
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        ir.infer_shapes(graph)
    return total
