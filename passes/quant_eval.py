"""How close a deployed graph is to FP32 on the evaluation inputs (pass ``quantize``, paper Sec. 4.2).

One measurement serves every consumer: the report's figures, the quality floor (``--min-sqnr``),
the rescue that keeps the worst layers in higher precision and the precision search. They all go
through three steps:

1. :class:`EvalInputs` - what a build is measured on, and where it came from (``source``:
   ``"eval"`` = a ``--eval`` file of held-out real inputs, ``"calib-heldout"`` = a part of
   ``--calib`` never used for ranges, ``"generated"`` = inputs edgefc made up, not a measurement on
   real data), plus the value of an input that means "no conditioning" (the U-Net's empty-prompt
   ``encoder_hidden_states`` that ``edgefc calibrate`` records) when there is one;
2. :meth:`Reference.compute` - the FP32 graph's outputs on them, computed once;
3. :func:`measure` - a deployed graph against that reference: a :class:`Measurement`.

Whole model: ``sqnr_db`` is ``10 log10(sum ref^2 / sum (ref - out)^2)`` over **every evaluation
input pooled**, on the model's **first float output** (what an outside script measures when it runs
both models on the same inputs and compares the first output); ``sqnr_db_per_output`` is the same
per float output (a detector's scores next to its boxes), ``sqnr_db_per_input`` per input (first
output). Per layer: each deployed compute node is cloned into the FP32 model, fed the reference
activations in deployed precision (its quantized inputs, weights and output rounding), and
ReduceSumSquare of (clone - reference) and of the reference come back from onnxruntime, so each
figure is that layer's own error; the probes double the reference's compute, so they run on the
first ``layer_samples`` inputs. Conditioning (an input with an unconditional value): the ratio
``||out_dep(c) - out_dep(0)|| / ||out_fp32(c) - out_fp32(0)||`` over all inputs pooled, first
output - does the text still steer the deployed U-Net as much as the FP32 one?

:func:`check_floor` holds a measurement to the floor (``--min-sqnr``, default
:data:`DEFAULT_MIN_SQNR_DB`, chosen in docs/quantization.md from the alignment-vs-SQNR curve on
the trained miniature): the worst float output's pooled SQNR.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper

from edgefc.errors import QualityFloorError, QuantizationError
from edgefc.memory import release_memory
from edgefc.metrics import sqnr_db
from edgefc.passes import quant_policy as qp
from edgefc.passes.calib_stats import progress_bar, run_session
from edgefc.passes.disk_model import DiskModel

#: layers listed in the report (``worst_layers``) and named by a floor failure.
WORST_LAYERS = 10
FLOOR_LAYERS = 3
EVAL_SOURCES = ("eval", "calib-heldout", "generated")
#: the default quality floor (dB, pooled SQNR of the worst float output on the evaluation inputs),
#: read off the verifier-alignment-vs-SQNR curve of the trained miniature EdgeFusion
#: (bench/quant_floor.py; docs/quantization.md "The quality floor"): every U-Net build from 16.5 dB
#: up kept alignment within 0.02 and the Fréchet distance within 10 % of FP32's, the best failing
#: one measured 12.7 dB; 16.5 rounded up to 5 dB.
DEFAULT_MIN_SQNR_DB = 20.0


def finite_db(x: float) -> float | None:
    """A dB figure for JSON: rounded; +inf (no error at all) as 999, -inf / NaN as None."""
    return round(float(x), 3) if math.isfinite(x) else (999.0 if x > 0 else None)


def _ratio_db(signal: float, noise: float) -> float:
    if not math.isfinite(noise):
        return -math.inf
    if noise == 0:
        return math.inf
    return 10 * math.log10(signal / noise) if signal > 0 else -math.inf


# --- what a build is measured on ----------------------------------------------------------------

@dataclass
class EvalInputs:
    """The evaluation inputs of a build: ``samples`` (one feed dict each), their ``source`` (one of
    :data:`EVAL_SOURCES`), a description for the report (``info``: file, samples, available ...)
    and ``unconditional``: input name -> the value that means "no conditioning" (the empty prompt's
    text embedding), which replaces that input for the conditioning ratio; empty when unknown."""

    samples: list[dict]
    source: str
    info: dict = field(default_factory=dict)
    unconditional: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self):
        if self.source not in EVAL_SOURCES:
            raise ValueError(f"unknown evaluation source {self.source!r} (one of {', '.join(EVAL_SOURCES)})")

    def unconditional_feeds(self, feeds: dict) -> dict:
        """``feeds`` with every conditioning input replaced by its unconditional value."""
        out = dict(feeds)
        for name, value in self.unconditional.items():
            out[name] = np.broadcast_to(value, np.shape(feeds[name])).astype(np.asarray(feeds[name]).dtype)
        return out

    def describe(self) -> dict:
        return {"source": self.source, **{k: v for k, v in self.info.items() if k != "source"},
                "samples": len(self.samples),
                **({"unconditional": sorted(self.unconditional)} if self.unconditional else {})}


def _float_outputs(sess) -> list[str]:
    return [o.name for o in sess.get_outputs() if o.type in ("tensor(float)", "tensor(float16)", "tensor(double)",
                                                             "tensor(bfloat16)")]


def _run(sess, names: list[str], feeds: dict, what: str) -> list:
    return run_session(sess, names, feeds, f"evaluation ({what})")


@dataclass
class Reference:
    """The FP32 graph's float outputs on the evaluation inputs, computed once and reused by every
    :func:`measure` of a candidate build (rescue, search). ``values[i][k]``: input ``i``, output
    ``outputs[k]`` (float64); ``uncond[i]``: the first output with the unconditional input."""

    model: DiskModel
    inputs: EvalInputs
    outputs: list[str]
    values: list[list[np.ndarray]]
    uncond: list[np.ndarray] | None
    others: list[str] = field(default_factory=list)        # outputs that are not float (indices, masks)
    other_values: list[list[np.ndarray]] = field(default_factory=list)
    seconds: float = 0.0

    @classmethod
    def compute(cls, model: DiskModel, inputs: EvalInputs, progress: bool = True) -> Reference:
        """Run the FP32 ``model`` on every evaluation input (and its unconditional twin)."""
        start = time.perf_counter()
        sess = model.session()
        outputs = _float_outputs(sess)
        others = [o.name for o in sess.get_outputs() if o.name not in outputs]
        values, other_values, uncond = [], [], [] if inputs.unconditional and outputs else None
        for feeds in progress_bar(inputs.samples, "evaluating (fp32)", len(inputs.samples), progress):
            got = _run(sess, outputs + others, feeds, "FP32 model")
            values.append([np.asarray(v, np.float64) for v in got[:len(outputs)]])
            other_values.append([np.asarray(v) for v in got[len(outputs):]])
            if uncond is not None:
                uncond.append(np.asarray(_run(sess, outputs[:1], inputs.unconditional_feeds(feeds), "FP32 model")[0],
                                         np.float64))
        del sess
        release_memory()
        return cls(model, inputs, outputs, values, uncond, others, other_values, time.perf_counter() - start)


# --- the measurement ----------------------------------------------------------------------------

@dataclass
class LayerLoss:
    """One layer's own error: run in deployed precision on the FP32 activations (dB, higher is better)."""

    layer: str
    op: str
    sqnr_db: float


@dataclass
class Measurement:
    """A deployed graph against the FP32 :class:`Reference` (module docstring for each figure)."""

    sqnr_db: float | None                 # pooled over all inputs, the first float output (None: none)
    sqnr_db_per_output: dict[str, float]  # pooled, every float output
    sqnr_db_per_input: list[float]        # first output, per input
    cosine: float                         # pooled, first output
    conditioning: float | None            # ||dep(c) - dep(0)|| / ||fp32(c) - fp32(0)||, pooled
    conditioning_per_input: list[float]
    layers: list[LayerLoss]               # every probed layer, worst first (empty when not probed)
    layer_samples: int
    inputs: EvalInputs
    seconds: float = 0.0
    agreement_per_output: dict[str, float] = field(default_factory=dict)  # non-float outputs: share of equal elements
    nonfinite_reference: dict[str, int] = field(default_factory=dict)      # NaN/Inf elements of FP32 itself, left out

    @property
    def worst_output(self) -> tuple[str | None, float]:
        """(name, dB) of the float output with the lowest pooled SQNR - what the floor holds."""
        if not self.sqnr_db_per_output:
            return None, math.inf
        return min(self.sqnr_db_per_output.items(), key=lambda kv: kv[1])

    def worst_layers(self, n: int = WORST_LAYERS) -> list[LayerLoss]:
        return self.layers[:n]

    def report(self) -> dict:
        """The figures as ``report.json`` ``quantization`` keys."""
        out = {
            "eval_source": self.inputs.source,
            "sqnr_db": None if self.sqnr_db is None else finite_db(self.sqnr_db),
            "sqnr_definition": "10 log10(sum ref^2 / sum (ref - out)^2) over all evaluation inputs pooled, first float output",
            "sqnr_db_per_output": {k: finite_db(v) for k, v in self.sqnr_db_per_output.items()},
            "sqnr_db_per_input": [finite_db(v) for v in self.sqnr_db_per_input],
            "sqnr_db_worst_input": finite_db(min(self.sqnr_db_per_input)) if self.sqnr_db_per_input else None,
            "cosine": None if self.sqnr_db is None else round(float(self.cosine), 7),
            "worst_layers": [{"layer": x.layer, "op": x.op, "sqnr_db": finite_db(x.sqnr_db)} for x in self.worst_layers()],
            "layers_checked": len(self.layers),
            "layer_sqnr_inputs": self.layer_samples,
            "eval_inputs": self.inputs.describe(),
            "eval_seconds": round(self.seconds, 2),
        }
        if self.sqnr_db is None:
            out["reason_no_sqnr"] = "the model has no float output"
        if self.nonfinite_reference:
            out["nonfinite_in_fp32"] = dict(self.nonfinite_reference)
        if self.agreement_per_output:
            out["agreement_per_output"] = {k: round(v, 6) for k, v in self.agreement_per_output.items()}
        if self.conditioning is not None:
            out["conditioning"] = round(float(self.conditioning), 4)
            out["conditioning_per_input"] = [round(float(c), 4) for c in self.conditioning_per_input]
            out["conditioning_definition"] = ("||out_build(c) - out_build(uncond)|| / ||out_fp32(c) - out_fp32(uncond)|| "
                                              f"over all evaluation inputs pooled, first output; uncond: "
                                              f"{', '.join(sorted(self.inputs.unconditional))}")
        return out


#: ONNX element types whose layers are probed (a Sub / ReduceSumSquare of their error is defined).
FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE}


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
        if target not in ref.producers or ref.value_types.get(target, onnx.TensorProto.FLOAT) not in FLOAT_TYPES:
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


def layer_losses(reference: Reference, dep: DiskModel, aliases: dict[str, str], samples: int = 2,
                 progress: bool = True) -> list[LayerLoss]:
    """Every deployed compute layer's own SQNR (module docstring), summed over the first ``samples``
    evaluation inputs, worst first. ``aliases``: deployed tensor name -> reference name where the
    rewrite renamed a tensor (the model outputs)."""
    k = max(0, min(samples, len(reference.inputs.samples)))
    if k == 0:
        return []
    ref = reference.model
    nodes, inits, layers = _layer_clones(ref, dep, aliases)
    if not layers:
        return []
    probe = [x for _, _, e, s in layers for x in (e, s)]
    err = np.zeros(len(layers))
    sig = np.zeros(len(layers))
    path = ref.variant("eval-layers", nodes, probe, inits, keep_outputs=False)
    sess = ref.session(path)
    for feeds in progress_bar(reference.inputs.samples[:k], "evaluating (per layer)", k, progress):
        vals = _run(sess, probe, feeds, "per-layer probes")
        err += np.array([float(v) for v in vals[0::2]])
        sig += np.array([float(v) for v in vals[1::2]])
        del vals
    del sess
    release_memory()
    out = [LayerLoss(name, op, _ratio_db(s, e)) for (name, op, _, _), e, s in zip(layers, err, sig)]
    out.sort(key=lambda x: x.sqnr_db)
    return out


def measure(reference: Reference, dep: DiskModel, aliases: dict[str, str] | None = None, *,
            layer_samples: int = 2, progress: bool = True, as_written: bool = False) -> Measurement:
    """The deployed graph ``dep`` against ``reference`` on its evaluation inputs: pooled SQNR per
    float output, per input, cosine, the conditioning ratio (when the inputs have an
    unconditional value) and, on the first ``layer_samples`` inputs, every layer's own SQNR.
    A NaN/Inf in a deployed output is a one-line :class:`~edgefc.errors.QuantizationError`.

    The build runs in an onnxruntime session with its **default graph optimisations**, as a user
    (or an outside check) runs ``model.onnx``: onnxruntime rewrites some QDQ patterns into its own
    kernels (``DequantizeLinear`` of INT8 weights + ``MatMul`` -> ``MatMulNBits``, which by default
    computes with INT8 activations: ``session.qdq_matmulnbits_accuracy_level`` 4), and that is what
    the user gets. ``as_written``: the graph exactly as written (the QDQ arithmetic the NPU runs)."""
    start = time.perf_counter()
    aliases = aliases or {}
    inputs = reference.inputs
    sess = dep.session(optimize=not as_written)
    dep_names = [o.name for o in sess.get_outputs()]
    missing = [o for o in reference.outputs if o not in dep_names]
    if missing:
        raise QuantizationError(f"the deployed model lost the output(s) {', '.join(missing)}")
    outputs, others = reference.outputs, reference.others
    sig = np.zeros(len(outputs))
    err = np.zeros(len(outputs))
    same, total = np.zeros(len(others)), np.zeros(len(others))
    nonfinite = np.zeros(len(outputs), dtype=np.int64)
    per_input, dot, norm_d = [], 0.0, 0.0
    cond_dep, cond_ref, cond_per = 0.0, 0.0, []
    for i, feeds in enumerate(progress_bar(inputs.samples, "evaluating (deployed)", len(inputs.samples), progress)):
        raw = _run(sess, outputs + others, feeds, "deployed model")
        got = [np.asarray(v, np.float64) for v in raw[:len(outputs)]]
        r0_finite = None
        for k, (r, g) in enumerate(zip(reference.other_values[i], raw[len(outputs):])):
            g = np.asarray(g)
            same[k] += float(np.sum(r == g)) if r.shape == g.shape else 0.0
            total[k] += max(r.size, 1)
        del raw
        for k, (r, g) in enumerate(zip(reference.values[i], got)):
            finite = np.isfinite(r)
            if not np.all(np.isfinite(g[finite])):
                raise QuantizationError(f"the deployed model produces NaN/Inf in output '{outputs[k]}' on an evaluation "
                                        "input where FP32 does not; keep the offending layers in FP32 with --keep-fp32 "
                                        "or choose another --precision")
            if not finite.all():  # NaN/Inf in FP32 itself (its own domain): compared where FP32 is finite
                nonfinite[k] += int(finite.size - finite.sum())
                r, g = np.where(finite, r, 0.0), np.where(finite, g, 0.0)
                got[k] = g
                if k == 0:
                    r0_finite = r
            sig[k] += float(np.sum(r * r))
            err[k] += float(np.sum((r - g) ** 2))
        if outputs:
            r0, g0 = reference.values[i][0] if r0_finite is None else r0_finite, got[0]
            per_input.append(sqnr_db(r0, g0))
            dot += float(np.sum(r0 * g0))
            norm_d += float(np.sum(g0 * g0))
            if reference.uncond is not None:
                u = np.asarray(_run(sess, outputs[:1], inputs.unconditional_feeds(feeds), "deployed model")[0], np.float64)
                dd = float(np.sum((g0 - u) ** 2))
                dr = float(np.sum((r0 - reference.uncond[i]) ** 2))
                cond_dep += dd
                cond_ref += dr
                cond_per.append(math.sqrt(dd / dr) if dr > 0 else math.nan)
        del got
    del sess
    release_memory()
    layers = layer_losses(reference, dep, aliases, layer_samples, progress)
    per_output = {o: _ratio_db(s, e) for o, s, e in zip(outputs, sig, err)}
    first = per_output[outputs[0]] if outputs else None
    denom = math.sqrt(sig[0] * norm_d) if outputs else 0.0
    cos = dot / denom if denom > 0 else 1.0
    cond = math.sqrt(cond_dep / cond_ref) if reference.uncond is not None and cond_ref > 0 else None
    return Measurement(first, per_output, per_input, cos, cond, cond_per, layers,
                       min(layer_samples, len(inputs.samples)) if layers else 0, inputs,
                       time.perf_counter() - start, {o: s / t for o, s, t in zip(others, same, total)},
                       {o: int(n) for o, n in zip(outputs, nonfinite) if n})


# --- the floor ----------------------------------------------------------------------------------

def check_floor(m: Measurement, floor: float | None, precision: str = "") -> None:
    """Raise :class:`~edgefc.errors.QualityFloorError` (one line naming the worst output and layers)
    when the worst float output of ``m`` is below ``floor`` dB; ``None`` / ``-inf`` checks nothing."""
    if floor is None or not math.isfinite(floor) and floor < 0:
        return
    name, worst = m.worst_output
    if name is None or worst >= floor:
        return
    layers = ", ".join(f"{x.layer} ({x.op}, {x.sqnr_db:.1f} dB)" for x in m.worst_layers(FLOOR_LAYERS)) or "not probed"
    where = {"eval": "the --eval inputs", "calib-heldout": "the held-out part of --calib",
             "generated": "generated inputs (not real data: give --calib/--eval from `edgefc calibrate` or your own)"}
    out = f"output '{name}' " if len(m.sqnr_db_per_output) > 1 else ""
    raise QualityFloorError(
        f"the {precision + ' ' if precision else ''}build measures {worst:.1f} dB SQNR {out}on {where[m.inputs.source]}, "
        f"under the --min-sqnr floor of {floor:g} dB; worst layers: {layers}. Keep them in higher precision "
        f"(--keep-fp32), choose another --precision, or lower --min-sqnr")
