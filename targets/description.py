"""The architecture description: a target TOML file (``targets/exynos2400.toml``), validated once
into frozen data (:class:`Architecture`).

The numbers live in the file, each with a comment saying where it comes from (STYLE.md: hardware
numbers in the target file, formulas in the cost model, decisions in the Program). A missing,
mistyped or unknown field is a :class:`TargetError` naming the field; optional fields take the
defaults :data:`SCHEMA` gives (documented in PERFORMANCE.md). Everything downstream -- the cost
model, the lowering, the TVM build, the tile solver through ``edgefc.target.Target`` -- reads the
typed sections of one :class:`Architecture`; nothing reads the TOML's dotted keys again. This
module is data only: it imports nothing from the rest of ``edgefc.targets`` but the parser of the
``[ops]`` table (``op_support``, data only too).
"""

from __future__ import annotations

import copy
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

from edgefc.errors import TargetError
from edgefc.precision import ELEMENT_TYPES, RATE_KEYS
from edgefc.target import SramBudget
from edgefc.targets.op_support import OpSupport

REQUIRED = object()   # a field without a default
NUMBER = (int, float)
VECTOR_CLASSES = ("arith", "max", "reduce", "exp", "divide")
INT8_LUT = ("exp", "divide")   # vector classes the INT8 path computes by a 256-entry table lookup
# Vector-engine op classes: each names the element passes (per vector class) one op of the class
# makes; edgefc.targets.placement maps op types onto them.
PASS_CLASSES = ("softmax", "causal_mask", "deferred_softmax", "deferred_softmax_lut", "deferred_normalize", "norm", "norm_silu", "silu", "gelu", "geglu", "sigmoid", "tanh", "erf",
                "exp", "trig", "pow", "divide", "copy", "max", "clip", "hard_sigmoid", "leaky_relu", "reduce_mean",
                "reduce_sum", "reduce_max", "reduce_l2")


class Passes:
    """Type tag: a table of vector classes (``VECTOR_CLASSES``) -> whole passes (>= 0)."""


class StrList:
    """Type tag: a list of strings."""


# section.field -> (expected type, default). A field whose default is REQUIRED must be in the
# file; PERFORMANCE.md ("Target description") explains every field and each default. A field
# the schema does not name is an error, so a misspelt field never goes silently unused.
SCHEMA: dict[str, tuple] = {
    "target.name": (str, REQUIRED),
    "target.kind": (str, REQUIRED),
    "clock.hz": (NUMBER, REQUIRED),
    "sram.bytes": (int, REQUIRED),
    "sram.weight_buffer_bytes": (int, REQUIRED),
    "sram.reserve_bytes": (int, 0),
    "sram.resident_weights": (bool, REQUIRED),
    "sram.cascade": (bool, REQUIRED),
    "tensor.macs_per_cycle": (NUMBER, REQUIRED),
    "tensor.channel_granularity": (int, REQUIRED),
    "tensor.row_granularity": (int, REQUIRED),
    "tensor.efficiency": (NUMBER, REQUIRED),
    "tensor.output_elements_per_cycle": (NUMBER, REQUIRED),
    "tensor.dtypes": (StrList, list(ELEMENT_TYPES)),
    **{f"tensor.rate.{k}": (NUMBER, REQUIRED) for k in RATE_KEYS},
    "vector.lanes": (NUMBER, REQUIRED),
    **{f"vector.cycles_per_element.{c}": (NUMBER, REQUIRED) for c in VECTOR_CLASSES},
    "vector.int8.elements_per_lane": (NUMBER, REQUIRED),
    "vector.int8.exp": (NUMBER, REQUIRED),
    "vector.int8.divide": (NUMBER, REQUIRED),
    **{f"vector.passes.{c}": (Passes, REQUIRED) for c in PASS_CLASSES},
    "dma.bandwidth_bytes_per_s": (NUMBER, REQUIRED),
    "dma.efficiency": (NUMBER, REQUIRED),
    "dma.latency_cycles": (NUMBER, REQUIRED),
    "dma.burst_bytes": (NUMBER, REQUIRED),
    "dispatch.cycles": (NUMBER, REQUIRED),
    "handoff.cycles": (NUMBER, REQUIRED),
    "handoff.per_matmul": (int, 1),
    "handoff.per_softmax": (int, 2),
    "host.sync_cycles": (NUMBER, REQUIRED),
    "host.cycles_per_element": (NUMBER, REQUIRED),
    "host.cpu.tag": (str, ""),
    "host.cpu.mtriple": (str, ""),
    "host.cpu.mcpu": (str, ""),
    "host.cpu.mattr": (StrList, []),
    "host.cpu.num_cores": (int, 1),
}
# numeric fields that must be > 0 (the rest must be >= 0)
POSITIVE = {"clock.hz", "sram.bytes", "tensor.macs_per_cycle", "tensor.channel_granularity",
            "tensor.row_granularity", "tensor.efficiency", "tensor.output_elements_per_cycle",
            *(f"tensor.rate.{k}" for k in RATE_KEYS), "vector.lanes", "vector.int8.elements_per_lane",
            "dma.bandwidth_bytes_per_s",
            "dma.efficiency", "dma.burst_bytes", "host.cpu.num_cores"}
_TABLES = {".".join(f.split(".")[:i]) for f in SCHEMA for i in range(1, f.count(".") + 1)}


# --- the typed, frozen description -----------------------------------------------------------

@dataclass(frozen=True)
class TensorEngine:
    """``[tensor]``: the MAC array."""

    macs_per_cycle: float
    channel_granularity: int          # input/output channels (and head dims) are padded to this
    row_granularity: int              # output rows (pixels / tokens) are produced in groups of this
    efficiency: float                 # sustained fraction of the padded MAC rate
    output_elements_per_cycle: float  # write-back / requantisation rate
    rate: Mapping[str, float]         # operand precision (RATE_KEYS) -> MACs per MAC unit per cycle
    dtypes: tuple[str, ...]           # element types an NPU tensor may have


@dataclass(frozen=True)
class VectorEngine:
    """``[vector]``: the SIMD lanes, the cost of one element pass per vector class, and the passes
    one op of each op class makes."""

    lanes: float
    cycles_per_element: Mapping[str, float]       # vector class -> lane-cycles (16-bit and wider)
    int8_cycles_per_element: Mapping[str, float]  # the INT8 path (exp / divide: table lookups)
    int8_elements_per_lane: float                 # INT8 elements one 16-bit lane handles per cycle
    passes: Mapping[str, tuple]                   # op class -> ((vector class, passes), ...), zero counts dropped


@dataclass(frozen=True)
class Dma:
    """``[dma]``: the DRAM <-> SRAM transfers."""

    bandwidth_bytes_per_s: float   # peak
    efficiency: float              # sustained fraction of the peak
    latency_cycles: float          # issue to first data beat
    burst_bytes: float             # DRAM access granule
    bytes_per_cycle: float         # sustained: bandwidth * efficiency / clock
    peak_bytes_per_cycle: float    # bandwidth / clock


@dataclass(frozen=True)
class Handoff:
    """``[handoff]``: engine-to-engine synchronisation of an attention tile."""

    cycles: float
    per_matmul: int
    per_softmax: int


@dataclass(frozen=True)
class HostCpu:
    """``[host.cpu]``: the phone's application CPU the TVM host build is compiled for."""

    tag: str
    mtriple: str
    mcpu: str
    mattr: tuple[str, ...]
    num_cores: int


@dataclass(frozen=True)
class Host:
    """``[host]``: ops the NPU cannot run."""

    sync_cycles: float
    cycles_per_element: float
    cpu: HostCpu


@dataclass(frozen=True)
class Architecture:
    """One target description, validated once: every number the cost model, the lowering, the
    tile solver and the TVM build read, in typed sections. Build it with :meth:`from_toml` /
    :meth:`from_dict`; :meth:`with_fields` gives a changed copy (what-if studies, the fit)."""

    name: str
    kind: str
    clock_hz: float
    sram: SramBudget
    resident_weights: bool            # weights that fit beside the activations stay in SRAM
    cascade: bool                     # row-stripe cascades keep too-big activations on chip
    tensor: TensorEngine
    vector: VectorEngine
    dma: Dma
    dispatch_cycles: float            # launching one op
    handoff: Handoff
    host: Host
    ops: OpSupport                    # [ops]: the op kinds the engines run, their limits and sources
    source: str = "<memory>"
    validation: Mapping | None = field(default=None, compare=False, repr=False)
    raw: Mapping = field(default_factory=dict, compare=False, repr=False)   # the file's tables, for with_fields

    @property
    def is_npu(self) -> bool:
        return self.kind == "npu"

    @classmethod
    def from_toml(cls, path: str | Path) -> Architecture:
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise TargetError(f"target description file not found: {path}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise TargetError(f"target description {path} is not valid TOML: {e}") from None
        return cls.from_dict(data, str(path), _validation_beside(path))

    @classmethod
    def from_dict(cls, data: dict, source: str = "<memory>", validation: dict | None = None) -> Architecture:
        """Validate the tables of a target file (field names as in the TOML) and build the description."""
        v = _validated(data, source)
        clock = float(v["clock.hz"])
        cpe = {c: float(v[f"vector.cycles_per_element.{c}"]) for c in VECTOR_CLASSES}
        return cls(
            name=v["target.name"], kind=v["target.kind"], clock_hz=clock,
            sram=SramBudget(int(v["sram.bytes"]), int(v["sram.weight_buffer_bytes"]), int(v["sram.reserve_bytes"])),
            resident_weights=bool(v["sram.resident_weights"]), cascade=bool(v["sram.cascade"]),
            tensor=TensorEngine(
                macs_per_cycle=float(v["tensor.macs_per_cycle"]),
                channel_granularity=int(v["tensor.channel_granularity"]),
                row_granularity=int(v["tensor.row_granularity"]),
                efficiency=float(v["tensor.efficiency"]),
                output_elements_per_cycle=float(v["tensor.output_elements_per_cycle"]),
                rate=MappingProxyType({k: float(v[f"tensor.rate.{k}"]) for k in RATE_KEYS}),
                dtypes=tuple(v["tensor.dtypes"])),
            vector=VectorEngine(
                lanes=float(v["vector.lanes"]),
                cycles_per_element=MappingProxyType(cpe),
                int8_cycles_per_element=MappingProxyType(
                    {c: float(v[f"vector.int8.{c}"]) if c in INT8_LUT else cpe[c] for c in VECTOR_CLASSES}),
                int8_elements_per_lane=float(v["vector.int8.elements_per_lane"]),
                passes=MappingProxyType({c: tuple(sorted((k, int(n)) for k, n in v[f"vector.passes.{c}"].items() if n))
                                         for c in PASS_CLASSES})),
            dma=Dma(
                bandwidth_bytes_per_s=float(v["dma.bandwidth_bytes_per_s"]),
                efficiency=float(v["dma.efficiency"]),
                latency_cycles=float(v["dma.latency_cycles"]),
                burst_bytes=float(v["dma.burst_bytes"]),
                bytes_per_cycle=float(v["dma.bandwidth_bytes_per_s"]) * float(v["dma.efficiency"]) / clock,
                peak_bytes_per_cycle=float(v["dma.bandwidth_bytes_per_s"]) / clock),
            dispatch_cycles=float(v["dispatch.cycles"]),
            handoff=Handoff(float(v["handoff.cycles"]), int(v["handoff.per_matmul"]), int(v["handoff.per_softmax"])),
            host=Host(float(v["host.sync_cycles"]), float(v["host.cycles_per_element"]),
                      HostCpu(v["host.cpu.tag"], v["host.cpu.mtriple"], v["host.cpu.mcpu"], tuple(v["host.cpu.mattr"]),
                              int(v["host.cpu.num_cores"]))),
            ops=OpSupport.from_table(data.get("ops"), source),
            source=source, validation=validation, raw=copy.deepcopy(data))

    def with_fields(self, fields: dict[str, Any]) -> Architecture:
        """A copy with some ``section.field`` values (the TOML's names) replaced, validated again."""
        data = copy.deepcopy(dict(self.raw))
        for dotted, value in fields.items():
            node = data
            *parents, leaf = dotted.split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = value
        return type(self).from_dict(data, self.source, self.validation)

    def value(self, dotted: str) -> Any:
        """A field's validated value by its TOML name (``"dma.efficiency"``): for tools that edit
        fields by name (the fit, sweeps); the compiler itself reads the typed sections."""
        return _validated(self.raw, self.source)[dotted]


def _validation_beside(path: Path) -> dict | None:
    """How well this target predicts measured latencies, as ``bench/fit_exynos2400.py`` computed it
    (``<target>.validation.json`` beside the TOML; None when there is none)."""
    try:
        return json.loads(path.with_suffix(".validation.json").read_text())
    except (OSError, ValueError):
        return None


# --- validation ------------------------------------------------------------------------------

def _lookup(data: dict, dotted: str) -> Any:
    node: Any = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(dotted)
        node = node[part]
    return node


def _unknown_fields(data: dict, prefix: str = "") -> list[str]:
    """Dotted names in ``data`` that the schema does not declare."""
    out = []
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if dotted in SCHEMA or dotted == "ops":   # [ops]: validated by OpSupport
            continue
        if dotted in _TABLES and isinstance(value, dict):
            out += _unknown_fields(value, dotted + ".")
        else:
            out.append(dotted)
    return out


def _type_name(typ) -> str:
    if typ is Passes:
        return f"a table of whole pass counts by vector class ({', '.join(VECTOR_CLASSES)})"
    if typ is StrList:
        return "a list of strings"
    return typ.__name__ if isinstance(typ, type) else " or ".join(t.__name__ for t in typ)


def _check(field: str, typ, value, source: str) -> None:
    def bad(want: str):
        raise TargetError(f"target description {source}: field '{field}' must be {want}, got {value!r}")

    if typ is Passes:
        if (not isinstance(value, dict) or any(k not in VECTOR_CLASSES for k in value)
                or any(isinstance(n, bool) or not isinstance(n, int) or n < 0 for n in value.values())):
            bad(_type_name(typ))
        return
    if typ is StrList:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            bad(_type_name(typ))
        return
    if typ is bool:
        if not isinstance(value, bool):
            bad("bool")
        return
    if isinstance(value, bool) or not isinstance(value, typ):
        bad(_type_name(typ))
    if typ in (int, NUMBER) and (value <= 0 if field in POSITIVE else value < 0):
        bad("positive" if field in POSITIVE else "zero or more")


def _validated(data: dict, source: str) -> dict[str, Any]:
    """Every schema field's value (its default when the file leaves it out), checked."""
    unknown = _unknown_fields(data)
    if unknown:
        raise TargetError(f"target description {source} has an unknown field '{unknown[0]}' "
                          f"(PERFORMANCE.md lists the fields)")
    values: dict[str, Any] = {}
    for name, (typ, default) in SCHEMA.items():
        try:
            value = _lookup(data, name)
        except KeyError:
            if default is REQUIRED:
                raise TargetError(f"target description {source} has no field '{name}'") from None
            value = copy.deepcopy(default)
        _check(name, typ, value, source)
        values[name] = value
    bad = [d for d in values["tensor.dtypes"] if d not in ELEMENT_TYPES]
    if bad:
        raise TargetError(f"target description {source}: field 'tensor.dtypes' has '{bad[0]}' "
                          f"(element types: {', '.join(ELEMENT_TYPES)})")
    if values["sram.reserve_bytes"] >= values["sram.bytes"]:
        raise TargetError(f"target description {source}: field 'sram.reserve_bytes' must be less than "
                          f"sram.bytes, got {values['sram.reserve_bytes']!r}")
    if values["sram.weight_buffer_bytes"] >= values["sram.bytes"]:
        raise TargetError(f"target description {source}: sram.weight_buffer_bytes must be smaller than "
                          f"sram.bytes (the activations need the rest)")
    return values
