"""The ``edgefc``-domain operators as ONNX local functions with exact bodies.

DESIGN.md: after every pass the graph is a valid ONNX model that onnxruntime runs. Fused
operators with no standard ONNX equivalent are emitted as nodes of domain ``edgefc``
(opset import ``edgefc:1``) whose definition travels inside the model as a local function, so
onnxruntime executes them and ``onnx.inliner.inline_local_functions`` expands them back into
standard ops (which is also how the TVM importer can see through them).

====================  =====================================================================
op                    body (exact)
====================  =====================================================================
GroupNormSiLU         ``g = GroupNormalization(X, scale, bias; epsilon, num_groups)`` (opset 21:
                      scale/bias per channel [C]); ``Y = g * Sigmoid(g)``
GeGLU                 ``A, B = Split(X, axis=-1, num_outputs=2)``; ``Y = A * Gelu(B)``
FusedMatMul           ``z = MatMul(A, B) + bias``; ``Y = act(z)`` [``+ residual``]
FusedConv             ``z = Conv(X, W, B; dilations, group, kernel_shape, pads, strides)``;
                      ``Y = act(z)`` [``+ residual``]
====================  =====================================================================

``act`` is the ``activation`` attribute: ``"none"`` (identity), ``"gelu"`` (``Gelu``, erf form)
or ``"silu"`` (``z * Sigmoid(z)``); the residual, when present, is the 4th input and is added
after the activation.

**Variants.** One ONNX function has one body, but FusedMatMul / FusedConv have six (three
activations, with or without the residual input; a missing optional input cannot be
referenced in a body). They are ONNX function *overloads* (IR version 10: ``FunctionProto.overload``
/ ``NodeProto.overload``), named ``<activation>`` or ``<activation>_residual``, which
onnxruntime, the ONNX checker, shape inference and the inliner resolve. onnx-graphsurgeon 0.6
drops both fields, so :func:`install_graphsurgeon_overloads` (run when this module is imported)
teaches its exporter to write them: a node's overload is derived from its op, ``activation``
and input count, so passes that rewire inputs keep it right; a function's overload is kept in
the first line of its doc string (``[overload: silu_residual] ...``), which survives import
and ``copy()``.
"""

from __future__ import annotations

import re
from typing import List  # noqa: UP035 (graphsurgeon's attribute-type table is keyed by typing.List)

import numpy as np
import onnx_graphsurgeon as gs

from edgefc.errors import PassError

DOMAIN = "edgefc"
DOMAIN_VERSION = 1
#: the standard opset the bodies are written in (GroupNormalization-21, Gelu-20, Split-18).
BODY_OPSET = 23
#: function overloads need IR version 10.
MIN_IR_VERSION = 10

ACTIVATIONS = ("none", "gelu", "silu")
#: edgefc ops whose function has overloads (one body per activation x residual).
OVERLOADED = ("FusedMatMul", "FusedConv")
CONV_ATTRS = ("dilations", "group", "kernel_shape", "pads", "strides")
#: input position of the optional residual of FusedMatMul / FusedConv.
RESIDUAL_INPUT = 3

#: graphsurgeon's name for the INTS attribute type (``list[int]`` is not in its table).
INTS = List[int]  # noqa: UP006

_OVERLOAD_RE = re.compile(r"^\[overload: ([A-Za-z0-9_]+)\]")


# --- variants ----------------------------------------------------------------------------------

def overload_name(activation: str, residual: bool) -> str:
    """``"silu"``, ``"none_residual"`` ...: the overload of a FusedMatMul/FusedConv variant."""
    if activation not in ACTIVATIONS:
        raise PassError(f"unknown fused activation '{activation}' (known: {', '.join(ACTIVATIONS)})")
    return f"{activation}_residual" if residual else activation


def node_overload(node: gs.Node) -> str | None:
    """The overload a node calls: derived from the node itself (op, ``activation``, inputs)."""
    if node.domain != DOMAIN or node.op not in OVERLOADED:
        return None
    activation = node.attrs.get("activation", "none")
    if isinstance(activation, bytes):
        activation = activation.decode()
    return overload_name(str(activation), len(node.inputs) > RESIDUAL_INPUT)


def function_overload(func: gs.Function) -> str:
    m = _OVERLOAD_RE.match(func.doc_string or "")
    return m.group(1) if m else ""


# --- bodies ------------------------------------------------------------------------------------

class _Body:
    """A tiny builder of function bodies (standard ops, generic shapes)."""

    def __init__(self, *inputs: str):
        self.inputs = [gs.Variable(n) for n in inputs]
        self.nodes: list[gs.Node] = []
        self._n = 0

    def op(self, op: str, inputs, attrs=None, outputs: int = 1):
        outs = []
        for _ in range(outputs):
            self._n += 1
            outs.append(gs.Variable(f"t{self._n}"))
        self.nodes.append(gs.Node(op, name=f"{op}_{len(self.nodes)}", attrs=dict(attrs or {}),
                                  inputs=list(inputs), outputs=outs))
        return outs[0] if outputs == 1 else outs

    def activation(self, z, activation: str):
        if activation == "gelu":
            return self.op("Gelu", [z])
        if activation == "silu":
            return self.op("Mul", [z, self.op("Sigmoid", [z])])
        return z

    def function(self, name: str, output, doc: str, attrs: dict, overload: str = "") -> gs.Function:
        # The body's last node writes the function output ``Y``.
        if output in self.inputs:  # identity body (cannot happen for the ops below)
            output = self.op("Identity", [output])
        output.name = "Y"
        doc = f"[overload: {overload}] {doc}" if overload else doc
        return gs.Function(name, domain=DOMAIN, nodes=self.nodes, inputs=self.inputs, outputs=[output],
                           doc_string=doc, opset=BODY_OPSET, attrs=attrs)


def _ref(name: str, typ) -> gs.Node.AttributeRef:
    return gs.Node.AttributeRef(name, typ)


def group_norm_silu() -> gs.Function:
    """GroupNormSiLU(X, scale[C], bias[C]; epsilon, num_groups) = SiLU(GroupNormalization-21(...))."""
    b = _Body("X", "scale", "bias")
    g = b.op("GroupNormalization", b.inputs, {"epsilon": _ref("epsilon", float), "num_groups": _ref("num_groups", int)})
    y = b.activation(g, "silu")
    return b.function("GroupNormSiLU", y, "GroupNormalization-21 followed by SiLU (x * Sigmoid(x)).",
                      {"epsilon": None, "num_groups": None})


def geglu() -> gs.Function:
    """GeGLU(X) = A * Gelu(B) with A, B the halves of X's last axis."""
    b = _Body("X")
    a, gate = b.op("Split", b.inputs, {"axis": -1, "num_outputs": 2}, outputs=2)
    y = b.op("Mul", [a, b.op("Gelu", [gate])])
    return b.function("GeGLU", y, "GEGLU: split the last axis in half, first half * Gelu(second half).", {})


def fused_matmul(activation: str, residual: bool) -> gs.Function:
    """FusedMatMul(A, B, bias[, residual]; activation) = act(A @ B + bias) [+ residual]."""
    b = _Body("A", "B", "bias", *(["residual"] if residual else []))
    z = b.op("Add", [b.op("MatMul", b.inputs[:2]), b.inputs[2]])
    y = b.activation(z, activation)
    if residual:
        y = b.op("Add", [y, b.inputs[3]])
    doc = f"Y = {activation}(A @ B + bias)" + (" + residual" if residual else "")
    return b.function("FusedMatMul", y, doc, {"activation": None}, overload_name(activation, residual))


def fused_conv(activation: str, residual: bool) -> gs.Function:
    """FusedConv(X, W, B[, residual]; conv attrs, activation) = act(Conv(X, W, B)) [+ residual]."""
    b = _Body("X", "W", "B", *(["residual"] if residual else []))
    refs = {"dilations": _ref("dilations", INTS), "group": _ref("group", int), "kernel_shape": _ref("kernel_shape", INTS),
            "pads": _ref("pads", INTS), "strides": _ref("strides", INTS)}
    z = b.op("Conv", b.inputs[:3], refs)
    y = b.activation(z, activation)
    if residual:
        y = b.op("Add", [y, b.inputs[3]])
    doc = f"Y = {activation}(Conv(X, W, B))" + (" + residual" if residual else "")
    return b.function("FusedConv", y, doc, {"activation": None, **{a: None for a in CONV_ATTRS}},
                      overload_name(activation, residual))


def function_for(node: gs.Node) -> gs.Function:
    """The local function an edgefc node needs."""
    if node.op == "GroupNormSiLU":
        return group_norm_silu()
    if node.op == "GeGLU":
        return geglu()
    if node.op in OVERLOADED:
        ov = node_overload(node)
        activation, residual = ov.removesuffix("_residual"), ov.endswith("_residual")
        return (fused_matmul if node.op == "FusedMatMul" else fused_conv)(activation, residual)
    raise PassError(f"no edgefc function is defined for op '{node.op}'")


#: ops whose functions this module defines.
OPS = ("GroupNormSiLU", "GeGLU", "FusedMatMul", "FusedConv")


def ensure_functions(graph: gs.Graph) -> gs.Graph:
    """Give ``graph`` the local function of every edgefc op (of :data:`OPS`) that its nodes use.

    Also raises the IR version to 10 (overloads) and checks that the standard opset is recent
    enough for the bodies. Functions already present are kept; unused ones are left alone.
    """
    have = {(f.domain, f.name, function_overload(f)) for f in graph.functions}
    for node in graph.nodes:
        if node.domain != DOMAIN or node.op not in OPS:
            continue
        key = (DOMAIN, node.op, node_overload(node) or "")
        if key not in have:
            graph.functions.append(function_for(node))
            have.add(key)
    if any(f.domain == DOMAIN for f in graph.functions):
        if int(graph.opset) < 21:
            raise PassError(f"edgefc fused ops need standard opset >= 21 (the graph has {graph.opset}); run canonicalize first")
        graph.ir_version = max(int(graph.ir_version or 0), MIN_IR_VERSION)
    return graph


def make_node(op: str, inputs, outputs, *, name: str, attrs: dict | None = None) -> gs.Node:
    """An edgefc-domain node (its function is added by :func:`ensure_functions`)."""
    if op not in OPS:
        raise PassError(f"unknown edgefc op '{op}'")
    attrs = dict(attrs or {})
    if op in OVERLOADED:
        attrs.setdefault("activation", "none")
        overload_name(attrs["activation"], False)  # validates
    return gs.Node(op, name=name, attrs=attrs, inputs=list(inputs), outputs=list(outputs), domain=DOMAIN)


# --- onnx-graphsurgeon overload support ---------------------------------------------------------

def install_graphsurgeon_overloads() -> None:
    """Make onnx-graphsurgeon's exporter write ``overload`` on edgefc nodes and functions, and
    tell its function registry that overloads are distinct functions. Idempotent."""
    from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter

    if getattr(OnnxExporter, "_edgefc_overloads", False):
        return
    export_node, export_function = OnnxExporter.export_node, OnnxExporter.export_function

    def _export_node(node):
        proto = export_node(node)
        ov = node_overload(node)
        if ov and not proto.overload:
            proto.overload = ov
        return proto

    def _export_function(func):
        proto = export_function(func)
        ov = function_overload(func)
        if ov and not proto.overload:
            proto.overload = ov
        return proto

    OnnxExporter.export_node = staticmethod(_export_node)
    OnnxExporter.export_function = staticmethod(_export_function)
    # Function identity (duplicate detection, topological sorting of functions) includes the overload.
    gs.Function.unique_id = property(lambda self: (self.domain, self.name, function_overload(self)))
    OnnxExporter._edgefc_overloads = True


install_graphsurgeon_overloads()


def constant(name: str, values) -> gs.Constant:
    """A float32 (or given dtype) constant tensor."""
    arr = np.asarray(values)
    if arr.dtype == np.float64:
        arr = arr.astype(np.float32)
    return gs.Constant(name, arr)
