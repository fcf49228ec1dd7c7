"""A hardware description read from a TOML file (``targets/exynos2400.toml``).

The numbers live in the file, each with a comment saying where it comes from (STYLE.md: hardware
numbers in the target file, formulas in the cost model, tiling decisions in the solver). A missing,
mistyped or unknown field is a :class:`TargetError` naming the field; optional fields take the
defaults :data:`SCHEMA` gives (documented in PERFORMANCE.md).
"""

from __future__ import annotations

import copy
import tomllib
from pathlib import Path
from typing import Any

from edgefc.errors import TargetError
from edgefc.target import Target
from edgefc.targets.op_support import OpSupport

REQUIRED = object()   # a field without a default
NUMBER = (int, float)
VECTOR_CLASSES = ("arith", "max", "reduce", "exp", "divide")
RATE_KEYS = ("int8xint8", "int8xint16", "int16xint16", "fp16", "fp32")
ELEMENT_TYPES = ("fp32", "fp16", "int16", "int8")
# Vector-engine op classes: each names the element passes (per vector class) one op of the class
# makes; edgefc.targets.lowering maps op types onto them.
PASS_CLASSES = ("softmax", "causal_mask", "norm", "norm_silu", "silu", "gelu", "geglu", "sigmoid", "tanh", "erf",
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


class NpuTarget(Target):
    """A target described by a TOML file; fields are reachable as ``target["section.field"]``."""

    def __init__(self, data: dict, source: str = "<memory>"):
        unknown = _unknown_fields(data)
        if unknown:
            raise TargetError(f"target description {source} has an unknown field '{unknown[0]}' "
                              f"(PERFORMANCE.md lists the fields)")
        self.source = source
        self.values: dict[str, Any] = {}
        for field, (typ, default) in SCHEMA.items():
            try:
                value = _lookup(data, field)
            except KeyError:
                if default is REQUIRED:
                    raise TargetError(f"target description {source} has no field '{field}'") from None
                value = copy.deepcopy(default)
            _check(field, typ, value, source)
            self.values[field] = value
        bad = [d for d in self.values["tensor.dtypes"] if d not in ELEMENT_TYPES]
        if bad:
            raise TargetError(f"target description {source}: field 'tensor.dtypes' has '{bad[0]}' "
                              f"(element types: {', '.join(ELEMENT_TYPES)})")
        if self.values["sram.reserve_bytes"] >= self.values["sram.bytes"]:
            raise TargetError(f"target description {source}: field 'sram.reserve_bytes' must be less than "
                              f"sram.bytes, got {self.values['sram.reserve_bytes']!r}")
        if self.values["sram.weight_buffer_bytes"] >= self.values["sram.bytes"]:
            raise TargetError(f"target description {source}: sram.weight_buffer_bytes must be smaller than "
                              f"sram.bytes (the activations need the rest)")
        self.ops = OpSupport.from_table(data.get("ops"), source)   # what the NPU's engines run
        self.data = data
        self.name = self.values["target.name"]
        self.is_npu = self.values["target.kind"] == "npu"
        self.sram_bytes = int(self.values["sram.bytes"])
        self.sram_reserve_bytes = int(self.values["sram.reserve_bytes"])
        self.clock_hz = float(self.values["clock.hz"])
        self.row_granularity = int(self.values["tensor.row_granularity"])
        self._params = None
        self._geometry = None

    @property
    def validation(self) -> dict | None:
        """How well this target predicts measured latencies, as ``bench/fit_exynos2400.py``
        computed it (``<target>.validation.json`` beside the TOML; None when there is none)."""
        if self.source.startswith("<"):
            return None
        path = Path(self.source).with_suffix(".validation.json")
        try:
            import json

            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None

    def __getitem__(self, dotted: str) -> Any:
        """A schema field's value (its default when the file leaves it out)."""
        if dotted in self.values:
            return self.values[dotted]
        return _lookup(self.data, dotted)

    @classmethod
    def from_toml(cls, path: str | Path) -> NpuTarget:
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise TargetError(f"target description file not found: {path}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise TargetError(f"target description {path} is not valid TOML: {e}") from None
        return cls(data, str(path))

    def with_fields(self, fields: dict[str, Any]) -> NpuTarget:
        """A copy with some ``section.field`` values replaced (what-if studies, the fit, tests)."""
        data = copy.deepcopy(self.data)
        for dotted, value in fields.items():
            node = data
            *parents, leaf = dotted.split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = value
        return type(self)(data, self.source)

    # --- the cost model (targets/cost_model.py, targets/lowering.py) ---------------------------
    @property
    def params(self):
        """The numbers the cost formulas use (:class:`edgefc.targets.cost_model.CostParams`)."""
        if self._params is None:
            from edgefc.targets.cost_model import CostParams

            self._params = CostParams.from_target(self)
        return self._params

    @property
    def geometry(self):
        """The numbers the lowering uses (:class:`edgefc.targets.geometry.Geometry`)."""
        if self._geometry is None:
            from edgefc.targets.geometry import Geometry

            self._geometry = Geometry.from_target(self)
        return self._geometry

    def lower(self, graph, precision: str = "as-built"):
        """Graph -> :class:`edgefc.targets.program.Program` (commands and SRAM residency)."""
        from edgefc.targets.lowering import lower

        return lower(graph, self, precision)

    def profile(self, graph, precision: str = "as-built", schedule: str = "overlap", model: str = ""):
        """Lower and price ``graph``: a :class:`edgefc.targets.profile.Profile`."""
        from edgefc.targets.profile import build_profile

        return build_profile(self, graph, precision=precision, schedule=schedule, model=model)

    def attention_commands(self, spec, tiling):
        """The Program commands of one attention block (the same ones the graph lowering emits)."""
        from edgefc.targets.attention_block import lower_attention

        return lower_attention(spec, tiling, self.geometry)

    def attention_cycles(self, spec, tiling) -> float:
        """Cycles of one attention block under ``tiling``: every command of the block, priced by the
        cost model (DMA of Q/K/V/output, the matmuls, the softmax, S_in/S_out spills when the tile
        does not fit, hand-offs and dispatch) -- exactly what ``edgefc profile`` reports for it."""
        from edgefc.targets.cost_model import op_cycles

        return float(op_cycles(self.params, self.attention_commands(spec, tiling)))

    def attention_sram_bytes(self, spec, tiling) -> int:
        """SRAM working set of one tile of the block, padding included."""
        from edgefc.targets.attention_block import attention_sram_bytes

        return attention_sram_bytes(spec, tiling, self.geometry)

    def write_artifacts(self, graph, out_dir, ctx, report) -> None:
        """Called by ``edgefc compile``: write ``profile.json`` (the build priced as built) into the
        build folder and add a ``profile`` summary to ``report``."""
        from edgefc.targets.profile import build_profile

        precision = "as-built"
        prof = build_profile(self, graph, precision=precision, model=str(ctx.options.get("source_model") or ""))
        prof.write_json(Path(out_dir) / "profile.json")
        report["profile"] = {"file": "profile.json", "precision": precision, "total_ms": round(prof.total_ms, 6),
                             "sram_peak_bytes": prof.program.sram_peak_bytes,
                             "dma_bytes": prof.program.dma_bytes(), "macs": prof.program.macs()}
        if "tvm" in (ctx.options.get("emit") or ()):  # --emit tvm: TVM lowering (targets/tvm_lowering.py)
            from edgefc.targets.tvm_lowering import emit_tvm

            emit_tvm(graph, out_dir, ctx, report, prof.program)
