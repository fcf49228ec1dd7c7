"""Pass ``fuse-layernorm``: LayerNorm decompositions -> ``LayerNormalization`` (opset 17+).

Matches (anchored at the first ``ReduceMean``)::

    mean = ReduceMean(x, axes)            d = Sub(x, mean)
    var  = ReduceMean(Pow(d, 2) | Mul(d, d), axes)
    y    = Div(d, Sqrt(Add(var, eps)))    [* gamma]  [+ beta]

with both reductions over the same trailing axes (keepdims), ``eps`` a scalar constant and
``gamma``/``beta`` constants that broadcast over those axes only.
Emits: ``LayerNormalization(x, gamma | 1, beta | 0; axis=<first reduced axis>, epsilon)``.
Misses: every ``ReduceMean`` whose result feeds a ``Sub`` (the shape of a LayerNorm) and was
not absorbed, with the reason. The legacy exporter at opset 17 already emits
``LayerNormalization`` for ``nn.LayerNorm``; this covers exporters and hand-written norms
that do not. Paper Sec. 3 (kernel fusion).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from edgefc import ir
from edgefc.passes.fusion_base import const, node_base
from edgefc.pattern import Pattern, any_scalar, is_scalar
from edgefc.registry import register_pass
from edgefc.rewriter import Fusion, FusionPass, Rewriter, feeds


def _axes(node: gs.Node) -> list[int] | None:
    if len(node.inputs) > 1:
        a = node.inputs[1]
        return [int(v) for v in a.values.reshape(-1)] if isinstance(a, gs.Constant) else None
    return [int(v) for v in node.attrs["axes"]] if "axes" in node.attrs else None


def _keepdims(value) -> bool | str:
    return True if value in (None, 1) else "keepdims=0"


def _patterns() -> list[Pattern]:
    patterns = []
    for square in ("pow", "mul"):
        for affine in ("gamma_beta", "gamma", "none"):
            p = Pattern(f"layernorm-{square}-{affine}", where=_where)
            x = p.input("x")
            mean = p.op("ReduceMean", x, name="mean", extra_inputs=True, attrs={"keepdims": _keepdims})
            d = p.op("Sub", x, mean, name="sub")
            if square == "pow":
                sq = p.op("Pow", d, p.const("two", is_scalar(2.0)), name="square")
            else:
                sq = p.op("Mul", d, d, name="square")
            var = p.op("ReduceMean", sq, name="var", extra_inputs=True, attrs={"keepdims": _keepdims})
            ve = p.op("Add", var, p.const("eps", any_scalar), name="add_eps")
            y = p.op("Div", d, p.op("Sqrt", ve, name="sqrt"), name="div")
            if affine != "none":
                y = p.op("Mul", y, p.const("gamma"), name="scale")
            if affine == "gamma_beta":
                p.op("Add", y, p.const("beta"), name="shift")
            patterns.append(p)
    return patterns


def _normalized(m) -> tuple[int, tuple[int, ...]] | str:
    """(first axis as a negative index, normalized shape) or the reason it is not a LayerNorm."""
    shape = ir.static_shape(m["x"])
    if shape is None:
        return f"input '{m['x'].name}' has no static shape"
    rank = len(shape)
    a1, a2 = _axes(m["mean"]), _axes(m["var"])
    if a1 is None or a2 is None:
        return "ReduceMean axes are not constant"
    n1 = sorted(a % rank for a in a1)
    if n1 != sorted(a % rank for a in a2):
        return f"the two ReduceMeans reduce different axes ({a1} vs {a2})"
    if n1 != list(range(rank - len(n1), rank)):
        return f"reduced axes {a1} are not the trailing axes of a rank-{rank} tensor"
    return -len(n1), shape[rank - len(n1):]


def _to_normalized(values: np.ndarray, nshape: tuple[int, ...]) -> np.ndarray | None:
    """``values`` (gamma or beta) as an array of the normalized shape, if it varies along the
    normalized axes only; else None."""
    v = np.asarray(values)
    k = len(nshape)
    if v.ndim > k:
        if any(d != 1 for d in v.shape[:v.ndim - k]):
            return None
        v = v.reshape(v.shape[v.ndim - k:])
    try:
        return np.broadcast_to(v, nshape)
    except ValueError:
        return None


def _where(m) -> bool | str:
    norm = _normalized(m)
    if isinstance(norm, str):
        return norm
    _, nshape = norm
    for name in ("gamma", "beta"):
        t = m.get(name)
        if t is not None and _to_normalized(t.values, nshape) is None:
            return f"{name} '{t.name}' of shape {list(t.values.shape)} does not broadcast over the normalized axes {list(nshape)} only"
    return True


PATTERNS = _patterns()


def _layer_norm(m, rw: Rewriter) -> list[gs.Node]:
    axis, nshape = _normalized(m)
    x = m["x"]
    dtype = np.dtype(x.dtype or np.float32)
    gamma, beta = m.get("gamma"), m.get("beta")
    g = _to_normalized(gamma.values, nshape) if gamma is not None else np.ones(nshape)
    b = _to_normalized(beta.values, nshape) if beta is not None else np.zeros(nshape)
    name = rw.unique_name(node_base(m["mean"]) + "/LayerNormalization")
    return [gs.Node("LayerNormalization", name=name, attrs={"axis": axis, "epsilon": float(m.const("eps").reshape(-1)[0])},
                    inputs=[x, const(f"{name}.scale", g.astype(dtype)), const(f"{name}.bias", b.astype(dtype))],
                    outputs=m.outputs)]


#: anchored at the first ReduceMean, a candidate when it feeds a Sub (the shape of a LayerNorm).
LAYERNORM = Fusion("layernorm", PATTERNS, anchor="mean", replacement=_layer_norm, candidate=feeds("Sub"))


@register_pass("fuse-layernorm", namespace="edgefc")
class FuseLayerNorm(FusionPass):
    """Fuse LayerNorm decompositions (ReduceMean/Sub/Pow/.../Div[*g][+b]) into LayerNormalization."""

    fusions = (LAYERNORM,)
