"""``edgefc.compile``: load -> pass pipeline -> artifacts, written atomically.

The data flow of DESIGN.md in one function: the ONNX file is loaded as a Graph, the pipeline
(a named list of passes, data not code: ``npu`` or ``default``, see :mod:`edgefc.registry`)
transforms it, and the build folder receives
``model.onnx`` (still runnable by onnxruntime), ``report.json`` (what every stage decided) and
whatever the target adds (``profile.json``, TVM libraries). Everything is written into a
temporary folder beside the destination and moved into place at the end, so a failure leaves
no half-written build behind.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx_graphsurgeon as gs

from edgefc import handover, ir, staging
from edgefc.errors import PassError
from edgefc.pass_base import PassContext
from edgefc.pass_manager import PassManager, PassRecord
from edgefc.registry import insert_passes, is_known, list_pipelines
from edgefc.target import Target, get_target


def default_pipeline(target: Target | None, options: dict) -> list[str]:
    """The pipeline ``edgefc compile`` runs when ``--passes`` is not given, as a list of names.

    NPU targets run the ``npu`` pipeline (canonicalize -> fuse -> quantize -> mlt), others the
    ``default`` one (canonicalize -> fuse); the options edit the list: ``--precision fp32``
    removes quantize, ``--no-mlt`` removes mlt (``--no-fuse`` removes single fusions, see
    :func:`edgefc.pass_manager.skipped_fusions`). Quantization comes before tiling so the tile
    solver sees the deployed byte sizes.
    """
    npu = bool(target is not None and target.is_npu)
    names = list(list_pipelines()["npu" if npu else "default"])
    drop = set()
    if options.get("precision", "auto") == "fp32":
        drop.add("quantize")
    if options.get("no_mlt", False):
        drop.add("mlt")
    return [n for n in names if n not in drop and is_known(n)]


@dataclass
class CompileResult:
    graph: gs.Graph
    report: dict
    records: list[PassRecord] = field(default_factory=list)
    output: Path | None = None


def _tensor_info(t: gs.Tensor) -> dict:
    return {"name": t.name, "shape": list(ir.static_shape(t) or t.shape or []),
            "dtype": str(np.dtype(t.dtype)) if t.dtype is not None else None}


def _input_files(source: Path | None) -> list[Path]:
    """The input model and the external data files beside it that follow its name
    (``m.onnx.data``, ``m.onnx_data``): files a build never replaces or removes."""
    if source is None:
        return []
    files = [source]
    try:
        files += [p for p in source.parent.iterdir() if p.name != source.name and p.name.startswith(source.name)]
    except OSError:
        pass
    return files


def _say(progress, message: str) -> None:
    if progress is not None:
        progress(message)


def compile(model: str | os.PathLike | gs.Graph, target: str | Target | None = "exynos2400", *,
            output: str | os.PathLike | None = None, passes: list[str] | None = None,
            shapes: dict[str, tuple[int, ...]] | None = None, verify: bool = False,
            dump_after: dict[str, str | os.PathLike] | None = None, options: dict | None = None,
            progress=None, force: bool = False, provenance: dict | None = None,
            consts: dict | None = None, insert_after: dict | None = None,
            insert_before: dict | None = None) -> CompileResult:
    """Compile an ONNX model (path or Graph) for ``target``.

    ``passes`` overrides the default pipeline; ``insert_after`` / ``insert_before`` place more
    passes into it, ``{anchor: pass or [passes]}`` (``{"fuse-epilogue": "my-pass"}``, see
    :func:`edgefc.registry.insert_passes`); ``shapes`` fixes input shapes; ``consts`` fixes
    inputs to constant values (``{"sr": "16000"}``, :func:`edgefc.ir.fix_inputs`: they leave the
    model's inputs, and canonicalize folds what depends on them); ``verify`` checks
    every pass against onnxruntime; ``dump_after`` names passes after which the graph is written
    (``<output>/after-<pass>.onnx``, or the paths given in a dict); ``options`` are pass options
    (``precision``, ``no_mlt``, ``sram_budget`` ...). With ``output`` the build folder is written
    atomically, after the handover check (:mod:`edgefc.handover`); ``force`` lets it write into a
    non-empty folder that is not an edgefc build (:func:`edgefc.staging.plan_output`).
    ``progress`` is called with a :class:`PassRecord` before and after each pass and with a
    message (str) before each long step after the passes. ``provenance`` (the command line that
    asked for the build) goes into ``report.json`` ``"reproducibility"``.
    """
    options = dict(options or {})
    options["shapes"] = dict(shapes or {})
    tgt = get_target(target) if target is not None else None
    names = passes if passes is not None else default_pipeline(tgt, options)
    names = insert_passes(names, after=insert_after, before=insert_before)  # unknown passes fail before any work
    PassManager(names).prepare(PassContext(target=tgt, options=dict(options)))  # and bad options
    source = None if isinstance(model, gs.Graph) else Path(model)
    plan = None
    if output is not None:  # an output that cannot be written, or must not be: fail before any work
        plan = staging.plan_output(output, force=force, protect=_input_files(source))
    graph = model if source is None else ir.load(source, shapes)
    fixed = ir.fix_inputs(graph, consts) if consts else {}
    ctx = PassContext(target=tgt, options=options)
    ctx.options["source_model"] = str(source) if source else None
    inputs = [_tensor_info(t) for t in graph.inputs]
    if dump_after is not None and not isinstance(dump_after, dict) and plan is None:
        raise PassError("--dump-after needs an output folder (-o)")
    try:
        if plan is not None:
            stage = staging.start(plan)
            if dump_after is not None and not isinstance(dump_after, dict):
                dump_after = {name: stage / f"after-{name}.onnx" for name in dump_after}
        pm = PassManager(names, verify=verify, dump_after=dump_after, progress=progress)
        start = time.perf_counter()
        graph = pm.run(graph, ctx)
        report = {
            "target": tgt.name if tgt is not None else None,
            "source": str(source) if source else None,
            "passes": [r.as_dict() for r in pm.records],
            "seconds": round(time.perf_counter() - start, 3),
            "inputs": inputs,
            **({"constants": fixed} if fixed else {}),
            "outputs": [_tensor_info(t) for t in graph.outputs],
            **ctx.report,
            "reproducibility": reproducibility(tgt, options, provenance),
        }
        result = CompileResult(graph, report, pm.records)
        if plan is not None:
            result.output = write_build(result, plan, tgt, ctx, progress)
    except BaseException:
        if plan is not None:
            staging.abort(plan)
        raise
    return result


def write_build(result: CompileResult, plan: staging.OutputPlan, target: Target | None, ctx: PassContext,
                progress=None) -> Path:
    """Write the build folder of ``plan`` (:func:`edgefc.staging.plan_output`): ``model.onnx``,
    the handover check of every model in it (:func:`edgefc.handover.check_model_file`: a failure
    is :class:`~edgefc.handover.HandoverError` and nothing is written), the target's artifacts,
    ``report.json``, the marker; then the folder is moved into place (:func:`edgefc.staging.commit`).
    The staging folder may already hold ``--dump-after`` files."""
    tmp = plan.staging if plan.staging is not None else staging.start(plan)
    ir.save(result.graph, tmp / "model.onnx")
    last = result.records[-1].name if result.records else None
    checks = []
    for model_file in sorted(tmp.glob("*.onnx"), key=lambda f: (f.name != "model.onnx", f.name)):
        _say(progress, f"handover: {model_file.name}: onnx.checker (full) and onnxruntime sessions with default "
                       f"options and with optimisations off, in a child process")
        checks.append(handover.check_model_file(model_file, last))
    result.report["handover"] = checks
    for name, write in ctx.artifacts.items():   # files the passes asked for (quantize's precision.png)
        write(tmp / name)
    if target is not None:
        _say(progress, "target: pricing the build (profile.json)")
        target.write_artifacts(result.graph, tmp, ctx, result.report)
    report_file = tmp / "report.json"
    report_file.write_text(json.dumps(result.report, indent=2, default=_json_default) + "\n")
    return staging.commit(plan)


def reproducibility(target: Target | None, options: dict, provenance: dict | None = None) -> dict:
    """How a build was made (``report.json`` / ``profile.json`` ``"reproducibility"``): the edgefc,
    Python, onnx, onnxruntime and (if installed) TVM versions, the target and the SHA-256 of its
    description file, the compile options, and the command line when the CLI gave it."""
    import hashlib
    import platform
    import sys
    from importlib.metadata import PackageNotFoundError, version

    def v(pkg):
        try:
            return version(pkg)
        except PackageNotFoundError:
            return None

    out = {"edgefc": v("edgefc"), "python": platform.python_version(), "onnx": v("onnx"),
           "onnxruntime": v("onnxruntime"), "onnx_graphsurgeon": v("onnx-graphsurgeon") or v("onnx_graphsurgeon"),
           "numpy": v("numpy"), "tvm": v("apache-tvm") or v("tvm"), "platform": platform.platform()}
    if target is not None:
        out["target"] = target.name
        src = target.description_file
        if src and Path(src).is_file():
            out["target_file"] = src
            out["target_sha256"] = hashlib.sha256(Path(src).read_bytes()).hexdigest()
    out["options"] = {k: _plain(val) for k, val in sorted(options.items())
                      if k != "source_model" and val not in (None, (), [], {}, False)}
    if provenance:
        out.update(provenance)
    else:
        out["command"] = None
        out["argv"] = list(sys.argv)
    return out


def _plain(value):
    """``value`` as JSON data: numbers, strings, lists and dicts as they are, anything else as text."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, dict):
        return {str(k): _plain(x) for k, x in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = [_plain(x) for x in value]
        return sorted(items, key=str) if isinstance(value, (set, frozenset)) else items
    return str(value)


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
