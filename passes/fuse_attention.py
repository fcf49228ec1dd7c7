"""Pass ``fuse-attention``: scaled-dot-product attention, found by its math -> ``Attention``-23 (3D form).

Paper Sec. 3: "we fuse operators using a kernel fusion method [FlashAttention]" before
model-level tiling; the fused attention is what MLT tiles (Sec. 2.3).

What is matched is the computation, not one exporter's node sequence. Anchored at each
``Softmax`` over the last axis::

    S = MatMul(Qop, Kop) [* s | / s ...] [+ mask ...]        (scalar scales anywhere on the chain)
    Y = MatMul(Softmax(S), Vop)

where ``Qop``, ``Kop`` and ``Vop`` are reached from 3D projections ``[B, S, H*d]`` by any chain of
pure data-movement ops (Reshape, Transpose, Squeeze, Unsqueeze, Flatten, Identity) and scalar
``Mul``/``Div`` constants. Whether a chain is the head split is decided by what it *does*, not by
its ops: the chain is applied to an index array of the source's elements and compared with
``[B, S, H, d] -> [B, H, S, d]`` (Q, V) or ``-> [B, H, d, S]`` (K transposed), in 4D
``[B, H, S, d]`` or 3D ``[B*H, S, d]`` layouts alike. So the scale may sit on Q, on K, split
across both (torch's dynamo export of SDPA), on the product, as Mul or Div; the head split may
be one Reshape+Transpose or several (dynamo's ``[B*H, S, d]`` detour). The product of all
scales becomes ``scale``. On the output side the head merge (``[B, H, Sq, d] -> [B, Sq, H*d]``)
is found the same way; when there is none, the fused op's output is reshaped back to the
layout ``MatMul(P, V)`` had.

An additive mask on S is folded into ``is_causal=1`` when it is the causal mask (0 on and below
the diagonal, <= -1e9 above, as CLIP's is); any other mask becomes the ``attn_mask`` input.
Emits: ``Attention(Q, K, V[, attn_mask]; q_num_heads=H, kv_num_heads=H, scale, is_causal)``
reading the projection outputs directly, so the Q/K/V projection MatMuls and the output
projection stay visible (the cost model prices them). The split/scale chains left without a
reader are removed by the pass manager's clean-up.
Misses: every ``Softmax`` not absorbed, with the reason (kind ``attention``).
The matching (tracing, scales, masks, head merge) is ``passes/attention_match.py``, plugged into
the rewrite driver as the fusion's custom matcher (:class:`edgefc.rewriter.Fusion` ``matcher``):
the pattern language describes a fixed set of nodes, and an attention as exporters write it is
not one (docs/passes.md, "Why attention has its own matcher"). This module is the rewrite.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from edgefc import ir
from edgefc.matcher import Miss
from edgefc.passes.attention_match import AttentionMatch, Head, match_attention, match_native
from edgefc.passes.fusion_base import const, node_base
from edgefc.registry import register_pass
from edgefc.rewriter import Fusion, FusionPass, Rewriter


def _to_3d(head: Head, name: str, new: list[gs.Node]) -> gs.Tensor:
    """The [B, S, H*d] tensor the Attention reads for ``head`` (appending to ``new`` the split's
    inverse for a 4D operand that had no projection in sight)."""
    if not head.prologue:
        return head.source
    (perm,) = head.prologue
    shape4 = ir.static_shape(head.source)
    bshd = [shape4[p] for p in perm]
    t = gs.Variable(f"{name}_bshd", dtype=head.source.dtype, shape=bshd)
    y = gs.Variable(f"{name}_3d", dtype=head.source.dtype, shape=[bshd[0], bshd[1], bshd[2] * bshd[3]])
    new += [gs.Node("Transpose", name=f"{name}_transpose", inputs=[head.source], outputs=[t], attrs={"perm": list(perm)}),
            gs.Node("Reshape", name=f"{name}_reshape",
                    inputs=[t, const(f"{name}_shape", np.array(y.shape, dtype=np.int64))], outputs=[y])]
    return y


def _candidate(node: gs.Node) -> bool:
    """Every Softmax; an Attention only in the 4D form (the 3D form is what this pass writes)."""
    return node.op == "Softmax" or len(ir.static_shape(node.inputs[0]) or ()) == 4


def _match(node: gs.Node, rw: Rewriter) -> AttentionMatch | Miss:
    """The custom matcher: the attention's math around a Softmax, or a 4D Attention's layouts."""
    if node.op == "Attention":
        return match_native(node, rw.graph_outputs)
    return match_attention(node, rw.graph_outputs)


def _attention(m: AttentionMatch, rw: Rewriter) -> list[gs.Node] | Miss:
    """Attention-23 in the 3D form reading the projections (with the reshapes a layout needs)."""
    if any(not rw.alive(n) for n in m.nodes):
        return Miss("overlaps an attention fused already")
    anchor = m.nodes[0]  # the Softmax, or the 4D Attention
    name = rw.unique_name(node_base(anchor) + "/Attention")
    prologue: list[gs.Node] = []
    inputs = [_to_3d(h, f"{name}.{r}", prologue) for h, r in ((m.q, "q"), (m.k, "k"), (m.v, "v"))]
    new = []
    if m.mask is not None:
        if isinstance(m.mask, tuple):  # a [B*H, Sq, Skv] mask, split into [B, H, Sq, Skv]
            mask, shape = m.mask
            split = gs.Variable(f"{name}.mask4d", dtype=mask.dtype, shape=shape)
            new.append(gs.Node("Reshape", name=f"{name}.mask_reshape", outputs=[split], inputs=[
                mask, const(f"{name}.mask_shape", np.array(shape, dtype=np.int64))]))
            inputs.append(split)
        else:
            inputs.append(m.mask if isinstance(m.mask, gs.Tensor) else const(f"{name}.mask", m.mask, like=m.q.source))
    out = m.output
    if m.output_shape is not None:  # no head merge after P @ V: give its layout back
        b, h, dv = m.q.batch, m.q.heads, m.v.head_dim
        sq = m.output_shape[-2]
        out = gs.Variable(f"{name}.out", dtype=m.output.dtype, shape=[b, sq, h * dv])
        split = gs.Variable(f"{name}.out_bshd", dtype=m.output.dtype, shape=[b, sq, h, dv])
        perm = gs.Variable(f"{name}.out_bhsd", dtype=m.output.dtype, shape=[b, h, sq, dv])
        new += [gs.Node("Reshape", name=f"{name}.out_split", inputs=[
                    out, const(f"{name}.out_split_shape", np.array(split.shape, dtype=np.int64))], outputs=[split]),
                gs.Node("Transpose", name=f"{name}.out_transpose", inputs=[split], outputs=[perm],
                        attrs={"perm": [0, 2, 1, 3]}),
                gs.Node("Reshape", name=f"{name}.out_reshape", inputs=[
                    perm, const(f"{name}.out_shape", np.array(m.output_shape, dtype=np.int64))], outputs=[m.output])]
    node = gs.Node("Attention", name=name, inputs=inputs, outputs=[out], attrs={
        "q_num_heads": m.q.heads, "kv_num_heads": m.k.heads, "scale": float(m.scale),
        "is_causal": int(m.causal), **m.extra_attrs})
    return prologue + [node] + new


#: anchored at each Softmax (and 4D Attention), found by the custom matcher.
ATTENTION = Fusion("attention", [], anchor="softmax", ops=("Softmax", "Attention"), matcher=_match,
                   replacement=_attention, candidate=_candidate)


@register_pass("fuse-attention", namespace="edgefc")
class FuseAttention(FusionPass):
    """Fuse scaled-dot-product attention, by its math (any scale placement, head layout), into Attention-23."""

    fusions = (ATTENTION,)
