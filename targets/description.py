"""A hardware description read from a TOML file (``targets/exynos2400.toml``).

The numbers live in the file, each with a comment saying where it comes from (STYLE.md: hardware
numbers in the target file, formulas in the cost model, tiling decisions in the solver). A missing
or mistyped field is a :class:`TargetError` naming the field.
"""

from __future__ import annotations

import copy
import tomllib
from pathlib import Path
from typing import Any

from edgefc.errors import TargetError
from edgefc.target import Target

# section.field -> expected type; every field is required (PERFORMANCE.md explains each one).
NUMBER = (int, float)
SCHEMA: dict[str, type | tuple[type, ...]] = {
    "target.name": str,
    "target.kind": str,
    "clock.hz": NUMBER,
    "sram.bytes": int,
    "sram.weight_buffer_bytes": int,
    "sram.resident_weights": bool,
    "sram.cascade": bool,
    "tensor.macs_per_cycle": NUMBER,
    "tensor.channel_granularity": int,
    "tensor.row_granularity": int,
    "tensor.efficiency": NUMBER,
    "tensor.output_elements_per_cycle": NUMBER,
    "tensor.rate.int8xint8": NUMBER,
    "tensor.rate.int8xint16": NUMBER,
    "tensor.rate.int16xint16": NUMBER,
    "tensor.rate.fp16": NUMBER,
    "tensor.rate.fp32": NUMBER,
    "vector.lanes": NUMBER,
    "vector.cycles_per_element.arith": NUMBER,
    "vector.cycles_per_element.max": NUMBER,
    "vector.cycles_per_element.reduce": NUMBER,
    "vector.cycles_per_element.exp": NUMBER,
    "vector.cycles_per_element.divide": NUMBER,
    "vector.int8.elements_per_lane": NUMBER,
    "vector.int8.exp": NUMBER,
    "vector.int8.divide": NUMBER,
    "dma.bandwidth_bytes_per_s": NUMBER,
    "dma.efficiency": NUMBER,
    "dma.latency_cycles": NUMBER,
    "dma.burst_bytes": NUMBER,
    "dispatch.cycles": NUMBER,
    "handoff.cycles": NUMBER,
    "host.sync_cycles": NUMBER,
    "host.cycles_per_element": NUMBER,
}
# numeric fields that must be > 0 (the rest must be >= 0)
POSITIVE = {"clock.hz", "sram.bytes", "tensor.macs_per_cycle", "tensor.channel_granularity",
            "tensor.row_granularity", "tensor.efficiency", "tensor.output_elements_per_cycle",
            "tensor.rate.int8xint8", "tensor.rate.int8xint16", "tensor.rate.int16xint16", "tensor.rate.fp16",
            "tensor.rate.fp32", "vector.lanes", "vector.int8.elements_per_lane", "dma.bandwidth_bytes_per_s", "dma.efficiency", "dma.burst_bytes"}


def _lookup(data: dict, dotted: str) -> Any:
    node: Any = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(dotted)
        node = node[part]
    return node


class NpuTarget(Target):
    """A target described by a TOML file; fields are reachable as ``target["section.field"]``."""

    def __init__(self, data: dict, source: str = "<memory>"):
        self.data = data
        self.source = source
        for field, typ in SCHEMA.items():
            try:
                value = _lookup(data, field)
            except KeyError:
                raise TargetError(f"target description {source} has no field '{field}'") from None
            if (isinstance(value, bool) and typ is not bool) or not isinstance(value, typ):
                want = typ.__name__ if isinstance(typ, type) else " or ".join(t.__name__ for t in typ)
                raise TargetError(f"target description {source}: field '{field}' must be {want}, got {value!r}")
            if typ in (int, NUMBER) and (value <= 0 if field in POSITIVE else value < 0):
                bound = "positive" if field in POSITIVE else "zero or more"
                raise TargetError(f"target description {source}: field '{field}' must be {bound}, got {value!r}")
        if int(data["sram"]["weight_buffer_bytes"]) >= int(data["sram"]["bytes"]):
            raise TargetError(f"target description {source}: sram.weight_buffer_bytes must be smaller than "
                              f"sram.bytes (the activations need the rest)")
        self.name = data["target"]["name"]
        self.is_npu = data["target"]["kind"] == "npu"
        self.sram_bytes = int(data["sram"]["bytes"])
        self.clock_hz = float(data["clock"]["hz"])
        self.row_granularity = int(data["tensor"]["row_granularity"])
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
        """The numbers the lowering uses (:class:`edgefc.targets.lowering.Geometry`)."""
        if self._geometry is None:
            from edgefc.targets.lowering import Geometry

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
        from edgefc.targets.lowering import lower_attention

        return lower_attention(spec, tiling, self.geometry)

    def attention_cycles(self, spec, tiling) -> float:
        """Cycles of one attention block under ``tiling``: every command of the block, priced by the
        cost model (DMA of Q/K/V/output, the matmuls, the softmax, S_in/S_out spills when the tile
        does not fit, hand-offs and dispatch) -- exactly what ``edgefc profile`` reports for it."""
        from edgefc.targets.cost_model import op_cycles

        return float(op_cycles(self.params, self.attention_commands(spec, tiling)))

    def attention_sram_bytes(self, spec, tiling) -> int:
        """SRAM working set of one tile of the block, padding included."""
        from edgefc.targets.lowering import attention_sram_bytes

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

            emit_tvm(graph, out_dir, ctx, report)
