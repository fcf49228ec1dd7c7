"""Pass ``quantize``: mixed-precision post-training quantization (EdgeFusion, paper Sec. 2.3 / 4.2).

The paper deploys the text encoder and the VAE decoder with FP16 weights and activations and
the U-Net with INT8 weights and INT16 activations (W8A16), with "no performance degradation
after applying the W8A16 quantization". This pass does that to a canonicalized (and usually
fused) graph, checks the result against the FP32 graph in onnxruntime, and reports how close it is.

Options (``edgefc compile`` flags; :class:`QuantizeOptions`, read through ``ctx.option``):
  ``precision``      ``auto`` (default: :data:`edgefc.precision.DEPLOYED`, FP16 for the text
                     encoder and VAE decoder, W8A16 for the U-Net; for any other model W8A16 on an
                     NPU target (:data:`edgefc.precision.AUTO_OTHER`), FP32 without one; on an NPU
                     target with real evaluation inputs (``--eval``, or ``--calib`` with a held-out
                     part) ``search`` instead of W8A16; a model that is already quantized is kept
                     as given), ``fp32``, ``fp16``, ``w8a16``, ``w8a8``, ``search``;
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
  ``layer_precision`` ``PATTERN=PRECISION`` (repeatable): the matching ops at that precision
                     (``fp32``, ``fp16``, ``w8a16``, ``w8a8``) in a W8A16 / W8A8 build; the
                     conversions between precisions are added and priced;
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

The decision, written once: every op's precision is recorded on its node
(:func:`edgefc.precision.set_op_precision`, saved as the node's ``metadata_props``
``edgefc.precision``) and every tensor's storage type is in the graph (its dtype, or its Q/DQ's);
MLT, the lowering, the cost model, the TVM build and ``edgefc.models`` read them
(:class:`edgefc.deployed_types.DeployedTypes`), none decides again.

Report (``ctx.report["quantization"]``): ``precision``, ``component``, the calibration used,
``op_precisions`` (ops per recorded precision), ``dtypes`` (per-tensor deployed types: counts and
bytes of weights and activations), what was
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
:mod:`~edgefc.passes.observers` (activation ranges), :mod:`~edgefc.passes.qdq` and
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
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from edgefc import ir
from edgefc import precision as pr
from edgefc.attention import is_deferred
from edgefc.components import detect_component
from edgefc.deployed_types import DeployedTypes
from edgefc.dtypes import DTYPE_BYTES
from edgefc.errors import QuantizationError
from edgefc.memory import detach_from_proto, release_memory
from edgefc.pass_base import Pass, PassContext
from edgefc.passes import calib_stats, mlt, precision_search, qdq, quant_eval
from edgefc.passes import calibration as cal
from edgefc.passes import fp16 as fp16_mod
from edgefc.passes import quant_policy as qp
from edgefc.passes.disk_model import DiskModel
from edgefc.registry import register_pass
from edgefc.staging import temp_dir

# --- options ------------------------------------------------------------------------------------

def _options(ctx: PassContext) -> dict:
    """The pass's validated options (:class:`QuantizeOptions`, read through ``ctx.option``), with the
    policy assembled from ``quant_policy`` and ``keep_fp32``."""
    keep = list(ctx.option("keep_fp32") or ())
    layers = list(ctx.option("layer_precision") or ())
    policy = ctx.option("quant_policy")
    if policy is None:
        policy = qp.QuantPolicy(keep_fp32=keep, layer_precision=layers)
    elif isinstance(policy, dict):
        policy = qp.QuantPolicy(**{"keep_fp32": keep, "layer_precision": layers, **policy})
    elif keep or layers:
        policy = dataclasses.replace(policy, keep_fp32=list(policy.keep_fp32) + keep,
                                     layer_precision=list(policy.layer_precision) + layers)
    samples, evals = ctx.option("calib_samples"), ctx.option("eval_samples")
    return {
        "precision": ctx.option("precision", "auto"), "component": ctx.option("component"),
        "calib": ctx.option("calib"), "method": ctx.option("calib_method", "minmax"),
        "samples": samples, "eval": evals, "eval_file": ctx.option("eval_file"),
        "floor": ctx.option("min_sqnr", quant_eval.DEFAULT_MIN_SQNR_DB), "policy": policy,
        "percentile": ctx.option("calib_percentile", 99.999),
        "chunk_bytes": int(ctx.option("calib_chunk_mb", 512) * (1 << 20)),
        "progress": ctx.option("progress", True),
    }


#: evaluation sources that are the user's own inputs (``auto`` becomes ``search`` with them)
REAL_SOURCES = ("eval", "calib-heldout")


def _input_files(opts: dict) -> list[str]:
    """The user's input files (``--eval``, ``--calib``) by name."""
    return [f"--{k.split('_')[0]} {Path(str(opts[k])).name}" for k in ("eval_file", "calib") if opts.get(k)]


# --- report helpers -----------------------------------------------------------------------------

_NP_NAME = {"fp64": "float64", "fp32": "float32", "fp16": "float16"}


def dtype_summary(graph: gs.Graph) -> dict:
    """Deployed type of every weight and activation: {"weights"|"activations": {dtype: {tensors, bytes}}}.

    A weight is a constant with more than one element (a DequantizeLinear input counts at its
    integer type); an activation is a model input or the output of a node other than a storage
    alias (Reshape ..., Q/DQ) or Cast, at the type it is stored in
    (:class:`edgefc.deployed_types.DeployedTypes`: int16 when it passes through a QuantizeLinear)."""
    types = DeployedTypes(graph)
    out = {"weights": defaultdict(lambda: [0, 0]), "activations": defaultdict(lambda: [0, 0])}
    skip_ops = pr.STORAGE_ALIAS_OPS | {"Cast"}
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
        if t.name in seen or not qp.is_float_tensor(t):
            continue
        seen.add(t.name)
        code = types.of(t)
        n = int(np.prod(t.shape)) if t.shape is not None and all(isinstance(d, (int, np.integer)) for d in t.shape) else 0
        entry = out["activations"][_NP_NAME.get(code, code)]
        entry[0] += 1
        entry[1] += n * DTYPE_BYTES[code]
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



def _say_eval_cost(n: int, source: str, calib_info: dict, n_calib: int, layer_samples: int = 2) -> None:
    """One line before the SQNR measurement: what it runs, roughly how long (from calibration's
    time per forward pass) and how to skip it -- on the VAE decoder it is most of the compile."""
    k = min(layer_samples, n)
    line = (f"  quantize: measuring SQNR vs FP32 on {n} {source} input{'s' if n != 1 else ''} (FP32 reference, "
            f"deployed model in a default and an unoptimised session, per-layer probes on the first {k})")
    seconds = calib_info.get("seconds")
    if isinstance(seconds, (int, float)) and seconds > 0 and n_calib:
        per = seconds / n_calib
        line += f", about {per * (3 * n + 2 * k):.0f} s at calibration's {per:.1f} s per forward pass"
    print(line + "; --eval-samples 0 skips it", file=sys.stderr, flush=True)


def _summarise_kept(kept: dict[str, str], limit: int = 8) -> dict:
    by_rule = defaultdict(list)
    for name, reason in kept.items():
        by_rule[reason.split(":")[0]].append(name)
    return {rule: {"count": len(names), "examples": names[:limit]} for rule, names in sorted(by_rule.items())}



def _is_fp32(t: gs.Tensor) -> bool:
    return qp.is_float_tensor(t) and np.dtype(t.dtype) == np.float32


@dataclasses.dataclass
class Calibration:
    """Calibrated activation ranges (``exact``: over an input's whole domain, never widened), the
    input channel means for bias correction, and the headroom per integer type (minmax)."""

    ranges: dict[str, tuple[float, float]]
    exact: set[str]
    means: dict[str, np.ndarray]
    headroom: dict[str, float]


@dataclasses.dataclass
class IntegerState:
    """What building other plans of an integer build needs: the FP32 graph (a copy sharing its
    weights), the current plan, the calibration, the policy, the ops the search leaves fixed, and
    the quantized weights (each quantized once)."""

    fp32: gs.Graph
    plan: qp.PrecisionPlan
    calibration: Calibration
    policy: qp.QuantPolicy
    fixed: set[str]
    weight_cache: dict = dataclasses.field(default_factory=dict)
    defer: Any = None   # node -> whether its normalisation is deferred (edgefc.passes.mlt.deferral_pays)


#: rounds of the rescue (1, 2, 4 ... layers raised: up to 2**ROUNDS - 1 layers one step or more)
RESCUE_ROUNDS = 6


@dataclasses.dataclass
class QuantizeOptions:
    """Options of ``quantize`` (see the module docstring), checked here once, when the pass is
    configured (``edgefc compile`` flags, ``edgefc.compile(options=...)`` or ``get_pass("quantize",
    ...)``); the pass reads them only through ``ctx.option``."""

    precision: str | None = None        # edgefc.precision.REQUESTS; None: auto
    component: str | None = None        # edgefc.precision.COMPONENTS; None: from the input names
    calib: Path | None = None           # a .npz of calibration inputs
    eval_file: Path | None = None       # a .npz of held-out evaluation inputs (--eval)
    min_sqnr: float | None = None       # the quality floor in dB (--min-sqnr; -inf: none)
    calib_method: str | None = None     # calibration.METHODS; None: minmax
    calib_samples: int | None = None
    keep_fp32: tuple[str, ...] = ()
    layer_precision: tuple[str, ...] = ()   # PATTERN=PRECISION, per layer (--layer-precision)
    eval_samples: int | None = None
    quant_policy: Any = None            # a QuantPolicy or a dict of its fields (Python API)
    calib_percentile: float | None = None
    calib_chunk_mb: float | None = None
    progress: bool = True

    def __post_init__(self):
        if self.precision is not None:
            self.precision = self.precision.lower()
            if self.precision not in pr.REQUESTS:
                raise ValueError(f"unknown precision '{self.precision}' (choose from {', '.join(pr.REQUESTS)})")
        if self.component is not None and self.component not in pr.COMPONENTS:
            raise ValueError(f"unknown component '{self.component}' (choose from {', '.join(pr.COMPONENTS)})")
        if self.calib_method is not None:
            self.calib_method = self.calib_method.lower()
            if self.calib_method not in cal.METHODS:
                raise ValueError(f"unknown calibration method '{self.calib_method}' "
                                 f"(choose from {', '.join(cal.METHODS)})")
        if self.calib_samples is not None and self.calib_samples < 1:
            raise ValueError(f"--calib-samples must be at least 1 (got {self.calib_samples})")
        if self.eval_samples is not None and self.eval_samples < 0:
            raise ValueError(f"--eval-samples must be 0 or more (got {self.eval_samples})")
        if self.min_sqnr is not None and (math.isnan(self.min_sqnr) or self.min_sqnr == math.inf):
            raise ValueError(f"--min-sqnr must be a number of dB or -inf (got {self.min_sqnr})")
        if self.calib_percentile is not None and not 50.0 < self.calib_percentile <= 100.0:
            raise ValueError(f"calib_percentile must be in (50, 100] (got {self.calib_percentile})")
        if self.calib_chunk_mb is not None and not self.calib_chunk_mb > 0:
            raise ValueError(f"calib_chunk_mb must be positive (got {self.calib_chunk_mb})")


@register_pass("quantize", namespace="edgefc")
class Quantize(Pass):
    """Mixed-precision PTQ: W8A16 U-Net, FP16 text encoder and VAE decoder, checked against FP32 (paper Sec. 2.3/4.2)."""

    verify_tolerance = 0.1
    Options = QuantizeOptions

    def run(self, graph: gs.Graph, ctx: PassContext) -> gs.Graph:
        opts = _options(ctx)
        detected = detect_component(t.name for t in graph.inputs)
        component = opts["component"] or detected
        npu = bool(ctx.target is not None and ctx.target.is_npu)
        precision = pr.resolve(opts["precision"], component, npu=npu)
        report: dict = {"precision": precision, "requested": opts["precision"], "component": component,
                        "component_source": "--component" if opts["component"] else ("inputs" if detected else None)}
        if opts["precision"] == "auto" and component not in pr.DEPLOYED:
            report["reason"] = (f"auto: not a text encoder, U-Net or VAE decoder (by its input names): "
                                f"{precision.upper()}{' on an NPU target' if npu else ' (no NPU target)'}; "
                                "--precision or --component choose otherwise")
        if precision == "fp32":
            ctx.report["quantization"] = report
            return graph
        if not any(_is_fp32(t) for n in graph.nodes for t in n.inputs if not isinstance(t, gs.Constant)):
            report["reason"] = ("no FP32 tensors reach a node (the model is integer, FP16 or FP64 only, or its outputs "
                                "are constants): nothing to quantize")
            report["precision"] = "as-is"
            ctx.report["quantization"] = report
            return graph
        if any(n.op in ("QuantizeLinear", "DequantizeLinear") for n in graph.nodes):
            if opts["precision"] != "auto":
                raise QuantizationError("the model is already quantized (it has QuantizeLinear/DequantizeLinear nodes)")
            report["reason"] = "auto: the model is already quantized (QuantizeLinear/DequantizeLinear): kept as given"
            report["precision"] = "as-is"
            ctx.report["quantization"] = report
            return graph
        _unique_names(graph)
        detach_from_proto(graph)
        progress = opts["progress"]
        start = time.perf_counter()
        samples, calib_info, evals = cal.choose_inputs(graph, component, calib=opts["calib"], eval_file=opts["eval_file"],
                                                       calib_samples=opts["samples"], eval_samples=opts["eval"])
        real = evals.source in REAL_SOURCES and bool(evals.samples)
        if opts["precision"] == "auto" and pr.resolve("auto", component, npu=npu, real_inputs=real) != precision:
            precision = report["precision"] = pr.resolve("auto", component, npu=npu, real_inputs=real)
            first = report["reason"] + "; then " if "reason" in report else ""
            report["reason"] = (f"{first}auto with real inputs ({evals.source}: {', '.join(_input_files(opts))}) on an NPU "
                                "target: search (one precision per layer group, measured on those inputs and priced "
                                "by the target) instead of the uniform W8A16; --precision w8a16 builds that")
        integer = precision in pr.INTEGER_PRECISIONS or precision == "search"
        calib_info["method"] = opts["method"] if integer else "minmax (FP16 overflow guard)"
        report["eval_source"] = evals.source
        report["min_sqnr_db"] = opts["floor"] if math.isfinite(opts["floor"]) else None
        n_calib = len(samples)
        with temp_dir("quant") as tmp:  # edgefc-quant-PID-*: a later run removes it if this one is killed
            ref = DiskModel(graph, tmp, "reference")
            state, built, reference = None, None, None
            if precision in pr.INTEGER_PRECISIONS or precision == "search":
                state = self._prepare_integer(graph, ctx, ref, samples, opts, calib_info, precision)
                if precision != "search":
                    details, aliases, fp32_nodes = self._build_integer(graph, state, state.plan)
            else:
                details, aliases, fp32_nodes = self._fp16(graph, ref, samples, opts, calib_info)
            del samples
            if precision == "search":
                if not evals.samples:
                    raise QuantizationError("--precision search measures plans on evaluation inputs: give --eval or "
                                            "--calib, and an --eval-samples above 0")
                reference = quant_eval.Reference.compute(ref, evals, progress)
                built = self._search(ctx, state, reference, tmp, opts, report)
                graph, details, aliases, fp32_nodes = built[:4]
            report["calibration"] = calib_info
            report.update(details)
            if "op_precisions" not in report:   # the integer rewrite recorded them already
                report["op_precisions"] = qdq.record_precisions(graph, fp32_nodes)
            if evals.samples:
                if progress and built is None:
                    _say_eval_cost(len(evals.samples), evals.source, calib_info, n_calib)
                if reference is None:
                    reference = quant_eval.Reference.compute(ref, evals, progress)
                if built is None:
                    dep = DiskModel(graph, tmp, "deployed")
                    built = (graph, details, aliases, fp32_nodes, quant_eval.measure(reference, dep, aliases,
                                                                                     progress=progress), dep)
                if state is not None and built[4].worst_output[1] < opts["floor"]:
                    built = self._rescue(state, built, reference, tmp, opts, report)
                    if built[0] is not graph:
                        graph, details, aliases, fp32_nodes = built[:4]
                        report.update(details)
                        report["op_precisions"] = details["op_precisions"]
                m, dep = built[4], built[5]
                if state is not None and (precision == "search" or "rescue" in report):
                    report["precision"] = pr.describe_plan(pr.recorded_plan(graph)) or precision
                report["dtypes"] = dtype_summary(graph)
                report.update(m.report())
                exact = quant_eval.measure(reference, dep, aliases, layer_samples=0, progress=progress, as_written=True)
                if exact.sqnr_db is not None:
                    report["sqnr_db_as_written"] = quant_eval.finite_db(exact.sqnr_db)
                report["seconds"] = round(time.perf_counter() - start, 2)
                ctx.report["quantization"] = report
                quant_eval.check_floor(m, opts["floor"], report["precision"])
            else:
                report["dtypes"] = dtype_summary(graph)
                report["sqnr_db"] = None
                report["reason_no_sqnr"] = "--eval-samples 0: not measured, and the --min-sqnr floor not checked"
        report["seconds"] = round(time.perf_counter() - start, 2)
        ctx.report["quantization"] = report
        return graph

    # -- integer precisions: W8A16, W8A8, per-op plans --
    def _prepare_integer(self, graph, ctx, ref, samples, opts, calib_info, precision) -> IntegerState:
        """The plan of the request (``search``: every op W8A16, the plan the search starts from),
        the calibration of every tensor an integer plan of this graph may store, and an FP32 copy
        of the graph to build other plans from (the rescue, the search)."""
        policy: qp.QuantPolicy = opts["policy"]
        component = opts["component"] or detect_component(t.name for t in graph.inputs)
        domain = cal.enumerable_input(graph, component)
        time_input = domain[0] if domain else None
        base = "w8a16" if precision == "search" else precision
        plan = qp.plan_precisions(graph, base, policy, time_input=time_input)
        qplan = qp.plan_qdq(graph, plan, policy)
        calibration = self._calibrate(graph, ref, samples, opts, calib_info, qplan, domain)
        fixed = set()
        if time_input and policy.rule("time-embedding"):
            only = qp.input_only_tensors(graph, time_input)
            fixed = {n.name for n in graph.nodes if n.name in plan.ops and all(
                t.name in only for t in n.inputs if t is not None and t.name and not isinstance(t, gs.Constant))}
        return IntegerState(ir.copy_graph(graph), plan, calibration, policy, fixed,
                            defer=lambda node: mlt.deferral_pays(node, ctx))

    def _build_integer(self, graph, state: IntegerState, plan) -> tuple[dict, dict, set]:
        """Build ``plan`` into ``graph`` in place: (report details, output aliases, FP32 ops)."""
        policy, cal_ = state.policy, state.calibration
        qplan = qp.plan_qdq(graph, plan, policy)
        outputs_before = [t.name for t in graph.outputs]
        counts = qdq.apply_plan(graph, plan, qplan, cal_.ranges, cal_.means, policy, cal_.headroom, cal_.exact,
                                state.weight_cache, defer=state.defer)
        release_memory()
        op_precisions = counts.pop("op_precisions")
        deferred = {n.name for n in graph.nodes if n.name in plan.scores and is_deferred(n)}
        aliases = {f"{n}__float": n for n in outputs_before}
        types = Counter(qplan.storage.values())
        schemes = {"int16": f"int16 {'symmetric' if policy.activation_symmetric else 'asymmetric'} per tensor",
                   "int8": f"int8 {'symmetric' if policy.int8_symmetric else 'asymmetric'} per tensor"}
        details = {
            "weights": {"scheme": "int8 symmetric per output channel", "quantized": len({w for w in qplan.weights}),
                        **counts},
            "activations": {"scheme": ", ".join(schemes[t] for t in ("int16", "int8") if t in types),
                            "quantized": len(qplan.quantized), "by_type": dict(sorted(types.items())),
                            "calibrated": len(qplan.calibrated), "sharing_input_scale": len(qplan.inherits)},
            "kept_higher_precision": _summarise_kept({**qplan.kept, **plan.reasons,
                                                     **{n: f"attention-scores: softmax internals {t}"
                                                        for n, t in plan.scores.items()}}),
            "op_precisions": op_precisions,
        }
        if deferred:   # attentions rewritten to the deferred normalisation (TiledAttention, UINT8 S_out)
            details["deferred_normalization"] = len(deferred)
        return details, aliases, {n for n, p in plan.ops.items() if p == "fp32"}

    def _candidate(self, state: IntegerState, plan, reference, tmp, name: str, progress: bool):
        """Build ``plan`` from the FP32 copy and measure it: (graph, details, aliases, FP32 ops,
        measurement, its DiskModel)."""
        g = ir.copy_graph(state.fp32)
        details, aliases, fp32_nodes = self._build_integer(g, state, plan)
        dep = DiskModel(g, tmp, name)
        m = quant_eval.measure(reference, dep, aliases, progress=progress)
        return g, details, aliases, fp32_nodes, m, dep

    def _search(self, ctx, state: IntegerState, reference, tmp, opts, report):
        """``--precision search`` (:mod:`edgefc.passes.precision_search`): the points, then the
        fastest candidate that meets the floor built and measured on every evaluation input (the
        next slower one if it misses). Returns what :meth:`_candidate` returns for the choice."""
        progress = opts["progress"]
        floor = opts["floor"]
        result = precision_search.search(state.fp32, ctx, state.plan, state.fixed, state.calibration, reference,
                                         state.policy, floor, tmp, progress)
        tried = []
        best = None
        for k, j in enumerate(result.candidates):
            point = result.points[j]
            precision_search._say(progress, f"building the point at {point['ms']:.2f} ms ({point['sqnr_db']} dB "
                                            "emulated) and measuring it on every evaluation input")
            built = self._candidate(state, result.plans[j], reference, tmp, f"search-{k}", progress)
            worst = built[4].worst_output[1]
            tried.append({"point": j, "sqnr_db": quant_eval.finite_db(worst)})
            if best is None or worst > best[1][4].worst_output[1]:
                best = (j, built)
            if not math.isfinite(floor) or worst >= floor:
                best = (j, built)
                break
        j, built = best
        points = [dict(p) for p in result.points]
        points[j]["emulated_sqnr_db"] = points[j]["sqnr_db"]
        points[j]["sqnr_db"] = quant_eval.finite_db(built[4].sqnr_db)
        points[j]["measured"] = f"the build, all {len(reference.inputs.samples)} evaluation inputs"
        state.plan = result.plans[j]
        report["search"] = {"points": points, "chosen": j, "floor_db": floor if math.isfinite(floor) else None,
                            "tried": tried, **result.report}
        title = (f"{report.get('component') or 'model'}: --precision search, {len(points)} points; chosen "
                 f"{points[j]['ms']:.1f} ms / {points[j]['sqnr_db']} dB")
        ctx.artifacts["precision.png"] = lambda path: precision_search.plot(path, points, j, floor, title)
        return built

    def _rescue(self, state: IntegerState, built, reference, tmp, opts, report):
        """Keep the layers that lose the most one precision higher, 1, 2, 4 ... of them per round,
        until the build meets the floor (:func:`edgefc.passes.precision_search.rescue_plan`)."""
        floor, progress = opts["floor"], opts["progress"]
        m = built[4]
        attempts = [{"layers_raised": 0, "sqnr_db": quant_eval.finite_db(m.worst_output[1])}]
        changed = []
        count = 1
        for r in range(RESCUE_ROUNDS):
            if m.worst_output[1] >= floor or not m.layers:
                break
            plan, notes = precision_search.rescue_plan(state.plan, m.layers, count, state.fp32)
            if not notes:
                break
            if progress:
                print(f"  quantize: {m.worst_output[1]:.1f} dB is under the floor of {floor:g} dB: rescue round "
                      f"{r + 1}, {len(notes)} more layer(s) one precision higher", file=sys.stderr, flush=True)
            state.plan = plan
            changed += notes
            built[5].path.unlink(missing_ok=True)
            built = self._candidate(state, plan, reference, tmp, f"rescue-{r}", progress)
            m = built[4]
            attempts.append({"layers_raised": len(changed), "sqnr_db": quant_eval.finite_db(m.worst_output[1])})
            count *= 2
            best_before = max(a["sqnr_db"] or -1e9 for a in attempts[:-3]) if len(attempts) > 3 else None
            if best_before is not None and max(a["sqnr_db"] or -1e9 for a in attempts[-3:]) < best_before + 0.1:
                break   # three rounds without a gain: the loss is not in the layers' own errors
        if changed:
            report["rescue"] = {"floor_db": floor, "rounds": attempts, "layers": changed,
                                "met_floor": bool(m.worst_output[1] >= floor)}
        return built

    def _calibrate(self, graph, ref, samples, opts, calib_info, qplan, domain) -> Calibration:
        """Ranges of every tensor ``qplan`` stores as an integer (the calibration samples' min/max,
        exact over the whole domain of an enumerable input, or a histogram method) and the input
        channel means bias correction needs."""
        policy: qp.QuantPolicy = opts["policy"]
        names = list(qplan.storage)
        tensors = graph.tensors()
        means = {}
        if policy.bias_correction:
            for node_name, x in qplan.bias_inputs.items():
                node = next(n for n in tensors[x].outputs if n.name == node_name)
                axes = qdq.mean_axes(node, tensors[x])
                if axes is not None:
                    means[x] = axes
        stats = calib_stats.collect_stats(ref, samples, names, means, opts["progress"])
        ranges = {t: (stats.lo[t], stats.hi[t]) for t in names}
        exact: set[str] = set()
        if domain is not None:
            name, values = domain
            dstats = calib_stats.collect_domain_stats(ref, name, values, names, opts["progress"])
            for t in dstats.lo:
                ranges[t] = (dstats.lo[t], dstats.hi[t])
            exact = set(dstats.lo)
            calib_info["exhaustive"] = {"input": name, "values": f"{values[0]}..{values[-1]}", "tensors": len(exact),
                                        "seconds": round(dstats.seconds, 2)}
        if opts["method"] != "minmax":
            roots = [t for t in names if t not in qplan.inherits]
            sizes = {t: 4 * int(np.prod(tensors[t].shape)) for t in roots}
            hists = calib_stats.collect_histograms(ref, samples, roots, ranges, sizes,
                                                   symmetric=policy.activation_symmetric, chunk_bytes=opts["chunk_bytes"],
                                                   progress=opts["progress"])
            for t, h in hists.items():
                ranges[t] = h.percentile_range(opts["percentile"]) if opts["method"] == "percentile" else h.mse_range()
            calib_info["histogram_chunk_bytes"] = opts["chunk_bytes"]
            if opts["method"] == "percentile":
                calib_info["percentile"] = opts["percentile"]
        headroom = {}
        if opts["method"] == "minmax":
            headroom = {"int16": policy.activation_headroom, "int8": policy.int8_headroom}
            used = set(qplan.storage.values()) | {a for c in qplan.conversions.values() for a in c}
            if policy.activation_headroom != 1.0 and "int16" in used:
                calib_info["headroom"] = policy.activation_headroom
            if policy.int8_headroom != 1.0 and "int8" in used:
                calib_info["int8_headroom"] = policy.int8_headroom
        calib_info["seconds"] = round(stats.seconds, 2)
        return Calibration(ranges, exact, stats.means, headroom)

    # -- FP16 --
    def _fp16(self, graph, ref, samples, opts, calib_info):
        policy: qp.QuantPolicy = opts["policy"]
        absmax = {}
        if policy.rule("fp16-overflow"):
            names = [t.name for n in graph.nodes for t in n.outputs if qp.is_float_tensor(t)]
            stats = calib_stats.collect_stats(ref, samples, names, None, opts["progress"])
            absmax = {t: max(abs(stats.lo[t]), abs(stats.hi[t])) for t in names}
            calib_info["seconds"] = round(stats.seconds, 2)
            calib_info["largest_activation"] = round(max(absmax.values()), 3) if absmax else None
        kept = fp16_mod.plan_fp16(graph, policy, absmax)
        outputs_before = [t.name for t in graph.outputs]
        counts = fp16_mod.convert_fp16(graph, kept)
        aliases = {f"{n}__fp16": n for n in outputs_before}
        details = {"fp16": counts, "kept_higher_precision": _summarise_kept(kept)}
        return details, aliases, set(kept)
