"""Codegen of the ``edgefc_npu`` backend: each merged NPU function -> one NPU program (DESIGN.md
"TVM lowering").

An NPU program is a JSON-able dict (``npu_programs.json``): its inputs and outputs, and its
*commands* in order. A command is one composite (the unit the NPU executes in one go: a conv2d
with its epilogue, one attention tile, a norm ...) with the Relax ops inside it (the NPU runtime's
instructions) and the graph nodes it belongs to. Beside the commands, ``program`` holds, for
every node the NPU program runs, the commands the Program (``targets/program.py``) decided for
it -- engine, MACs (plain and padded), precision, the tensors its DMA moves, the tiles -- so the
built program carries exactly what the profile priced. :func:`run_codegen` runs TVM's
``RunCodegen`` with this codegen and returns the programs it built.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from edgefc.targets.tvm_kernels import KERNELS
from edgefc.targets.tvm_patterns import CODEGEN


def _py(value):
    """A TVM attribute value as plain Python."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "value"):
        return _py(value.value)
    if type(value).__name__ in ("DataType", "dtype"):
        return str(value)
    try:
        return [_py(v) for v in value]
    except TypeError:
        return str(value)


def attrs_dict(attrs) -> dict:
    if attrs is None:
        return {}
    info = getattr(type(attrs), "__tvm_ffi_type_info__", None)
    if info is None:
        return {}
    return {f.name: _py(getattr(attrs, f.name)) for f in info.fields}


class _Serializer:
    def __init__(self):
        self.ids: dict[Any, int] = {}
        self.next = 0
        self.nodes = iter(())   # the ONNX node of each op, in serialisation order

    def new(self, var) -> int:
        self.ids[var] = self.next
        self.next += 1
        return self.ids[var]

    def arg(self, e, local: dict):
        from tvm import ir, relax

        if isinstance(e, relax.Var):
            if e in local:
                return local[e]
            return {"v": self.ids[e]}
        if isinstance(e, relax.ShapeExpr):
            return {"shape": [int(v) for v in e.values]}
        if isinstance(e, relax.Tuple):
            return {"tuple": [self.arg(f, local) for f in e.fields]}
        if isinstance(e, ir.expr.StringImm):
            return {"lit": e.value}
        if isinstance(e, ir.expr.Constant) and hasattr(getattr(e, "value", None), "numpy"):
            arr = e.value.numpy()
            if arr.size > 4096:
                raise ValueError("a large constant inside an NPU composite (expected as an argument)")
            return {"const": arr.tolist(), "dtype": str(arr.dtype), "shape": list(arr.shape)}
        if hasattr(e, "value"):  # PrimValue / IntImm / FloatImm
            v = e.value
            v = getattr(v, "value", v)
            return {"lit": v}
        raise ValueError(f"cannot serialise {type(e).__name__} for the NPU")


def _out_type(expr) -> tuple[list, str] | tuple[None, None]:
    from tvm import relax

    ty = expr.ty
    if isinstance(ty, relax.TensorType):
        return [int(d) for d in ty.shape], str(ty.dtype)
    return None, None


def _arg_shape(a) -> list[int] | None:
    """The static shape of a tensor argument (None for anything else)."""
    from tvm import relax

    ty = getattr(a, "ty", None)
    if isinstance(ty, relax.TensorType):
        try:
            return [int(d) for d in ty.shape]
        except (TypeError, ValueError):
            return None
    return None


def _emit_ops(ser: _Serializer, func, args: list, ops: list) -> Any:
    """Serialise the composite ``func`` called with ``args`` (encoded); return its output encoding."""
    from tvm import relax

    local = {p: a for p, a in zip(func.params, args)}
    for block in func.body.blocks:
        for b in block.bindings:
            v = b.value
            if isinstance(v, relax.Call):
                op = getattr(v.op, "name", None)
                if op not in KERNELS:
                    raise ValueError(f"{op} has no NPU kernel")
                shape, dtype = _out_type(v)
                out = ser.new(b.var)
                ops.append({"op": op, "args": [ser.arg(a, local) for a in v.args], "attrs": attrs_dict(v.attrs),
                            "arg_shapes": [_arg_shape(a) for a in v.args], "out": out, "shape": shape, "dtype": dtype,
                            "node": next(ser.nodes)})
            elif isinstance(v, relax.TupleGetItem):
                out = ser.new(b.var)
                ops.append({"op": "tuple_get_item", "args": [ser.arg(v.tuple_value, local)],
                            "attrs": {"index": int(v.index)}, "out": out, "shape": None, "dtype": None})
            elif isinstance(v, (relax.Var, relax.Tuple)):
                local[b.var] = ser.arg(v, local)
            else:
                raise TypeError(f"unexpected {type(v).__name__} in an NPU composite")
    return ser.arg(func.body.body, local)


def _program_command(c) -> dict:
    """A Program command as JSON (defaults left out)."""
    d = {k: v for k, v in asdict(c).items() if v not in (0, "", (), -1, False) or k in ("kind", "repeat")}
    if "passes" in d:
        d["passes"] = {cls: n for cls, n in d["passes"]}
    return d


def serialize_function(func, symbol: str, program, op_nodes: list[str]) -> dict:
    """One merged NPU function (its composites in order) as an NPU program, with the Program's
    commands of every node it runs (``program``: a :class:`edgefc.targets.program.Program`;
    ``op_nodes``: the ONNX node of each of its ops, in order, ``tvm_lowering.attribute_npu_ops``)."""
    from tvm import relax

    ser = _Serializer()
    ser.nodes = iter(op_nodes)
    inputs = []
    for p in func.params:
        shape, dtype = _out_type(p)
        inputs.append({"name": p.name, "shape": shape, "dtype": dtype, "id": ser.new(p)})
    composites = {}
    commands = []
    local: dict = {}
    for block in func.body.blocks:
        for b in block.bindings:
            v = b.value
            if isinstance(v, relax.Function):
                composites[b.var] = v
            elif isinstance(v, relax.Call) and (v.op in composites or isinstance(v.op, relax.Function)):
                comp = composites.get(v.op, v.op)
                ops: list = []
                out = _emit_ops(ser, comp, [ser.arg(a, local) for a in v.args], ops)
                kind = str(comp.attrs["Composite"]) if comp.attrs and "Composite" in comp.attrs else "unknown"
                shape, dtype = _out_type(b.var)
                ops.append({"op": "bind", "args": [out], "attrs": {}, "out": ser.new(b.var), "shape": shape,
                            "dtype": dtype})
                nodes = list(dict.fromkeys(o["node"] for o in ops if o.get("node")))
                engines = {program.placement.get(n, "none") for n in nodes}
                engine = next((e for e in ("tensor", "vector", "host") if e in engines), "none")
                commands.append({"composite": kind, "nodes": nodes, "engine": engine, "ops": ops})
            elif isinstance(v, relax.TupleGetItem):
                out = ser.new(b.var)
                commands.append({"composite": "tuple_get_item", "nodes": [], "engine": "none", "ops": [
                    {"op": "tuple_get_item", "args": [ser.arg(v.tuple_value, local)], "attrs": {"index": int(v.index)},
                     "out": out, "shape": None, "dtype": None}]})
            elif isinstance(v, (relax.Var, relax.Tuple)):
                local[b.var] = ser.arg(v, local)
            else:
                raise TypeError(f"unexpected {type(v).__name__} in an NPU function")
    result = ser.arg(func.body.body, local)
    outputs = result.get("tuple", [result])
    ret = func.ty.ret if hasattr(func.ty, "ret") else None
    out_types = []
    rets = ret.fields if isinstance(ret, relax.TupleType) else [ret]
    for r in rets:
        out_types.append({"shape": [int(d) for d in r.shape], "dtype": str(r.dtype)})
    nodes = list(dict.fromkeys(n for c in commands for n in c["nodes"]))
    by_node: dict[str, list] = {}
    for c in program.commands:
        if c.op in by_node or c.op in nodes:
            by_node.setdefault(c.op, []).append(_program_command(c))
    return {"symbol": symbol, "inputs": inputs, "outputs": outputs, "output_types": out_types,
            "commands": commands, "program": {n: by_node.get(n, []) for n in nodes}}


def run_codegen(mod, program, op_nodes: dict[str, list[str]]) -> tuple[Any, list[dict]]:
    """``RunCodegen`` with the ``relax.ext.edgefc_npu`` codegen: every NPU function becomes an NPU
    program (returned, in symbol order) and its call a ``call_dps_packed`` to the program's
    symbol. No runtime module is produced here: the programs are written beside the host library
    and registered by the NPU runtime (``targets/tvm_runtime.py``) when the build is loaded."""
    import tvm
    from tvm import relax

    built: dict[str, dict] = {}

    def codegen(funcs, options, constant_names):
        for func in funcs:
            symbol = str(func.attrs["global_symbol"])
            built[symbol] = serialize_function(func, symbol, program, op_nodes[symbol])
        return []

    tvm.register_global_func("relax.ext." + CODEGEN, codegen, override=True)
    mod = relax.transform.RunCodegen()(mod)
    return mod, [built[s] for s in sorted(built, key=lambda s: int(s.rsplit(".", 1)[1]))]
