"""Per-channel scales and shifts folded into the convolution before them (``canonicalize``).

The canonical folds every deployment compiler does (issue 22), written with the public rewrite
API (:mod:`edgefc.pattern`, :class:`edgefc.rewriter.Fusion` applied by :func:`edgefc.rewriter.apply_fusions`):

* ``BatchNormalization`` (inference: one output, constant statistics) after a ``Conv``,
  ``ConvTranspose`` or ``Gemm`` with constant weights whose output nothing else reads -> the
  same op with scaled weights and a shifted bias: ``W' = W * s``, ``b' = (b - mean) * s + beta``
  with ``s = gamma / sqrt(var + epsilon)`` per output channel;
* ``Mul`` / ``Div`` by a constant and ``Add`` / ``Sub`` of a constant after a ``Conv`` or
  ``ConvTranspose`` with constant weights, where the constant is one number or one per output
  channel (so the fold is exact: ``(x * W + b) * c = x * (W c) + b c``) -> folded into the
  weights and the bias;
* any other ``BatchNormalization`` with constant statistics -> a per-channel ``Mul`` and ``Add``
  (the scale and shift it is in inference).

Values are computed in float64 and stored at the weights' own type. :func:`fold_affine` returns
the counts by kind (``report.json`` ``canonicalize.folded``).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from edgefc.pattern import Pattern
from edgefc.rewriter import Fusion, RewriteLog, apply_fusions

CONVS = ("Conv", "ConvTranspose")


def _inference_bn(node: gs.Node):
    if int(node.attrs.get("training_mode", 0) or 0):
        return "BatchNormalization in training mode"
    if any(t.name and (t.outputs) for t in node.outputs[1:]):
        return "BatchNormalization whose running statistics are read"
    return True


def _bn_scale_shift(m) -> tuple[np.ndarray, np.ndarray]:
    """(s, t) with BN(y) = y * s + t per channel."""
    bn = m["bn"]
    eps = float(bn.attrs.get("epsilon", 1e-5))
    gamma, beta, mean, var = (np.asarray(m.const(k), dtype=np.float64).reshape(-1) for k in ("scale", "bias", "mean", "var"))
    s = gamma / np.sqrt(var + eps)
    return s, beta - mean * s


def _out_channels(node: gs.Node) -> int | None:
    w = node.inputs[1]
    if node.op == "Conv":
        return int(w.shape[0])
    if node.op == "ConvTranspose":
        return int(w.shape[1]) * int(node.attrs.get("group", 1))
    return None


class _Names:
    """Fresh names: never one the graph has (tensor or node) or this fold gave out."""

    def __init__(self, graph: gs.Graph):
        self.taken = set(graph.tensors()) | {n.name for n in graph.nodes if n.name}

    def __call__(self, base: str) -> str:
        name, k = base, 1
        while name in self.taken:
            name, k = f"{base}_{k}", k + 1
        self.taken.add(name)
        return name


def _scaled_conv(node: gs.Node, scale: np.ndarray, shift: np.ndarray, name: str, fresh: _Names) -> gs.Node:
    """``node`` (Conv / ConvTranspose with constant weights, optional constant bias) with its
    output channels scaled by ``scale`` and shifted by ``shift`` (both per output channel)."""
    w = node.inputs[1]
    wv = np.asarray(w.values, dtype=np.float64)
    cout = _out_channels(node)
    if node.op == "Conv":
        w2 = wv * scale.reshape((cout,) + (1,) * (wv.ndim - 1))
    else:   # ConvTranspose: W [Cin, Cout/group, k...]; output channel g * Cout/group + j
        groups = int(node.attrs.get("group", 1))
        cin, og = wv.shape[0], wv.shape[1]
        per = scale.reshape(groups, og)
        w2 = (wv.reshape((groups, cin // groups, og) + wv.shape[2:])
              * per.reshape((groups, 1, og) + (1,) * (wv.ndim - 2))).reshape(wv.shape)
    b = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2] is not None and node.inputs[2].name else None
    bv = np.asarray(b.values, dtype=np.float64).reshape(-1) if b is not None else np.zeros(cout)
    b2 = bv * scale + shift
    dtype = np.dtype(w.dtype)
    wc = gs.Constant(fresh(f"{name}_w"), np.ascontiguousarray(w2.astype(dtype)))
    bc = gs.Constant(fresh(f"{name}_b"), np.ascontiguousarray(b2.astype(dtype)))
    return gs.Node(node.op, name=node.name or fresh(node.op), attrs=dict(node.attrs), inputs=[node.inputs[0], wc, bc])


def _conv_pattern(op: str, with_bias: bool, tail) -> Pattern:
    p = Pattern(f"{op.lower()}{'_bias' if with_bias else ''}_{tail.__name__}")
    ins = [p.input("x"), p.const("w")] + ([p.const("b")] if with_bias else [])
    y = p.op(op, *ins, name="conv", check=None if op == "Gemm" else lambda n: _out_channels(n) is not None)
    tail(p, y)
    return p


def _bn(p: Pattern, y) -> None:
    p.op("BatchNormalization", y, p.const("scale"), p.const("bias"), p.const("mean"), p.const("var"), name="bn",
         check=_inference_bn, outputs=1, extra_inputs=False)


def _channel_vector(c: gs.Constant, out_rank: int, channels: int) -> np.ndarray | None:
    """The per-output-channel vector of a constant that broadcasts against an [N, C, ...] output
    as one number or one number per channel (None for anything else)."""
    shape = list(c.shape)
    if len(shape) > out_rank:
        return None
    shape = [1] * (out_rank - len(shape)) + shape
    if any(d != 1 for i, d in enumerate(shape) if i != 1) or shape[1] not in (1, channels):
        return None
    v = np.asarray(c.values, dtype=np.float64).reshape(-1)
    return np.broadcast_to(v, (channels,)).copy()


def _affine(p: Pattern, y) -> None:
    p.op(("Mul", "Add", "Sub", "Div"), y, p.const("c"), name="affine", commutative=True)


def fold_affine(graph: gs.Graph) -> dict[str, int]:
    """Apply the folds of this module until nothing changes; returns counts by kind."""
    log = RewriteLog()
    fresh = _Names(graph)

    def fold_bn_conv(m):
        conv = m["conv"]
        s, t = _bn_scale_shift(m)
        if s.size != _out_channels(conv):
            return None
        return [_scaled_conv(conv, s, t, conv.name or m["bn"].name or conv.op, fresh)]

    def fold_const(m):
        conv, op = m["conv"], m["affine"]
        if op.op in ("Sub", "Div") and op.inputs[1] is not m["c"]:
            return None   # c - y, c / y: not a scale and shift of y
        y = conv.outputs[0]
        if y.shape is None or y.dtype is None or np.dtype(m["c"].dtype) != np.dtype(y.dtype):
            return None
        v = _channel_vector(m["c"], len(y.shape), _out_channels(conv))
        if v is None:
            return None
        ones, zeros = np.ones_like(v), np.zeros_like(v)
        scale, shift = {"Mul": (v, zeros), "Div": (1.0 / v, zeros), "Add": (ones, v), "Sub": (ones, -v)}[op.op]
        if not np.all(np.isfinite(scale)):
            return None
        return [_scaled_conv(conv, scale, shift, conv.name or op.name or conv.op, fresh)]

    def fold_bn_gemm(m):
        gemm = m["conv"]
        s, t = _bn_scale_shift(m)
        b = np.asarray(m.const("w"), dtype=np.float64)
        trans_b = int(gemm.attrs.get("transB", 0))
        n = b.shape[0] if trans_b else b.shape[1]
        if s.size != n or gemm.outputs[0].shape is None or len(gemm.outputs[0].shape) != 2:
            return None
        b2 = b * (s[:, None] if trans_b else s[None, :])
        beta = float(gemm.attrs.get("beta", 1.0))
        c = m.tensors.get("b")
        cv = np.asarray(c.values, dtype=np.float64) if c is not None else np.zeros(n)
        c2 = cv * beta * s + t            # the bias (any shape that broadcasts to [M, N]) column by column
        dtype = np.dtype(m["w"].dtype)
        name = gemm.name or fresh("Gemm")
        attrs = {k: v for k, v in gemm.attrs.items() if k != "beta"}
        return [gs.Node("Gemm", name=name, attrs=attrs,
                        inputs=[gemm.inputs[0], gs.Constant(fresh(f"{name}_w"), np.ascontiguousarray(b2.astype(dtype))),
                                gs.Constant(fresh(f"{name}_c"), np.ascontiguousarray(np.asarray(c2).astype(dtype)))],
                        outputs=list(m.outputs))]

    def standalone_bn(m):
        bn = m["bn"]
        x = m["x"]
        base = bn.name or fresh("BatchNormalization")
        if x.shape is None or len(x.shape) < 2 or x.dtype is None:
            return None
        s, t = _bn_scale_shift(m)
        shape = (s.size,) + (1,) * (len(x.shape) - 2)
        dtype = np.dtype(x.dtype)
        mid = gs.Variable(fresh(f"{base}_scaled"), dtype=x.dtype, shape=list(x.shape))
        return [gs.Node("Mul", name=fresh(f"{base}_scale"),
                        inputs=[x, gs.Constant(fresh(f"{base}_s"), s.reshape(shape).astype(dtype))], outputs=[mid]),
                gs.Node("Add", name=fresh(f"{base}_shift"),
                        inputs=[mid, gs.Constant(fresh(f"{base}_t"), t.reshape(shape).astype(dtype))],
                        outputs=list(m.outputs))]

    def with_outputs(fn):
        def replace(m):
            new = fn(m)
            if new and not new[-1].outputs:
                new[-1].outputs = list(m.outputs)
            return new
        return replace

    def fold(kind: str, patterns: list[Pattern], anchor: str, replace) -> Fusion:
        return Fusion(kind, patterns, anchor=anchor, replacement=lambda m, rw: replace(m), misses=False)

    while True:
        before = sum(log.counts.values())
        for op in CONVS:
            apply_fusions(graph, [fold("batchnorm_into_conv", [_conv_pattern(op, True, _bn), _conv_pattern(op, False, _bn)],
                                       "bn", with_outputs(fold_bn_conv))], log)
            apply_fusions(graph, [fold("scale_shift_into_conv", [_conv_pattern(op, True, _affine),
                                                                 _conv_pattern(op, False, _affine)],
                                       "affine", with_outputs(fold_const))], log)
        gemm = [_conv_pattern("Gemm", True, _bn), _conv_pattern("Gemm", False, _bn)]
        apply_fusions(graph, [fold("batchnorm_into_gemm", gemm, "bn", fold_bn_gemm)], log)
        if sum(log.counts.values()) == before:
            break
    p = Pattern("batchnorm")
    p.op("BatchNormalization", p.input("x"), p.const("scale"), p.const("bias"), p.const("mean"), p.const("var"),
         name="bn", check=_inference_bn)
    apply_fusions(graph, [fold("batchnorm_to_scale_shift", [p], "bn", standalone_bn)], log)
    return {k: int(v) for k, v in log.counts.items() if v}
