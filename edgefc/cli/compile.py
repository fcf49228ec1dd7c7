"""``edgefc compile`` and ``edgefc passes``."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from edgefc.errors import ExportError
from edgefc.passes.quant_eval import DEFAULT_MIN_SQNR_DB

DEMO_CACHE = Path.home() / ".cache" / "edgefc" / "demo"


def _progress(p):
    """Pass-by-pass progress on an interactive terminal (kept out of logs and pipes)."""
    if sys.stderr.isatty():
        click.echo(f"  pass {p.name} ...", err=True)


def _sram_budget(ctx, param, value):
    """--sram-budget: bytes, or a size with KiB/MiB/GiB; a bad value is one-line PassError."""
    if value is None:
        return None
    from edgefc.tile_solver import parse_budget

    return parse_budget(value)


def _schedule(ctx, param, value):
    """--schedule: a known schedule name (one line, exit 2, before any work)."""
    if value is None:
        return None
    from edgefc.targets.cost_model import SCHEDULES
    from edgefc.targets.schedule import parse

    return parse(value, tuple(SCHEDULES)).name


def _demo_model() -> Path:
    """Export (once, cached) the full-size BK-SDM-Tiny U-Net at 512x512 for ``--demo``."""
    path = DEMO_CACHE / "unet-bk-sdm-tiny-512.onnx"
    if not path.exists():
        try:
            from edgefc.models.export import export_component
        except ImportError as e:
            raise ExportError(f"--demo needs the model extra ({e.name} is missing): pip install 'edgefc[models]'") from None
        click.echo(f"demo: exporting the BK-SDM-Tiny U-Net (512x512, random weights) to {path}", err=True)
        export_component("unet", "bk-sdm-tiny", path, height=512, width=512)
    return path


def _calib_file(ctx, param, value):
    """Fail before any compiling when --calib / --eval names no file (one line, exit 2)."""
    if value is not None and not value.is_file():
        from edgefc.errors import QuantizationError

        what = "evaluation" if param.name == "eval_file" else "calibration"
        raise QuantizationError(f"{what} file not found: {value}")
    return value


def _min_sqnr(ctx, param, value):
    """--min-sqnr: a number of dB, or -inf for no floor (NaN / +inf are one-line errors)."""
    if value is None:
        return None
    import math

    if math.isnan(value) or value == math.inf:
        raise click.BadParameter(f"{value} is not a floor; give a number of dB or -inf", param=param)
    return value


@click.command("compile")
@click.argument("model", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--target", "-t", default="exynos2400", show_default=True,
              help="Target name (exynos2400) or a target description .toml file.")
@click.option("-o", "--output", type=click.Path(file_okay=False, path_type=Path),
              help="Build folder to write (default: build/<model name>).")
@click.option("--passes", help="Comma-separated passes and pipelines replacing the default pipeline, "
                               "e.g. canonicalize,fuse (fuse is the pipeline of every fusion pass).")
@click.option("--plugin", multiple=True, metavar="FILE.py|MODULE",
              help="Import a file or module that registers passes (repeatable).")
@click.option("--shape", "shapes", multiple=True, metavar="NAME=D1xD2x...",
              help="Static shape for an input, e.g. sample=1x4x64x64 (repeatable).")
@click.option("--verify", is_flag=True,
              help="Check every pass against onnxruntime on seeded random inputs; fail on a mismatch.")
@click.option("--dump-after", multiple=True, metavar="PASS",
              help="Also write the graph after PASS to BUILD/after-PASS.onnx (repeatable).")
@click.option("--demo", is_flag=True,
              help="Compile the built-in default: the full-size BK-SDM-Tiny U-Net at 512x512 (exported once, cached).")
# Pass options: every option below this line reaches the passes as ctx.options[<parameter name>].
@click.option("--no-mlt", is_flag=True,
              help="Leave attention untiled: no model-level tiling (mlt) in the default pipeline.")
@click.option("--sram-budget", metavar="BYTES|xKiB|xMiB", callback=_sram_budget,
              help="SRAM one attention tile may use (mlt), e.g. 4MiB; default: the target's SRAM minus a reserve.")
@click.option("--schedule", metavar="best|overlap|sequential|overlap+MECH", callback=_schedule,
              help="How the build's commands overlap, which decides the MLT tiling and prices profile.json: "
                   "best (default: overlap plus every mechanism -- pipelined-mlt, prefetch), overlap (an op's DMA "
                   "beside its compute: the schedule the target was fitted under, which reproduces the measured "
                   "figures), sequential, or overlap+MECH[+MECH] (PERFORMANCE.md, 'Schedules').")
@click.option("--emit", multiple=True, type=click.Choice(["tvm"]),
              help="Also lower to TVM: host_aarch64.so (phone), host_local.so (this machine) + NPU programs.")
@click.option("--no-fuse", "no_fuse", multiple=True, metavar="FUSION",
              help="Remove one fusion pass from the pipeline (attention, groupnorm, layernorm, gelu, geglu, "
                   "matmul-bias, epilogue, identity; repeatable).")
@click.option("--precision", type=click.Choice(["auto", "fp32", "fp16", "w8a16"]), default="auto", show_default=True,
              help="Deployed precision (quantize): auto = FP16 text encoder / VAE decoder, W8A16 U-Net on NPU targets.")
@click.option("--component", type=click.Choice(["text-encoder", "unet", "vae-decoder"]),
              help="Which model this is, for --precision auto and calibration data (default: from the input names).")
@click.option("--calib", type=click.Path(dir_okay=False, path_type=Path), callback=_calib_file, metavar="FILE.npz",
              help="Calibration inputs: one array per model input ([N, *shape]); default: generated per component.")
@click.option("--eval", "eval_file", type=click.Path(dir_okay=False, path_type=Path), callback=_calib_file,
              metavar="FILE.npz",
              help="Held-out evaluation inputs (same format as --calib, e.g. CALIB/unet.eval.npz from `edgefc "
                   "calibrate`): report.json's SQNR and the --min-sqnr floor are measured on them. Default: the "
                   "last quarter of --calib (then not used for ranges), else generated inputs (not real data).")
@click.option("--min-sqnr", type=float, callback=_min_sqnr, metavar="DB",
              help="Quality floor: a quantized build whose worst output measures below DB dB SQNR on the evaluation "
                   "inputs fails the compile (one line naming the worst layers, nothing written). Default "
                   f"{DEFAULT_MIN_SQNR_DB:g} dB (docs/quantization.md); -inf for none.")
@click.option("--calib-method", type=click.Choice(["minmax", "percentile", "mse"]), default="minmax", show_default=True,
              help="How W8A16 activation ranges are chosen from the calibration data.")
@click.option("--calib-samples", type=click.IntRange(min=1), metavar="N",
              help="Calibration inputs to use (default: 8 for the U-Net and text encoder, 1 for the VAE decoder).")
@click.option("--keep-fp32", "keep_fp32", multiple=True, metavar="PATTERN",
              help="Keep matching nodes in FP32: node-name glob, re:REGEX or op type (repeatable).")
@click.option("--eval-samples", type=click.IntRange(min=0), metavar="N",
              help="Evaluation inputs for the quantization SQNR in report.json (default: all of --eval or the "
                   "held-out part of --calib up to 64, 4 for the VAE decoder; generated: 8, 2 for the VAE decoder; "
                   "0 skips the measurement and the floor).")
def compile_cmd(model, target, output, passes, plugin, shapes, verify, dump_after, demo, **pass_options):
    """Compile an ONNX MODEL for a target and write a build folder.

    The build folder holds model.onnx (the compiled graph, runnable by onnxruntime) and
    report.json (passes with time and node counts, inputs, outputs, and what each stage decided).
    """
    import edgefc
    from edgefc.ir import parse_shape

    if demo == (model is not None):
        raise click.UsageError("give either MODEL or --demo")
    for spec in plugin:
        edgefc.load_plugin(spec)
    shape_map = dict(parse_shape(s) for s in shapes)
    pass_list = [p.strip() for p in passes.split(",") if p.strip()] if passes else None
    target = edgefc.get_target(target)  # read and validated once; fails on an unknown target before any work
    if demo:
        model = _demo_model()
    if not model.exists():
        raise edgefc.ModelLoadError(f"model file not found: {model}")
    output = output or Path("build") / model.stem
    result = edgefc.compile(model, target, output=output, passes=pass_list, shapes=shape_map, verify=verify,
                            dump_after=list(dump_after) or None, options=pass_options, progress=_progress)
    for r in result.records:
        click.echo(f"  {r.name:<18} {r.seconds:8.2f} s  nodes {r.nodes_before} -> {r.nodes_after}")
    from edgefc.summary import build_summary

    for line in build_summary(result.output):
        click.echo(line)


@click.command("passes")
@click.option("--plugin", multiple=True, metavar="FILE.py|MODULE", help="Also load passes from a plugin.")
def passes_cmd(plugin):
    """List the registered passes (id, one-line description, options) and pipelines."""
    import dataclasses

    import edgefc
    from edgefc.registry import list_pipelines, one_line_doc

    for spec in plugin:
        edgefc.load_plugin(spec)
    for pid, cls in edgefc.list_passes().items():
        click.echo(f"{pid:<28} {one_line_doc(cls)}")
        names = [f.name for f in dataclasses.fields(cls.Options)]
        if names:
            click.echo(f"{'':<28}   options: {', '.join(names)}")
    click.echo("pipelines:")
    for name, items in list_pipelines().items():
        click.echo(f"  {name:<26} {', '.join(items)}")
