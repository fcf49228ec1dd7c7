"""Profile: a priced Program as data (JSON first), built by :func:`build_profile`.

:func:`build_profile` lowers a graph to the Program under a schedule, prices every command with
the cost model and schedules them; :class:`Profile` holds the result per command and per op, with
its summaries (``to_dict`` is ``profile.json``): per op, block and model the modelled time, the
DMA it exposes and its **roofline** -- the time if every engine ran at its peak rate for the op and
all engines overlapped perfectly (``max`` over the engines of their peak-rate cycles,
``cost_model.roofline_cycles``; for a block or the model, of the engines' sums over its ops) --
so a build is judged against what the hardware allows. Its views (table, CSV, trace, PNG) are
``targets/profile_views.py``; the paper's Table 6 breakdown is ``targets/table6.py``.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from edgefc.errors import TargetError
from edgefc.targets import profile_views as views
from edgefc.targets.cost_model import SCHEDULES, command_cycles, roofline_cycles
from edgefc.targets.lowering import lower
from edgefc.targets.profile_views import validation_line
from edgefc.targets.program import ENGINES, Program
from edgefc.targets.table6 import attention_breakdown, role_cycles

__all__ = ["OpRow", "Profile", "attention_breakdown", "build_profile", "role_cycles", "validation_line"]


@dataclass


class OpRow:
    """One graph node's share of the profile."""

    name: str
    op_type: str
    engine: str
    block: str
    precision: str = ""       # tensor ops: the [tensor.rate] key their MACs were priced at ("a+b": an attention whose two matmuls run at two keys)
    macs: int = 0
    dma_bytes: int = 0
    cycles: float = 0.0
    ms: float = 0.0
    share: float = 0.0
    roofline_ms: float = 0.0     # every engine at its peak for this op, perfectly overlapped
    exposed_dma_ms: float = 0.0  # what its DMA added beyond its compute (after the previous ops' compute)

    @property
    def ratio(self) -> float:
        """Modelled time over the roofline (1 = at the roofline)."""
        return self.ms / self.roofline_ms if self.roofline_ms > 0 else float("inf") if self.ms > 0 else 1.0

    def as_dict(self) -> dict:
        return {"name": self.name, "op_type": self.op_type, "engine": self.engine, "block": self.block,
                "precision": self.precision or None, "macs": int(self.macs), "dma_bytes": int(self.dma_bytes), "cycles": round(self.cycles, 1),
                "ms": round(self.ms, 6), "share": round(self.share, 4), "roofline_ms": round(self.roofline_ms, 6),
                "exposed_dma_ms": round(self.exposed_dma_ms, 6)}


@dataclass


class Profile:
    """A priced Program: per-command cycles and start times, per-op rows, summaries."""

    target: str
    clock_hz: float
    program: Program
    cycles: list[float]
    starts: list[float]
    total_cycles: float
    idle: list[float] = field(default_factory=list)   # exposed dispatch after each command
    hidden: list[float] = field(default_factory=list)  # cycles of each command overlapped by others
    schedule: str = "overlap"
    model: str = ""
    attention_breakdown: dict | None = None
    ops: list[OpRow] = field(default_factory=list)
    validation: dict | None = None   # the target's validation figures (bench/fit_exynos2400.py)
    roof: list[float] = field(default_factory=list)    # per command: its cycles at the engine's peak
    instances: dict = field(default_factory=dict)      # command -> start of each instance (pipelined)
    exposed_dma: dict = field(default_factory=dict)    # op -> exposed DMA cycles
    warnings: list[str] = field(default_factory=list)   # what the pricing could not honour (edgefc profile)
    reproducibility: dict | None = None  # how the profile (or its build) was made: versions, options, command

    def __post_init__(self):
        if not self.ops:
            self.ops = self._op_rows()

    # data -------------------------------------------------------------------------------------
    @property
    def total_ms(self) -> float:
        return self.total_cycles / self.clock_hz * 1e3

    def ms(self, cycles: float) -> float:
        return cycles / self.clock_hz * 1e3

    def _op_rows(self) -> list[OpRow]:
        rows = {o.name: OpRow(o.name, o.op_type, o.engine, o.block) for o in self.program.ops}
        idle = self.idle or [0.0] * len(self.cycles)
        hidden = self.hidden or [0.0] * len(self.cycles)
        for c, cyc, gap, hid in zip(self.program.commands, self.cycles, idle, hidden):
            cyc = cyc - hid
            row = rows.get(c.op)
            if row is None:
                row = rows[c.op] = OpRow(c.op, c.op_type, c.engine, "(top)")
            row.cycles += cyc + gap
            if c.kind in ("load", "store"):
                row.dma_bytes += c.total_bytes
            elif c.kind == "tensor":
                row.macs += c.total_macs
                # an attention whose S_out x V runs wider than its QK^T (W8A8 with an INT16 S_out)
                # names both keys, QK^T first: "int8xint8+int8xint16"
                if c.precision not in row.precision.split("+"):
                    row.precision = f"{row.precision}+{c.precision}" if row.precision else c.precision
        total = self.total_cycles or 1.0
        roof = self._roof_by_op()
        for row in rows.values():
            row.ms = self.ms(row.cycles)
            row.share = row.cycles / total
            row.roofline_ms = self.ms(max(roof.get(row.name, {}).values(), default=0.0))
            row.exposed_dma_ms = self.ms(self.exposed_dma.get(row.name, 0.0))
        return list(rows.values())

    # roofline ---------------------------------------------------------------------------------
    def _roof_by_op(self) -> dict[str, dict[str, float]]:
        """op -> engine -> its commands' cycles at the engine's peak."""
        out: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        for c, r in zip(self.program.commands, self.roof or [0.0] * len(self.program.commands)):
            out[c.op][c.engine] += r
        return out

    def roofline_engines(self, ops=None) -> dict[str, float]:
        """Peak-rate cycles of each engine summed over ``ops`` (op names; default all)."""
        keep = None if ops is None else set(ops)
        out = {e: 0.0 for e in ENGINES}
        for name, eng in self._roof_by_op().items():
            if keep is None or name in keep:
                for e, v in eng.items():
                    out[e] += v
        return out

    @property
    def roofline_ms(self) -> float:
        """The model's roofline: every engine at its peak, all perfectly overlapped over the whole
        model -- the largest engine total."""
        return self.ms(max(self.roofline_engines().values(), default=0.0))

    def roofline(self) -> dict:
        """The roofline of the model and of each block (ms), its per-engine parts and the ratio of
        the modelled time to it; blocks furthest from their roofline first."""
        eng = self.roofline_engines()
        by_block: dict[str, list[str]] = defaultdict(list)
        for r in self.ops:
            by_block[r.block].append(r.name)
        modelled = self.by("block")
        blocks = {}
        for b, names in by_block.items():
            roof = self.ms(max(self.roofline_engines(names).values(), default=0.0))
            ms = self.ms(modelled.get(b, 0.0))
            blocks[b] = {"ms": round(ms, 6), "roofline_ms": round(roof, 6),
                         "ratio": round(ms / roof, 4) if roof > 0 else None, "gap_ms": round(ms - roof, 6)}
        total = self.roofline_ms
        return {"total_ms": round(total, 6), "ratio": round(self.total_ms / total, 4) if total > 0 else None,
                "engines_ms": {e: round(self.ms(v), 6) for e, v in eng.items()},
                "blocks": dict(sorted(blocks.items(), key=lambda kv: -kv[1]["gap_ms"]))}

    def by(self, key: str) -> dict[str, float]:
        """Cycles grouped by ``op_type``, ``block`` or ``engine`` of the op (DMA counted with its op)."""
        out: dict[str, float] = defaultdict(float)
        for r in self.ops:
            out[getattr(r, key)] += r.cycles
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))

    def by_command_engine(self) -> dict[str, float]:
        """Cycles spent on each engine (DMA separately), whatever op the command belongs to, and
        the exposed dispatch (``dispatch``: ops shorter than their dispatch time)."""
        out = {e: 0.0 for e in ENGINES}
        for c, cyc in zip(self.program.commands, self.cycles):
            out[c.engine] += cyc
        out["dispatch"] = float(sum(self.idle))
        return out

    def to_dict(self) -> dict:
        eng = self.by_command_engine()
        return {
            "model": self.model,
            "component": self.program.component,
            "target": self.target,
            "precision": self.program.precision,
            "schedule": self.schedule,
            "clock_hz": self.clock_hz,
            "total_ms": round(self.total_ms, 6),
            "roofline_ms": round(self.roofline_ms, 6),
            "roofline": self.roofline(),
            "exposed_dma_ms": round(self.ms(sum(self.exposed_dma.values())), 6),
            "total_cycles": round(self.total_cycles, 1),
            "macs": int(self.program.macs()),
            "dma_bytes": int(self.program.dma_bytes()),
            "sram_peak_bytes": int(self.program.sram_peak_bytes),
            "weight_bytes": int(self.program.weight_bytes),
            "resident_weight_bytes": int(self.program.resident_weight_bytes),
            "engines_ms": {e: round(self.ms(c), 6) for e, c in eng.items()},
            "blocks_ms": {k: round(self.ms(v), 6) for k, v in self.by("block").items()},
            "op_types_ms": {k: round(self.ms(v), 6) for k, v in self.by("op_type").items()},
            "residency": self.residency(),
            "host_ops": self.host_ops(),
            "attention_blocks": self.attention_blocks(),
            "ops": [r.as_dict() for r in self.ops],
            "attention_breakdown": self.attention_breakdown,
            "validation": self.validation,
            "validation_summary": validation_line(self.validation),
            "warnings": list(self.warnings),
            "reproducibility": self.reproducibility,
        }

    def residency(self) -> dict:
        """Where each activation lives, and why each one that is not in SRAM is not."""
        prog = self.program
        out = {"sram": 0, "dram": 0, "stream": 0}
        for where in prog.residency.values():
            out[where] += 1
        listed = sorted(((r, prog.tensor_bytes.get(r, 0)) for r, w in prog.residency.items() if w != "sram"),
                        key=lambda x: (-x[1], x[0]))
        out["dram_bytes"] = int(sum(b for r, b in listed if prog.residency[r] == "dram"))
        out["tensors"] = [{"name": r, "bytes": int(b), "where": prog.residency[r], "reason": prog.reasons.get(r, "")}
                          for r, b in listed]
        return out

    def host_ops(self) -> dict:
        """The ops the host runs, grouped by op type: how many, their modelled time and share of
        the total, and placement's reasons (``Program.host_reasons``) with how many ops each."""
        groups: dict[str, dict] = {}
        for r in self.ops:
            if r.engine != "host":
                continue
            g = groups.setdefault(r.op_type, {"op_type": r.op_type, "count": 0, "cycles": 0.0, "reasons": {}})
            g["count"] += 1
            g["cycles"] += r.cycles
            reason = self.program.host_reasons.get(r.name, "")
            g["reasons"][reason] = g["reasons"].get(reason, 0) + 1
        total = self.total_cycles or 1.0
        rows = []
        for g in sorted(groups.values(), key=lambda g: -g["cycles"]):
            rows.append({"op_type": g["op_type"], "count": g["count"], "ms": round(self.ms(g["cycles"]), 6),
                         "share": round(g["cycles"] / total, 4),
                         "reasons": dict(sorted(g["reasons"].items(), key=lambda kv: -kv[1]))})
        cycles = sum(g["cycles"] for g in groups.values())
        return {"count": sum(g["count"] for g in groups.values()), "ms": round(self.ms(cycles), 6),
                "share": round(cycles / total, 4), "by_op_type": rows}

    def attention_blocks(self) -> list[dict]:
        """Every attention op: its shape, tiling, SRAM working set and whether S_in/S_out spill."""
        out = []
        for o in self.program.ops:
            if o.attention is None:
                continue
            spec, tiling = o.attention
            cmds = [c for c in self.program.commands if c.op == o.name]
            out.append({"name": o.name, "heads": spec.heads, "q_len": spec.q_len, "kv_len": spec.kv_len,
                        "head_dim": spec.head_dim, "row_tiles": tiling.row_tiles, "head_tiles": tiling.head_tiles,
                        "s_spills_to_dram": any(c.role == "store_s_in" for c in cmds),
                        "pipelined": any(c.pipelined for c in cmds)})
        return out

    # views (targets/profile_views.py) --------------------------------------------------------
    def table(self, top: int | None = 20, breakdown: bool = False) -> str:
        return views.table(self, top, breakdown)

    def write_json(self, path) -> None:
        views.write_json(self, path)

    def write_csv(self, path) -> None:
        views.write_csv(self, path)

    def trace_events(self) -> list[dict]:
        return views.trace_events(self)

    def write_trace(self, path) -> None:
        views.write_trace(self, path)

    def write_plot(self, path, top: int = 15) -> None:
        views.write_plot(self, path, top)


# --- building a profile ----------------------------------------------------------------------

def build_profile(target, graph, precision: str = "as-built", schedule: str | None = None,
                  model: str = "") -> Profile:
    """Lower ``graph`` for ``target`` (an :class:`~edgefc.targets.npu.NpuTarget`) at ``precision``
    under ``schedule`` (``targets/schedule.py``; default ``best``), price every command, schedule them."""
    spec = target.schedule(schedule)
    if spec.base not in SCHEDULES:
        raise TargetError(f"unknown schedule '{spec.base}' (choose from {', '.join(SCHEDULES)})")
    arch = target.arch
    program = lower(graph, arch, precision, spec)
    cycles = [command_cycles(arch, c) for c in program.commands]
    tl = SCHEDULES[spec.base]().run(program, cycles, arch)
    prof = Profile(target=arch.name, clock_hz=arch.clock_hz, program=program, cycles=cycles, starts=tl.starts,
                   total_cycles=tl.total, idle=tl.idle, hidden=tl.hidden, schedule=spec.name, model=model,
                   roof=[roofline_cycles(arch, c) for c in program.commands], instances=tl.instances,
                   exposed_dma=tl.exposed_dma)
    prof.attention_breakdown = attention_breakdown(target, arch, program, spec.name)
    prof.validation = arch.validation
    return prof
