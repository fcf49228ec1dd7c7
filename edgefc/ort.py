"""Running graphs in onnxruntime: the reference every pass is checked against.

``session(model)`` is the one onnxruntime session factory of edgefc (models of any size: over 2 GB
they go through a temporary file with external data); ``random_inputs`` makes the seeded inputs
that ``--verify`` and the differential tests feed to both the original and the transformed model;
``compare`` is the strict comparator every check uses (same outputs, shapes, dtypes and
non-finite values, then the relative error).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort

from edgefc import ir
from edgefc.model_inputs import input_specs, random_input
from edgefc.staging import temp_dir


def session_options(*, threads: int | None = None, optimize: bool = False, arena: bool = True) -> ort.SessionOptions:
    """onnxruntime options every edgefc session uses: warnings off, graph optimisation off unless
    ``optimize`` (what runs is the graph as written), ``threads`` intra-op threads, and the
    memory arena off with ``arena=False`` (one large run at a time gives its memory back)."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                     else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    if not arena:
        opts.enable_cpu_mem_arena = False
    return opts


def session(model: onnx.ModelProto | gs.Graph | str | os.PathLike, threads: int | None = None, *,
            optimize: bool = False, arena: bool = True) -> ort.InferenceSession:
    """The one way edgefc opens an onnxruntime CPU session, for a model proto, a graph or a file
    path (options: :func:`session_options`). Models over 2 GB go through a temporary file with
    external data."""
    opts = session_options(threads=threads, optimize=optimize, arena=arena)
    providers = ["CPUExecutionProvider"]
    if isinstance(model, (str, os.PathLike)):
        return ort.InferenceSession(str(model), opts, providers=providers)
    if isinstance(model, gs.Graph):
        model = ir.to_model(model)
    if ir.weight_bytes(model) < ir.EXTERNAL_DATA_THRESHOLD:
        return ort.InferenceSession(model.SerializeToString(), opts, providers=providers)
    with temp_dir("ort") as tmp:  # edgefc-ort-PID-*: removed by a later run if this one is killed
        path = Path(tmp) / "model.onnx"
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        ir.save_model(copy, path)
        return ort.InferenceSession(str(path), opts, providers=providers)


def random_inputs(model: onnx.ModelProto | gs.Graph, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded random inputs: standard normal floats, integers in [0, 1000) (timesteps, token ids)."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in input_specs(model):
        if not spec.static:
            raise ValueError(f"input '{spec.name}' has no static shape")
        feeds[spec.name] = random_input(spec, rng)
    return feeds


def run(model, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run ``model`` (proto, graph, path or session) on ``feeds``; outputs by name."""
    sess = model if isinstance(model, ort.InferenceSession) else session(model)
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds)))


class Difference(NamedTuple):
    """How far ``actual`` is from ``reference`` (:func:`compare`).

    ``rel_error`` is the worst over the outputs of max|a - r| / max|r|, both over the finite
    reference elements (relative to the output's scale, so elements near zero do not dominate
    it; an all-zero reference gives the absolute error); ``output`` names that output. Where the
    two cannot be compared element by element (a missing or extra output, another shape or
    dtype, a NaN or inf that the other side does not have at the same position) ``reason`` says
    so in one sentence naming the output and position, and both errors are ``inf``.
    """

    abs_error: float
    rel_error: float
    output: str
    reason: str = ""

    def within(self, tolerance: float) -> bool:
        return not self.reason and self.rel_error <= tolerance

    def describe(self) -> str:
        """One phrase: the structural reason, or the worst output and its errors."""
        if self.reason:
            return self.reason
        return f"output '{self.output}': max abs error {self.abs_error:.3g}, max rel error {self.rel_error:.3g}"


def _position(index: tuple, shape: tuple) -> str:
    return f"position {tuple(int(i) for i in index)}" if shape else "the scalar"


def _fmt(shape) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")" if len(shape) != 1 else f"({shape[0]},)"


def _nonfinite_mismatch(name: str, ref: np.ndarray, act: np.ndarray) -> str:
    """Why the non-finite values of ``act`` and ``ref`` differ (NaN for NaN, inf for same-signed
    inf, position by position), or ""."""
    if not (np.issubdtype(ref.dtype, np.floating) or np.issubdtype(ref.dtype, np.complexfloating)):
        return ""
    r_nan, a_nan = np.isnan(ref), np.isnan(act)
    r_inf, a_inf = np.isinf(ref), np.isinf(act)
    bad = (r_nan != a_nan) | (r_inf != a_inf) | (r_inf & a_inf & (np.sign(ref) != np.sign(act)))
    if not bad.any():
        return ""
    at = tuple(np.argwhere(bad)[0])
    return (f"output '{name}' is {act[at]} at {_position(at, ref.shape)} where the reference is {ref[at]} "
            f"({int(bad.sum())} such element{'s' if bad.sum() != 1 else ''})")


def compare(reference: dict[str, np.ndarray], actual: dict[str, np.ndarray]) -> Difference:
    """Strictly compare two sets of outputs by name (the check behind ``--verify``, ``edgefc run
    --check`` and the differential tests).

    Both must have the same output names, each output the same shape (no broadcasting) and dtype,
    and the same non-finite values at the same positions; otherwise the :class:`Difference` has a
    ``reason`` and infinite error. Then the error is relative to each output's scale over its
    finite elements (see :class:`Difference`); the worst output is reported.
    """
    missing = [n for n in reference if n not in actual]
    extra = [n for n in actual if n not in reference]
    if missing or extra:
        why = (f"output '{missing[0]}' is missing" if missing else f"output '{extra[0]}' is not in the reference")
        return Difference(math.inf, math.inf, (missing or extra)[0],
                          f"{why} (reference outputs: {', '.join(reference) or 'none'}; got: {', '.join(actual) or 'none'})")
    worst = Difference(0.0, 0.0, "")
    for name, ref in reference.items():
        ref, act = np.asarray(ref), np.asarray(actual[name])
        if ref.shape != act.shape:
            return Difference(math.inf, math.inf, name, f"output '{name}' has shape {_fmt(act.shape)}, the reference {_fmt(ref.shape)}")
        if ref.dtype != act.dtype:
            return Difference(math.inf, math.inf, name, f"output '{name}' has dtype {act.dtype}, the reference {ref.dtype}")
        if ref.dtype.kind in "OSUV":  # strings, bytes, objects: equal or not
            if not np.array_equal(ref, act):
                at = tuple(np.argwhere(ref != act)[0]) if ref.shape else ()
                return Difference(math.inf, math.inf, name, f"output '{name}' differs at {_position(at, ref.shape)}: "
                                                            f"{act[at]!r} where the reference has {ref[at]!r}")
            continue
        why = _nonfinite_mismatch(name, ref, act)
        if why:
            return Difference(math.inf, math.inf, name, why)
        if not ref.size:
            continue
        finite = np.isfinite(ref) if ref.dtype.kind in "fc" else np.ones(ref.shape, bool)
        if not finite.any():
            continue
        r64 = ref[finite].astype(np.complex128 if ref.dtype.kind == "c" else np.float64)
        a64 = act[finite].astype(r64.dtype)
        diff = float(np.max(np.abs(a64 - r64)))
        scale = float(np.max(np.abs(r64)))
        rel = diff / scale if scale > 0 else diff
        if rel > worst.rel_error or (rel == worst.rel_error and diff > worst.abs_error) or not worst.output:
            worst = Difference(diff, rel, name)
    return worst


def check(reference: dict[str, np.ndarray], actual: dict[str, np.ndarray], tolerance: float = 0.0) -> Difference:
    """:func:`compare`, raising ``AssertionError`` with the reason unless within ``tolerance``
    (for tests)."""
    d = compare(reference, actual)
    if not d.within(tolerance):
        raise AssertionError(f"{d.describe()} (tolerance {tolerance:g})")
    return d
