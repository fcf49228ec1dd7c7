"""Pipeline ``fuse``: every operator fusion, one pass each, in a fixed order (paper Sec. 3, "kernel fusion").

EdgeFusion fuses operators "using a kernel fusion method [FlashAttention]" before model-level
tiling: the attention block becomes one op that MLT can tile, and normalisations, activations
and epilogues stop being separate DRAM round trips. ``fuse`` is a pipeline (data, see
:mod:`edgefc.registry`) of these passes, each run, timed, verified and dumpable on its own
(``--verify`` and ``--dump-after fuse-attention`` name them; docs/passes.md):

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

``--no-fuse NAME`` (``ctx.options["no_fuse"]``) removes fusions from the pipeline by name
(``attention`` or ``fuse-attention``; the pass manager edits the list and reports them as
``fusion.skipped``). The report section ``ctx.report["fusion"]`` holds a count per kind and,
per kind, the candidates that did not fuse with the reason (``misses``).
"""

from __future__ import annotations

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
from edgefc.registry import register_pipeline

ORDER = ("fuse-identity", "fuse-layernorm", "fuse-gelu", "fuse-geglu", "fuse-groupnorm", "fuse-attention",
         "fuse-matmul-bias", "fuse-epilogue")

register_pipeline("fuse", ORDER)
