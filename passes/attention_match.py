"""Attention found by its math: the matcher behind ``fuse-attention`` (paper Sec. 3).

Anchored at a ``Softmax`` (:func:`match_attention`) or a 4D ``Attention``-23
(:func:`match_native`), it traces Q, K and V back through data-movement ops and scalar scales to
their ``[B, S, H*d]`` projections, deciding whether a chain is the head split by applying it to
an index array (:func:`apply_layout`), folds the scales into one, recognises the causal mask and
finds the head merge after ``P @ V``. The result is an :class:`AttentionMatch` (or a
:class:`~edgefc.matcher.Miss` with the reason); ``passes/fuse_attention.py`` declares the fusion
with this module as its custom matcher and rewrites the match. The
module docstring of ``fuse_attention`` states the contract in full.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from edgefc import ir
from edgefc.matcher import Miss, label
from edgefc.pattern import scalar

#: an additive mask value at or below this removes a score exactly (exp underflows to 0 in fp32).
MASKED = -1e9
#: ops that only move elements (what a head split / merge is made of).
LAYOUT_OPS = frozenset({"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity"})
#: how far back a Q/K/V operand is traced to its projection.
MAX_CHAIN = 16
#: the permutation of [B, S, H, d] that each matmul operand must equal ("K4": K as Attention-23's
#: 4D input takes it, [B, H, S, d], not transposed).
PERM = {"Q": (0, 2, 1, 3), "K": (0, 2, 3, 1), "V": (0, 2, 1, 3), "K4": (0, 2, 1, 3)}
#: attributes of a 4D Attention that the 3D form it is rewritten to cannot carry unless they hold
#: these values; any attribute not named here or in _NATIVE_KEPT (e.g. opset 24's window sizes)
#: leaves the node as it is.
_NATIVE_BLOCKERS = {"softcap": 0.0, "qk_matmul_output_mode": 0}
_NATIVE_KEPT = {"scale", "is_causal", "softmax_precision", "q_num_heads", "kv_num_heads"}


class _NoMatch(Exception):
    pass


def _users(t: gs.Tensor) -> list[gs.Node]:
    """Distinct consumers of ``t`` (a node reading it twice counts once)."""
    return list({id(n): n for n in t.outputs}.values())


def _only_consumer(t: gs.Tensor, graph_outputs) -> gs.Node:
    """The single consumer of an intermediate tensor (it will disappear), else _NoMatch."""
    if t.name in graph_outputs:
        raise _NoMatch(f"'{t.name}' is a graph output")
    users = _users(t)
    if len(users) != 1:
        raise _NoMatch(f"'{t.name}' has {len(users)} consumers ({', '.join(label(u) for u in users)}), want 1")
    return users[0]


def _producer(t: gs.Tensor) -> gs.Node | None:
    return t.inputs[0] if t.inputs else None


def _chain_operand(node: gs.Node) -> gs.Tensor | None:
    """For a Mul/Div by a scalar constant: the operand that is scaled, else None."""
    if node.op not in ("Mul", "Div") or len(node.inputs) != 2:
        return None
    a, b = node.inputs
    if node.op == "Div":
        return a if isinstance(b, gs.Constant) and scalar(b) not in (None, 0.0) else None
    if isinstance(b, gs.Constant) and scalar(b) is not None:
        return a
    if isinstance(a, gs.Constant) and scalar(a) is not None:
        return b
    return None


def _factor(node: gs.Node) -> float:
    """The factor a Mul/Div by a scalar constant applies (see :func:`_chain_operand`)."""
    c = next(i for i in node.inputs if isinstance(i, gs.Constant))
    v = scalar(c)
    return 1.0 / v if node.op == "Div" else v


def _is_layout(node: gs.Node) -> bool:
    return node.op in LAYOUT_OPS and bool(node.inputs) and not isinstance(node.inputs[0], gs.Constant)


def _reaches_matmul(t: gs.Tensor, depth: int = 6) -> bool:
    """Whether ``t`` comes from a MatMul through scalar scales and Adds (the score chain)."""
    for _ in range(depth):
        node = _producer(t)
        if node is None:
            return False
        if node.op == "MatMul":
            return True
        if _chain_operand(node) is not None:
            t = _chain_operand(node)
        elif node.op == "Add":
            return any(_reaches_matmul(i, depth - 1) for i in node.inputs if not isinstance(i, gs.Constant))
        else:
            return False
    return False


def apply_layout(node: gs.Node, idx: np.ndarray) -> np.ndarray | None:
    """What the data-movement op ``node`` does to an array (used on index arrays), or None when
    its output shape is not static."""
    if node.op == "Transpose":
        perm = node.attrs.get("perm")
        return idx.transpose(list(perm) if perm is not None else None)
    shape = ir.static_shape(node.outputs[0])
    if shape is None or int(np.prod(shape, dtype=np.int64)) != idx.size:
        return None
    return idx.reshape(shape)


def _head_layout(b: int, s: int, h: int, d: int, perm) -> np.ndarray:
    """Where each element of a [B, S, H*d] projection lands after the canonical head split."""
    return np.arange(b * s * h * d, dtype=np.int64).reshape(b, s, h, d).transpose(perm)


@dataclass
class Head:
    """One of Q, K, V traced back from the attention matmul to its 3D projection output."""

    source: gs.Tensor
    batch: int
    heads: int
    head_dim: int
    scale: float
    #: nodes to insert when the source had to be made 3D (a 4D operand with no split in sight)
    prologue: list = field(default_factory=list)


def _trace_head(t: gs.Tensor, role: str, want: tuple[int, int] | None) -> Head:
    """Walk back from the matmul operand ``t`` through data-movement ops and scalar scales and
    return the farthest tensor [B, S, H*d] whose elements land where the head split puts them.
    ``want``: (B, H) already fixed by another operand."""
    shape = ir.static_shape(t)
    if shape is None or len(shape) < 3:
        raise _NoMatch(f"{role} operand '{t.name}' has no static shape of rank >= 3")
    d, s = (shape[-2], shape[-1]) if role == "K" else (shape[-1], shape[-2])
    lead = int(np.prod(shape[:-2], dtype=np.int64))
    path: list[gs.Node] = []  # data-movement nodes from the candidate to the operand (reversed)
    candidates = [(t, [], 1.0)]
    scale, cur = 1.0, t
    for _ in range(MAX_CHAIN):
        node = _producer(cur)
        if node is None:
            break
        if _chain_operand(node) is not None:
            scale *= _factor(node)
            cur = _chain_operand(node)
        elif _is_layout(node):
            path.append(node)
            cur = node.inputs[0]
        else:
            break
        candidates.append((cur, path[::-1], scale))
    seen = []
    for src, nodes, sc in reversed(candidates):
        ss = ir.static_shape(src)
        if ss is None or len(ss) != 3 or ss[1] != s or ss[2] % d:
            continue
        b, _, e = ss
        h = e // d
        if b * h != lead or (want is not None and (b, h) != want):
            seen.append(f"'{src.name}' {list(ss)}")
            continue
        idx = np.arange(b * s * e, dtype=np.int64).reshape(ss)
        for n in nodes:
            idx = apply_layout(n, idx)
            if idx is None:
                break
        expect = _head_layout(b, s, h, d, PERM[role])
        if idx is not None and idx.size == expect.size and np.array_equal(idx.reshape(expect.shape), expect):
            return Head(src, b, h, d, sc)
        seen.append(f"'{src.name}' {list(ss)}")
    # no projection in sight: a 4D [B, H, S, d] operand (after its scales) is made 3D here
    src, nodes, sc = next(((c, n, f) for c, n, f in reversed(candidates) if not n), candidates[0])
    ss = ir.static_shape(src)
    if len(ss) == 4 and (want is None or tuple(ss[:2]) == want):
        b, h = ss[0], ss[1]
        back = (0, 3, 1, 2) if role == "K" else (0, 2, 1, 3)
        return Head(src, b, h, d, sc, prologue=[back])
    tried = ", ".join(seen) or "no rank-3 tensor"
    raise _NoMatch(f"{role} operand '{t.name}' {list(shape)} is not a head split of a [B, S, H*{d}] projection "
                   f"(traced through data-movement ops to {tried})")


@dataclass
class AttentionMatch:
    q: Head
    k: Head
    v: Head
    scale: float
    mask: gs.Tensor | np.ndarray | None
    causal: bool
    output: gs.Tensor
    #: the layout the output must be given back in when no head merge follows (else None)
    output_shape: list | None
    #: the nodes the fused op replaces, the anchor (Softmax or 4D Attention) first
    nodes: list
    #: attributes of a 4D Attention carried over to the 3D one
    extra_attrs: dict = field(default_factory=dict)

    def all_nodes(self) -> list[gs.Node]:
        return list(self.nodes)


def match_attention(softmax: gs.Node, graph_outputs) -> AttentionMatch | Miss:
    try:
        return _match(softmax, graph_outputs)
    except _NoMatch as e:
        return Miss(str(e))


def _merge(pv: gs.Node, b: int, h: int, graph_outputs) -> tuple[gs.Tensor, list[gs.Node], bool]:
    """Follow ``MatMul(P, V)`` forward through single-consumer data-movement ops to the first
    tensor that is the head merge [B, Sq, H*dv]; (tensor, nodes, True), or (P@V output, [], False)."""
    out = pv.outputs[0]
    shape = ir.static_shape(out)
    sq, dv = shape[-2], shape[-1]
    expect = _head_layout(b, sq, h, dv, (0, 2, 1, 3))  # [B, H, Sq, dv] from [B, Sq, H*dv]
    merged_at = expect.reshape(-1)  # [B, H, Sq, dv] element -> its position in [B, Sq, H*dv]
    idx, cur, nodes = np.arange(expect.size, dtype=np.int64).reshape(shape), out, []
    for _ in range(MAX_CHAIN):
        if cur.name in graph_outputs or len(_users(cur)) != 1:
            break
        node = _users(cur)[0]
        if not _is_layout(node) or node.inputs[0] is not cur:
            break
        idx = apply_layout(node, idx)
        if idx is None:
            break
        nodes.append(node)
        cur = node.outputs[0]
        if idx.shape == (b, sq, h * dv) and np.array_equal(merged_at[idx.reshape(-1)], np.arange(idx.size)):
            return cur, nodes, True
    return out, [], False


def _nan_guard(probs: gs.Tensor, graph_outputs) -> list[gs.Node]:
    """``[IsNaN, Where]`` when the softmax output goes through ``Where(IsNaN(P), 0, P)`` (torch's
    dynamo export of SDPA with a mask guards fully masked rows so), else []."""
    users = _users(probs)
    if probs.name in graph_outputs or len(users) != 2 or {u.op for u in users} != {"IsNaN", "Where"}:
        return []
    isnan = next(u for u in users if u.op == "IsNaN")
    where = next(u for u in users if u.op == "Where")
    zero = where.inputs[1] if len(where.inputs) == 3 else None
    if where.inputs[0] is not isnan.outputs[0] or where.inputs[2] is not probs or \
            not isinstance(zero, gs.Constant) or scalar(zero) != 0.0 or _users(isnan.outputs[0]) != [where] or \
            ir.static_shape(where.outputs[0]) != ir.static_shape(probs):
        return []
    return [isnan, where]


def _match(softmax: gs.Node, graph_outputs) -> AttentionMatch:
    s_in, probs = softmax.inputs[0], softmax.outputs[0]
    s_shape = ir.static_shape(s_in)
    if s_shape is None or len(s_shape) not in (3, 4):
        raise _NoMatch(f"softmax input '{s_in.name}' is not static [B, H, Sq, Skv] or [B*H, Sq, Skv]")
    rank = len(s_shape)
    if int(softmax.attrs.get("axis", -1)) % rank != rank - 1:
        raise _NoMatch(f"softmax is over axis {softmax.attrs.get('axis')}, not the last")
    guard = _nan_guard(probs, graph_outputs)
    if guard:
        probs = guard[-1].outputs[0]
    pv = _only_consumer(probs, graph_outputs)
    if pv.op != "MatMul" or pv.inputs[0] is not probs:
        raise _NoMatch(f"softmax output feeds {label(pv)}, not MatMul(P, V)")
    nodes = [softmax, *guard, pv]
    _only_consumer(s_in, graph_outputs)
    # backward from the scores: scalar scales and additive masks down to MatMul(Q, K^T)
    factor, masks = 1.0, []
    cur = s_in
    while True:
        node = _producer(cur)
        if node is None:
            raise _NoMatch(f"scores '{cur.name}' are not produced by MatMul(Q, K^T)")
        _only_consumer(cur, graph_outputs)
        if node.op == "MatMul":
            qk = node
            break
        if _chain_operand(node) is not None:
            factor *= _factor(node)
            cur = _chain_operand(node)
        elif node.op == "Add" and len(node.inputs) == 2:
            variable = [not isinstance(i, gs.Constant) for i in node.inputs]
            if variable.count(True) == 1:  # a constant mask
                side = variable.index(True)
            else:
                reach = [_reaches_matmul(i) for i in node.inputs]
                if reach.count(True) != 1:
                    raise _NoMatch(f"cannot tell the scores from the mask in {label(node)}")
                side = reach.index(True)
            masks.append((node.inputs[1 - side], factor))
            cur = node.inputs[side]
        else:
            raise _NoMatch(f"between the scores and the softmax there is {label(node)} (only scalar Mul/Div "
                           f"and a mask Add are absorbed)")
        nodes.append(node)
    nodes.append(qk)
    if ir.static_shape(qk.outputs[0]) != s_shape:
        raise _NoMatch(f"the scale/mask chain broadcasts the scores {ir.static_shape(qk.outputs[0])} to {s_shape}")
    want = tuple(s_shape[:2]) if rank == 4 else None
    q = _trace_head(qk.inputs[0], "Q", want)
    k = _trace_head(qk.inputs[1], "K", (q.batch, q.heads))
    v = _trace_head(pv.inputs[1], "V", (q.batch, q.heads))
    if q.head_dim != k.head_dim:
        raise _NoMatch(f"Q and K head sizes differ ({q.head_dim} vs {k.head_dim})")
    if v.scale != 1.0:
        raise _NoMatch(f"V is scaled by {v.scale:g}")
    out, merge_nodes, merged = _merge(pv, q.batch, q.heads, graph_outputs)
    nodes.extend(merge_nodes)
    sq, skv = s_shape[-2], s_shape[-1]
    mask, causal = _mask(masks, sq, skv, q.heads, q.batch, s_shape)
    if guard and mask is not None and (isinstance(mask, (gs.Tensor, tuple)) or
                                       np.any(np.all(np.isneginf(mask), axis=-1))):
        raise _NoMatch("the softmax has a NaN guard (Where(IsNaN(P), 0, P)) and the mask may remove a whole "
                       "row, where the guard gives 0 and Attention would not")
    return AttentionMatch(q, k, v, factor * q.scale * k.scale, mask, causal, out,
                          None if merged else list(ir.static_shape(out)), nodes)


def _mask(masks, sq: int, skv: int, heads: int, batch: int, s_shape) -> tuple[gs.Tensor | np.ndarray | None, bool]:
    """Combine the additive masks: (None, True) for the causal mask, (None, False) for none,
    else (mask tensor or array of shape [B|1, H|1, Sq, Skv], False)."""
    if not masks:
        return None, False
    consts = [(m, f) for m, f in masks if isinstance(m, gs.Constant)]
    variables = [(m, f) for m, f in masks if not isinstance(m, gs.Constant)]
    if len(variables) > 1 or (variables and variables[0][1] != 1.0):
        raise _NoMatch("more than one non-constant mask, or a non-constant mask that is scaled afterwards")
    if variables and consts:
        raise _NoMatch("both constant and non-constant masks are added to the scores")
    if variables:
        m = variables[0][0]
        shape = ir.static_shape(m)
        if shape is None or len(shape) < 2 or tuple(shape[-2:]) != (sq, skv):
            raise _NoMatch(f"mask '{m.name}' of shape {shape} is not [..., {sq}, {skv}] "
                           f"(Attention's attn_mask does not broadcast the sequence axes)")
        lead = int(np.prod(shape[:-2], dtype=np.int64))
        if len(s_shape) == 3 and lead not in (1, batch * heads):
            raise _NoMatch(f"mask '{m.name}' of shape {shape} does not split into [B, H] ({batch}, {heads})")
        if len(s_shape) == 3 and lead == batch * heads and lead > 1:
            return (m, [batch, heads, sq, skv]), False
        return m, False
    total = sum(np.asarray(m.values, dtype=np.float64) * f for m, f in consts)
    try:
        full = np.broadcast_to(total, tuple(s_shape)).reshape(batch, heads, sq, skv)
    except ValueError:
        raise _NoMatch(f"mask of shape {list(np.shape(total))} does not broadcast to the scores") from None
    plane = full[0, 0]
    if np.all(full == plane) and sq == skv:
        lower = np.tril(np.ones((sq, skv), dtype=bool))
        if np.all(plane[lower] == 0) and np.all(plane[~lower] <= MASKED):
            return None, True
    if np.all(full == 0):
        return None, False
    if np.all(full == plane):
        return np.ascontiguousarray(plane[None, None]).astype(np.float32), False
    return np.ascontiguousarray(full).astype(np.float32), False


def match_native(node: gs.Node, graph_outputs) -> AttentionMatch | Miss:
    """An Attention-23 in the 4D form (``[B, H, S, d]`` inputs, as torch's dynamo exporter writes
    SDPA at opset 23): the same tracing finds the [B, S, H*d] projections and the head merge, so
    it can be rewritten to the 3D form the rest of the pipeline (tiling, the cost model) reads."""
    try:
        if len(node.outputs) != 1 or len(node.inputs) > 4 or any(
                float(node.attrs.get(k, v)) != v for k, v in _NATIVE_BLOCKERS.items()):
            raise _NoMatch("4D Attention with past key/value, softcap or extra outputs is left as it is")
        other = sorted(set(node.attrs) - _NATIVE_KEPT - set(_NATIVE_BLOCKERS))
        if other:
            raise _NoMatch(f"4D Attention with attribute(s) {', '.join(other)} is left as it is")
        q4 = ir.static_shape(node.inputs[0])
        if q4 is None or len(q4) != 4:
            raise _NoMatch("Attention is not in the 4D form")
        q = _trace_head(node.inputs[0], "Q", (q4[0], q4[1]))
        k = _trace_head(node.inputs[1], "K4", (q.batch, q.heads))
        v = _trace_head(node.inputs[2], "V", (q.batch, q.heads))
        scale = node.attrs.get("scale")
        scale = float(scale) * q.scale * k.scale if scale is not None else q.head_dim ** -0.5 * q.scale * k.scale
        if v.scale != 1.0:
            raise _NoMatch(f"V is scaled by {v.scale:g}")
        out, merge_nodes, merged = _merge(node, q.batch, q.heads, graph_outputs)
        mask = node.inputs[3] if len(node.inputs) > 3 and node.inputs[3].name else None
        return AttentionMatch(q, k, v, scale, mask, bool(node.attrs.get("is_causal", 0)), out,
                              None if merged else list(ir.static_shape(out)), [node, *merge_nodes],
                              {k: node.attrs[k] for k in ("softmax_precision",) if k in node.attrs})
    except _NoMatch as e:
        return Miss(str(e))
