"""Pass ``fuse-attention``: scaled-dot-product attention as exported -> ``Attention``-23 (3D form).

Paper Sec. 3: "we fuse operators using a kernel fusion method [FlashAttention]" before
model-level tiling; the fused attention is what MLT tiles (Sec. 2.3).

Matches, anchored at the ``Softmax``, torch's decomposition of
``F.scaled_dot_product_attention`` (diffusers' U-Net self/cross attention and VAE mid-block
attention) and of CLIP's causal self-attention::

    Q4 = Transpose(Reshape(Q, [B, Sq, H, dk]), [0, 2, 1, 3])        (Q, K, V: the projections)
    Kt = Transpose(Reshape(K, [B, Skv, H, dk]), [0, 2, 3, 1])       (or [0,2,1,3] then a last-two swap)
    V4 = Transpose(Reshape(V, [B, Skv, H, dv]), [0, 2, 1, 3])
    S  = MatMul(Q4 * sq, Kt * sk) * ss [+ mask]                     (scales: Mul/Div by scalars,
    Y  = Reshape(Transpose(MatMul(Softmax(S, -1), V4), [0, 2, 1, 3]), [B, Sq, H*dv])   anywhere)

``sq``, ``sk``, ``ss`` are scalar constants on Q (before or after the head split), K or S (the
exporter splits ``1/sqrt(dk)`` as ``sqrt`` on each of Q and K); their product becomes ``scale``.
An additive mask on S is folded into ``is_causal=1`` when it is the causal mask (0 on and below
the diagonal, <= -1e9 above, as CLIP's is); any other mask becomes the ``attn_mask`` input.
Emits: ``Attention(Q, K, V[, attn_mask]; q_num_heads=H, kv_num_heads=H, scale, is_causal)``
reading the projection outputs directly, so the Q/K/V projection MatMuls and the output
projection stay visible (the cost model prices them).
Misses: every ``Softmax`` not absorbed, with the reason (kind ``attention``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from edgefc import ir
from edgefc.pass_base import PassContext
from edgefc.passes.fusion_base import FusionPass, const
from edgefc.pattern import Miss, RewriteLog, Rewriter, scalar
from edgefc.registry import register_pass

#: an additive mask value at or below this removes a score exactly (exp underflows to 0 in fp32).
MASKED = -1e9


def _label(node: gs.Node) -> str:
    return f"{node.op} '{node.name}'"


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
        raise _NoMatch(f"'{t.name}' has {len(users)} consumers ({', '.join(_label(u) for u in users)}), want 1")
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


def _compose(perms: list[list[int]]) -> list[int]:
    """The single permutation equal to applying ``perms`` in order (Transpose semantics)."""
    total = list(range(len(perms[0]))) if perms else []
    for p in perms:
        total = [total[i] for i in p]
    return total


@dataclass
class _Head:
    """One of Q, K, V traced back from the attention matmul to its 3D projection output."""

    source: gs.Tensor
    heads: int
    head_dim: int
    scale: float
    nodes: list = field(default_factory=list)


def _trace_head(t: gs.Tensor, want_perm: list[int], role: str, graph_outputs) -> _Head:
    """Walk back from the 4D operand ``t`` of a matmul through scalar Mul/Div, Transposes and
    the head-split Reshape to the 3D tensor [B, S, H*d] it came from (scalar scales applied to
    that 3D tensor are absorbed too when nothing else reads them)."""
    nodes, perms, scale, reshape = [], [], 1.0, None
    cur = t
    while (node := _producer(cur)) is not None:
        if reshape is not None and len(_users(cur)) != 1:
            break  # the projection output is read elsewhere too: it is the source
        if _chain_operand(node) is not None:
            scale *= _factor(node)
            src = _chain_operand(node)
        elif node.op == "Transpose" and reshape is None:
            perms.insert(0, list(node.attrs.get("perm", [])))
            src = node.inputs[0]
        elif node.op == "Reshape" and reshape is None:
            reshape = node
            src = node.inputs[0]
        else:
            break
        _only_consumer(cur, graph_outputs)
        nodes.append(node)
        cur = src
    if reshape is None:
        raise _NoMatch(f"{role} is not split into heads by a Reshape (traced back to '{cur.name}')")
    src_shape, split = ir.static_shape(reshape.inputs[0]), ir.static_shape(reshape.outputs[0])
    if src_shape is None or split is None:
        raise _NoMatch(f"{role} head split '{reshape.name}' has no static shapes")
    if len(src_shape) != 3 or len(split) != 4 or tuple(split[:2]) != tuple(src_shape[:2]) \
            or split[2] * split[3] != src_shape[2]:
        raise _NoMatch(f"{role} head split '{reshape.name}' reshapes {list(src_shape)} to {list(split)}, "
                       f"want [B, S, H*d] -> [B, S, H, d]")
    perm = _compose(perms) if perms else [0, 1, 2, 3]
    if perm != want_perm:
        raise _NoMatch(f"{role} heads are permuted {perm}, want {want_perm}")
    if ir.static_shape(cur) is None:
        raise _NoMatch(f"{role} source '{cur.name}' has no static shape")
    return _Head(cur, int(split[2]), int(split[3]), scale, nodes)


@dataclass
class AttentionMatch:
    q: _Head
    k: _Head
    v: _Head
    scale: float
    mask: gs.Tensor | None
    causal: bool
    output: gs.Tensor
    nodes: list


def match_attention(softmax: gs.Node, graph_outputs) -> AttentionMatch | Miss:
    try:
        return _match(softmax, graph_outputs)
    except _NoMatch as e:
        return Miss(str(e))


def _match(softmax: gs.Node, graph_outputs) -> AttentionMatch:
    s_in, probs = softmax.inputs[0], softmax.outputs[0]
    rank = len(s_in.shape or [])
    if rank != 4:
        raise _NoMatch(f"softmax input '{s_in.name}' is not 4D [B, H, Sq, Skv]")
    if int(softmax.attrs.get("axis", -1)) % 4 != 3:
        raise _NoMatch(f"softmax is over axis {softmax.attrs.get('axis')}, not the last")
    # forward: P @ V -> [0,2,1,3] -> [B, Sq, H*dv]
    pv = _only_consumer(probs, graph_outputs)
    if pv.op != "MatMul" or pv.inputs[0] is not probs:
        raise _NoMatch(f"softmax output feeds {_label(pv)}, not MatMul(P, V)")
    tr = _only_consumer(pv.outputs[0], graph_outputs)
    if tr.op != "Transpose" or list(tr.attrs.get("perm", [])) != [0, 2, 1, 3]:
        raise _NoMatch(f"P @ V feeds {_label(tr)}, not Transpose [0, 2, 1, 3] (head merge)")
    merge = _only_consumer(tr.outputs[0], graph_outputs)
    if merge.op != "Reshape":
        raise _NoMatch(f"the head merge is {_label(merge)}, not a Reshape to [B, Sq, H*dv]")
    out = merge.outputs[0]
    out_shape, pv_shape = ir.static_shape(out), ir.static_shape(pv.outputs[0])
    if out_shape is None or pv_shape is None or len(out_shape) != 3 or \
            tuple(out_shape) != (pv_shape[0], pv_shape[2], pv_shape[1] * pv_shape[3]):
        raise _NoMatch(f"head merge '{merge.name}' gives {out_shape}, not [B, Sq, H*dv] from {pv_shape}")
    nodes = [softmax, pv, tr, merge]
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
                    raise _NoMatch(f"cannot tell the scores from the mask in {_label(node)}")
                side = reach.index(True)
            masks.append((node.inputs[1 - side], factor))
            cur = node.inputs[side]
        else:
            raise _NoMatch(f"between the scores and the softmax there is {_label(node)} (only scalar Mul/Div "
                           f"and a mask Add are absorbed)")
        nodes.append(node)
    nodes.append(qk)
    _only_consumer(qk.outputs[0], graph_outputs)
    q = _trace_head(qk.inputs[0], [0, 2, 1, 3], "Q", graph_outputs)
    k = _trace_head(qk.inputs[1], [0, 2, 3, 1], "K", graph_outputs)
    v = _trace_head(pv.inputs[1], [0, 2, 1, 3], "V", graph_outputs)
    for h in (q, k, v):
        nodes.extend(h.nodes)
    if not (q.heads == k.heads == v.heads):
        raise _NoMatch(f"head counts differ: Q {q.heads}, K {k.heads}, V {v.heads}")
    if q.head_dim != k.head_dim:
        raise _NoMatch(f"Q and K head sizes differ ({q.head_dim} vs {k.head_dim})")
    qs, ks, vs = (ir.static_shape(h.source) for h in (q, k, v))
    if qs[0] != ks[0] or ks[:2] != vs[:2]:
        raise _NoMatch(f"Q {list(qs)}, K {list(ks)}, V {list(vs)} do not agree on batch / key length")
    if v.scale != 1.0:
        raise _NoMatch(f"V is scaled by {v.scale:g}")
    mask, causal = _mask(masks, qs[1], ks[1], q.heads, qs[0])
    return AttentionMatch(q, k, v, factor * q.scale * k.scale, mask, causal, out, nodes)


def _mask(masks, sq: int, skv: int, heads: int, batch: int) -> tuple[gs.Tensor | np.ndarray | None, bool]:
    """Combine the additive masks: (None, True) for the causal mask, (None, False) for none,
    else (mask tensor or array, False)."""
    if not masks:
        return None, False
    consts = [(m, f) for m, f in masks if isinstance(m, gs.Constant)]
    variables = [(m, f) for m, f in masks if not isinstance(m, gs.Constant)]
    if len(variables) > 1 or (variables and variables[0][1] != 1.0):
        raise _NoMatch("more than one non-constant mask, or a non-constant mask that is scaled afterwards")
    if variables and consts:
        raise _NoMatch("both constant and non-constant masks are added to the scores")
    if variables:
        shape = ir.static_shape(variables[0][0])
        if shape is None or len(shape) < 2 or tuple(shape[-2:]) != (sq, skv):
            raise _NoMatch(f"mask '{variables[0][0].name}' of shape {shape} is not [..., {sq}, {skv}] "
                           f"(Attention's attn_mask does not broadcast the sequence axes)")
        return variables[0][0], False
    total = sum(np.asarray(m.values, dtype=np.float64) * f for m, f in consts)
    try:
        full = np.broadcast_to(total, (batch, heads, sq, skv))
    except ValueError:
        raise _NoMatch(f"mask of shape {list(np.shape(total))} does not broadcast to the scores") from None
    plane = full[0, 0]
    if np.all(full == plane) and sq == skv:
        lower = np.tril(np.ones((sq, skv), dtype=bool))
        if np.all(plane[lower] == 0) and np.all(plane[~lower] <= MASKED):
            return None, True
    if np.all(full == 0):
        return None, False
    lead = (1,) * (4 - total.ndim) + total.shape[:-2] if total.ndim >= 2 else (1, 1)
    return np.ascontiguousarray(np.broadcast_to(total, tuple(lead[-2:]) + (sq, skv))).astype(np.float32), False


@register_pass("fuse-attention", namespace="edgefc")
class FuseAttention(FusionPass):
    """Fuse exported scaled-dot-product attention (self, cross, causal) into Attention-23 (3D form)."""

    kinds = ("attention",)

    def fuse(self, graph: gs.Graph, ctx: PassContext, log: RewriteLog) -> None:
        rw = Rewriter(graph, log)
        for softmax in rw.nodes("Softmax"):
            if not rw.alive(softmax):
                continue
            m = match_attention(softmax, rw.graph_outputs)
            if not m:
                log.miss("attention", softmax, m.reason)
                continue
            if any(not rw.alive(n) for n in m.nodes):
                log.miss("attention", softmax, "overlaps an attention fused already")
                continue
            name = rw.unique_name(softmax.name.rsplit("/", 1)[0] + "/Attention")
            inputs = [m.q.source, m.k.source, m.v.source]
            if m.mask is not None:
                inputs.append(m.mask if isinstance(m.mask, gs.Tensor) else const(f"{name}.mask", m.mask))
            node = gs.Node("Attention", name=name, inputs=inputs, outputs=[m.output], attrs={
                "q_num_heads": m.q.heads, "kv_num_heads": m.k.heads, "scale": float(m.scale),
                "is_causal": int(m.causal)})
            rw.replace(m.nodes, [node])
            log.count("attention")
        rw.commit()
