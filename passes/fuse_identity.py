"""Pass ``fuse-identity``: remove arithmetic with an identity constant (x*1, x/1, x+0, x-0).

Matches: ``Mul``/``Div`` by a scalar constant 1, ``Add``/``Sub`` of a scalar constant 0, where
the result has the other input's shape and dtype (no broadcasting). Vectors of zeros are left
alone: a zero bias is still a bias (``fuse-matmul-bias`` folds it).
Emits: nothing; consumers read the other input directly.
Why in the fusion pipeline: diffusers divides every residual sum by ``output_scale_factor`` /
``rescale_output_factor`` (1.0 in Stable Diffusion), and that ``Div`` sits between a residual
``Add`` and the conv or matmul that feeds it, hiding the epilogue from ``fuse-epilogue``. Runs
first in ``fuse``. Paper Sec. 3 (kernel fusion): a precondition, not a fusion by itself.
"""

from __future__ import annotations

import numpy as np

from edgefc import ir
from edgefc.graph_edit import bypass
from edgefc.pattern import Pattern, is_scalar
from edgefc.registry import register_pass
from edgefc.rewriter import Fusion, FusionPass, Rewriter

IDENTITY = {"Mul": 1.0, "Div": 1.0, "Add": 0.0, "Sub": 0.0}


def _same_type(m) -> bool | str:
    """The result is the kept input unchanged: same static shape (no broadcasting), same dtype."""
    x, y = m["x"], m["op"].outputs[0]
    out_shape = ir.static_shape(y)
    if out_shape is None or ir.static_shape(x) != out_shape:
        return "the identity constant broadcasts the input"
    if x.dtype is None or y.dtype is None or np.dtype(x.dtype) != np.dtype(y.dtype):
        return "the result's dtype differs from the input's"
    return True


def _pattern(op: str) -> Pattern:
    """``x op c`` with ``c`` a scalar constant equal to the identity of ``op`` (Mul and Add: either
    order). Scalars only: a zero bias vector is a bias (fuse-matmul-bias takes it)."""
    p = Pattern(f"identity-{op.lower()}", where=_same_type)
    p.op(op, p.input("x"), p.const("c", is_scalar(IDENTITY[op], rtol=0.0)), name="op")
    return p


def _bypass(m, rw: Rewriter):
    """Consumers read ``x`` directly; the node stays (declined) when its output is a graph output
    that cannot take the input's place (see :func:`edgefc.graph_edit.bypass`)."""
    node = m["op"]
    if not bypass(rw.graph, node, keep=list(node.inputs).index(m["x"])):
        return None
    return []


IDENTITY_FUSION = Fusion("identity", [_pattern(op) for op in IDENTITY], anchor="op", replacement=_bypass,
                         misses=False)


@register_pass("fuse-identity", namespace="edgefc")
class FuseIdentity(FusionPass):
    """Remove x*1, x/1, x+0 and x-0 (the U-Net's divisions by output_scale_factor=1)."""

    fusions = (IDENTITY_FUSION,)
