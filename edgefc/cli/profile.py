"""``edgefc profile``: the cost model's cycle/DMA report of a model on an NPU target.

Reads a build folder (``edgefc compile`` output: its ``model.onnx`` is priced as built) or an
ONNX file (an export at opset < 23 is canonicalized and fused in memory first, through the pass
registry, so an export can be profiled directly). The data is the Profile (JSON); the terminal
table, CSV, Chrome/Perfetto trace and PNG are views of it (``edgefc.targets.profile``).
"""

from __future__ import annotations

import time
from pathlib import Path

import click

from edgefc.build_folder import load_for_profile
from edgefc.errors import BuildError, TargetError

PRECISIONS = ("as-built", "fp32", "fp16", "w8a16", "w8a8")


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
@click.option("--precision", default="as-built", show_default=True, metavar="|".join(PRECISIONS),
              help="Price as built (the graph's dtypes and Q/DQ), or as if deployed at fp32, fp16, "
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
@click.option("--schedule", default=None, metavar="best|overlap|sequential|overlap+MECH",
              help="Default: the build's own (report.json), else best. best: overlap plus every mechanism the "
                   "compiler decides (pipelined-mlt: attention tiles pipelined across the engines; prefetch: the "
                   "DMA engine runs ahead into the previous op); "
                   "overlap: an op's DMA runs beside its compute (double buffering) -- the schedule the target "
                   "was fitted under, which reproduces the measured figures; sequential: every command one "
                   "after another (the paper's baseline view); overlap+MECH[+MECH]: one mechanism at a time.")
def profile_cmd(model, target, precision, json_path, csv_path, trace_path, plot_path, top, attention_breakdown,
                explain_tiling, sram_budget, shapes, schedule):
    """Profile MODEL (a build folder or an ONNX file) on an NPU target with the cost model.

    Prints a table per op (name, op type, engine, MACs, DMA bytes, cycles, ms, share), per block
    and per engine, with the SRAM peak; writes JSON / CSV / trace / PNG on request.
    """
    import edgefc
    from edgefc.ir import parse_shape

    if precision not in PRECISIONS:
        raise BuildError(f"unknown precision '{precision}' (choose from {', '.join(PRECISIONS)})")
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
    shape_map = dict(parse_shape(s) for s in shapes)
    start = time.perf_counter()
    graph = load_for_profile(model, shape_map, progress=lambda m: click.echo(m, err=True))
    loaded = time.perf_counter()
    prof = tgt.profile(graph, precision=precision, schedule=schedule, model=model.name)
    priced = time.perf_counter()
    click.echo(prof.table(top=top or None, breakdown=attention_breakdown), nl=False)
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
