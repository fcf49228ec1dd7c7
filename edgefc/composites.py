"""The NPU composites, described once (paper Sec. 3, kernel fusion; DESIGN.md "TVM lowering").

A *composite* is a group of operators the NPU executes as one kernel: a conv2d or matmul with
its epilogue (bias, activation, residual add), group norm + SiLU, the GEGLU gate, one attention
tile. This module names each composite, its root op and its parts, with the ONNX and the Relax
op of every part, and the priority order of the variants. It is data only (no ONNX, no TVM),
and two consumers generate their patterns from it, the way TVM's pattern registry
(``relax/backend/pattern_registry.py``) serves both fusion and BYOC partitioning:

* the ONNX fusion passes: ``passes/fuse_epilogue.py`` builds one pattern per :data:`EPILOGUES`
  variant with an activation or a residual (and names its Conv + bias pattern after
  ``conv2d_bias``), ``passes/fuse_matmul.py`` the ``matmul_bias`` one, ``passes/fuse_groupnorm.py``
  the SiLU tail of :data:`GROUP_NORM_SILU`, ``passes/fuse_geglu.py`` the gate of :data:`GEGLU`;
  ``edgefc/functions.py`` writes the bodies of the fused ops (FusedConv, FusedMatMul,
  GroupNormSiLU, GeGLU) from the same activations;
* the TVM lowering: ``targets/tvm_patterns.py`` builds its Relax DPL table (one entry per
  composite variant, named ``edgefc_npu.<name>``), and ``targets/tvm_import.py`` expands the fused
  ONNX ops into exactly the Relax ops that table matches.

A fused ONNX op therefore is one composite variant, named the same on both sides:
``FusedConv(activation="silu")`` with a residual input is ``conv2d_bias_silu_residual``
(the fused ops always carry a bias; a bias-free Conv gets a zero one). ``tests/test_tvm.py``
compares the names both sides generate.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Activation:
    """An activation a composite may fold, in the forms the two sides see.

    ``onnx_op`` computes it as the exporters write it; with ``gated`` the form is
    ``x * onnx_op(x)`` (SiLU = ``x * Sigmoid(x)``). ``onnx_attrs``: attribute -> the values
    accepted (``None``: the attribute absent). ``relax_op`` is the op TVM's frontend or our import
    writes; a gated activation also matches as ``multiply(x, relax_gate_op(x))``."""

    name: str                     # the ``activation`` attribute of FusedMatMul / FusedConv
    onnx_op: str
    relax_op: str
    gated: bool = False
    relax_gate_op: str | None = None
    onnx_attrs: dict[str, tuple] = field(default_factory=dict)
    #: constant scalar inputs of the ONNX op after the activated value (Clip's min and max); the
    #: fused op carries them as float attributes of these names, the Relax op as arguments
    bounds: tuple[str, ...] = ()


SILU = Activation("silu", onnx_op="Sigmoid", relax_op="relax.nn.silu", gated=True, relax_gate_op="relax.sigmoid")
GELU = Activation("gelu", onnx_op="Gelu", relax_op="relax.nn.gelu", onnx_attrs={"approximate": (None, "none")})
#: a clamp to constant bounds (ReLU6 = Clip(0, 6)); the NPU's convolutions take it as their
#: epilogue (ExecuTorch's Samsung backend: clamp / hardtanh after conv2d).
CLIP = Activation("clip", onnx_op="Clip", relax_op="relax.clip", bounds=("clip_min", "clip_max"))

#: the activations an epilogue folds, in priority order (the ONNX fused ops' ``activation``
#: values, besides ``"none"``). A tanh GELU, a bare Sigmoid or a ReLU stays a separate op (the
#: ReLU too: the target fit, bench/fit_exynos2400.py, prices MobileNetEdgeTPU's and EDSR's ReLUs
#: as ops of their own; folding them needs a new fit).
ACTIVATIONS: dict[str, Activation] = {a.name: a for a in (SILU, GELU, CLIP)}


def attr_accepts(activation: Activation, attr: str, value) -> bool:
    """Whether an ONNX attribute value (str, bytes or None) is one ``activation`` accepts."""
    if isinstance(value, bytes):
        value = value.decode()
    return value in activation.onnx_attrs.get(attr, (value,))


@dataclass(frozen=True)
class Root:
    """The operator a composite grows from: the ONNX ops it is found at (``onnx_ops``), the
    fused ONNX op the fusion emits (``fused_op``) and the Relax op (``relax_op``)."""

    name: str
    onnx_ops: tuple[str, ...]
    fused_op: str
    relax_op: str


CONV2D = Root("conv2d", ("FusedConv", "Conv"), "FusedConv", "relax.nn.conv2d")
MATMUL = Root("matmul", ("FusedMatMul", "Gemm"), "FusedMatMul", "relax.matmul")
GROUP_NORM = Root("group_norm", ("GroupNormalization", "InstanceNormalization"), "GroupNormSiLU", "relax.nn.group_norm")

#: the tensor-engine roots whose epilogues fold (``Gemm`` becomes a FusedMatMul).
TENSOR_ROOTS = (CONV2D, MATMUL)


@dataclass(frozen=True)
class Epilogue:
    """A root with its epilogue parts, in execution order: ``bias`` add, ``activation``,
    ``residual`` add (the residual is added after the activation)."""

    root: Root
    bias: bool
    activation: Activation | None
    residual: bool

    @property
    def name(self) -> str:
        """``conv2d_bias_silu_residual``, ``matmul_bias``, ``group_norm_silu`` ..."""
        return "_".join([self.root.name, *(["bias"] if self.bias else []),
                         *([self.activation.name] if self.activation else []),
                         *(["residual"] if self.residual else [])])


#: every conv2d / matmul composite, highest priority first: bias always (the fused ops carry
#: one), x each activation (then none), x with a residual add (then without). A variant comes
#: before every variant whose chain is a prefix of its own, so the longest chain that matches wins.
EPILOGUES: tuple[Epilogue, ...] = tuple(Epilogue(root, True, act, residual) for root in TENSOR_ROOTS
                                        for act in (*ACTIVATIONS.values(), None) for residual in (True, False))


def epilogue(root: Root, activation: str | None, residual: bool) -> Epilogue:
    """The :data:`EPILOGUES` variant of ``root`` (bias included) with ``activation`` ("none" or
    None: no activation) and ``residual``."""
    act = None if activation in (None, "none") else ACTIVATIONS[activation]
    return next(e for e in EPILOGUES if e.root == root and e.activation == act and e.residual == residual)


#: group norm followed by SiLU (ONNX: ``edgefc.GroupNormSiLU``).
GROUP_NORM_SILU = Epilogue(GROUP_NORM, bias=False, activation=SILU, residual=False)


@dataclass(frozen=True)
class Gate:
    """``Y = A * act(B)`` with A, B the two halves of X's last axis (a gated linear unit)."""

    name: str
    activation: Activation
    fused_op: str            # the ONNX op the fusion emits
    onnx_split: str          # how the body splits X (the fusion also matches two Slices)
    relax_split: str


#: diffusers' GEGLU gate (ONNX: ``edgefc.GeGLU``).
GEGLU = Gate("geglu", GELU, "GeGLU", "Split", "relax.split")


@dataclass(frozen=True)
class Tile:
    """One attention tile: the attention op with the slices that cut its inputs out of the block
    (its DMA loads). A variant names the inputs sliced inside the composite."""

    name: str
    onnx_ops: tuple[str, ...]
    relax_op: str
    inputs: tuple[str, ...]
    relax_slice: str

    def variants(self) -> tuple[tuple[str, tuple[bool, ...]], ...]:
        """(name, sliced per input) of every variant with at least one slice, fewest slices first."""
        n = len(self.inputs)
        masks = sorted(range(1, 1 << n), key=lambda m: m.bit_count())
        return tuple((self.name + "".join("_" + self.inputs[i] for i in range(n) if m & (1 << i)),
                      tuple(bool(m & (1 << i)) for i in range(n))) for m in masks)


#: one (row block, head group) tile of an attention (ONNX: ``edgefc.TiledAttention``, MLT).
ATTENTION_TILE = Tile("attention_tile", ("Attention", "TiledAttention"), "relax.nn.attention", ("q", "k", "v"),
                      "relax.strided_slice")


def fused_op_composites() -> dict[str, tuple[str, ...]]:
    """fused ONNX op -> the names of the composites it can stand for (what the ONNX side emits)."""
    out: dict[str, tuple[str, ...]] = {}
    for e in EPILOGUES:
        out[e.root.fused_op] = (*out.get(e.root.fused_op, ()), e.name)
    out[GROUP_NORM_SILU.root.fused_op] = (GROUP_NORM_SILU.name,)
    out[GEGLU.fused_op] = (GEGLU.name,)
    return out
