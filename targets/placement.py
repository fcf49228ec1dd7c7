"""Placement: which engine runs each graph node -- decided here, once, for the Program (DESIGN.md
"Target"; PERFORMANCE.md "Which engine runs an op").

The lowering (``targets/lowering.py``) asks :func:`place` for every node and records the answer
in the Program (``Program.placement``, ``Program.host_reasons``); the cost model prices that
placement, and the TVM lowering (``targets/tvm_lowering.py``) partitions the Relax module by it
instead of deciding again. A node is:

* ``none``: free -- metadata (Shape, Constant), alias ops (Reshape, Squeeze, Identity, Q/DQ: the
  producer writes the quantized type directly), Casts between types priced alike, and anything
  computed from constants only (folded at compile time). A QuantizeLinear that *requantises*
  (``DeployedTypes.converts``: the conversion a mixed-precision plan adds between an INT16 and an
  INT8 reader) is vector work like a Cast between types;
* ``attention``: a fused attention block (both matmuls on the tensor engine, the softmax on the
  vector engine);
* ``tensor`` / ``vector``: an op the NPU runs -- its op type is listed in the target file's
  ``[ops]`` table (:mod:`edgefc.targets.op_support`: the op kinds the NPU's engines run, each with
  its source), the node is within that entry's limits (ranks, attribute values, constant
  operands), and every activation it touches has an element type the NPU holds (the target file's
  ``tensor.dtypes``; a tensor behind a Q/DQ pair counts at its quantized type);
* ``host``: everything else, with the reason.

The vector-engine work of an op (:func:`vector_passes`) is its class's element passes
(``[vector.passes]`` of the target file, :data:`VECTOR_CLASS` maps op types onto them), once per
window tap for pooling and per interpolation tap for a resize, once per extra input for a
variadic Max/Min/Sum.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_graphsurgeon as gs

from edgefc.precision import STORAGE_ALIAS_OPS
from edgefc.targets.control_flow import reads
from edgefc.targets.op_support import ATTENTION_WORK, TENSOR_WORK, OpSupport

TENSOR_OPS = set(TENSOR_WORK)
ATTENTION_OPS = set(ATTENTION_WORK)
METADATA_OPS = {"Shape", "Size", "Constant"}

# Vector-engine op class of each op type: the pass counts per class are the target's
# (``vector.passes.<class>`` in the target file; PERFORMANCE.md "Vector engine"). An NPU op type
# not listed is priced as one ``copy`` pass (data movement: Transpose, Concat, Slice, Resize ...).
VECTOR_CLASS: dict[str, str] = {
    "Softmax": "softmax",
    "LayerNormalization": "norm", "GroupNormalization": "norm", "InstanceNormalization": "norm",
    "GroupNormSiLU": "norm_silu", "Gelu": "gelu", "GeGLU": "geglu", "Sigmoid": "sigmoid", "Tanh": "tanh",
    "Erf": "erf", "Exp": "exp", "Log": "exp", "Sin": "trig", "Cos": "trig", "Pow": "pow",
    "Sqrt": "divide", "Reciprocal": "divide", "Div": "divide",
    "Add": "copy", "Sub": "copy", "Mul": "copy", "Neg": "copy", "Abs": "copy",
    "Relu": "max", "HardSigmoid": "hard_sigmoid", "HardSwish": "hard_sigmoid", "Mish": "silu", "Softplus": "silu",
    "Elu": "silu", "Selu": "silu",
    "ReduceMean": "reduce_mean", "GlobalAveragePool": "reduce_mean", "ReduceSum": "reduce_sum",
    "ReduceMax": "reduce_max", "ReduceMin": "reduce_max", "ReduceL2": "reduce_l2",
    # boolean masks (comparison results, Where conditions) are vector-engine data (issue 14:
    # MobileBERT's attention masks would otherwise make 72 host round trips)
    "Where": "copy", "And": "copy", "IsNaN": "max",
    # issue 22: what trained CNNs use besides
    "Clip": "clip", "LeakyRelu": "leaky_relu", "PRelu": "leaky_relu", "Max": "max", "Min": "max", "Sum": "copy",
    "MaxPool": "max", "AveragePool": "reduce_sum", "GlobalMaxPool": "reduce_max",
}
# Ops whose work scales with their input elements (reductions, normalisations); others: output.
INPUT_SIZED = {"Softmax", "LayerNormalization", "GroupNormalization", "InstanceNormalization",
               "GroupNormSiLU", "ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceL2", "GlobalAveragePool",
               "GlobalMaxPool"}
# Data movement the vector engine does (one copy pass).
DATA_MOVEMENT_OPS = {"Transpose", "Concat", "Slice", "Split", "Resize", "Expand", "Cast", "DepthToSpace",
                     "SpaceToDepth", "Pad"}
# Pooling: the op class's passes once per window tap over the output; then (an average) the
# class's passes once more over the output (the scale by 1 / window).
WINDOW_OPS = {"MaxPool": ("max", None), "AveragePool": ("reduce_sum", "copy")}
# Element-wise ops of any number of inputs: one pass of the class per input after the first.
VARIADIC_OPS = {"Max", "Min", "Sum"}


def node_names(nodes) -> list[str]:
    """The name each node goes by in the Program and in the TVM partition: its own, or
    ``<op>_<index>`` when it has none or repeats an earlier one (``tvm_import.prepare_model`` names
    the nodes of the model it imports by the same rule)."""
    seen: set[str] = set()
    out = []
    for i, n in enumerate(nodes):
        name = n.name if n.name and n.name not in seen else f"{n.op}_{i}"
        seen.add(name)
        out.append(name)
    return out


def _merge(*parts) -> tuple:
    out: dict[str, int] = {}
    for passes, times in parts:
        for c, n in passes:
            out[c] = out.get(c, 0) + int(n) * int(times)
    return tuple(sorted((c, n) for c, n in out.items() if n))


def vector_passes(node: gs.Node, class_passes: dict) -> tuple:
    """Element passes ((vector class, passes), ...) one vector-engine ``node`` makes over its
    elements (output elements; input elements for :data:`INPUT_SIZED` ops), from the target's
    passes per op class (``class_passes``, ``Geometry.passes``): its class's (``copy`` if
    unlisted), times the window taps of a pooling (:data:`WINDOW_OPS`), the interpolation taps
    of a resize (2 per resized axis for ``linear``, 1 for ``nearest``), or the inputs after the
    first of a variadic op (:data:`VARIADIC_OPS`)."""
    op = node.op
    if op in WINDOW_OPS:
        per_tap, per_output = WINDOW_OPS[op]
        taps = int(math.prod(int(k) for k in node.attrs.get("kernel_shape", [1])))
        return _merge((class_passes[per_tap], taps), *([(class_passes[per_output], 1)] if per_output else []))
    if op == "Resize":
        mode = node.attrs.get("mode", "nearest")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        x, y = node.inputs[0].shape, node.outputs[0].shape
        resized = sum(1 for a, b in zip(x or (), y or ()) if a != b)
        return _merge((class_passes["copy"], 2 ** resized if mode == "linear" else 1))
    if op in VARIADIC_OPS:
        n = len([t for t in node.inputs if t is not None and t.name])
        return _merge((class_passes[VECTOR_CLASS[op]], max(n - 1, 1)))
    return class_passes[VECTOR_CLASS.get(op, "copy")]


def _value(t: gs.Tensor):
    """A constant tensor's value (None for anything else)."""
    return np.asarray(t.values) if isinstance(t, gs.Constant) else None


def place(node: gs.Node, types, npu_dtypes, ops: OpSupport, graph_outputs: frozenset[str] = frozenset()) -> tuple[str, str]:
    """``(kind, reason)`` of one node: kind ``none`` | ``attention`` | ``tensor`` | ``vector`` |
    ``host`` (see the module docstring); ``reason`` says why a node is on the host ("" otherwise).
    ``types`` is the lowering's deployed-type table, ``npu_dtypes`` the target's ``tensor.dtypes``,
    ``ops`` its ``[ops]`` table, ``graph_outputs`` the names of the graph's outputs."""
    op = node.op
    if op in METADATA_OPS or (op in STORAGE_ALIAS_OPS and not types.converts(node)):
        return "none", ""  # a Q/DQ is the producer writing (the consumer reading) the quantized type
    if op == "Cast" and (types.is_const(node.inputs[0]) or types.of(node.inputs[0]) == types.of(node.outputs[0])):
        return "none", ""
    if all(types.is_const(t) for t in reads(node) if t is not None and t.name):
        return "none", ""  # folded at compile time
    engine = ops.engine(op)
    if engine is None:
        return "host", f"no NPU kernel for {op}"
    acts = [t for t in node.inputs if t is not None and t.name and not types.is_const(t)]
    for t in acts + [t for t in node.outputs if t is not None and t.name]:
        code = types.of(t)
        if code not in npu_dtypes and not (code == "bool" and engine == "vector"):
            return "host", f"{op} on {code} tensors (the NPU holds {', '.join(npu_dtypes)})"
    reason = ops.rejects(node, types.is_const, _value, graph_outputs)
    if reason:
        return "host", reason
    return engine, ""
