"""Small hand-built ONNX models for core tests (no torch needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def mlp_model(dynamic_batch: bool = False, with_noops: bool = True) -> onnx.ModelProto:
    """x[B,8] -> MatMul -> Add -> Identity -> Cast(float) -> Relu -> Reshape(same shape) -> y."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((8, 16)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.standard_normal(16).astype(np.float32), "b")
    shape = numpy_helper.from_array(np.array([-1, 16], dtype=np.int64), "shape")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["mm"]), helper.make_node("Add", ["mm", "b"], ["biased"])]
    last = "biased"
    if with_noops:
        nodes += [helper.make_node("Identity", ["biased"], ["ident"]),
                  helper.make_node("Cast", ["ident"], ["cast"], to=TensorProto.FLOAT)]
        last = "cast"
    nodes += [helper.make_node("Relu", [last], ["relu"]), helper.make_node("Reshape", ["relu", "shape"], ["y"])]
    batch = "batch" if dynamic_batch else 2
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 16])], [w, b, shape])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def save_with_external_data(model: onnx.ModelProto, path: Path, location: str = "weights.bin") -> Path:
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=location, size_threshold=64)
    return path


def save_with_escaping_external_data(folder: Path) -> Path:
    """A model in ``folder`` whose external data location is ``../escape.bin`` (the data exists there)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = save_with_external_data(mlp_model(), folder / "m.onnx", location="escape.bin")
    (folder / "escape.bin").rename(folder.parent / "escape.bin")
    model = onnx.load(str(path), load_external_data=False)
    for t in model.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "../escape.bin"
    onnx.save_model(model, str(path))
    return path


def layer_chain(layers: int, width: int = 32, seed: int = 0) -> onnx.ModelProto:
    """x[1,width] -> ``layers`` MatMuls (random weights, unit gain) -> y: a cheap stand-in for a
    network where a test needs many quantizable layers but not a U-Net. Node names carry a module
    path (``/net/layers.3/fc/MatMul``) as exported models' do."""
    rng = np.random.default_rng(seed)
    inits, nodes, prev = [], [], "x"
    for i in range(layers):
        w = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        out = "y" if i == layers - 1 else f"h{i}"
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [out], name=f"/net/layers.{i}/fc/MatMul"))
        prev = out
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, width])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, width])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
