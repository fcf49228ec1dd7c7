"""The ONNX body of the edgefc ``TiledAttention`` op (paper Sec. 2.3), in its two overloads.

``TiledAttention`` is Attention-23 (3D form) computed tile by tile with a ``Loop`` over the
``row_tiles x head_tiles`` tiles of :func:`edgefc.attention.tile_grid` (the ones the cost model
prices and the TVM import emits), so onnxruntime runs exactly the tiling that was chosen. Two
bodies (ONNX function overloads, chosen per node by :func:`overload_of` when the model is
exported, :func:`edgefc.functions.attach_functions`):

* the default (no overload): per tile ``S_out = Softmax(S_in)``, ``A_t = S_out V``;
* ``deferred`` (``deferred_normalization = 1``, a W8A8 attention, :attr:`edgefc.attention.
  AttentionSpec.deferred`): per tile ``E = exp(S_in - rowmax)`` stored as UINT8 on the grid of
  1/255 (``QuantizeLinear``/``DequantizeLinear``: the NPU's S_out, emulated), ``A_t = (E V) /
  rowsum(E)``. The numpy form is :func:`edgefc.attention.reference` with ``deferred=True``.

``passes/mlt.py`` and ``quantize`` write the nodes; ``passes/tiled_attention.py`` executes the
tiles in numpy.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx.parser

DOMAIN = "edgefc"
OP = "TiledAttention"
#: the attribute that selects the deferred-normalisation arithmetic (its ONNX body is the
#: ``deferred`` overload; :attr:`edgefc.attention.AttentionSpec.deferred`).
DEFERRED_ATTR = "deferred_normalization"
#: the UINT8 grid of a deferred-normalisation S_out: exp(S - rowmax) in (0, 1] in steps of 1/255.
DEFERRED_LEVELS = 255
#: the overload of a deferred-normalisation TiledAttention.
DEFERRED = "deferred"
#: the attributes of every TiledAttention (the function's attribute list; the deferred overload
#: declares ``deferred_normalization`` too, which selects it).
ATTRIBUTES = ("q_num_heads", "kv_num_heads", "scale", "is_causal", "row_tiles", "head_tiles", "row_granularity")

# The TiledAttention body in ONNX text. Attributes arrive by reference (@name); shapes are read at
# run time, so one function serves every instance. The tiles are edgefc.attention.tile_grid's:
# n = ceil(Sq / G) granules of G = row_granularity rows, row tiles of T = ceil(n / row_tiles) * G
# rows, the rows padded to P = row_tiles * T (zero query rows, dropped again at the end), so every
# tile has the same shape and the Loop's scan output stacks them:
# [row_tiles * head_tiles, B, H/head_tiles, T, dv], tile t = (row tile t // head_tiles, head group
# t % head_tiles).
#
# The Loop takes the tensors its tiles slice (Qp, Kt, Vh) as explicit loop-carried inputs, passed
# through unchanged, never as outer-scope values the body reads implicitly: onnxruntime (1.32) moves
# a DequantizeLinear forward through Reshape/Transpose (QDQPropagationTransformer, a level-1
# optimizer, on under the default session options), and where the last of those ops fed the Loop
# implicitly it rewired input slot ``explicit inputs + k`` of the Loop, past the end of its input
# list: an assertion and SIGABRT on loading every W8A16 build with a tiled attention (issue 18).
# Explicit inputs are slots it can rewire; the result is the same bit for bit.
_FUNCTION_TEXT = """
<domain: "edgefc", opset_import: ["" : {opset}], doc_string: "{doc}">
TiledAttention <{attributes}> (Q, K, V) => (Y)
{{
  h_s = Constant <value_int: int = @q_num_heads> ()
  rt_s = Constant <value_int: int = @row_tiles> ()
  ht_s = Constant <value_int: int = @head_tiles> ()
  gr_s = Constant <value_int: int = @row_granularity> ()
  causal_i = Constant <value_int: int = @is_causal> ()
  scale_f = Constant <value_float: float = @scale> ()
  ninf_f = Constant <value_float = -inf> ()
  zero = Constant <value_int = 0> ()
  one = Constant <value_int = 1> ()
  v1 = Constant <value_ints = [1]> ()
  v0 = Constant <value_ints = [0]> ()
  pad_head = Constant <value_ints = [0, 0, 0, 0, 0, 0]> ()
  H = Reshape (h_s, v1)
  R = Reshape (rt_s, v1)
  G = Reshape (ht_s, v1)
  Gr = Reshape (gr_s, v1)
  B = Shape <start = 0, end = 1> (Q)
  Sq = Shape <start = 1, end = 2> (Q)
  Eq = Shape <start = 2, end = 3> (Q)
  Skv = Shape <start = 1, end = 2> (K)
  Ev = Shape <start = 2, end = 3> (V)
  dk = Div (Eq, H)
  dv = Div (Ev, H)
  Hpt = Div (H, G)
  Gr_1 = Sub (Gr, v1)
  Sq_up = Add (Sq, Gr_1)
  Ng = Div (Sq_up, Gr)
  R_1 = Sub (R, v1)
  Ng_up = Add (Ng, R_1)
  Tg = Div (Ng_up, R)
  T = Mul (Tg, Gr)
  P = Mul (T, R)
  pad_rows = Sub (P, Sq)
  pads = Concat <axis = 0> (pad_head, pad_rows, v0)
  q_shape = Concat <axis = 0> (B, Sq, H, dk)
  k_shape = Concat <axis = 0> (B, Skv, H, dk)
  v_shape = Concat <axis = 0> (B, Skv, H, dv)
  Q4 = Reshape (Q, q_shape)
  Qh = Transpose <perm = [0, 2, 1, 3]> (Q4)
  Qp = Pad (Qh, pads)
  K4 = Reshape (K, k_shape)
  Kt = Transpose <perm = [0, 2, 3, 1]> (K4)
  V4 = Reshape (V, v_shape)
  Vh = Transpose <perm = [0, 2, 1, 3]> (V4)
  tiles = Mul (rt_s, ht_s)
  T_s = Squeeze (T)
  Hpt_s = Squeeze (Hpt)
  Skv_s = Squeeze (Skv)
  cols = Range (zero, Skv_s, one)
  causal = Cast <to = 9> (causal_i)
  scale = CastLike (scale_f, Q)
  ninf = CastLike (ninf_f, Q)
  go = Cast <to = 9> (one)
  Qp_f, Kt_f, Vh_f, A = Loop (tiles, go, Qp, Kt, Vh) <body = tile (int64 t, bool c, Qp_i, Kt_i, Vh_i) => (bool c_out, Qp_o, Kt_o, Vh_o, A_t) {{
      r = Div (t, ht_s)
      g = Mod (t, ht_s)
      r0 = Mul (r, T_s)
      r1 = Add (r0, T_s)
      g0 = Mul (g, Hpt_s)
      g1 = Add (g0, Hpt_s)
      g0_1 = Unsqueeze (g0, zero)
      g1_1 = Unsqueeze (g1, zero)
      r0_1 = Unsqueeze (r0, zero)
      r1_1 = Unsqueeze (r1, zero)
      q_start = Concat <axis = 0> (g0_1, r0_1)
      q_end = Concat <axis = 0> (g1_1, r1_1)
      q_axes = Constant <value_ints = [1, 2]> ()
      h_axis = Constant <value_ints = [1]> ()
      Q_t = Slice (Qp_i, q_start, q_end, q_axes)
      Kt_g = Slice (Kt_i, g0_1, g1_1, h_axis)
      V_g = Slice (Vh_i, g0_1, g1_1, h_axis)
      QK = MatMul (Q_t, Kt_g)
      S_in = Mul (QK, scale)
      rows_0 = Range (zero, T_s, one)
      rows = Add (rows_0, r0)
      rows_c = Unsqueeze (rows, one)
      above = Greater (cols, rows_c)
      masked = And (above, causal)
      S_m = Where (masked, ninf, S_in)
{probabilities}      c_out = Identity (c)
      Qp_o = Identity (Qp_i)
      Kt_o = Identity (Kt_i)
      Vh_o = Identity (Vh_i)
  }}>
  a_shape = Concat <axis = 0> (R, G, B, Hpt, T, dv)
  A6 = Reshape (A, a_shape)
  A6t = Transpose <perm = [2, 0, 4, 1, 3, 5]> (A6)
  Hdv = Mul (H, dv)
  y_shape = Concat <axis = 0> (B, P, Hdv)
  Yp = Reshape (A6t, y_shape)
  Y = Slice (Yp, v0, Sq, v1)
}}
"""

#: per tile, S_out and A_t: the softmax, then S_out x V.
_NORMALISED = """      S_out = Softmax <axis = -1> (S_m)
      A_t = MatMul (S_out, V_g)
"""
#: per tile, the deferred form: E = exp(S - rowmax) on the UINT8 grid, A_t = (E V) / rowsum(E).
_DEFERRED = """      last = Constant <value_ints = [-1]> ()
      S_max = ReduceMax <keepdims = 1> (S_m, last)
      S_d = Sub (S_m, S_max)
      E = Exp (S_d)
      p_scale_f = Constant <value_float = {step}> ()
      p_scale = CastLike (p_scale_f, E)
      p_zero = Constant <value = uint8 {{0}}> ()
      E_q = QuantizeLinear (E, p_scale, p_zero)
      S_out = DequantizeLinear (E_q, p_scale, p_zero)
      A_u = MatMul (S_out, V_g)
      S_sum = ReduceSum <keepdims = 1> (S_out, last)
      A_t = Div (A_u, S_sum)
"""

_DOC = ("Attention-23 (3D form) computed tile by tile: row_tiles query-row tiles x head_tiles head groups; per "
        "tile S_in = Q_t K_g^T * scale, {per_tile}. Emitted by edgefc mlt (EdgeFusion Sec. 2.3).")
_PER_TILE = {"": "S_out = Softmax(S_in), A_t = S_out V_g",
             DEFERRED: ("E = exp(S_in - rowmax) on the UINT8 grid of 1/255 (deferred normalisation), "
                        "A_t = (E V_g) / rowsum(E)")}


def overload_of(node: onnx.NodeProto) -> str:
    """The overload a TiledAttention NodeProto calls: ``deferred`` when its
    ``deferred_normalization`` attribute is set, else the default body ("")."""
    value = next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == DEFERRED_ATTR), 0)
    return DEFERRED if int(value) else ""


def function_proto(opset: int = 23, overload: str = "") -> onnx.FunctionProto:
    """The ``edgefc::TiledAttention`` local function (ONNX FunctionProto) of ``overload`` ("" or
    :data:`DEFERRED`) for a model at standard ``opset``."""
    if overload not in _PER_TILE:
        raise ValueError(f"unknown TiledAttention overload {overload!r}")
    attributes = ATTRIBUTES + ((DEFERRED_ATTR,) if overload else ())
    step = f"{float(np.float32(1.0 / DEFERRED_LEVELS)):.9g}"
    text = _FUNCTION_TEXT.format(opset=int(opset), doc=_DOC.format(per_tile=_PER_TILE[overload]),
                                 attributes=", ".join(attributes),
                                 probabilities=_DEFERRED.format(step=step) if overload else _NORMALISED)
    proto = onnx.parser.parse_function(text)
    proto.overload = overload
    return proto
