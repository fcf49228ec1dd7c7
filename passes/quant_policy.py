"""The precision policy of pass ``quantize``: which tensors and ops get which type (paper Sec. 2.3/4.2).

EdgeFusion deploys the U-Net with INT8 weights and INT16 activations (W8A16) and the text
encoder and VAE decoder in FP16. This module says, op by op and tensor by tensor, what that
means, and which parts stay in higher precision. Everything here is data a user can read and
override: ``--keep-fp32 PATTERN`` (a node name glob, ``re:REGEX``, or an op type) keeps matching
nodes entirely in FP32, and the Python API takes a :class:`QuantPolicy` (``ctx.options
["quant_policy"]``) whose ``rules`` can switch off any default rule below.

W8A16 (``precision="w8a16"``)
    * Weights: INT8, symmetric (zero point 0, range [-127, 127]), one scale per output channel
      (:data:`WEIGHT_OPS` gives the weight input and the output-channel axis): Conv, ConvTranspose,
      Gemm, MatMul with a constant second input, edgefc FusedConv and FusedMatMul - which include
      every projection that feeds an ``Attention`` (Q, K, V and the output projection).
      Biases stay FP32 (the NPU adds them in its wide accumulator; a few KB per layer).
      Embedding tables (Gather) and normalisation scale/bias stay FP32 (lookups and per-channel
      vector-engine parameters, not tensor-engine weights).
    * Activations: INT16, one scale per tensor, **symmetric** (zero point 0) by default: every
      float tensor a node produces and every float model input, except the higher-precision
      regions below. Why symmetric: the INT8 x INT16 products accumulate with no zero-point
      correction term (an asymmetric activation costs a per-output sum of the weights times the
      zero point), and 16 bits leave so much resolution that the one bit an asymmetric range
      would win on one-sided tensors (SiLU/GELU outputs) is invisible next to the INT8 weight
      error: measured on the full-size BK-SDM-Tiny U-Net in docs/quantization.md.
      ``activation_symmetric=False`` selects asymmetric INT16.
    * Ranges (``minmax``, the default): the calibration min/max times ``activation_headroom``
      (2: one of the 16 bits spent on inputs beyond the calibration set - the max of a few samples
      underestimates the next sample's, and a clipped outlier costs far more than a 6 dB higher
      INT16 noise floor, which stays ~40 dB under the INT8 weight error). Tensors that depend only
      on the U-Net's timestep (the time-embedding path) get exact ranges over all 1000 timesteps
      instead (``calibration.collect_domain_stats``), no headroom.
    * Data-movement ops (Transpose, Slice, Split, Resize nearest/linear, Expand, Tile, MaxPool,
      Gather on data) reuse their input's scale, so their Q/DQ is exact; alias ops (Reshape,
      Flatten, Squeeze, Unsqueeze, Identity) get no Q/DQ of their own (the cost model and MLT
      follow aliases to the producer's type).

W8A8 (``precision="w8a8"``)
    * Weights as W8A16. Activations: INT8, one scale per tensor, **asymmetric** by default (stored
      as uint8 with a zero point, the form onnxruntime's CPU kernels take): 8 bits cannot spare
      the bit a symmetric range wastes on one-sided tensors; ``int8_symmetric=True`` selects
      symmetric. Ranges: the calibration min/max without headroom (``int8_headroom``: at 8 bits a
      bit of headroom costs more than the rare clipped outlier).
    * Wider by rule (below): the softmax input S_in of every attention (INT16), the time
      embedding (W8A16), the norm statistics and the periodic arguments (FP32). The softmax
      output is stored as INT8 with its normalisation deferred (``deferred_normalization``,
      below).

Per-op plans (``--layer-precision PATTERN=PRECISION``, the rescue, ``--precision search``)
    :func:`plan_precisions` gives every op one precision (a weighted op that reads a tensor a rule
    keeps in FP32 is an FP32 op with FP32 weights: an INT8 weight beside an FP32 activation is no
    precision of the vocabulary, the NPU has no such mode, and onnxruntime's default session turns
    ``DequantizeLinear`` (INT8 weight) -> ``MatMul`` on a float activation into ``MatMulNBits``,
    which rounds that activation to INT8); :func:`plan_qdq` turns it into storage:
    a tensor is stored at the widest integer type its readers compute at (else at its producer's);
    a reader computing at a narrower type reads a requantisation of it (a second Q/DQ pair: the
    conversion the cost model prices), an FP16 reader reads it through a Cast, an FP32 reader reads
    the tensor unquantized.

Higher-precision regions (rules; each can be switched off in ``QuantPolicy.rules``)
    ``attention-scores``
        S_in = Q K^T (and its scaling/masking) and S_out = Softmax(S_in) of an *unfused*
        attention stay FP32 (W8A16) / the Softmax runs in FP32 (FP16). A per-tensor INT16 scale
        over 4096 keys leaves ~35 dB on S_out (probabilities near 1/4096 with a step of 1/32767);
        on the NPU these are the vector engine's FP16 softmax internals. A fused ``Attention``
        hides them already: its Q, K, V inputs and its output are quantized like any tensor; in
        W8A8 its S_in is INT16 (recorded as ``edgefc.scores``; QK^T at ``int8xint8``). One INT8
        scale on the normalised S_out would leave probabilities near 1/4096 on a grid of 1/255
        (all of them 0 in the random-weight U-Net's 4096-key attentions), so with
        ``deferred_normalization`` (the default) the attention becomes a ``TiledAttention``
        whose S_out is the unnormalised exp(S_in - rowmax) in (0, 1] on the UINT8 grid of 1/255
        and whose output is divided by the row sums after S_out x V (``int8xint8``): the build
        computes exactly that (its ONNX body emulates the UINT8 S_out), so its SQNR includes it
        (measured per attention: ``bench/softmax_internals.py``). Without it, S_out is INT16 and
        S_out x V runs at ``int8xint16`` (not emulated: the body computes it in float).
    ``norm-statistics``
        Decomposed normalisation statistics (ReduceMean, ReduceSumSquare, ReduceL2, Pow, Sqrt,
        Reciprocal and the elementwise ops on their reduced results) stay FP32; squares of
        activations overflow FP16 above 256. InstanceNormalization (the exporter's GroupNorm,
        no ``stash_type``) runs in FP32 in FP16 mode. LayerNormalization / GroupNormalization
        compute their statistics in FP32 already (``stash_type=1``) and are quantized at their
        input and output only.
    ``periodic-arguments``
        The argument of Sin/Cos and everything between it and an integer input (the U-Net's
        timestep projection ``t * freq``, up to 999 rad) stays FP32: a periodic function
        needs absolute precision of its argument (an INT16 step over [0, 999] is 0.03 rad; the
        FP16 spacing at 999 is 0.5 rad), and a calibration range that misses the largest
        timestep clips the embedding (the 13.9 dB outlier of onnxruntime's quantizer).
    ``log-arguments``
        The argument of every ``Log`` and the values it is computed from, back through elementwise
        ops and reductions to a tensor-engine output or a model input, stay FP32 and those ops (and
        the tensor-engine op that starts the path) run in FP32: a power spectrum spans 10+ decades; a linear INT16 (or FP16) grid rounds its small
        values to zero, which the log turns into its largest errors (measured: a log-power
        spectrogram quantized to INT16 at -18.6 dB). Found by the rule, not by model name.
    ``exponentials``
        The output of an ``Exp`` whose argument is not bounded above stays FP32 (the stable
        softmax ``Exp(x - max)`` is bounded by 1 and quantized like any tensor).
    ``concat-segments``
        A ``Concat`` whose inputs' calibrated ranges differ by more than :data:`SEGMENT_RATIO`
        (4 bits) is quantized with one scale per input along the concatenated axis (a per-axis
        Q/DQ): box coordinates up to 640 next to class scores up to 1 keep the scores' own grid
        instead of 640's (a 0.02 step). Its readers calibrate their own ranges.
    ``time-embedding`` (W8A8)
        Ops that depend on nothing but the U-Net's timestep (the sinusoidal projection's MLP and
        every ResNet's ``time_emb_proj``: vectors of one row, free on the tensor engine) stay
        W8A16: INT8 would put a rounding error into every ResNet block of every step.
    ``fp16-overflow`` (FP16 only)
        A tensor whose calibrated magnitude exceeds :data:`FP16_SAFE_MAX` (a quarter of FP16's
        65504, headroom for inputs beyond the calibration set) is produced and consumed in FP32.
    ``typed-outputs`` (FP16 only)
        Ops whose output type is an attribute (ConstantOfShape, EyeLike, Random*) stay FP32.
    ``constant-values`` (W8A16)
        A float tensor whose value does not depend on the model's inputs (computed from constants;
        ``CastLike`` reads only the type of its second input) is a constant, not an activation: no
        Q/DQ. The exponent of ``Pow`` stays exact too: a rounded exponent (3.00009 for 3) on a
        negative base is NaN. (Found in the onnx operator tests that ``--precision auto`` now
        quantizes: an exported tanh-GELU's ``Pow(x, CastLike(3, x))``.)
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from edgefc import ir
from edgefc.errors import QuantizationError
from edgefc.precision import ALIAS_OPS, INTEGER_PRECISIONS, PRECISIONS, act_type

RULES = ("attention-scores", "norm-statistics", "periodic-arguments", "time-embedding", "fp16-overflow",
         "typed-outputs", "constant-values", "log-arguments", "exponentials", "concat-segments")

#: op -> (weight input index, output-channel axis of that weight); Gemm's axis depends on transB.
WEIGHT_OPS = {
    "Conv": (1, 0),
    "ConvTranspose": (1, 1),
    "FusedConv": (1, 0),
    "MatMul": (1, -1),
    "FusedMatMul": (1, -1),
    "Gemm": (1, None),
}
#: ops with a bias input (index) that bias correction may adjust.
BIAS_INPUT = {"Conv": 2, "FusedConv": 2, "FusedMatMul": 2, "Gemm": 2}

#: ops that move values without computing new ones: the output reuses the input's scale.
SCALE_PRESERVING_OPS = {"Transpose", "Slice", "Split", "Expand", "Tile", "MaxPool", "Gather", "GatherElements",
                        "DepthToSpace", "SpaceToDepth", "Pad", "Resize"}
#: ops that produce decomposed normalisation statistics.
STAT_OPS = {"ReduceMean", "ReduceSumSquare", "ReduceL2", "ReduceSum", "Pow", "Sqrt", "Reciprocal"}
#: ops whose float output type is set by an attribute (kept FP32 in FP16 mode).
TYPED_OUTPUT_OPS = {"ConstantOfShape", "EyeLike", "RandomNormal", "RandomUniform", "RandomNormalLike",
                    "RandomUniformLike", "Constant"}
#: ops that only copy or move data (no per-layer error of their own).
DATA_MOVEMENT_OPS = ALIAS_OPS | SCALE_PRESERVING_OPS | {"Concat", "QuantizeLinear", "DequantizeLinear", "Cast",
                                                        "CastLike", "Shape", "Size"}
#: ops computed in FP32 in FP16 mode regardless of data (no FP32 statistics of their own).
FP16_FP32_OPS = {"InstanceNormalization"}

FP16_MAX = 65504.0
#: largest calibrated magnitude a tensor may have to be stored in FP16 (headroom x4).
FP16_SAFE_MAX = FP16_MAX / 4

#: inputs of a Concat further apart in range than this get their own scales (concat-segments)
SEGMENT_RATIO = 16.0

INT16_MAX = 32767
INT8_MAX = 127


class NodePattern:
    """Which nodes a ``--keep-fp32`` or ``--layer-precision`` pattern names: ``re:REGEX`` (searched in
    node names), else a glob matched against the node name or the op type (``Softmax``, ``*attn1*``,
    ``/unet/conv_out/*``). (Not the rewrite engine's :class:`edgefc.pattern.Pattern`.)"""

    def __init__(self, text: str):
        self.text = text
        if not text or not text.strip():
            raise QuantizationError("--keep-fp32 needs a non-empty pattern")
        if text.startswith("re:"):
            try:
                self.regex = re.compile(text[3:])
            except re.error as e:
                raise QuantizationError(f"--keep-fp32 '{text}': bad regular expression ({e})") from None
        else:
            self.regex = None

    def matches(self, node: gs.Node) -> bool:
        name = node.name or ""
        if self.regex is not None:
            return bool(self.regex.search(name))
        return fnmatch.fnmatchcase(name, self.text) or fnmatch.fnmatchcase(node.op, self.text)

    def __repr__(self):
        return f"NodePattern({self.text!r})"


@dataclass
class QuantPolicy:
    """The overridable precision policy (see the module docstring for every rule)."""

    keep_fp32: list[str] = field(default_factory=list)
    layer_precision: list[str] = field(default_factory=list)   # "PATTERN=PRECISION" (--layer-precision)
    rules: dict[str, bool] = field(default_factory=lambda: {r: True for r in RULES})
    activation_symmetric: bool = True
    activation_headroom: float = 2.0
    int8_symmetric: bool = False
    int8_headroom: float = 1.0
    bias_correction: bool = True
    deferred_normalization: bool = True   # W8A8 attention: UINT8 exp(S - max), divided after S x V
    weight_ops: dict[str, tuple] = field(default_factory=lambda: dict(WEIGHT_OPS))

    def __post_init__(self):
        unknown = set(self.rules) - set(RULES)
        if unknown:
            raise QuantizationError(f"unknown policy rule(s) {', '.join(sorted(unknown))} (known: {', '.join(RULES)})")
        self.rules = {**{r: True for r in RULES}, **self.rules}
        for name in ("activation_headroom", "int8_headroom"):
            if not getattr(self, name) >= 1.0:
                raise QuantizationError(f"{name} must be at least 1 (got {getattr(self, name)})")
        self.patterns = [NodePattern(p) for p in self.keep_fp32]
        self.layer_patterns = []
        for text in self.layer_precision:
            pattern, sep, prec = str(text).rpartition("=")
            prec = prec.strip().lower()
            if not sep or prec not in PRECISIONS:
                raise QuantizationError(f"--layer-precision '{text}': give PATTERN=PRECISION with a precision from "
                                        f"{', '.join(PRECISIONS)}")
            self.layer_patterns.append((NodePattern(pattern), prec))

    def rule(self, name: str) -> bool:
        return bool(self.rules.get(name, True))

    def user_precisions(self, graph: gs.Graph) -> dict[str, tuple[str, str]]:
        """Nodes matched by ``layer_precision`` or ``keep_fp32`` (which wins): name -> (precision,
        reason); later ``layer_precision`` patterns win over earlier ones. A pattern that matches
        nothing is an error."""
        out: dict[str, tuple[str, str]] = {}
        for p, prec in self.layer_patterns:
            hits = [n for n in graph.nodes if p.matches(n)]
            if not hits:
                raise QuantizationError(f"--layer-precision '{p.text}={prec}' matches no node (patterns match node "
                                        f"names, 're:REGEX', or op types)")
            for n in hits:
                out[n.name] = (prec, f"--layer-precision {p.text}={prec}")
        for name, reason in self.user_kept(graph).items():
            out[name] = ("fp32", reason)
        return out

    def user_kept(self, graph: gs.Graph) -> dict[str, str]:
        """Nodes matched by ``keep_fp32``: name -> reason. A pattern that matches nothing is an error."""
        kept = {}
        for p in self.patterns:
            hits = [n for n in graph.nodes if p.matches(n)]
            if not hits:
                raise QuantizationError(f"--keep-fp32 '{p.text}' matches no node (patterns match node names, "
                                        f"'re:REGEX', or op types)")
            for n in hits:
                kept[n.name] = f"--keep-fp32 {p.text}"
        return kept


# --- graph facts -------------------------------------------------------------------------------

def is_float_tensor(t: gs.Tensor) -> bool:
    """Whether ``t`` holds floats (an element type code's test is :func:`edgefc.precision.is_float_type`)."""
    if t is None or t.dtype is None:
        return False
    try:
        return bool(np.issubdtype(np.dtype(t.dtype), np.floating))
    except TypeError:  # a type numpy does not have (bfloat16, float8 ...)
        return False


def producer(t: gs.Tensor) -> gs.Node | None:
    return t.inputs[0] if t.inputs else None


def weight_slot(node: gs.Node, policy: QuantPolicy | None = None) -> tuple[int, int] | None:
    """(input index, output-channel axis) of the node's constant weight, if the op has one."""
    ops = policy.weight_ops if policy else WEIGHT_OPS
    if node.op not in ops:
        return None
    idx, axis = ops[node.op]
    if len(node.inputs) <= idx or not isinstance(node.inputs[idx], gs.Constant):
        return None
    w = node.inputs[idx]
    rank = len(w.shape)
    if node.op == "Gemm":
        if rank != 2:
            return None
        axis = 0 if int(node.attrs.get("transB", 0)) else 1
    elif node.op in ("MatMul", "FusedMatMul"):
        if rank < 2 or isinstance(node.inputs[0], gs.Constant):
            return None
        axis = rank - 1
    elif node.op == "ConvTranspose" and int(node.attrs.get("group", 1)) != 1:
        return None
    if not np.issubdtype(np.dtype(w.dtype), np.floating):
        return None
    return idx, axis % rank


def attention_score_tensors(graph: gs.Graph) -> dict[str, str]:
    """Tensors of unfused attention scores: the Softmax output and its input chain back to the
    Q K^T MatMul (through scaling, masking, casts and reshapes), and alias/cast copies of S_out."""
    found = {}
    passthrough = {"Mul", "Div", "Add", "Sub", "Where", "Cast"} | ALIAS_OPS | {"Transpose"}
    for node in graph.nodes:
        if node.op != "Softmax":
            continue
        reason = f"attention-scores: {node.name}"
        for t in node.outputs:
            found[t.name] = reason
            stack = [t]
            while stack:  # copies of S_out on the way to the P V MatMul
                cur = stack.pop()
                for c in cur.outputs:
                    if c.op in ALIAS_OPS | {"Cast", "Transpose"}:
                        for o in c.outputs:
                            if o.name not in found:
                                found[o.name] = reason
                                stack.append(o)
        t = node.inputs[0]
        while t is not None and not isinstance(t, gs.Constant) and t.name not in found:
            found[t.name] = reason
            p = producer(t)
            if p is None or p.op == "MatMul" or p.op not in passthrough:
                break
            acts = [i for i in p.inputs if i is not None and is_float_tensor(i) and not isinstance(i, gs.Constant)]
            if p.op == "Where":
                acts = [i for i in p.inputs[1:] if i is not None and not isinstance(i, gs.Constant)]
            t = acts[0] if len(acts) == 1 else None
    return found


def norm_statistic_tensors(graph: gs.Graph) -> dict[str, str]:
    """Outputs of statistics ops (ReduceMean, Pow, Sqrt ...) and of elementwise ops that combine
    only statistics (``var + eps``, ``1 / std``)."""
    found = {}
    for node in graph.nodes:  # topological order: a stat's consumers come later
        if node.op in STAT_OPS:
            for t in node.outputs:
                found[t.name] = f"norm-statistics: {node.name}"
        elif node.op in ("Add", "Sub", "Mul", "Div") and node.outputs:
            out = ir.static_shape(node.outputs[0])
            stat_ins = [i for i in node.inputs if i.name in found]
            if stat_ins and out is not None and any(ir.static_shape(i) == out for i in stat_ins):
                for t in node.outputs:
                    found[t.name] = f"norm-statistics: {node.name}"
    return found


def periodic_argument_tensors(graph: gs.Graph) -> tuple[dict[str, str], set[str]]:
    """Float tensors feeding Sin/Cos, back to integer inputs or constants; and the nodes on that path."""
    found, nodes = {}, set()
    for node in graph.nodes:
        if node.op not in ("Sin", "Cos"):
            continue
        stack = [t for t in node.inputs if t is not None]
        while stack:
            t = stack.pop()
            if isinstance(t, gs.Constant) or t.name in found or not is_float_tensor(t):
                continue
            found[t.name] = f"periodic-arguments: {node.name}"
            p = producer(t)
            if p is not None:
                nodes.add(p.name)
                stack.extend(i for i in p.inputs if i is not None)
    return found, nodes


#: (op, input index) whose input contributes only its type, not its value.
TYPE_ONLY_INPUTS = {("CastLike", 1)}


def constant_value_tensors(graph: gs.Graph) -> dict[str, str]:
    """Float tensors whose value does not depend on any model input (rule ``constant-values``),
    and the exponents of ``Pow``: name -> reason."""
    dependent = {t.name for t in graph.inputs}
    found = {}
    for node in graph.nodes:  # topological order
        reads = [t for i, t in enumerate(node.inputs)
                 if t is not None and not isinstance(t, gs.Constant) and (node.op, i) not in TYPE_ONLY_INPUTS]
        if any(t.name in dependent for t in reads) or any(a for a in node.attrs.values() if isinstance(a, gs.Graph)):
            dependent.update(t.name for t in node.outputs)
        else:
            for t in node.outputs:
                if is_float_tensor(t):
                    found[t.name] = f"constant-values: {node.name} (independent of the inputs)"
        if node.op == "Pow" and len(node.inputs) > 1 and node.inputs[1] is not None \
                and not isinstance(node.inputs[1], gs.Constant) and is_float_tensor(node.inputs[1]):
            found[node.inputs[1].name] = f"constant-values: exponent of {node.name}"
    return found


#: ops a value passes on its way into a logarithm without a tensor engine between (the chain of a
#: power spectrum: |X|^2 = Re^2 + Im^2, sums over bins, a floor)
_LOG_CHAIN = {"Mul", "Pow", "Add", "Sub", "Abs", "Sqrt", "ReduceSum", "ReduceSumSquare", "ReduceMean", "ReduceL2",
              "Clip", "Max", "Min", "Div", "Neg", "Cast", "Transpose", "Slice", "Concat", "Expand"} | set(ALIAS_OPS)


def log_argument_tensors(graph: gs.Graph) -> tuple[dict[str, str], set[str]]:
    """The argument of every Log and the values it is computed from, back through elementwise ops
    and reductions to the output of a tensor-engine op or a model input (a power spectrum and its
    squares: values over 10+ decades, whose small ones a linear INT16 or INT8 grid rounds to zero
    and the log then turns into its largest errors); and the ops on that path, the tensor-engine
    op that starts it included (the transform of a spectrum: it must read its input unrounded too,
    or a quiet frame is lost before it is squared)."""
    found, nodes = {}, set()
    for node in graph.nodes:
        if node.op != "Log" or not node.inputs:
            continue
        reason = f"log-arguments: {node.name}"
        stack = [node.inputs[0]]
        while stack:
            t = stack.pop()
            if t is None or isinstance(t, gs.Constant) or t.name in found or not is_float_tensor(t):
                continue
            found[t.name] = reason
            p = producer(t)
            if p is not None and p.op in _LOG_CHAIN:
                nodes.add(p.name)
                stack.extend(i for i in p.inputs if i is not None)
            elif p is not None and p.op in WEIGHT_OPS:
                nodes.add(p.name)
    return found, nodes


def exponential_tensors(graph: gs.Graph) -> dict[str, str]:
    """Outputs of Exp whose argument is not bounded above: the exponential of an unbounded input
    spans as many decades as its input has units, which no one linear integer scale holds. (The
    numerically stable softmax, ``Exp(x - ReduceMax(x))``, is bounded by 1 and not listed.)"""
    found = {}
    for node in graph.nodes:
        if node.op != "Exp" or not node.inputs or not node.outputs:
            continue
        x = node.inputs[0]
        p = producer(x) if x is not None else None
        if p is not None and p.op == "Sub" and len(p.inputs) == 2 and producer(p.inputs[1]) is not None \
                and producer(p.inputs[1]).op in ("ReduceMax", "Max"):
            continue
        found[node.outputs[0].name] = f"exponentials: {node.name}"
    return found


def input_only_tensors(graph: gs.Graph, name: str) -> set[str]:
    """Tensors computed from the graph input ``name`` and constants only (the U-Net's time
    embedding: everything that depends on nothing but the timestep)."""
    found = {name}
    for node in graph.nodes:
        acts = [t for t in node.inputs if t is not None and t.name and not isinstance(t, gs.Constant)]
        if acts and all(t.name in found for t in acts):
            found.update(t.name for t in node.outputs if t is not None and t.name)
    return found


#: ops without a precision of their own: conversions and shape metadata.
NO_PRECISION_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "Cast", "CastLike", "Shape", "Size"})


def has_float_operands(node: gs.Node) -> bool:
    """Whether ``node`` computes on real numbers (a float activation input or weight)."""
    return node.op not in NO_PRECISION_OPS and any(is_float_tensor(t) for t in node.inputs if t is not None and t.name)


@dataclass
class PrecisionPlan:
    """One precision per op (:data:`edgefc.precision.PRECISIONS`; the decision ``quantize`` records),
    why an op differs from the requested precision, the tensors the policy stores in FP32 whatever
    their readers, and the attention blocks whose softmax internals are wider than their
    activations (node -> element type)."""

    requested: str
    ops: dict[str, str]
    reasons: dict[str, str] = field(default_factory=dict)
    kept: dict[str, str] = field(default_factory=dict)
    scores: dict[str, str] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for p in self.ops.values():
            out[p] = out.get(p, 0) + 1
        return dict(sorted(out.items()))

    def with_ops(self, changes: dict[str, str], reason: str) -> PrecisionPlan:
        """A copy with ``changes`` (node -> precision) applied, each with ``reason``."""
        ops = {**self.ops, **changes}
        reasons = {**self.reasons, **{n: reason for n, p in changes.items() if p != self.requested}}
        for n, p in changes.items():
            if p == self.requested:
                reasons.pop(n, None)
        return PrecisionPlan(self.requested, ops, reasons, dict(self.kept), dict(self.scores))


def plan_precisions(graph: gs.Graph, requested: str, policy: QuantPolicy, time_input: str | None = None,
                    overrides: dict[str, tuple[str, str]] | None = None) -> PrecisionPlan:
    """Decide the precision of every op of ``graph`` (module docstring): ``requested`` for every op
    with float operands, except what the policy's rules keep wider and what ``overrides`` (node ->
    (precision, reason): the rescue, the search) says. ``time_input``: the input whose value alone
    the time embedding depends on (the U-Net's timestep)."""
    kept: dict[str, str] = {}
    user = policy.user_precisions(graph)
    if policy.rule("attention-scores"):
        kept.update(attention_score_tensors(graph))
    if policy.rule("norm-statistics"):
        kept.update(norm_statistic_tensors(graph))
    periodic_nodes: set[str] = set()
    if policy.rule("periodic-arguments"):
        found, periodic_nodes = periodic_argument_tensors(graph)
        kept.update(found)
    if policy.rule("constant-values"):
        kept.update({k: v for k, v in constant_value_tensors(graph).items() if k not in kept})
    log_nodes: set[str] = set()
    if policy.rule("log-arguments"):
        found, log_nodes = log_argument_tensors(graph)
        kept.update({k: v for k, v in found.items() if k not in kept})
    if policy.rule("exponentials"):
        kept.update({k: v for k, v in exponential_tensors(graph).items() if k not in kept})
    timestep_only = input_only_tensors(graph, time_input) if time_input and requested == "w8a8" \
        and policy.rule("time-embedding") else set()
    ops: dict[str, str] = {}
    reasons: dict[str, str] = {}
    scores: dict[str, str] = {}
    for node in graph.nodes:
        if not has_float_operands(node):
            continue
        p, why = requested, None
        if node.name in user:
            p, why = user[node.name]
        elif node.name in periodic_nodes or node.op in ("Sin", "Cos") and policy.rule("periodic-arguments"):
            p, why = "fp32", "periodic-arguments: the argument of Sin/Cos"
        elif node.name in log_nodes or node.op == "Log" and policy.rule("log-arguments"):
            p, why = "fp32", "log-arguments: computes the argument of a logarithm"
        elif timestep_only and all(t.name in timestep_only for t in node.inputs
                                   if t is not None and t.name and not isinstance(t, gs.Constant)):
            p, why = "w8a16", f"time-embedding: depends only on {time_input}; INT16 keeps it exact for every value"
        if overrides and node.name in overrides:
            p, why = overrides[node.name]
        if p in INTEGER_PRECISIONS and weight_slot(node, policy) is not None:
            fp32_in = next((t.name for t in node.inputs if t is not None and t.name in kept
                            and not isinstance(t, gs.Constant)), None)
            if fp32_in is not None:
                p, why = "fp32", (f"fp32-activation: reads {fp32_in}, kept FP32 by {kept[fp32_in].split(':')[0]}: "
                                  "an FP32 op, with FP32 weights")
        ops[node.name] = p
        if why:
            reasons[node.name] = why
        if node.op in ("Attention", "TiledAttention") and p == "w8a8" and policy.rule("attention-scores"):
            scores[node.name] = "int16"
    return PrecisionPlan(requested, ops, reasons, kept, scores)


def readers(t: gs.Tensor) -> list[gs.Node]:
    """The nodes that read ``t``'s values: its consumers, through alias ops (Reshape ...)."""
    out, stack = [], [t]
    while stack:
        cur = stack.pop()
        for c in cur.outputs:
            if c.op in ALIAS_OPS:
                stack.extend(o for o in c.outputs if o is not None)
            else:
                out.append(c)
    return out


_INT_WIDTH = {"int16": 16, "int8": 8}


@dataclass
class QdqPlan:
    """What the integer rewrite does for a :class:`PrecisionPlan` (names throughout).

    ``storage``: activation tensor -> the integer type it is stored at (a QuantizeLinear ->
    DequantizeLinear pair after it): the widest integer type its readers compute at, else its
    producer's; ``conversions``: tensor -> {narrower type: readers}, requantised for those readers;
    ``fp32_readers``: FP32 ops that read the unquantized tensors; ``inherits``: data-movement
    outputs that reuse their input's scale (same type); ``calibrated``: tensors with a range of
    their own; ``weights``: (node, input index, output-channel axis) of the INT8 weights."""

    weights: list[tuple[str, int, int]]
    storage: dict[str, str]
    calibrated: list[str]
    inherits: dict[str, str]
    conversions: dict[str, dict[str, list[str]]]
    fp32_readers: set[str]
    bias_inputs: dict[str, str]
    kept: dict[str, str]

    @property
    def quantized(self) -> list[str]:
        return list(self.storage)


def plan_qdq(graph: gs.Graph, plan: PrecisionPlan, policy: QuantPolicy) -> QdqPlan:
    """The integer rewrite of ``plan`` (:class:`QdqPlan`)."""
    ops = plan.ops
    weights, bias_inputs = [], {}
    for node in graph.nodes:
        if ops.get(node.name) not in INTEGER_PRECISIONS:
            continue
        slot = weight_slot(node, policy)
        if slot is not None:
            weights.append((node.name, slot[0], slot[1]))
            x = node.inputs[0]
            if is_float_tensor(x) and not isinstance(x, gs.Constant):
                bias_inputs[node.name] = x.name
    graph_outputs = {t.name for t in graph.outputs}
    storage: dict[str, str] = {}
    calibrated: list[str] = []
    inherits: dict[str, str] = {}
    conversions: dict[str, dict[str, list[str]]] = {}
    fp32_readers: set[str] = set()
    alias_of: dict[str, str] = {}

    def candidate(t: gs.Tensor) -> bool:
        return (t is not None and not isinstance(t, gs.Constant) and is_float_tensor(t) and t.name not in plan.kept
                and (t.outputs or t.name in graph_outputs))

    def decide(t: gs.Tensor, producer_precision: str | None) -> str | None:
        demand: dict[str, list[str]] = {}
        for r in readers(t):
            p = ops.get(r.name)
            if p is None:
                continue
            if p == "fp32":
                fp32_readers.add(r.name)
                continue
            a = act_type(p)
            if a in _INT_WIDTH:
                demand.setdefault(a, []).append(r.name)
        if demand:
            store = max(demand, key=lambda a: _INT_WIDTH[a])
        elif producer_precision in INTEGER_PRECISIONS:
            store = act_type(producer_precision)
        else:
            return None
        narrower = {a: rs for a, rs in demand.items() if a != store}
        if narrower:
            conversions[t.name] = narrower
        return store

    for t in graph.inputs:
        if candidate(t):
            store = decide(t, plan.requested)
            if store:
                storage[t.name] = store
                calibrated.append(t.name)
    for node in graph.nodes:
        if node.op in ("QuantizeLinear", "DequantizeLinear"):
            continue
        src = node.inputs[0] if node.inputs else None
        src_name = alias_of.get(src.name, src.name) if src is not None else None
        for t in node.outputs:
            if not candidate(t):
                continue
            if node.op in ALIAS_OPS and src_name in storage and t.name not in graph_outputs:
                alias_of[t.name] = src_name  # follows its input: no Q/DQ of its own
                continue
            store = decide(t, ops.get(node.name))
            if store is None:
                continue
            storage[t.name] = store
            # the type this op reads its input at: the input's storage, or a conversion of it
            read = next((a for a, rs in conversions.get(src_name, {}).items() if node.name in rs), storage.get(src_name))
            if (node.op in SCALE_PRESERVING_OPS and read == store
                    and not (node.op == "Resize" and node.attrs.get("mode", "nearest") not in ("nearest", "linear", b"nearest", b"linear"))):
                inherits[t.name] = src_name
            else:
                calibrated.append(t.name)
    for name in list(inherits):  # resolve inheritance chains to a calibrated root
        root = inherits[name]
        while root in inherits:
            root = inherits[root]
        inherits[name] = root
    return QdqPlan(weights, storage, calibrated, inherits, conversions, fp32_readers, bias_inputs, dict(plan.kept))
