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
  ``eval_file``      a ``.npz`` of held-out evaluation inputs (``--eval``; else the last quarter of
                     ``calib``, else generated: :func:`edgefc.passes.calibration.choose_inputs`);
  ``min_sqnr``       the quality floor in dB (``--min-sqnr``; default
                     :data:`edgefc.passes.quant_eval.DEFAULT_MIN_SQNR_DB`, ``-inf`` for none): a build
                     whose worst float output measures below it on the evaluation inputs fails the
                     compile (one line naming the worst layers) instead of being written;
  ``calib_method``   ``minmax`` (default) | ``percentile`` | ``mse`` (activation ranges);
  ``calib_samples``  how many calibration inputs (default per component, see calibration.py);
  ``keep_fp32``      node-name globs / ``re:`` regexes / op types kept in FP32 (repeatable);
  ``eval_samples``   evaluation inputs for the SQNR (default: every one of a file up to a cap, else
                     8 generated; 0 skips the measurement and the floor);
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
kept in higher precision and why, ``eval_source`` (``eval`` | ``calib-heldout`` | ``generated``),
``min_sqnr_db`` (the floor the build was held to), and the figures of
:class:`edgefc.passes.quant_eval.Measurement`: ``sqnr_db`` (10 log10(sum ref^2 / sum (ref - out)^2)
over every evaluation input pooled, first float output), ``sqnr_db_per_output``,
``sqnr_db_per_input``, ``cosine``, ``conditioning`` (U-Net with an empty-prompt embedding in its
inputs: how much the text still steers the build, 1 = as much as FP32), and ``worst_layers``: the
ten layers with the lowest per-layer SQNR - each layer run in its deployed precision on the FP32
model's own activations (its quantized inputs, weights and output), so each figure is that layer's
own error, summed over the first two evaluation inputs (these probes double the reference's
compute). Generated evaluation inputs come from the calibration generator with another seed
(U-Net: timesteps evenly spanning 0..999).

Modules: :mod:`~edgefc.passes.quant_policy` (what stays in higher precision),
:mod:`~edgefc.passes.calibration` (which inputs), :mod:`~edgefc.passes.calib_stats` and
:mod:`~edgefc.passes.observers` (activation ranges), :mod:`~edgefc.passes.w8a16` and
:mod:`~edgefc.passes.fp16` (the rewrites), :mod:`~edgefc.passes.quant_eval` (the SQNR report),
:mod:`~edgefc.passes.disk_model` (onnxruntime without holding the weights twice).

Memory: the pass never holds the model twice in Python. The FP32 graph and the deployed graph are
each written once to a temporary folder with external data (:class:`~edgefc.passes.disk_model.DiskModel`);
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
from pathlib import Path
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from edgefc.components import detect_component
from edgefc.errors import QuantizationError
from edgefc.memory import detach_from_proto, release_memory
from edgefc.pass_base import Pass, PassContext
from edgefc.passes import calib_stats, quant_eval, w8a16
from edgefc.passes import calibration as cal
from edgefc.passes import fp16 as fp16_mod
from edgefc.passes import quant_policy as qp
from edgefc.passes.disk_model import DiskModel
from edgefc.registry import register_pass

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
    floor = o.get("min_sqnr")
    floor = quant_eval.DEFAULT_MIN_SQNR_DB if floor is None else float(floor)
    if math.isnan(floor) or floor == math.inf:
        raise QuantizationError(f"--min-sqnr must be a number of dB or -inf (got {floor})")
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
        "eval_file": o.get("eval_file"), "floor": floor,
        "policy": policy, "percentile": percentile,
        "chunk_bytes": int(float(o.get("calib_chunk_mb") or 512) * (1 << 20)),
        "progress": bool(o.get("progress", True)),
    }



# --- report helpers -----------------------------------------------------------------------------

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
                entry = out["weights"][np.dtype(t.dtype).name]
                entry[0] += 1
                entry[1] += int(t.values.nbytes)
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
        entry = out["activations"][dt.name]
        entry[0] += 1
        entry[1] += n * dt.itemsize
    return {k: {d: {"tensors": c, "bytes": b} for d, (c, b) in sorted(v.items())} for k, v in out.items()}



# --- the pass -----------------------------------------------------------------------------------

def _unique_names(graph: gs.Graph) -> None:
    seen = Counter()
    for i, n in enumerate(graph.nodes):
        if not n.name:
            n.name = f"{n.op}_{i}"
        seen[n.name] += 1
        if seen[n.name] > 1:
            n.name = f"{n.name}__{seen[n.name] - 1}"



def _summarise_kept(kept: dict[str, str], limit: int = 8) -> dict:
    by_rule = defaultdict(list)
    for name, reason in kept.items():
        by_rule[reason.split(":")[0]].append(name)
    return {rule: {"count": len(names), "examples": names[:limit]} for rule, names in sorted(by_rule.items())}



def _is_fp32(t: gs.Tensor) -> bool:
    try:
        return t.dtype is not None and np.dtype(t.dtype) == np.float32
    except TypeError:  # a type numpy does not have (bfloat16, float8 ...)
        return False


@dataclasses.dataclass
class QuantizeOptions:
    """Options of ``quantize`` (see the module docstring; validated again by ``_options``)."""

    precision: str | None = None
    component: str | None = None
    calib: Path | None = None           # a .npz of calibration inputs
    eval_file: Path | None = None       # a .npz of held-out evaluation inputs (--eval)
    min_sqnr: float | None = None       # the quality floor in dB (--min-sqnr; -inf: none)
    calib_method: str | None = None
    calib_samples: int | None = None
    keep_fp32: tuple[str, ...] = ()
    eval_samples: int | None = None
    quant_policy: Any = None            # a QuantPolicy or a dict of its fields (Python API)
    calib_percentile: float | None = None
    calib_chunk_mb: float | None = None
    progress: bool = True


@register_pass("quantize", namespace="edgefc")
class Quantize(Pass):
    """Mixed-precision PTQ: W8A16 U-Net, FP16 text encoder and VAE decoder, checked against FP32 (paper Sec. 2.3/4.2)."""

    verify_tolerance = 0.1
    Options = QuantizeOptions

    def run(self, graph: gs.Graph, ctx: PassContext) -> gs.Graph:
        opts = _options(ctx)
        detected = detect_component(t.name for t in graph.inputs)
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
        if not any(_is_fp32(t) for t in graph.tensors().values()):
            report["reason"] = "the model has no FP32 tensors (integer, FP16 or FP64 only): nothing to quantize"
            report["precision"] = "as-is"
            ctx.report["quantization"] = report
            return graph
        if any(n.op in ("QuantizeLinear", "DequantizeLinear") for n in graph.nodes):
            raise QuantizationError("the model is already quantized (it has QuantizeLinear/DequantizeLinear nodes)")
        _unique_names(graph)
        detach_from_proto(graph)
        progress = opts["progress"]
        start = time.perf_counter()
        samples, calib_info, evals = cal.choose_inputs(graph, component, calib=opts["calib"], eval_file=opts["eval_file"],
                                                       calib_samples=opts["samples"], eval_samples=opts["eval"])
        calib_info["method"] = opts["method"] if precision == "w8a16" else "minmax (FP16 overflow guard)"
        report["eval_source"] = evals.source
        report["min_sqnr_db"] = opts["floor"] if math.isfinite(opts["floor"]) else None
        with tempfile.TemporaryDirectory(prefix="edgefc-quant-") as tmp:
            ref = DiskModel(graph, tmp, "reference")
            if precision == "w8a16":
                details, aliases = self._w8a16(graph, ctx, ref, samples, opts, calib_info)
            else:
                details, aliases = self._fp16(graph, ref, samples, opts, calib_info)
            del samples
            report["calibration"] = calib_info
            report.update(details)
            report["dtypes"] = dtype_summary(graph)
            if evals.samples:
                reference = quant_eval.Reference.compute(ref, evals, progress)
                dep = DiskModel(graph, tmp, "deployed")
                m = quant_eval.measure(reference, dep, aliases, progress=progress)
                report.update(m.report())
                report["seconds"] = round(time.perf_counter() - start, 2)
                ctx.report["quantization"] = report
                quant_eval.check_floor(m, opts["floor"], precision)
            else:
                report["sqnr_db"] = None
                report["reason_no_sqnr"] = "--eval-samples 0: not measured, and the --min-sqnr floor not checked"
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
                axes = w8a16.mean_axes(node, tensors[x])
                if axes is not None:
                    means[x] = axes
        stats = calib_stats.collect_stats(ref, samples, plan.calibrated, means, opts["progress"])
        ranges = {t: (stats.lo[t], stats.hi[t]) for t in plan.calibrated}
        exact: set[str] = set()
        domain = cal.enumerable_input(graph, opts["component"] or detect_component(t.name for t in graph.inputs))
        if domain is not None:
            name, values = domain
            dstats = calib_stats.collect_domain_stats(ref, name, values, plan.calibrated, opts["progress"])
            for t in dstats.lo:
                ranges[t] = (dstats.lo[t], dstats.hi[t])
            exact = set(dstats.lo)
            calib_info["exhaustive"] = {"input": name, "values": f"{values[0]}..{values[-1]}", "tensors": len(exact),
                                        "seconds": round(dstats.seconds, 2)}
        if opts["method"] != "minmax":
            sizes = {t: 4 * int(np.prod(tensors[t].shape)) for t in plan.calibrated}
            hists = calib_stats.collect_histograms(ref, samples, plan.calibrated, ranges, sizes,
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
        counts = w8a16.apply_w8a16(graph, plan, ranges, stats.means, policy)
        release_memory()
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
            stats = calib_stats.collect_stats(ref, samples, names, None, opts["progress"])
            absmax = {t: max(abs(stats.lo[t]), abs(stats.hi[t])) for t in names}
            calib_info["seconds"] = round(stats.seconds, 2)
            calib_info["largest_activation"] = round(max(absmax.values()), 3) if absmax else None
        kept = fp16_mod.plan_fp16(graph, policy, absmax)
        outputs_before = [t.name for t in graph.outputs]
        counts = fp16_mod.convert_fp16(graph, kept)
        aliases = {f"{n}__fp16": n for n in outputs_before}
        details = {"fp16": counts, "kept_higher_precision": _summarise_kept(kept)}
        return details, aliases
