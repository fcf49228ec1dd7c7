"""Calibration for pass ``quantize``: data, streaming statistics, range observers (paper Sec. 4.2).

Data
    :func:`generate` makes seeded inputs per component: U-Net - standard-normal latents, timesteps
    stratified over [0, 999] with both ends included (the time embedding's range must be seen:
    see ``periodic-arguments`` in :mod:`edgefc.passes.quant_policy`), and a text-embedding-like
    context (:func:`clip_like_context`); text encoder - CLIP token ids (BOS, random tokens, EOS,
    EOS padding); VAE decoder - latents as diffusers' ``decode`` receives them (standard normal
    divided by the SD scaling factor 0.18215). Held-out inputs for the SQNR come from the same
    generators with another seed (:data:`HELDOUT_SEED`). :func:`load_npz` reads ``--calib FILE.npz``
    (one array per model input, named like it, with an optional leading sample axis).

Streaming
    Nothing holds every activation of a model at once. :class:`DiskModel` writes a graph once to
    a temporary folder with its weights as external data (models over 2 GB work; Python keeps
    only the weight-free skeleton) and makes variants that share the weights file.
    :func:`collect_stats` adds reductions (ReduceMin/ReduceMax per tensor, ReduceMean per channel
    for bias correction) to the graph, so onnxruntime returns a few scalars per tensor and frees
    each activation as usual: one forward pass per sample, memory of a plain inference.
    :func:`collect_histograms` (percentile and MSE methods) needs the values: it runs the model
    with a chunk of tensors as extra outputs (at most ``chunk_bytes`` per run), updates one
    :class:`HistogramObserver` per tensor, frees the chunk and moves on; observers hold only
    their histograms.

Observers
    ``minmax``: the running min and max. ``percentile``: the range that keeps ``percentile`` % of
    the values (of |x| for a symmetric range). ``mse``: the clipping threshold that minimises the
    expected squared error of INT16 quantization (clipping error + rounding noise step^2/12),
    evaluated on the histogram.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
from onnx import helper, numpy_helper

from edgefc import ir
from edgefc import ort as edgefc_ort
from edgefc.components import detect_component  # noqa: F401  (re-exported for callers)
from edgefc.errors import QuantizationError

CALIB_SEED = 1234
HELDOUT_SEED = 98765
METHODS = ("minmax", "percentile", "mse")
VAE_SCALING = 0.18215
#: CLIP's special tokens (SD v1 tokenizer); a smaller vocabulary uses its last two ids.
CLIP_BOS, CLIP_EOS = 49406, 49407

#: default calibration / held-out sample counts per component (chosen for a few minutes on two
#: cores at full size: one U-Net forward is ~3 s, one 512x512 VAE decoder forward ~40-80 s).
DEFAULT_CALIB_SAMPLES = {"unet": 8, "text-encoder": 8, "vae-decoder": 1, None: 4}
DEFAULT_EVAL_SAMPLES = {"unet": 8, "text-encoder": 8, "vae-decoder": 2, None: 4}


def enumerable_input(graph: gs.Graph, component: str | None) -> tuple[str, list[int]] | None:
    """An input whose whole domain can be enumerated for calibration: the U-Net's one-element
    ``timestep`` (diffusion steps 0..999)."""
    if component != "unet":
        return None
    for t in graph.inputs:
        if t.name == "timestep" and t.shape is not None and int(np.prod(t.shape)) == 1:
            return t.name, list(range(1000))
    return None


def _progress(iterable, desc: str, total: int | None = None, enabled: bool = True):
    if not enabled:
        return iterable
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return iterable
    return tqdm(iterable, desc=desc, total=total, file=sys.stderr, leave=False, dynamic_ncols=True)


# --- data ---------------------------------------------------------------------------------------

@dataclass
class InputSpec:
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype


def input_specs(graph: gs.Graph) -> list[InputSpec]:
    specs = []
    for t in graph.inputs:
        shape = ir.static_shape(t)
        if shape is None:
            raise QuantizationError(f"input '{t.name}' has no static shape; run canonicalize (or give --shape) first")
        specs.append(InputSpec(t.name, shape, np.dtype(t.dtype)))
    return specs


def clip_like_context(rng: np.random.Generator, shape: tuple[int, ...], eos: int | None = None) -> np.ndarray:
    """A text-embedding-like context [B, 77, D] with CLIP-like statistics.

    CLIP's last hidden state is layer-normalised per token, with per-channel scales and offsets
    shared by every prompt, a few outlier channels, a begin-of-text row that is nearly the same for
    every prompt and larger than the rest, and padding rows after the end-of-text token that are
    near copies of one another. The model-level statistics (channel scales, offsets, outliers, the
    BOS row) come from a fixed seed so every sample shares them; the tokens vary with ``rng``.
    """
    *lead, length, dim = shape
    model = np.random.default_rng(7)
    scale = np.exp(0.25 * model.standard_normal(dim))
    offset = 0.3 * model.standard_normal(dim)
    outliers = model.choice(dim, size=min(2, dim), replace=False)
    scale[outliers] *= 8.0
    bos = 3.0 * model.standard_normal(dim)
    x = rng.standard_normal((*lead, length, dim)) * scale + offset
    x[..., 0, :] = bos + 0.05 * rng.standard_normal((*lead, dim))
    e = int(eos if eos is not None else rng.integers(5, max(6, length // 2)))
    if e + 1 < length:
        pad = x[..., e, :][..., None, :]
        x[..., e + 1:, :] = pad + 0.1 * scale * rng.standard_normal((*lead, length - e - 1, dim))
    return x.astype(np.float32)


def _vocab_size(graph: gs.Graph, input_name: str) -> int | None:
    """Rows of the embedding table that ``input_name`` indexes (first Gather reading it)."""
    frontier = [t for t in graph.inputs if t.name == input_name]
    seen = set()
    while frontier:
        t = frontier.pop()
        if t.name in seen:
            continue
        seen.add(t.name)
        for c in t.outputs:
            if c.op == "Gather" and len(c.inputs) > 1 and c.inputs[1] is t and isinstance(c.inputs[0], gs.Constant):
                return int(c.inputs[0].shape[0])
            if c.op in ("Cast", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity"):
                frontier.extend(c.outputs)
    return None


def token_ids(rng: np.random.Generator, shape: tuple[int, ...], vocab: int) -> np.ndarray:
    """CLIP-style ids: BOS, random tokens, EOS at a random position, EOS padding."""
    bos, eos = (CLIP_BOS, CLIP_EOS) if vocab > CLIP_EOS else (vocab - 2, vocab - 1)
    *lead, length = shape
    ids = rng.integers(0, min(bos, 49405), size=shape)
    end = int(rng.integers(2, max(3, length)))
    ids[..., 0] = bos
    ids[..., end:] = eos
    return ids


def timesteps_spanning(n: int, rng: np.random.Generator | None, low: int = 0, high: int = 999) -> list[int]:
    """``n`` timesteps covering [low, high]: both ends, and (with ``rng``) one random step in each
    of the ``n - 2`` equal strata between them, else evenly spaced."""
    if n <= 0:
        return []
    if n == 1:
        return [high]
    if rng is None:
        return [int(round(v)) for v in np.linspace(low, high, n)]
    edges = np.linspace(low, high, n - 1)
    inner = [int(rng.integers(math.ceil(edges[i]), max(math.ceil(edges[i]) + 1, int(edges[i + 1]))))
             for i in range(n - 2)]
    return [low, *inner, high]


def generate(graph: gs.Graph, component: str | None, n: int, seed: int, *, evenly: bool = False) -> tuple[list[dict], dict]:
    """``n`` seeded input dicts for ``component`` (or generic random inputs) and a description."""
    specs = input_specs(graph)
    rng = np.random.default_rng(seed)
    samples: list[dict] = [{} for _ in range(n)]
    info: dict = {"source": "generated", "seed": seed, "samples": n}
    steps = timesteps_spanning(n, None if evenly else rng) if component == "unet" else []
    vocab = None
    for s in specs:
        if component == "text-encoder" and s.name == "input_ids":
            vocab = _vocab_size(graph, s.name) or 49408
    for i in range(n):
        for s in specs:
            if component == "unet" and s.name == "timestep":
                samples[i][s.name] = np.full(s.shape, steps[i], dtype=s.dtype)
            elif component == "unet" and s.name == "encoder_hidden_states":
                samples[i][s.name] = clip_like_context(rng, s.shape).astype(s.dtype)
            elif component == "text-encoder" and s.name == "input_ids":
                samples[i][s.name] = token_ids(rng, s.shape, vocab).astype(s.dtype)
            elif component == "vae-decoder" and s.name == "latent_sample":
                samples[i][s.name] = (rng.standard_normal(s.shape) / VAE_SCALING).astype(s.dtype)
            elif np.issubdtype(s.dtype, np.integer):
                samples[i][s.name] = rng.integers(0, 1000, size=s.shape).astype(s.dtype)
            elif s.dtype == np.bool_:
                samples[i][s.name] = np.ones(s.shape, dtype=bool)
            else:
                samples[i][s.name] = rng.standard_normal(s.shape).astype(s.dtype)
    if steps:
        info["timesteps"] = steps
    return samples, info


def load_npz(path: str | os.PathLike, graph: gs.Graph, n: int | None = None) -> tuple[list[dict], dict]:
    """Calibration inputs from ``--calib FILE.npz``: one array per model input, named like the
    input, shaped like it or with a leading sample axis ([N, *shape]); every input needed."""
    path = Path(path)
    if not path.is_file():
        raise QuantizationError(f"calibration file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:  # zipfile / pickle / format errors: one sentence
        raise QuantizationError(f"{path} is not a readable .npz file ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    specs = input_specs(graph)
    names = [s.name for s in specs]
    missing = [s for s in names if s not in arrays]
    extra = [k for k in arrays if k not in names]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing)}")
        if extra:
            parts.append(f"unknown {', '.join(extra)}")
        raise QuantizationError(f"{path} does not match the model's inputs ({'; '.join(parts)}): "
                                f"it needs arrays named {', '.join(names)}")
    counts = {}
    for s in specs:
        a = arrays[s.name]
        if tuple(a.shape) == s.shape:
            a = a[None]
        if tuple(a.shape[1:]) != s.shape:
            raise QuantizationError(f"{path}: array '{s.name}' has shape {list(a.shape)}, the input needs "
                                    f"{list(s.shape)} or [N, {', '.join(map(str, s.shape))}]")
        if np.issubdtype(s.dtype, np.integer) != np.issubdtype(a.dtype, np.integer) or a.dtype == np.bool_ != (s.dtype == np.bool_):
            raise QuantizationError(f"{path}: array '{s.name}' is {a.dtype}, the input is {s.dtype}")
        arrays[s.name] = a.astype(s.dtype, copy=False)
        counts[s.name] = a.shape[0]
    if len(set(counts.values())) != 1:
        raise QuantizationError(f"{path}: the arrays hold different numbers of samples "
                                f"({', '.join(f'{k}: {v}' for k, v in counts.items())})")
    total = next(iter(counts.values()))
    if total == 0:
        raise QuantizationError(f"{path} holds no samples")
    use = total if n is None else min(n, total)
    samples = [{k: arrays[k][i] for k in names} for i in range(use)]
    return samples, {"source": str(path), "samples": use, "available": total}


# --- models on disk -----------------------------------------------------------------------------

def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc keeps them otherwise:
    after large weight arrays are freed, the process would stay at its peak size)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def session_options() -> ort.SessionOptions:
    """Calibration's sessions: the graph as written, no memory arena (one large run at a time
    gives its memory back between runs)."""
    return edgefc_ort.session_options(arena=False)


def order_probes(base: list, extra: list) -> list:
    """The node list of a probed model: ``base`` (topological order), each non-leaf ``extra``
    node right after the last producer of its inputs, then the extra leaves (the probes'
    reductions) in *reverse* order.

    onnxruntime's default execution order is a reverse depth-first search from the leaves, the
    highest node index first. With the first layer's probe last in the list, it is searched
    first: onnxruntime computes the model up to that layer, the probe, then the next layer ...,
    so each probed tensor is freed as soon as the model and its probe are done with it (probes
    searched the other way round would keep every probed tensor alive until the end: 5.5 GB
    instead of 1.8 GB for the 512x512 VAE decoder)."""
    pos = {}
    for i, n in enumerate(base):
        for o in n.output:
            pos[o] = i
    consumed = {x for n in extra for x in n.input if x}
    slots: dict[int, list] = {}
    leaves = []
    for n in extra:  # extra nodes come in their own topological order
        if not any(o in consumed for o in n.output):
            leaves.append(n)
            continue
        at = max((pos.get(x, -1) for x in n.input if x), default=-1)
        slots.setdefault(at, []).append(n)
        for o in n.output:
            pos[o] = at
    out = list(slots.get(-1, []))
    for i, n in enumerate(base):
        out.append(n)
        out.extend(slots.get(i, []))
    return out + leaves[::-1]


class DiskModel:
    """A graph written once (weights as external data in ``<folder>/<name>.data``); Python keeps
    the weight-free skeleton, from which variants with extra nodes/outputs are saved beside it and
    opened in onnxruntime, all sharing the one weights file."""

    def __init__(self, graph: gs.Graph, folder: str | os.PathLike, name: str):
        self.folder = Path(folder)
        self.name = name
        model = ir.to_model(graph)
        path = self.folder / f"{name}.onnx"
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=f"{name}.data", size_threshold=1024)
        del model  # its protobuf arena still holds the weights' bytes: read the skeleton back instead
        release_memory()
        model = onnx.load(str(path), load_external_data=False)
        self.proto = model
        self.path = path
        self.initializers = {t.name: t for t in model.graph.initializer}
        self.producers = {o: n for n in model.graph.node for o in n.output}
        self.value_types = {}
        for vi in list(model.graph.input) + list(model.graph.output) + list(model.graph.value_info):
            self.value_types[vi.name] = vi.type.tensor_type.elem_type
        self.output_names = [o.name for o in model.graph.output]
        self.input_names = [i.name for i in model.graph.input if i.name not in self.initializers]

    def variant(self, name: str, nodes=(), outputs=(), initializers=(), keep_outputs: bool = True) -> Path:
        """Save a copy with extra ``nodes``, graph ``outputs`` (names) and ``initializers``."""
        m = onnx.ModelProto()
        m.CopyFrom(self.proto)
        ordered = order_probes(list(m.graph.node), list(nodes))
        del m.graph.node[:]
        m.graph.node.extend(ordered)
        m.graph.initializer.extend(initializers)
        if not keep_outputs:
            del m.graph.output[:]
        have = {o.name for o in m.graph.output}
        for o in outputs:
            if o not in have:
                m.graph.output.append(onnx.ValueInfoProto(name=o))
                have.add(o)
        path = self.folder / f"{name}.onnx"
        onnx.save_model(m, str(path))
        return path

    def session(self, path: Path | None = None) -> ort.InferenceSession:
        try:
            return edgefc_ort.session(path or self.path, arena=False)
        except Exception as e:
            raise QuantizationError(f"onnxruntime cannot load the {self.name} model: {str(e).strip().splitlines()[0]}") from None


# --- observers ----------------------------------------------------------------------------------

@dataclass
class MinMaxObserver:
    lo: float = math.inf
    hi: float = -math.inf

    def update(self, values: np.ndarray) -> None:
        if values.size:
            self.lo = min(self.lo, float(np.min(values)))
            self.hi = max(self.hi, float(np.max(values)))

    def merge(self, lo: float, hi: float) -> None:
        self.lo, self.hi = min(self.lo, float(lo)), max(self.hi, float(hi))


@dataclass
class HistogramObserver:
    """A fixed-range histogram of the values (of |x| when ``symmetric``) over [lo, hi]."""

    lo: float
    hi: float
    symmetric: bool = True
    bins: int = 4096
    counts: np.ndarray = field(init=False)

    def __post_init__(self):
        if self.symmetric:
            self.lo, self.hi = 0.0, max(abs(self.lo), abs(self.hi))
        if not self.hi > self.lo:
            self.hi = self.lo + 1e-12
        self.counts = np.zeros(self.bins, dtype=np.int64)

    def update(self, values: np.ndarray) -> None:
        v = np.abs(values) if self.symmetric else values
        h, _ = np.histogram(v, bins=self.bins, range=(self.lo, self.hi))
        self.counts += h

    @property
    def edges(self) -> np.ndarray:
        return np.linspace(self.lo, self.hi, self.bins + 1)

    def percentile_range(self, percentile: float) -> tuple[float, float]:
        total = self.counts.sum()
        if total == 0:
            return self.lo, self.hi
        cdf = np.cumsum(self.counts) / total
        edges = self.edges
        if self.symmetric:
            k = int(np.searchsorted(cdf, percentile / 100.0))
            a = float(edges[min(k + 1, self.bins)])
            return -a, a
        tail = (100.0 - percentile) / 200.0
        lo = float(edges[int(np.searchsorted(cdf, tail))])
        hi = float(edges[min(int(np.searchsorted(cdf, 1.0 - tail)) + 1, self.bins)])
        return min(lo, 0.0), max(hi, 0.0)

    def mse_range(self, levels: int = 65535) -> tuple[float, float]:
        """Clipping range minimising E[(x - Q(x))^2]: squared clipping error of the values beyond
        the threshold plus the rounding noise step^2/12 of the values inside."""
        edges = self.edges
        centers = 0.5 * (edges[:-1] + edges[1:])
        c = self.counts.astype(np.float64)
        total = c.sum()
        if total == 0:
            return (-self.hi, self.hi) if self.symmetric else (self.lo, self.hi)
        if self.symmetric:
            # err(a) = sum_{x > a} c (x - a)^2 + total * step(a)^2 / 12, for every bin edge a at once
            s0 = np.cumsum(c[::-1])[::-1]
            s1 = np.cumsum((c * centers)[::-1])[::-1]
            s2 = np.cumsum((c * centers * centers)[::-1])[::-1]
            k = np.arange(self.bins // 16, self.bins)
            a = edges[k]
            err = s2[k] - 2 * a * s1[k] + a * a * s0[k] + total * (2 * a / levels) ** 2 / 12
            full = total * (2 * edges[-1] / levels) ** 2 / 12
            best_a = float(a[int(np.argmin(err))]) if err.size and err.min() < full else float(edges[-1])
            return -best_a, best_a
        best, best_r = math.inf, (self.lo, self.hi)
        zero = int(np.searchsorted(edges, 0.0))
        for shrink in np.linspace(0.0, 0.5, 33):  # shrink both ends by the same fraction of the range
            lo_k = int(round(shrink * zero))
            hi_k = self.bins - int(round(shrink * (self.bins - zero)))
            lo, hi = edges[lo_k], edges[hi_k]
            step = (hi - lo) / levels
            clip = np.sum(c[:lo_k] * (centers[:lo_k] - lo) ** 2) + np.sum(c[hi_k:] * (centers[hi_k:] - hi) ** 2)
            err = clip + total * step * step / 12
            if err < best:
                best, best_r = err, (float(min(lo, 0.0)), float(max(hi, 0.0)))
        return best_r


# --- statistics ---------------------------------------------------------------------------------

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
    import time

    start = time.perf_counter()
    means = dict(means or {})
    stats = TensorStats()
    nodes, outputs, inits = _reduce_nodes(tensors, means)
    path = model.variant("calib-stats", nodes, outputs, inits, keep_outputs=False)
    sess = model.session(path)
    names = [o.name for o in sess.get_outputs()]
    for feeds in _progress(samples, "calibrating", len(samples), progress):
        values = dict(zip(names, sess.run(names, feeds)))
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
    import time

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
    for v in _progress(list(values), f"calibrating ({input_name} domain)", None, progress):
        vals = dict(zip(outputs, sess.run(outputs, {input_name: np.full(shape, v, dtype=dtype)})))
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
    bar = _progress(range(len(chunks) * len(samples)), "calibrating (histograms)", len(chunks) * len(samples), progress)
    it = iter(bar)
    for ci, chunk in enumerate(chunks):
        path = model.variant(f"calib-chunk{ci}", outputs=chunk, keep_outputs=False)
        sess = model.session(path)
        for feeds in samples:
            arrays = sess.run(chunk, feeds)
            if observe is not None:
                observe(dict(zip(chunk, arrays)))
            for t, a in zip(chunk, arrays):
                observers[t].update(a)
            del arrays
            next(it, None)
        del sess
        os.remove(path)
    return observers
