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


def attention_blocks(blocks: int = 3, seq: int = 64, channels: int = 64, heads: int = 2, seed: int = 0) -> onnx.ModelProto:
    """x[1,seq,C] -> ``blocks`` x (feed-forward MatMul -> Relu -> self-attention: Q/K/V MatMuls,
    Attention-23, output MatMul, residual Add) -> y. Node names carry module paths
    (``/net/blocks.1/attn/to_q/MatMul``) as exported models' do: a small stand-in for a U-Net where a
    test needs layer groups and attention blocks (``--precision search``)."""
    rng = np.random.default_rng(seed)
    t = TensorProto.FLOAT
    inits, nodes, prev = [], [], "x"

    def weight(name):
        inits.append(numpy_helper.from_array((rng.standard_normal((channels, channels)) / np.sqrt(channels))
                                             .astype(np.float32), name))
        return name

    for b in range(blocks):
        p = f"/net/blocks.{b}"
        nodes.append(helper.make_node("MatMul", [prev, weight(f"ff{b}")], [f"ff{b}_o"], name=f"{p}/ff/MatMul"))
        nodes.append(helper.make_node("Relu", [f"ff{b}_o"], [f"h{b}"], name=f"{p}/ff/Relu"))
        for k in ("q", "k", "v"):
            nodes.append(helper.make_node("MatMul", [f"h{b}", weight(f"w{k}{b}")], [f"{k}{b}"], name=f"{p}/attn/to_{k}/MatMul"))
        nodes.append(helper.make_node("Attention", [f"q{b}", f"k{b}", f"v{b}"], [f"a{b}"], name=f"{p}/attn/Attention",
                                      q_num_heads=heads, kv_num_heads=heads, scale=float(channels // heads) ** -0.5))
        nodes.append(helper.make_node("MatMul", [f"a{b}", weight(f"wo{b}")], [f"o{b}"], name=f"{p}/attn/to_out/MatMul"))
        out = "y" if b == blocks - 1 else f"r{b}"
        nodes.append(helper.make_node("Add", [f"h{b}", f"o{b}"], [out], name=f"{p}/Add"))
        prev = out
    graph = helper.make_graph(nodes, "blocks", [helper.make_tensor_value_info("x", t, [1, seq, channels])],
                              [helper.make_tensor_value_info("y", t, [1, seq, channels])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
