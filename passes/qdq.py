"""The integer rewrite of pass ``quantize``: INT8 weights, INT16 / INT8 activations as Q/DQ (paper
Sec. 2.3 / 4.2; W8A16, W8A8 and plans that mix them).

Matches: the ops and tensors a :class:`~edgefc.passes.quant_policy.QdqPlan` names. Emits: INT8
per-output-channel symmetric weights (``DequantizeLinear`` with ``axis`` from an int8 initializer)
for the layers the plan runs at an integer precision; a ``QuantizeLinear -> DequantizeLinear`` pair
(int16 or int8, per tensor; opset-21+ semantics, run by onnxruntime) after every activation the
plan stores as an integer (INT16: symmetric by default; INT8: asymmetric by default); a second
pair (the requantisation to a narrower type) for readers that compute at a narrower precision
than the tensor is stored at - the conversions a mixed plan adds, priced by the cost model; and
biases corrected for the expected shift the weight rounding causes (``b -= (W_q - W) . E[x]`` with
E[x] the calibration mean of each input channel: "bias correction", Nagel et al. 2019). What to
quantize is decided by :mod:`edgefc.passes.quant_policy`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import onnx_graphsurgeon as gs

from edgefc import precision as pr
from edgefc.deployed_types import DeployedTypes
from edgefc.errors import QuantizationError
from edgefc.functions import ensure_functions
from edgefc.memory import release_memory
from edgefc.passes import quant_policy as qp
from edgefc.passes.fp16 import convert_fp16
from edgefc.passes.tiled_attention import defer_normalization


def quantize_weight(w: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric INT8 per output channel: q = round(w / s), s = max|w| / 127 over the channel."""
    moved = np.moveaxis(w.astype(np.float32), axis, 0)
    flat = moved.reshape(moved.shape[0], -1)
    amax = np.abs(flat).max(axis=1) if flat.size else np.zeros(moved.shape[0], np.float32)
    scale = np.where(amax > 0, amax / qp.INT8_MAX, 1.0).astype(np.float32)
    q = np.clip(np.rint(flat / scale[:, None]), -qp.INT8_MAX, qp.INT8_MAX).astype(np.int8)
    return np.moveaxis(q.reshape(moved.shape), 0, axis), scale


def dequantize_weight(q: np.ndarray, scale: np.ndarray, axis: int) -> np.ndarray:
    shape = [1] * q.ndim
    shape[axis] = -1
    return q.astype(np.float32) * scale.reshape(shape)


#: integer activation type -> (largest symmetric magnitude, levels - 1)
INT_TYPES = {"int16": (qp.INT16_MAX, 65535.0), "int8": (qp.INT8_MAX, 255.0)}
#: the ONNX element type of a (type, symmetric) activation: INT8 is stored as uint8 with its zero
#: point moved by 128 (the same grid; symmetric: zero point 128), the form onnxruntime's CPU kernels
#: take (its optimizer rewrites int8 activations to uint8 itself, and then fails on the int8 Q/DQ it
#: moves across a Reshape/Unsqueeze: "output_dtype INT8 does not match y_zero_point type UINT8").
STORAGE = {("int16", True): np.int16, ("int16", False): np.int16, ("int8", True): np.uint8, ("int8", False): np.uint8}


def activation_qparams(lo: float, hi: float, symmetric: bool, dtype: str = "int16") -> tuple[float, np.generic]:
    """(scale, zero point) of ``dtype`` (``int16`` / ``int8``) for a calibrated range; the zero
    point is a numpy scalar of the ONNX storage type (:data:`STORAGE`)."""
    qmax, levels = INT_TYPES[dtype]
    np_type = STORAGE[(dtype, symmetric)]
    info = np.iinfo(np_type)
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise QuantizationError("calibration produced a non-finite activation range (NaN/Inf in the model's outputs)")
    middle = 0 if info.min < 0 else (info.max + 1) // 2
    if symmetric:
        a = max(-lo, hi)
        return (a / qmax if a > 0 else 1.0 / qmax), np_type(middle)
    if hi - lo <= 0:
        return 1.0 / qmax, np_type(middle)
    scale = (hi - lo) / levels
    zp = int(np.clip(np.rint(info.min - lo / scale), info.min, info.max))
    return scale, np_type(zp)


def mean_axes(node: gs.Node, x: gs.Tensor) -> tuple[int, ...] | None:
    rank = len(x.shape or ())
    if node.op in ("Conv", "FusedConv") and rank >= 3:
        return tuple(i for i in range(rank) if i != 1)
    if node.op in ("MatMul", "FusedMatMul") and rank >= 2:
        return tuple(range(rank - 1))
    if node.op == "Gemm" and rank == 2 and not int(node.attrs.get("transA", 0)):
        return (0,)
    return None


def bias_shift(node: gs.Node, delta: np.ndarray, mean: np.ndarray) -> np.ndarray | None:
    """Expected output shift E[(W_q - W) x] per output channel, from the input channel means."""
    if node.op in ("Conv", "FusedConv"):
        g = int(node.attrs.get("group", 1))
        o, cg = delta.shape[0], delta.shape[1]
        if mean.shape[0] != cg * g:
            return None
        per_out = mean.reshape(g, cg)[np.arange(o) // (o // g)]  # [O, C/g]
        return np.einsum("oc,oc->o", delta.reshape(o, cg, -1).sum(axis=2), per_out)
    if node.op in ("MatMul", "FusedMatMul"):
        if delta.ndim != 2 or mean.shape[0] != delta.shape[0]:
            return None
        return mean @ delta
    if node.op == "Gemm":
        d = delta.T if int(node.attrs.get("transB", 0)) else delta
        if mean.shape[0] != d.shape[0]:
            return None
        return float(node.attrs.get("alpha", 1.0)) * (mean @ d)
    return None


def _apply_bias(graph: gs.Graph, node: gs.Node, shift: np.ndarray) -> bool:
    """Subtract ``shift`` from the node's bias (creating one for Conv/Gemm); False if it cannot."""
    shift = shift.astype(np.float32)
    name = f"{node.name}/bias_corrected"
    idx = qp.BIAS_INPUT.get(node.op)
    if idx is not None and len(node.inputs) > idx and node.inputs[idx] is not None and node.inputs[idx].name:
        b = node.inputs[idx]
        if not isinstance(b, gs.Constant):
            return False
        vals = np.asarray(b.values, dtype=np.float32)
        beta = float(node.attrs.get("beta", 1.0)) if node.op == "Gemm" else 1.0
        if vals.size not in (1, shift.size) or beta == 0:
            return False
        new = np.broadcast_to(vals.reshape(-1), shift.shape) - shift / beta
        shape = vals.shape if vals.size == shift.size else shift.shape
        node.inputs[idx] = gs.Constant(name, new.reshape(shape).astype(np.float32))
        return True
    if node.op in ("Conv", "Gemm") and len(node.inputs) == 2:
        bias = -shift / (float(node.attrs.get("beta", 1.0)) if node.op == "Gemm" else 1.0)
        node.inputs.append(gs.Constant(name, bias.astype(np.float32)))
        return True
    if node.op == "MatMul" and len(node.outputs[0].outputs) == 1:
        add = node.outputs[0].outputs[0]
        if add.op == "Add":
            other = [t for t in add.inputs if t is not node.outputs[0]]
            if len(other) == 1 and isinstance(other[0], gs.Constant) and other[0].values.size == shift.size:
                vals = np.asarray(other[0].values, dtype=np.float32)
                add.inputs[add.inputs.index(other[0])] = gs.Constant(name, (vals.reshape(-1) - shift).reshape(vals.shape))
                return True
    return False


def _qdq_pair(base: str, t: gs.Tensor, scale, zp, dtype: str, nodes: list, axis: int | None = None) -> gs.Variable:
    """QuantizeLinear -> DequantizeLinear of ``t`` at ``dtype`` (the zero point's numpy type is the
    storage type; vectors and ``axis``: one scale per slice along the axis); returns the
    dequantized tensor."""
    np_type = np.asarray(zp).dtype.type
    sc = gs.Constant(f"{base}__scale", np.array(scale, dtype=np.float32))
    z = gs.Constant(f"{base}__zero_point", np.array(zp, dtype=np_type))
    q = gs.Variable(f"{base}__q{dtype[3:]}", dtype=np_type, shape=t.shape)
    dq = gs.Variable(f"{base}__dq", dtype=np.float32, shape=t.shape)
    attrs = {} if axis is None else {"axis": int(axis)}
    nodes.append(gs.Node("QuantizeLinear", name=f"{base}/QuantizeLinear", inputs=[t, sc, z], outputs=[q], attrs=dict(attrs)))
    nodes.append(gs.Node("DequantizeLinear", name=f"{base}/DequantizeLinear", inputs=[q, sc, z], outputs=[dq],
                         attrs=dict(attrs)))
    return dq


def _qdq(graph: gs.Graph, t: gs.Tensor, scale, zp, axis: int | None, dtype: str, skip: set[str],
         nodes: list) -> gs.Variable | None:
    """Insert QuantizeLinear -> DequantizeLinear (``dtype``) after ``t``; consumers (not ``skip``)
    read the dequantized tensor, which is returned. A graph output keeps its name on it."""
    consumers = [c for c in t.outputs if c.name not in skip]
    is_output = t in graph.outputs
    if not consumers and not is_output:
        return None
    base = t.name
    dq = _qdq_pair(base, t, scale, zp, dtype, nodes, axis)
    for c in consumers:
        for i, x in enumerate(c.inputs):
            if x is t:
                c.inputs[i] = dq
    if is_output:
        t.name = f"{base}__float"
        dq.name = base
        graph.outputs[graph.outputs.index(t)] = dq
    return dq


def _alias_root(t: gs.Tensor) -> gs.Tensor:
    """``t``, or the tensor it is a view of through alias ops (Reshape ...)."""
    while t.inputs and t.inputs[0].op in qp.ALIAS_OPS and t.inputs[0].inputs:
        t = t.inputs[0].inputs[0]
    return t


def _convert(node: gs.Node, dq: gs.Variable, scale, zp, axis: int | None, dtype: str, cache: dict, nodes: list) -> bool:
    """Rewire every input of ``node`` that reads ``dq`` (directly or through alias ops) to its
    requantisation at ``dtype`` (one per tensor and type, shared)."""
    changed = False
    for i, x in enumerate(node.inputs):
        if x is None or isinstance(x, gs.Constant) or _alias_root(x) is not dq:
            continue
        key = (x.name, dtype)
        if key not in cache:
            cache[key] = _qdq_pair(f"{x.name}__to_{dtype}", x, scale, zp, dtype, nodes, axis)
        node.inputs[i] = cache[key]
        changed = True
    return changed


def apply_qdq(graph: gs.Graph, plan: qp.QdqPlan, ranges: dict[str, tuple[float, float]],
              means: dict[str, np.ndarray], policy: qp.QuantPolicy, headroom: dict[str, float] | None = None,
              exact: set[str] = frozenset(), weight_cache: dict | None = None) -> dict:
    """Rewrite ``graph`` in place: INT8 weights, INT16/INT8 Q/DQ activations and their conversions,
    bias correction. ``ranges`` are the calibrated ranges of ``plan.calibrated``, widened by
    ``headroom[type]`` (except the ``exact`` ones). ``weight_cache`` (weight name -> quantized
    weight) lets builds of several plans of one graph quantize each weight once."""
    headroom = headroom or {}
    by_name = {n.name: n for n in graph.nodes}
    new_nodes: list[gs.Node] = []
    done: dict[str, tuple[gs.Variable, np.ndarray]] = {}
    corrected = skipped = 0
    for node_name, idx, axis in plan.weights:
        node = by_name[node_name]
        w = node.inputs[idx]
        if w.name not in done:
            key = (w.name, axis)
            if weight_cache is not None and key in weight_cache:
                q, scale, wf = weight_cache[key]
            else:
                wf = np.asarray(w.values, dtype=np.float32)
                q, scale = quantize_weight(wf, axis)
                if weight_cache is not None:
                    weight_cache[key] = (q, scale, wf)
            base = w.name
            dq = gs.Variable(f"{base}__dq", dtype=np.float32, shape=list(wf.shape))
            new_nodes.append(gs.Node(
                "DequantizeLinear", name=f"{base}/DequantizeLinear", attrs={"axis": int(axis)},
                inputs=[gs.Constant(f"{base}__int8", q), gs.Constant(f"{base}__scale", scale),
                        gs.Constant(f"{base}__zero_point", np.zeros(scale.shape, dtype=np.int8))],
                outputs=[dq]))
            delta = dequantize_weight(q, scale, axis) - wf if policy.bias_correction else None
            done[w.name] = (dq, delta)
        dq, delta = done[w.name]
        node.inputs[idx] = dq
        x = plan.bias_inputs.get(node_name)
        if delta is not None and x in means:
            shift = bias_shift(node, delta, np.asarray(means[x], dtype=np.float32))
            if shift is not None and np.any(shift):
                if _apply_bias(graph, node, shift):
                    corrected += 1
                else:
                    skipped += 1
    done.clear()
    release_memory()

    tensors = graph.tensors()
    segmented = concat_segments(graph, plan, ranges) if policy.rule("concat-segments") else {}

    def one(root: str, dtype: str) -> tuple[float, np.generic]:
        if root not in ranges and root in tensors:
            # a view (Reshape ...) stored in its own right by this plan: its source's range, the same values
            src = _alias_root(tensors[root]).name
            root = plan.inherits.get(src, src)
        lo, hi = ranges[root]
        h = 1.0 if root in exact else headroom.get(dtype, 1.0)
        symmetric = policy.activation_symmetric if dtype == "int16" else policy.int8_symmetric
        return activation_qparams(lo * h, hi * h, symmetric, dtype)

    def qparams(name: str, dtype: str) -> tuple:
        """(scale, zero point, axis) of tensor ``name`` at ``dtype``: its scale root's range, or one
        scale per concatenated input (``concat-segments``)."""
        root = plan.inherits.get(name, name)
        if root in segmented:
            root = name   # a per-axis source: its reader's own range (calibrated for every stored tensor)
        if name in segmented:
            axis, parts = segmented[name]
            params = [(one(src, dtype), size) for src, size in parts]
            scale = np.concatenate([np.full(size, sc, np.float32) for (sc, _), size in params])
            zp = np.concatenate([np.full(size, z, np.asarray(z).dtype) for (_, z), size in params])
            return scale, zp, axis
        return (*one(root, dtype), None)

    dqs: dict[str, gs.Variable] = {}
    for name, dtype in plan.storage.items():
        dq = _qdq(graph, tensors[name], *qparams(name, dtype), dtype, plan.fp32_readers, new_nodes)
        if dq is not None:
            dqs[name] = dq
    cache: dict = {}
    converted = 0
    for name, by_type in plan.conversions.items():
        if name not in dqs:
            continue
        for dtype, readers in by_type.items():
            params = qparams(name, dtype)
            for r in readers:
                converted += _convert(by_name[r], dqs[name], *params, dtype, cache, new_nodes)
    graph.nodes.extend(new_nodes)
    graph.toposort()
    return {"bias_corrected_layers": corrected, "bias_correction_skipped": skipped, "conversions": len(cache),
            **({"concat_segments": sorted(segmented)} if segmented else {})}


def concat_segments(graph: gs.Graph, plan: qp.QdqPlan, ranges: dict[str, tuple[float, float]]) -> dict:
    """Stored Concat outputs whose inputs' ranges differ by more than
    :data:`~edgefc.passes.quant_policy.SEGMENT_RATIO`: tensor -> (axis, [(input's range root, size
    along the axis)]) (rule ``concat-segments``)."""
    out = {}
    tensors = graph.tensors()
    for name in plan.storage:
        t = tensors.get(name)
        node = t.inputs[0] if t is not None and t.inputs else None
        if node is None or node.op != "Concat" or len(node.inputs) < 2 or t.shape is None:
            continue
        rank = len(t.shape)
        axis = int(node.attrs.get("axis", 0)) % max(rank, 1)
        parts = []
        for x in node.inputs:
            root = _alias_root(x).name if isinstance(x, gs.Variable) else None
            root = plan.inherits.get(root, root)
            shape = x.shape
            if root not in ranges or shape is None or len(shape) != rank or not isinstance(shape[axis], (int, np.integer)):
                parts = None
                break
            parts.append((root, int(shape[axis])))
        if not parts:
            continue
        amax = [max(abs(ranges[r][0]), abs(ranges[r][1])) for r, _ in parts]
        if min(amax) > 0 and max(amax) / min(amax) > qp.SEGMENT_RATIO:
            out[name] = (axis, parts)
    return out


def apply_plan(graph: gs.Graph, plan: qp.PrecisionPlan, qplan: qp.QdqPlan, ranges: dict[str, tuple[float, float]],
               means: dict[str, np.ndarray], policy: qp.QuantPolicy, headroom: dict[str, float] | None = None,
               exact: set[str] = frozenset(), weight_cache: dict | None = None,
               defer: Callable[[gs.Node], bool] | None = None) -> dict:
    """Build ``plan`` into ``graph`` in place: the integer ops as Q/DQ (:func:`apply_qdq`), then the
    FP16 ops (:func:`edgefc.passes.fp16.convert_fp16` on them alone: FP16 weights, Casts in and out,
    priced as conversions), and the softmax internals of attention blocks the policy keeps wider
    (``edgefc.scores``), their normalisation deferred with the policy's ``deferred_normalization``
    where ``defer(node)`` says it pays (:func:`edgefc.passes.mlt.deferral_pays`;
    :func:`edgefc.passes.tiled_attention.defer_normalization`). Returns the rewrite's counts."""
    counts = apply_qdq(graph, qplan, ranges, means, policy, headroom, exact, weight_cache)
    fp16_ops = {n for n, p in plan.ops.items() if p == "fp16"}
    if fp16_ops:
        others = {n.name: "not fp16 in the plan" for n in graph.nodes if n.name not in fp16_ops}
        fp16_counts = convert_fp16(graph, others)
        counts["fp16_ops"] = len(fp16_ops)
        counts["fp16_casts"] = int(fp16_counts.get("casts", 0))
    deferred = False
    for node in graph.nodes:
        if node.name in plan.scores:
            pr.metadata(node)[pr.SCORES_KEY] = plan.scores[node.name]
            if policy.deferred_normalization and defer is not None and defer(node):
                deferred |= defer_normalization(node) is None
    if deferred:
        ensure_functions(graph)
    counts["op_precisions"] = record_precisions(graph, {n for n, p in plan.ops.items() if p == "fp32"})
    return counts


#: ops that convert between precisions (no precision of their own).
CONVERSION_OPS = pr.QDQ_OPS | {"Cast", "CastLike"}


def record_precisions(graph: gs.Graph, fp32_nodes: set[str]) -> dict[str, int]:
    """Write the precision of every op onto it (:func:`edgefc.precision.set_op_precision`): FP32
    for ``fp32_nodes`` (kept by the policy), else the precision its operands are stored at
    (weights and activation inputs, after the rewrite); conversions (Cast, Q/DQ) and ops without
    float operands get none. Returns the count per precision."""
    types = DeployedTypes(graph)
    counts: dict[str, int] = {}
    for node in graph.nodes:
        if node.op in CONVERSION_OPS:
            continue
        p = pr.operand_precision(types.operand_types(node))
        if p is not None and node.name in fp32_nodes:
            p = "fp32"
        pr.set_op_precision(node, p)
        if p is not None:
            counts[p] = counts.get(p, 0) + 1
    return dict(sorted(counts.items()))
