"""Profile: a priced Program as data (JSON first), and its views.

Views: a terminal table (per op, per block, per engine), CSV (per op), a Chrome/Perfetto trace
(one track per engine plus DMA; tiled attention loops expanded tile by tile) and a PNG (time by
op type and by block, matplotlib Agg). ``attention_breakdown`` is the paper's Table 6 for the
largest attention block: the share of each step in the untiled block's time, priced untiled
(``rows``) and with the tiling MLT chooses (``rows_mlt``).
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from edgefc.targets.program import ATTENTION_ROLES, ENGINES, Command, Program

TRACK_IDS = {"dma": 1, "tensor": 2, "vector": 3, "host": 4, "dispatch": 5}
TRACK_NAMES = {"dma": "DMA (DRAM <-> SRAM)", "tensor": "tensor engines", "vector": "vector engines",
               "host": "host CPU", "dispatch": "dispatch (exposed)"}


@dataclass
class OpRow:
    """One graph node's share of the profile."""

    name: str
    op_type: str
    engine: str
    block: str
    precision: str = ""       # tensor ops: the [tensor.rate] key their MACs were priced at
    macs: int = 0
    dma_bytes: int = 0
    cycles: float = 0.0
    ms: float = 0.0
    share: float = 0.0

    def as_dict(self) -> dict:
        return {"name": self.name, "op_type": self.op_type, "engine": self.engine, "block": self.block,
                "precision": self.precision or None, "macs": int(self.macs), "dma_bytes": int(self.dma_bytes), "cycles": round(self.cycles, 1),
                "ms": round(self.ms, 6), "share": round(self.share, 4)}


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
                if row.precision and row.precision != c.precision:
                    raise ValueError(f"op {c.op} has tensor commands at two precisions ({row.precision}, {c.precision})")
                row.precision = c.precision
        total = self.total_cycles or 1.0
        for row in rows.values():
            row.ms = self.ms(row.cycles)
            row.share = row.cycles / total
        return list(rows.values())

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
            "attention_blocks": self.attention_blocks(),
            "ops": [r.as_dict() for r in self.ops],
            "attention_breakdown": self.attention_breakdown,
            "validation": self.validation,
            "validation_summary": validation_line(self.validation),
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
                        "s_spills_to_dram": any(c.role == "store_s_in" for c in cmds)})
        return out

    # views ------------------------------------------------------------------------------------
    def table(self, top: int | None = 20, breakdown: bool = False) -> str:
        out = io.StringIO()
        d = self.to_dict()
        w = out.write
        w(f"{self.model or self.program.component}  on {self.target}  ({self.program.precision}, "
          f"{self.schedule} schedule)\n")
        w(validation_line(self.validation) + "\n")
        w(f"total {self.total_ms:.2f} ms   MACs {d['macs'] / 1e9:.2f} G   DMA {d['dma_bytes'] / 1e6:.1f} MB   "
          f"SRAM peak {d['sram_peak_bytes'] / 2**20:.2f} MiB   ops {len(self.ops)}\n")
        w("engines: " + "   ".join(f"{e} {ms:.2f} ms ({ms / max(self.total_ms, 1e-12):.1%})"
                                   for e, ms in d["engines_ms"].items() if ms > 0) + "\n\n")
        rows = sorted(self.ops, key=lambda r: -r.cycles)
        shown = rows if not top else rows[:top]
        w(f"{'op':<48} {'type':<16} {'engine':<7} {'MACs':>10} {'DMA bytes':>12} {'cycles':>13} "
          f"{'ms':>9} {'share':>7}\n")
        for r in shown:
            name = r.name if len(r.name) <= 48 else "..." + r.name[-45:]
            w(f"{name:<48} {r.op_type[:16]:<16} {r.engine:<7} {_si(r.macs):>10} {_si(r.dma_bytes):>12} "
              f"{r.cycles:>13,.0f} {r.ms:>9.3f} {r.share:>7.1%}\n")
        if top and len(rows) > top:
            rest = rows[top:]
            w(f"{'(' + str(len(rest)) + ' more ops)':<48} {'':<16} {'':<7} {_si(sum(r.macs for r in rest)):>10} "
              f"{_si(sum(r.dma_bytes for r in rest)):>12} {sum(r.cycles for r in rest):>13,.0f} "
              f"{self.ms(sum(r.cycles for r in rest)):>9.3f} {sum(r.share for r in rest):>7.1%}\n")
        res = d["residency"]
        w(f"\nresidency: {res['sram']} tensors kept in SRAM, {res['dram']} through DRAM "
          f"({res['dram_bytes'] / 1e6:.1f} MB), {res['stream']} streamed op to op\n")
        for t in [t for t in res["tensors"] if t["where"] == "dram"][:5]:
            w(f"  {t['name'][-46:]:<46} {_si(t['bytes']):>9}B  {t['reason']}\n")
        w(f"\n{'block':<48} {'ms':>9} {'share':>7}\n")
        for k, cyc in self.by("block").items():
            w(f"{k[:48]:<48} {self.ms(cyc):>9.3f} {cyc / max(self.total_cycles, 1e-12):>7.1%}\n")
        if breakdown:
            w("\n" + format_breakdown(self.attention_breakdown))
        return out.getvalue()

    def write_json(self, path) -> None:
        _atomic_write(path, json.dumps(self.to_dict(), indent=1) + "\n")

    def write_csv(self, path) -> None:
        buf = io.StringIO()
        wr = csv.writer(buf)
        wr.writerow(["name", "op_type", "engine", "block", "precision", "macs", "dma_bytes", "cycles", "ms", "share"])
        for r in self.ops:
            wr.writerow([r.name, r.op_type, r.engine, r.block, r.precision, r.macs, r.dma_bytes, f"{r.cycles:.1f}",
                         f"{r.ms:.6f}", f"{r.share:.6f}"])
        _atomic_write(path, buf.getvalue())

    def trace_events(self) -> list[dict]:
        """Chrome trace events (``X`` complete events, microseconds), one track per engine."""
        us = 1e6 / self.clock_hz
        events: list[dict] = [{"ph": "M", "pid": 1, "name": "process_name",
                               "args": {"name": f"{self.target}: {self.model or self.program.component}"}}]
        for eng, tid in TRACK_IDS.items():
            events.append({"ph": "M", "pid": 1, "tid": tid, "name": "thread_name", "args": {"name": TRACK_NAMES[eng]}})
            events.append({"ph": "M", "pid": 1, "tid": tid, "name": "thread_sort_index", "args": {"sort_index": tid}})
        cmds, cyc, starts = self.program.commands, self.cycles, self.starts
        idle = self.idle or [0.0] * len(cmds)
        i = 0
        while i < len(cmds):
            c = cmds[i]
            if c.loop < 0 or c.repeat == 1:
                events.append(_event(c, starts[i], cyc[i], us))
                j = i + 1
            else:
                j = i
                while j < len(cmds) and cmds[j].loop == c.loop:
                    j += 1
                t = starts[i]
                for rep in range(c.repeat):
                    for k in range(i, j):
                        one = cyc[k] / cmds[k].repeat
                        events.append(_event(cmds[k], t, one, us, instance=rep))
                        t += one
            for k in range(i, j):
                if idle[k] > 0:
                    events.append({"ph": "X", "pid": 1, "tid": TRACK_IDS["dispatch"], "name": "dispatch",
                                   "cat": "dispatch", "ts": round((starts[k] + cyc[k]) * us, 4),
                                   "dur": round(idle[k] * us, 4), "args": {"op": cmds[k].op}})
            i = j
        return events

    def write_trace(self, path) -> None:
        _atomic_write(path, json.dumps({"traceEvents": self.trace_events(), "displayTimeUnit": "ms"}) + "\n")

    def write_plot(self, path, top: int = 15) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        by_type = list(self.by("op_type").items())[:top]
        by_block = list(self.by("block").items())[:top]
        fig, axes = plt.subplots(1, 2, figsize=(13, 0.35 * max(len(by_type), len(by_block)) + 2))
        for ax, data, title in ((axes[0], by_type, "time by op type"), (axes[1], by_block, "time by block")):
            labels = [k for k, _ in data][::-1]
            values = [self.ms(v) for _, v in data][::-1]
            ax.barh(labels, values, color="#4477aa")
            ax.set_xlabel("ms")
            ax.set_title(title)
            ax.tick_params(axis="y", labelsize=8)
        fig.suptitle(f"{self.model or self.program.component} on {self.target} ({self.program.precision}): "
                     f"{self.total_ms:.1f} ms")
        fig.tight_layout()
        path = Path(path)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent or ".")
        os.close(fd)
        try:
            fig.savefig(tmp, dpi=110)
            os.replace(tmp, path)
        finally:
            plt.close(fig)
            if os.path.exists(tmp):
                os.unlink(tmp)


def _event(c: Command, start: float, cycles: float, us: float, instance: int | None = None) -> dict:
    name = c.role or (f"{c.kind} {c.tensor}" if c.kind in ("load", "store") else c.op_type)
    args = {"op": c.op, "op_type": c.op_type}
    if c.kind in ("load", "store"):
        args.update(kind=c.kind, tensor=c.tensor, bytes=c.bytes)
    elif c.kind == "tensor":
        args.update(macs=c.macs, padded_macs=c.padded_macs, precision=c.precision)
    else:
        args.update(elements=c.elements)
    if instance is not None:
        args["tile"] = instance
    return {"ph": "X", "pid": 1, "tid": TRACK_IDS[c.engine], "name": name, "cat": c.kind,
            "ts": round(start * us, 4), "dur": round(cycles * us, 4), "args": args}


def _si(n: float) -> str:
    if not n:
        return "-"
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def format_breakdown(bd: dict | None) -> str:
    """The paper's Table 6 view of an attention breakdown."""
    if not bd:
        return "attention breakdown: the model has no attention block\n"
    rows, mlt = bd.get("rows") or {}, bd.get("rows_mlt")
    out = [f"attention breakdown (Table 6): {bd['block']}  {bd.get('shape', '')}",
           f"  untiled block {bd.get('untiled_ms', 0):.3f} ms"
           + (f"; MLT tiling {bd['tiling_mlt']['row_tiles']} row x {bd['tiling_mlt']['head_tiles']} head tiles"
              f" ({bd.get('tiling_mlt_source', '')})" if bd.get("tiling_mlt") else ""),
           f"  {'step':<14} {'w/o MLT %':>10} {'w/ MLT %':>10}"]
    for k in ATTENTION_ROLES:
        m = "" if mlt is None else ("-" if not mlt.get(k) else f"{mlt[k]:.1f}")
        out.append(f"  {k:<14} {rows.get(k, 0):>10.1f} {m:>10}")
    tot_m = "" if mlt is None else f"{sum(mlt.values()):.1f}"
    out.append(f"  {'total':<14} {sum(rows.values()):>10.1f} {tot_m:>10}")
    return "\n".join(out) + "\n"


def _atomic_write(path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# --- building a profile ----------------------------------------------------------------------

def build_profile(target, graph, precision: str = "as-built", schedule: str = "overlap",
                  model: str = "") -> Profile:
    """Lower ``graph`` for ``target`` at ``precision``, price every command, schedule them."""
    from edgefc.targets.cost_model import SCHEDULES, command_cycles
    from edgefc.targets.lowering import lower

    if schedule not in SCHEDULES:
        from edgefc.errors import TargetError

        raise TargetError(f"unknown schedule '{schedule}' (choose from {', '.join(SCHEDULES)})")
    program = lower(graph, target, precision)
    p = target.params
    cycles = [command_cycles(p, c) for c in program.commands]
    tl = SCHEDULES[schedule]().run(program, cycles, p)
    prof = Profile(target=target.name, clock_hz=p.clock_hz, program=program, cycles=cycles, starts=tl.starts,
                   total_cycles=tl.total, idle=tl.idle, hidden=tl.hidden, schedule=schedule, model=model)
    prof.attention_breakdown = attention_breakdown(target, program)
    prof.validation = getattr(target, "validation", None)
    return prof


def validation_line(v: dict | None) -> str:
    """One line on how far the target's predictions are from measured latencies."""
    if not v:
        return "target not validated against measurements (no <target>.validation.json)"
    line = (f"target validated on {v['figures']} measured latencies: median |error| {v['median_abs_error_pct']:g} %, "
            f"worst {v['worst_abs_error_pct']:g} % ({v['worst_figure']})")
    if "loo_median_abs_error_pct" in v:
        line += (f"; each left out of the fit: median {v['loo_median_abs_error_pct']:g} %, "
                 f"worst {v['loo_worst_abs_error_pct']:g} %")
    return line


def role_cycles(target, spec, tiling) -> dict[str, float]:
    """Cycles of one attention block per Table 6 row (commands grouped by role)."""
    from edgefc.targets.cost_model import command_cycles

    p = target.params
    out = {k: 0.0 for k in ATTENTION_ROLES}
    for c in target.attention_commands(spec, tiling):
        out[c.role] += command_cycles(p, c)
    return out


def mlt_tiling(target, spec, built=None):
    """The tiling MLT gives this block: the solver's choice at the target's default SRAM budget
    (``edgefc.tile_solver``, core), else the build's own tiling."""
    from edgefc import tile_solver
    from edgefc.attention import row_granularity

    try:
        sol = tile_solver.solve(spec, target, tile_solver.default_budget(target), row_granularity(target))
        return sol.tiling, "solver"
    except tile_solver.InfeasibleBudgetError:
        pass
    if built is not None and built.tiles > 1:
        return built, "build"
    return None, None


def attention_breakdown(target, program: Program) -> dict | None:
    """Table 6 for the program's largest attention block: shares of the untiled block's time.

    ``rows``: the block priced untiled (one tile); ``rows_mlt``: priced with the tiling MLT
    chooses (None when no tiling is available); both in percent of the untiled block's cycles.
    """
    from edgefc.attention import Tiling

    blocks = [o for o in program.ops if o.attention is not None]
    if not blocks:
        return None
    op = max(blocks, key=lambda o: (o.attention[0].batch * o.attention[0].heads * o.attention[0].q_len
                                    * o.attention[0].kv_len))
    spec, built = op.attention
    untiled = role_cycles(target, spec, Tiling(1, 1))
    total = sum(untiled.values())
    out = {"block": op.name,
           "shape": f"{spec.heads} heads x {spec.q_len} x {spec.kv_len}, head dim {spec.head_dim}, "
                    f"{spec.act_dtype} activations",
           "untiled_ms": total / target.params.clock_hz * 1e3,
           "rows": {k: round(100.0 * v / total, 3) for k, v in untiled.items()},
           "rows_mlt": None, "tiling_mlt": None, "tiling_mlt_source": None,
           "built_tiling": {"row_tiles": built.row_tiles, "head_tiles": built.head_tiles}}
    tiling, source = mlt_tiling(target, spec, built)
    if tiling is not None:
        tiled = role_cycles(target, spec, tiling)
        out.update(rows_mlt={k: round(100.0 * v / total, 3) for k, v in tiled.items()},
                   tiling_mlt={"row_tiles": tiling.row_tiles, "head_tiles": tiling.head_tiles},
                   tiling_mlt_source=source, tiled_ms=sum(tiled.values()) / target.params.clock_hz * 1e3)
    return out
