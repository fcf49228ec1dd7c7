"""What the NPU's engines run, as target data: the ``[ops]`` table of a target file (issue 22).

Each entry names an ONNX op type the NPU has a kernel for, the engine that runs it and the limits
of that kernel, and says where the claim comes from (the target file's header for the ``[ops]``
table names the sources)::

    [ops]
    MaxPool = { engine = "vector", spatial_ranks = [1, 2], attrs = { ceil_mode = [0] }, outputs = 1, source = "..." }

Fields of an entry:

* ``engine`` (required): ``tensor`` (MACs: only the op types the lowering counts MACs for,
  :data:`TENSOR_WORK`), ``attention`` (:data:`ATTENTION_WORK`) or ``vector``;
* ``source`` (required): where the claim comes from, or the stated assumption;
* ``spatial_ranks``: the spatial axes the kernel takes (the data input's rank minus 2; a 1-D op
  runs as a 2-D one with a unit axis); for ``Resize``, only those trailing axes may change size;
* ``attrs``: attribute -> the values the kernel takes (an absent attribute counts at its ONNX
  default; for a list-valued attribute every element must be one of them);
* ``constant_inputs``: input positions that must be compile-time constants (a clamp's bounds, a
  PReLU's slopes, a pad's sizes);
* ``zero_inputs``: input positions that, when given, must be constant zeros (a pad's value);
* ``nonnegative_inputs``: input positions whose constant values must be >= 0 (a pad's sizes:
  negative ones crop);
* ``outputs``: how many outputs the kernel writes (a node that uses more runs on the host).

An op type the table does not list runs on the host ("no NPU kernel for X"). ``placement``
asks :meth:`OpSupport.rejects` for every node whose op type is listed. This module is data only:
it parses and validates the table into frozen :class:`OpKind` records.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np

from edgefc.errors import TargetError

ENGINES = ("tensor", "vector", "attention")
#: op types whose tensor-engine work (MACs) the lowering counts
TENSOR_WORK = frozenset({"Conv", "FusedConv", "ConvTranspose", "MatMul", "FusedMatMul", "Gemm"})
#: op types the lowering prices as attention blocks
ATTENTION_WORK = frozenset({"Attention", "TiledAttention"})
_FIELDS = {"engine", "source", "spatial_ranks", "attrs", "constant_inputs", "zero_inputs", "nonnegative_inputs",
           "outputs"}


@dataclass(frozen=True)
class OpKind:
    """One entry of the ``[ops]`` table (see the module docstring)."""

    op: str
    engine: str
    source: str
    spatial_ranks: tuple[int, ...] = ()
    attrs: Mapping[str, tuple] = field(default_factory=lambda: MappingProxyType({}))
    constant_inputs: tuple[int, ...] = ()
    zero_inputs: tuple[int, ...] = ()
    nonnegative_inputs: tuple[int, ...] = ()
    outputs: int = 0                      # 0: no limit


def _ints(value, field: str, where: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
        raise TargetError(f"target description {where}: field '{field}' must be a list of whole numbers >= 0, got {value!r}")
    return tuple(value)


def _kind(op: str, entry, source: str) -> OpKind:
    where = f"{source}: field 'ops.{op}'"
    if not isinstance(entry, dict):
        raise TargetError(f"target description {where} must be a table (engine, source, limits), got {entry!r}")
    unknown = sorted(set(entry) - _FIELDS)
    if unknown:
        raise TargetError(f"target description {source} has an unknown field 'ops.{op}.{unknown[0]}' "
                          f"(an [ops] entry takes {', '.join(sorted(_FIELDS))})")
    engine, src = entry.get("engine"), entry.get("source")
    if engine not in ENGINES:
        raise TargetError(f"target description {where}.engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if not isinstance(src, str) or not src.strip():
        raise TargetError(f"target description {where}.source must say where the claim comes from (a string)")
    if engine == "tensor" and op not in TENSOR_WORK:
        raise TargetError(f"target description {where}: the cost model counts tensor-engine work only for "
                          f"{', '.join(sorted(TENSOR_WORK))}")
    if engine == "attention" and op not in ATTENTION_WORK:
        raise TargetError(f"target description {where}: attention blocks are {', '.join(sorted(ATTENTION_WORK))}")
    if engine == "vector" and op in TENSOR_WORK | ATTENTION_WORK:
        raise TargetError(f"target description {where}: {op} is {'an attention' if op in ATTENTION_WORK else 'tensor-engine'} work")
    attrs = entry.get("attrs", {})
    if not isinstance(attrs, dict) or not all(isinstance(v, list) and v for v in attrs.values()):
        raise TargetError(f"target description {where}.attrs must be a table of attribute -> list of allowed values")
    outputs = entry.get("outputs", 0)
    if isinstance(outputs, bool) or not isinstance(outputs, int) or outputs < 0:
        raise TargetError(f"target description {where}.outputs must be a whole number >= 0, got {outputs!r}")
    return OpKind(op, engine, src.strip(),
                  spatial_ranks=_ints(entry.get("spatial_ranks", []), f"ops.{op}.spatial_ranks", source),
                  attrs=MappingProxyType({k: tuple(v) for k, v in attrs.items()}),
                  constant_inputs=_ints(entry.get("constant_inputs", []), f"ops.{op}.constant_inputs", source),
                  zero_inputs=_ints(entry.get("zero_inputs", []), f"ops.{op}.zero_inputs", source),
                  nonnegative_inputs=_ints(entry.get("nonnegative_inputs", []), f"ops.{op}.nonnegative_inputs", source),
                  outputs=outputs)


def _default(op: str, attr: str):
    """The ONNX default of attribute ``attr`` of ``op`` (None when it has none)."""
    try:
        schema = onnx_schema(op)
    except Exception:  # noqa: BLE001 - not a standard op (edgefc's): no defaults
        return None
    a = schema.attributes.get(attr)
    if a is None or not a.default_value.name:
        return None
    import onnx

    return onnx.helper.get_attribute_value(a.default_value)


def onnx_schema(op: str):
    import onnx

    return onnx.defs.get_schema(op)


def _plain(v):
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, (np.integer, np.floating)):
        return v.item()
    return v


@dataclass(frozen=True)
class OpSupport:
    """The ``[ops]`` table: op type -> :class:`OpKind`."""

    kinds: Mapping[str, OpKind]

    @classmethod
    def from_table(cls, table, source: str = "<memory>") -> OpSupport:
        if table is None:
            raise TargetError(f"target description {source} has no table 'ops' (the op kinds the NPU runs; "
                              f"PERFORMANCE.md \"Which engine runs an op\")")
        if not isinstance(table, dict):
            raise TargetError(f"target description {source}: field 'ops' must be a table of op type -> entry")
        return cls(MappingProxyType({op: _kind(op, entry, source) for op, entry in table.items()}))

    def engine(self, op: str) -> str | None:
        """The engine that runs ``op`` (None: the NPU has no kernel for it)."""
        kind = self.kinds.get(op)
        return kind.engine if kind else None

    def rejects(self, node, is_const: Callable[[Any], bool], value_of: Callable[[Any], Any],
                graph_outputs: frozenset[str] = frozenset()) -> str | None:
        """Why the NPU kernel of ``node``'s op type cannot take this node (its attributes, a
        run-time operand it needs constant, a rank it does not take), or None. ``is_const`` tells
        whether a tensor is a compile-time constant, ``value_of`` gives a constant's value (None
        when unknown), ``graph_outputs`` names the graph's outputs (an output is used when a node
        reads it or it is one of them)."""
        kind = self.kinds[node.op]
        op = node.op
        if kind.spatial_ranks:
            x = node.inputs[0].shape if node.inputs else None
            if x is None:
                return f"{op} of unknown rank"
            rank = len(x) - 2
            if rank not in kind.spatial_ranks:
                return (f"{op} over {rank} spatial axes (the NPU's kernel takes "
                        f"{' or '.join(f'{r}-D' for r in kind.spatial_ranks)})")
            if op == "Resize":
                y = node.outputs[0].shape
                if y is None or list(y[:2]) != list(x[:2]):
                    return "Resize of the batch or channel axis (the NPU resizes the spatial axes)"
        for attr, allowed in kind.attrs.items():
            value = node.attrs.get(attr, _default(op, attr))
            if value is None:
                continue
            value = _plain(value)
            values = [_plain(v) for v in value] if isinstance(value, (list, tuple)) else [value]
            bad = [v for v in values if v not in allowed]
            if bad:
                return f"{op} {attr}={bad[0]} (the NPU's kernel takes {', '.join(map(str, allowed))})"
        for i in kind.constant_inputs + kind.zero_inputs + kind.nonnegative_inputs:
            t = node.inputs[i] if i < len(node.inputs) else None
            if t is None or not t.name:
                continue
            if not is_const(t):
                return f"{op} with a run-time input {i} (the NPU's kernel takes it as a constant)"
        for i in kind.zero_inputs + kind.nonnegative_inputs:
            t = node.inputs[i] if i < len(node.inputs) else None
            if t is None or not t.name:
                continue
            v = value_of(t)
            if v is None:
                return f"{op} input {i} is not known at compile time"
            v = np.asarray(v)
            if i in kind.zero_inputs and v.size and np.any(v != 0):
                return f"{op} with a non-zero input {i} (the NPU's kernel takes 0)"
            if i in kind.nonnegative_inputs and v.size and np.any(v < 0):
                return f"{op} with negative input {i} values (the NPU's kernel takes >= 0)"
        if kind.outputs:
            used = [t for t in node.outputs[kind.outputs:] if t is not None and t.name and (t.outputs or t.name in graph_outputs)]
            if used:
                return f"{op} with {len(node.outputs)} outputs used (the NPU's kernel writes {kind.outputs})"
        return None
