"""Real trained models (issue 22): canonical folds, the NPU's op kinds as target data, the new
kernels priced and built, control flow priced by its bodies, ``--const``, shape conflicts.

Every model here is a small hand-built ONNX graph with the structure the trained models have
(``bench/wheel_models.py`` runs the trained ones)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import edgefc
from edgefc import ort

RNG = np.random.default_rng(0)


def _const(name, arr):
    return numpy_helper.from_array(np.asarray(arr), name)


def _model(nodes, inputs, outputs, inits=(), opset=17):
    graph = helper.make_graph(nodes, "m", inputs, outputs, list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _vi(name, shape, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


def _compile(tmp_path, model, options=None, **kw):
    """Compile ``model`` (fp32, no MLT unless ``options`` say otherwise); returns (result, source path)."""
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    opts = {"precision": "fp32", "no_mlt": True, **(options or {})}
    return edgefc.compile(path, "exynos2400", output=tmp_path / "build", options=opts, **kw), path


def _matches(tmp_path, path, feeds, tol=1e-5):
    ort.check(ort.run(str(path), feeds), ort.run(str(tmp_path / "build" / "model.onnx"), feeds), tol)


# --- canonicalize ---------------------------------------------------------------------------------

def test_inference_dropout_is_removed(tmp_path):
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Dropout", ["r"], ["d"]),
             helper.make_node("Dropout", ["d", "ratio"], ["y", "mask"])]
    model = _model(nodes, [_vi("x", [2, 3])], [_vi("y", [2, 3])], [_const("ratio", np.array(0.3, np.float32))])
    result, path = _compile(tmp_path, model)
    assert [n.op for n in result.graph.nodes] == ["Relu"]
    _matches(tmp_path, path, {"x": RNG.standard_normal((2, 3)).astype(np.float32)})
