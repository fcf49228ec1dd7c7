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
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx_graphsurgeon as gs

from edgefc import ir
from edgefc.errors import PassError
from edgefc.pass_base import PassContext
from edgefc.pass_manager import PassManager, PassRecord
from edgefc.registry import insert_passes, is_known, list_pipelines
from edgefc.staging import staging_dir
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


def compile(model: str | os.PathLike | gs.Graph, target: str | Target | None = "exynos2400", *,
            output: str | os.PathLike | None = None, passes: list[str] | None = None,
            shapes: dict[str, tuple[int, ...]] | None = None, verify: bool = False,
            dump_after: dict[str, str | os.PathLike] | None = None, options: dict | None = None,
            progress=None, insert_after: dict | None = None, insert_before: dict | None = None) -> CompileResult:
    """Compile an ONNX model (path or Graph) for ``target``.

    ``passes`` overrides the default pipeline; ``insert_after`` / ``insert_before`` place more
    passes into it, ``{anchor: pass or [passes]}`` (``{"fuse-epilogue": "my-pass"}``, see
    :func:`edgefc.registry.insert_passes`); ``shapes`` fixes input shapes; ``verify`` checks
    every pass against onnxruntime; ``dump_after`` names passes after which the graph is written
    (``<output>/after-<pass>.onnx``, or the paths given in a dict); ``options`` are pass options
    (``precision``, ``no_mlt``, ``sram_budget`` ...). With ``output`` the build folder is written
    (atomically).
    """
    options = dict(options or {})
    options["shapes"] = dict(shapes or {})
    tgt = get_target(target) if target is not None else None
    names = passes if passes is not None else default_pipeline(tgt, options)
    names = insert_passes(names, after=insert_after, before=insert_before)  # unknown passes fail before any work
    PassManager(names).prepare(PassContext(target=tgt, options=dict(options)))  # and bad options
    source = None
    if isinstance(model, gs.Graph):
        graph = model
    else:
        source = Path(model)
        graph = ir.load(source, shapes)
    ctx = PassContext(target=tgt, options=options)
    ctx.options["source_model"] = str(source) if source else None
    inputs = [_tensor_info(t) for t in graph.inputs]
    staging = None
    if output is not None:
        out = Path(output).resolve()
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = staging_dir(out)
    if dump_after is not None and not isinstance(dump_after, dict):
        if staging is None:
            raise PassError("--dump-after needs an output folder (-o)")
        dump_after = {name: staging / f"after-{name}.onnx" for name in dump_after}
    try:
        pm = PassManager(names, verify=verify, dump_after=dump_after, progress=progress)
        start = time.perf_counter()
        graph = pm.run(graph, ctx)
    except BaseException:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    report = {
        "target": tgt.name if tgt is not None else None,
        "source": str(source) if source else None,
        "passes": [r.as_dict() for r in pm.records],
        "seconds": round(time.perf_counter() - start, 3),
        "inputs": inputs,
        "outputs": [_tensor_info(t) for t in graph.outputs],
        **ctx.report,
    }
    result = CompileResult(graph, report, pm.records)
    if output is not None:
        result.output = write_build(result, Path(output), tgt, ctx, staging)
    return result


def write_build(result: CompileResult, output: Path, target: Target | None, ctx: PassContext,
                tmp: Path | None = None) -> Path:
    """Write ``model.onnx``, target artifacts and ``report.json`` into ``output`` atomically
    (via ``tmp``, a folder beside it that may already hold ``--dump-after`` files)."""
    output = output.resolve()
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp or staging_dir(output)
    try:
        ir.save(result.graph, tmp / "model.onnx")
        if target is not None:
            target.write_artifacts(result.graph, tmp, ctx, result.report)
        (tmp / "report.json").write_text(json.dumps(result.report, indent=2, default=_json_default) + "\n")
        if output.exists():
            old = output.with_name(f".{output.name}.old-{os.getpid()}")
            os.replace(output, old)
            os.replace(tmp, output)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output


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
