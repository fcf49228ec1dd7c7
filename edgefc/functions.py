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
TiledAttention        Attention-23 tile by tile (:mod:`edgefc.tiled_attention_function`; the
                      ``deferred`` overload when ``deferred_normalization = 1``)
====================  =====================================================================

``act`` is the ``activation`` attribute: ``"none"`` (identity), ``"gelu"`` (``Gelu``, erf form),
``"silu"`` (``z * Sigmoid(z)``) or ``"clip"`` (``Clip(z, clip_min, clip_max)``, the bounds float
attributes of the node); the residual, when present, is the 4th input and is added after the
activation.

**Variants.** One ONNX function has one body, but FusedMatMul / FusedConv have six (three
activations, with or without the residual input; a missing optional input cannot be
referenced in a body). They are ONNX function *overloads* (IR version 10: ``FunctionProto.overload``
/ ``NodeProto.overload``), named ``<activation>`` or ``<activation>_residual``, which
onnxruntime, the ONNX checker, shape inference and the inliner resolve.

**Where the functions live.** The bodies are derived data: a node's variant follows from its
op, ``activation`` and input count. So the in-memory graph (onnx-graphsurgeon, which knows no
overloads) holds only the edgefc *nodes*; the functions are stamped once, on the way out, by
:func:`attach_functions` (``edgefc.ir.to_model`` / ``save`` / the shape-inference skeleton),
and dropped on the way in by :func:`strip_functions` (``edgefc.ir.import_model``) before
graphsurgeon, which would merge the overloads of one name, sees them. Nothing of
graphsurgeon is patched.
"""

from __future__ import annotations

from typing import List  # noqa: UP035 (graphsurgeon's attribute-type table is keyed by typing.List)

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from edgefc import composites
from edgefc import tiled_attention_function as tiled
from edgefc.errors import PassError

DOMAIN = "edgefc"
DOMAIN_VERSION = 1
#: the standard opset the bodies are written in (GroupNormalization-21, Gelu-20, Split-18).
BODY_OPSET = 23
#: function overloads need IR version 10.
MIN_IR_VERSION = 10

#: the ``activation`` values of FusedMatMul / FusedConv: none, and the epilogue activations of
#: :mod:`edgefc.composites`.
ACTIVATIONS = ("none", *composites.ACTIVATIONS)
#: edgefc ops whose function has overloads (one body per activation x residual).
OVERLOADED = ("FusedMatMul", "FusedConv")
CONV_ATTRS = ("dilations", "group", "kernel_shape", "pads", "strides")
#: input position of the optional residual of FusedMatMul / FusedConv.
RESIDUAL_INPUT = 3

#: graphsurgeon's name for the INTS attribute type (``list[int]`` is not in its table).
INTS = List[int]  # noqa: UP006


# --- variants ----------------------------------------------------------------------------------

def overload_name(activation: str, residual: bool) -> str:
    """``"silu"``, ``"none_residual"`` ...: the overload of a FusedMatMul/FusedConv variant."""
    if activation not in ACTIVATIONS:
        raise PassError(f"unknown fused activation '{activation}' (known: {', '.join(ACTIVATIONS)})")
    return f"{activation}_residual" if residual else activation


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
        """``activation`` (a name of :data:`ACTIVATIONS`) applied to ``z``, in its ONNX form."""
        if activation == "none":
            return z
        act = composites.ACTIVATIONS[activation]
        attrs = {k: next(v for v in vals if v is not None) for k, vals in act.onnx_attrs.items()
                 if None not in vals}   # an attribute whose default is accepted stays absent
        # bounds (Clip): the fused op's float attributes, as constants of z's type
        bounds = [self.op("CastLike", [self.op("Constant", [], {"value_float": _ref(b, float)}), z])
                  for b in act.bounds]
        y = self.op(act.onnx_op, [z, *bounds], attrs)
        return self.op("Mul", [z, y]) if act.gated else y

    def function(self, name: str, output, doc: str, attrs: dict) -> gs.Function:
        # The body's last node writes the function output ``Y``.
        if output in self.inputs:  # identity body (cannot happen for the ops below)
            output = self.op("Identity", [output])
        output.name = "Y"
        return gs.Function(name, domain=DOMAIN, nodes=self.nodes, inputs=self.inputs, outputs=[output],
                           doc_string=doc, opset=BODY_OPSET, attrs=attrs)


def _ref(name: str, typ) -> gs.Node.AttributeRef:
    return gs.Node.AttributeRef(name, typ)


def group_norm_silu() -> gs.Function:
    """GroupNormSiLU(X, scale[C], bias[C]; epsilon, num_groups) = SiLU(GroupNormalization-21(...))."""
    b = _Body("X", "scale", "bias")
    g = b.op("GroupNormalization", b.inputs, {"epsilon": _ref("epsilon", float), "num_groups": _ref("num_groups", int)})
    y = b.activation(g, composites.GROUP_NORM_SILU.activation.name)
    return b.function("GroupNormSiLU", y, "GroupNormalization-21 followed by SiLU (x * Sigmoid(x)).",
                      {"epsilon": None, "num_groups": None})


def geglu() -> gs.Function:
    """GeGLU(X) = A * Gelu(B) with A, B the halves of X's last axis."""
    b = _Body("X")
    a, gate = b.op("Split", b.inputs, {"axis": -1, "num_outputs": 2}, outputs=2)
    y = b.op("Mul", [a, b.activation(gate, composites.GEGLU.activation.name)])
    return b.function("GeGLU", y, "GEGLU: split the last axis in half, first half * Gelu(second half).", {})


def fused_matmul(activation: str, residual: bool) -> gs.Function:
    """FusedMatMul(A, B, bias[, residual]; activation) = act(A @ B + bias) [+ residual]."""
    b = _Body("A", "B", "bias", *(["residual"] if residual else []))
    z = b.op("Add", [b.op("MatMul", b.inputs[:2]), b.inputs[2]])
    y = b.activation(z, activation)
    if residual:
        y = b.op("Add", [y, b.inputs[3]])
    doc = f"Y = {activation}(A @ B + bias)" + (" + residual" if residual else "")
    return b.function("FusedMatMul", y, doc, {"activation": None, **_bound_attrs(activation)})


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
    return b.function("FusedConv", y, doc, {"activation": None, **{a: None for a in CONV_ATTRS}, **_bound_attrs(activation)})


def _bound_attrs(activation: str) -> dict:
    """The attributes an activation's bounds add to a fused op's function (Clip: clip_min, clip_max)."""
    act = composites.ACTIVATIONS.get(activation)
    return {b: None for b in act.bounds} if act else {}


def function_for(op: str, overload: str = "") -> gs.Function:
    """The local function of edgefc op ``op`` (FusedMatMul / FusedConv: of its ``overload``)."""
    if op in OVERLOADED:
        activation, residual = overload.removesuffix("_residual"), overload.endswith("_residual")
        return (fused_matmul if op == "FusedMatMul" else fused_conv)(activation, residual)
    if op == "GroupNormSiLU":
        return group_norm_silu()
    if op == "GeGLU":
        return geglu()
    raise PassError(f"no edgefc function is defined for op '{op}'")


#: the fused ops (each one composite of :mod:`edgefc.composites`) whose bodies this module defines.
FUSED_OPS = ("GroupNormSiLU", "GeGLU", "FusedMatMul", "FusedConv")
#: ops whose functions this module stamps: the fused ops and TiledAttention (its body is
#: :mod:`edgefc.tiled_attention_function`'s, written at the model's standard opset).
OPS = FUSED_OPS + (tiled.OP,)


def ensure_functions(graph: gs.Graph) -> gs.Graph:
    """Check that ``graph`` can carry the functions of its edgefc ops (standard opset >= 21 for the
    bodies) and raise its IR version to 10 (overloads). The functions themselves are stamped when
    the graph is exported (:func:`attach_functions`)."""
    if any(n.domain == DOMAIN and n.op in OPS for n in graph.nodes):
        if int(graph.opset) < 21:
            raise PassError(f"edgefc fused ops need standard opset >= 21 (the graph has {graph.opset}); run canonicalize first")
        graph.ir_version = max(int(graph.ir_version or 0), MIN_IR_VERSION)
    return graph


def _node_overload(node: onnx.NodeProto) -> str | None:
    """The overload a NodeProto of FusedMatMul/FusedConv calls (from ``activation`` and its inputs),
    or of TiledAttention (``deferred`` or the default body)."""
    if node.domain == DOMAIN and node.op_type == tiled.OP:
        return tiled.overload_of(node) or None
    if node.domain != DOMAIN or node.op_type not in OVERLOADED:
        return None
    activation = next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == "activation"), b"none")
    if isinstance(activation, bytes):
        activation = activation.decode()
    inputs = list(node.input)
    return overload_name(str(activation), len(inputs) > RESIDUAL_INPUT and inputs[RESIDUAL_INPUT] != "")


def strip_functions(model: onnx.ModelProto) -> onnx.ModelProto:
    """Remove the functions of edgefc ops (derived data) from ``model``, in place, before it is
    imported into graphsurgeon (which keys functions by domain and name, merging overloads)."""
    keep = [f for f in model.functions if not (f.domain == DOMAIN and f.name in OPS)]
    if len(keep) != len(model.functions):
        del model.functions[:]
        model.functions.extend(keep)
    return model


def attach_functions(model: onnx.ModelProto) -> onnx.ModelProto:
    """Give an exported ``model`` (in place) the local function of every edgefc op its graph uses,
    with the overload on each FusedMatMul/FusedConv/TiledAttention node and function, and IR
    version >= 10."""
    from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter

    strip_functions(model)
    wanted: set[tuple[str, str]] = set()
    for node in model.graph.node:
        if node.domain == DOMAIN and node.op_type in OPS:
            ov = _node_overload(node)
            if ov:
                node.overload = ov
            wanted.add((node.op_type, ov or ""))
    if not wanted:
        return model
    opset = next((int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")), BODY_OPSET)
    for op, ov in sorted(wanted):
        if op == tiled.OP:
            proto = tiled.function_proto(opset, ov)
        else:
            proto = OnnxExporter.export_function(function_for(op, ov))
            proto.overload = ov
        model.functions.append(proto)
    if not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(DOMAIN, DOMAIN_VERSION))
    model.ir_version = max(int(model.ir_version), MIN_IR_VERSION)
    return model


def make_node(op: str, inputs, outputs, *, name: str, attrs: dict | None = None) -> gs.Node:
    """An edgefc-domain node (its function is stamped on export by :func:`attach_functions`)."""
    if op not in FUSED_OPS:
        raise PassError(f"unknown edgefc op '{op}'")
    attrs = dict(attrs or {})
    if op in OVERLOADED:
        attrs.setdefault("activation", "none")
        overload_name(attrs["activation"], False)  # validates
    return gs.Node(op, name=name, attrs=attrs, inputs=list(inputs), outputs=list(outputs), domain=DOMAIN)


def constant(name: str, values) -> gs.Constant:
    """A float32 (or given dtype) constant tensor."""
    arr = np.asarray(values)
    if arr.dtype == np.float64:
        arr = arr.astype(np.float32)
    return gs.Constant(name, arr)
