"""The attention block as Program commands (paper Sec. 2.3, Tables 6 and 7; PERFORMANCE.md "The
attention block").

One function, :func:`lower_attention`, gives the commands of an ``Attention`` /
``TiledAttention`` -- the graph lowering emits them and the tile solver prices them
(``target.attention_cycles``) -- so the solver's choice is priced exactly as the profile reports
it; :func:`attention_sram_bytes` is the working set of one tile. The tiles are
``edgefc.attention.tile_grid``'s, the ones the ONNX body and the TVM build cut.
"""

from __future__ import annotations

from edgefc.attention import AttentionSpec, Tiling, tile_grid
from edgefc.errors import BuildError
from edgefc.precision import rate_key
from edgefc.targets.description import Architecture
from edgefc.targets.geometry import pad
from edgefc.targets.program import Command


def attention_io_bytes(spec: AttentionSpec, arch: Architecture, packed: bool = False) -> dict[str, tuple[int, int]]:
    """DRAM bytes and run length of Q, K, V and the output A (heads padded to the granularity).

    Q and K are stored head-major (their producers write each head as its own channel block) and
    move as contiguous blocks; V is read transposed (the contraction of S_out x V runs over its
    rows) and A is written into the token-major layout the out-projection reads, so both move in
    runs of one head row (``d_pad * act_bytes``).

    ``packed`` (``packed-operands``): the same layouts without the head-dim padding in DRAM -- the
    DMA pads each head row as it writes it into SRAM (and unpads the output), so Q, K, V and A move
    their real bytes, V and A in runs of one unpadded head row (``d * act_bytes``).
    """
    g, b = arch.tensor.channel_granularity, spec.act_bytes
    dkp, dvp = _dram_dims(spec, g, packed)
    n = spec.batch * spec.heads
    return {"q": (n * spec.q_len * dkp * b, 0), "k": (n * spec.kv_len * dkp * b, 0),
            "v": (n * spec.kv_len * dvp * b, dvp * b), "out": (n * spec.q_len * dvp * b, dvp * b)}


def _dram_dims(spec: AttentionSpec, g: int, packed: bool) -> tuple[int, int]:
    """Head dims of Q/K and of V/A as they lie in DRAM: padded to the granularity, or not (packed)."""
    if packed:
        return spec.head_dim, spec.v_head_dim
    return pad(spec.head_dim, g), pad(spec.v_head_dim, g)


def _tile_geometry(spec: AttentionSpec, tiling: Tiling, arch: Architecture, granularity: int | None = None):
    """Row tiles and head groups of a tiling, from ``edgefc.attention.tile_grid`` -- the tiles the
    ONNX body of TiledAttention and the TVM import build. ``granularity`` is the row granule the
    tiles were cut at (a TiledAttention's ``row_granularity``; default the target's).

    Returns ``(row_parts, head_parts)``: lists of ``(real rows, padded rows, count, keys)`` and
    ``(heads, count)``. Every tile is priced at its rows padded to the target's row granularity;
    the real rows of the last tile exclude the padding. A row tile of a *causal* tiled attention
    reads only the keys its rows can see, ``[0, min(end row, kv_len))`` (what the TVM import
    builds); otherwise every tile reads all ``kv_len`` keys. A tiling that does not split the padded
    rows into whole granules (or the heads evenly) is a BuildError: nothing would build it.
    """
    try:
        grid = tile_grid(spec.q_len, spec.heads, tiling, granularity or arch.tensor.row_granularity)
    except ValueError as e:
        raise BuildError(f"cannot lower the tiling of attention '{spec.name}': {e}") from None
    rows_p = pad(grid.rows, arch.tensor.row_granularity)
    if spec.causal and grid.row_tiles > 1:
        row_parts = [(r1 - r0, rows_p, 1, min(r1, spec.kv_len)) for r0, r1 in grid.row_bounds()]
    else:
        row_parts = [(real, rows_p, n, spec.kv_len) for real, n in grid.row_sizes()]
    return row_parts, [(grid.heads, grid.head_tiles)]


def attention_sram_bytes(spec: AttentionSpec, tiling: Tiling, arch: Architecture, granularity: int | None = None,
                         pipelined: bool = False) -> int:
    """SRAM working set of the largest tile: K and V of its head group, the Q tile, the S_in and
    S_out tiles and the output tile, with rows padded to the row granularity and channels
    (head dims, and the key length as the channel dimension of S) to the channel granularity.

    ``pipelined`` (a tiled block run as a pipeline across the engines, ``pipelined-mlt``): the
    per-tile buffers are double-buffered -- while tile i's softmax reads S_in(i) and writes
    S_out(i), tile i+1's QK^T writes the second S_in and tile i-1's S x V reads the second S_out
    (and the DMA fills the next Q tile and drains the previous output tile) -- so the tile part
    counts twice; K and V of the head group once (the next group's are loaded when this group's
    last QK^T / S x V has read them)."""
    g, rg, b = arch.tensor.channel_granularity, arch.tensor.row_granularity, spec.act_bytes
    row_parts, head_parts = _tile_geometry(spec, tiling, arch, granularity)
    rows = max(p for _, p, _, _ in row_parts)
    hg = max(h for h, _ in head_parts)
    dkp, dvp, kvp = pad(spec.head_dim, g), pad(spec.v_head_dim, g), pad(spec.kv_len, g)
    kv = hg * pad(spec.kv_len, rg) * (dkp + dvp)
    tile = hg * rows * (dkp + dvp)
    scores = hg * rows * kvp * (spec.score_bytes + spec.probability_bytes)   # S_in and S_out
    copies = 2 if pipelined and tiling.tiles > 1 else 1
    return int(kv * b + copies * (tile * b + scores))


def pipelines(spec: AttentionSpec, tiling: Tiling, arch: Architecture, granularity: int | None = None) -> bool:
    """Whether a tiled block can run as a pipeline: it has two tiles or more, and its
    double-buffered working set fits the SRAM an attention tile may take (``sram.tiles``, the
    budget the MLT solver picks tilings under, so that a tiling the solver chose pipelined is
    lowered pipelined)."""
    return tiling.tiles > 1 and attention_sram_bytes(spec, tiling, arch, granularity, pipelined=True) <= arch.sram.tiles


def lower_attention(spec: AttentionSpec, tiling: Tiling, arch: Architecture, *, granularity: int | None = None,
                    op: str | None = None,
                    op_type: str = "Attention", loop_base: int = 0, pipelined: bool = False,
                    packed: bool = False) -> list[Command]:
    """The commands of one attention block (untiled: ``Tiling(1, 1)``).

    ``pipelined``: run the tiles as a pipeline across the engines when :func:`pipelines` says it
    can (the commands are the same; they carry ``pipelined=True`` and the cost model's schedule
    overlaps them); otherwise one after another. ``packed``: Q, K, V and A lie in DRAM without the
    head-dim padding (:func:`attention_io_bytes`); the SRAM tiles are padded as before.

    S_in is priced at ``spec.scores`` and S_out at ``spec.probabilities`` (a W8A8 block's S_in is
    INT16; its S_out INT16 too, S_out x V at ``int8xint16``, unless the normalisation is deferred:
    then S_out is UINT8, S_out x V runs at ``int8xint8``, and the softmax is the target's
    ``deferred_softmax`` passes over S_in, ``deferred_softmax_lut`` on the INT8 path, and
    ``deferred_normalize`` over the output tile, with one more hand-off per tile, S x V's output
    going back to the vector engine: one side on each). Per head group: load K, load V. Per tile (rows x
    head group): load the Q tile, QK^T on the
    tensor engine, softmax on the vector engine, S_out x V on the tensor engine, store the output
    tile. When the tile's working set exceeds SRAM, S_in and S_out each make a DRAM round trip
    (store + load). Every tile pays the engine hand-offs QK^T -> softmax -> S x V, one on each
    side of each hand-off: 1 on each matmul, 2 on the softmax. The block is one op: it is
    dispatched once (its command list runs every tile).
    """
    op = op or spec.name
    g, b = arch.tensor.channel_granularity, spec.act_bytes
    dkp, dvp = pad(spec.head_dim, g), pad(spec.v_head_dim, g)
    dkd, dvd = _dram_dims(spec, g, packed)   # as they lie in DRAM
    prec = rate_key(spec.act_dtype, spec.act_dtype)
    sv_prec = rate_key(spec.act_dtype, spec.probabilities)   # S_out x V: S_out may be wider (INT16 in W8A8)
    sb, pb = spec.score_bytes, spec.probability_bytes
    pipelined = pipelined and pipelines(spec, tiling, arch, granularity)
    spill = attention_sram_bytes(spec, tiling, arch, granularity, pipelined) > arch.sram.attention
    tiled = tiling.tiles > 1
    passes = arch.vector.passes
    mask = passes["causal_mask"] if spec.causal else ()
    softmax = (passes["deferred_softmax"] if spec.deferred else passes["softmax"]) + mask
    row_parts, head_parts = _tile_geometry(spec, tiling, arch, granularity)
    cmds: list[Command] = []
    for hg, hcount in head_parts:
        kw = {"op": op, "op_type": op_type, "repeat": spec.batch * hcount, "pipelined": pipelined,
              "loop": loop_base + len(cmds) if tiled else -1}
        cmds.append(Command("load", tensor=f"{op}:K", bytes=hg * spec.kv_len * dkd * b, role="load_qk", **kw))
        cmds.append(Command("load", tensor=f"{op}:V", bytes=hg * spec.kv_len * dvd * b, run_bytes=dvd * b,
                            role="load_s_out_v", **kw))
    first = 1
    for hg, hcount in head_parts:
        for rows, rows_p, rcount, keys in row_parts:
            s, keys_p = hg * rows * keys, pad(keys, g)
            kw = {"op": op, "op_type": op_type, "repeat": spec.batch * hcount * rcount, "pipelined": pipelined,
                  "loop": loop_base + 1024 + len(cmds) if tiled else -1}
            cmds.append(Command("load", tensor=f"{op}:Q", bytes=hg * rows * dkd * b, role="load_qk", **kw))
            cmds.append(Command("tensor", macs=hg * rows * keys * spec.head_dim,
                                padded_macs=hg * rows_p * keys_p * dkp, out_elements=s, precision=prec,
                                dispatches=first, handoffs=arch.handoff.per_matmul, role="qk_matmul", **kw))
            if spill:
                cmds.append(Command("store", tensor=f"{op}:S_in", bytes=s * sb, role="store_s_in", **kw))
                cmds.append(Command("load", tensor=f"{op}:S_in", bytes=s * sb, role="load_s_in", **kw))
            deferred = {"lut_passes": passes["deferred_softmax_lut"], "post_elements": hg * rows * spec.v_head_dim,
                        "post_passes": passes["deferred_normalize"]} if spec.deferred else {}
            cmds.append(Command("vector", elements=s, passes=softmax,
                                handoffs=arch.handoff.per_softmax + (arch.handoff.per_matmul if spec.deferred else 0),
                                elem_bytes=min(int(sb), 4), role="softmax", **deferred, **kw))
            if spill:
                cmds.append(Command("store", tensor=f"{op}:S_out", bytes=s * pb, role="store_s_out", **kw))
                cmds.append(Command("load", tensor=f"{op}:S_out", bytes=s * pb, role="load_s_out_v", **kw))
            cmds.append(Command("tensor", macs=hg * rows * keys * spec.v_head_dim,
                                padded_macs=hg * rows_p * keys_p * dvp, out_elements=hg * rows * spec.v_head_dim,
                                precision=sv_prec, handoffs=arch.handoff.per_matmul * (2 if spec.deferred else 1),
                                role="sv_matmul", **kw))
            cmds.append(Command("store", tensor=f"{op}:A", bytes=hg * rows * dvd * b, run_bytes=dvd * b,
                                role="store_out", **kw))
            first = 0
    return cmds
