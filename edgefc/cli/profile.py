"""``edgefc profile``: the cost model's cycle/DMA report of a model on an NPU target.

Reads a build folder (``edgefc compile`` output: its ``model.onnx`` is priced as built) or an
ONNX file (an export at opset < 23 is canonicalized and fused in memory first, through the pass
registry, so an export can be profiled directly). The data is the Profile (JSON); the terminal
table, CSV, Chrome/Perfetto trace and PNG are views of it (``edgefc.targets.profile``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from edgefc.build_folder import load_for_profile
from edgefc.errors import BuildError, TargetError
from edgefc.precision import PRICINGS


def _built_schedule(model: Path) -> str | None:
    """The schedule a build folder was compiled and priced under (``report.json``), or None."""
    import json

    try:
        return json.loads((model / "report.json").read_text())["profile"]["schedule"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


@click.command("profile")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--target", "-t", default="exynos2400", show_default=True,
              help="Target name (exynos2400) or a target description .toml file.")
@click.option("--precision", default="as-built", show_default=True, metavar="|".join(PRICINGS),
              help="Price as built (each op's precision as quantize recorded it, the graph's dtypes and Q/DQ), or as if deployed at fp32, fp16, "
                   "w8a16 (INT8 weights, INT16 activations) or w8a8 (INT8 weights and activations, as "
                   "MLPerf Mobile runs); the graph itself is not changed.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the profile as JSON (total_ms, ops, attention_breakdown, ...).")
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False, path_type=Path), help="Write per-op rows as CSV.")
@click.option("--trace", "trace_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Write a Chrome/Perfetto trace (engines and DMA as tracks; open in ui.perfetto.dev).")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Write a PNG of time by op type and by block.")
@click.option("--top", type=int, default=20, show_default=True, help="Ops shown in the table (0: all).")
@click.option("--attention-breakdown", is_flag=True,
              help="Show the paper's Table 6 for the largest attention block (untiled and with MLT's tiling).")
@click.option("--explain-tiling", is_flag=True,
              help="Print, per attention block, the tilings the MLT solver weighed and its choice.")
@click.option("--sram-budget", default=None, metavar="BYTES|xMiB",
              help="SRAM budget for --explain-tiling (default: the target's SRAM minus the MLT reserve).")
@click.option("--shape", "shapes", multiple=True, metavar="NAME=D1xD2x...",
              help="Static shape for an input of a raw ONNX export (repeatable).")
@click.option("--retile", is_flag=True,
              help="Price a build re-tiled for this target (MLT run again in memory on its SRAM) instead of "
                   "with the tiles it was compiled with; for a build compiled for another target.")
@click.option("--schedule", default=None, metavar="best|overlap|sequential|overlap+MECH",
              help="Default: the build's own (report.json), else best. best: overlap plus every mechanism the "
                   "compiler decides (pipelined-mlt: attention tiles pipelined across the engines; pipelined-"
                   "cascades; prefetch: the DMA engine runs ahead into the previous op; packed-operands; "
                   "concat-in-place); overlap: an op's DMA runs beside its compute (double buffering) -- the "
                   "schedule the target was fitted under, which reproduces the measured figures; sequential: "
                   "every command one after another (the paper's baseline view); overlap+MECH[+MECH]: one "
                   "mechanism at a time.")
def profile_cmd(model, target, precision, json_path, csv_path, trace_path, plot_path, top, attention_breakdown,
                explain_tiling, sram_budget, shapes, retile, schedule):
    """Profile MODEL (a build folder or an ONNX file) on an NPU target with the cost model.

    Prints a table per op (name, op type, engine, MACs, DMA bytes, cycles, ms, share), per block
    and per engine, with the SRAM peak; writes JSON / CSV / trace / PNG on request. A build tiled
    for another target's SRAM is priced as built, with a warning (or re-tiled with --retile).
    """
    import edgefc
    from edgefc.ir import parse_shapes
    from edgefc.staging import check_output_file

    if precision not in PRICINGS:
        raise BuildError(f"unknown precision '{precision}' (choose from {', '.join(PRICINGS)})")
    from edgefc.targets.cost_model import SCHEDULES
    from edgefc.targets.schedule import parse

    if schedule is None:
        schedule = _built_schedule(model)
    schedule = parse(schedule, tuple(SCHEDULES)).name   # one line, exit 2, before any work
    if top < 0:
        raise BuildError(f"--top must be 0 or more, got {top}")
    if sram_budget is not None and not explain_tiling:
        raise BuildError("--sram-budget only applies to --explain-tiling (the profile prices the build's own tiling)")
    tgt = edgefc.get_target(target)
    if not tgt.has_cost_model:
        raise TargetError(f"target '{tgt.name}' has no cost model to profile with")
    shape_map = parse_shapes(shapes)
    # every output can be written, before any work and before the table is printed
    inputs = [model, model / "model.onnx"] if model.is_dir() else [model]
    outputs = {}
    for option, path in (("--json", json_path), ("--csv", csv_path), ("--trace", trace_path), ("--plot", plot_path)):
        if path is None:
            continue
        full = check_output_file(path, option, protect=inputs)
        if full in outputs.values():
            other = next(k for k, v in outputs.items() if v == full)
            raise BuildError(f"{other} and {option} name the same file {path}")
        outputs[option] = full
    start = time.perf_counter()
    graph = load_for_profile(model, shape_map, progress=lambda m: click.echo(m, err=True))
    built = _build_report(model)
    notes = []
    if retile:
        graph, n = _retile(graph, tgt, schedule)
        notes.append(f"priced re-tiled for {tgt.name} (--retile: MLT run again on its SRAM, {n} attention"
                     f"{'s' if n != 1 else ''} tiled), not with the build's own tiles")
    loaded = time.perf_counter()
    prof = tgt.profile(graph, precision=precision, schedule=schedule, model=model.name)
    priced = time.perf_counter()
    warning = None if retile else tiling_warning(prof, tgt, built)
    prof.warnings = notes + ([warning] if warning else [])
    from edgefc.cli import ARGV
    from edgefc.compiler import reproducibility

    prof.reproducibility = reproducibility(tgt, {"precision": precision, "schedule": schedule, "retile": retile,
                                                 "shapes": shape_map}, {"command": "edgefc " + " ".join(ARGV),
                                                                        "argv": list(ARGV)})
    click.echo(prof.table(top=top or None, breakdown=attention_breakdown), nl=False)
    for line in prof.warnings:
        click.echo(("warning: " if line is warning else "note: ") + line)
    if explain_tiling:
        from edgefc import tile_solver
        from edgefc.passes import mlt

        click.echo("\n" + tile_solver.format_explain(
            mlt.explain_tiling(graph, tgt, sram_budget, None if precision == "as-built" else precision, schedule), tgt))
    for path, write in ((json_path, prof.write_json), (csv_path, prof.write_csv), (trace_path, prof.write_trace),
                        (plot_path, prof.write_plot)):
        if path is not None:
            write(path)
            click.echo(f"wrote {path}", err=True)
    click.echo(f"profiled in {priced - start:.2f} s (load {loaded - start:.2f} s, lower+price "
               f"{priced - loaded:.2f} s)", err=True)


def _build_report(model: Path) -> dict:
    """The build folder's report.json (empty for an ONNX file, or a build without one)."""
    if not model.is_dir():
        return {}
    try:
        return json.loads((model / "report.json").read_text())
    except (OSError, ValueError):
        return {}


def _mib(n: float) -> str:
    return f"{n / 2**20:.2f} MiB"


def tiling_warning(prof, tgt, built: dict) -> str | None:
    """Why pricing a build on ``tgt`` may mislead: attentions tiled (for another target's SRAM) whose
    tiles do not fit ``tgt``'s SRAM, so every tile's S_in/S_out goes through DRAM. None if all fit."""
    tiled, over = 0, []
    for op in prof.program.ops:
        if op.attention is None:
            continue
        spec, tiling = op.attention
        if tiling.tiles <= 1:
            continue
        tiled += 1
        need = tgt.attention_sram_bytes(spec, tiling)
        if need > tgt.sram.attention:
            over.append((op.name, need))
    if not over:
        return None
    rows = {r.name: r for r in prof.ops}
    worst = max(over, key=lambda x: x[1])
    cost = rows.get(worst[0])
    made_for = built.get("target")
    budget = (built.get("tiling") or {}).get("budget_bytes")
    where = f"for {made_for}" + (f" (SRAM budget {_mib(budget)})" if budget else "") if made_for else "for another SRAM size"
    text = (f"{len(over)} of {tiled} tiled attention{'s' if tiled != 1 else ''} were tiled {where}: their tiles need up "
            f"to {_mib(worst[1])} of SRAM, more than {tgt.name}'s {_mib(tgt.sram.attention)}, so S_in/S_out go "
            f"through DRAM on every tile, and this profile prices them so")
    if cost is not None:
        text += f" (e.g. {worst[0]}: {cost.ms:.3f} ms, {cost.dma_bytes / 1e9:.3f} GB of DMA)"
    return text + f"; --retile prices the build re-tiled for {tgt.name}, or compile again with --target {tgt.name}"


def _retile(graph, tgt, schedule: str | None = None):
    """``graph`` with every TiledAttention untiled - turned back into the Attention-23 it came
    from, or one tile when its normalisation is deferred (the arithmetic ``quantize`` chose) -
    and MLT run again for ``tgt`` under ``schedule`` (in memory; the build is not changed).
    Returns (graph, tiled count)."""
    from edgefc.attention import is_deferred
    from edgefc.pass_base import PassContext
    from edgefc.pass_manager import PassManager

    for node in graph.nodes:
        if node.op == "TiledAttention" and node.domain == "edgefc":
            if is_deferred(node):
                node.attrs.update({"row_tiles": 1, "head_tiles": 1})
                continue
            node.op, node.domain = "Attention", ""
            for key in ("row_tiles", "head_tiles", "row_granularity"):
                node.attrs.pop(key, None)
    ctx = PassContext(target=tgt, options={"schedule": schedule})
    graph = PassManager(["mlt"]).run(graph, ctx)
    return graph, int((ctx.report.get("tiling") or {}).get("tiled", 0))
