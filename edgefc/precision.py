"""Precision: the one vocabulary of deployed precisions and element types, the per-component
defaults, the alias ops, and the per-op record the ``quantize`` pass writes (paper Sec. 2.3/4.2).

Vocabulary (every stage uses these names, nothing else):

* an op's **precision** (:data:`PRECISIONS`): ``fp32``, ``fp16``, ``w8a16`` (INT8 weights, INT16
  activations), ``w8a8`` (INT8 weights and activations); :data:`OPERAND_TYPES` gives the element
  types (:mod:`edgefc.dtypes` codes, byte sizes in :data:`edgefc.dtypes.DTYPE_BYTES`) of its
  weights and activations;
* what ``--precision`` may ask for (:data:`REQUESTS`): a precision, ``auto`` (the component's
  deployed precision, :data:`DEPLOYED`; ``search`` for an integer one given real inputs) or
  ``search`` (one precision per op group, chosen by the quantize pass); what a Program may be
  priced at (:data:`PRICINGS`): ``as-built`` (the graph's decisions) or a what-if precision
  applied to every op;
* the tensor engine's **rate keys** (:data:`RATE_KEYS`, the target file's ``[tensor.rate]``),
  from an op's two operand types (:func:`rate_key`): ``int8xint8``, ``int8xint16``,
  ``int16xint16``, ``fp16``, ``fp32``;
* **alias ops** (:data:`ALIAS_OPS`): ops whose output is their input viewed differently (no
  storage, no Q/DQ of their own); with QuantizeLinear/DequantizeLinear (:data:`STORAGE_ALIAS_OPS`)
  the ops that join tensors into one stored tensor.

The record: ``quantize`` decides one precision per op and writes it on the node
(:func:`set_op_precision`), kept in the saved ONNX as the node's ``metadata_props``
(``edgefc.precision``; :mod:`edgefc.ir` keeps node metadata through loading and saving). The
storage type of each tensor is in the graph itself (its dtype, or the type of the
QuantizeLinear/DequantizeLinear it passes through). :class:`edgefc.deployed_types.DeployedTypes`
reads both for MLT, the lowering, the cost model, the TVM build and ``edgefc.models``.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from edgefc.dtypes import DTYPE_BYTES

#: what one op runs at, from the widest to the narrowest.
PRECISIONS = ("fp32", "fp16", "w8a16", "w8a8")
#: ``quantize``'s ``precision`` option (``edgefc compile --precision``): a precision for every op,
#: ``auto`` (the component's, or ``search`` given real inputs: :func:`resolve`) or ``search`` (one
#: per op group, chosen against the target's cost model and the quality floor:
#: ``edgefc.passes.precision_search``).
REQUESTS = ("auto",) + PRECISIONS + ("search",)
#: what a graph may be priced at (``edgefc profile --precision``, the lowering).
PRICINGS = ("as-built",) + PRECISIONS
#: element types an NPU tensor may have (a target's ``tensor.dtypes`` picks among them).
ELEMENT_TYPES = ("fp32", "fp16", "int16", "int8")
#: the tensor engine's operand precisions (the keys of a target's ``[tensor.rate]``).
RATE_KEYS = ("int8xint8", "int8xint16", "int16xint16", "fp16", "fp32")
#: precision -> (weight type, activation type).
OPERAND_TYPES = {"fp32": ("fp32", "fp32"), "fp16": ("fp16", "fp16"), "w8a16": ("int8", "int16"),
                 "w8a8": ("int8", "int8")}
#: integer precisions: INT8 weights, biases added in a 32-bit accumulator.
INTEGER_PRECISIONS = ("w8a16", "w8a8")

#: the Stable Diffusion components and what each is deployed at (paper Sec. 2.3, Table 7):
#: ``--precision auto`` and the NPU timing of an unquantized model.
COMPONENTS = ("text-encoder", "unet", "vae-decoder")
DEPLOYED = {"text-encoder": "fp16", "unet": "w8a16", "vae-decoder": "fp16"}

#: ops whose output is their input viewed differently (no storage of their own).
ALIAS_OPS = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity"})
QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})
#: ops that join their output to their input's storage: aliases and Q/DQ (the producer writes the
#: quantized type directly, the consumer reads it).
STORAGE_ALIAS_OPS = ALIAS_OPS | QDQ_OPS

#: tensor-engine ops -> the input index of their weight (a constant, or a second activation).
WEIGHT_INPUT = {"Conv": 1, "FusedConv": 1, "ConvTranspose": 1, "MatMul": 1, "FusedMatMul": 1, "Gemm": 1}

#: the node metadata key of the per-op record.
RECORD_KEY = "edgefc.precision"
#: the node metadata key of an attention block's softmax internals (S_in, S_out) when the policy
#: keeps them wider than its activations (a W8A8 attention: INT16 scores).
SCORES_KEY = "edgefc.scores"


def weight_type(precision: str) -> str:
    return OPERAND_TYPES[precision][0]


def act_type(precision: str) -> str:
    return OPERAND_TYPES[precision][1]


#: what ``--precision auto`` deploys on an NPU target for a model that is none of the components:
#: the NPU's integer path, INT8 weights with INT16 activations (held to the quality floor, issue 20).
AUTO_OTHER = "w8a16"


def resolve(request: str, component: str | None, npu: bool = False, real_inputs: bool = False) -> str:
    """A ``--precision`` request -> the precision: ``auto`` is the component's deployed precision
    (:data:`DEPLOYED`); for a model that is no known component :data:`AUTO_OTHER` on an NPU target
    (``npu``), else ``fp32``. With ``real_inputs`` (evaluation inputs from the user's ``--eval`` or
    ``--calib`` file) on an NPU target, ``auto`` is ``search`` wherever it would be an integer
    precision (the U-Net, any model that is no known component): the search starts from that
    precision and measures every lower one on those inputs (issue 20 part 7); the text encoder and
    VAE decoder stay FP16, as the paper deployed them (the search's options are integer ones)."""
    if request not in REQUESTS:
        raise ValueError(f"unknown precision '{request}' (choose from {', '.join(REQUESTS)})")
    if request != "auto":
        return request   # a precision, or "search"
    if component in DEPLOYED:
        precision = DEPLOYED[component]
    else:
        precision = AUTO_OTHER if npu else "fp32"
    if npu and real_inputs and precision in INTEGER_PRECISIONS:
        return "search"
    return precision


def is_float_type(code: str) -> bool:
    """Whether an element type code (``fp32``, ``int16`` ...) is a float type."""
    return code.startswith("fp")


def rate_key(weight: str, act: str) -> str:
    """The ``[tensor.rate]`` key of a tensor-engine op from its operands' element types: a float
    operand makes it a float op (``fp16`` when the widest float has at most 2 bytes, else
    ``fp32``); integer operands give ``int<a>xint<b>`` (narrower first, at most 16 bits)."""
    if is_float_type(weight) or is_float_type(act):
        widest = max((c for c in (weight, act) if is_float_type(c)), key=lambda c: DTYPE_BYTES[c])
        return "fp16" if DTYPE_BYTES[widest] <= 2 else "fp32"
    a, b = sorted((min(DTYPE_BYTES[weight], 2) * 8, min(DTYPE_BYTES[act], 2) * 8))
    return f"int{a}xint{b}"


def precision_rate_key(precision: str, constant_weight: bool) -> str:
    """The rate key of a tensor op run at ``precision``: weights x activations, or activations x
    activations when its second operand is not a constant (attention's QK^T and S V)."""
    w, a = OPERAND_TYPES[precision]
    return rate_key(w if constant_weight else a, a)


def operand_precision(codes) -> str | None:
    """The precision an op computes at, from the element types of its float operands (weights
    and activations as stored): any float operand makes it ``fp16``/``fp32`` (the widest float),
    else ``w8a16`` when an operand has 16 bits, else ``w8a8``; None when it has none."""
    codes = [c for c in codes if c in DTYPE_BYTES]
    if not codes:
        return None
    floats = [c for c in codes if is_float_type(c)]
    if floats:
        return "fp16" if max(DTYPE_BYTES[c] for c in floats) <= 2 else "fp32"
    return "w8a16" if max(DTYPE_BYTES[c] for c in codes) >= 2 else "w8a8"


# --- the per-op record ------------------------------------------------------------------------

def metadata(node: gs.Node) -> dict[str, str]:
    """The node's metadata (ONNX ``NodeProto.metadata_props``), kept by :mod:`edgefc.ir` through
    loading and saving. onnx-graphsurgeon has no field for it, so it lives in an attribute of the
    Node object (``Node.copy`` does not carry it: copy a graph with :func:`edgefc.ir.copy_graph`)."""
    meta = node.__dict__.get("metadata_props")
    if meta is None:
        meta = node.__dict__["metadata_props"] = {}
    return meta


def op_precision(node: gs.Node) -> str | None:
    """The precision ``quantize`` recorded for this op, or None (not quantized by edgefc)."""
    p = node.__dict__.get("metadata_props", {}).get(RECORD_KEY)
    return p if p in PRECISIONS else None


def set_op_precision(node: gs.Node, precision: str | None) -> None:
    """Record (None: remove) the precision of one op."""
    if precision is None:
        metadata(node).pop(RECORD_KEY, None)
        return
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision '{precision}' (choose from {', '.join(PRECISIONS)})")
    metadata(node)[RECORD_KEY] = precision


def recorded_plan(graph: gs.Graph) -> dict[str, str]:
    """Node name -> recorded precision, for every node that has a record."""
    return {n.name: p for n in graph.nodes if (p := op_precision(n)) is not None}


def describe_plan(plan: dict[str, str]) -> str | None:
    """One word for a plan: its precision when every op has the same one, ``mixed`` otherwise
    (None: no op recorded). FP32 ops inside a quantized build (the policy's higher-precision
    regions) do not make it mixed."""
    kinds = set(plan.values())
    if not kinds:
        return None
    lower = kinds - {"fp32"}
    if not lower:
        return "fp32"
    return lower.pop() if len(lower) == 1 else "mixed"
