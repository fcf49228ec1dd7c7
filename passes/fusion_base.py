"""What every fusion pass shares: the report section, the target question, small shape helpers.

Each fusion pass (``passes/fuse_*.py``) subclasses :class:`FusionPass`: it implements
``fuse(graph, ctx, log)`` with the pattern helper (:mod:`edgefc.pattern`) and declares the report
``kinds`` it owns. Running it records, in ``ctx.report["fusion"]``, how many fusions of each kind
it made and every candidate that did not match with the reason (``misses``), and gives the graph
the IR version its edgefc ops need (:func:`edgefc.functions.ensure_functions`; their functions are stamped on export).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from edgefc import functions
from edgefc.composites import Activation, attr_accepts
from edgefc.errors import PassError
from edgefc.pass_base import Pass, PassContext
from edgefc.pattern import Pattern
from edgefc.rewriter import RewriteLog


def record(ctx: PassContext, log: RewriteLog, kinds: tuple[str, ...]) -> None:
    """Merge ``log`` into ``ctx.report["fusion"]`` (see :meth:`RewriteLog.record`)."""
    log.record(ctx.report, kinds)


class FusionPass(Pass):
    """Base of the fusion passes: subclasses set ``kinds`` and implement :meth:`fuse`."""

    kinds: tuple[str, ...] = ()
    min_opset = 23

    def run(self, graph: gs.Graph, ctx: PassContext) -> gs.Graph:
        if int(graph.opset) < self.min_opset:
            raise PassError(f"pass '{self.name}' needs a canonicalized graph (standard opset {self.min_opset}, "
                            f"this one has {graph.opset}): run canonicalize first")
        log = RewriteLog()
        self.fuse(graph, ctx, log)
        record(ctx, log, self.kinds)
        functions.ensure_functions(graph)
        return graph

    def fuse(self, graph: gs.Graph, ctx: PassContext, log: RewriteLog) -> None:
        raise NotImplementedError


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

