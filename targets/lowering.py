"""Lowering: Graph -> Program (DESIGN.md "Target"; PERFORMANCE.md explains every rule).

Each graph node becomes commands on one engine:

* tensor engine: Conv, ConvTranspose, edgefc FusedConv, MatMul, edgefc FusedMatMul, Gemm, and the
  two matmuls of Attention / edgefc TiledAttention;
* vector engine: Softmax (and the softmax of an attention), normalisations (LayerNormalization,
  GroupNormalization, edgefc GroupNormSiLU, InstanceNormalization), activations (Gelu, edgefc
  GeGLU, Sigmoid, ...), elementwise arithmetic, data movement (Transpose, Concat, Resize, ...);
* host: ops on integer tensors (embedding Gather, ArgMax, ...), which the NPU does not run;
* nothing: metadata-only ops (Reshape, Squeeze, Unsqueeze, Flatten, Identity), QuantizeLinear
  and DequantizeLinear (the producer writes the quantized type directly), and Casts between
  types priced alike.

Byte sizes come from each tensor's deployed type: the graph's dtypes (``as-built``), where a
tensor passing through QuantizeLinear/DequantizeLinear is priced at the quantized type; or a
what-if precision (``fp32``, ``fp16``, ``w8a16``: INT8 weights, INT16 activations, INT32 biases;
``w8a8``: INT8 weights and activations, INT32 biases, as MLPerf Mobile runs its networks).

Residency: activations stay in SRAM while they fit together with everything else live at that
point; otherwise the tensor whose next use is furthest is stored to DRAM and loaded back where
it is used (a Belady-style choice). An op whose own operands do not fit streams them through
DRAM. Weights arrive by DMA for every op that uses them. Attention blocks read Q, K, V from DRAM
and write their output to DRAM (their producers store them); inside the block S_in = QK^T and
S_out = softmax(S_in) stay in SRAM when the tile's working set fits, else each makes a DRAM round
trip (the paper's Sec. 2.3 and Table 6).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from edgefc.attention import (
    AttentionSpec,
    Tiling,
    heads_per_tile,
    spec_from_node,
    tile_rows,
    tiling_from_node,
)
from edgefc.components import detect_component
from edgefc.errors import BuildError
from edgefc.targets.program import Command, OpInfo, Program

PRECISION_CHOICES = ("as-built", "fp32", "fp16", "w8a16", "w8a8")

BYTES = {"fp64": 8, "fp32": 4, "fp16": 2, "int64": 8, "int32": 4, "int16": 2, "int8": 1, "bool": 1}

TENSOR_OPS = {"Conv", "ConvTranspose", "FusedConv", "MatMul", "FusedMatMul", "Gemm"}
ATTENTION_OPS = {"Attention", "TiledAttention"}
ALIAS_OPS = {"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "QuantizeLinear", "DequantizeLinear"}
METADATA_OPS = {"Shape", "Size", "Constant"}
HOST_ONLY_OPS = {"ArgMax", "ArgMin", "NonZero", "TopK", "Range", "ConstantOfShape", "Multinomial",
                 "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Unique"}

# Vector-engine element passes per op class (PERFORMANCE.md "Vector engine").
_NORM = (("reduce", 2), ("arith", 5))          # mean, var; sub, square, rsqrt-mul, scale, bias
_SILU = (("exp", 1), ("arith", 2), ("divide", 1))
_GELU = (("exp", 1), ("arith", 4))
_COPY = (("arith", 1),)
VECTOR_PASSES: dict[str, tuple] = {
    "Softmax": (("max", 1), ("arith", 1), ("exp", 1), ("reduce", 1), ("divide", 1)),
    "LayerNormalization": _NORM, "GroupNormalization": _NORM, "InstanceNormalization": _NORM,
    "GroupNormSiLU": _NORM + _SILU, "Gelu": _GELU, "GeGLU": _GELU + (("arith", 1),),
    "Sigmoid": (("exp", 1), ("arith", 1), ("divide", 1)), "Tanh": (("exp", 1), ("arith", 2), ("divide", 1)),
    "Erf": (("exp", 1), ("arith", 3)), "Exp": (("exp", 1),), "Log": (("exp", 1),),
    "Sin": (("exp", 1), ("arith", 2)), "Cos": (("exp", 1), ("arith", 2)), "Pow": (("exp", 1), ("arith", 1)),
    "Sqrt": (("divide", 1),), "Reciprocal": (("divide", 1),), "Div": (("divide", 1),),
    "Add": _COPY, "Sub": _COPY, "Mul": _COPY, "Neg": _COPY, "Abs": _COPY, "Where": _COPY,
    "Relu": (("max", 1),), "LeakyRelu": (("max", 1),), "Clip": (("max", 2),), "Max": (("max", 1),),
    "Min": (("max", 1),), "HardSigmoid": (("max", 2), ("arith", 1)), "Silu": _SILU, "QuickGelu": _SILU,
    "ReduceMean": (("reduce", 1), ("arith", 1)), "ReduceSum": (("reduce", 1),), "ReduceMax": (("max", 1),),
    "ReduceL2": (("reduce", 1), ("arith", 1), ("divide", 1)),
}
# Ops whose work scales with their input elements (reductions, normalisations); others: output.
INPUT_SIZED = {"Softmax", "LayerNormalization", "GroupNormalization", "InstanceNormalization",
               "GroupNormSiLU", "ReduceMean", "ReduceSum", "ReduceMax", "ReduceL2"}

# Producer -> consumer streaming (a two-op cascade, as Arm Vela's cascading): a tensor too big
# for SRAM whose only consumer is the very next op passes through a small stripe buffer instead
# of DRAM when the producer writes it row by row and the consumer reads it row by row.
_ROWWISE = {k for k in VECTOR_PASSES if k not in INPUT_SIZED and k != "Softmax"}   # elementwise / activations
# DepthToSpace / SpaceToDepth (pixel shuffle) are spatially local too: output rows 2h, 2h+1 come
# from input row h, a strided write pattern of the stripe.
_SPATIAL = {"Resize", "DepthToSpace", "SpaceToDepth"}
STREAM_PRODUCERS = TENSOR_OPS | _ROWWISE | _SPATIAL | {"GroupNormalization", "GroupNormSiLU",
                                                       "InstanceNormalization", "LayerNormalization", "Gelu", "GeGLU"}
STREAM_CONSUMERS = TENSOR_OPS | _ROWWISE | _SPATIAL | {"Gelu", "GeGLU"}

_NP_CODE = {np.dtype(np.float64): "fp64", np.dtype(np.float32): "fp32", np.dtype(np.float16): "fp16",
            np.dtype(np.int64): "int64", np.dtype(np.uint64): "int64", np.dtype(np.int32): "int32",
            np.dtype(np.uint32): "int32", np.dtype(np.int16): "int16", np.dtype(np.uint16): "int16",
            np.dtype(np.int8): "int8", np.dtype(np.uint8): "int8", np.dtype(np.bool_): "bool"}


def dtype_code(dtype) -> str:
    """numpy/onnx dtype -> the cost model's type code (fp32, fp16, int16, int8 ...)."""
    if dtype is None:
        return "fp32"
    try:
        dt = np.dtype(dtype)
    except TypeError:
        return "fp32"
    if dt in _NP_CODE:
        return _NP_CODE[dt]
    if "bfloat16" in str(dtype) or "float8" in str(dtype):
        return "fp16"
    if dt.kind in "iu":
        return f"int{dt.itemsize * 8}" if dt.itemsize * 8 in (8, 16, 32, 64) else "int32"
    return "fp32"


def is_float(code: str) -> bool:
    return code.startswith("fp")


def pad(n: int, g: int) -> int:
    return -(-int(n) // g) * g if g > 1 else int(n)


def split(n: int, parts: int) -> list[tuple[int, int]]:
    """Split ``n`` into ``parts`` near-equal pieces: [(size, count), ...] (at most two sizes)."""
    parts = max(1, min(int(parts), int(n)))
    q, r = divmod(int(n), parts)
    out = [(q + 1, r)] if r else []
    if parts - r:
        out.append((q, parts - r))
    return out


def contraction(cin: int, taps: int, g: int) -> int:
    """Padded contraction length of a convolution with ``cin`` input channels (per group) and
    ``taps`` kernel taps: channels padded to the granularity, times the taps; a layer with fewer
    input channels than the granularity folds the taps into the contraction instead (im2col of a
    first layer: 3 channels x 9 taps = 27 -> 32, not 3 -> 32 x 9)."""
    return pad(cin * taps, g) if cin < g else pad(cin, g) * taps


def precision_key(weight: str, act: str) -> str:
    """Operand precision of a tensor-engine op (a key of [tensor.rate])."""
    if is_float(weight) or is_float(act):
        widest = max((c for c in (weight, act) if is_float(c)), key=lambda c: BYTES[c])
        return "fp16" if BYTES[widest] <= 2 else "fp32"
    a, b = sorted((min(BYTES[weight], 2) * 8, min(BYTES[act], 2) * 8))
    return f"int{a}xint{b}"


# --- the attention block ----------------------------------------------------------------------

@dataclass(frozen=True)
class Geometry:
    """The target numbers the lowering itself needs (layout and granularity, not speeds)."""

    channel_granularity: int
    row_granularity: int
    sram_bytes: int
    weight_buffer_bytes: int
    resident_weights: bool = False
    cascade: bool = True

    @classmethod
    def from_target(cls, t) -> Geometry:
        return cls(int(t["tensor.channel_granularity"]), int(t["tensor.row_granularity"]),
                   int(t["sram.bytes"]), int(t["sram.weight_buffer_bytes"]), bool(t["sram.resident_weights"]),
                   bool(t["sram.cascade"]))


def attention_io_bytes(spec: AttentionSpec, geo: Geometry) -> dict[str, tuple[int, int]]:
    """DRAM bytes and run length of Q, K, V and the output A (heads padded to the granularity).

    Q and K are stored head-major (their producers write each head as its own channel block) and
    move as contiguous blocks; V is read transposed (the contraction of S_out x V runs over its
    rows) and A is written into the token-major layout the out-projection reads, so both move in
    runs of one head row (``d_pad * act_bytes``).
    """
    g, b = geo.channel_granularity, spec.act_bytes
    dkp, dvp = pad(spec.head_dim, g), pad(spec.v_head_dim, g)
    n = spec.batch * spec.heads
    return {"q": (n * spec.q_len * dkp * b, 0), "k": (n * spec.kv_len * dkp * b, 0),
            "v": (n * spec.kv_len * dvp * b, dvp * b), "out": (n * spec.q_len * dvp * b, dvp * b)}


def _tile_geometry(spec: AttentionSpec, tiling: Tiling, geo: Geometry):
    """Row tiles and head groups of a tiling, as ``edgefc.attention`` fixes them.

    Returns ``(row_parts, head_parts)``: lists of ``(real rows, padded rows, count)`` and
    ``(heads, count)``. Untiled: the real rows, padded to the row granularity. Tiled: equal tiles
    of ``tile_rows`` (whole granules; the last tile holds the padding), each priced at its padded
    size. A tiling that does not split the padded rows into whole granules (or the heads evenly)
    is priced as near-equal parts, each padded.
    """
    rg = geo.row_granularity
    if tiling.row_tiles == 1:
        row_parts = [(spec.q_len, pad(spec.q_len, rg), 1)]
    else:
        try:
            rows = tile_rows(spec, tiling, rg)
            row_parts = [(rows, rows, tiling.row_tiles)]
        except ValueError:
            row_parts = [(r, pad(r, rg), n) for r, n in split(spec.q_len, tiling.row_tiles)]
    try:
        head_parts = [(heads_per_tile(spec, tiling), tiling.head_tiles)]
    except ValueError:
        head_parts = split(spec.heads, tiling.head_tiles)
    return row_parts, head_parts


def attention_sram_bytes(spec: AttentionSpec, tiling: Tiling, geo: Geometry) -> int:
    """SRAM working set of the largest tile: K and V of its head group, the Q tile, the S_in and
    S_out tiles and the output tile, with rows padded to the row granularity and channels
    (head dims, and the key length as the channel dimension of S) to the channel granularity."""
    g, rg, b = geo.channel_granularity, geo.row_granularity, spec.act_bytes
    row_parts, head_parts = _tile_geometry(spec, tiling, geo)
    rows = max(p for _, p, _ in row_parts)
    hg = max(h for h, _ in head_parts)
    dkp, dvp, kvp = pad(spec.head_dim, g), pad(spec.v_head_dim, g), pad(spec.kv_len, g)
    kv = hg * pad(spec.kv_len, rg) * (dkp + dvp)
    tile = hg * rows * (dkp + 2 * kvp + dvp)
    return int((kv + tile) * b)


def lower_attention(spec: AttentionSpec, tiling: Tiling, geo: Geometry, *, op: str | None = None,
                    op_type: str = "Attention", loop_base: int = 0) -> list[Command]:
    """The commands of one attention block (untiled: ``Tiling(1, 1)``).

    Per head group: load K, load V. Per tile (rows x head group): load the Q tile, QK^T on the
    tensor engine, softmax on the vector engine, S_out x V on the tensor engine, store the output
    tile. When the tile's working set exceeds SRAM, S_in and S_out each make a DRAM round trip
    (store + load). Every tile pays the engine hand-offs QK^T -> softmax -> S x V, one on each
    side of each hand-off: 1 on each matmul, 2 on the softmax. The block is one op: it is
    dispatched once (its command list runs every tile).
    """
    op = op or spec.name
    g, b = geo.channel_granularity, spec.act_bytes
    dkp, dvp, kvp = pad(spec.head_dim, g), pad(spec.v_head_dim, g), pad(spec.kv_len, g)
    prec = precision_key(_act_code(b), _act_code(b))
    spill = attention_sram_bytes(spec, tiling, geo) > geo.sram_bytes
    tiled = tiling.tiles > 1
    softmax = VECTOR_PASSES["Softmax"] + ((("arith", 1),) if spec.causal else ())
    row_parts, head_parts = _tile_geometry(spec, tiling, geo)
    cmds: list[Command] = []
    for hg, hcount in head_parts:
        kw = {"op": op, "op_type": op_type, "repeat": spec.batch * hcount,
              "loop": loop_base + len(cmds) if tiled else -1}
        cmds.append(Command("load", tensor=f"{op}:K", bytes=hg * spec.kv_len * dkp * b, role="load_qk", **kw))
        cmds.append(Command("load", tensor=f"{op}:V", bytes=hg * spec.kv_len * dvp * b, run_bytes=dvp * b,
                            role="load_s_out_v", **kw))
    first = 1
    for hg, hcount in head_parts:
        for rows, rows_p, rcount in row_parts:
            s = hg * rows * spec.kv_len
            kw = {"op": op, "op_type": op_type, "repeat": spec.batch * hcount * rcount,
                  "loop": loop_base + 1024 + len(cmds) if tiled else -1}
            cmds.append(Command("load", tensor=f"{op}:Q", bytes=hg * rows * dkp * b, role="load_qk", **kw))
            cmds.append(Command("tensor", macs=hg * rows * spec.kv_len * spec.head_dim,
                                padded_macs=hg * rows_p * kvp * dkp, out_elements=s, precision=prec,
                                dispatches=first, handoffs=1, role="qk_matmul", **kw))
            if spill:
                cmds.append(Command("store", tensor=f"{op}:S_in", bytes=s * b, role="store_s_in", **kw))
                cmds.append(Command("load", tensor=f"{op}:S_in", bytes=s * b, role="load_s_in", **kw))
            cmds.append(Command("vector", elements=s, passes=softmax, handoffs=2, elem_bytes=min(int(b), 4),
                                role="softmax", **kw))
            if spill:
                cmds.append(Command("store", tensor=f"{op}:S_out", bytes=s * b, role="store_s_out", **kw))
                cmds.append(Command("load", tensor=f"{op}:S_out", bytes=s * b, role="load_s_out_v", **kw))
            cmds.append(Command("tensor", macs=hg * rows * spec.kv_len * spec.v_head_dim,
                                padded_macs=hg * rows_p * kvp * dvp, out_elements=hg * rows * spec.v_head_dim,
                                precision=prec, handoffs=1, role="sv_matmul", **kw))
            cmds.append(Command("store", tensor=f"{op}:A", bytes=hg * rows * dvp * b, run_bytes=dvp * b,
                                role="store_out", **kw))
            first = 0
    return cmds


def _act_code(nbytes: int) -> str:
    return {1: "int8", 2: "int16", 4: "fp32"}.get(int(nbytes), "int16")


# --- graph lowering ---------------------------------------------------------------------------

def component_of(graph: gs.Graph) -> str:
    """unet / text-encoder / vae-decoder from the input names (edgefc.components), else "model"."""
    return detect_component(t.name for t in graph.inputs) or "model"


_INDEXED = re.compile(r"^[A-Za-z_]+\.\d+$")
_WRAPPERS = {"unet", "text_encoder", "vae", "vae_decoder", "model", "module"}
_CONTAINERS = {"encoder", "decoder", "text_model"}


def block_of(name: str) -> str:
    """The model block a node belongs to, from its (exporter-given) scope name, e.g.
    ``/unet/down_blocks.0/attentions.0/transformer_blocks.0/attn1/MatMul`` -> ``down_blocks.0/attentions.0``,
    ``/text_encoder/encoder/layers.3/mlp/fc1/MatMul`` -> ``encoder/layers.3``,
    ``/decoder/up_blocks.3/resnets.0/conv1/Conv`` -> ``decoder/up_blocks.3/resnets.0``."""
    parts = [p for p in name.strip("/").split("/") if p][:-1]   # the scopes, without the op's own name
    while parts and parts[0] in _WRAPPERS:
        parts = parts[1:]
    keep: list[str] = []
    indexed = 0
    for p in parts:
        is_idx = bool(_INDEXED.match(p))
        if keep and not is_idx and (indexed or keep[-1] not in _CONTAINERS):
            break
        keep.append(p)
        indexed += is_idx
        if indexed == 2:
            break
    return "/".join(keep) or "(top)"


def _shape(t: gs.Tensor) -> tuple[int, ...] | None:
    s = t.shape
    if s is None:
        return None
    try:
        return tuple(int(d) for d in s)
    except (TypeError, ValueError):
        return None


def _elements(t: gs.Tensor) -> int:
    if getattr(t, "type", "tensor_type") != "tensor_type":  # a sequence/optional on the host: its tensors count where made
        return 0
    s = _shape(t)
    if s is None:
        raise BuildError(f"tensor '{t.name}' has no static shape; compile the model (canonicalize) first")
    return int(math.prod(s))


class _Types:
    """Deployed element type of every tensor, and which tensors are weights (compile-time data).

    Tensors joined by alias ops (Reshape, Squeeze, Q/DQ, ...) form one class that shares one
    storage and one type: in ``as-built`` the quantized type when the class passes through a
    QuantizeLinear/DequantizeLinear, else the graph's dtype; with a what-if precision every float
    activation takes the activation type and every float weight the weight type.
    """

    def __init__(self, graph: gs.Graph, precision: str):
        self.precision = precision
        self.root: dict[str, str] = {}
        self.const: set[str] = set()
        self.code: dict[str, str] = {}
        self.quantized: set[str] = set()
        tensors = graph.tensors()
        for name, t in tensors.items():
            if isinstance(t, gs.Constant):
                self.const.add(name)
        for node in graph.nodes:
            ins = [t for t in node.inputs if t is not None and t.name]
            if node.op in ALIAS_OPS | {"Cast", "Transpose"} and ins and all(self.find(t.name) in self.const for t in ins):
                for o in node.outputs:
                    self.const.add(o.name)
            if node.op in ALIAS_OPS and ins:
                for o in node.outputs:
                    self.root[o.name] = self.find(ins[0].name)
        qtype: dict[str, str] = {}
        for node in graph.nodes:
            if node.op == "QuantizeLinear" and node.outputs:
                qtype[self.find(node.outputs[0].name)] = dtype_code(node.outputs[0].dtype)
            elif node.op == "DequantizeLinear" and node.inputs:
                qtype[self.find(node.inputs[0].name)] = dtype_code(node.inputs[0].dtype)
        self.quantized = set(qtype)
        for name, t in tensors.items():
            r = self.find(name)
            if r in self.code:
                continue
            graph_code = dtype_code(tensors[r].dtype if tensors[r].dtype is not None else t.dtype)
            if precision == "as-built" or (not is_float(graph_code) and r not in qtype):
                self.code[r] = qtype.get(r, graph_code)
            elif r in self.const:
                self.code[r] = WHAT_IF[precision][0]
            else:
                self.code[r] = WHAT_IF[precision][1]

    def find(self, name: str) -> str:
        while name in self.root:
            name = self.root[name]
        return name

    def of(self, t: gs.Tensor) -> str:
        return self.code.get(self.find(t.name), dtype_code(t.dtype))

    def is_const(self, t: gs.Tensor) -> bool:
        return self.find(t.name) in self.const

    def bias(self, t: gs.Tensor) -> str:
        """A tensor-engine bias: INT32 in integer precisions, else the weights' float type."""
        return "int32" if self.precision in ("w8a16", "w8a8") else self.of(t)

    def host_data(self, t: gs.Tensor) -> bool:
        """Integer data in the graph itself (not merely quantized): indices only the host handles.
        Boolean masks (comparison results, ``Where`` conditions) are vector-engine data."""
        code = dtype_code(t.dtype) if t.dtype is not None else "fp32"
        return not is_float(code) and code != "bool" and self.find(t.name) not in self.quantized


def attention_spec(node: gs.Node, act_bytes: int) -> AttentionSpec:
    """AttentionSpec of an Attention / TiledAttention node (``edgefc.attention.spec_from_node``:
    the 3D form [B, S, H*d]; the 4D form [B, H, S, d] is read here too)."""
    try:
        return spec_from_node(node, act_bytes)
    except ValueError as e:
        shapes = [_shape(t) for t in node.inputs[:3]]
        causal = bool(int(node.attrs.get("is_causal", 0) or 0))
        heads = int(node.attrs.get("q_num_heads", 0) or 0)
        if len(shapes) == 3 and all(s is not None and len(s) == 4 for s in shapes):
            (b, h, sq, dk), k, v = shapes
            return AttentionSpec(name=node.name, batch=b, heads=h, q_len=sq, kv_len=k[2], head_dim=dk,
                                 v_head_dim=v[3], act_bytes=int(act_bytes), causal=causal)
        if (len(shapes) == 3 and all(s is not None and len(s) == 3 for s in shapes) and heads > 0
                and shapes[0][2] % heads == 0 and shapes[2][2] % heads == 0):
            # 3D form with a mask input (or another attribute the tiling solver does not take)
            (b, sq, width), k, v = shapes
            return AttentionSpec(name=node.name, batch=b, heads=heads, q_len=sq, kv_len=k[1], head_dim=width // heads,
                                 v_head_dim=v[2] // heads, act_bytes=int(act_bytes), causal=causal)
        raise BuildError(f"cannot lower attention '{node.name}': {e}") from None


def lower(graph: gs.Graph, target, precision: str = "as-built") -> Program:
    """Lower a (canonicalized, fused) graph to a Program for ``target`` at ``precision``."""
    if precision not in PRECISION_CHOICES:
        raise BuildError(f"unknown precision '{precision}' (choose from {', '.join(PRECISION_CHOICES)})")
    geo = Geometry.from_target(target)
    prog = _Lowering(graph, geo, precision).run()
    # Weights that fit in SRAM beside the activations stay there across inferences: loaded once
    # with the model (outside a timed inference, as MLPerf's steady-state latency measures it),
    # not streamed per op. The activations then get the SRAM the weights leave.
    total_w = prog.weight_bytes
    if geo.resident_weights and 0 < total_w and total_w + prog.sram_peak_bytes <= geo.sram_bytes - geo.weight_buffer_bytes:
        resident = _Lowering(graph, geo, precision, resident_weights=total_w).run()
        if resident.sram_peak_bytes + total_w <= geo.sram_bytes - geo.weight_buffer_bytes:
            return resident
    return prog


_NEVER = 1 << 62
# what-if precision -> (weight type, activation type) of float tensors
WHAT_IF = {"fp32": ("fp32", "fp32"), "fp16": ("fp16", "fp16"), "w8a16": ("int8", "int16"), "w8a8": ("int8", "int8")}


class _Lowering:
    """One pass over the nodes in order, emitting commands and deciding residency."""

    def __init__(self, graph: gs.Graph, geo: Geometry, precision: str, resident_weights: int = 0):
        self.graph, self.geo, self.precision = graph, geo, precision
        self.resident_weights = int(resident_weights)
        self.types = _Types(graph, precision)
        self.prog = Program(precision=precision, component=component_of(graph))
        self.budget = geo.sram_bytes - geo.weight_buffer_bytes - self.resident_weights
        self.loops = 0
        self.io: dict[str, tuple[int, int]] = {}   # alias root -> (DRAM bytes, run) of attention operands
        self.size: dict[str, int] = {}

    def classify(self, node: gs.Node) -> str:
        op, types = node.op, self.types
        if op in METADATA_OPS or op in ALIAS_OPS:
            return "none"
        if op == "Cast" and (types.is_const(node.inputs[0]) or types.of(node.inputs[0]) == types.of(node.outputs[0])):
            return "none"
        if all(types.is_const(t) for t in node.inputs if t is not None and t.name):
            return "none"  # folded at compile time
        if op in ATTENTION_OPS:
            try:  # an attention the NPU block does not take (grouped heads, past key/value): the host runs it
                attention_spec(node, 2)
            except BuildError:
                return "host"
            return "attention"
        acts = [t for t in node.inputs if t is not None and t.name and not types.is_const(t)]
        if op in HOST_ONLY_OPS or any(types.host_data(t) for t in acts + list(node.outputs)):
            return "host"
        return "tensor" if op in TENSOR_OPS else "vector"

    def nbytes(self, t: gs.Tensor) -> int:
        r = self.types.find(t.name)
        if r in self.io:
            return self.io[r][0]
        return _elements(t) * BYTES[self.types.of(t)]

    def _dma(self, kind: str, node: gs.Node, r: str, spill: bool) -> None:
        self.prog.emit(Command(kind, node.name, node.op, tensor=r, bytes=int(self.size[r]), spill=spill))

    def run(self) -> Program:
        graph, types, prog = self.graph, self.types, self.prog
        nodes = list(graph.nodes)
        kinds = [self.classify(n) for n in nodes]
        specs: dict[str, AttentionSpec] = {}
        for n, kind in zip(nodes, kinds):
            if kind == "attention":
                spec = attention_spec(n, BYTES[types.of(n.inputs[0])])
                specs[n.name] = spec
                io = attention_io_bytes(spec, self.geo)
                for key, t in zip(("q", "k", "v", "out"), list(n.inputs[:3]) + [n.outputs[0]]):
                    self.io[types.find(t.name)] = (io[key][0], 0)
        pinned = set(self.io)
        uses: dict[str, list[int]] = {}
        for i, (n, kind) in enumerate(zip(nodes, kinds)):
            if kind != "none":
                for t in n.inputs:
                    if t is not None and t.name and not types.is_const(t):
                        uses.setdefault(types.find(t.name), []).append(i)
        graph_in = {types.find(t.name) for t in graph.inputs}
        graph_out = {types.find(t.name) for t in graph.outputs}

        def next_use(r: str, i: int) -> int:
            for u in uses.get(r, ()):
                if u >= i:
                    return u
            return _NEVER

        resident: dict[str, int] = {}
        cascaded: set[str] = set()
        in_dram: set[str] = set(graph_in)
        why = prog.reasons
        for r in graph_in:
            why[r] = "graph input"
        peak = 0
        for i, (node, kind) in enumerate(zip(nodes, kinds)):
            if kind == "none":
                continue
            prog.ops.append(info := OpInfo(node.name, node.op, "tensor" if kind == "attention" else kind,
                                           block_of(node.name)))
            act_in: list[str] = []
            for t in node.inputs:
                if t is not None and t.name and not types.is_const(t):
                    r = types.find(t.name)
                    if r not in act_in:
                        act_in.append(r)
                        self.size.setdefault(r, self.nbytes(t))
            outs: list[str] = []
            for t in node.outputs:
                if t is not None and t.name:
                    r = types.find(t.name)
                    outs.append(r)
                    self.size.setdefault(r, self.nbytes(t))
            for r in [r for r in resident if next_use(r, i) == _NEVER]:
                del resident[r]

            if kind in ("host", "attention"):
                # the host and the attention block read their inputs from DRAM, write outputs there
                for r in act_in:
                    if r not in in_dram:
                        self._dma("store", node, r, spill=r not in pinned)
                        in_dram.add(r)
                    why.setdefault(r, f"read from DRAM by {'the host' if kind == 'host' else 'attention'} op {node.name}")
                    resident.pop(r, None)
                if kind == "host":
                    prog.emit(Command("host", node.name, node.op,
                                      elements=sum(_elements(t) for t in node.outputs if t is not None and t.name)))
                else:
                    spec, tiling = specs[node.name], tiling_from_node(node)
                    info.attention = (spec, tiling)
                    need = min(attention_sram_bytes(spec, tiling, self.geo), self.geo.sram_bytes)
                    # the block's tiles take the SRAM they need: evict what is live, furthest use first
                    for r in sorted(resident, key=lambda r: -next_use(r, i)):
                        if sum(resident.values()) + need <= self.geo.sram_bytes:
                            break
                        if r not in in_dram:
                            self._dma("store", node, r, spill=True)
                            in_dram.add(r)
                        why.setdefault(r, f"evicted for {node.name} (its tiles need the SRAM)")
                        del resident[r]
                    for r in act_in[3:]:   # a mask input: read once from DRAM
                        self._dma("load", node, r, spill=False)
                    prog.commands.extend(lower_attention(spec, tiling, self.geo, op=node.name, op_type=node.op,
                                                         loop_base=self.loops))
                    self.loops += 1 << 20
                    peak = max(peak, sum(resident.values()) + need)
                in_dram.update(outs)
                for r in outs:
                    why.setdefault(r, f"written to DRAM by {'the host' if kind == 'host' else 'attention'} op "
                                      f"{node.name}")
                continue

            operands = list(dict.fromkeys(act_in + outs))   # ordered: ties break the same way every run
            streamed: set[str] = {r for r in act_in if r in cascaded}

            def working_set(operands=operands, streamed=streamed) -> int:
                return (sum(s for r, s in resident.items() if r not in operands)
                        + sum(self.size[r] for r in operands if r not in streamed))

            if working_set() > self.budget:
                for r in sorted((r for r in resident if r not in operands), key=lambda r: -next_use(r, i)):
                    if r not in in_dram:
                        self._dma("store", node, r, spill=True)
                        in_dram.add(r)
                    why.setdefault(r, f"evicted for {node.name} (SRAM full; its next use is the furthest)")
                    del resident[r]
                    if working_set() <= self.budget:
                        break
                for r in sorted(operands, key=lambda r: (-self.size[r], r)):
                    if working_set() <= self.budget:
                        break
                    streamed.add(r)
            for r in act_in:
                if r in cascaded:
                    continue
                if r not in resident:
                    self._dma("load", node, r, spill=r not in pinned and r not in graph_in)
                    in_dram.add(r)
                    if r not in streamed:
                        resident[r] = self.size[r]
            keep = pinned | graph_out
            casc_out = [r for r in outs if r in streamed and self.can_stream(r, i, node, nodes, kinds, uses, keep)]
            wbytes = self.weight_bytes(node)
            prog.weight_bytes += wbytes
            if wbytes and not self.resident_weights:
                # in a cascade the op runs once per row stripe; weights that do not stay in the
                # weight buffer are fetched again for every stripe
                stripe = sum(self.size[r] for r in act_in if r in cascaded) + sum(self.size[r] for r in casc_out)
                tiles = max(1, -(-stripe // max(self.budget, 1))) if wbytes > self.geo.weight_buffer_bytes else 1
                prog.emit(Command("load", node.name, node.op, tensor=f"{node.name}:weights", bytes=wbytes,
                                  repeat=int(tiles)))
            prog.emit(self.tensor_command(node) if kind == "tensor" else self.vector_command(node))
            peak = max(peak, working_set() + (0 if self.resident_weights else min(wbytes, self.geo.weight_buffer_bytes)))
            for r in act_in:
                if r in streamed:
                    resident.pop(r, None)
            for r in outs:
                if r in casc_out:
                    cascaded.add(r)
                    why[r] = (f"too big for SRAM: kept on chip in row stripes from {node.name} to "
                              f"{nodes[uses[r][-1]].name}")
                    continue
                if r in streamed or r in pinned or r in graph_out:
                    self._dma("store", node, r, spill=r in streamed and r not in pinned and r not in graph_out)
                    in_dram.add(r)
                    why.setdefault(r, "graph output" if r in graph_out else "attention operand (read from DRAM)"
                                   if r in pinned else f"does not fit SRAM with the other operands of {node.name}")
                if r not in streamed and r not in pinned and next_use(r, i + 1) != _NEVER:
                    resident[r] = self.size[r]
                    if r not in graph_out:
                        in_dram.discard(r)

        for r in self.size:
            prog.residency[r] = "stream" if r in cascaded else "dram" if r in in_dram else "sram"
            if prog.residency[r] == "sram":
                why.pop(r, None)
        prog.tensor_bytes = dict(self.size)
        prog.sram_peak_bytes = int(peak)
        prog.resident_weight_bytes = self.resident_weights
        return prog

    def can_stream(self, r: str, i: int, node: gs.Node, nodes, kinds, uses, keep: set[str]) -> bool:
        """Whether output ``r`` of node ``i`` (too big for SRAM) stays on chip in a spatial cascade:
        every op from the producer to the last use of ``r`` reads its activations row by row (a
        convolution, a matmul with constant weights, an elementwise op or activation), and each use
        reads ``r`` as such an activation (not as weights). The cascade then runs in row stripes
        (Vela's cascading): only a stripe of ``r`` is ever in SRAM, and it never goes to DRAM."""
        if r in keep or node.op not in STREAM_PRODUCERS or not uses.get(r):
            return False
        if not self.geo.cascade and (len(uses[r]) != 1 or any(kinds[k] != "none" for k in range(i + 1, uses[r][0]))):
            return False   # without cascades: a two-op hand-off to the very next op only
        last = uses[r][-1]
        for k in range(i + 1, last + 1):
            if kinds[k] == "none":
                continue
            if kinds[k] not in ("tensor", "vector") or nodes[k].op not in STREAM_CONSUMERS:
                return False
        for j in uses[r]:
            consumer = nodes[j]
            if consumer.op in TENSOR_OPS:
                ins = [self.types.find(t.name) if t is not None and t.name else "" for t in consumer.inputs]
                # the weights (or a matmul's second operand) are needed whole; the activation
                # input and a fused residual are read row by row
                if len(ins) > 1 and ins[1] == r:
                    return False
        return True

    # weights ----------------------------------------------------------------------------------
    def weight_bytes(self, node: gs.Node) -> int:
        """Bytes of the node's compile-time inputs at their deployed types (biases INT32 in W8A16;
        vector-op parameters at activation width)."""
        total = 0
        types = self.types
        for idx, t in enumerate(node.inputs):
            if t is None or not t.name or not types.is_const(t):
                continue
            shape = _shape(t)
            n = int(math.prod(shape)) if shape is not None else 1
            if node.op in TENSOR_OPS and idx == 2:
                code = types.bias(t)
            elif node.op in TENSOR_OPS:
                code = types.of(t)
            else:
                code = types.of(t)
                if self.precision == "w8a16" and code == "int8":
                    code = "int16"
            total += n * BYTES[code]
        return total

    # compute commands -------------------------------------------------------------------------
    def tensor_command(self, node: gs.Node) -> Command:
        """MACs, padded MACs (rows to the row granularity, input and output channels to the
        channel granularity) and the output elements of a convolution or matmul."""
        g, rg = self.geo.channel_granularity, self.geo.row_granularity
        types = self.types
        x, w, y = node.inputs[0], node.inputs[1], node.outputs[0]
        xs, ws_, ys = _shape(x), _shape(w), _shape(y)
        if xs is None or ws_ is None or ys is None:
            raise BuildError(f"'{node.name}' ({node.op}) has operands without static shapes")
        if node.op in ("Conv", "FusedConv", "ConvTranspose"):
            grp = int(node.attrs.get("group", 1))
            k = int(math.prod(ws_[2:])) if len(ws_) > 2 else 1
            if node.op == "ConvTranspose":
                rows = xs[0] * int(math.prod(xs[2:]))
                cin_g, cout_g = xs[1] // grp, ws_[1]
            else:
                rows = ys[0] * int(math.prod(ys[2:]))
                cin_g, cout_g = ws_[1], ys[1] // grp
            macs = grp * rows * cin_g * k * cout_g
            padded = grp * pad(rows, rg) * contraction(cin_g, k, g) * pad(cout_g, g)
            if cin_g == 1 and cout_g == 1 and grp > 1:
                # depthwise: the channels take the output lanes, the kernel taps the contraction
                padded = pad(rows, rg) * pad(k, g) * pad(grp, g)
        else:  # MatMul / FusedMatMul / Gemm
            if node.op == "Gemm":
                m, kk = (xs[1], xs[0]) if node.attrs.get("transA", 0) else (xs[0], xs[1])
                n = ws_[0] if node.attrs.get("transB", 0) else ws_[1]
                batch = 1
            else:
                xs2 = (1,) + tuple(xs) if len(xs) == 1 else tuple(xs)
                ws2 = tuple(ws_) + (1,) if len(ws_) == 1 else tuple(ws_)
                m, kk, n = xs2[-2], xs2[-1], ws2[-1]
                batch = int(math.prod(ys[:-2])) if len(ys) > 2 else 1
            macs = batch * m * kk * n
            padded = batch * pad(m, rg) * pad(kk, g) * pad(n, g)
        return Command("tensor", node.name, node.op, macs=int(macs), padded_macs=int(padded),
                       out_elements=_elements(y), precision=precision_key(types.of(w), types.of(x)), dispatches=1)

    def vector_command(self, node: gs.Node) -> Command:
        if node.op in INPUT_SIZED:
            elements = _elements(node.inputs[0])
        else:
            elements = sum(_elements(t) for t in node.outputs if t is not None and t.name)
        x = node.inputs[0] if node.op in INPUT_SIZED or not node.outputs else node.outputs[0]
        width = min(BYTES[self.types.of(x)], 4)
        return Command("vector", node.name, node.op, elements=int(elements),
                       passes=VECTOR_PASSES.get(node.op, _COPY), dispatches=1, elem_bytes=width)
