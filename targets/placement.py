"""Placement: which engine runs each graph node -- decided here, once, for the Program (DESIGN.md
"Target"; PERFORMANCE.md "Which engine runs an op").

The lowering (``targets/lowering.py``) asks :func:`place` for every node and records the answer
in the Program (``Program.placement``, ``Program.host_reasons``); the cost model prices that
placement, and the TVM lowering (``targets/tvm_lowering.py``) partitions the Relax module by it
instead of deciding again. A node is:

* ``none``: free -- metadata (Shape, Constant), alias ops (Reshape, Squeeze, Identity, Q/DQ: the
  producer writes the quantized type directly), Casts between types priced alike, and anything
  computed from constants only (folded at compile time);
* ``attention``: a fused attention block (both matmuls on the tensor engine, the softmax on the
  vector engine);
* ``tensor`` / ``vector``: an op the NPU runs -- its op type is one the NPU has a kernel for
  (:data:`NPU_OPS`: the numpy reference kernels of ``targets/tvm_kernels.py``, which stand for
  the NPU's), its attributes are ones those kernels take, and every activation it touches has an
  element type the NPU holds (the target file's ``tensor.dtypes``; a tensor behind a Q/DQ pair
  counts at its quantized type);
* ``host``: everything else, with the reason.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from edgefc.precision import STORAGE_ALIAS_OPS

TENSOR_OPS = {"Conv", "FusedConv", "MatMul", "FusedMatMul", "Gemm"}
ATTENTION_OPS = {"Attention", "TiledAttention"}
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
}
# Ops whose work scales with their input elements (reductions, normalisations); others: output.
INPUT_SIZED = {"Softmax", "LayerNormalization", "GroupNormalization", "InstanceNormalization",
               "GroupNormSiLU", "ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceL2", "GlobalAveragePool"}
# Data movement the vector engine does (one copy pass).
DATA_MOVEMENT_OPS = {"Transpose", "Concat", "Slice", "Split", "Resize", "Expand", "Cast", "DepthToSpace",
                     "SpaceToDepth"}

# Op types the NPU has a kernel for. Everything else (ConvTranspose, pooling, Gather, Pad,
# Clip with tensor bounds, LeakyRelu, Max/Min of two tensors, ArgMax, ...) runs on the host.
NPU_OPS = TENSOR_OPS | ATTENTION_OPS | set(VECTOR_CLASS) | DATA_MOVEMENT_OPS

_RESIZE_MODES = {"asymmetric", "half_pixel", "align_corners", "tf_half_pixel_for_nn"}


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


def _attr_reason(node: gs.Node) -> str | None:
    """Why the NPU kernel of this op type cannot take this node's attributes, or None."""
    op = node.op
    if op in ("Conv", "FusedConv"):
        w = node.inputs[1].shape if len(node.inputs) > 1 else None
        if w is None or len(w) != 4:
            return f"{op} of rank {len(w) if w is not None else '?'} weights (the NPU runs 2D convolutions)"
    if op == "Resize":
        mode = node.attrs.get("mode", "nearest")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        ctm = node.attrs.get("coordinate_transformation_mode", "half_pixel")
        ctm = ctm.decode() if isinstance(ctm, bytes) else ctm
        if mode != "nearest":
            return f"Resize mode {mode} (the NPU resizes by nearest neighbour)"
        if ctm not in _RESIZE_MODES:
            return f"Resize coordinate mode {ctm}"
        if node.outputs[0].shape is not None and len(node.outputs[0].shape) != 4:
            return "Resize of a tensor that is not NCHW"
    return None


def place(node: gs.Node, types, npu_dtypes) -> tuple[str, str]:
    """``(kind, reason)`` of one node: kind ``none`` | ``attention`` | ``tensor`` | ``vector`` |
    ``host`` (see the module docstring); ``reason`` says why a node is on the host ("" otherwise).
    ``types`` is the lowering's deployed-type table, ``npu_dtypes`` the target's ``tensor.dtypes``."""
    op = node.op
    if op in METADATA_OPS or op in STORAGE_ALIAS_OPS:
        return "none", ""
    if op == "Cast" and (types.is_const(node.inputs[0]) or types.of(node.inputs[0]) == types.of(node.outputs[0])):
        return "none", ""
    if all(types.is_const(t) for t in node.inputs if t is not None and t.name):
        return "none", ""  # folded at compile time
    if op not in NPU_OPS:
        return "host", f"no NPU kernel for {op}"
    acts = [t for t in node.inputs if t is not None and t.name and not types.is_const(t)]
    for t in acts + [t for t in node.outputs if t is not None and t.name]:
        code = types.of(t)
        if code not in npu_dtypes and not (code == "bool" and op not in TENSOR_OPS and op not in ATTENTION_OPS):
            return "host", f"{op} on {code} tensors (the NPU holds {', '.join(npu_dtypes)})"
    reason = _attr_reason(node)
    if reason:
        return "host", reason
    if op in ATTENTION_OPS:
        return "attention", ""
    return ("tensor" if op in TENSOR_OPS else "vector"), ""
