"""Pass ``fuse``: every operator fusion, in a fixed order (paper Sec. 3, "kernel fusion").

EdgeFusion fuses operators "using a kernel fusion method [FlashAttention]" before model-level
tiling: the attention block becomes one op that MLT can tile, and normalisations, activations
and epilogues stop being separate DRAM round trips. ``fuse`` runs these passes (each is also
registered on its own, see docs/passes.md):

====================  ============================================================  ===========
pass                  fuses                                                         emits
====================  ============================================================  ===========
fuse-identity         x*1, x/1, x+0, x-0 (exposes residual adds)                    (removal)
fuse-layernorm        ReduceMean/Sub/Pow/ReduceMean/Add/Sqrt/Div[*g][+b]            LayerNormalization
fuse-gelu             x*0.5*(1+Erf(x/sqrt2)), tanh form                             Gelu
fuse-geglu            halves of a projection, value * Gelu(gate)                    edgefc GeGLU
fuse-groupnorm        Reshape/InstanceNormalization/Reshape/Mul/Add [+SiLU]         GroupNormalization, edgefc GroupNormSiLU
fuse-attention        MatMul(Q,K^T)*scale[+mask] -> Softmax -> MatMul(.,V) + heads  Attention-23 (3D)
fuse-matmul-bias      MatMul(A, W) + bias                                           edgefc FusedMatMul
fuse-epilogue         SiLU / GELU / residual Add after a matmul or conv             edgefc FusedMatMul, FusedConv
====================  ============================================================  ===========

The order matters: identity removal first (it exposes epilogues); GELU before GEGLU (which
looks for ``Gelu``) and before the epilogues (which fold a ``Gelu`` into a matmul); GroupNorm
takes its SiLU before the epilogue pass could see it; attention before the bias fusion, so its
output projection is fused afterwards like any other linear layer; epilogues last, once every
producer is in its final form.

``--no-fuse NAME`` (``ctx.options["no_fuse"]``) skips fusions by name (``attention`` or
``fuse-attention``). The report section ``ctx.report["fusion"]`` holds a count per kind and,
per kind, the candidates that did not fuse with the reason (``misses``).
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from edgefc import functions
from edgefc.errors import PassError
from edgefc.pass_base import Pass, PassContext
from edgefc.passes import (  # noqa: F401  (registers the fusion passes)
    fuse_attention,
    fuse_epilogue,
    fuse_geglu,
    fuse_gelu,
    fuse_groupnorm,
    fuse_identity,
    fuse_layernorm,
    fuse_matmul,
)
from edgefc.registry import get_pass, register_pass

ORDER = ("fuse-identity", "fuse-layernorm", "fuse-gelu", "fuse-geglu", "fuse-groupnorm", "fuse-attention",
         "fuse-matmul-bias", "fuse-epilogue")


def _skipped(ctx: PassContext) -> set[str]:
    names = ctx.option("no_fuse", ()) or ()
    if isinstance(names, str):
        names = [n for n in names.split(",") if n.strip()]
    skipped = set()
    for raw in names:
        name = raw.strip()
        full = name if name.startswith("fuse-") else f"fuse-{name}"
        if full not in ORDER:
            known = ", ".join(n.removeprefix("fuse-") for n in ORDER)
            raise PassError(f"--no-fuse {name}: no such fusion (known: {known})")
        skipped.add(full)
    return skipped


@register_pass("fuse", namespace="edgefc")
class Fuse(Pass):
    """Operator fusion: attention, GroupNorm(+SiLU), LayerNorm, GELU/GEGLU, matmul bias, epilogues."""

    def run(self, graph: gs.Graph, ctx: PassContext) -> gs.Graph:
        skipped = _skipped(ctx)
        for name in ORDER:
            if name not in skipped:
                graph = get_pass(f"edgefc::{name}").run(graph, ctx)
        graph.cleanup()
        functions.ensure_functions(graph)
        ctx.report.setdefault("fusion", {"misses": {}})
        if skipped:
            ctx.report["fusion"]["skipped"] = sorted(skipped)
        return graph
