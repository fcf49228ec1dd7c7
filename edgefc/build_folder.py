"""A build folder (``edgefc compile``'s output) or an ONNX file, read back as the graph to price.

The cost model (``edgefc profile``), the text-to-image pipeline's NPU times (``edgefc.models``) and
the target fit (``bench/fit_exynos2400.py``) all price a model the same way: a build folder's
``model.onnx`` as built, or a raw export canonicalized and fused in memory first (through the pass
registry, so the core never imports the pass library). DESIGN.md "Data flow".
"""

from __future__ import annotations

from pathlib import Path

import onnx_graphsurgeon as gs

from edgefc import ir
from edgefc.errors import BuildError, ModelLoadError, ShapeError
from edgefc.pass_base import PassContext
from edgefc.pass_manager import PassManager
from edgefc.registry import is_known


def load_for_profile(path: Path, shapes: dict | None = None, progress=None) -> gs.Graph:
    """The graph to price: a build folder's model.onnx as built, or an ONNX file (canonicalized
    and fused first when it is a raw export, i.e. below the pipeline's opset 23). ``shapes``
    (``--shape``) fix an ONNX file's input shapes; a build folder's are fixed (an error)."""
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"no such model file or build folder: {path}")
    built = path.is_dir()
    if built:
        model_file = path / "model.onnx"
        if not model_file.is_file():
            raise BuildError(f"{path} is not a build folder (no model.onnx); run 'edgefc compile' first "
                             f"or pass an ONNX file")
    else:
        model_file = path
    if built and shapes:
        raise ShapeError(f"--shape applies to an ONNX file; the build folder {path} was compiled with static "
                         f"shapes (compile again with --shape to change them)")
    head = ir._read_model_proto(model_file)  # clear errors for missing / non-ONNX files
    opset = next((o.version for o in head.opset_import if o.domain in ("", "ai.onnx")), 0)
    if built or opset >= 23:
        # as compiled: shapes were saved with the graph; the weights' values are not needed
        if shapes:  # an opset-23 file of its own: the shapes given replace its input shapes
            ir._apply_input_shapes(head, dict(shapes))
        graph = ir.import_model(head)
        if shapes or any(t.shape is None for n in graph.nodes for t in n.outputs):
            ir.infer_shapes(graph)
        return graph
    # a raw export: the same steps as edgefc.load, on the proto already read (parsed once)
    from onnx import external_data_helper

    ir._check_external_data(head, model_file.parent)
    if shapes:
        ir._apply_input_shapes(head, dict(shapes))
    external_data_helper.load_external_data_for_model(head, str(model_file.parent))
    graph = ir.infer_shapes(ir.import_model(head))
    del head
    names = [n for n in ("canonicalize", "fuse") if is_known(n)]  # "fuse" is a pipeline
    if progress:
        progress(f"raw export (opset {opset}): running {', '.join(names)} in memory")
    return PassManager(names).run(graph, PassContext(options={"shapes": dict(shapes or {})}))

