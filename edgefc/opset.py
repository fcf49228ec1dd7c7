"""Opset conversion of a graph: bring its standard-domain ops to a newer ONNX opset.

``canonicalize`` (paper Sec. 3's fusions read one opset) calls :func:`upgrade_opset`: ONNX's
version converter on the weight-free skeleton of the whole model (so models over 2 GB convert
too), and where it fails, op by op, converting only the nodes whose schema changed in between.
"""

from __future__ import annotations

import onnx
import onnx_graphsurgeon as gs

from edgefc.errors import ShapeError
from edgefc.ir import import_model, skeleton_model

#: (op, domain) -> the first opset from which ONNX's version converter converts it faithfully
_UNCONVERTIBLE = {("Scan", ""): 9}


def _needs_conversion(node: gs.Node, old: int, new: int) -> bool:
    """Whether ``node`` (standard domain) means something else at opset ``new`` than at ``old``:
    its schema changed in between. Unknown ops are left alone."""
    if (node.domain or "") not in ("", "ai.onnx"):
        return False
    try:
        return onnx.defs.get_schema(node.op, old).since_version != onnx.defs.get_schema(node.op, new).since_version
    except onnx.defs.SchemaError:
        return False


def min_ir_version(version: int) -> int:
    """The lowest IR version a model importing standard opset ``version`` may declare."""
    return int(onnx.helper.find_min_ir_version_for([onnx.helper.make_opsetid("", version)]))


def _convert_node(graph: gs.Graph, node: gs.Node, old: int, new: int) -> list[gs.Node]:
    """``node`` converted alone from opset ``old`` to ``new`` by ONNX's version converter (its
    variable inputs typed as in the graph, its constant inputs as initializers); the nodes that
    replace it, wired to the graph's tensors."""
    from onnx import version_converter
    from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter as E

    inputs, inits, seen = [], [], set()
    for t in node.inputs:
        if not t.name or t.name in seen:
            continue
        seen.add(t.name)
        if isinstance(t, gs.Constant):
            inits.append(E.export_tensor_proto(t))
        else:
            inputs.append(E.export_value_info_proto(t, do_type_check=False))
    outputs = [E.export_value_info_proto(t, do_type_check=False) for t in node.outputs if t.name]
    g = onnx.helper.make_graph([E.export_node(node)], "node", inputs, outputs, initializer=inits)
    model = onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", old)])
    model.ir_version = max(min_ir_version(old), 4)   # IR 3 demands every initializer be a graph input
    converted = version_converter.convert_version(model, new)
    part = import_model(converted)
    outer = {t.name: t for t in list(node.inputs) + list(node.outputs) if t.name}
    prefix = f"{node.name or node.op}_opset{new}_"
    for t in part.tensors().values():
        if t.name not in outer:
            t.name = prefix + t.name
    for n in part.nodes:
        n.name = prefix + (n.name or n.op)
        ins, outs = [outer.get(t.name, t) for t in n.inputs], [outer.get(t.name, t) for t in n.outputs]
        n.inputs.clear()
        n.outputs.clear()
        n.inputs.extend(ins)
        n.outputs.extend(outs)
    return list(part.nodes)


def explicit_defaults(graph: gs.Graph) -> int:
    """Write out the defaulted attributes of standard ops defined by a function body
    (``MeanVarianceNormalization``, ...): their bodies reference the attribute (``Constant
    <value_ints = @axes>``), and from opset 18 on onnx's full check expands them with nothing
    bound where the node leaves it at its default (the model then fails ``onnx.checker``).
    Returns how many attributes were written."""
    n = 0
    version = int(graph.opset)
    for node in graph.nodes:
        if (node.domain or "") not in ("", "ai.onnx"):
            continue
        try:
            schema = onnx.defs.get_schema(node.op, version)
        except onnx.defs.SchemaError:
            continue
        if not (schema.has_function or schema.has_context_dependent_function):
            continue
        for name, attr in schema.attributes.items():
            if name in node.attrs or not attr.default_value.name:
                continue
            node.attrs[name] = onnx.helper.get_attribute_value(attr.default_value)
            n += 1
    return n


def upgrade_opset(graph: gs.Graph, version: int) -> gs.Graph:
    """Bring the graph's standard-domain ops to opset ``version``.

    First ONNX's version converter on the whole model (on the weight-free skeleton, so models
    over 2 GB convert too; the weights are put back afterwards). Where it fails (it rejects some
    valid models whose ops need no conversion at all), op by op: a node whose schema is the same
    at both opsets stays as it is, every other node is converted alone. A node that cannot be
    converted is a :class:`ShapeError` naming it. No-op if the graph is already there.
    """
    from onnx import version_converter

    old = int(graph.opset)
    if old >= version:
        return graph
    for node in [n for g in [graph, *graph.subgraphs(recursive=True)] for n in g.nodes]:
        if (node.op, node.domain or "") in _UNCONVERTIBLE and old < _UNCONVERTIBLE[(node.op, node.domain or "")]:
            raise ShapeError(f"cannot convert {node.op} node '{node.name}' from opset {old} to {version}: ONNX's version "
                             f"converter changes its meaning (its opset-{old} form has a batch axis that later forms do not)")
    constants = {name: t for name, t in graph.tensors().items() if isinstance(t, gs.Constant)}
    real_inputs = {t.name for t in graph.inputs}
    try:
        skeleton = skeleton_model(graph)
        # IR 3 (opset <= 8 era models, e.g. the onnx package's classic CNNs) demands that every
        # initializer also be a graph input; the skeleton keeps small constants as initializers only
        skeleton.ir_version = max(int(skeleton.ir_version), 4)
        converted = version_converter.convert_version(skeleton, version)
        new = import_model(converted)
    except Exception:  # noqa: BLE001 - the converter raises plain RuntimeErrors: try op by op
        return _upgrade_op_by_op(graph, old, version)
    new.inputs = [t for t in new.inputs if t.name in real_inputs]
    for before, after in ((graph.inputs, new.inputs), (graph.outputs, new.outputs)):
        if [(t.name, t.dtype, t.shape) for t in before] != [(t.name, t.dtype, t.shape) for t in after]:
            return _upgrade_op_by_op(graph, old, version)  # the converter changed the model's signature
    for node in new.nodes:
        for i, t in enumerate(node.inputs):
            if isinstance(t, gs.Variable) and t.name in constants:
                node.inputs[i] = constants[t.name]
    new.ir_version = max(int(graph.ir_version or 0), min_ir_version(version))
    return new


def _upgrade_op_by_op(graph: gs.Graph, old: int, version: int) -> gs.Graph:
    taken = {n.name for n in graph.nodes if n.name}
    for node in list(graph.nodes):
        if not _needs_conversion(node, old, version):
            continue
        if any(isinstance(v, gs.Graph) for v in node.attrs.values()):
            raise ShapeError(f"cannot convert {node.op} node '{node.name}' (it holds a subgraph) from opset {old} to {version}")
        try:
            replacement = _convert_node(graph, node, old, version)
        except Exception as e:  # noqa: BLE001 - the converter raises plain RuntimeErrors
            raise ShapeError(f"cannot convert {node.op} node '{node.name}' from opset {old} to {version}: "
                             f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from None
        for n in replacement:   # unnamed nodes of one op type would all get the same prefix
            base, k = n.name, 1
            while n.name in taken:
                n.name = f"{base}_{k}"
                k += 1
            taken.add(n.name)
        at = graph.nodes.index(node)
        node.inputs.clear()
        node.outputs.clear()
        graph.nodes[at:at + 1] = replacement
    graph.opset = version
    graph.ir_version = max(int(graph.ir_version or 0), min_ir_version(version))
    for d in graph.import_domains or []:
        if d.domain in ("", "ai.onnx"):
            d.version = version
    return graph
