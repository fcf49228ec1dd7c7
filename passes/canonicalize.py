"""Pass ``canonicalize``: make the graph static, folded and clean before any other pass.

Matches: the whole graph. Does, once:
  * brings the standard domain to opset 23 (``--opset``), the opset of the standard fused ops
    later passes emit (Attention-23, GroupNormalization-21, Gelu-20, int16 QDQ-21): the whole
    model through ONNX's version converter, or op by op where that fails (ops whose schema did
    not change stay untouched, :func:`edgefc.opset.upgrade_opset`); newer models stay as they are;
then, until nothing changes:
  * static input shapes (from ``--shape NAME=D1xD2..``, else the model's own static shapes; a
    dynamic input with no ``--shape`` is a :class:`ShapeError`);
  * ONNX shape inference (with data propagation), then constant and shape folding
    (:mod:`edgefc.folding`: ``Shape``/``Size`` of static tensors, ``If`` on a constant,
    constant subgraphs evaluated in onnxruntime);
  * removal of dead nodes, Identity, Dropout (inference: the identity; not when training_mode
    is set or its mask is read), Cast to the input's own type, and Reshape to the input's own
    shape;
  * topological order;
then folds per-channel scales and shifts into the convolution before them
(:mod:`edgefc.passes.fold_affine`: BatchNormalization into Conv / ConvTranspose / Gemm, a
constant Mul / Div / Add / Sub into Conv / ConvTranspose, any other BatchNormalization into a
Mul and an Add; counts in ``report.json`` ``canonicalize.folded``), and reports (``report.json`` ``canonicalize.warnings``) a graph output whose declared shape the
graph contradicts, using the inferred one; and refuses (:class:`ShapeError`) a model with a tensor whose shape is still not static, naming
the node and the inputs whose values decide it (``Unique``, ``NonZero``, a ``Reshape`` to a
shape given as an input ...).
Emits: the same computation with only static shapes, which TVM Relax's ONNX importer needs
(DESIGN.md, "TVM lowering"). Not a paper pass: every later pass assumes its output.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from edgefc import folding, ir, opset
from edgefc.errors import ShapeError
from edgefc.graph_edit import bypass
from edgefc.pass_base import Pass, PassContext
from edgefc.passes.fold_affine import fold_affine
from edgefc.registry import register_pass


def apply_input_shapes(graph: gs.Graph, shapes: dict[str, tuple[int, ...]]) -> None:
    """Fix the graph's input shapes; raise ShapeError for an unknown name or a still-dynamic input."""
    by_name = {t.name: t for t in graph.inputs}
    for name, shape in (shapes or {}).items():
        if name not in by_name:
            raise ShapeError(f"--shape names input '{name}', but the model's inputs are: {', '.join(by_name) or 'none'}")
        by_name[name].shape = list(shape)
    dynamic = [t for t in graph.inputs if ir.static_shape(t) is None]
    if dynamic:  # every one in one line, so one run tells the user all the --shape options it needs
        def shown(t):
            return "x".join(str(d) if isinstance(d, (int, np.integer)) and d >= 0 else "?" for d in (t.shape or [])) or "unknown"

        if len(dynamic) == 1:
            t = dynamic[0]
            raise ShapeError(f"input '{t.name}' has a dynamic shape [{shown(t)}]; give it with --shape {t.name}=D1xD2x...")
        names = ", ".join(f"'{t.name}' [{shown(t)}]" for t in dynamic)
        raise ShapeError(f"inputs {names} have dynamic shapes; give each with --shape, e.g. "
                         + " ".join(f"--shape {t.name}=D1xD2x..." for t in dynamic))


#: ops whose output shape depends on the values of their (data) inputs
VALUE_SHAPED = {"NonZero", "Unique", "Compress", "NonMaxSuppression", "StringSplit", "TfIdfVectorizer"}


def _value_inputs(graph: gs.Graph, tensors) -> list[str]:
    """The graph inputs whose values (not only their shapes) reach ``tensors``."""
    names, seen, stack = [], set(), list(tensors)
    real = {t.name for t in graph.inputs}
    while stack:
        t = stack.pop()
        if t.name in seen:
            continue
        seen.add(t.name)
        if t.name in real:
            names.append(t.name)
        for producer in t.inputs:
            if producer.op in ("Shape", "Size"):  # only the shape of what is behind it
                continue
            stack.extend(producer.inputs)
    return sorted(names)


def _why_dynamic(graph: gs.Graph, node: gs.Node) -> str:
    shape_like = [t for t in node.inputs if not isinstance(t, gs.Constant) and t.dtype is not None
                  and np.dtype(t.dtype).kind in "iu" and t.shape is not None and len(t.shape) <= 1]
    dep = _value_inputs(graph, shape_like)  # sizes, axes, counts, repeats given at run time
    if not dep and node.op in VALUE_SHAPED:
        dep = _value_inputs(graph, node.inputs)
    if dep:
        return f"it depends on the values of input{'s' if len(dep) > 1 else ''} {', '.join(repr(d) for d in dep)}"
    return _inference_error(graph) or "ONNX shape inference cannot determine it"


def _inference_error(graph: gs.Graph) -> str | None:
    """What strict ONNX shape inference says is wrong (shapes that do not fit together, e.g. a
    ``--shape`` that does not match a MatMul's weights), naming the node and its input shapes."""
    try:
        onnx.shape_inference.infer_shapes(ir.skeleton_model(graph), strict_mode=True, data_prop=True)
        return None
    except Exception as e:  # InferenceError, or anything else the checker raises: no better reason then
        text = str(e)
    import re

    m = re.search(r"\(op_type:(\w+), node name: ([^)]*)\): \[\w+\] ([^\n]+)", text)
    if not m:
        return None
    op, name, why = m.group(1), m.group(2), m.group(3).strip()
    node = next((n for n in graph.nodes if n.name == name), None)
    shapes = ""
    if node is not None:
        shapes = "; input shapes " + ", ".join(
            f"{t.name or '-'} {list(t.shape) if t.shape is not None else '?'}" for t in node.inputs)
    return f"shapes do not fit at {op} node '{name}': {why}{shapes}"


def check_static(graph: gs.Graph) -> None:
    """Raise ShapeError for the first node output (in order) whose shape is still not static,
    naming the node and, where it is so, the inputs whose values decide it."""
    for node in graph.nodes:
        for t in node.outputs:
            if not t.name or getattr(t, "type", "tensor_type") != "tensor_type" or ir.static_shape(t) is not None:
                continue
            # the reason first: tools that show only the start of the line still show why
            raise ShapeError(f"no static shape: {_why_dynamic(graph, node)} (tensor '{t.name}', output of {node.op} node "
                             f"'{node.name}'); edgefc compiles models whose shapes are known at compile time")


def _show(shape) -> str:
    return "[" + ", ".join("?" if d is None or (isinstance(d, int) and d < 0) else str(d) for d in shape) + "]"


def _output_conflict(t: gs.Tensor, declared) -> str | None:
    """The warning for graph output ``t`` whose declared shape contradicts the inferred one (rank,
    or a fixed size), else None. Dynamic declared sizes (``batch``) are no contradiction."""
    inferred = ir.static_shape(t)
    if declared is None or inferred is None:
        return None
    fixed = [d if isinstance(d, (int, np.integer)) and d >= 0 else None for d in declared]
    if len(fixed) == len(inferred) and all(d is None or d == i for d, i in zip(fixed, inferred)):
        return None
    return (f"output '{t.name}' is declared {_show(fixed)} but the graph computes {_show(inferred)}; the inferred "
            f"shape is used (onnxruntime warns the same and returns the computed one)")


def _is_noop(node: gs.Node, graph_outputs: set[str] = frozenset()) -> bool:
    if node.op == "Identity":
        return True
    if node.op == "Dropout":
        # inference: Dropout is the identity unless training_mode is true at run time; its mask
        # output (when anything reads it) is not
        training = node.inputs[2] if len(node.inputs) > 2 else None
        mask = node.outputs[1] if len(node.outputs) > 1 else None
        return ((training is None or not training.name
                 or (isinstance(training, gs.Constant) and not bool(np.asarray(training.values).any())))
                and (mask is None or not mask.name or (not mask.outputs and mask.name not in graph_outputs)))
    if node.op == "Cast" and node.inputs and node.inputs[0].dtype is not None:
        to = onnx.helper.tensor_dtype_to_np_dtype(node.attrs["to"])
        return np.dtype(node.inputs[0].dtype) == np.dtype(to)
    if node.op == "Reshape":
        a, b = ir.static_shape(node.inputs[0]), ir.static_shape(node.outputs[0])
        return a is not None and a == b
    return False


@dataclass
class CanonicalizeOptions:
    """Options of ``canonicalize`` (Python API)."""

    opset: int | None = None   # the standard opset to convert to (default: Canonicalize.opset)


@register_pass("canonicalize", namespace="edgefc")
class Canonicalize(Pass):
    """Static shapes, shape inference, constant/shape folding, no-op removal, topological order."""

    max_rounds = 6
    opset = 23
    Options = CanonicalizeOptions
    handles_subgraphs = True   # bodies: converted to the opset, shapes inferred; an If on a constant inlined

    def run(self, graph: gs.Graph, ctx: PassContext) -> gs.Graph:
        apply_input_shapes(graph, ctx.option("shapes", {}))
        graph = opset.upgrade_opset(graph, int(ctx.option("opset", self.opset)))
        opset.explicit_defaults(graph)
        # a graph output's declared shape is a claim, not a constraint: inference decides it, and a
        # declared shape the graph contradicts (onnxruntime only warns) is reported, not refused
        declared = {t.name: list(t.shape) if t.shape is not None else None for t in graph.outputs}
        for t in graph.outputs:
            t.shape = None
        for _ in range(self.max_rounds):
            before = (len(graph.nodes), sum(ir.static_shape(t) is None for t in graph.tensors().values()))
            ir.infer_shapes(graph)
            folding.fold(graph)
            graph.cleanup(remove_unused_graph_inputs=False)
            outputs = {t.name for t in graph.outputs}
            for node in [n for n in graph.nodes if _is_noop(n, outputs)]:
                bypass(graph, node)
            graph.cleanup(remove_unused_graph_inputs=False).toposort()
            ir.infer_shapes(graph)
            after = (len(graph.nodes), sum(ir.static_shape(t) is None for t in graph.tensors().values()))
            if after == before:
                break
        for t in graph.outputs:   # what inference cannot determine (a Loop's output ...) keeps its declared shape
            d = declared.get(t.name)
            if ir.static_shape(t) is None and d is not None and all(isinstance(x, (int, np.integer)) and x >= 0 for x in d):
                t.shape = list(d)
        warnings = [w for t in graph.outputs if (w := _output_conflict(t, declared.get(t.name)))]
        check_static(graph)
        folded = fold_affine(graph)
        if folded:
            graph.cleanup(remove_unused_graph_inputs=False).toposort()
            ir.infer_shapes(graph)
        section = ctx.report.setdefault("canonicalize", {})
        section["folded"] = folded
        if warnings:
            section["warnings"] = section.get("warnings", []) + warnings
        return graph
