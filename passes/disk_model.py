"""A graph on disk for onnxruntime, without holding the weights twice (pass ``quantize``).

:class:`DiskModel` writes a graph once to a temporary folder with its weights as external data
(models over 2 GB work; Python keeps only the weight-free skeleton) and makes variants with extra
nodes and outputs - calibration reductions, per-layer error probes - that share the one weights
file. :func:`order_probes` orders a variant's nodes so onnxruntime frees each probed tensor early.
"""

from __future__ import annotations

import os
from pathlib import Path

import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort

from edgefc import functions, ir
from edgefc import ort as edgefc_ort
from edgefc.errors import QuantizationError
from edgefc.memory import release_memory


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
        functions.attach_functions(m)   # the extra nodes may call edgefc functions the skeleton lacks
        path = self.folder / f"{name}.onnx"
        onnx.save_model(m, str(path))
        return path

    def session(self, path: Path | None = None, optimize: bool = False) -> ort.InferenceSession:
        """An onnxruntime session on the model (or a variant): the graph as written, or with
        onnxruntime's default graph optimisations (``optimize``: how a user's session runs it)."""
        try:
            return edgefc_ort.session(path or self.path, arena=False, optimize=optimize)  # one run at a time: no arena
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            hint = "; --precision fp32 deploys the model unquantized" if self.name == "deployed" else ""
            raise QuantizationError(f"onnxruntime cannot load the {self.name} model: {first[:300]}{hint}") from None

