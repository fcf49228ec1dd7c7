"""edgefc: an ahead-of-time compiler for compact Stable Diffusion models on a mobile NPU.

Public API::

    graph = edgefc.load("unet.onnx")                       # onnx-graphsurgeon Graph
    result = edgefc.compile("unet.onnx", "exynos2400", output="build/unet")

    @edgefc.register_pass("my-pass")
    class MyPass(edgefc.Pass):
        '''One line saying what it does.'''
        def run(self, graph, ctx):
            return graph
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
from edgefc.pass_base import Pass, PassContext
from edgefc.pass_manager import PassManager, PassRecord
from edgefc.registry import get_pass, list_passes, load_plugin, register_pass
from edgefc.target import Target, get_target, list_targets, register_target

__all__ = [
    "BuildError", "CompileResult", "EdgefcError", "ExportError", "Graph", "ModelLoadError", "Pass",
    "PassContext", "PassError", "PassManager", "PassRecord", "QuantizationError", "ShapeError", "Target",
    "TargetError", "VerificationError", "compile", "default_pipeline", "get_pass", "get_target",
    "infer_shapes", "list_passes", "list_targets", "load", "load_plugin", "register_pass",
    "register_target", "save",
]
