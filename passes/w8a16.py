"""The W8A16 rewrite of pass ``quantize``: INT8 weights, INT16 activations (paper Sec. 2.3 / 4.2).

INT8 per-output-channel symmetric weights (``DequantizeLinear`` with ``axis`` from an int8
initializer) for the layers the plan names, a ``QuantizeLinear -> DequantizeLinear`` pair (int16,
per tensor, symmetric by default; opset-21+ semantics, run by onnxruntime) after every other float
activation the plan quantizes, and biases corrected for the expected shift the weight rounding
causes (``b -= (W_q - W) . E[x]`` with E[x] the calibration mean of each input channel: "bias
correction", Nagel et al. 2019). What to quantize is decided by :mod:`edgefc.passes.quant_policy`.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_graphsurgeon as gs

from edgefc.errors import QuantizationError
from edgefc.memory import release_memory
from edgefc.passes import quant_policy as qp


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


def activation_qparams(lo: float, hi: float, symmetric: bool) -> tuple[float, int]:
    """INT16 (scale, zero point) for a calibrated range."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise QuantizationError("calibration produced a non-finite activation range (NaN/Inf in the model's outputs)")
    if symmetric:
        a = max(-lo, hi)
        return (a / qp.INT16_MAX if a > 0 else 1.0 / qp.INT16_MAX), 0
    if hi - lo <= 0:
        return 1.0 / qp.INT16_MAX, 0
    scale = (hi - lo) / 65535.0
    zp = int(np.clip(np.rint(-32768 - lo / scale), -32768, 32767))
    return scale, zp


def mean_axes(node: gs.Node, x: gs.Tensor) -> tuple[int, ...] | None:
    rank = len(x.shape or ())
    if node.op in ("Conv", "FusedConv") and rank >= 3:
        return tuple(i for i in range(rank) if i != 1)
    if node.op in ("MatMul", "FusedMatMul") and rank >= 2:
        return tuple(range(rank - 1))
    if node.op == "Gemm" and rank == 2 and not int(node.attrs.get("transA", 0)):
        return (0,)
    return None


def _bias_shift(node: gs.Node, delta: np.ndarray, mean: np.ndarray) -> np.ndarray | None:
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


def _qdq(graph: gs.Graph, t: gs.Tensor, scale: float, zp: int, skip: set[str], nodes: list) -> None:
    """Insert QuantizeLinear -> DequantizeLinear (int16) after ``t``; consumers (not ``skip``) read
    the dequantized tensor. A graph output keeps its name on the dequantized tensor."""
    consumers = [c for c in t.outputs if c.name not in skip]
    is_output = t in graph.outputs
    if not consumers and not is_output:
        return
    base = t.name
    sc = gs.Constant(f"{base}__scale", np.array(scale, dtype=np.float32))
    z = gs.Constant(f"{base}__zero_point", np.array(zp, dtype=np.int16))
    q = gs.Variable(f"{base}__q16", dtype=np.int16, shape=t.shape)
    dq = gs.Variable(f"{base}__dq", dtype=np.float32, shape=t.shape)
    nodes.append(gs.Node("QuantizeLinear", name=f"{base}/QuantizeLinear", inputs=[t, sc, z], outputs=[q]))
    nodes.append(gs.Node("DequantizeLinear", name=f"{base}/DequantizeLinear", inputs=[q, sc, z], outputs=[dq]))
    for c in consumers:
        for i, x in enumerate(c.inputs):
            if x is t:
                c.inputs[i] = dq
    if is_output:
        t.name = f"{base}__float"
        dq.name = base
        graph.outputs[graph.outputs.index(t)] = dq


def apply_w8a16(graph: gs.Graph, plan: qp.W8A16Plan, ranges: dict[str, tuple[float, float]],
                means: dict[str, np.ndarray], policy: qp.QuantPolicy) -> dict:
    """Rewrite ``graph`` in place: INT8 weights, INT16 Q/DQ activations, bias correction."""
    by_name = {n.name: n for n in graph.nodes}
    new_nodes: list[gs.Node] = []
    done: dict[str, tuple[gs.Variable, np.ndarray]] = {}
    corrected = skipped = 0
    for node_name, idx, axis in plan.weights:
        node = by_name[node_name]
        w = node.inputs[idx]
        wf = np.asarray(w.values, dtype=np.float32)
        if w.name not in done:
            q, scale = quantize_weight(wf, axis)
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
            shift = _bias_shift(node, delta, np.asarray(means[x], dtype=np.float32))
            if shift is not None and np.any(shift):
                if _apply_bias(graph, node, shift):
                    corrected += 1
                else:
                    skipped += 1
    done.clear()
    release_memory()
    tensors = graph.tensors()
    for name in plan.quantized:
        root = plan.inherits.get(name, name)
        scale, zp = activation_qparams(*ranges[root], policy.activation_symmetric)
        _qdq(graph, tensors[name], scale, zp, plan.kept_nodes, new_nodes)
    graph.nodes.extend(new_nodes)
    graph.toposort()
    return {"bias_corrected_layers": corrected, "bias_correction_skipped": skipped}
