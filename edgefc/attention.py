"""What the tiling solver and the cost model agree an attention block is (paper Sec. 2.3).

One fused attention (ONNX ``Attention``-23 in the 3D form, or the edgefc ``TiledAttention`` that
model-level tiling emits) is described by an :class:`AttentionSpec`; how it is split is a
:class:`Tiling`. The helpers below fix, in one place, the conventions both sides use:

* rows are padded to the tensor engine's row granularity ``G`` (``target.row_granularity``, from
  the target file's ``tensor.row_granularity``): ``padded_rows = ceil(q_len / G) * G``;
* a tiling with ``row_tiles = r`` splits the padded rows into ``r`` equal tiles of
  ``padded_rows / r`` rows; the solver only considers ``r`` dividing ``padded_rows / G``, so every
  tile is a whole number of granules (the last tile holds the padding). A hand-written tiling
  whose ``r`` does not divide them pads further, to ``r`` tiles of ``ceil(n / r)`` granules
  (:func:`tile_grid`);
* ``head_tiles = h`` splits the heads into ``h`` groups of ``heads / h`` consecutive heads, so
  ``h`` divides ``heads``;
* tile ``t`` (0-based) is row tile ``t // h``, head group ``t % h``.

:func:`tile_grid` is the one definition of the tiles of a tiling: the ONNX body of
``TiledAttention`` (``passes/mlt.py``, which passes it ``row_granularity``), the cost model's
lowering (``targets/lowering.py``), the TVM import (``targets/tvm_import.py``), the numpy
execution of the tiles and the tests all take their tile bounds from it. :func:`reference` is the
one numpy reference of an untiled attention (the NPU runtime's kernel, and what the tiled numerics
are checked against).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from edgefc.dtypes import DTYPE_BYTES, dtype_code
from edgefc.errors import TargetError
from edgefc.tiled_attention_function import DEFERRED_ATTR, DEFERRED_LEVELS


@dataclass(frozen=True)
class AttentionSpec:
    """One fused attention: softmax(Q K^T * scale) V over ``heads`` heads.

    ``act_dtype`` is the element type of its activations as deployed (``fp32``, ``fp16``,
    ``int16``, ``int8``): it fixes both the bytes moved and the tensor-engine precision
    (``[tensor.rate]`` key) its two matmuls are priced at -- an FP16 attention is ``fp16``, not
    ``int16xint16``, although both are two bytes an element. ``score_dtype`` is the type of its
    softmax internals S_in and S_out when the precision policy keeps them wider than the
    activations (a W8A8 attention's INT16 scores: QK^T runs at ``int8xint8``, S_out x V at
    ``int8xint16``); empty: the activations' type.

    ``deferred``: the normalisation is deferred (a W8A8 attention, ``TiledAttention`` with
    ``deferred_normalization = 1``): S_out is the *unnormalised* ``exp(S_in - rowmax)`` in (0, 1],
    stored as UINT8 on a grid of 1/255 (one byte an element, S_out x V at the activations' type x
    INT8), and each output row is divided by its row sum after S_out x V. One INT8 scale over
    normalised probabilities would round the ~1/4096 probabilities of a 4096-key attention to 0;
    here each row's largest term is 1 (docs/quantization.md, "softmax internals").
    """

    name: str
    batch: int
    heads: int
    q_len: int
    kv_len: int
    head_dim: int
    v_head_dim: int
    act_dtype: str
    causal: bool = False
    score_dtype: str = ""
    deferred: bool = False

    def __post_init__(self):
        for t in (self.act_dtype, self.score_dtype or self.act_dtype):
            if t not in DTYPE_BYTES:
                raise ValueError(f"unknown activation type {t!r} (one of {', '.join(DTYPE_BYTES)})")

    @property
    def act_bytes(self) -> int:
        """Bytes per activation element."""
        return DTYPE_BYTES[self.act_dtype]

    @property
    def scores(self) -> str:
        """Element type of S_in and S_out."""
        return self.score_dtype or self.act_dtype

    @property
    def score_bytes(self) -> int:
        """Bytes per element of S_in."""
        return DTYPE_BYTES[self.scores]

    @property
    def probabilities(self) -> str:
        """Element type of S_out: INT8 (unsigned, unnormalised) when the normalisation is
        deferred, else the scores' type."""
        return "int8" if self.deferred else self.scores

    @property
    def probability_bytes(self) -> int:
        """Bytes per element of S_out."""
        return DTYPE_BYTES[self.probabilities]


@dataclass(frozen=True)
class Tiling:
    """Split of an attention into ``row_tiles`` query-row tiles x ``head_tiles`` head groups."""

    row_tiles: int = 1
    head_tiles: int = 1

    @property
    def tiles(self) -> int:
        return self.row_tiles * self.head_tiles


def row_granularity(target) -> int:
    """The target's row granularity (``target.row_granularity`` of ``edgefc.target.Target``; the
    interface's default is 1, rows not padded), checked to be a positive whole number."""
    g = target.row_granularity
    if isinstance(g, (int, np.integer)) and not isinstance(g, bool) and g > 0:
        return int(g)
    raise TargetError(f"target {target.name!r} has no positive integer row_granularity (got {g!r})")


def padded_rows(q_len: int, granularity: int) -> int:
    """Query rows padded up to a whole number of granules."""
    return -(-q_len // granularity) * granularity


def tile_rows(spec: AttentionSpec, tiling: Tiling, granularity: int) -> int:
    """Rows of one query-row tile of a tiling that splits the padded rows into whole granules
    (the solver's candidates): ``tile_grid(...).rows``; ValueError for any other tiling."""
    rows = padded_rows(spec.q_len, granularity)
    if rows % (tiling.row_tiles * granularity):
        raise ValueError(f"{tiling.row_tiles} row tiles do not split {rows} padded rows into granules of {granularity}")
    return tile_grid(spec.q_len, spec.heads, Tiling(tiling.row_tiles, 1), granularity).rows


def heads_per_tile(spec: AttentionSpec, tiling: Tiling) -> int:
    """Heads in one head group: ``tile_grid(...).heads``."""
    return tile_grid(spec.q_len, spec.heads, Tiling(1, tiling.head_tiles), 1).heads


@dataclass(frozen=True)
class TileGrid:
    """The tiles of one attention under one tiling: :func:`tile_grid`.

    ``rows`` query rows per row tile (whole granules, padding included), ``heads`` heads per
    head group; ``padded_rows = row_tiles * rows``. Every row tile holds at least one real query
    row; the padding (``padded_rows - q_len`` zero rows) sits at the end, in the last tile."""

    q_len: int
    padded_rows: int
    rows: int
    heads: int
    row_tiles: int
    head_tiles: int

    @property
    def tiles(self) -> int:
        return self.row_tiles * self.head_tiles

    def row_bounds(self) -> list[tuple[int, int]]:
        """[start, end) of each row tile in real query rows (the last one cut at ``q_len``)."""
        return [(r * self.rows, min((r + 1) * self.rows, self.q_len)) for r in range(self.row_tiles)]

    def head_bounds(self) -> list[tuple[int, int]]:
        """[start, end) of each head group."""
        return [(g * self.heads, (g + 1) * self.heads) for g in range(self.head_tiles)]

    def row_sizes(self) -> list[tuple[int, int]]:
        """``[(real rows, count), ...]`` of the row tiles: the full ones, then the last one if
        the padding makes it shorter."""
        last = self.q_len - (self.row_tiles - 1) * self.rows
        if last == self.rows:
            return [(self.rows, self.row_tiles)]
        return ([(self.rows, self.row_tiles - 1)] if self.row_tiles > 1 else []) + [(last, 1)]


def tile_grid(q_len: int, heads: int, tiling: Tiling, granularity: int) -> TileGrid:
    """The one definition of the tiles of a tiling (the module docstring's conventions).

    The query rows are ``n = ceil(q_len / G)`` granules of ``G = granularity`` rows; a row tile
    holds ``ceil(n / row_tiles)`` granules, so every tile has the same shape (what the ONNX body's
    Loop stacks) and a tiling whose ``row_tiles`` divides ``n`` (every tiling the solver considers)
    pads the rows to whole granules only. The heads split into ``head_tiles`` equal groups.
    ValueError (naming why) when ``head_tiles`` does not divide the heads or a row tile would
    hold no real row."""
    g = int(granularity)
    if tiling.row_tiles < 1 or tiling.head_tiles < 1 or g < 1:
        raise ValueError(f"row_tiles {tiling.row_tiles}, head_tiles {tiling.head_tiles} and granularity {g} "
                         "must be 1 or more")
    if heads % tiling.head_tiles:
        raise ValueError(f"{tiling.head_tiles} head tiles do not divide {heads} heads")
    rows = -(-(-(-int(q_len) // g)) // tiling.row_tiles) * g
    if (tiling.row_tiles - 1) * rows >= q_len:
        raise ValueError(f"{tiling.row_tiles} row tiles of {rows} rows (granules of {g}) leave a tile without "
                         f"any of the {q_len} query rows")
    return TileGrid(int(q_len), rows * tiling.row_tiles, rows, heads // tiling.head_tiles,
                    tiling.row_tiles, tiling.head_tiles)


def divisors(n: int) -> list[int]:
    """Positive divisors of ``n`` in increasing order."""
    small, large = [], []
    for d in range(1, math.isqrt(n) + 1):
        if n % d == 0:
            small.append(d)
            if d != n // d:
                large.append(n // d)
    return small + large[::-1]


def _attr(node, name, default=None):
    value = node.attrs.get(name, default)
    return value


def is_attention(node) -> bool:
    """Whether a graphsurgeon node is a fused attention: ``Attention`` (standard domain) or edgefc ``TiledAttention``."""
    return ((node.op == "Attention" and (node.domain or "") in ("", "ai.onnx"))
            or (node.op == "TiledAttention" and node.domain == "edgefc"))


def spec_from_node(node, act_dtype: str | None = None, score_dtype: str = "") -> AttentionSpec:
    """The :class:`AttentionSpec` of an ``Attention``-23 (3D form) or ``TiledAttention`` node.

    Needs static shapes on Q [B, Sq, H*dk], K [B, Skv, H*dk], V [B, Skv, H*dv] and equal
    ``q_num_heads``/``kv_num_heads``. ``act_dtype`` defaults to Q's element type. Raises
    ValueError (with the reason) for a form this does not describe.
    """
    from edgefc import ir

    if not is_attention(node):
        raise ValueError(f"{node.op} is not an attention")
    inputs = [t for t in node.inputs]
    if len(inputs) < 3 or any(t is None or (hasattr(t, "name") and not t.name) for t in inputs[:3]):
        raise ValueError("needs Q, K and V inputs")
    if len(inputs) > 3 and any(getattr(t, "name", "") for t in inputs[3:]):
        raise ValueError("has a mask or past key/value input")
    if len(node.outputs) != 1 and any(getattr(t, "name", "") for t in node.outputs[1:]):
        raise ValueError("has present key/value or QK outputs")
    shapes = [ir.static_shape(t) for t in inputs[:3]]
    if any(s is None for s in shapes):
        raise ValueError("Q, K or V has no static shape")
    q, k, v = shapes
    if len(q) != 3 or len(k) != 3 or len(v) != 3:
        raise ValueError(f"not the 3D form (Q has rank {len(q)})")
    heads = int(_attr(node, "q_num_heads", 0) or 0)
    kv_heads = int(_attr(node, "kv_num_heads", 0) or 0)
    if heads <= 0 or kv_heads != heads:
        raise ValueError(f"q_num_heads={heads} and kv_num_heads={kv_heads} must be equal and positive")
    for attr, default in (("softcap", 0.0), ("qk_matmul_output_mode", 0)):
        if float(_attr(node, attr, default) or 0) != default:
            raise ValueError(f"uses {attr}")
    if q[2] % heads or v[2] % heads or k[2] != q[2] or q[0] != k[0] or k[:2] != v[:2]:
        raise ValueError(f"Q {list(q)}, K {list(k)}, V {list(v)} do not split into {heads} heads")
    if act_dtype is None:
        act_dtype = dtype_code(inputs[0].dtype)
    return AttentionSpec(name=node.name or node.outputs[0].name, batch=q[0], heads=heads, q_len=q[1], kv_len=k[1],
                         head_dim=q[2] // heads, v_head_dim=v[2] // heads, act_dtype=act_dtype,
                         causal=bool(int(_attr(node, "is_causal", 0) or 0)), score_dtype=score_dtype,
                         deferred=is_deferred(node))


def is_deferred(node) -> bool:
    """Whether an attention node computes with its normalisation deferred (an edgefc
    ``TiledAttention`` with ``deferred_normalization = 1``, which ``quantize`` writes for a W8A8
    attention)."""
    return node.op == "TiledAttention" and bool(int(node.attrs.get(DEFERRED_ATTR, 0) or 0))


def tiling_from_node(node) -> Tiling:
    """The :class:`Tiling` of a ``TiledAttention`` node (one tile for a plain ``Attention``)."""
    if node.op == "TiledAttention":
        return Tiling(int(node.attrs.get("row_tiles", 1)), int(node.attrs.get("head_tiles", 1)))
    return Tiling(1, 1)


def granularity_from_node(node) -> int:
    """The row granule a ``TiledAttention`` node's tiles are cut at: its ``row_granularity``
    attribute (which its ONNX body requires; 1, rows not padded, when a hand-made node has none)."""
    g = node.attrs.get("row_granularity") if node.op == "TiledAttention" else None
    return int(g) if g is not None else 1


def reference(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float | None = None, causal: str | None = None,
              heads: int | None = None, deferred: bool = False) -> np.ndarray:
    """Untiled attention in numpy: ``softmax(Q K^T * scale [+ causal mask]) V``.

    ``q``, ``k``, ``v`` are ``[B, S, H, d]`` (Relax's layout, the NPU runtime's), or with ``heads``
    the ONNX 3D form ``[B, S, H*d]`` (the output then has that form too). ``scale`` defaults to
    ``1/sqrt(d)``; ``causal``: None, ``"TopLeft"`` (query ``i`` sees keys ``<= i``, ONNX
    ``is_causal=1``) or ``"BottomRight"`` (the diagonal aligned at the last key). float16 inputs
    are computed in float32; the scores and the softmax in float64, the probabilities rounded to
    float32 before ``P V`` (one NPU attention command: QK^T on the tensor engine, the softmax on
    the vector engine, SV on the tensor engine).

    ``deferred`` (:attr:`AttentionSpec.deferred`): ``exp(S - rowmax)`` rounded to the UINT8 grid
    of 1/255 (:func:`deferred_probabilities`), ``P V`` on those, each row divided by their sum.
    """
    if heads is not None:
        b, sq, skv = q.shape[0], q.shape[1], k.shape[1]
        ev = v.shape[2]
        out = reference(q.reshape(b, sq, heads, -1), k.reshape(b, skv, heads, -1), v.reshape(b, skv, heads, -1),
                        scale, causal, deferred=deferred)
        return out.reshape(b, sq, ev)
    q, k, v = (x.astype(np.float32) if x.dtype == np.float16 else x for x in (q, k, v))
    sq, skv, d = q.shape[1], k.shape[1], q.shape[3]
    s = np.einsum("bqhd,bkhd->bhqk", q, k, optimize=True).astype(np.float64)
    s *= (1.0 / math.sqrt(d)) if scale is None else float(scale)
    if causal is not None:
        if causal not in ("TopLeft", "BottomRight"):
            raise ValueError(f"causal must be None, 'TopLeft' or 'BottomRight', not {causal!r}")
        offset = 0 if causal == "TopLeft" else abs(sq - skv)
        s = np.where(np.triu(np.ones((sq, skv), dtype=bool), k=1 + offset), -np.inf, s)
    e = np.exp(s - s.max(axis=-1, keepdims=True))
    if deferred:
        p = deferred_probabilities(e.astype(np.float32))
        out = np.einsum("bhqk,bkhd->bqhd", p, v, optimize=True)
        return out / p.sum(axis=-1).transpose(0, 2, 1)[..., None]
    p = (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)
    return np.einsum("bhqk,bkhd->bqhd", p, v, optimize=True)


def deferred_probabilities(e: np.ndarray) -> np.ndarray:
    """``exp(S - rowmax)`` (float32, in (0, 1]) as a deferred-normalisation attention stores it:
    rounded to the UINT8 grid of 1/:data:`DEFERRED_LEVELS`, halves to even (ONNX
    ``QuantizeLinear``'s rounding, which the ``TiledAttention`` body uses)."""
    return (np.round(e * np.float32(DEFERRED_LEVELS)) / np.float32(DEFERRED_LEVELS)).astype(np.float32)
