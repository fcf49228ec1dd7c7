"""Small hand-built ONNX graphs for the cost-model and profile tests (onnx.helper, no torch)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

FLOAT = {np.float32: TensorProto.FLOAT, np.float16: TensorProto.FLOAT16}


def _model(nodes, inputs, outputs, inits, opset=23, functions=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    imports = [helper.make_opsetid("", opset)]
    if any(n.domain == "edgefc" for n in nodes):
        imports.append(helper.make_opsetid("edgefc", 1))
    return helper.make_model(graph, opset_imports=imports, functions=list(functions))


def matmul_model(m: int, k: int, n: int, dtype=np.float32) -> onnx.ModelProto:
    """x[1,m,k] @ w[k,n] -> y[1,m,n]: one tensor-engine op."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((k, n)).astype(dtype), "w")
    t = FLOAT[dtype]
    return _model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
                  [helper.make_tensor_value_info("x", t, [1, m, k])],
                  [helper.make_tensor_value_info("y", t, [1, m, n])], [w])


def softmax_model(rows: int, cols: int, dtype=np.float32) -> onnx.ModelProto:
    t = FLOAT[dtype]
    return _model([helper.make_node("Softmax", ["x"], ["y"], name="sm", axis=-1)],
                  [helper.make_tensor_value_info("x", t, [1, rows, cols])],
                  [helper.make_tensor_value_info("y", t, [1, rows, cols])], [])


def chain_model(elements: int, length: int = 3, dtype=np.float32, skip: bool = True, last: str = "Relu") -> onnx.ModelProto:
    """x -> Relu -> ... (``length`` ops, the last one ``last``) -> [Add with the first result] -> y.

    With ``skip`` the first result stays live across the chain (two uses); without, every result
    has one use, by the next op."""
    t = FLOAT[dtype]
    nodes, prev, inits = [], "x", []
    for i in range(length):
        op = last if i == length - 1 else "Relu"
        ins = [prev]
        if op == "LayerNormalization":
            inits.append(numpy_helper.from_array(np.ones(elements, dtype), "ln_scale"))
            ins.append("ln_scale")
        nodes.append(helper.make_node(op, ins, [f"r{i}"], name=f"op{i}"))
        prev = f"r{i}"
    if skip:
        nodes.append(helper.make_node("Add", ["r0", prev], ["y"], name="add"))
    else:
        nodes[-1].output[0] = "y"
    return _model(nodes, [helper.make_tensor_value_info("x", t, [1, elements])],
                  [helper.make_tensor_value_info("y", t, [1, elements])], inits)


def conv_model(cin: int, cout: int, hw: int, k: int = 3, dtype=np.float32, qdq: bool = False) -> onnx.ModelProto:
    """One Conv (with bias). ``qdq``: int8 per-channel weights through DequantizeLinear and an int16
    QuantizeLinear/DequantizeLinear pair on the input and the output (what quantize emits)."""
    rng = np.random.default_rng(0)
    t = FLOAT[dtype]
    wf = rng.standard_normal((cout, cin, k, k)).astype(dtype)
    b = numpy_helper.from_array(rng.standard_normal(cout).astype(dtype), "b")
    inputs = [helper.make_tensor_value_info("x", t, [1, cin, hw, hw])]
    outputs = [helper.make_tensor_value_info("y", t, [1, cout, hw, hw])]
    if not qdq:
        w = numpy_helper.from_array(wf, "w")
        nodes = [helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", pads=[k // 2] * 4)]
        return _model(nodes, inputs, outputs, [w, b])
    scale_w = np.abs(wf).reshape(cout, -1).max(1).astype(dtype) / 127
    wq = numpy_helper.from_array(np.round(wf / scale_w[:, None, None, None]).astype(np.int8), "wq")
    inits = [wq, b, numpy_helper.from_array(scale_w, "sw"), numpy_helper.from_array(np.zeros(cout, np.int8), "zw"),
             numpy_helper.from_array(np.array(0.01, dtype), "sa"), numpy_helper.from_array(np.array(0, np.int16), "za")]
    nodes = [helper.make_node("DequantizeLinear", ["wq", "sw", "zw"], ["w"], name="dqw", axis=0),
             helper.make_node("QuantizeLinear", ["x", "sa", "za"], ["xq"], name="qx"),
             helper.make_node("DequantizeLinear", ["xq", "sa", "za"], ["xd"], name="dqx"),
             helper.make_node("Conv", ["xd", "w", "b"], ["c"], name="conv", pads=[k // 2] * 4),
             helper.make_node("QuantizeLinear", ["c", "sa", "za"], ["cq"], name="qc"),
             helper.make_node("DequantizeLinear", ["cq", "sa", "za"], ["y"], name="dqc")]
    return _model(nodes, inputs, outputs, inits)


def attention_model(seq: int = 256, heads: int = 4, head_dim: int = 40, kv_seq: int | None = None,
                    dtype=np.float32, tiling: tuple[int, int] | None = None, causal: bool = False,
                    mask: bool = False) -> onnx.ModelProto:
    """x[1,seq,C] -> Q/K/V projections -> Attention-23 (3D form; or edgefc TiledAttention with
    ``tiling=(row_tiles, head_tiles)``) -> out projection -> y. The attention node is named "attn"."""
    rng = np.random.default_rng(0)
    t = FLOAT[dtype]
    c = heads * head_dim
    kv_seq = kv_seq or seq
    inits = [numpy_helper.from_array((rng.standard_normal((c, c)) / np.sqrt(c)).astype(dtype), n)
             for n in ("wq", "wk", "wv", "wo")]
    nodes = [helper.make_node("MatMul", ["x", "wq"], ["q"], name="to_q"),
             helper.make_node("MatMul", ["ctx", "wk"], ["k"], name="to_k"),
             helper.make_node("MatMul", ["ctx", "wv"], ["v"], name="to_v")]
    attrs = {"q_num_heads": heads, "kv_num_heads": heads, "scale": float(head_dim) ** -0.5, "is_causal": int(causal)}
    if mask:
        inits.append(numpy_helper.from_array(np.zeros((seq, kv_seq), dtype), "mask_c"))
        nodes.append(helper.make_node("Add", ["mask_c", "zero_bias"], ["mask"], name="mask_op"))
        inputs_extra = [helper.make_tensor_value_info("zero_bias", t, [seq, kv_seq])]
    else:
        inputs_extra = []
    if tiling is None:
        nodes.append(helper.make_node("Attention", ["q", "k", "v"] + (["mask"] if mask else []), ["a"], name="attn",
                                      **attrs))
    else:
        nodes.append(helper.make_node("TiledAttention", ["q", "k", "v"], ["a"], name="attn", domain="edgefc",
                                      row_tiles=tiling[0], head_tiles=tiling[1], **attrs))
    nodes.append(helper.make_node("MatMul", ["a", "wo"], ["y"], name="to_out"))
    inputs = [helper.make_tensor_value_info("x", t, [1, seq, c]), helper.make_tensor_value_info("ctx", t, [1, kv_seq, c])]
    if kv_seq == seq:
        nodes = [helper.make_node("Identity", ["x"], ["ctx"], name="self"), *nodes]
        inputs = inputs[:1]
    inputs += inputs_extra
    value_info = {"q": [1, seq, c], "k": [1, kv_seq, c], "v": [1, kv_seq, c], "a": [1, seq, c]}
    model = _model(nodes, inputs, [helper.make_tensor_value_info("y", t, [1, seq, c])], inits)
    model.graph.value_info.extend(helper.make_tensor_value_info(n, t, s) for n, s in value_info.items())
    return model
