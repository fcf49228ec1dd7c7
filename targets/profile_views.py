"""The views of a :class:`~edgefc.targets.profile.Profile`: a terminal table (per op, per block,
per engine), CSV (per op), a Chrome/Perfetto trace (one track per engine plus DMA; tiled
attention loops expanded tile by tile), a PNG (time by op type and by block, matplotlib Agg),
and the text of the paper's Table 6 (:func:`format_breakdown`). The data itself is
``targets/profile.py`` (which imports this module, not the other way round: ``prof`` below is
its ``Profile``); every file is written atomically (a temporary file, then a rename) with the
permissions a plain file gets under the umask (``edgefc.staging.write_file``).
"""

from __future__ import annotations

import csv
import io
import json

from edgefc.staging import write_file, write_text_file
from edgefc.targets.program import ATTENTION_ROLES, Command

TRACK_IDS = {"dma": 1, "tensor": 2, "vector": 3, "host": 4, "dispatch": 5, "ops": 6, "roofline": 7}
TRACK_NAMES = {"dma": "DMA (DRAM <-> SRAM)", "tensor": "tensor engines", "vector": "vector engines",
               "host": "host CPU", "dispatch": "dispatch (exposed)", "ops": "ops (modelled)",
               "roofline": "ops at the roofline"}


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


def table(prof, top: int | None = 20, breakdown: bool = False) -> str:
    """The terminal view: totals, engines, the top ops, residency, blocks [, Table 6]."""
    out = io.StringIO()
    d = prof.to_dict()
    w = out.write
    w(f"{prof.model or prof.program.component}  on {prof.target}  ({prof.program.precision}, "
      f"{prof.schedule} schedule)\n")
    w(validation_line(prof.validation) + "\n")
    w(f"total {prof.total_ms:.2f} ms   MACs {d['macs'] / 1e9:.2f} G   DMA {d['dma_bytes'] / 1e6:.1f} MB   "
      f"SRAM peak {d['sram_peak_bytes'] / 2**20:.2f} MiB   ops {len(prof.ops)}\n")
    w("engines: " + "   ".join(f"{e} {ms:.2f} ms ({ms / max(prof.total_ms, 1e-12):.1%})"
                               for e, ms in d["engines_ms"].items() if ms > 0) + "\n")
    roof = d["roofline"]
    w(f"roofline {roof['total_ms']:.2f} ms (every engine at its peak, perfectly overlapped: "
      + ", ".join(f"{e} {ms:.2f}" for e, ms in roof["engines_ms"].items() if ms > 0)
      + f" ms); modelled / roofline x{(roof['ratio'] or float('nan')):.2f}; exposed DMA {d['exposed_dma_ms']:.2f} ms\n\n")
    rows = sorted(prof.ops, key=lambda r: -r.cycles)
    shown = rows if not top else rows[:top]
    prefix = common_prefix([r.name for r in prof.ops])
    head = f"op (names under {prefix})" if prefix else "op"
    w(f"{head:<{NAME_WIDTH}} {'type':<16} {'engine':<7} {'MACs':>10} {'DMA bytes':>12} {'cycles':>13} "
      f"{'ms':>9} {'share':>7} {'roof ms':>9} {'exp.DMA':>9}\n")
    names = short_names([r.name[len(prefix):] for r in shown], NAME_WIDTH)
    for r, name in zip(shown, names):
        w(f"{name:<{NAME_WIDTH}} {r.op_type[:16]:<16} {r.engine:<7} {_si(r.macs):>10} {_si(r.dma_bytes):>12} "
          f"{r.cycles:>13,.0f} {r.ms:>9.3f} {r.share:>7.1%} {r.roofline_ms:>9.3f} {r.exposed_dma_ms:>9.3f}\n")
    if top and len(rows) > top:
        rest = rows[top:]
        w(f"{'(' + str(len(rest)) + ' more ops)':<{NAME_WIDTH}} {'':<16} {'':<7} {_si(sum(r.macs for r in rest)):>10} "
          f"{_si(sum(r.dma_bytes for r in rest)):>12} {sum(r.cycles for r in rest):>13,.0f} "
          f"{prof.ms(sum(r.cycles for r in rest)):>9.3f} {sum(r.share for r in rest):>7.1%} "
          f"{sum(r.roofline_ms for r in rest):>9.3f} {sum(r.exposed_dma_ms for r in rest):>9.3f}\n")
    host = d["host_ops"]
    if host["count"]:
        w(f"\nhost ops: {host['count']} ({host['ms']:.3f} ms, {host['share']:.1%} of the modelled time), by op type:\n")
        for g in host["by_op_type"]:
            reasons = "; ".join(f"{r or 'no reason recorded'}" + (f" ({n})" if len(g["reasons"]) > 1 else "")
                                for r, n in g["reasons"].items())
            w(f"  {g['op_type'][:24]:<24} {g['count']:>5} {'op ' if g['count'] == 1 else 'ops'} {g['ms']:>9.3f} ms "
              f"{g['share']:>7.1%}  {reasons}\n")
    res = d["residency"]
    w(f"\nresidency: {res['sram']} tensors kept in SRAM, {res['dram']} through DRAM "
      f"({res['dram_bytes'] / 1e6:.1f} MB), {res['stream']} streamed op to op\n")
    spilled = [t for t in res["tensors"] if t["where"] == "dram"][:5]
    for t, name in zip(spilled, short_names([t["name"] for t in spilled], 46)):
        w(f"  {name:<46} {_si(t['bytes']):>9}B  {t['reason']}\n")
    w(f"\n{'block':<48} {'ms':>9} {'share':>7} {'roof ms':>9} {'x roof':>7}\n")
    roof_blocks = roof["blocks"]
    blocks = prof.by("block")
    for (k, cyc), name in zip(blocks.items(), short_names(list(blocks), 48)):
        b = roof_blocks.get(k, {})
        ratio = f"{b['ratio']:.2f}" if b.get("ratio") else "-"
        w(f"{name:<48} {prof.ms(cyc):>9.3f} {cyc / max(prof.total_cycles, 1e-12):>7.1%} "
          f"{b.get('roofline_ms', 0.0):>9.3f} {ratio:>7}\n")
    if breakdown:
        w("\n" + format_breakdown(prof.attention_breakdown))
    return out.getvalue()


#: characters of an op name in the table (names are cut in the middle, at whole path components)
NAME_WIDTH = 56


def common_prefix(names: list[str]) -> str:
    """The leading path components every name shares (``/unet/``), said once in the table's header
    instead of on every row; "" for fewer than two names or none shared."""
    if len(names) < 2 or not all("/" in n for n in names):
        return ""
    split = [n.split("/")[:-1] for n in names]
    k = 0
    while all(len(p) > k for p in split) and len({p[k] for p in split}) == 1:
        k += 1
    return "/".join(split[0][:k]) + "/" if k and "/".join(split[0][:k]) else ""


def _render(parts: list[str], keep: set[int], sep: str) -> str:
    """The kept components of a name in order; each run of dropped ones becomes ``...``."""
    out, gap = [], False
    for i, part in enumerate(parts):
        if i in keep:
            if gap:
                out.append("...")
            out.append(part)
            gap = False
        else:
            gap = True
    if gap:
        out.append("...")
    return sep.join(out)


def _fit(name: str, width: int, must: frozenset = frozenset()) -> str | None:
    """``name`` in ``width`` characters by dropping whole path components (each run of dropped ones
    shown as ``...``): the last component and those in ``must`` always kept, then as many of the
    others as fit, alternately from the end and from the start. None if the kept ones do not fit."""
    if len(name) <= width:
        return name
    sep = "/" if "/" in name else "."
    parts = name.split(sep)
    n = len(parts)
    keep = set(must) | {n - 1}
    if len(_render(parts, keep, sep)) > width:
        return None
    tail, head = list(range(n - 2, -1, -1)), list(range(n - 1))
    order = [i for pair in zip(tail, head) for i in pair]
    for i in dict.fromkeys(order):
        if i not in keep and len(_render(parts, keep | {i}, sep)) <= width:
            keep.add(i)
    return _render(parts, keep, sep)


def _chars(name: str, width: int) -> str:
    """``name`` cut in the middle character-wise (when whole components cannot do it)."""
    if len(name) <= width:
        return name
    half = (width - 3) // 2
    return name[:half] + "..." + name[-(width - 3 - half):]


def short_names(names: list[str], width: int) -> list[str]:
    """Each name in at most ``width`` characters, cut in the middle at whole path components (the
    start says where in the model, the end what the op is), and never two rows alike: names whose
    cuts coincide keep the components where they differ."""
    must = [frozenset()] * len(names)
    out = [_fit(n, width) or _chars(n, width) for n in names]
    for _ in range(16):  # each round only adds kept components, so it ends
        groups: dict[str, list[int]] = {}
        for i, s in enumerate(out):
            groups.setdefault(s, []).append(i)
        clashes = [g for g in groups.values() if len({names[i] for i in g}) > 1]
        if not clashes:
            break
        for g in clashes:
            split = [names[i].split("/" if "/" in names[i] else ".") for i in g]
            differ = {k for k in range(min(map(len, split))) if len({p[k] for p in split}) > 1}
            for i in g:
                must[i] = must[i] | differ
                out[i] = _fit(names[i], width, must[i]) or _chars(names[i], width)
    seen: dict[str, int] = {}
    for i, s in enumerate(out):  # still alike (names that differ inside one long component): number them
        if s in seen and names[seen[s]] != names[i]:
            tag = f"~{i}"
            out[i] = _chars(names[i], width - len(tag)) + tag
        seen.setdefault(out[i], i)
    return out


def write_json(prof, path) -> None:
    """profile.json: :meth:`Profile.to_dict`."""
    _atomic_write(path, json.dumps(prof.to_dict(), indent=1) + "\n")


def write_csv(prof, path) -> None:
    """One row per op (the ``--csv`` view)."""
    buf = io.StringIO()
    wr = csv.writer(buf)
    wr.writerow(["name", "op_type", "engine", "block", "precision", "macs", "dma_bytes", "cycles", "ms", "share",
                 "roofline_ms", "exposed_dma_ms"])
    for r in prof.ops:
        wr.writerow([r.name, r.op_type, r.engine, r.block, r.precision, r.macs, r.dma_bytes, f"{r.cycles:.1f}",
                     f"{r.ms:.6f}", f"{r.share:.6f}", f"{r.roofline_ms:.6f}", f"{r.exposed_dma_ms:.6f}"])
    _atomic_write(path, buf.getvalue())


def trace_events(prof) -> list[dict]:
    """Chrome trace events (``X`` complete events, microseconds), one track per engine."""
    us = 1e6 / prof.clock_hz
    events: list[dict] = [{"ph": "M", "pid": 1, "name": "process_name",
                           "args": {"name": f"{prof.target}: {prof.model or prof.program.component}"}}]
    for eng, tid in TRACK_IDS.items():
        events.append({"ph": "M", "pid": 1, "tid": tid, "name": "thread_name", "args": {"name": TRACK_NAMES[eng]}})
        events.append({"ph": "M", "pid": 1, "tid": tid, "name": "thread_sort_index", "args": {"sort_index": tid}})
    cmds, cyc, starts = prof.program.commands, prof.cycles, prof.starts
    idle = prof.idle or [0.0] * len(cmds)
    t = 0.0   # ops follow one another on the compute engines: each op's span, and its roofline beside it
    for r in prof.ops:
        span = r.cycles
        args = {"ms": round(r.ms, 6), "roofline_ms": round(r.roofline_ms, 6), "exposed_dma_ms": round(r.exposed_dma_ms, 6),
                "x_roofline": round(r.ratio, 3) if r.roofline_ms > 0 else None, "block": r.block}
        events.append({"ph": "X", "pid": 1, "tid": TRACK_IDS["ops"], "name": r.name, "cat": "op",
                       "ts": round(t * us, 4), "dur": round(span * us, 4), "args": args})
        if r.roofline_ms > 0:
            events.append({"ph": "X", "pid": 1, "tid": TRACK_IDS["roofline"], "name": r.name, "cat": "roofline",
                           "ts": round(t * us, 4), "dur": round(r.roofline_ms * 1e3, 4), "args": args})
        t += span
    i = 0
    while i < len(cmds):
        c = cmds[i]
        if i in prof.instances:   # a schedule interleaved its instances (a pipelined attention)
            j = i
            while j < len(cmds) and cmds[j].op == c.op and j in prof.instances:
                for rep, start in enumerate(prof.instances[j]):
                    events.append(_event(cmds[j], start, cyc[j] / cmds[j].repeat, us, instance=rep))
                j += 1
        elif c.loop < 0 or c.repeat == 1:
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


def write_trace(prof, path) -> None:
    """A Chrome/Perfetto trace file of :func:`trace_events`."""
    _atomic_write(path, json.dumps({"traceEvents": trace_events(prof), "displayTimeUnit": "ms"}) + "\n")


def write_plot(prof, path, top: int = 15) -> None:
    """A PNG: time by op type and by block (matplotlib Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_type = list(prof.by("op_type").items())[:top]
    by_block = list(prof.by("block").items())[:top]
    roof = prof.roofline()
    fig, axes = plt.subplots(1, 2, figsize=(13, 0.35 * max(len(by_type), len(by_block)) + 2))
    for ax, data, title in ((axes[0], by_type, "time by op type"), (axes[1], by_block, "time by block")):
        labels = [k for k, _ in data][::-1]
        values = [prof.ms(v) for _, v in data][::-1]
        ax.barh(labels, values, color="#4477aa", label="modelled")
        if ax is axes[1]:   # each block's roofline (every engine at its peak, perfectly overlapped)
            ax.barh(labels, [roof["blocks"].get(k, {}).get("roofline_ms", 0.0) for k in labels], height=0.35,
                    color="#ee7733", label="roofline")
            ax.legend(loc="lower right", fontsize=8)
        ax.set_xlabel("ms")
        ax.set_title(title)
        ax.tick_params(axis="y", labelsize=8)
    fig.suptitle(f"{prof.model or prof.program.component} on {prof.target} ({prof.program.precision}, "
                 f"{prof.schedule}): {prof.total_ms:.1f} ms, roofline {roof['total_ms']:.1f} ms")
    fig.tight_layout()
    try:
        write_file(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    finally:
        plt.close(fig)


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
    if mlt is None:
        out.append(f"  (w/ MLT empty: {bd.get('rows_mlt_reason') or 'no tiling available'})")
    return "\n".join(out) + "\n"


def _atomic_write(path, text: str) -> None:
    """Write ``text`` to ``path`` atomically with a plain file's permissions (0644 under umask 022)."""
    write_text_file(path, text)
