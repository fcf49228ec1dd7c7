"""The pass IR: onnx-graphsurgeon's ``Graph``, loaded from and saved to ONNX files.

edgefc has no IR of its own (DESIGN.md "Graph"): passes receive and return an
``onnx_graphsurgeon.Graph``. This module holds what every pass and command needs around it:
loading a model safely (external data inside the model's folder only, clear errors for files that
are not ONNX), shape inference that also works on models over 2 GB, and saving with external data
when the weights are large, each node's ``metadata_props`` kept (onnx-graphsurgeon 0.6 drops them;
the precision record of :mod:`edgefc.precision` is among them). Opset conversion is :mod:`edgefc.opset`, element type codes
:mod:`edgefc.dtypes`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from google.protobuf.message import DecodeError
from onnx import external_data_helper

from edgefc import functions, precision
from edgefc.errors import ModelLoadError, ShapeError

Graph = gs.Graph

# Protobuf cannot serialise a message over 2 GiB; above this many bytes of weights we write the
# weights as external data.
EXTERNAL_DATA_THRESHOLD = 1 << 30
# Tensors of at least this many bytes go to the external data file; smaller ones (shape constants)
# stay inline, where shape inference can read them.
EXTERNAL_TENSOR_MIN_BYTES = 1024


def _read_model_proto(path: Path) -> onnx.ModelProto:
    if not path.exists():
        raise ModelLoadError(f"model file not found: {path}")
    if path.is_dir():
        raise ModelLoadError(f"{path} is a folder, not an ONNX model file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeWarning, ValueError, OSError) as e:
        raise ModelLoadError(
            f"{path} is not a readable ONNX model (truncated or not ONNX: {str(e).splitlines()[0] if str(e) else type(e).__name__})"
        ) from None
    if not model.graph.node and not model.graph.output:
        raise ModelLoadError(f"{path} is not an ONNX model (no graph found in the file)")
    return model


def _check_external_data(model: onnx.ModelProto, base_dir: Path) -> None:
    """Refuse external data outside ``base_dir`` and report missing or short data files by name."""
    root = base_dir.resolve()
    sizes: dict[Path, int] = {}
    for tensor in external_data_helper._get_all_tensors(model):
        if not external_data_helper.uses_external_data(tensor):
            continue
        info = external_data_helper.ExternalDataInfo(tensor)
        loc = info.location
        target = (root / loc).resolve()
        if os.path.isabs(loc) or (root != target and root not in target.parents):
            raise ModelLoadError(
                f"external data location '{loc}' of tensor '{tensor.name}' leaves the model's folder {root}; refusing to read it"
            )
        if target not in sizes:
            if not target.is_file():
                raise ModelLoadError(f"external data file '{loc}' (needed by tensor '{tensor.name}') is missing from {root}")
            sizes[target] = target.stat().st_size
        end = (info.offset or 0) + (info.length or 0)
        if end > sizes[target]:
            raise ModelLoadError(
                f"external data file '{loc}' is truncated: tensor '{tensor.name}' needs bytes up to {end}, file has {sizes[target]}"
            )


def parse_shape(text: str) -> tuple[str, tuple[int, ...]]:
    """Parse ``name=1x4x64x64`` into ``("name", (1, 4, 64, 64))``."""
    name, sep, dims = text.rpartition("=")
    try:
        if not sep or not name:
            raise ValueError
        shape = tuple(int(d) for d in dims.lower().split("x"))
        if any(d <= 0 for d in shape):
            raise ValueError
    except ValueError:
        raise ShapeError(f"bad --shape '{text}': expected NAME=D1xD2x... with positive integers, e.g. sample=1x4x64x64") from None
    return name, shape


def parse_shapes(texts) -> dict[str, tuple[int, ...]]:
    """Parse repeated ``--shape NAME=D1xD2x...`` options; the same input named twice is an error
    (one-line ShapeError) instead of the last one silently winning."""
    shapes: dict[str, tuple[int, ...]] = {}
    for text in texts or ():
        name, shape = parse_shape(text)
        if name in shapes:
            if shapes[name] == shape:
                raise ShapeError(f"--shape {name} is given twice")
            raise ShapeError(f"--shape {name} is given twice ({'x'.join(map(str, shapes[name]))} and "
                             f"{'x'.join(map(str, shape))}); give each input once")
        shapes[name] = shape
    return shapes


def parse_consts(texts) -> dict[str, str]:
    """Parse repeated ``--const NAME=VALUE`` options (VALUE: a number, or numbers separated by
    commas); the same input named twice is an error."""
    consts: dict[str, str] = {}
    for text in texts or ():
        name, sep, value = str(text).partition("=")
        name, value = name.strip(), value.strip()
        if not sep or not name or not value:
            raise ShapeError(f"bad --const '{text}': expected NAME=VALUE, e.g. sr=16000")
        if name in consts:
            raise ShapeError(f"--const {name} is given twice; give each input once")
        consts[name] = value
    return consts


def fix_inputs(graph: gs.Graph, consts: dict) -> dict[str, list]:
    """Turn the graph inputs ``consts`` names into constants (``canonicalize`` then folds what
    depends on them: an ``If`` on a sample rate, a shape computed from a length ...). A value is a
    number (filling the input's shape) or numbers separated by commas (one per element), given as
    text, a number or a list; it takes the input's element type. Returns the values fixed, by
    name. ShapeError for an unknown input, a value that does not fit its type or element count,
    or an input whose shape is not static (give it with --shape)."""
    by_name = {t.name: t for t in graph.inputs}
    fixed: dict[str, list] = {}
    for name, raw in (consts or {}).items():
        t = by_name.get(name)
        if t is None:
            raise ShapeError(f"--const names input '{name}', but the model's inputs are: {', '.join(by_name) or 'none'}")
        items = raw if isinstance(raw, (list, tuple)) else str(raw).split(",") if isinstance(raw, str) else [raw]
        try:
            numbers = [float(x) for x in items]
        except (TypeError, ValueError):
            raise ShapeError(f"--const {name}={raw}: not a number (or numbers separated by commas)") from None
        dtype = np.dtype(t.dtype) if t.dtype is not None else np.dtype(np.float32)
        if dtype.kind in "iub" and any(not float(x).is_integer() for x in numbers):
            raise ShapeError(f"--const {name}={raw}: input '{name}' is {dtype.name}; give whole numbers")
        shape = static_shape(t)
        if shape is None:
            shape = () if t.shape is not None and len(t.shape) == 0 else None
        if shape is None:
            raise ShapeError(f"--const {name}: input '{name}' has no static shape; give it with --shape {name}=D1xD2x...")
        size = int(np.prod(shape, dtype=np.int64))
        if len(numbers) not in (1, size):
            raise ShapeError(f"--const {name}: {len(numbers)} values for an input of {size} elements (shape "
                             f"{'x'.join(map(str, shape)) or 'scalar'}); give one value or {size}")
        value = np.full(shape, numbers[0]) if len(numbers) == 1 else np.asarray(numbers).reshape(shape)
        graph.inputs.remove(t)
        t.to_constant(np.ascontiguousarray(value.astype(dtype)))
        fixed[name] = [v.item() for v in np.asarray(t.values).reshape(-1)[:16]]
    return fixed


def _apply_input_shapes(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> None:
    inputs = {i.name: i for i in model.graph.input}
    for name, shape in shapes.items():
        if name not in inputs:
            raise ShapeError(f"--shape names input '{name}', but the model's inputs are: {', '.join(inputs) or 'none'}")
        dims = inputs[name].type.tensor_type.shape.dim
        if len(dims) and len(dims) != len(shape):
            raise ShapeError(f"--shape {name} has {len(shape)} dimensions, the model's input has {len(dims)}")
        del dims[:]
        for d in shape:
            dims.add().dim_value = d


def load_model_proto(path: str | os.PathLike, shapes: dict | None = None, check: bool = True) -> onnx.ModelProto:
    """Read an ONNX model with its external data, checked; input shapes overridden by ``shapes``."""
    path = Path(path)
    model = _read_model_proto(path)
    _check_external_data(model, path.parent)
    if shapes:
        _apply_input_shapes(model, dict(shapes))
    if check:
        try:
            onnx.checker.check_model(_skeleton(model))
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else "invalid model"
            raise ModelLoadError(f"{path} fails the ONNX checker: {first}") from None
    try:
        external_data_helper.load_external_data_for_model(model, str(path.parent))
    except (onnx.checker.ValidationError, OSError) as e:
        # onnx's own guards: e.g. a data file with several hard links (refused as a possible hard-link
        # attack), or one that cannot be opened
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"{path}: cannot read its external data: {first}") from None
    return model


def load(path: str | os.PathLike, shapes: dict | None = None) -> gs.Graph:
    """Load an ONNX model as a graphsurgeon ``Graph`` (external data included, checked, shapes inferred).

    ``shapes`` maps input names to static shapes, e.g. ``{"sample": (1, 4, 64, 64)}``.
    Raises :class:`ModelLoadError` for a missing, non-ONNX or truncated file, missing external
    data (named) and external data that resolves outside the model's folder.
    """
    model = load_model_proto(path, shapes)
    graph = import_model(model)
    infer_shapes(graph)
    return graph


def import_model(model: onnx.ModelProto) -> gs.Graph:
    """``gs.import_onnx`` without the edgefc functions (derived data, stamped again on export;
    see :mod:`edgefc.functions`). Strips them from ``model`` in place."""
    graph = gs.import_onnx(functions.strip_functions(model))
    _import_node_metadata(model.graph.node, graph.nodes)
    return graph


def _import_node_metadata(protos, nodes) -> None:
    """Each NodeProto's ``metadata_props`` onto its Node (onnx-graphsurgeon 0.6 drops them):
    :func:`edgefc.precision.metadata`. Nodes are imported in proto order."""
    if len(protos) != len(nodes):
        return
    for proto, node in zip(protos, nodes):
        if len(proto.metadata_props):
            precision.metadata(node).update({p.key: p.value for p in proto.metadata_props})


def _export_node_metadata(nodes, protos) -> None:
    """The inverse of :func:`_import_node_metadata` (nodes are exported in list order)."""
    for node, proto in zip(nodes, protos):
        meta = node.__dict__.get("metadata_props")
        if meta:
            del proto.metadata_props[:]
            for k, v in meta.items():
                entry = proto.metadata_props.add()
                entry.key, entry.value = str(k), str(v)


def copy_graph(graph: gs.Graph) -> gs.Graph:
    """``graph.copy()`` that keeps each node's metadata (the precision record among it)."""
    new = graph.copy()
    for old, node in zip(graph.nodes, new.nodes):
        meta = old.__dict__.get("metadata_props")
        if meta:
            precision.metadata(node).update(meta)
    return new


def _tensor_nbytes(t: onnx.TensorProto) -> int:
    """Bytes of a tensor's data from its dims and type (reading ``raw_data`` would copy it:
    0.9 s for the 1.3 GB U-Net)."""
    n = int(np.prod(t.dims, dtype=np.int64)) if len(t.dims) else 1
    return n * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize


def _skeleton(model: onnx.ModelProto, min_bytes: int = 1024) -> onnx.ModelProto:
    """A copy of ``model`` without its large weights, for the checker and shape inference.

    Initializers of ``min_bytes`` or more become graph inputs of the same type and shape (the
    weights are not copied, so this works for models over 2 GB); small ones (shape constants)
    keep their values so shape inference can use them.
    """
    sk = onnx.ModelProto()
    sk.ir_version = model.ir_version
    sk.opset_import.extend(model.opset_import)
    sk.functions.extend(model.functions)
    g, src = sk.graph, model.graph
    g.name = src.name
    g.node.extend(src.node)
    g.input.extend(src.input)
    g.output.extend(src.output)
    g.value_info.extend(src.value_info)
    declared = {i.name for i in src.input}
    for t in src.initializer:
        if external_data_helper.uses_external_data(t) or _tensor_nbytes(t) >= min_bytes:
            if t.name not in declared:
                g.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        else:
            g.initializer.append(t)
    return sk


def _constant_nbytes(t: gs.Constant) -> int:
    shape = t.shape or ()
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(t.dtype).itemsize


def skeleton_model(graph: gs.Graph, min_bytes: int = 1024) -> onnx.ModelProto:
    """Export ``graph`` without its large weights, fast: constants of ``min_bytes`` or more become
    graph inputs of the same type and shape. For shape inference and the version converter, which
    need dims and small shape constants but not the weights (a full export of a 1.3 GB U-Net
    copies every weight several times)."""
    from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter as E
    from onnx_graphsurgeon.exporters.onnx_exporter import update_import_domains

    tensors = graph.tensors()
    inputs = [E.export_value_info_proto(t, do_type_check=False) for t in graph.inputs]
    initializer = []
    for t in tensors.values():
        if not isinstance(t, gs.Constant):
            continue
        if _constant_nbytes(t) < min_bytes:
            initializer.append(E.export_tensor_proto(t))
        else:
            inputs.append(onnx.helper.make_tensor_value_info(
                t.name, onnx.helper.np_dtype_to_tensor_dtype(np.dtype(t.dtype)), list(t.shape)))
    outputs = [E.export_value_info_proto(t, do_type_check=False) for t in graph.outputs]
    boundary = {t.name for t in graph.inputs + graph.outputs}
    value_info = [E.export_value_info_proto(t, do_type_check=False) for t in tensors.values()
                  if isinstance(t, gs.Variable) and t.name not in boundary and (t.dtype is not None or t.shape is not None)]
    g = onnx.helper.make_graph([E.export_node(n) for n in graph.nodes], graph.name or "graph", inputs, outputs,
                               initializer=initializer, value_info=value_info)
    _export_node_metadata(graph.nodes, g.node)
    model = onnx.helper.make_model(g, opset_imports=update_import_domains(graph),
                                   functions=[E.export_function(f) for f in graph.functions])
    if graph.ir_version is not None:
        model.ir_version = graph.ir_version
    return functions.attach_functions(model)


def infer_shapes(graph: gs.Graph) -> gs.Graph:
    """Run ONNX shape inference (with data propagation) and write the results into ``graph`` and
    its subgraphs (If branches, Loop / Scan bodies: each scope from its own inferred graph).

    Runs on a weight-free skeleton of the graph, so it is fast and works for models over 2 GB.
    """
    try:
        inferred = onnx.shape_inference.infer_shapes(skeleton_model(graph), strict_mode=False, data_prop=True)
    except onnx.shape_inference.InferenceError as e:
        raise ShapeError(f"shape inference failed: {str(e).splitlines()[0]}") from None
    _write_inferred(graph, inferred.graph, top=True)
    return graph


def _write_inferred(graph: gs.Graph, proto: onnx.GraphProto, top: bool) -> None:
    """Shapes and types of ``proto`` (the inferred export of ``graph``) into ``graph``'s tensors;
    then the same for every subgraph (the export keeps the node order)."""
    infos = {vi.name: vi for vi in list(proto.value_info) + list(proto.output) + ([] if top else list(proto.input))}
    tensors = graph.tensors() if top else {t.name: t for n in graph.nodes for t in list(n.inputs) + list(n.outputs)
                                           if t is not None and t.name}
    for name, tensor in tensors.items():
        if isinstance(tensor, gs.Constant) or name not in infos:
            continue
        kind = infos[name].type.WhichOneof("value")
        if kind and kind != "tensor_type":  # sequence, optional, map: no tensor shape to record
            tensor.type = kind
            continue
        tt = infos[name].type.tensor_type
        if tt.elem_type:
            tensor.dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
        if tt.HasField("shape"):
            tensor.shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]
    if len(proto.node) != len(graph.nodes):
        return
    for node, pnode in zip(graph.nodes, proto.node):
        bodies = {a.name: a.g for a in pnode.attribute if a.type == onnx.AttributeProto.GRAPH}
        for name, sub in node.attrs.items():
            if isinstance(sub, gs.Graph) and name in bodies:
                _write_inferred(sub, bodies[name], top=False)


def weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of initializer data held in ``model`` (raw or typed fields)."""
    return sum(_tensor_nbytes(t) for t in external_data_helper._get_all_tensors(model))


def raise_ir_version(model: onnx.ModelProto) -> onnx.ModelProto:
    """Raise ``model.ir_version`` (in place) to the least its opsets need: a model converted from
    opset 9 keeps IR version 3 otherwise, which the ONNX checker refuses for opset 23 (and where
    every initializer would have to be a graph input)."""
    try:
        need = onnx.helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True)
    except (ValueError, TypeError):  # an opset newer than this onnx knows: leave it
        return model
    model.ir_version = max(int(model.ir_version), int(need))
    return model


def to_model(graph: gs.Graph) -> onnx.ModelProto:
    """Export ``graph`` to a ModelProto (no checks; large models stay in memory), with the local
    functions of its edgefc ops, its nodes' metadata and the IR version its opsets need."""
    model = gs.export_onnx(graph, do_type_check=False)
    _export_node_metadata(graph.nodes, model.graph.node)
    return raise_ir_version(functions.attach_functions(model))


def save_model(model: onnx.ModelProto, path: str | os.PathLike) -> Path:
    """Write ``model`` to ``path``; weights go to ``<name>.data`` beside it when they are large.

    Written to a temporary name in the same folder and renamed, so a failure leaves nothing behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".edgefc-save-", dir=path.parent))
    try:
        tmp_model = tmp / path.name
        if weight_bytes(model) >= EXTERNAL_DATA_THRESHOLD:
            location = path.name + ".data"
            onnx.save_model(model, str(tmp_model), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=location, size_threshold=EXTERNAL_TENSOR_MIN_BYTES)
            if (tmp / location).exists():
                os.replace(tmp / location, path.parent / location)
        else:
            onnx.save_model(model, str(tmp_model))
        os.replace(tmp_model, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _raw_bytes(t: gs.Constant):
    """The constant's bytes in ONNX raw layout, without a numpy round trip when still lazy."""
    lazy = t._values
    if isinstance(lazy, gs.ir.tensor.LazyValues) and lazy.tensor.HasField("raw_data") \
            and not external_data_helper.uses_external_data(lazy.tensor):
        return lazy.tensor.raw_data
    return memoryview(np.ascontiguousarray(t.values)).cast("B")


def save(graph: gs.Graph, path: str | os.PathLike) -> Path:
    """Write a graph as an ONNX file; with over EXTERNAL_DATA_THRESHOLD bytes of weights, the
    weights go to ``<name>.data`` beside it, streamed straight from the graph's arrays (no
    in-memory proto of the whole model). Atomic: a temporary name is renamed at the end."""
    constants = [t for t in graph.tensors().values() if isinstance(t, gs.Constant)]
    if sum(_constant_nbytes(t) for t in constants) < EXTERNAL_DATA_THRESHOLD:
        return save_model(to_model(graph), path)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".edgefc-save-", dir=path.parent))
    try:
        model = raise_ir_version(skeleton_model(graph, EXTERNAL_TENSOR_MIN_BYTES))
        large = {t.name: t for t in constants if _constant_nbytes(t) >= EXTERNAL_TENSOR_MIN_BYTES}
        keep = [i for i in model.graph.input if i.name not in large]
        del model.graph.input[:]
        model.graph.input.extend(keep)
        location = path.name + ".data"
        offset = 0
        with open(tmp / location, "wb") as f:
            for name, t in large.items():
                data = _raw_bytes(t)
                pad = (-offset) % 64  # align each tensor
                f.write(b"\0" * pad)
                offset += pad
                f.write(data)
                proto = model.graph.initializer.add()
                proto.name = name
                proto.dims.extend(t.shape)
                proto.data_type = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(t.dtype))
                proto.data_location = onnx.TensorProto.EXTERNAL
                for k, v in (("location", location), ("offset", str(offset)), ("length", str(len(data)))):
                    e = proto.external_data.add()
                    e.key, e.value = k, v
                offset += len(data)
        onnx.save_model(model, str(tmp / path.name))
        os.replace(tmp / location, path.parent / location)
        os.replace(tmp / path.name, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def static_shape(tensor: gs.Tensor) -> tuple[int, ...] | None:
    """The tensor's shape if every dimension is a known integer, else None."""
    shape = tensor.shape
    if shape is None or any(not isinstance(d, (int, np.integer)) or d < 0 for d in shape):
        return None
    return tuple(int(d) for d in shape)
