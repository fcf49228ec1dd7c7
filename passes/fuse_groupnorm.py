"""Pass ``fuse-groupnorm``: GroupNorm as exported -> ``GroupNormalization``-21, SiLU folded in.

Matches, anchored at the ``InstanceNormalization``, what torch's exporter writes for
``nn.GroupNorm(G, C)`` on ``x`` [N, C, ...]::

    r = Reshape(x, [N, G, -1]);  n = InstanceNormalization(r, s[G], b[G]);  y = Reshape(n, shape(x))
    y = y * gamma + beta          (gamma, beta per channel: [C], [C,1], [C,1,1] ...; optional)
    y = y * Sigmoid(y)            (a following SiLU; optional)

The core chain is written as an onnx-graphsurgeon ``GraphPattern`` (a fixed chain with
positional inputs is what it describes well) and converted with
``Pattern.from_graphsurgeon``; the SiLU tail is added with the edgefc pattern API.
Emits: ``GroupNormalization(x, scale[C], bias[C]; epsilon, num_groups=G)`` (opset 21 semantics:
scale and bias are per *channel*; opset 18 had them per group, which is why the fusion needs
opset >= 21) or, with the SiLU, ``edgefc.GroupNormSiLU`` with the same inputs and attributes.
The InstanceNormalization's own per-group scale/bias (1 and 0 as exported) are folded into the
per-channel ones: ``scale_c = gamma_c * s_g(c)``, ``bias_c = gamma_c * b_g(c) + beta_c``.
A ``GroupNormalization`` already in the export (torch's dynamo exporter at opset 18+, brought to
21 by canonicalize) takes a following SiLU the same way (``GroupNormSiLU``; counted under
``groupnorm_silu`` only, as the norm itself was not fused here).
Misses: every ``InstanceNormalization`` not absorbed (kind ``groupnorm``), and every fused
GroupNorm whose output feeds a ``Sigmoid`` that could not be folded (kind ``groupnorm_silu``),
with the reason. Paper Sec. 3 (kernel fusion).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from edgefc import functions, ir
from edgefc.composites import GROUP_NORM_SILU
from edgefc.passes.fusion_base import activation, const, node_base, per_channel
from edgefc.pattern import Pattern
from edgefc.registry import register_pass
from edgefc.rewriter import Fusion, FusionPass, Rewriter


def _core(affine: bool, silu: bool) -> Pattern:
    gp = gs.GraphPattern()
    x = gp.variable()
    r1 = gp.add("reshape_in", "Reshape", inputs=[x, gp.constant("shape_in")])
    n = gp.add("inorm", "InstanceNormalization", inputs=[r1, gp.constant("in_scale"), gp.constant("in_bias")])
    y = gp.add("reshape_out", "Reshape", inputs=[n, gp.constant("shape_out")])
    if affine:
        y = gp.add("mul", "Mul", inputs=[y, gp.constant("gamma")])
        y = gp.add("add", "Add", inputs=[y, gp.constant("beta")])
    gp.set_output_tensors([y])
    name = "groupnorm" + ("-affine" if affine else "") + ("-silu" if silu else "")
    p = Pattern.from_graphsurgeon(gp, name, commutative=True, where=_where)
    if silu:
        activation(p, p.node("add" if affine else "reshape_out").outputs[0], GROUP_NORM_SILU.activation)
    return p


def _groups(m) -> tuple[int, int, tuple[int, ...]] | str:
    """(channels C, groups G, x shape) or the reason the reshapes are not a group split."""
    x = m["input0"]
    shape = ir.static_shape(x)
    if shape is None or len(shape) < 3:
        return f"input '{x.name}' is not a static [N, C, ...] tensor"
    split = ir.static_shape(m["reshape_in"].outputs[0])
    back = ir.static_shape(m["reshape_out"].outputs[0])
    n, c = shape[0], shape[1]
    if split is None or len(split) != 3 or split[0] != n:
        return f"Reshape '{m['reshape_in'].name}' gives {split}, not [N, G, -1]"
    g = split[1]
    if c % g or split[2] != (c // g) * int(np.prod(shape[2:])):
        return f"Reshape '{m['reshape_in'].name}' does not split {c} channels into {g} groups"
    if back != shape:
        return f"Reshape '{m['reshape_out'].name}' gives {back}, not the input shape {list(shape)}"
    if m.const("in_scale").size != g or m.const("in_bias").size != g:
        return f"InstanceNormalization '{m['inorm'].name}' scale/bias are not per group ({g})"
    return c, g, shape


def _where(m) -> bool | str:
    cg = _groups(m)
    if isinstance(cg, str):
        return cg
    c, _, shape = cg
    for name in ("gamma", "beta"):
        t = m.get(name)
        if t is not None and per_channel(t.values, c, len(shape)) is None:
            return f"{name} '{t.name}' of shape {list(t.values.shape)} is not per channel ({c})"
    return True


# Largest first: a candidate takes the most it can.
PATTERNS = [_core(True, True), _core(True, False), _core(False, True), _core(False, False)]


def _native_silu() -> Pattern:
    """A GroupNormalization-21 (already one op: exported natively, canonicalize brought it to 21)
    followed by SiLU."""
    p = Pattern("groupnorm21-silu")
    x, s, b = p.input("x"), p.input("scale"), p.input("bias")
    y = p.op("GroupNormalization", x, s, b, name="gn")
    activation(p, y, GROUP_NORM_SILU.activation)
    return p


NATIVE_SILU = _native_silu()


def group_norm_params(m) -> tuple[np.ndarray, np.ndarray, float, int]:
    """Per-channel scale and bias, epsilon and number of groups of a match."""
    c, g, shape = _groups(m)
    rep = c // g
    s_g = np.repeat(m.const("in_scale").reshape(g).astype(np.float64), rep)
    b_g = np.repeat(m.const("in_bias").reshape(g).astype(np.float64), rep)
    gamma = per_channel(m.const("gamma"), c, len(shape)).astype(np.float64) if m.get("gamma") is not None else np.ones(c)
    beta = per_channel(m.const("beta"), c, len(shape)).astype(np.float64) if m.get("beta") is not None else np.zeros(c)
    scale, bias = gamma * s_g, gamma * b_g + beta
    eps = float(m["inorm"].attrs.get("epsilon", 1e-5))
    return scale, bias, eps, g


def _group_norm(m, rw: Rewriter) -> list[gs.Node]:
    """GroupNormalization-21, or GroupNormSiLU when the match took the SiLU; a SiLU after the norm
    that could not be folded is logged (kind ``groupnorm_silu``) with the reason."""
    node = m["inorm"]
    silu = "silu" in m.nodes
    if not silu and any(c.op == "Sigmoid" for c in m.output.outputs):
        want = PATTERNS[0] if "mul" in m.nodes else PATTERNS[2]
        rw.log.miss("groupnorm_silu", node, rw.match(want, node, "inorm").reason)
    x = m["input0"]
    scale, bias, eps, groups = group_norm_params(m)
    dtype = np.dtype(x.dtype or np.float32)
    name = rw.unique_name(node_base(node) + ("/GroupNormSiLU" if silu else "/GroupNormalization"))
    inputs = [x, const(f"{name}.scale", scale.astype(dtype)), const(f"{name}.bias", bias.astype(dtype))]
    attrs = {"epsilon": eps, "num_groups": int(groups)}
    if silu:
        return [functions.make_node(GROUP_NORM_SILU.root.fused_op, inputs, m.outputs, name=name, attrs=attrs)]
    return [gs.Node("GroupNormalization", name=name, attrs=attrs, inputs=inputs, outputs=m.outputs)]


def _native_group_norm_silu(m, rw: Rewriter) -> list[gs.Node]:
    node = m["gn"]
    name = rw.unique_name(node_base(node) + "/GroupNormSiLU")
    return [functions.make_node(GROUP_NORM_SILU.root.fused_op, [m["x"], m["scale"], m["bias"]], m.outputs, name=name,
                                attrs={"epsilon": float(node.attrs.get("epsilon", 1e-5)),
                                       "num_groups": int(node.attrs["num_groups"])})]


#: the exported chain, anchored at the InstanceNormalization (every one is a candidate); counted as
#: ``groupnorm``, and also as ``groupnorm_silu`` when the SiLU was folded.
GROUPNORM = Fusion("groupnorm", PATTERNS, anchor="inorm", replacement=_group_norm,
                   counts=lambda m: ("groupnorm", "groupnorm_silu") if "silu" in m.nodes else ("groupnorm",))
#: a GroupNormalization already in the export (the ones GROUPNORM wrote are not candidates: their
#: SiLU was handled there); a candidate when a Sigmoid reads it.
NATIVE_GROUPNORM_SILU = Fusion("groupnorm_silu", [NATIVE_SILU], anchor="gn", replacement=_native_group_norm_silu,
                               candidate=lambda node: any(c.op == "Sigmoid" for c in node.outputs[0].outputs))


@register_pass("fuse-groupnorm", namespace="edgefc")
class FuseGroupNorm(FusionPass):
    """Fuse exported GroupNorm (Reshape/InstanceNormalization/Reshape/Mul/Add [+SiLU]) into GroupNormalization-21."""

    fusions = (GROUPNORM, NATIVE_GROUPNORM_SILU)
    kinds = ("groupnorm", "groupnorm_silu")
