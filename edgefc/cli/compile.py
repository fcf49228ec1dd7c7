"""``edgefc compile`` and ``edgefc passes``."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from edgefc.errors import ExportError
from edgefc.passes.quant_eval import DEFAULT_MIN_SQNR_DB
from edgefc.precision import COMPONENTS, REQUESTS

#: where ``--demo`` exported its U-Net before it shared the export cache of ``edgefc generate``
#: (moved into that cache on first use, so the 1.3 GB model is never kept twice)
OLD_DEMO_FILE = Path.home() / ".cache" / "edgefc" / "demo" / "unet-bk-sdm-tiny-512.onnx"


def _progress(event):
    """Progress of a compile as it happens: a pass starting (on a terminal only, on stderr), a pass
    done (its line on stdout: time and node counts), a long step after the passes (stderr). Each
    line is flushed as it is written, so logs and pipes see it when it happens."""
    from edgefc.pass_manager import PassRecord

    if isinstance(event, PassRecord):
        if event.seconds is None:
            if sys.stderr.isatty():
                click.echo(f"  pass {event.name} ...", err=True)
            return
        extra = f"  ({event.renamed_nodes} node names made unique)" if event.renamed_nodes else ""
        if event.verify_rel_error is not None:
            extra += f"  verified: max rel error {event.verify_rel_error:.3g}"
        click.echo(f"  {event.name:<18} {event.seconds:8.2f} s  nodes {event.nodes_before} -> {event.nodes_after}{extra}")
        return
    click.echo(f"  {event} ...", err=True)


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


def demo_model_path() -> Path:
    """The full-size BK-SDM-Tiny U-Net (512x512) ``--demo`` compiles: the file ``edgefc generate``
    exports and reuses (``$EDGEFC_CACHE/bk-sdm-tiny-full-512x512/unet.onnx``), one cache for both."""
    try:
        from edgefc.models.export_cache import export_dir
    except ImportError as e:
        raise ExportError(f"--demo needs the model extra ({e.name} is missing): pip install 'edgefc[models]'") from None
    return export_dir("bk-sdm-tiny", "full", 512, 512) / "unet.onnx"


def _demo_model(quiet: bool = False) -> Path:
    """Export (once, cached) the full-size BK-SDM-Tiny U-Net at 512x512 for ``--demo``."""
    path = demo_model_path()
    if not path.exists() and OLD_DEMO_FILE.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(OLD_DEMO_FILE, path)  # an older edgefc's demo cache: moved, not copied
            if not quiet:
                click.echo(f"demo: moved the cached U-Net from {OLD_DEMO_FILE} to {path}", err=True)
        except OSError:
            pass
    if not path.exists():
        from edgefc.models.export import export_component

        if not quiet:
            click.echo(f"demo: exporting the BK-SDM-Tiny U-Net (512x512, random weights) once into the cache {path}",
                       err=True)
        export_component("unet", "bk-sdm-tiny", path, height=512, width=512, progress=not quiet)
    return path


def _insertions(ctx, param, value) -> dict[str, list[str]]:
    """--insert-after / --insert-before ANCHOR=PASS[,PASS]: anchor -> passes (one-line error, exit 2,
    for a malformed value; unknown names fail in edgefc.compile before any work)."""
    from edgefc.errors import PassError

    table: dict[str, list[str]] = {}
    for item in value:
        anchor, sep, passes = item.partition("=")
        names = [n.strip() for n in passes.split(",") if n.strip()]
        if not sep or not anchor.strip() or not names:
            raise PassError(f"--{param.name.replace('_', '-')} {item}: expected ANCHOR=PASS[,PASS...], "
                            f"e.g. fuse-epilogue=my-pass")
        table.setdefault(anchor.strip(), []).extend(names)
    return table


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
@click.option("-o", "--output", type=click.Path(path_type=Path),
              help="Build folder to write (default: build/<model name>).")
@click.option("--passes", help="Comma-separated passes and pipelines replacing the default pipeline, "
                               "e.g. canonicalize,fuse (fuse is the pipeline of every fusion pass).")
@click.option("--plugin", multiple=True, metavar="FILE.py|MODULE",
              help="Import a file or module that registers passes (repeatable).")
@click.option("--insert-after", "insert_after", multiple=True, metavar="ANCHOR=PASS[,PASS]", callback=_insertions,
              help="Run PASS right after ANCHOR (a pass or pipeline of the pipeline being run), e.g. "
                   "fuse-epilogue=fuse-hardswish with --plugin hardswish.py (repeatable).")
@click.option("--insert-before", "insert_before", multiple=True, metavar="ANCHOR=PASS[,PASS]", callback=_insertions,
              help="Run PASS right before ANCHOR, e.g. quantize=my-pass (repeatable).")
@click.option("--shape", "shapes", multiple=True, metavar="NAME=D1xD2x...",
              help="Static shape for an input, e.g. sample=1x4x64x64 (repeatable).")
@click.option("--const", "consts", multiple=True, metavar="NAME=VALUE",
              help="Fix an input to a constant, e.g. sr=16000 (a number fills the input; numbers separated by "
                   "commas give each element): it leaves the model's inputs, and canonicalize folds what depends on it "
                   "(an If on a sample rate, a length). Repeatable.")
@click.option("--verify", is_flag=True,
              help="Check every pass against onnxruntime on seeded random inputs; fail on a mismatch.")
@click.option("--dump-after", multiple=True, metavar="PASS",
              help="Also write the graph after PASS to BUILD/after-PASS.onnx (repeatable).")
@click.option("--demo", is_flag=True,
              help="Compile the built-in default: the full-size BK-SDM-Tiny U-Net at 512x512 (exported once into "
                   "the cache edgefc generate uses, $EDGEFC_CACHE or ~/.cache/edgefc/models).")
@click.option("--force", is_flag=True,
              help="Write into an existing non-empty folder that is not an edgefc build: the build's files replace "
                   "same-named files, everything else is kept (the input model is never replaced).")
@click.option("--quiet", "-q", is_flag=True,
              help="No progress (per-pass lines, progress bars, stage messages): only errors and the summary.")
@click.option("--json-result", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE.json",
              help="Also write the result for CI as JSON: status, exit_status, build folder, files, passes, the "
                   "summary's figures; on an error its message (written on failure too).")
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
@click.option("--precision", type=click.Choice(REQUESTS), default="auto", show_default=True,
              help="Deployed precision (quantize): auto = FP16 text encoder / VAE decoder, W8A16 U-Net and other "
                   "models on NPU targets, and search instead of W8A16 when --eval or --calib gives real inputs "
                   "(report.json says which and why); search = one precision per layer group, the fastest the "
                   "target's cost model finds that meets --min-sqnr on the evaluation inputs; "
                   "w8a16 = INT8 weights, INT16 activations; w8a8 = INT8 weights and activations (priced at int8xint8; "
                   "what stays wider - softmax internals, norm statistics, the time embedding - is in report.json).")
@click.option("--component", type=click.Choice(COMPONENTS),
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
@click.option("--layer-precision", "layer_precision", multiple=True, metavar="PATTERN=PRECISION",
              help="Run matching nodes (node-name glob, re:REGEX or op type) at fp32, fp16, w8a16 or w8a8 in a "
                   "--precision w8a16/w8a8 build, e.g. 'Attention=fp16' (repeatable; later patterns win, --keep-fp32 "
                   "wins over all). The conversions between precisions are added to the graph and priced.")
@click.option("--eval-samples", type=click.IntRange(min=0), metavar="N",
              help="Evaluation inputs for the quantization SQNR in report.json (default: all of --eval or the "
                   "held-out part of --calib up to 64, 4 for the VAE decoder; generated: 8, 2 for the VAE decoder; "
                   "0 skips the measurement and the floor).")
def compile_cmd(model, target, output, passes, plugin, insert_after, insert_before, shapes, consts, verify, dump_after,
                demo, force, quiet, json_result, **pass_options):
    """Compile an ONNX MODEL for a target and write a build folder.

    The build folder holds model.onnx (the compiled graph, runnable by onnxruntime) and
    report.json (passes with time and node counts, inputs, outputs, and what each stage decided).
    Before it is moved into place, every model in it passes onnx.checker and loads in onnxruntime
    with the default session options and with optimisations off (exit status 3 if not: a bug).
    """
    from edgefc.errors import EdgefcError
    from edgefc.staging import check_output_file

    if json_result is not None:
        json_result = check_output_file(json_result, "--json-result")
    try:
        result = _compile(model, target, output, passes, plugin, shapes, verify, dump_after, demo, force, quiet,
                          pass_options, consts, insert_after, insert_before)
    except EdgefcError as e:
        if json_result is not None:
            _write_json_result(json_result, {"status": "error", "exit_status": getattr(e, "exit_status", 2),
                                             "error": str(e)})
        raise
    from edgefc.cli.summary import build_summary, summary_data

    for line in build_summary(result.output):
        click.echo(line)
    if json_result is not None:
        _write_json_result(json_result, {"status": "ok", "exit_status": 0, **summary_data(result.output)})
        if not quiet:
            click.echo(f"wrote {json_result}", err=True)


def _write_json_result(path: Path, data: dict) -> None:
    from edgefc.staging import write_text_file

    write_text_file(path, json.dumps(data, indent=2) + "\n")


def _compile(model, target, output, passes, plugin, shapes, verify, dump_after, demo, force, quiet, pass_options,
             consts=(), insert_after=None, insert_before=None):
    import edgefc
    from edgefc.ir import parse_consts, parse_shapes
    from edgefc.staging import check_output_folder

    if demo == (model is not None):
        raise click.UsageError("give either MODEL or --demo")
    for spec in plugin:
        edgefc.load_plugin(spec)
    shape_map = parse_shapes(shapes)
    const_map = parse_consts(consts)
    pass_list = [p.strip() for p in passes.split(",") if p.strip()] if passes else None
    target = edgefc.get_target(target)  # read and validated once; fails on an unknown target before any work
    if model is not None:
        if not model.exists():
            raise edgefc.ModelLoadError(f"model file not found: {model}")
        if model.is_dir():
            raise edgefc.ModelLoadError(f"{model} is a folder, not an .onnx file")
    output = output or Path("build") / (model.stem if model is not None else "demo")
    check_output_folder(output)  # an unwritable -o fails before the demo export, too
    if demo:
        model = _demo_model(quiet)
    if quiet:
        pass_options["progress"] = False
    return edgefc.compile(model, target, output=output, passes=pass_list, shapes=shape_map, verify=verify,
                          dump_after=list(dump_after) or None, options=pass_options,
                          progress=None if quiet else _progress, force=force, consts=const_map,
                          provenance={"command": "edgefc " + " ".join(_argv()), "argv": _argv()},
                          insert_after=insert_after, insert_before=insert_before)


def _argv() -> list[str]:
    from edgefc.cli import ARGV

    return list(ARGV)


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
