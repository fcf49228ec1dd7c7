"""Import of a compiled edgefc graph into TVM Relax (DESIGN.md "TVM lowering").

TVM 0.27's Relax ONNX frontend (``tvm.relax.frontend.onnx``) imports the standard ops the passes
emit (GroupNormalization-21, LayerNormalization-17, Gelu-20, int16 Quantize/DequantizeLinear-21)
but not ONNX ``Attention``-23 (it converts only com.microsoft's Attention and fails with
KeyError 'num_heads') and nothing of the ``edgefc`` domain. This module subclasses the
frontend's importer and adds converters of ours for:

* ``Attention`` (standard domain, 3D form Q [B,Sq,H*dk], K/V [B,Skv,H*d], and the 4D form)
  -> ``R.nn.attention`` on [B,S,H,d] views;
* ``edgefc.TiledAttention`` (Attention + ``row_tiles``/``head_tiles``): lowered *tile by tile*,
  one ``R.nn.attention`` per (head group, row block) on strided slices, results concatenated;
  every tile becomes its own NPU composite, so the NPU runtime executes exactly the tiles MLT
  chose (causal row tiles see the key prefix they need, with a bottom-right aligned mask);
* ``GroupNormalization`` (opset 21, per-channel scale/bias) -> one ``R.nn.group_norm`` (the
  frontend's own converter spreads it over six ops, which no NPU pattern should have to chase);
* ``edgefc.GroupNormSiLU`` -> ``R.nn.group_norm`` + ``R.nn.silu``;
* ``edgefc.GeGLU`` -> ``R.split`` + ``R.nn.gelu`` + ``R.multiply``;
* ``edgefc.FusedMatMul(A, B, bias[, residual]; activation)`` and
  ``edgefc.FusedConv(X, W, B[, residual]; Conv attrs, activation)`` -> matmul / conv2d, bias
  add, activation, residual add: the op sequence the NPU patterns recognise as one composite;
* ``Clip`` with constant bounds -> one ``R.clip`` (the frontend writes a maximum and a minimum as
  TIR functions, which no NPU pattern matches); ``Pad`` with constant sizes -> ``R.nn.pad`` (the
  frontend writes a TIR function); ``Max`` / ``Min`` / ``Sum`` -> a chain of binary
  ``R.maximum`` / ``R.minimum`` / ``R.add`` (the frontend stacks the inputs and reduces).

Design decision (converters vs inlining): the contract's edgefc ops are converted, not inlined,
so the NPU composites keep the granularity the passes chose (a tiled attention stays a set of
attention tiles instead of a soup of MatMul/Softmax/Slice nodes whose tiling would have to be
rediscovered). Any *other* ONNX local function in the model (a user plugin's) is inlined with
``onnx.inliner`` first, so it still imports, as standard ops.

Every node's result is bound to a variable named ``onnx<k>`` (k = the node's index), so the
partition report can attribute each Relax binding to the ONNX node it came from.
"""

from __future__ import annotations

import math
import re
import warnings

import numpy as np
import onnx
import onnx.inliner

from edgefc import composites
from edgefc.attention import DEFERRED_ATTR, Tiling, tile_grid
from edgefc.errors import BuildError
from edgefc.targets.tvm_node_stamps import tag_nodes

EDGEFC_DOMAIN = "edgefc"

# (domain, op_type) of the nodes converted by this module rather than by TVM's frontend.
CONVERTED_OPS = {
    ("", "Attention"), ("", "GroupNormalization"), ("", "Clip"), ("", "Pad"), ("", "Max"), ("", "Min"), ("", "Sum"),
    (EDGEFC_DOMAIN, "TiledAttention"), (EDGEFC_DOMAIN, "GroupNormSiLU"), (EDGEFC_DOMAIN, "GeGLU"),
    (EDGEFC_DOMAIN, "FusedMatMul"), (EDGEFC_DOMAIN, "FusedConv"),
}

NODE_VAR = re.compile(r"^onnx(\d+)")


def _domain(d: str) -> str:
    return "" if d in ("", "ai.onnx") else d


def _s(v, default=""):
    if v is None:
        return default
    return v.decode() if isinstance(v, bytes) else str(v)


def prepare_model(model: onnx.ModelProto, copy: bool = True) -> onnx.ModelProto:
    """``model`` ready for import: local functions we do not convert are inlined, every node has
    a unique name. With ``copy=False`` the model is changed in place (no second copy of the
    weights at full size)."""
    if copy:
        model_copy = onnx.ModelProto()
        model_copy.CopyFrom(model)
        model = model_copy
    inline = [(f.domain, f.name) for f in model.functions if (_domain(f.domain), f.name) not in CONVERTED_OPS]
    if inline:
        model = onnx.inliner.inline_selected_functions(model, inline)
    seen: set[str] = set()
    for i, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{i}"
        seen.add(node.name)
    return model


# ---------------------------------------------------------------------------------------------
# Converters. Each takes (bb, inputs, attrs, node) and returns a Relax expression (or Tuple).


def _rx():
    from tvm import relax

    return relax


def _shape(e) -> list[int]:
    return [int(d) for d in e.ty.shape]


def _dtype(e) -> str:
    return str(e.ty.dtype)


def _activation(bb, y, name: str, attrs: dict | None = None):
    """The activation ``name`` of a fused op (:data:`edgefc.composites.ACTIVATIONS`) as its Relax op
    (its bounds, Clip's, from the node's ``attrs``)."""
    if name in ("", "none"):
        return y
    act = composites.ACTIVATIONS.get(name)
    if act is None:
        raise BuildError(f"unsupported activation '{name}' in a fused edgefc op")
    op = _rx().op
    for part in act.relax_op.split(".")[1:]:   # "relax.nn.silu" -> relax.op.nn.silu
        op = getattr(op, part)
    if act.bounds:
        return bb.normalize(op(y, *[float((attrs or {})[b]) for b in act.bounds]))
    return bb.normalize(op(y))


def _group_norm(bb, inputs, attrs, node):
    relax = _rx()
    x, scale, bias = inputs[0], inputs[1], inputs[2]
    groups = int(attrs["num_groups"])
    eps = float(attrs.get("epsilon", 1e-5))
    if int(attrs.get("stash_type", 1)) != 1:
        raise BuildError(f"{node.name}: GroupNormalization with stash_type != 1 is not supported")
    shape = _shape(x)
    if len(shape) < 3 or shape[1] % groups:
        raise BuildError(f"{node.name}: GroupNormalization needs rank >= 3 and channels divisible by num_groups")
    if _shape(scale) != [shape[1]]:
        raise BuildError(f"{node.name}: GroupNormalization scale must have shape [C] (opset 21)")
    dtype = _dtype(x)
    if dtype != "float32":  # statistics in float32 (stash_type 1), like onnxruntime
        x = bb.normalize(relax.op.astype(x, "float32"))
        scale = bb.normalize(relax.op.astype(scale, "float32"))
        bias = bb.normalize(relax.op.astype(bias, "float32"))
    y = bb.normalize(relax.op.nn.group_norm(x, scale, bias, groups, channel_axis=1,
                                            axes=list(range(2, len(shape))), epsilon=eps))
    if dtype != "float32":
        y = bb.normalize(relax.op.astype(y, dtype))
    return y


def _group_norm_silu(bb, inputs, attrs, node):
    return _activation(bb, _group_norm(bb, inputs, attrs, node), composites.GROUP_NORM_SILU.activation.name)


def _geglu(bb, inputs, attrs, node):
    relax = _rx()
    x = inputs[0]
    if _shape(x)[-1] % 2:
        raise BuildError(f"{node.name}: GeGLU needs an even last dimension")
    parts = bb.normalize(relax.op.split(x, 2, axis=-1))
    a = bb.normalize(relax.TupleGetItem(parts, 0))
    b = bb.normalize(relax.TupleGetItem(parts, 1))
    g = _activation(bb, b, composites.GEGLU.activation.name)
    return bb.normalize(relax.op.multiply(a, g))


def _fused_matmul(bb, inputs, attrs, node):
    relax = _rx()
    a, b = inputs[0], inputs[1]
    bias = inputs[2] if len(inputs) > 2 else None
    residual = inputs[3] if len(inputs) > 3 else None
    y = bb.normalize(relax.op.matmul(a, b))
    if bias is not None:
        y = bb.normalize(relax.op.add(y, bias))
    y = _activation(bb, y, _s(attrs.get("activation"), "none"), attrs)
    if residual is not None:
        y = bb.normalize(relax.op.add(y, residual))
    return y


def _fused_conv(bb, inputs, attrs, node, opset):
    from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map

    relax = _rx()
    bounds = {b for a in composites.ACTIVATIONS.values() for b in a.bounds}
    conv_attrs = {k: v for k, v in attrs.items() if k not in ("activation", "tvm_custom", *bounds)}
    conv_inputs = list(inputs[:3]) + [None] * (3 - len(inputs[:3]))
    y = _get_convert_map()["Conv"].get_converter(opset)(bb, conv_inputs, conv_attrs, None)
    y = bb.normalize(y)
    y = _activation(bb, y, _s(attrs.get("activation"), "none"), attrs)
    residual = inputs[3] if len(inputs) > 3 else None
    if residual is not None:
        y = bb.normalize(relax.op.add(y, residual))
    return y


def _attention_views(bb, inputs, attrs, node):
    """Q, K, V as [B, S, H, d] views, plus (B, Sq, H, dv, 3D form?)."""
    relax = _rx()
    if len(inputs) > 3 and any(i is not None for i in inputs[3:]):
        raise BuildError(f"{node.name}: Attention with a mask or past key/value is not supported by the TVM lowering")
    q, k, v = inputs[0], inputs[1], inputs[2]
    if int(attrs.get("softcap", 0) or 0) != 0 or float(attrs.get("softcap", 0.0) or 0.0) != 0.0:
        raise BuildError(f"{node.name}: Attention with softcap is not supported by the TVM lowering")
    if int(attrs.get("qk_matmul_output_mode", 0)) != 0:
        raise BuildError(f"{node.name}: Attention qk_matmul_output_mode != 0 is not supported")
    qs, ks, vs = _shape(q), _shape(k), _shape(v)
    if len(qs) == 3:
        hq = int(attrs.get("q_num_heads", 0))
        hk = int(attrs.get("kv_num_heads", 0))
        if not hq or not hk:
            raise BuildError(f"{node.name}: 3D Attention needs q_num_heads and kv_num_heads")
        if hq != hk:
            raise BuildError(f"{node.name}: grouped-query Attention (q_num_heads != kv_num_heads) is not supported")
        b, sq, _ = qs
        q4 = bb.normalize(relax.op.reshape(q, [b, sq, hq, qs[2] // hq]))
        k4 = bb.normalize(relax.op.reshape(k, [ks[0], ks[1], hk, ks[2] // hk]))
        v4 = bb.normalize(relax.op.reshape(v, [vs[0], vs[1], hk, vs[2] // hk]))
        return q4, k4, v4, True
    if len(qs) == 4:  # [B, H, S, d]
        if qs[1] != ks[1]:
            raise BuildError(f"{node.name}: grouped-query Attention is not supported")
        perm = [0, 2, 1, 3]
        return (bb.normalize(relax.op.permute_dims(q, perm)), bb.normalize(relax.op.permute_dims(k, perm)),
                bb.normalize(relax.op.permute_dims(v, perm)), False)
    raise BuildError(f"{node.name}: Attention inputs must be 3D or 4D")


def _attention_out(bb, o4, three_d: bool):
    relax = _rx()
    b, s, h, d = _shape(o4)
    if three_d:
        return bb.normalize(relax.op.reshape(o4, [b, s, h * d]))
    return bb.normalize(relax.op.permute_dims(o4, [0, 2, 1, 3]))


def _scale(attrs, head_dim: int) -> float:
    scale = attrs.get("scale")
    return float(scale) if scale is not None else 1.0 / math.sqrt(head_dim)


def _attention(bb, inputs, attrs, node):
    relax = _rx()
    q4, k4, v4, three_d = _attention_views(bb, inputs, attrs, node)
    causal = "TopLeft" if int(attrs.get("is_causal", 0)) else None
    o4 = bb.normalize(relax.op.nn.attention(q4, k4, v4, scale=_scale(attrs, _shape(q4)[3]), causal_mask=causal))
    return _attention_out(bb, o4, three_d)


def _tiled_attention(bb, inputs, attrs, node):
    relax = _rx()
    if int(attrs.get(DEFERRED_ATTR, 0) or 0):
        raise BuildError(f"{node.name}: a TiledAttention with its normalisation deferred (a W8A8 attention) has no "
                         "TVM lowering yet; --emit tvm takes W8A16 and FP16 builds (--precision w8a16)")
    q4, k4, v4, three_d = _attention_views(bb, inputs, attrs, node)
    _, sq, h, dk = _shape(q4)
    skv = _shape(k4)[1]
    causal = bool(int(attrs.get("is_causal", 0)))
    scale = _scale(attrs, dk)
    tiling = Tiling(int(attrs.get("row_tiles", 1)), int(attrs.get("head_tiles", 1)))
    granularity = int(attrs.get("row_granularity", 1))   # as the ONNX body (edgefc.attention.granularity_from_node)
    try:   # the tiles the ONNX body computes and the cost model prices (edgefc.attention.tile_grid)
        grid = tile_grid(sq, h, tiling, granularity)
    except ValueError as e:
        raise BuildError(f"{node.name}: TiledAttention tiling: {e}") from None
    head_outs = []
    for h0, h1 in grid.head_bounds():
        qh = bb.normalize(relax.op.strided_slice(q4, axes=[2], begin=[h0], end=[h1]))
        kh = bb.normalize(relax.op.strided_slice(k4, axes=[2], begin=[h0], end=[h1]))
        vh = bb.normalize(relax.op.strided_slice(v4, axes=[2], begin=[h0], end=[h1]))
        row_outs = []
        for r0, r1 in grid.row_bounds():
            qt = bb.normalize(relax.op.strided_slice(qh, axes=[1], begin=[r0], end=[r1]))
            kt, vt, mask = kh, vh, None
            if causal:
                # rows r0..r1-1 attend to keys 0..r (top-left alignment of the whole block); the
                # tile sees keys [0, r1) and its mask is bottom-right aligned within them.
                end = min(r1, skv)
                kt = bb.normalize(relax.op.strided_slice(kh, axes=[1], begin=[0], end=[end]))
                vt = bb.normalize(relax.op.strided_slice(vh, axes=[1], begin=[0], end=[end]))
                mask = "BottomRight"
            row_outs.append(bb.normalize(relax.op.nn.attention(qt, kt, vt, scale=scale, causal_mask=mask)))
        head_outs.append(row_outs[0] if len(row_outs) == 1 else bb.normalize(relax.op.concat(row_outs, axis=1)))
    o4 = head_outs[0] if len(head_outs) == 1 else bb.normalize(relax.op.concat(head_outs, axis=2))
    return _attention_out(bb, o4, three_d)


def _const_value(e):
    """The numpy value of a Relax constant (None for anything else)."""
    value = getattr(e, "value", None)
    return value.numpy() if hasattr(value, "numpy") else None


class _Frontend(Exception):
    """The node is not in the form our converter takes: let TVM's frontend convert it."""


def _clip(bb, inputs, attrs, node):
    relax = _rx()
    x = inputs[0]
    bounds = []
    for i, default in ((1, -math.inf), (2, math.inf)):
        e = inputs[i] if len(inputs) > i else None
        if e is None:
            bounds.append(default)
            continue
        v = _const_value(e)
        if v is None or v.size != 1:
            raise _Frontend   # bounds known only at run time: the host's form
        v = float(v.reshape(()))
        bounds.append(default if math.isnan(v) else v)   # NaN: unbounded (as onnxruntime)
    return bb.normalize(relax.op.clip(x, bounds[0], bounds[1]))


def _pad(bb, inputs, attrs, node):
    relax = _rx()
    x = inputs[0]
    rank = len(_shape(x))
    pads = _const_value(inputs[1])
    value = _const_value(inputs[2]) if len(inputs) > 2 and inputs[2] is not None else 0.0
    axes = _const_value(inputs[3]) if len(inputs) > 3 and inputs[3] is not None else None
    if pads is None or value is None or (len(inputs) > 3 and inputs[3] is not None and axes is None):
        raise _Frontend
    pads = [int(p) for p in pads.reshape(-1)]
    axes = list(range(rank)) if axes is None else [int(a) % rank for a in axes.reshape(-1)]
    width = [0] * (2 * rank)
    for i, a in enumerate(axes):
        width[2 * a], width[2 * a + 1] = pads[i], pads[len(axes) + i]
    mode = _s(attrs.get("mode"), "constant")
    if mode not in ("constant", "reflect", "edge") or min(pads, default=0) < 0:
        raise _Frontend
    return bb.normalize(relax.op.nn.pad(x, width, "replicate" if mode == "edge" else mode,
                                        float(np.asarray(value).reshape(-1)[0]) if np.asarray(value).size else 0.0))


def _variadic(op_name: str):
    def convert(bb, inputs, attrs, node):
        relax = _rx()
        ins = [i for i in inputs if i is not None]
        y = ins[0]
        for other in ins[1:]:
            y = bb.normalize(getattr(relax.op, op_name)(y, other))
        if len(ins) == 1:
            y = bb.normalize(relax.op.add(y, relax.const(0, _dtype(y)))) if op_name == "add" else y
        return y
    return convert


CONVERTERS = {
    ("", "Clip"): _clip,
    ("", "Pad"): _pad,
    ("", "Max"): _variadic("maximum"),
    ("", "Min"): _variadic("minimum"),
    ("", "Sum"): _variadic("add"),
    ("", "Attention"): _attention,
    ("", "GroupNormalization"): _group_norm,
    (EDGEFC_DOMAIN, "TiledAttention"): _tiled_attention,
    (EDGEFC_DOMAIN, "GroupNormSiLU"): _group_norm_silu,
    (EDGEFC_DOMAIN, "GeGLU"): _geglu,
    (EDGEFC_DOMAIN, "FusedMatMul"): _fused_matmul,
    (EDGEFC_DOMAIN, "FusedConv"): _fused_conv,
}


def _importer_class():
    from tvm import relax
    from tvm.relax.frontend.onnx.onnx_frontend import ONNXGraphImporter, _get_convert_map

    class EdgefcOnnxImporter(ONNXGraphImporter):
        """TVM's ONNX importer plus edgefc's converters; binds every node's result to ``onnx<k>``."""

        def __init__(self, model: onnx.ModelProto):
            super().__init__({}, "float32", keep_params_in_input=False, sanitize=True)
            self.results: dict[int, list[str]] = {}   # node index -> names of its result variables
            self._onnx_nodes = {n.name: (i, n) for i, n in enumerate(model.graph.node)}

        def _check_for_unsupported_ops(self, graph):
            flow = next((n for n in graph.node if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                                                      for a in n.attribute)), None)
            if flow is not None:
                raise BuildError(f"the TVM lowering does not take control flow ({flow.op_type} node '{flow.name}'; "
                                 f"profile.json prices its bodies): compile without --emit tvm")
            known = _get_convert_map()
            missing = sorted({f"{_domain(n.domain) + '.' if _domain(n.domain) else ''}{n.op_type}"
                              for n in graph.node
                              if (_domain(n.domain), n.op_type) not in CONVERTERS
                              and (n.op_type not in known or _domain(n.domain) == EDGEFC_DOMAIN)
                              and n.op_type not in ("Constant", "If")})
            if missing:
                raise BuildError(f"the TVM lowering cannot import these ONNX ops: {', '.join(missing)}")

        def _convert_operator(self, op_name, inputs, attrs, opset):
            index, node = self._onnx_nodes[attrs["tvm_custom"]["name"]]
            key = (_domain(node.domain), node.op_type)
            sym = None
            if key in CONVERTERS:
                try:
                    if key == (EDGEFC_DOMAIN, "FusedConv"):
                        sym = _fused_conv(self.bb, list(inputs), dict(attrs), node, opset)
                    else:
                        sym = CONVERTERS[key](self.bb, list(inputs), dict(attrs), node)
                except _Frontend:
                    sym = None
                if isinstance(sym, relax.Expr):
                    sym = self.bb.normalize(sym)
            if sym is None:
                sym = super()._convert_operator(op_name, inputs, attrs, opset)
                sym = self._safe_take(sym)
            return self._bind(sym, index)

        def _safe_take(self, sym):
            """The frontend's Gather is ``take(mode="fast")``, which reads out of bounds on a bad
            index (a token id past the vocabulary); clamp instead, as a deployed library must."""
            if (isinstance(sym, relax.Call) and getattr(sym.op, "name", "") == "relax.take"
                    and str(sym.attrs.mode) == "fast"):
                return self.bb.normalize(relax.op.take(sym.args[0], sym.args[1], sym.attrs.axis, mode="clip"))
            return sym

        def _bind(self, sym, index):
            """Bind the node's tensor result(s) to variables named after the node, and remember
            them (:func:`tag_nodes` finds the node's calls from them)."""
            if isinstance(sym, relax.Tuple):
                return relax.Tuple([self._bind(f, index) for f in sym.fields])
            if isinstance(sym, relax.Call) and isinstance(sym.ty, relax.TensorType):
                sym = self.bb.emit(sym, name_hint=f"onnx{index}")
            if isinstance(sym, relax.Var):
                self.results.setdefault(index, []).append(sym.name)
            return sym

    return EdgefcOnnxImporter


def import_model(model: onnx.ModelProto):
    """Import a prepared model (:func:`prepare_model`) into a Relax IRModule (``main``), every
    call stamped with its ONNX node (:func:`tag_nodes`). A TiledAttention's tiles are
    ``edgefc.attention.tile_grid``'s at its own ``row_granularity``."""
    importer = _importer_class()(model)
    opset = next((o.version for o in model.opset_import if _domain(o.domain) == ""), 23)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            mod = importer.from_onnx(model.graph, opset)
        except BuildError:
            raise
        except Exception as e:  # noqa: BLE001 (TVM raises plain errors for ops it cannot convert)
            first = (str(e).strip().splitlines() or [type(e).__name__])[-1]
            raise BuildError(f"TVM could not import the model: {first[:300]}") from None
    return tag_nodes(mod, node_table(model), importer.results)


def node_table(model: onnx.ModelProto) -> list[tuple[str, str]]:
    """(name, op_type) of each node of a prepared model, by index."""
    return [(n.name, n.op_type if _domain(n.domain) in ("", EDGEFC_DOMAIN) else f"{n.domain}.{n.op_type}")
            for n in model.graph.node]
