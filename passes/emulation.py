"""Precision plans measured without building each one (pass ``quantize``'s ``--precision search``,
issue 20; the measurement itself is :mod:`edgefc.passes.quant_eval`'s).

Building and loading a candidate build of a full-size U-Net costs onnxruntime a new session each
time (tens of seconds on two cores); the search measures dozens of plans. So one graph emulates
them all: the FP32 graph in which every op of a searched group reads its inputs and weights the
way that group's precision would give them, selected at run time by scalar *switch* inputs, one
per (group, precision). With a group's switch for precision p at 1 (the others at 0), each
activation an op of the group reads becomes ``x + (E_p(x) - x)`` = ``E_p(x)`` - its Q/DQ at the
precision's activation type with the calibrated scale (INT16 / INT8), an FP16 round trip, or x
itself (FP32) - and each weight ``w + (DQ(Q(w)) - w)``, with the bias correction of the build.
Ops outside the groups read at their fixed precision. The graph's outputs are quantized as the
build stores them (their producer's type).

Measured against the FP32 reference on the same evaluation inputs (:class:`PlanMeter`), a plan
gives the SQNR its build measures up to how the build stores a tensor read at two precisions (the
build requantises from the wider type; the emulation quantizes each reader's copy from FP32) and
the attention blocks' internal arithmetic (onnxruntime's fused attention computes in FP32 here,
in FP16 in an FP16 build): fractions of a dB, which is why the chosen plan is built and measured
for real before it is reported.

Matches: the nodes of the groups given. Emits: a separate model file (never the build).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from edgefc import ir
from edgefc import precision as pr
from edgefc.memory import release_memory
from edgefc.passes import qdq
from edgefc.passes import quant_policy as qp
from edgefc.passes.disk_model import DiskModel
from edgefc.passes.quant_eval import Reference

SWITCH = "__edgefc_switch"


@dataclass
class Switchboard:
    """The emulation model on disk and how to drive it: ``switches[(group, precision)]`` is the name
    of the scalar input that selects ``precision`` for ``group``."""

    model: DiskModel
    groups: dict[str, list[str]]
    options: dict[str, tuple[str, ...]]
    switches: dict[tuple[str, str], str]
    output: str
    seconds: float = 0.0

    def feeds(self, choice: dict[str, str]) -> dict[str, np.ndarray]:
        """Switch values for ``choice`` (group -> precision; a group left out runs FP32)."""
        out = {}
        for (g, p), name in self.switches.items():
            out[name] = np.array(1.0 if choice.get(g) == p else 0.0, dtype=np.float32)
        return out


def _alias_root(t: gs.Tensor) -> gs.Tensor:
    while t.inputs and t.inputs[0].op in qp.ALIAS_OPS and t.inputs[0].inputs:
        t = t.inputs[0].inputs[0]
    return t


class _Builder:
    """Adds the emulation nodes to a copy of the FP32 graph."""

    def __init__(self, graph: gs.Graph, calibration, policy: qp.QuantPolicy, plan: qp.PrecisionPlan):
        self.graph, self.cal, self.policy, self.plan = graph, calibration, policy, plan
        self.nodes: list[gs.Node] = []
        self.switch_inputs: dict[tuple[str, str], gs.Variable] = {}
        self.cache: dict[tuple, gs.Tensor] = {}
        self.n = 0

    def name(self, base: str) -> str:
        self.n += 1
        return f"{SWITCH}/{base}/{self.n}"

    def switch(self, group: str, p: str) -> gs.Variable:
        key = (group, p)
        if key not in self.switch_inputs:
            self.switch_inputs[key] = gs.Variable(f"{SWITCH}:{group}:{p}", dtype=np.float32, shape=[])
        return self.switch_inputs[key]

    def op(self, op: str, inputs: list, base: str, dtype=np.float32, shape=None, **attrs) -> gs.Variable:
        out = gs.Variable(self.name(base) + ":out", dtype=dtype, shape=shape)
        self.nodes.append(gs.Node(op, name=self.name(base), inputs=inputs, outputs=[out], attrs=attrs))
        return out

    # values ----------------------------------------------------------------------------------
    def emulated(self, x: gs.Tensor, p: str, root: str) -> gs.Tensor:
        """``x`` as an op at precision ``p`` reads it (its root's calibrated range)."""
        key = (x.name, p)
        if key in self.cache:
            return self.cache[key]
        if p == "fp32":
            out = x
        elif p == "fp16":
            h = self.op("Cast", [x], f"{x.name}/f16", dtype=np.float16, shape=x.shape, to=onnx.TensorProto.FLOAT16)
            out = self.op("Cast", [h], f"{x.name}/f32", shape=x.shape, to=onnx.TensorProto.FLOAT)
        else:
            dtype = pr.act_type(p)
            lo, hi = self.cal.ranges[root]
            h = 1.0 if root in self.cal.exact else self.cal.headroom.get(dtype, 1.0)
            symmetric = self.policy.activation_symmetric if dtype == "int16" else self.policy.int8_symmetric
            scale, zp = qdq.activation_qparams(lo * h, hi * h, symmetric, dtype)
            sc = gs.Constant(self.name(f"{x.name}/scale"), np.array(scale, dtype=np.float32))
            z = gs.Constant(self.name(f"{x.name}/zp"), np.array(zp))
            q = self.op("QuantizeLinear", [x, sc, z], f"{x.name}/q", dtype=np.asarray(zp).dtype, shape=x.shape)
            out = self.op("DequantizeLinear", [q, sc, z], f"{x.name}/dq", shape=x.shape)
        self.cache[key] = out
        return out

    def mix(self, x: gs.Tensor, group: str | None, precisions: tuple[str, ...], variant) -> gs.Tensor:
        """``x + sum_p s[group, p] * (variant(p) - x)``; a single fixed precision: ``variant(p)``."""
        if group is None:
            return variant(precisions[0])
        key = ("mix", x.name, group)
        if key in self.cache:
            return self.cache[key]
        acc = x
        for p in precisions:
            v = variant(p)
            if v is x:
                continue
            d = self.op("Sub", [v, x], f"{x.name}/d_{p}", shape=x.shape)
            d = self.op("Mul", [d, self.switch(group, p)], f"{x.name}/s_{p}", shape=x.shape)
            acc = self.op("Add", [acc, d], f"{x.name}/mix_{p}", shape=x.shape)
        self.cache[key] = acc
        return acc


def build_switchboard(graph: gs.Graph, plan: qp.PrecisionPlan, groups: dict[str, list[str]],
                      options: dict[str, tuple[str, ...]], calibration, policy: qp.QuantPolicy, folder: Path,
                      progress: bool = True) -> Switchboard:
    """The emulation model of ``graph`` (FP32, untouched: a copy is changed): the ops of each group
    switchable between the group's ``options``, every other op at its ``plan`` precision."""
    start = time.perf_counter()
    g = ir.copy_graph(graph)
    node_group = {n: grp for grp, names in groups.items() for n in names}
    b = _Builder(g, calibration, policy, plan)
    ranges = calibration.ranges
    for node in list(g.nodes):
        if node.op in qp.ALIAS_OPS:   # views: their readers read them at their own precision
            continue
        p_fixed = plan.ops.get(node.name)
        if p_fixed is None and node.name not in node_group:
            continue
        grp = node_group.get(node.name)
        precisions = options[grp] if grp is not None else (p_fixed,)
        slot = qp.weight_slot(node, policy)
        for i, x in enumerate(node.inputs):
            if x is None or not x.name or isinstance(x, gs.Constant) or not qp.is_float_tensor(x):
                continue
            root = _alias_root(x).name
            if root in plan.kept or root not in ranges:
                continue
            node.inputs[i] = b.mix(x, grp, precisions, lambda p, x=x, root=root: b.emulated(x, p, root))
        if slot is not None and any(p in pr.INTEGER_PRECISIONS or p == "fp16" for p in precisions):
            _emulate_weights(b, node, slot, grp, precisions)
    # graph outputs: stored at their producer's type
    for k, t in enumerate(list(g.outputs)):
        producer = t.inputs[0] if t.inputs else None
        if producer is None or t.name not in ranges or t.name in plan.kept:
            continue
        grp = node_group.get(producer.name)
        p_fixed = plan.ops.get(producer.name)
        precisions = options[grp] if grp is not None else (p_fixed,) if p_fixed else ()
        if not precisions or all(p == "fp32" for p in precisions):
            continue
        name = t.name
        out = b.mix(t, grp, tuple(p for p in precisions if p != "fp16"),
                    lambda p, t=t: b.emulated(t, p, name))
        if out is t:
            continue
        t.name = f"{name}__fp32"
        out.name = name
        g.outputs[k] = out
    g.nodes.extend(b.nodes)
    g.inputs.extend(b.switch_inputs.values())
    g.toposort()
    model = DiskModel(g, folder, "emulation")
    del g
    release_memory()
    switches = {k: v.name for k, v in b.switch_inputs.items()}
    output = next(o for o in model.output_names)
    return Switchboard(model, groups, options, switches, output, time.perf_counter() - start)


def _emulate_weights(b: _Builder, node: gs.Node, slot: tuple[int, int], grp: str | None,
                     precisions: tuple[str, ...]) -> None:
    """The op's weight as its precision gives it (INT8 per channel, FP16, or FP32), and its bias
    with the build's correction for the INT8 rounding."""
    idx, axis = slot
    w = node.inputs[idx]
    wf = np.asarray(w.values, dtype=np.float32)
    q, scale = qdq.quantize_weight(wf, axis)
    wq = gs.Constant(b.name(f"{w.name}/int8"), q)
    ws = gs.Constant(b.name(f"{w.name}/scale"), scale)
    wz = gs.Constant(b.name(f"{w.name}/zp"), np.zeros(scale.shape, dtype=np.int8))
    dq = b.op("DequantizeLinear", [wq, ws, wz], f"{w.name}/dq", shape=list(wf.shape), axis=int(axis))
    ints = [p for p in precisions if p in pr.INTEGER_PRECISIONS]
    if grp is None:
        node.inputs[idx] = dq if ints else w
    else:
        acc = w
        diff = b.op("Sub", [dq, w], f"{w.name}/dw", shape=list(wf.shape))
        for p in ints:
            d = b.op("Mul", [diff, b.switch(grp, p)], f"{w.name}/s_{p}", shape=list(wf.shape))
            acc = b.op("Add", [acc, d], f"{w.name}/mix_{p}", shape=list(wf.shape))
        if "fp16" in precisions:
            h = b.op("Cast", [w], f"{w.name}/f16", dtype=np.float16, shape=list(wf.shape), to=onnx.TensorProto.FLOAT16)
            h = b.op("Cast", [h], f"{w.name}/f32", shape=list(wf.shape), to=onnx.TensorProto.FLOAT)
            d = b.op("Sub", [h, w], f"{w.name}/dh", shape=list(wf.shape))
            d = b.op("Mul", [d, b.switch(grp, "fp16")], f"{w.name}/s_fp16", shape=list(wf.shape))
            acc = b.op("Add", [acc, d], f"{w.name}/mix_fp16", shape=list(wf.shape))
        node.inputs[idx] = acc
    # bias correction, as the build does it (b -= (W_q - W) . E[x]) for an op with a constant bias
    bidx = qp.BIAS_INPUT.get(node.op)
    x = node.inputs[0]
    mean = b.cal.means.get(_alias_root(x).name) if b.policy.bias_correction and ints else None
    if mean is None or bidx is None or len(node.inputs) <= bidx or not isinstance(node.inputs[bidx], gs.Constant):
        return
    shift = qdq.bias_shift(node, qdq.dequantize_weight(q, scale, axis) - wf, np.asarray(mean, np.float32))
    bias = node.inputs[bidx]
    vals = np.asarray(bias.values, dtype=np.float32)
    beta = float(node.attrs.get("beta", 1.0)) if node.op == "Gemm" else 1.0
    if shift is None or vals.size != shift.size or beta == 0:
        return
    corrected = gs.Constant(b.name(f"{bias.name}/corrected"), (vals.reshape(-1) - shift / beta).reshape(vals.shape)
                            .astype(np.float32))
    if grp is None:
        node.inputs[bidx] = corrected
        return
    acc = bias
    delta = gs.Constant(b.name(f"{bias.name}/delta"), (np.asarray(corrected.values) - vals).astype(np.float32))
    for p in ints:
        d = b.op("Mul", [delta, b.switch(grp, p)], f"{bias.name}/s_{p}", shape=list(vals.shape))
        acc = b.op("Add", [acc, d], f"{bias.name}/mix_{p}", shape=list(vals.shape))
    node.inputs[bidx] = acc


@dataclass
class PlanMeter:
    """Measures plans on the switchboard: pooled SQNR of the first float output against the FP32
    ``reference`` on its first ``samples`` evaluation inputs (what :mod:`quant_eval` reports for a
    build, on fewer inputs)."""

    board: Switchboard
    reference: Reference
    samples: int
    runs: int = 0
    seconds: float = 0.0
    _sess: object = field(default=None, repr=False)

    def __post_init__(self):
        self.samples = max(1, min(self.samples, len(self.reference.inputs.samples)))
        self._sess = self.board.model.session()

    def sqnr(self, choice: dict[str, str], samples: int | None = None) -> float:
        """Pooled SQNR (dB) of the plan ``choice`` (group -> precision)."""
        start = time.perf_counter()
        k = min(samples or self.samples, len(self.reference.inputs.samples))
        switch = self.board.feeds(choice)
        out = self.reference.outputs[0]
        sig = err = 0.0
        for i in range(k):
            feeds = {**self.reference.inputs.samples[i], **switch}
            got = np.asarray(self._sess.run([out], feeds)[0], np.float64)
            ref = self.reference.values[i][0]
            sig += float(np.sum(ref * ref))
            err += float(np.sum((ref - got) ** 2))
        self.runs += k
        self.seconds += time.perf_counter() - start
        if not math.isfinite(err):
            return -math.inf
        return math.inf if err == 0 else 10 * math.log10(sig / err) if sig > 0 else -math.inf

    def close(self) -> None:
        self._sess = None
        release_memory()
