"""Pass ``fuse-epilogue``: elementwise epilogues of tensor-engine ops -> FusedMatMul / FusedConv.

Matches, anchored at a tensor-engine op ``T`` (``FusedMatMul``, ``FusedConv``, ``Conv``, ``Gemm``)::

    z = T(...)            [z = z + bias]          (Conv without bias: a per-channel constant Add)
    a = z * Sigmoid(z) | Gelu(z) | Clip(z, lo, hi) | z   (activation: SiLU, exact GELU, a clamp to
                                                   constant bounds (ReLU6), none)
    y = a + r                                     (residual: a non-constant tensor, broadcasting
                                                   to a's shape; optional)

when the target runs such epilogues inside the tensor-engine kernel (NPU targets, or a target
whose ``fuses_epilogues`` says so; a target-free compile fuses). ``Gemm`` converts only with
``alpha = beta = 1``, ``transA = 0``, a constant weight and bias. When both operands of a residual
``Add`` come from tensor-engine ops, the one later in the graph takes it (the other is ready).
Emits: ``edgefc.FusedMatMul(A, B, bias[, residual]; activation)`` or
``edgefc.FusedConv(X, W, B[, residual]; dilations, group, kernel_shape, pads, strides, activation)``
(with ``activation="clip"`` also ``clip_min``, ``clip_max``);
a bias-free Conv followed by its bias Add becomes a Conv with bias (kind ``conv_bias``).
Misses: every tensor-engine op whose output, after the pass, still goes only to a SiLU, a
``Gelu`` or a non-constant ``Add``, with the reason (kind ``epilogue``). Runs last in ``fuse``.
Paper Sec. 3 (kernel fusion).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from edgefc import composites, functions, ir
from edgefc.pass_base import PassContext
from edgefc.passes.fusion_base import (
    activation,
    const,
    epilogue_capable,
    last_axis_vector,
    node_base,
    per_channel,
)
from edgefc.pattern import Pattern
from edgefc.registry import register_pass
from edgefc.rewriter import Fusion, FusionPass, RewriteLog, Rewriter, apply_fusions, feeds

#: the tensor-engine ops an epilogue folds into, and the fused op each becomes (edgefc.composites).
FUSED = {op: root.fused_op for root in composites.TENSOR_ROOTS for op in root.onnx_ops}
PRODUCERS = tuple(FUSED)


def _users(t: gs.Tensor) -> list[gs.Node]:
    return list({id(n): n for n in t.outputs}.values())


def _gemm_problem(node: gs.Node) -> str | None:
    a = node.attrs
    if float(a.get("alpha", 1.0)) != 1.0 or float(a.get("beta", 1.0)) != 1.0 or int(a.get("transA", 0)):
        return f"Gemm '{node.name}' has alpha/beta != 1 or transA"
    if len(node.inputs) < 2 or not isinstance(node.inputs[1], gs.Constant) or len(node.inputs[1].shape) != 2:
        return f"Gemm '{node.name}' has no constant 2D weight"
    n = node.inputs[1].shape[0 if int(a.get("transB", 0)) else 1]
    if len(node.inputs) > 2 and not (isinstance(node.inputs[2], gs.Constant)
                                     and last_axis_vector(node.inputs[2].values, n, 2) is not None):
        return f"Gemm '{node.name}' bias is not a constant of {n} values"
    return None


def _conv_problem(node: gs.Node) -> str | None:
    if node.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET"):
        return f"Conv '{node.name}' uses auto_pad"
    if not isinstance(node.inputs[1], gs.Constant) or ir.static_shape(node.inputs[1]) is None:
        return f"Conv '{node.name}' has no constant weight"
    return None


def _producer_check(activation: bool, residual: bool):
    """Node check of the tensor-engine op for a variant that folds an activation and/or residual."""
    def check(node: gs.Node):
        if node.domain == functions.DOMAIN:
            if len(node.inputs) > functions.RESIDUAL_INPUT:
                return f"{node.op} '{node.name}' already has a residual input"
            if activation and node.attrs.get("activation", "none") not in ("none", b"none"):
                return f"{node.op} '{node.name}' already has activation {node.attrs.get('activation')!r}"
            return True
        if node.domain not in (None, ""):
            return f"{node.op} '{node.name}' is in domain '{node.domain}'"
        return _gemm_problem(node) if node.op == "Gemm" else _conv_problem(node)
    return check


def _residual_check(order: dict[int, int]):
    """Pattern constraint of the residual variants; ``order``: node id -> position in the graph."""
    def where(m) -> bool | str:
        r, add, prod = m["residual"], m["add_residual"], m["producer"]
        if isinstance(r, gs.Constant):
            return f"the Add's other input '{r.name}' is a constant (a bias, not a residual)"
        out, mine = ir.static_shape(add.outputs[0]), ir.static_shape(prod.outputs[0])
        if out is None or out != mine:
            return f"the residual Add broadcasts the result {mine} to {out}"
        other = r.inputs[0] if r.inputs else None
        users = _users(r)
        if other is not None and other.op in PRODUCERS and len(users) == 1 and users[0] is add \
                and order.get(id(other), -1) > order.get(id(prod), -1) and _producer_check(False, True)(other) is True:
            return f"the Add's other input comes from {other.op} '{other.name}', later in the graph, which takes it"
        return True
    return where


def variants(order: dict[int, int]) -> list[Pattern]:
    """The epilogue patterns, most folded first: one per :data:`edgefc.composites.EPILOGUES`
    variant that folds an activation or a residual, named after it (``order``: node id ->
    position in the graph, decides which op takes a shared residual)."""
    out = []
    for e in composites.EPILOGUES:
        if e.activation is None and not e.residual:
            continue  # the bias alone: CONV_BIAS below, fuse-matmul-bias, or the op itself (Gemm)
        p = Pattern(e.name, where=_residual_check(order) if e.residual else None)
        z = p.op(e.root.onnx_ops, name="producer", extra_inputs=True,
                 check=_producer_check(e.activation is not None, e.residual))
        y = activation(p, z, e.activation) if e.activation else z
        if e.residual:
            p.op("Add", y, p.input("residual"), name="add_residual")
        out.append(p)
    return out


#: pattern name -> the composite it is (edgefc.composites)
COMPOSITES = {e.name: e for e in composites.EPILOGUES}


def _kinds(m) -> tuple[str, ...]:
    e = COMPOSITES[m.pattern.name]
    return (*(["activation"] if e.activation else []), *(["residual"] if e.residual else []))


def epilogue_fusion(order: dict[int, int]) -> Fusion:
    """The epilogue fusion for a graph whose node order is ``order`` (a replacement takes the
    position of the op it replaces). Candidates are not logged here: what is left unfused is
    reported once the pass is done (:func:`_report_leftovers`)."""
    def replacement(m, rw: Rewriter) -> list[gs.Node]:
        node = m["producer"]
        name = node.name if node.domain == functions.DOMAIN else rw.unique_name(node_base(node) + f"/{FUSED[node.op]}")
        new = _fused_node(m, COMPOSITES[m.pattern.name], name)
        order[id(new)] = order[id(node)]
        return [new]

    return Fusion("epilogue", variants(order), anchor="producer", replacement=replacement, misses=False, counts=_kinds)


#: a bias-free Conv and the per-channel constant Add after it: the ``conv2d_bias`` composite.
BIAS_PATTERN = Pattern(composites.epilogue(composites.CONV2D, None, False).name)
_conv = BIAS_PATTERN.op("Conv", BIAS_PATTERN.input("X"), BIAS_PATTERN.const("W"), name="conv")
BIAS_PATTERN.op("Add", _conv, BIAS_PATTERN.const("bias"), name="add")


def _conv_attrs(node: gs.Node) -> dict:
    k = list(node.attrs.get("kernel_shape", node.inputs[1].shape[2:]))
    return {"dilations": list(node.attrs.get("dilations", [1] * len(k))), "group": int(node.attrs.get("group", 1)),
            "kernel_shape": k, "pads": list(node.attrs.get("pads", [0] * 2 * len(k))),
            "strides": list(node.attrs.get("strides", [1] * len(k)))}


def _fused_node(m, e: composites.Epilogue, name: str) -> gs.Node:
    """The FusedMatMul / FusedConv replacing a match of composite ``e``."""
    prod = m["producer"]
    act = e.activation.name if e.activation else "none"
    ins = list(prod.inputs)
    attrs = {"activation": act}
    bounds = {b: float(np.asarray(m.const(b)).reshape(-1)[0]) for b in (e.activation.bounds if e.activation else ())}
    if prod.op == "Gemm":
        w = ins[1].values
        n = w.shape[0 if int(prod.attrs.get("transB", 0)) else 1]
        weight = const(ins[1].name + ".T", w.T) if int(prod.attrs.get("transB", 0)) else ins[1]
        bias = ins[2].values.reshape(n) if len(ins) > 2 else np.zeros(n, w.dtype)
        ins = [ins[0], weight, const(f"{name}.bias", bias, like=ins[0])]
    elif prod.op == "Conv":
        attrs.update(_conv_attrs(prod))
        if len(ins) == 2:
            ins.append(const(f"{name}.bias", np.zeros(ins[1].shape[0]), like=ins[0]))
    else:
        attrs = {**prod.attrs, "activation": act if act != "none" else prod.attrs.get("activation", "none")}
    if e.residual:
        ins.append(m["residual"])
    attrs.update(bounds)
    return functions.make_node(FUSED[prod.op], ins, m.outputs, name=name, attrs=attrs)


def _conv_bias(m, rw: Rewriter) -> list[gs.Node] | None:
    """The Conv with the Add's per-channel constant as its bias (declined when it is not one)."""
    node = m["conv"]
    channels = m["W"].shape[0]
    out_shape = ir.static_shape(m["add"].outputs[0])
    bias = per_channel(m.const("bias"), channels, len(out_shape or ())) if out_shape else None
    if bias is None or out_shape != ir.static_shape(node.outputs[0]):
        return None
    return [gs.Node("Conv", name=node.name, attrs=dict(node.attrs), outputs=m.outputs,
                    inputs=[m["X"], m["W"], const(node.name + ".bias", bias, like=m["X"])])]


#: a bias-free Conv whose output feeds an Add: the Add's constant becomes its bias (not logged:
#: an Add that is no bias is left to the epilogue fusion).
CONV_BIAS = Fusion("conv_bias", [BIAS_PATTERN], anchor="conv", replacement=_conv_bias, misses=False,
                   candidate=lambda node: len(node.inputs) == 2 and feeds("Add")(node))


def _report_leftovers(graph: gs.Graph, ctx: PassContext, log: RewriteLog, fusion: Fusion, capable: bool) -> None:
    """Log (kind ``epilogue``) every tensor-engine op still followed by an activation or a
    residual Add, with the reason it was not folded."""
    rw = Rewriter(graph, log)
    for node in rw.nodes(*PRODUCERS, "MatMul"):
        if node.op == "MatMul" and not (isinstance(node.inputs[1], gs.Constant) and len(node.inputs[1].shape) == 2):
            continue
        users = _users(node.outputs[0])
        if node.outputs[0].name in rw.graph_outputs or not (
                (len(users) == 1 and users[0].op in ("Gelu", "Add")
                 and not any(isinstance(i, gs.Constant) for i in users[0].inputs))
                or (len(users) == 2 and {u.op for u in users} == {"Sigmoid", "Mul"})):
            continue  # not followed by something an epilogue could take
        if node.op == "MatMul":
            reason = "a MatMul without bias (epilogues fold into FusedMatMul, Gemm, Conv and FusedConv)"
        elif not capable:
            reason = f"target '{getattr(ctx.target, 'name', ctx.target)}' runs elementwise epilogues as separate kernels"
        else:
            reason = rw.bind(fusion, node).reason
        log.miss("epilogue", node, reason)


@register_pass("fuse-epilogue", namespace="edgefc")
class FuseEpilogue(FusionPass):
    """Fold activations (SiLU, GELU, Clip) and residual adds into FusedMatMul/FusedConv (target permitting)."""

    kinds = ("conv_bias", "activation", "residual", "epilogue")

    def fuse(self, graph: gs.Graph, ctx: PassContext, log: RewriteLog) -> None:
        """Two stages: Conv biases first; then, with the graph order after them, the epilogues
        (where the target folds them); then the report of what is left."""
        apply_fusions(graph, [CONV_BIAS], log)
        capable = epilogue_capable(ctx.target)
        fusion = epilogue_fusion({id(n): i for i, n in enumerate(graph.nodes)})
        if capable:
            apply_fusions(graph, [fusion], log)
        _report_leftovers(graph, ctx, log, fusion, capable)
