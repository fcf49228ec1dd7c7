"""What the built-in fusion passes share besides the rewrite engine: the ONNX form of an
activation, the target question (does it fold epilogues?), shape helpers, new constants.

Each fusion pass (``passes/fuse_*.py``) is a :class:`edgefc.rewriter.FusionPass` that declares its
fusions as :class:`edgefc.rewriter.Fusion` ``(patterns, anchor, replacement)`` - the public API a
user's pass uses too (README, "Writing your own pass").
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from edgefc.composites import Activation, attr_accepts
from edgefc.pattern import Pattern


def node_base(node: gs.Node) -> str:
    """The scope of a node's name (``/down/attn1/Softmax`` -> ``/down/attn1``): fused nodes are
    named in the scope of the node they were found at."""
    return node.name.rsplit("/", 1)[0]


def activation(p: Pattern, z, act: Activation):
    """Add the ONNX form of ``act`` (:mod:`edgefc.composites`) applied to ``z`` to pattern ``p``;
    return its output. Pattern nodes: ``act.name`` (the op that writes the result; for a gated
    activation the ``Mul``, with the gate named after its op: ``sigmoid``)."""
    def accepts(key):
        want = "/".join(repr(v) for v in act.onnx_attrs[key] if v is not None)
        return lambda v: attr_accepts(act, key, v) or f"{key}={v!r} (the fused '{act.name}' is {act.onnx_op} with {key}={want})"

    attrs = {key: accepts(key) for key in act.onnx_attrs}
    if act.bounds:   # Clip: constant scalar bounds, carried by the fused op as attributes
        bounds = [p.const(b, check=lambda c: c.shape is not None and int(np.prod(c.shape)) == 1
                          or "a bound that is not one constant number") for b in act.bounds]
        return p.op(act.onnx_op, z, *bounds, name=act.name)
    if act.gated:
        return p.op("Mul", z, p.op(act.onnx_op, z, name=act.onnx_op.lower(), attrs=attrs), name=act.name)
    return p.op(act.onnx_op, z, name=act.name, attrs=attrs)


def epilogue_capable(target) -> bool:
    """Whether ``target`` runs elementwise epilogues (activation, residual add) inside the kernel
    of the tensor-engine op they follow: its ``fuses_epilogues`` (``edgefc.target.Target``; NPU
    targets do unless they say otherwise). With no target (a target-free compile) the fusion is
    made: it keeps the graph exact either way."""
    if target is None:
        return True
    return bool(target.fuses_epilogues)


def per_channel(values: np.ndarray, channels: int, rank: int) -> np.ndarray | None:
    """A constant that broadcasts along axis 1 only (shape [C], [C,1,...], [1,C,1,...] or a
    scalar) against a rank-``rank`` tensor of ``channels`` channels, as a [C] vector; else None."""
    arr = np.asarray(values)
    if arr.ndim > rank:
        return None
    shape = (1,) * (rank - arr.ndim) + arr.shape
    if any(d != 1 for i, d in enumerate(shape) if i != 1) or shape[1] not in (1, channels):
        return None
    return np.broadcast_to(arr.reshape(-1), (channels,)).copy() if arr.size == 1 else arr.reshape(channels)


def last_axis_vector(values: np.ndarray, n: int, rank: int) -> np.ndarray | None:
    """A constant that broadcasts along the last axis only (shape [N], [1,...,N]) against a
    rank-``rank`` tensor whose last dimension is ``n``, as an [N] vector; else None."""
    arr = np.asarray(values)
    if arr.ndim > rank or arr.size != n or (arr.ndim and arr.shape[-1] != n):
        return None
    return arr.reshape(n)


def const(name: str, values: np.ndarray, like: gs.Tensor | None = None) -> gs.Constant:
    """A new constant (in the dtype of ``like`` when given)."""
    arr = np.asarray(values)
    if like is not None and like.dtype is not None:
        arr = arr.astype(np.dtype(like.dtype), copy=False)
    return gs.Constant(name, np.ascontiguousarray(arr))

