"""Calibration statistics streamed through onnxruntime (pass ``quantize``, paper Sec. 4.2).

Nothing holds every activation of a model at once. :func:`collect_stats` adds reductions
(ReduceMin/ReduceMax per tensor, ReduceMean per channel for bias correction) to the graph, so
onnxruntime returns a few scalars per tensor and frees each activation as usual: one forward pass
per sample, memory of a plain inference. :func:`collect_domain_stats` runs the subgraph of one
enumerable input (the U-Net's timestep) over its whole domain. :func:`collect_histograms`
(percentile and MSE methods) needs the values: it runs the model with a chunk of tensors as extra
outputs (at most ``chunk_bytes`` per run), updates one
:class:`~edgefc.passes.observers.HistogramObserver` per tensor, frees the chunk and moves on.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper
from tqdm import tqdm

from edgefc.errors import QuantizationError
from edgefc.memory import release_memory
from edgefc.passes.disk_model import DiskModel
from edgefc.passes.observers import HistogramObserver


def progress_bar(iterable, desc: str, total: int | None = None, enabled: bool = True):
    """``iterable`` with progress on stderr when ``enabled``: a bar on a terminal; in a log or a
    pipe, where a bar's carriage returns pile up, one flushed line per item (for long loops: every
    tenth of the way or 30 s) with the time so far."""
    if not enabled:
        return iterable
    if sys.stderr.isatty():
        return tqdm(iterable, desc=desc, total=total, file=sys.stderr, leave=False, dynamic_ncols=True)
    return _progress_lines(iterable, desc, total)


def _progress_lines(iterable, desc: str, total: int | None):
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    start = last = time.perf_counter()
    every = max(1, total // 10) if total and total > 50 else (1 if total else None)
    i = 0
    for i, item in enumerate(iterable, 1):
        yield item
        now = time.perf_counter()
        if (every and i % every == 0) or i == total or now - last >= 30:
            of = f"/{total}" if total else ""
            print(f"  {desc}: {i}{of} done, {now - start:.1f} s", file=sys.stderr, flush=True)
            last = now
    if not total and i:
        print(f"  {desc}: {i} done, {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)


def run_session(sess, names: list[str], feeds: dict, what: str = "calibration") -> list:
    """``sess.run`` with onnxruntime's failure as one line (:class:`~edgefc.errors.QuantizationError`):
    generated inputs can be out of a model's domain (an index past a table, a shape input)."""
    try:
        return sess.run(names, feeds)
    except Exception as e:  # onnxruntime's own exception types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise QuantizationError(f"onnxruntime failed running the model on a {what} input ({first[:300]}); give "
                                "inputs from the model's own domain (--calib / --eval FILE.npz), or compile with --precision "
                                "fp32") from None


@dataclass
class TensorStats:
    lo: dict[str, float] = field(default_factory=dict)
    hi: dict[str, float] = field(default_factory=dict)
    means: dict[str, np.ndarray] = field(default_factory=dict)
    runs: int = 0
    seconds: float = 0.0


def _reduce_nodes(tensors, means: dict[str, tuple[int, ...]]):
    """ReduceMin/ReduceMax (whole tensor) and ReduceMean (over ``axes``) nodes and their outputs."""
    nodes, outputs, inits = [], [], []
    for i, t in enumerate(tensors):
        for op, key in (("ReduceMin", "min"), ("ReduceMax", "max")):
            out = f"{t}::{key}"
            nodes.append(helper.make_node(op, [t], [out], name=f"__calib/{key}/{i}", keepdims=0))
            outputs.append(out)
    for j, (t, axes) in enumerate(means.items()):
        ax = f"__calib/axes/{j}"
        inits.append(numpy_helper.from_array(np.asarray(axes, dtype=np.int64), ax))
        out = f"{t}::mean"
        nodes.append(helper.make_node("ReduceMean", [t, ax], [out], name=f"__calib/mean/{j}", keepdims=0))
        outputs.append(out)
    return nodes, outputs, inits


def collect_stats(model: DiskModel, samples: list[dict], tensors: list[str],
                  means: dict[str, tuple[int, ...]] | None = None, progress: bool = True) -> TensorStats:
    """Min/max of ``tensors`` and per-channel means (``means``: tensor -> axes to average over)
    over ``samples``, computed inside onnxruntime (one run per sample; only scalars and channel
    vectors come back)."""
    start = time.perf_counter()
    means = dict(means or {})
    stats = TensorStats()
    if not tensors and not means:   # a plan that stores nothing as an integer: nothing to run
        return stats
    nodes, outputs, inits = _reduce_nodes(tensors, means)
    path = model.variant("calib-stats", nodes, outputs, inits, keep_outputs=False)
    sess = model.session(path)
    names = [o.name for o in sess.get_outputs()]
    for feeds in progress_bar(samples, "calibrating", len(samples), progress):
        values = dict(zip(names, run_session(sess, names, feeds)))
        for t in tensors:
            lo, hi = float(values[f"{t}::min"]), float(values[f"{t}::max"])
            stats.lo[t] = min(stats.lo.get(t, math.inf), lo)
            stats.hi[t] = max(stats.hi.get(t, -math.inf), hi)
        for t in means:
            m = np.asarray(values[f"{t}::mean"], dtype=np.float64)
            stats.means[t] = stats.means.get(t, 0.0) + m / len(samples)
        del values
        stats.runs += 1
    del sess
    release_memory()
    stats.seconds = time.perf_counter() - start
    return stats


def collect_domain_stats(model: DiskModel, input_name: str, values, tensors: list[str],
                         progress: bool = True) -> TensorStats:
    """Exact min/max of ``tensors`` that depend only on the input ``input_name`` (and constants),
    over every value of its domain (``values``): the subgraph computing them is cut out and run
    once per value. For the U-Net's timestep (0..999) this is the time-embedding path, whose
    ranges a handful of calibration timesteps cannot cover."""
    start = time.perf_counter()
    g = model.proto.graph
    inputs = {i.name: i for i in g.input}
    known = {input_name} | set(model.initializers)
    picked = []
    for node in g.node:  # the skeleton is in topological order
        if node.input and all((not x) or x in known for x in node.input) and any(x == input_name or x in known - set(model.initializers) for x in node.input if x):
            picked.append(node)
            known.update(o for o in node.output if o)
    wanted = [t for t in tensors if t in known and t != input_name]
    stats = TensorStats()
    if not wanted:
        return stats
    sub = onnx.ModelProto()
    sub.CopyFrom(model.proto)
    del sub.graph.node[:], sub.graph.input[:], sub.graph.output[:], sub.graph.value_info[:], sub.graph.initializer[:]
    sub.graph.node.extend(picked)
    sub.graph.input.append(inputs[input_name])
    used = {x for n in picked for x in n.input}
    sub.graph.initializer.extend(t for name, t in model.initializers.items() if name in used)
    nodes, outputs, inits = _reduce_nodes(wanted, {})
    sub.graph.node.extend(nodes)
    sub.graph.initializer.extend(inits)
    for o in outputs:
        sub.graph.output.append(onnx.ValueInfoProto(name=o))
    path = model.folder / f"domain-{input_name}.onnx"
    onnx.save_model(sub, str(path))
    sess = model.session(path)
    tt = inputs[input_name].type.tensor_type
    shape = [d.dim_value for d in tt.shape.dim]
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
    for v in progress_bar(list(values), f"calibrating ({input_name} domain)", None, progress):
        vals = dict(zip(outputs, run_session(sess, outputs, {input_name: np.full(shape, v, dtype=dtype)})))
        for t in wanted:
            stats.lo[t] = min(stats.lo.get(t, math.inf), float(vals[f"{t}::min"]))
            stats.hi[t] = max(stats.hi.get(t, -math.inf), float(vals[f"{t}::max"]))
        stats.runs += 1
    del sess
    stats.seconds = time.perf_counter() - start
    return stats


def chunks_by_bytes(tensors: list[str], sizes: dict[str, int], chunk_bytes: int) -> list[list[str]]:
    """Split ``tensors`` (in order) into runs of at most ``chunk_bytes`` (one tensor at least)."""
    out, cur, used = [], [], 0
    for t in tensors:
        b = sizes.get(t, 4)
        if cur and used + b > chunk_bytes:
            out.append(cur)
            cur, used = [], 0
        cur.append(t)
        used += b
    if cur:
        out.append(cur)
    return out


def collect_histograms(model: DiskModel, samples: list[dict], tensors: list[str], ranges: dict[str, tuple[float, float]],
                       sizes: dict[str, int], *, symmetric: bool, chunk_bytes: int = 512 << 20, bins: int = 4096,
                       progress: bool = True, observe=None) -> dict[str, HistogramObserver]:
    """Histograms of ``tensors`` over ``samples``, streamed: each onnxruntime run returns one
    chunk of tensors (at most ``chunk_bytes``), whose values update the observers and are freed.
    ``observe(chunk_arrays)`` (tests) sees each chunk as it arrives."""
    observers = {t: HistogramObserver(*ranges[t], symmetric=symmetric, bins=bins) for t in tensors}
    chunks = chunks_by_bytes(tensors, sizes, chunk_bytes)
    bar = progress_bar(range(len(chunks) * len(samples)), "calibrating (histograms)", len(chunks) * len(samples), progress)
    it = iter(bar)
    for ci, chunk in enumerate(chunks):
        path = model.variant(f"calib-chunk{ci}", outputs=chunk, keep_outputs=False)
        sess = model.session(path)
        for feeds in samples:
            arrays = run_session(sess, chunk, feeds)
            if observe is not None:
                observe(dict(zip(chunk, arrays)))
            for t, a in zip(chunk, arrays):
                observers[t].update(a)
            del arrays
            next(it, None)
        del sess
        os.remove(path)
    return observers
