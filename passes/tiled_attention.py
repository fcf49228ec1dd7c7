"""The edgefc ``TiledAttention`` op that MLT emits (paper Sec. 2.3): its ONNX body and numerics.

:func:`tiled_attention_function_proto` is the op's ONNX local function: Attention-23 (3D form)
computed tile by tile with a ``Loop`` over the ``row_tiles x head_tiles`` tiles, the tiles of
:func:`edgefc.attention.tile_grid` (the ones the cost model prices and the TVM import emits), so
onnxruntime runs exactly the tiling that was chosen. :func:`tiled_attention_numpy` executes the
same tiles in numpy as the NPU would, :func:`edgefc.attention.reference` the untiled block (tests
compare them). ``passes/mlt.py`` chooses the tiling and rewrites the graph.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx.parser
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.importers.onnx_importer import OnnxImporter

from edgefc.attention import AttentionSpec, Tiling, tile_grid
from edgefc.dtypes import dtype_code

DOMAIN = "edgefc"
OP = "TiledAttention"

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
TiledAttention <q_num_heads, kv_num_heads, scale, is_causal, row_tiles, head_tiles, row_granularity> (Q, K, V) => (Y)
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
      S_out = Softmax <axis = -1> (S_m)
      A_t = MatMul (S_out, V_g)
      c_out = Identity (c)
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

_FUNCTION_DOC = ("Attention-23 (3D form) computed tile by tile: row_tiles query-row tiles x head_tiles head "
                 "groups; per tile S_in = Q_t K_g^T * scale, S_out = Softmax(S_in), A_t = S_out V_g. "
                 "Emitted by edgefc mlt (EdgeFusion Sec. 2.3).")


def tiled_attention_function_proto(opset: int = 23) -> onnx.FunctionProto:
    """The ``edgefc::TiledAttention`` local function (ONNX FunctionProto) for a model at ``opset``."""
    return onnx.parser.parse_function(_FUNCTION_TEXT.format(opset=int(opset), doc=_FUNCTION_DOC))


def tiled_attention_function(opset: int = 23) -> gs.Function:
    """The same function as a graphsurgeon ``Function`` to put in ``graph.functions``."""
    proto = tiled_attention_function_proto(opset)
    return OnnxImporter.import_function(proto, model_opset=int(opset),
                                        model_import_domains=[onnx.helper.make_opsetid("", int(opset))])


def ensure_function(graph: gs.Graph) -> None:
    """Add the TiledAttention function to ``graph`` once (replacing a stale copy at another opset)."""
    fn = tiled_attention_function(int(graph.opset))
    graph.functions = [f for f in graph.functions if f.unique_id != fn.unique_id] + [fn]


# --- numerics: the tiled block executed tile by tile (edgefc.attention.reference: the untiled one)

def tiled_attention_numpy(q, k, v, heads: int, scale: float, causal: bool, tiling: Tiling,
                          granularity: int, on_tile=None) -> np.ndarray:
    """Execute an attention tile by tile as the NPU would (``edgefc.attention`` tile conventions):
    padded rows split into ``tiling.row_tiles`` tiles of whole granules, heads into
    ``tiling.head_tiles`` groups; per tile S_in, softmax, S_out x V; outputs written in place.

    ``on_tile(t, rows, heads, s_in)`` is called per tile (tests use it to check tile shapes).
    """
    b, sq, e = q.shape
    skv, ev = k.shape[1], v.shape[2]
    dk, dv = e // heads, ev // heads
    spec = AttentionSpec("numpy", b, heads, sq, skv, dk, dv, dtype_code(q.dtype), causal)
    grid = tile_grid(spec.q_len, spec.heads, tiling, granularity)
    rows_per_tile, hpt = grid.rows, grid.heads
    qp = np.zeros((b, grid.padded_rows, e), q.dtype)
    qp[:, :sq] = q
    out = np.zeros((b, qp.shape[1], ev), q.dtype)
    cols = np.arange(skv)
    for t in range(grid.tiles):
        r, g = divmod(t, grid.head_tiles)
        r0, h0 = r * rows_per_tile, g * hpt
        q_t = qp[:, r0:r0 + rows_per_tile, h0 * dk:(h0 + hpt) * dk].reshape(b, rows_per_tile, hpt, dk).transpose(0, 2, 1, 3)
        k_g = k[:, :, h0 * dk:(h0 + hpt) * dk].reshape(b, skv, hpt, dk).transpose(0, 2, 3, 1)
        v_g = v[:, :, h0 * dv:(h0 + hpt) * dv].reshape(b, skv, hpt, dv).transpose(0, 2, 1, 3)
        s_in = q_t @ k_g * scale
        if causal:
            s_in = np.where(cols[None, :] > (r0 + np.arange(rows_per_tile))[:, None], -np.inf, s_in)
        if on_tile is not None:
            on_tile(t, rows_per_tile, hpt, s_in)
        s_out = np.exp(s_in - s_in.max(-1, keepdims=True))
        s_out /= s_out.sum(-1, keepdims=True)
        a_t = s_out @ v_g
        out[:, r0:r0 + rows_per_tile, h0 * dv:(h0 + hpt) * dv] = a_t.transpose(0, 2, 1, 3).reshape(b, rows_per_tile, hpt * dv)
    return out[:, :sq]
