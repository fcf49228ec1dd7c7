"""``edgefc run``: execute a TVM build (``edgefc compile --emit tvm``) on this machine."""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
import zipfile
from pathlib import Path

import click
import numpy as np

from edgefc.errors import BuildError, VerificationError
from edgefc.metrics import sqnr_db

FP32_TOLERANCE = 1e-4   # max |tvm - ref| / max |ref| against the original model, fp32 builds
# Reduced-precision builds (W8A16, FP16): the TVM output may be at most twice as far (RMS) from the
# original model as the quantized model itself is (in onnxruntime on the same inputs, or as the
# quantization report says, whichever is less): SQNR >= quantized SQNR - 20*log10(2) dB. The NPU
# runtime rounds fp16 at every composite output, where onnxruntime computes some fp16 ops in fp32,
# so its fp16 noise is a little (2-3.5 dB measured) above onnxruntime's; int8/int16 QDQ matches
# onnxruntime to 70+ dB.
SQNR_MARGIN_DB = 20 * math.log10(2.0)


def _load_inputs(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise BuildError(f"inputs file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as data:
            is_npz = isinstance(data, np.lib.npyio.NpzFile)
            arrays = {k: data[k] for k in data.files} if is_npz else None
    except (ValueError, OSError, zipfile.BadZipFile, EOFError):
        arrays = None
    if arrays is None:
        raise BuildError(f"{path} is not a readable .npz file of named input arrays")
    return arrays


def _random_inputs(build: Path, seed: int) -> dict[str, np.ndarray]:
    """Seeded inputs of the build's input shapes and types (``edgefc.ort.random_inputs``: floats
    standard normal, integers in [0, 1000)), the weights not read."""
    import onnx

    from edgefc import ort

    model = onnx.load(str(build / "model.onnx"), load_external_data=False)
    try:
        feeds = ort.random_inputs(model, seed)
    except ValueError as e:
        raise BuildError(f"--random-inputs: {e}") from None
    shapes = ", ".join(f"{k} {list(v.shape)} {v.dtype}" for k, v in feeds.items())
    click.echo(f"random inputs (seed {seed}): {shapes}", err=True)
    return feeds


def _reduced_precision(build: Path, report: dict) -> tuple[bool, float | None]:
    """(is the build quantized or fp16, the quantization report's SQNR in dB if it has one)."""
    q = report.get("quantization") or {}
    precision = str(q.get("precision", "")).lower()
    sqnr = q.get("sqnr_db")
    sqnr = float(sqnr) if isinstance(sqnr, (int, float)) else None
    if precision and precision not in ("fp32", "none"):
        return True, sqnr
    import onnx

    model = onnx.load(str(build / "model.onnx"), load_external_data=False)
    ops = {n.op_type for n in model.graph.node}
    fp16 = any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)
    return bool(ops & {"QuantizeLinear", "DequantizeLinear"}) or fp16, sqnr


def _report_and_source(build: Path) -> tuple[dict, str]:
    """report.json of the build and the original model it names (``--check`` needs both)."""
    try:
        report = json.loads((build / "report.json").read_text())
    except (OSError, json.JSONDecodeError):
        raise BuildError(f"{build} has no readable report.json") from None
    source = report.get("source")
    if not source or not Path(source).is_file():
        raise BuildError(f"--check needs the original model, but {source or 'no source'} (report.json \"source\") is not available")
    return report, source


def _check(build: Path, feeds: dict, outputs: dict) -> list[str]:
    from edgefc import ort

    report, source = _report_and_source(build)
    ref = ort.run(ort.session(source), feeds)
    compiled = ort.run(ort.session(build / "model.onnx"), feeds)
    lines = []
    diff = ort.compare(ref, outputs)
    low = ort.compare(compiled, outputs)
    if low.reason:  # another output set, shape, dtype or non-finite pattern than the compiled model's
        raise VerificationError(f"TVM outputs differ from onnxruntime on the compiled model: {low.reason}")
    if diff.reason:
        raise VerificationError(f"TVM outputs differ from onnxruntime on the original model: {diff.reason}")
    abs_err, rel_err, name = diff.abs_error, diff.rel_error, diff.output
    reduced, report_sqnr = _reduced_precision(build, report)
    lines.append(f"vs onnxruntime, compiled model: max rel err {low.rel_error:.3g}")
    if not reduced:
        ok = rel_err <= FP32_TOLERANCE
        lines.append(f"vs onnxruntime, original model {source}: max abs err {abs_err:.3g}, max rel err {rel_err:.3g} "
                     f"({name}; allowed {FP32_TOLERANCE:g}) {'ok' if ok else 'FAIL'}")
        if not ok:
            raise VerificationError(f"TVM output '{name}' differs from onnxruntime on the original model: "
                                    f"max rel err {rel_err:.3g} > {FP32_TOLERANCE:g}")
        return lines
    for out_name, r in ref.items():
        if out_name not in outputs:
            continue
        s_tvm = sqnr_db(r, outputs[out_name])
        s_ort = sqnr_db(r, compiled[out_name])
        floor = min(s_ort, report_sqnr if report_sqnr is not None else s_ort) - SQNR_MARGIN_DB
        ok = s_tvm >= floor
        lines.append(f"vs onnxruntime, original model {source}: {out_name} SQNR {s_tvm:.2f} dB, max rel err {rel_err:.3g}; "
                     f"quantized model in onnxruntime {s_ort:.2f} dB, report {report_sqnr if report_sqnr is not None else 'n/a'} dB "
                     f"(allowed >= {floor:.2f} dB) {'ok' if ok else 'FAIL'}")
        if not ok:
            raise VerificationError(f"TVM output '{out_name}' is further from the original model than the quantization "
                                    f"error: SQNR {s_tvm:.2f} dB < {floor:.2f} dB")
    return lines


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".npz", dir=path.parent)
    os.close(fd)
    try:
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@click.command("run")
@click.argument("build", type=click.Path(path_type=Path))
@click.option("--inputs", "inputs_path", type=click.Path(path_type=Path), metavar="FILE.npz",
              help="Model inputs: an .npz with one array per input name (e.g. sample, timestep, encoder_hidden_states).")
@click.option("--random-inputs", is_flag=True,
              help="Instead of --inputs: seeded random inputs of the build's input shapes and types (floats standard "
                   "normal, integers in [0, 1000)), as onnxruntime_perf_test and trtexec generate them.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of --random-inputs.")
@click.option("--save-inputs", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE.npz",
              help="Also write the inputs that ran (with --random-inputs: to run them again elsewhere).")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), metavar="OUT.npz",
              help="Write the outputs to this .npz.")
@click.option("--check", is_flag=True,
              help="Also run onnxruntime on the original model (report.json \"source\") and report the error.")
def run_cmd(build, inputs_path, random_inputs, seed, save_inputs, output, check):
    """Execute the local TVM build in BUILD (edgefc compile --emit tvm) on the inputs in FILE.npz
    (--inputs) or on seeded random inputs (--random-inputs, --seed).

    The host code runs in TVM's Relax VM (host_local.so); every NPU partition runs through the
    edgefc NPU runtime (npu_programs.json, executed in numpy as the NPU would). Prints each
    output's shape. With --check: the error against onnxruntime on the original model, within
    1e-4 relative for fp32 builds, within the quantization error for quantized / fp16 builds.
    """
    from edgefc.staging import check_output_file
    from edgefc.targets.tvm_runtime import load_build

    if (inputs_path is None) == (not random_inputs):
        raise BuildError("give the inputs: --inputs FILE.npz or --random-inputs (not both)")
    for option, path in (("-o", output), ("--save-inputs", save_inputs)):
        if path is not None:
            check_output_file(path, option, create_parents=True, protect=[inputs_path, build / "model.onnx"])
    if not build.is_dir():
        raise BuildError(f"build folder not found: {build}")
    if not (build / "report.json").is_file() or not (build / "model.onnx").is_file():
        raise BuildError(f"{build} is not an edgefc build folder (no report.json / model.onnx)")
    feeds = _load_inputs(inputs_path) if inputs_path is not None else _random_inputs(build, seed)
    if save_inputs is not None:
        _save_npz(save_inputs, feeds)
        click.echo(f"wrote {save_inputs}", err=True)
    if check:
        _report_and_source(build)  # fail before running when --check cannot be done
    runner = load_build(build)
    runner.check_feeds(feeds)
    start = time.perf_counter()
    outputs = runner.run(feeds)
    seconds = time.perf_counter() - start
    for name, arr in outputs.items():
        click.echo(f"{name}: shape {list(arr.shape)} {arr.dtype}")
    click.echo(f"ran in {seconds:.3f} s (TVM host library + {len(runner.meta['npu_programs'])} NPU programs)", err=True)
    if output is not None:
        _save_npz(output, outputs)
        click.echo(f"wrote {output}", err=True)
    if check:
        model_feeds = {k: v for k, v in feeds.items()}
        for line in _check(build, model_feeds, outputs):
            click.echo(line)
