"""The edgefc ``TiledAttention`` op that MLT emits (paper Sec. 2.3): its numerics.

The op's ONNX local function is :func:`edgefc.tiled_attention_function.function_proto`
(stamped on export): Attention-23 (3D form) computed tile
by tile with a ``Loop`` over the ``row_tiles x head_tiles`` tiles, the tiles of
:func:`edgefc.attention.tile_grid` (the ones the cost model prices and the TVM import emits), so
onnxruntime runs exactly the tiling that was chosen. :func:`tiled_attention_numpy` executes the
same tiles in numpy as the NPU would, :func:`edgefc.attention.reference` the untiled block (tests
compare them). ``passes/mlt.py`` chooses the tiling and rewrites the graph.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from edgefc.attention import (
    DEFERRED_ATTR,
    AttentionSpec,
    Tiling,
    deferred_probabilities,
    is_attention,
    spec_from_node,
    tile_grid,
)
from edgefc.dtypes import dtype_code
from edgefc.tiled_attention_function import DOMAIN, OP

__all__ = ["DOMAIN", "OP", "defer_normalization", "tiled_attention_numpy"]


def defer_normalization(node: gs.Node) -> str | None:
    """Make the attention ``node`` compute with its normalisation deferred, in place
    (:attr:`edgefc.attention.AttentionSpec.deferred`): an ``Attention``-23 becomes a one-tile
    ``TiledAttention`` (which MLT may tile further), a ``TiledAttention`` gets
    ``deferred_normalization = 1``. Returns None, or why the node cannot (a form
    ``TiledAttention`` does not take: a mask, past key/values, different head counts ...)."""
    if not is_attention(node):
        return f"{node.op} is not an attention"
    try:
        spec = spec_from_node(node)
    except ValueError as e:
        return str(e)
    if node.op != OP:
        scale = node.attrs.get("scale")
        node.op, node.domain = OP, DOMAIN
        node.attrs = {"q_num_heads": spec.heads, "kv_num_heads": spec.heads,
                      "scale": float(scale) if scale is not None else 1.0 / float(np.sqrt(spec.head_dim)),
                      "is_causal": int(spec.causal), "row_tiles": 1, "head_tiles": 1, "row_granularity": 1}
        while len(node.inputs) > 3:   # empty optional inputs (spec_from_node refused real ones)
            node.inputs.pop()
        while len(node.outputs) > 1:
            node.outputs.pop()
    node.attrs[DEFERRED_ATTR] = 1
    return None


# --- numerics: the tiled block executed tile by tile (edgefc.attention.reference: the untiled one)

def tiled_attention_numpy(q, k, v, heads: int, scale: float, causal: bool, tiling: Tiling,
                          granularity: int, on_tile=None, deferred: bool = False) -> np.ndarray:
    """Execute an attention tile by tile as the NPU would (``edgefc.attention`` tile conventions):
    padded rows split into ``tiling.row_tiles`` tiles of whole granules, heads into
    ``tiling.head_tiles`` groups; per tile S_in, softmax, S_out x V; outputs written in place.

    ``on_tile(t, rows, heads, s_in)`` is called per tile (tests use it to check tile shapes).
    ``deferred``: the deferred-normalisation arithmetic (``edgefc.attention.reference``'s).
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
        if deferred:
            s_out = deferred_probabilities(s_out)
            a_t = (s_out @ v_g) / s_out.sum(-1, keepdims=True)
        else:
            s_out /= s_out.sum(-1, keepdims=True)
            a_t = s_out @ v_g
        out[:, r0:r0 + rows_per_tile, h0 * dv:(h0 + hpt) * dv] = a_t.transpose(0, 2, 1, 3).reshape(b, rows_per_tile, hpt * dv)
    return out[:, :sq]
