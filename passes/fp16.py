"""FP16 conversion for pass ``quantize`` (paper Sec. 2.3/4.2: FP16 text encoder and VAE decoder).

Matches: every node of the graph. Emits: the same graph with FP16 weights and activations, FP32
model inputs and outputs (a ``Cast`` after each float input and before each float output, the
outputs keeping their names), and the nodes the policy keeps in FP32
(:mod:`edgefc.passes.quant_policy`: periodic arguments, normalisation statistics,
InstanceNormalization, ops with attribute-typed outputs, tensors that would overflow) computing
in FP32 between Casts.

How types stay consistent (the common converter's failure mode is a ``Cast(to=FLOAT)`` left in
an FP16 region, which onnxruntime rejects as a type error): each node gets one precision; each of
its float inputs whose ONNX type constraint admits float16 is brought to that precision - a
constant by converting its values (one copy per precision), an activation by a Cast shared by
every consumer that needs it - while inputs fixed to float (Resize ``scales``) stay FP32; a
``Cast`` to a float type casts to the node's precision; output types are then re-inferred.
edgefc local functions are type-generic (their bodies have no typed constants) and run in FP16
as they are.

onnxruntime 1.32's CPU provider has native FP16 kernels only for data movement,
LayerNormalization and Attention; for the other ops it inserts Casts around its FP32 kernels
itself, so onnxruntime's numbers measure FP16 storage of every tensor between ops (the NPU's
FP16 tensors with wide accumulation), which is what the SQNR in the report means.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from edgefc import ir
from edgefc.errors import QuantizationError
from edgefc.passes.quant_policy import (
    FP16_FP32_OPS,
    FP16_MAX,
    TYPED_OUTPUT_OPS,
    QuantPolicy,
    is_float_tensor,
    log_argument_tensors,
    norm_statistic_tensors,
    periodic_argument_tensors,
)

F32, F16 = np.dtype(np.float32), np.dtype(np.float16)


def _allows_fp16(node: gs.Node, index: int, opset: int) -> bool:
    """Whether input ``index`` of ``node`` may be float16 (ONNX schema; edgefc functions: yes)."""
    if node.domain not in (None, "", "ai.onnx"):
        return True
    try:
        schema = onnx.defs.get_schema(node.op, opset)
    except onnx.defs.SchemaError:
        return True
    if not schema.inputs:
        return True
    param = schema.inputs[min(index, len(schema.inputs) - 1)]
    allowed = {c.type_param_str: set(c.allowed_type_strs) for c in schema.type_constraints}
    types = allowed.get(param.type_str, {param.type_str})
    return "tensor(float16)" in types


def plan_fp16(graph: gs.Graph, policy: QuantPolicy, absmax: dict[str, float] | None = None) -> dict[str, str]:
    """Nodes kept in FP32: name -> reason (user overrides, rules, and the overflow guard)."""
    kept = {}
    for name, (prec, reason) in policy.user_precisions(graph).items():
        if prec in ("w8a16", "w8a8"):
            raise QuantizationError(f"{reason}: an FP16 build has no integer layers; compile with --precision "
                                    f"w8a16 or w8a8 and give the FP16 layers with --layer-precision PATTERN=fp16")
        if prec == "fp32":
            kept[name] = reason
    if policy.rule("periodic-arguments"):
        tensors, nodes = periodic_argument_tensors(graph)
        for n in graph.nodes:
            if n.name in nodes or (n.op in ("Sin", "Cos")):
                kept.setdefault(n.name, "periodic-arguments")
    if policy.rule("log-arguments"):
        _, log_nodes = log_argument_tensors(graph)
        for n in graph.nodes:
            if n.name in log_nodes or n.op == "Log":
                kept.setdefault(n.name, "log-arguments: computes the argument of a logarithm")
    if policy.rule("norm-statistics"):
        stats = norm_statistic_tensors(graph)
        for n in graph.nodes:
            if any(t.name in stats for t in n.outputs):
                kept.setdefault(n.name, "norm-statistics")
            elif n.op in FP16_FP32_OPS:
                kept.setdefault(n.name, "norm-statistics: no FP32 statistics of its own")
    if policy.rule("attention-scores"):
        for n in graph.nodes:
            if n.op == "Softmax":
                kept.setdefault(n.name, "attention-scores: softmax in FP32")
    if policy.rule("typed-outputs"):
        for n in graph.nodes:
            if n.op in TYPED_OUTPUT_OPS:
                kept.setdefault(n.name, "typed-outputs")
    if policy.rule("fp16-overflow"):
        from edgefc.passes.quant_policy import FP16_SAFE_MAX

        for n in graph.nodes:
            for t in n.outputs:
                a = (absmax or {}).get(t.name)
                if a is not None and a > FP16_SAFE_MAX:
                    reason = f"fp16-overflow: |{t.name}| reaches {a:.4g}"
                    kept.setdefault(n.name, reason)
                    for c in t.outputs:
                        kept.setdefault(c.name, reason)
            for i, t in enumerate(n.inputs):
                if isinstance(t, gs.Constant) and is_float_tensor(t) and t.values.size and float(np.max(np.abs(t.values))) > FP16_MAX:
                    kept.setdefault(n.name, f"fp16-overflow: constant {t.name} exceeds the FP16 range")
    return kept


def convert_fp16(graph: gs.Graph, kept: dict[str, str]) -> dict:
    """Rewrite ``graph`` in place to FP16 except the ``kept`` nodes; returns counts for the report."""
    opset = int(graph.opset)
    const_cache: dict[tuple[str, str], gs.Constant] = {}
    cast_cache: dict[tuple[str, str], gs.Variable] = {}
    dtype_of: dict[str, np.dtype] = {}
    for t in graph.inputs:
        if is_float_tensor(t):
            dtype_of[t.name] = np.dtype(t.dtype)
    out_dtype = {t.name: np.dtype(t.dtype) for t in graph.outputs if is_float_tensor(t)}
    new_nodes: list[gs.Node] = []
    counts = Counter()

    def cast_to(t: gs.Variable, dt: np.dtype) -> gs.Variable:
        key = (t.name, dt.name)
        if key not in cast_cache:
            out = gs.Variable(f"{t.name}__{'fp16' if dt == F16 else 'fp32'}", dtype=dt, shape=t.shape)
            new_nodes.append(gs.Node("Cast", name=f"{t.name}__cast_{dt.name}", attrs={"to": onnx.helper.np_dtype_to_tensor_dtype(dt)},
                                     inputs=[t], outputs=[out]))
            cast_cache[key] = out
            counts["casts"] += 1
        return cast_cache[key]

    def const_as(c: gs.Constant, dt: np.dtype) -> gs.Constant:
        if np.dtype(c.dtype) == dt:
            return c
        key = (c.name, dt.name)
        if key not in const_cache:
            with np.errstate(over="ignore"):  # beyond FP16: only when the overflow rule is switched off
                const_cache[key] = gs.Constant(f"{c.name}__{dt.name}", np.asarray(c.values).astype(dt))
        return const_cache[key]

    for node in list(graph.nodes):
        prec = F32 if node.name in kept else F16
        for i, t in enumerate(node.inputs):
            if t is None or not t.name or not (is_float_tensor(t) or t.name in dtype_of):
                continue
            want = prec if _allows_fp16(node, i, opset) else F32
            if isinstance(t, gs.Constant):
                node.inputs[i] = const_as(t, want)
            else:
                have = dtype_of.get(t.name, np.dtype(t.dtype))
                if have != want:
                    node.inputs[i] = cast_to(t, want)
        if node.op == "Cast":
            to = onnx.helper.tensor_dtype_to_np_dtype(int(node.attrs["to"]))
            if np.issubdtype(to, np.floating) and to != prec:
                node.attrs["to"] = onnx.helper.np_dtype_to_tensor_dtype(prec)
        for t in node.outputs:
            if is_float_tensor(t) or (node.op == "Cast" and np.issubdtype(onnx.helper.tensor_dtype_to_np_dtype(int(node.attrs["to"])), np.floating)):
                if node.op in TYPED_OUTPUT_OPS:
                    dtype_of[t.name] = np.dtype(t.dtype)
                    continue
                dt = prec
                if node.op == "LayerNormalization" and node.outputs.index(t) > 0:
                    dt = F32  # Mean / InvStdDev follow stash_type
                dtype_of[t.name] = dt
                t.dtype = dt
        counts["fp32 nodes" if prec == F32 else "fp16 nodes"] += 1
    graph.nodes.extend(new_nodes)
    # model outputs keep their own type (FP32 for an FP32 model) under their own names
    for k, t in enumerate(list(graph.outputs)):
        want = out_dtype.get(t.name, F32)
        if is_float_tensor(t) and dtype_of.get(t.name) == F16 and want != F16:
            name = t.name
            t.name = f"{name}__fp16"
            out = gs.Variable(name, dtype=want, shape=t.shape)
            graph.nodes.append(gs.Node("Cast", name=f"{name}__cast_out", attrs={"to": onnx.helper.np_dtype_to_tensor_dtype(want)},
                                       inputs=[t], outputs=[out]))
            graph.outputs[k] = out
            counts["casts"] += 1
    graph.toposort()
    # re-infer every intermediate type from the new inputs (the types set above fill any gap)
    chosen = {}
    for t in graph.tensors().values():
        if isinstance(t, gs.Variable) and t not in graph.inputs and t not in graph.outputs:
            chosen[t.name] = (t.dtype, t.shape)
            t.dtype = None
    ir.infer_shapes(graph)
    for name, t in graph.tensors().items():
        if name in chosen and t.dtype is None:
            t.dtype, t.shape = chosen[name]
    counts["fp16 weights"] = sum(1 for c in const_cache.values() if np.dtype(c.dtype) == F16)
    return dict(counts)
