"""The pass IR: onnx-graphsurgeon's ``Graph``, loaded from and saved to ONNX files.

edgefc has no IR of its own (DESIGN.md "Graph"): passes receive and return an
``onnx_graphsurgeon.Graph``. This module holds what every pass and command needs around it:
loading a model safely (external data inside the model's folder only, clear errors for files that
are not ONNX), shape inference that also works on models over 2 GB, and saving with external data
when the weights are large.
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

from edgefc import functions
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
    external_data_helper.load_external_data_for_model(model, str(path.parent))
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
    return gs.import_onnx(functions.strip_functions(model))


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
    model = onnx.helper.make_model(g, opset_imports=update_import_domains(graph),
                                   functions=[E.export_function(f) for f in graph.functions])
    if graph.ir_version is not None:
        model.ir_version = graph.ir_version
    return functions.attach_functions(model)


def infer_shapes(graph: gs.Graph) -> gs.Graph:
    """Run ONNX shape inference (with data propagation) and write the results into ``graph``.

    Runs on a weight-free skeleton of the graph, so it is fast and works for models over 2 GB.
    """
    try:
        inferred = onnx.shape_inference.infer_shapes(skeleton_model(graph), strict_mode=False, data_prop=True)
    except onnx.shape_inference.InferenceError as e:
        raise ShapeError(f"shape inference failed: {str(e).splitlines()[0]}") from None
    infos = {vi.name: vi for vi in list(inferred.graph.value_info) + list(inferred.graph.output)}
    for name, tensor in graph.tensors().items():
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
    return graph


def weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of initializer data held in ``model`` (raw or typed fields)."""
    return sum(_tensor_nbytes(t) for t in external_data_helper._get_all_tensors(model))


def to_model(graph: gs.Graph) -> onnx.ModelProto:
    """Export ``graph`` to a ModelProto (no checks; large models stay in memory), with the local
    functions of its edgefc ops."""
    return functions.attach_functions(gs.export_onnx(graph, do_type_check=False))


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
        model = skeleton_model(graph, EXTERNAL_TENSOR_MIN_BYTES)
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


def opset_version(graph: gs.Graph, domain: str = "") -> int:
    """The graph's opset for ``domain`` (default: the standard ONNX domain)."""
    if domain in ("", "ai.onnx"):
        return int(graph.opset)
    return int(graph.import_domains and next((d.version for d in graph.import_domains if d.domain == domain), 0) or 0)


#: (op, domain) -> the first opset from which ONNX's version converter converts it faithfully
_UNCONVERTIBLE = {("Scan", ""): 9}


def _needs_conversion(node: gs.Node, old: int, new: int) -> bool:
    """Whether ``node`` (standard domain) means something else at opset ``new`` than at ``old``:
    its schema changed in between. Unknown ops are left alone."""
    if (node.domain or "") not in ("", "ai.onnx"):
        return False
    try:
        return onnx.defs.get_schema(node.op, old).since_version != onnx.defs.get_schema(node.op, new).since_version
    except onnx.defs.SchemaError:
        return False


def _convert_node(graph: gs.Graph, node: gs.Node, old: int, new: int) -> list[gs.Node]:
    """``node`` converted alone from opset ``old`` to ``new`` by ONNX's version converter (its
    variable inputs typed as in the graph, its constant inputs as initializers); the nodes that
    replace it, wired to the graph's tensors."""
    from onnx import version_converter
    from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter as E

    inputs, inits, seen = [], [], set()
    for t in node.inputs:
        if not t.name or t.name in seen:
            continue
        seen.add(t.name)
        if isinstance(t, gs.Constant):
            inits.append(E.export_tensor_proto(t))
        else:
            inputs.append(E.export_value_info_proto(t, do_type_check=False))
    outputs = [E.export_value_info_proto(t, do_type_check=False) for t in node.outputs if t.name]
    g = onnx.helper.make_graph([E.export_node(node)], "node", inputs, outputs, initializer=inits)
    model = onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", old)])
    converted = version_converter.convert_version(model, new)
    part = import_model(converted)
    outer = {t.name: t for t in list(node.inputs) + list(node.outputs) if t.name}
    prefix = f"{node.name or node.op}_opset{new}_"
    for t in part.tensors().values():
        if t.name not in outer:
            t.name = prefix + t.name
    for n in part.nodes:
        n.name = prefix + (n.name or n.op)
        ins, outs = [outer.get(t.name, t) for t in n.inputs], [outer.get(t.name, t) for t in n.outputs]
        n.inputs.clear()
        n.outputs.clear()
        n.inputs.extend(ins)
        n.outputs.extend(outs)
    return list(part.nodes)


def upgrade_opset(graph: gs.Graph, version: int) -> gs.Graph:
    """Bring the graph's standard-domain ops to opset ``version``.

    First ONNX's version converter on the whole model (on the weight-free skeleton, so models
    over 2 GB convert too; the weights are put back afterwards). Where it fails (it rejects some
    valid models whose ops need no conversion at all), op by op: a node whose schema is the same
    at both opsets stays as it is, every other node is converted alone. A node that cannot be
    converted is a :class:`ShapeError` naming it. No-op if the graph is already there.
    """
    from onnx import version_converter

    old = int(graph.opset)
    if old >= version:
        return graph
    for node in [n for g in [graph, *graph.subgraphs(recursive=True)] for n in g.nodes]:
        if (node.op, node.domain or "") in _UNCONVERTIBLE and old < _UNCONVERTIBLE[(node.op, node.domain or "")]:
            raise ShapeError(f"cannot convert {node.op} node '{node.name}' from opset {old} to {version}: ONNX's version "
                             f"converter changes its meaning (its opset-{old} form has a batch axis that later forms do not)")
    constants = {name: t for name, t in graph.tensors().items() if isinstance(t, gs.Constant)}
    real_inputs = {t.name for t in graph.inputs}
    try:
        converted = version_converter.convert_version(skeleton_model(graph), version)
        new = import_model(converted)
    except Exception:  # noqa: BLE001 - the converter raises plain RuntimeErrors: try op by op
        return _upgrade_op_by_op(graph, old, version)
    new.inputs = [t for t in new.inputs if t.name in real_inputs]
    for before, after in ((graph.inputs, new.inputs), (graph.outputs, new.outputs)):
        if [(t.name, t.dtype, t.shape) for t in before] != [(t.name, t.dtype, t.shape) for t in after]:
            return _upgrade_op_by_op(graph, old, version)  # the converter changed the model's signature
    for node in new.nodes:
        for i, t in enumerate(node.inputs):
            if isinstance(t, gs.Variable) and t.name in constants:
                node.inputs[i] = constants[t.name]
    return new


def _upgrade_op_by_op(graph: gs.Graph, old: int, version: int) -> gs.Graph:
    for node in list(graph.nodes):
        if not _needs_conversion(node, old, version):
            continue
        if any(isinstance(v, gs.Graph) for v in node.attrs.values()):
            raise ShapeError(f"cannot convert {node.op} node '{node.name}' (it holds a subgraph) from opset {old} to {version}")
        try:
            replacement = _convert_node(graph, node, old, version)
        except Exception as e:  # noqa: BLE001 - the converter raises plain RuntimeErrors
            raise ShapeError(f"cannot convert {node.op} node '{node.name}' from opset {old} to {version}: "
                             f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from None
        at = graph.nodes.index(node)
        node.inputs.clear()
        node.outputs.clear()
        graph.nodes[at:at + 1] = replacement
    graph.opset = version
    for d in graph.import_domains or []:
        if d.domain in ("", "ai.onnx"):
            d.version = version
    return graph


# Element types as the cost model and the tiling name them (``fp32``, ``fp16``, ``int16``, ``int8``):
# a tensor-engine op's precision (``[tensor.rate]`` key) is built from its operands' codes.
DTYPE_BYTES = {"fp64": 8, "fp32": 4, "fp16": 2, "int64": 8, "int32": 4, "int16": 2, "int8": 1, "bool": 1}
_NP_CODE = {np.dtype(np.float64): "fp64", np.dtype(np.float32): "fp32", np.dtype(np.float16): "fp16",
            np.dtype(np.int64): "int64", np.dtype(np.uint64): "int64", np.dtype(np.int32): "int32",
            np.dtype(np.uint32): "int32", np.dtype(np.int16): "int16", np.dtype(np.uint16): "int16",
            np.dtype(np.int8): "int8", np.dtype(np.uint8): "int8", np.dtype(np.bool_): "bool"}


def dtype_code(dtype) -> str:
    """numpy/onnx dtype -> element type code (fp32, fp16, int16, int8 ...); None -> fp32."""
    if dtype is None:
        return "fp32"
    try:
        dt = np.dtype(dtype)
    except TypeError:
        return "fp32"
    if dt in _NP_CODE:
        return _NP_CODE[dt]
    if "bfloat16" in str(dtype) or "float8" in str(dtype):
        return "fp16"
    if dt.kind in "iu":
        return f"int{dt.itemsize * 8}" if dt.itemsize * 8 in (8, 16, 32, 64) else "int32"
    return "fp32"
