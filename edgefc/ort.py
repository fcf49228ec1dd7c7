"""Running graphs in onnxruntime: the reference every pass is checked against.

``session(model)`` works for models of any size (over 2 GB they go through a temporary file with
external data); ``random_inputs`` makes the seeded inputs that ``--verify`` and the differential
tests feed to both the original and the transformed model.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort

from edgefc import ir


def session(model: onnx.ModelProto | gs.Graph | str | os.PathLike, threads: int | None = None) -> ort.InferenceSession:
    """An onnxruntime CPU session for a model proto, a graph or a file path (no graph optimisation,
    so what runs is the graph as written)."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    if isinstance(model, (str, os.PathLike)):
        return ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
    if isinstance(model, gs.Graph):
        model = ir.to_model(model)
    if ir.weight_bytes(model) < ir.EXTERNAL_DATA_THRESHOLD:
        return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    with tempfile.TemporaryDirectory(prefix="edgefc-ort-") as tmp:
        path = Path(tmp) / "model.onnx"
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        ir.save_model(copy, path)
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def input_specs(model: onnx.ModelProto | gs.Graph) -> list[tuple[str, tuple[int, ...], np.dtype]]:
    """(name, static shape, numpy dtype) of each real graph input (initializers excluded)."""
    if isinstance(model, gs.Graph):
        return [(t.name, ir.static_shape(t), np.dtype(t.dtype)) for t in model.inputs]
    init = {t.name for t in model.graph.initializer}
    specs = []
    for i in model.graph.input:
        if i.name in init:
            continue
        tt = i.type.tensor_type
        shape = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim)
        specs.append((i.name, shape, np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type))))
    return specs


def random_inputs(model: onnx.ModelProto | gs.Graph, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded random inputs: standard normal floats, integers in [0, 1000) (timesteps, token ids)."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for name, shape, dtype in input_specs(model):
        if shape is None or any(d < 0 for d in shape):
            raise ValueError(f"input '{name}' has no static shape")
        if np.issubdtype(dtype, np.integer):
            feeds[name] = rng.integers(0, 1000, size=shape).astype(dtype)
        elif dtype == np.bool_:
            feeds[name] = np.ones(shape, dtype=bool)
        else:
            feeds[name] = rng.standard_normal(shape).astype(dtype)
    return feeds


def run(model, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run ``model`` (proto, graph, path or session) on ``feeds``; outputs by name."""
    sess = model if isinstance(model, ort.InferenceSession) else session(model)
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds)))


def compare(reference: dict[str, np.ndarray], actual: dict[str, np.ndarray]) -> tuple[float, float, str]:
    """Worst (max abs error, relative error, output name) over the outputs both dicts share.

    Relative error is max|a - r| / max|r|: relative to the output's scale, so elements near zero
    do not dominate it.
    """
    worst = (0.0, 0.0, "")
    for name, ref in reference.items():
        if name not in actual:
            continue
        ref64 = np.asarray(ref, dtype=np.float64)
        diff = float(np.max(np.abs(np.asarray(actual[name], dtype=np.float64) - ref64))) if ref.size else 0.0
        scale = float(np.max(np.abs(ref64))) if ref.size else 0.0
        rel = diff / scale if scale > 0 else diff
        if rel > worst[1] or (rel == worst[1] and diff > worst[0]):
            worst = (diff, rel, name)
    return worst
