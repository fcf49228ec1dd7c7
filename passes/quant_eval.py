"""How close the deployed model is to FP32 (pass ``quantize``'s report, paper Sec. 4.2).

Whole model: SQNR and cosine over all float outputs, per held-out input and their mean. Per layer:
each deployed compute node is cloned into the FP32 model, fed the reference activations in
deployed precision (its quantized inputs, weights and output rounding), and ReduceSumSquare of
(clone - reference) and of the reference come back from onnxruntime, so each figure is that
layer's own error; the ten worst are reported. The probes double the reference's compute, so they
run on the first two held-out inputs only.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict

import numpy as np
import onnx
from onnx import helper

from edgefc.errors import QuantizationError
from edgefc.memory import release_memory
from edgefc.metrics import cosine, sqnr_db
from edgefc.passes import quant_policy as qp
from edgefc.passes.calib_stats import progress_bar
from edgefc.passes.disk_model import DiskModel

WORST_LAYERS = 10


def _finite(x: float) -> float | None:
    return round(float(x), 3) if math.isfinite(x) else (999.0 if x > 0 else None)


# --- evaluation ---------------------------------------------------------------------------------

def _layer_clones(ref: DiskModel, dep: DiskModel, aliases: dict[str, str]):
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


def evaluate(ref: DiskModel, dep: DiskModel, aliases: dict[str, str], heldout: list[dict],
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
        for feeds in progress_bar(heldout[:k], "evaluating (fp32 + per-layer)", k, progress):
            vals = sess.run(names, feeds)
            refs.append(vals[:len(outputs)])
            probe_vals = vals[len(outputs):]
            err += np.array([float(v) for v in probe_vals[0::2]])
            sig += np.array([float(v) for v in probe_vals[1::2]])
            del vals, probe_vals
        del sess
        release_memory()
    else:
        k = 0
    if k < len(heldout):
        sess = ref.session()
        for feeds in progress_bar(heldout[k:], "evaluating (fp32)", len(heldout) - k, progress):
            refs.append(sess.run(outputs, feeds))
        del sess
    release_memory()
    sess = dep.session()
    dep_out = [o.name for o in sess.get_outputs()]
    order = [dep_out.index(o) for o in outputs]
    per_input, cosines = [], []
    for feeds, r in zip(progress_bar(heldout, "evaluating (deployed)", len(heldout), progress), refs):
        vals = sess.run(dep_out, feeds)
        got = [vals[i] for i in order]
        rf = [np.asarray(a, dtype=np.float64).ravel() for a, g in zip(r, got) if np.issubdtype(np.asarray(a).dtype, np.floating)]
        gf = [np.asarray(g, dtype=np.float64).ravel() for a, g in zip(r, got) if np.issubdtype(np.asarray(a).dtype, np.floating)]
        rv, gv = np.concatenate(rf), np.concatenate(gf)
        if not np.all(np.isfinite(gv)):
            raise QuantizationError("the quantized model produces NaN/Inf on a held-out input; keep the offending "
                                    "layers in FP32 with --keep-fp32 (see worst layers with --eval-samples 1)")
        per_input.append(sqnr_db(rv, gv))
        cosines.append(cosine(rv, gv))
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

