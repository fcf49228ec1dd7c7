"""The NPU target: an :class:`~edgefc.targets.description.Architecture` (the validated TOML) behind
the interface core defines (:class:`edgefc.target.Target`).

:class:`NpuTarget` answers what core, the passes and the CLI ask of a target -- the attention
block's SRAM working set and cycles for the MLT solver, a profile of a graph, the build folder's
``profile.json`` (and the TVM lowering with ``--emit tvm``) -- by handing its description to the
lowering, the cost model and the profile. It holds no numbers of its own: every one is read from
``arch``. It is the only module of ``edgefc.targets`` that imports the others' entry points, and
none imports it but the package's ``__init__`` (which registers the built-in targets).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgefc.target import Target
from edgefc.targets import schedule as schedules
from edgefc.targets.attention_block import attention_sram_bytes, lower_attention
from edgefc.targets.cost_model import SCHEDULES, block_cycles
from edgefc.targets.description import Architecture
from edgefc.targets.lowering import lower
from edgefc.targets.profile import Profile, build_profile
from edgefc.targets.program import Command, Program

PIPELINED, SEQUENTIAL = "pipelined", "sequential"   # the ways a tiled attention block can run
PACKED = "packed-operands"                          # ... with its DRAM operands unpadded


class NpuTarget(Target):
    """A target described by a TOML file (:meth:`from_toml`); ``arch`` is its description."""

    has_cost_model = True

    def __init__(self, arch: Architecture):
        self.arch = arch
        self.name = arch.name
        self.is_npu = arch.is_npu
        self.clock_hz = arch.clock_hz
        self.row_granularity = arch.tensor.row_granularity
        self.sram = arch.sram
        self.description_file = None if arch.source.startswith("<") else str(arch.source)

    def __repr__(self) -> str:
        return f"NpuTarget({self.name!r} from {self.arch.source})"

    @classmethod
    def from_toml(cls, path: str | Path) -> NpuTarget:
        """Read and validate a target description file."""
        return cls(Architecture.from_toml(path))

    def with_fields(self, fields: dict[str, Any]) -> NpuTarget:
        """A copy with some ``section.field`` values replaced (what-if studies, the fit, tests)."""
        return type(self)(self.arch.with_fields(fields))

    @property
    def validation(self) -> dict | None:
        """How well this target predicts measured latencies (``<target>.validation.json``)."""
        return self.arch.validation

    # --- what core calls (edgefc.target.Target) --------------------------------------------------
    def schedule(self, name: str | None = None) -> schedules.ScheduleSpec:
        """A schedule by name (``targets/schedule.py``; None: the default, ``best``), or a
        TargetError naming the choices."""
        return schedules.parse(name, tuple(SCHEDULES))

    def attention_variants(self, schedule: str | None = None) -> tuple[str, ...]:
        """The ways a tiled attention block can run under ``schedule``, preferred first: as a
        pipeline across the engines (``pipelined-mlt``), else one tile after another; with
        ``packed-operands`` both name it (``pipelined+packed-operands``)."""
        spec = self.schedule(schedule)
        how = (PIPELINED, SEQUENTIAL) if spec.has("pipelined-mlt") else (SEQUENTIAL,)
        return tuple(f"{h}+{PACKED}" for h in how) if spec.has(PACKED) else how

    def attention_commands(self, spec, tiling, variant: str = SEQUENTIAL) -> list[Command]:
        """The Program commands of one attention block (the same ones the graph lowering emits)."""
        how, *extra = variant.split("+")
        return lower_attention(spec, tiling, self.arch, pipelined=how == PIPELINED, packed=PACKED in extra)

    def attention_cycles(self, spec, tiling, variant: str = SEQUENTIAL) -> float:
        """Cycles of one attention block under ``tiling``: every command of the block, priced by the
        cost model (DMA of Q/K/V/output, the matmuls, the softmax, S_in/S_out spills when the tile
        does not fit, hand-offs and dispatch; ``pipelined``: the tiles as a pipeline across the
        engines) -- exactly what ``edgefc profile`` reports for it."""
        return float(block_cycles(self.arch, self.attention_commands(spec, tiling, variant)))

    def attention_sram_bytes(self, spec, tiling, variant: str = SEQUENTIAL) -> int:
        """SRAM working set of one tile of the block, padding included (``pipelined``: with the
        second buffer of every per-tile buffer)."""
        return attention_sram_bytes(spec, tiling, self.arch, pipelined=variant.split("+")[0] == PIPELINED)

    def lower(self, graph, precision: str = "as-built", schedule: str | None = schedules.FITTED) -> Program:
        """Graph -> :class:`~edgefc.targets.program.Program` (commands, SRAM residency and the
        decisions of ``schedule``'s mechanisms)."""
        return lower(graph, self.arch, precision, self.schedule(schedule))

    def profile(self, graph, precision: str = "as-built", schedule: str | None = None, model: str = "") -> Profile:
        """Lower and price ``graph`` under ``schedule`` (default ``best``): a
        :class:`~edgefc.targets.profile.Profile`."""
        return build_profile(self, graph, precision=precision, schedule=schedule, model=model)

    def write_artifacts(self, graph, out_dir, ctx, report) -> None:
        """Called by ``edgefc compile``: write ``profile.json`` (the build priced as built, under the
        compile's ``--schedule``) into the build folder and add a ``profile`` summary to ``report``."""
        precision = "as-built"
        prof = build_profile(self, graph, precision=precision, schedule=ctx.options.get("schedule"),
                             model=str(ctx.options.get("source_model") or ""))
        prof.reproducibility = report.get("reproducibility")
        prof.write_json(Path(out_dir) / "profile.json")
        report["profile"] = {"file": "profile.json", "precision": precision, "schedule": prof.schedule,
                             "total_ms": round(prof.total_ms, 6),
                             "sram_peak_bytes": prof.program.sram_peak_bytes,
                             "dma_bytes": prof.program.dma_bytes(), "macs": prof.program.macs()}
        if "tvm" in (ctx.options.get("emit") or ()):  # --emit tvm: TVM lowering (targets/tvm_lowering.py)
            from edgefc.targets.tvm_lowering import emit_tvm  # imports TVM: only when asked for

            emit_tvm(graph, out_dir, ctx, report, prof.program, self.arch)
