"""Pass ``quantize``: mixed-precision post-training quantization (EdgeFusion, paper Sec. 2.3 / 4.2).

The paper deploys the text encoder and the VAE decoder with FP16 weights and activations and
the U-Net with INT8 weights and INT16 activations (W8A16), with "no performance degradation
after applying the W8A16 quantization". This pass does that to a canonicalized (and usually
fused) graph, checks the result against the FP32 graph in onnxruntime, and reports how close it is.

Options (``edgefc compile`` flags -> ``ctx.options``):
  ``precision``      ``auto`` (default: FP16 for the text encoder and VAE decoder, W8A16 for the
                     U-Net; FP32 - nothing to do - for a model that is none of them), ``fp32``,
                     ``fp16``, ``w8a16``;
  ``component``      ``text-encoder`` | ``unet`` | ``vae-decoder``; by default detected from the
                     input names (sample+timestep+encoder_hidden_states, input_ids, latent_sample);
  ``calib``          a ``.npz`` of calibration inputs (else generated per component);
  ``calib_method``   ``minmax`` (default) | ``percentile`` | ``mse`` (activation ranges);
  ``calib_samples``  how many calibration inputs (default per component, see calibration.py);
  ``keep_fp32``      node-name globs / ``re:`` regexes / op types kept in FP32 (repeatable);
  ``eval_samples``   held-out inputs for the SQNR (0 skips the check);
  Python API only: ``quant_policy`` (a :class:`~edgefc.passes.quant_policy.QuantPolicy`),
  ``calib_percentile`` (default 99.999), ``calib_chunk_mb`` (histogram chunk size, 512).

Matches: every node. Emits, for **W8A16**: INT8 per-output-channel symmetric weights
(``DequantizeLinear`` with ``axis`` from an int8 initializer) for Conv/ConvTranspose/Gemm/MatMul
and edgefc FusedConv/FusedMatMul (so every Attention projection), and a
``QuantizeLinear -> DequantizeLinear`` pair (int16, per tensor, symmetric by default; opset-21+
semantics, run by onnxruntime) after every other float activation, except the regions the
policy keeps in FP32 (:mod:`edgefc.passes.quant_policy`). Biases are corrected for the expected
shift the weight rounding causes (``b -= (W_q - W) . E[x]`` with E[x] the calibration mean of each
input channel: "bias correction", Nagel et al. 2019). For **FP16**: :mod:`edgefc.passes.fp16`.

Report (``ctx.report["quantization"]``): ``precision``, ``component``, the calibration used,
``dtypes`` (per-tensor deployed types: counts and bytes of weights and activations), what was
kept in higher precision and why, ``sqnr_db`` (whole model: mean over the held-out inputs of
10 log10(sum ref^2 / sum (ref - out)^2) over all float outputs), ``sqnr_db_per_input``,
``cosine`` (mean; ``cosine_per_input``), and ``worst_layers``: the ten layers with the lowest
per-layer SQNR - each layer run in its deployed precision on the FP32 model's own activations
(its quantized inputs, weights and output), so each figure is that layer's own error, summed over
the first two held-out inputs (these probes double the reference's compute). Held-out inputs come
from the calibration generator with another seed (U-Net: timesteps evenly spanning 0..999).

Memory: the pass never holds the model twice in Python. The FP32 graph and the deployed graph are
each written once to a temporary folder with external data (``calibration.DiskModel``);
onnxruntime reads them from there (models over 2 GB work), calibration reduces every activation to
a few numbers inside onnxruntime, and the per-layer probes are ordered so onnxruntime frees each
probed tensor at once. Full-size BK-SDM-Tiny U-Net: the whole default compile peaks at ~5 GB.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
import time
from collections import Counter, defaultdict

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper

from edgefc.errors import QuantizationError
from edgefc.pass_base import Pass, PassContext
from edgefc.passes import calibration as cal
from edgefc.passes import fp16 as fp16_mod
from edgefc.passes import quant_policy as qp
from edgefc.registry import register_pass

WORST_LAYERS = 10


# --- options ------------------------------------------------------------------------------------

def _options(ctx: PassContext) -> dict:
    o = ctx.options
    precision = (o.get("precision") or "auto").lower()
    if precision not in qp.PRECISIONS:
        raise QuantizationError(f"unknown precision '{precision}' (choose from {', '.join(qp.PRECISIONS)})")
    component = o.get("component")
    if component is not None and component not in qp.COMPONENTS:
        raise QuantizationError(f"unknown component '{component}' (choose from {', '.join(qp.COMPONENTS)})")
    method = (o.get("calib_method") or "minmax").lower()
    if method not in cal.METHODS:
        raise QuantizationError(f"unknown calibration method '{method}' (choose from {', '.join(cal.METHODS)})")
    samples = o.get("calib_samples")
    if samples is not None and int(samples) < 1:
        raise QuantizationError(f"--calib-samples must be at least 1 (got {samples})")
    evals = o.get("eval_samples")
    if evals is not None and int(evals) < 0:
        raise QuantizationError(f"--eval-samples must be 0 or more (got {evals})")
    keep = o.get("keep_fp32") or ()
    if isinstance(keep, str):
        keep = [keep]
    policy = o.get("quant_policy")
    if policy is None:
        policy = qp.QuantPolicy(keep_fp32=list(keep))
    elif isinstance(policy, dict):
        policy = qp.QuantPolicy(**{"keep_fp32": list(keep), **policy})
    elif keep:
        policy = dataclasses.replace(policy, keep_fp32=list(policy.keep_fp32) + list(keep))
    percentile = float(o.get("calib_percentile") or 99.999)
    if not 50.0 < percentile <= 100.0:
        raise QuantizationError(f"calib_percentile must be in (50, 100] (got {percentile})")
    return {
        "precision": precision, "component": component, "calib": o.get("calib"), "method": method,
        "samples": None if samples is None else int(samples), "eval": None if evals is None else int(evals),
        "policy": policy, "percentile": percentile,
        "chunk_bytes": int(float(o.get("calib_chunk_mb") or 512) * (1 << 20)),
        "progress": bool(o.get("progress", True)),
    }


# --- W8A16 --------------------------------------------------------------------------------------

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


def _mean_axes(node: gs.Node, x: gs.Tensor) -> tuple[int, ...] | None:
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
    weight_elems = 0
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
            weight_elems += wf.size
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
    cal.release_memory()
    tensors = graph.tensors()
    for name in plan.quantized:
        root = plan.inherits.get(name, name)
        scale, zp = activation_qparams(*ranges[root], policy.activation_symmetric)
        _qdq(graph, tensors[name], scale, zp, plan.kept_nodes, new_nodes)
    graph.nodes.extend(new_nodes)
    graph.toposort()
    return {"bias_corrected_layers": corrected, "bias_correction_skipped": skipped}


# --- report helpers -----------------------------------------------------------------------------

_NP_NAME = {np.dtype(np.float32): "float32", np.dtype(np.float16): "float16", np.dtype(np.int8): "int8",
            np.dtype(np.int16): "int16", np.dtype(np.int32): "int32", np.dtype(np.int64): "int64"}


def dtype_summary(graph: gs.Graph) -> dict:
    """Deployed type of every weight and activation: {"weights"|"activations": {dtype: {tensors, bytes}}}.

    A weight is a constant with more than one element (a DequantizeLinear input counts at its
    integer type); an activation is a model input or the output of a node other than an alias,
    Q/DQ or Cast, at the type it is stored in (int16 when it feeds a QuantizeLinear)."""
    out = {"weights": defaultdict(lambda: [0, 0]), "activations": defaultdict(lambda: [0, 0])}
    skip_ops = qp.ALIAS_OPS | {"QuantizeLinear", "DequantizeLinear", "Cast"}
    seen = set()
    for node in graph.nodes:
        for t in node.inputs:
            if isinstance(t, gs.Constant) and t.name not in seen and t.values.size > 1:
                seen.add(t.name)
                dt = np.dtype(t.dtype)
                out["weights"][_NP_NAME.get(dt, dt.name)][0] += 1
                out["weights"][_NP_NAME.get(dt, dt.name)][1] += int(t.values.nbytes)
    acts = list(graph.inputs) + [t for n in graph.nodes if n.op not in skip_ops for t in n.outputs]
    for t in acts:
        if t.dtype is None or t.name in seen:
            continue
        seen.add(t.name)
        dt = np.dtype(t.dtype)
        if not np.issubdtype(dt, np.floating):
            continue
        q = [c for c in t.outputs if c.op == "QuantizeLinear"]
        if q:
            dt = np.dtype(q[0].outputs[0].dtype)
        n = int(np.prod(t.shape)) if t.shape is not None and all(isinstance(d, (int, np.integer)) for d in t.shape) else 0
        key = _NP_NAME.get(dt, dt.name)
        out["activations"][key][0] += 1
        out["activations"][key][1] += n * dt.itemsize
    return {k: {d: {"tensors": c, "bytes": b} for d, (c, b) in sorted(v.items())} for k, v in out.items()}


def sqnr_db(ref: np.ndarray, out: np.ndarray) -> float:
    ref = np.asarray(ref, dtype=np.float64)
    noise = float(np.sum((ref - np.asarray(out, dtype=np.float64)) ** 2))
    signal = float(np.sum(ref ** 2))
    if noise == 0:
        return math.inf
    return 10 * math.log10(signal / noise) if signal > 0 else -math.inf


def _finite(x: float) -> float | None:
    return round(float(x), 3) if math.isfinite(x) else (999.0 if x > 0 else None)


# --- evaluation ---------------------------------------------------------------------------------

def _layer_clones(ref: cal.DiskModel, dep: cal.DiskModel, aliases: dict[str, str]):
    """Per-layer error probes for the reference model: each deployed compute node cloned with
    its inputs in deployed precision computed from the reference activations, and
    ReduceSumSquare of (clone - reference) and of the reference. Returns (nodes, initializers,
    layers [(layer, op, err output, signal output)])."""
    ref_names = set(ref.producers) | set(ref.input_names) | set(ref.initializers)
    dep_prod = dep.producers
    F16 = onnx.TensorProto.FLOAT16
    nodes, inits, layers = [], {}, []
    cache: dict[str, str] = {}

    def ref_name(name: str) -> str:
        return aliases.get(name, name)

    def need_init(name: str) -> str:
        if name in ref.initializers and name in dep.initializers:
            return name
        if name not in inits:
            inits[name] = dep.initializers[name]
        return name

    def mapped(name: str) -> tuple[str, bool]:
        """Reference-side name for the deployed tensor ``name`` and whether it differs from ref."""
        if name in cache:
            return cache[name], True
        if name in dep.initializers:
            return need_init(name), name not in ref.initializers
        p = dep_prod.get(name)
        if p is None:  # model input
            return name, False
        if p.op_type in ("DequantizeLinear", "QuantizeLinear", "Cast") and p.input and p.input[0]:
            ins = []
            for i, x in enumerate(p.input):
                if not x:
                    ins.append(x)
                elif i == 0:
                    ins.append(mapped(x)[0])
                else:
                    ins.append(need_init(x) if x in dep.initializers else mapped(x)[0])
            out = f"__eval/{name}"
            clone = onnx.NodeProto()
            clone.CopyFrom(p)
            clone.name = f"__eval/{p.name}"
            del clone.input[:]
            clone.input.extend(ins)
            del clone.output[:]
            clone.output.append(out)
            nodes.append(clone)
            cache[name] = out
            return out, True
        r = ref_name(name)
        if r not in ref_names:
            return r, False
        if dep.value_types.get(name) == F16 and ref.value_types.get(r, onnx.TensorProto.FLOAT) != F16:
            out = f"__eval/{name}__fp16"
            nodes.append(helper.make_node("Cast", [r], [out], name=f"__eval/{name}/cast16", to=F16))
            cache[name] = out
            return out, True
        return r, False

    skip = qp.DATA_MOVEMENT_OPS
    first_input_of = defaultdict(list)
    for n in dep.proto.graph.node:
        if n.input:
            first_input_of[n.input[0]].append(n)
    for p in dep.proto.graph.node:
        if p.op_type in skip or p.domain not in ("", "ai.onnx", "edgefc") or any(a.type == onnx.AttributeProto.GRAPH for a in p.attribute):
            continue
        if not p.output or not p.output[0]:
            continue
        target = ref_name(p.output[0])
        if target not in ref.producers:
            continue
        ins, differs = [], False
        for x in p.input:
            if not x:
                ins.append(x)
                continue
            m, d = mapped(x)
            ins.append(m)
            differs |= d
        if not differs:
            continue
        clone = onnx.NodeProto()
        clone.CopyFrom(p)
        clone.name = f"__eval/{p.name}"
        del clone.input[:]
        clone.input.extend(ins)
        outs = [f"__eval/{o}/clone" if o else "" for o in p.output]
        del clone.output[:]
        clone.output.extend(outs)
        nodes.append(clone)
        y = outs[0]
        # the output's own rounding: the Q/DQ (or Cast) that follows it in the deployed graph
        q = next((n for n in first_input_of.get(p.output[0], []) if n.op_type == "QuantizeLinear"), None)
        if q is not None:
            dq = next((n for n in first_input_of.get(q.output[0], []) if n.op_type == "DequantizeLinear"), None)
            if dq is not None:
                qo, do = f"{y}/q", f"{y}/dq"
                nodes.append(helper.make_node("QuantizeLinear", [y, need_init(q.input[1]), need_init(q.input[2])], [qo], name=f"{clone.name}/q"))
                nodes.append(helper.make_node("DequantizeLinear", [qo, need_init(dq.input[1]), need_init(dq.input[2])], [do], name=f"{clone.name}/dq"))
                y = do
        if dep.value_types.get(p.output[0]) == F16:
            nodes.append(helper.make_node("Cast", [y], [f"{y}/f32"], name=f"{clone.name}/f32", to=onnx.TensorProto.FLOAT))
            y = f"{y}/f32"
        diff = f"{y}/diff"
        err, sig = f"__eval/{p.name}::err", f"__eval/{p.name}::sig"
        nodes.append(helper.make_node("Sub", [y, target], [diff], name=f"{clone.name}/sub"))
        nodes.append(helper.make_node("ReduceSumSquare", [diff], [err], name=f"{clone.name}/err", keepdims=0))
        nodes.append(helper.make_node("ReduceSumSquare", [target], [sig], name=f"{clone.name}/sig", keepdims=0))
        layers.append((p.name, p.op_type, err, sig))
    return nodes, list(inits.values()), layers


def evaluate(ref: cal.DiskModel, dep: cal.DiskModel, aliases: dict[str, str], heldout: list[dict],
             progress: bool = True, layer_samples: int = 2) -> dict:
    """SQNR / cosine of the deployed model vs the reference on ``heldout``, and per-layer SQNR on
    the first ``layer_samples`` of them (the probes double the reference's compute)."""
    start = time.perf_counter()
    nodes, inits, layers = _layer_clones(ref, dep, aliases)
    outputs = [o for o in ref.output_names]
    probe = [x for _, _, e, s in layers for x in (e, s)]
    err = np.zeros(len(layers))
    sig = np.zeros(len(layers))
    refs = []
    k = max(0, min(layer_samples, len(heldout)))
    if k and layers:
        path = ref.variant("eval-reference", nodes, outputs + probe, inits)
        sess = ref.session(path)
        names = outputs + probe
        for feeds in cal._progress(heldout[:k], "evaluating (fp32 + per-layer)", k, progress):
            vals = sess.run(names, feeds)
            refs.append(vals[:len(outputs)])
            probe_vals = vals[len(outputs):]
            err += np.array([float(v) for v in probe_vals[0::2]])
            sig += np.array([float(v) for v in probe_vals[1::2]])
            del vals, probe_vals
        del sess
        cal.release_memory()
    else:
        k = 0
    if k < len(heldout):
        sess = ref.session()
        for feeds in cal._progress(heldout[k:], "evaluating (fp32)", len(heldout) - k, progress):
            refs.append(sess.run(outputs, feeds))
        del sess
    cal.release_memory()
    sess = dep.session()
    dep_out = [o.name for o in sess.get_outputs()]
    order = [dep_out.index(o) for o in outputs]
    per_input, cosines = [], []
    for feeds, r in zip(cal._progress(heldout, "evaluating (deployed)", len(heldout), progress), refs):
        vals = sess.run(dep_out, feeds)
        got = [vals[i] for i in order]
        rf = [np.asarray(a, dtype=np.float64).ravel() for a, g in zip(r, got) if np.issubdtype(np.asarray(a).dtype, np.floating)]
        gf = [np.asarray(g, dtype=np.float64).ravel() for a, g in zip(r, got) if np.issubdtype(np.asarray(a).dtype, np.floating)]
        rv, gv = np.concatenate(rf), np.concatenate(gf)
        if not np.all(np.isfinite(gv)):
            raise QuantizationError("the quantized model produces NaN/Inf on a held-out input; keep the offending "
                                    "layers in FP32 with --keep-fp32 (see worst layers with --eval-samples 1)")
        per_input.append(sqnr_db(rv, gv))
        denom = float(np.linalg.norm(rv) * np.linalg.norm(gv))
        cosines.append(float(rv @ gv) / denom if denom > 0 else 1.0)
    del sess
    layer_sqnr = []
    for (name, op, _, _), e, s in zip(layers, err, sig):
        v = 10 * math.log10(s / e) if e > 0 and s > 0 else (math.inf if e == 0 else -math.inf)
        layer_sqnr.append((v, name, op))
    layer_sqnr.sort(key=lambda x: x[0])
    return {
        "sqnr_db": _finite(float(np.mean(per_input))),
        "sqnr_db_per_input": [_finite(v) for v in per_input],
        "sqnr_db_worst_input": _finite(float(np.min(per_input))),
        "cosine": round(float(np.mean(cosines)), 7),
        "cosine_per_input": [round(c, 7) for c in cosines],
        "worst_layers": [{"layer": n, "op": op, "sqnr_db": _finite(v)} for v, n, op in layer_sqnr[:WORST_LAYERS]],
        "layers_checked": len(layers),
        "layer_sqnr_inputs": k,
        "eval_seconds": round(time.perf_counter() - start, 2),
    }


# --- the pass -----------------------------------------------------------------------------------

def _unique_names(graph: gs.Graph) -> None:
    seen = Counter()
    for i, n in enumerate(graph.nodes):
        if not n.name:
            n.name = f"{n.op}_{i}"
        seen[n.name] += 1
        if seen[n.name] > 1:
            n.name = f"{n.name}__{seen[n.name] - 1}"


def _disconnect_removed_nodes(graph: gs.Graph) -> None:
    live = {id(n) for n in graph.nodes}
    for t in graph.tensors().values():
        if isinstance(t, gs.Constant):
            t.values  # noqa: B018  (loads and caches the array, releasing the lazy proto reference)
        # nodes removed by earlier rewrites that still read or write a live tensor keep the whole
        # removed subgraph (and the Constant nodes of the original import, with their proto) reachable
        for dead in [n for n in t.outputs if id(n) not in live]:
            while t in dead.inputs:
                dead.inputs.remove(t)
        for dead in [n for n in t.inputs if id(n) not in live]:
            while t in dead.outputs:
                dead.outputs.remove(t)


def _detach_from_proto(graph: gs.Graph) -> None:
    """Load every constant's values and drop the graph's references into the ModelProto it was
    imported from, so the proto - every weight's bytes, 1.3 GB for the U-Net - is freed next to
    the numpy copies: graphsurgeon keeps the proto's ``opset_import`` container, and nodes that
    earlier rewrites removed without disconnecting still hang off live tensors."""
    _disconnect_removed_nodes(graph)  # in its own frame: no local keeps a removed node alive
    for obj in [graph, *graph.functions]:
        domains = getattr(obj, "import_domains", None)
        if domains is not None and not isinstance(domains, list):
            obj.import_domains = [helper.make_opsetid(d.domain, d.version) for d in domains]
    cal.release_memory()


def _summarise_kept(kept: dict[str, str], limit: int = 8) -> dict:
    by_rule = defaultdict(list)
    for name, reason in kept.items():
        by_rule[reason.split(":")[0]].append(name)
    return {rule: {"count": len(names), "examples": names[:limit]} for rule, names in sorted(by_rule.items())}


@register_pass("quantize", namespace="edgefc")
class Quantize(Pass):
    """Mixed-precision PTQ: W8A16 U-Net, FP16 text encoder and VAE decoder, checked against FP32 (paper Sec. 2.3/4.2)."""

    verify_tolerance = 0.1

    def run(self, graph: gs.Graph, ctx: PassContext) -> gs.Graph:
        opts = _options(ctx)
        detected = cal.detect_component(t.name for t in graph.inputs)
        component = opts["component"] or detected
        precision = qp.resolve_precision(opts["precision"], component)
        report: dict = {"precision": precision, "requested": opts["precision"], "component": component,
                        "component_source": "--component" if opts["component"] else ("inputs" if detected else None)}
        if precision == "fp32":
            if opts["precision"] == "auto":
                report["reason"] = ("auto: the model is not a text encoder, U-Net or VAE decoder (by its input names); "
                                    "nothing quantized - give --component or --precision")
            ctx.report["quantization"] = report
            return graph
        if any(n.op in ("QuantizeLinear", "DequantizeLinear") for n in graph.nodes):
            raise QuantizationError("the model is already quantized (it has QuantizeLinear/DequantizeLinear nodes)")
        _unique_names(graph)
        _detach_from_proto(graph)
        progress = opts["progress"]
        start = time.perf_counter()
        n_calib = opts["samples"] or cal.DEFAULT_CALIB_SAMPLES.get(component, cal.DEFAULT_CALIB_SAMPLES[None])
        n_eval = opts["eval"] if opts["eval"] is not None else cal.DEFAULT_EVAL_SAMPLES.get(component, 4)
        if opts["calib"]:
            samples, calib_info = cal.load_npz(opts["calib"], graph, opts["samples"])
        else:
            samples, calib_info = cal.generate(graph, component, n_calib, cal.CALIB_SEED)
        calib_info["method"] = opts["method"] if precision == "w8a16" else "minmax (FP16 overflow guard)"
        heldout, heldout_info = cal.generate(graph, component, n_eval, cal.HELDOUT_SEED, evenly=True)
        with tempfile.TemporaryDirectory(prefix="edgefc-quant-") as tmp:
            ref = cal.DiskModel(graph, tmp, "reference")
            if precision == "w8a16":
                details, aliases = self._w8a16(graph, ctx, ref, samples, opts, calib_info)
            else:
                details, aliases = self._fp16(graph, ref, samples, opts, calib_info)
            report["calibration"] = calib_info
            report.update(details)
            report["dtypes"] = dtype_summary(graph)
            if n_eval > 0:
                dep = cal.DiskModel(graph, tmp, "deployed")
                ev = evaluate(ref, dep, aliases, heldout, progress)
                ev["eval_inputs"] = {k: v for k, v in heldout_info.items() if k != "source"}
                report.update(ev)
            else:
                report["sqnr_db"] = None
                report["reason_no_sqnr"] = "--eval-samples 0"
        report["seconds"] = round(time.perf_counter() - start, 2)
        ctx.report["quantization"] = report
        return graph

    # -- W8A16 --
    def _w8a16(self, graph, ctx, ref, samples, opts, calib_info):
        policy: qp.QuantPolicy = opts["policy"]
        plan = qp.plan_w8a16(graph, policy)
        tensors = graph.tensors()
        means = {}
        if policy.bias_correction:
            for node_name, x in plan.bias_inputs.items():
                node = next(n for n in tensors[x].outputs if n.name == node_name)
                axes = _mean_axes(node, tensors[x])
                if axes is not None:
                    means[x] = axes
        stats = cal.collect_stats(ref, samples, plan.calibrated, means, opts["progress"])
        ranges = {t: (stats.lo[t], stats.hi[t]) for t in plan.calibrated}
        exact: set[str] = set()
        domain = cal.enumerable_input(graph, opts["component"] or cal.detect_component(t.name for t in graph.inputs))
        if domain is not None:
            name, values = domain
            dstats = cal.collect_domain_stats(ref, name, values, plan.calibrated, opts["progress"])
            for t in dstats.lo:
                ranges[t] = (dstats.lo[t], dstats.hi[t])
            exact = set(dstats.lo)
            calib_info["exhaustive"] = {"input": name, "values": f"{values[0]}..{values[-1]}", "tensors": len(exact),
                                        "seconds": round(dstats.seconds, 2)}
        if opts["method"] != "minmax":
            sizes = {t: 4 * int(np.prod(tensors[t].shape)) for t in plan.calibrated}
            hists = cal.collect_histograms(ref, samples, plan.calibrated, ranges, sizes,
                                           symmetric=policy.activation_symmetric, chunk_bytes=opts["chunk_bytes"],
                                           progress=opts["progress"])
            for t, h in hists.items():
                ranges[t] = h.percentile_range(opts["percentile"]) if opts["method"] == "percentile" else h.mse_range()
            calib_info["histogram_chunk_bytes"] = opts["chunk_bytes"]
            if opts["method"] == "percentile":
                calib_info["percentile"] = opts["percentile"]
        if opts["method"] == "minmax" and policy.activation_headroom != 1.0:
            h = policy.activation_headroom
            ranges = {t: (lo * h, hi * h) if t not in exact else (lo, hi) for t, (lo, hi) in ranges.items()}
            calib_info["headroom"] = h
        calib_info["seconds"] = round(stats.seconds, 2)
        outputs_before = [t.name for t in graph.outputs]
        del tensors
        counts = apply_w8a16(graph, plan, ranges, stats.means, policy)
        cal.release_memory()
        aliases = {f"{n}__float": n for n in outputs_before}
        details = {
            "weights": {"scheme": "int8 symmetric per output channel", "quantized": len({w for w in plan.weights}),
                        **counts},
            "activations": {"scheme": f"int16 {'symmetric' if policy.activation_symmetric else 'asymmetric'} per tensor",
                            "quantized": len(plan.quantized), "calibrated": len(plan.calibrated),
                            "sharing_input_scale": len(plan.inherits)},
            "kept_higher_precision": _summarise_kept(plan.kept),
        }
        return details, aliases

    # -- FP16 --
    def _fp16(self, graph, ref, samples, opts, calib_info):
        policy: qp.QuantPolicy = opts["policy"]
        absmax = {}
        if policy.rule("fp16-overflow"):
            names = [t.name for n in graph.nodes for t in n.outputs if qp.is_float(t)]
            stats = cal.collect_stats(ref, samples, names, None, opts["progress"])
            absmax = {t: max(abs(stats.lo[t]), abs(stats.hi[t])) for t in names}
            calib_info["seconds"] = round(stats.seconds, 2)
            calib_info["largest_activation"] = round(max(absmax.values()), 3) if absmax else None
        kept = fp16_mod.plan_fp16(graph, policy, absmax)
        outputs_before = [t.name for t in graph.outputs]
        counts = fp16_mod.convert_fp16(graph, kept)
        aliases = {f"{n}__fp16": n for n in outputs_before}
        details = {"fp16": counts, "kept_higher_precision": _summarise_kept(kept)}
        return details, aliases
