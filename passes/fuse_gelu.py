"""Pass ``fuse-gelu``: GELU decompositions -> ``Gelu`` (opset 20).

Matches, anchored at the ``Erf`` (exact form) or the ``Tanh`` (tanh approximation)::

    erf:   x * 0.5 * (1 + Erf(x / sqrt(2)))                    (or Erf(x * (1/sqrt(2))))
    tanh:  x * 0.5 * (1 + Tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))   (x^3 as Pow(x, 3) or x*x*x)

with the three factors ``x``, ``0.5`` and ``(1 + ...)`` multiplied in any association and order
(torch's ``F.gelu`` exports ``(x * (1 + erf)) * 0.5``; diffusers' GEGLU gate uses it).
Emits: ``Gelu(x; approximate="none" | "tanh")``.
Misses: every ``Erf``, and every ``Tanh`` fed by a ``Mul``, that was not absorbed, with the
reason. Runs before ``fuse-geglu`` (which looks for ``Gelu``) and before ``fuse-epilogue`` (which
folds a ``Gelu`` after a matmul into it). Paper Sec. 3 (kernel fusion).
"""

from __future__ import annotations

import math

import onnx_graphsurgeon as gs

from edgefc.passes.fusion_base import node_base
from edgefc.pattern import Pattern, Value, is_scalar
from edgefc.registry import register_pass
from edgefc.rewriter import Fusion, FusionPass, Rewriter

SQRT2 = math.sqrt(2.0)
SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
TANH_COEFF = 0.044715


def _product(p: Pattern, x: Value, a: Value, form: str) -> None:
    """y = x * 0.5 * a in one of the three association orders the exporters emit."""
    half = p.const("half", is_scalar(0.5))
    if form == "x_a_half":        # (x * a) * 0.5
        p.op("Mul", p.op("Mul", x, a, name="mul_xa"), half, name="mul_out")
    elif form == "x_half_a":      # (x * 0.5) * a
        p.op("Mul", p.op("Mul", x, half, name="mul_xh"), a, name="mul_out")
    else:                         # x * (a * 0.5)
        p.op("Mul", x, p.op("Mul", a, half, name="mul_ah"), name="mul_out")


FORMS = ("x_a_half", "x_half_a", "x_ah")


def _erf_patterns() -> list[Pattern]:
    patterns = []
    for scale in ("div", "mul"):
        for form in FORMS:
            p = Pattern(f"gelu-erf-{scale}-{form}")
            x = p.input("x")
            if scale == "div":
                arg = p.op("Div", x, p.const("sqrt2", is_scalar(SQRT2, rtol=1e-5)), name="scale")
            else:
                arg = p.op("Mul", x, p.const("inv_sqrt2", is_scalar(1 / SQRT2, rtol=1e-5)), name="scale")
            e = p.op("Erf", arg, name="erf")
            a = p.op("Add", e, p.const("one", is_scalar(1.0)), name="add_one")
            _product(p, x, a, form)
            patterns.append(p)
    return patterns


def _tanh_patterns() -> list[Pattern]:
    patterns = []
    for cube in ("pow", "mul"):
        for form in FORMS:
            p = Pattern(f"gelu-tanh-{cube}-{form}")
            x = p.input("x")
            if cube == "pow":
                x3 = p.op("Pow", x, p.const("three", is_scalar(3.0)), name="cube")
            else:
                x3 = p.op("Mul", p.op("Mul", x, x, name="square"), x, name="cube")
            inner = p.op("Add", x, p.op("Mul", x3, p.const("coeff", is_scalar(TANH_COEFF, rtol=1e-5)), name="mul_coeff"),
                         name="add_inner")
            t = p.op("Tanh", p.op("Mul", inner, p.const("k", is_scalar(SQRT_2_OVER_PI, rtol=1e-5)), name="mul_k"),
                     name="tanh")
            a = p.op("Add", t, p.const("one", is_scalar(1.0)), name="add_one")
            _product(p, x, a, form)
            patterns.append(p)
    return patterns


ERF_PATTERNS = _erf_patterns()
TANH_PATTERNS = _tanh_patterns()


def _candidate(node: gs.Node) -> bool:
    """Every Erf; a Tanh only when a Mul feeds it (else it is a plain tanh activation)."""
    return node.op == "Erf" or bool(node.inputs[0].inputs and node.inputs[0].inputs[0].op == "Mul")


def _gelu(m, rw: Rewriter) -> list[gs.Node]:
    erf = "erf" in m.nodes
    anchor = m["erf" if erf else "tanh"]
    return [gs.Node("Gelu", name=rw.unique_name(node_base(anchor) + "/Gelu"),
                    attrs={"approximate": "none" if erf else "tanh"}, inputs=[m["x"]], outputs=m.outputs)]


GELU = Fusion("gelu", ERF_PATTERNS + TANH_PATTERNS, anchor=("erf", "tanh"), replacement=_gelu, candidate=_candidate)


@register_pass("fuse-gelu", namespace="edgefc")
class FuseGelu(FusionPass):
    """Fuse GELU decompositions (erf and tanh forms) into Gelu-20."""

    fusions = (GELU,)
