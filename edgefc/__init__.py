"""edgefc: an ahead-of-time compiler for compact Stable Diffusion models on a mobile NPU.

Public API::

    graph = edgefc.load("unet.onnx")                       # onnx-graphsurgeon Graph
    result = edgefc.compile("unet.onnx", "exynos2400", output="build/unet")

    @edgefc.register_pass("my-pass")
    class MyPass(edgefc.Pass):
        '''One line saying what it does.'''
        def run(self, graph, ctx):
            return graph

    edgefc.compile("unet.onnx", "exynos2400", insert_after={"fuse-epilogue": "my-pass"})

The rewrite engine the built-in fusions are declared with: ``Pattern`` and its checks
(``is_scalar``, ``any_scalar``, ``close_to``, ``scalar``), ``match`` -> ``Match`` | ``Miss``,
``Fusion`` ``(patterns, anchor, replacement)``, ``apply_fusions``, ``Rewriter``, ``RewriteLog``,
``FusionPass``, ``feeds``. Pipelines: ``register_pipeline``, ``list_pipelines``, ``insert_passes``.
"""

from edgefc.compiler import CompileResult, compile, default_pipeline
from edgefc.errors import (
    BuildError,
    EdgefcError,
    ExportError,
    ModelLoadError,
    PassError,
    QuantizationError,
    ShapeError,
    TargetError,
    VerificationError,
)
from edgefc.ir import Graph, infer_shapes, load, save
from edgefc.matcher import Match, Miss, match
from edgefc.pass_base import Pass, PassContext
from edgefc.pass_manager import PassManager, PassRecord
from edgefc.pattern import Pattern, any_scalar, close_to, is_scalar, scalar
from edgefc.registry import (
    get_pass,
    insert_passes,
    list_passes,
    list_pipelines,
    load_plugin,
    register_pass,
    register_pipeline,
)
from edgefc.rewriter import Fusion, FusionPass, RewriteLog, Rewriter, apply_fusions, feeds
from edgefc.target import Target, get_target, list_targets, register_target

__all__ = [
    "BuildError", "CompileResult", "EdgefcError", "ExportError", "Fusion", "FusionPass", "Graph", "Match", "Miss",
    "ModelLoadError", "Pass", "PassContext", "PassError", "PassManager", "PassRecord", "Pattern",
    "QuantizationError", "RewriteLog", "Rewriter", "ShapeError", "Target", "TargetError", "VerificationError",
    "any_scalar", "apply_fusions", "close_to", "compile", "default_pipeline", "feeds", "get_pass", "get_target",
    "infer_shapes", "insert_passes", "is_scalar", "list_passes", "list_pipelines", "list_targets", "load",
    "load_plugin", "match", "register_pass", "register_pipeline", "register_target", "save", "scalar",
]
