"""Modelled NPU time of a generated image (split out of :mod:`edgefc.models.pipeline`): each model
that ran, priced by the target's cost model (:mod:`edgefc.targets`) at the paper's deployed
precisions or as built, per invocation and times the invocations (paper Table 7).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from edgefc.models.configs import COMPONENTS, LABELS
from edgefc.precision import DEPLOYED, describe_plan, recorded_plan


def _say(progress: bool, message: str) -> None:
    if progress:
        print(message, file=sys.stderr, flush=True)


def _cost_model(target: str):
    """The target and the cost model's graph loader, or a one-sentence error when either is missing."""
    from edgefc.errors import TargetError
    from edgefc.target import get_target

    tgt = get_target(target)
    if not tgt.has_cost_model:
        raise TargetError(f"target '{tgt.name}' has no cost model, so --target cannot report NPU time.")
    from edgefc.build_folder import load_for_profile

    return tgt, load_for_profile


def built_precision(graph) -> str | None:
    """The precision ``quantize`` recorded on the graph's ops (``w8a16``, ``fp16``, ``mixed`` ...), or
    None when it did not run or left everything FP32 (then the model is priced at the paper's
    deployed precision instead)."""
    built = describe_plan(recorded_plan(graph))
    return built if built not in (None, "fp32") else None


def npu_times(result, target: str, progress: bool = True) -> dict:
    """Modelled NPU time of each component that ran (``result``: a :class:`~edgefc.models.pipeline.GenerateResult`),
    per invocation and for this run's invocations.

    Each model file is priced by the target's cost model (what ``edgefc profile`` reports for it):
    a model ``quantize`` decided as built (its ops' recorded precisions, labelled e.g. "w8a16 (built)"),
    anything else as deployed in the paper (``edgefc.precision.DEPLOYED``: text encoder and VAE
    decoder FP16, U-Net W8A16), like Table 7, under the profile's default schedule. Returns
    ``{"target", "schedule", "components": {component: {"precision", "per_run_ms", "runs", "total_ms",
    "model"}}, "total_ms"}``; also stored in ``result.npu``.
    """
    tgt, load_for_profile = _cost_model(target)
    runs = result.plan.runs
    rows, schedules = {}, set()
    for component in COMPONENTS:
        model = Path(result.models[component])
        t = time.perf_counter()
        _say(progress, f"cost model: {LABELS[component]} on {tgt.name} ...")
        graph = load_for_profile(model.parent if model.name == "model.onnx" else model,
                                 progress=lambda m: _say(progress, "      " + m))
        built = built_precision(graph)
        precision = "as-built" if built else DEPLOYED[component]
        label = f"{built} (built)" if built else precision
        prof = tgt.profile(graph, precision=precision, model=model.name)
        schedules.add(prof.schedule)
        del graph
        per_run = float(prof.total_ms)
        rows[component] = {"precision": label, "per_run_ms": per_run, "runs": runs[component],
                           "total_ms": per_run * runs[component], "model": str(model)}
        _say(progress, f"      {label}: {per_run:.1f} ms per run [{time.perf_counter() - t:.1f} s]")
    npu = {"target": tgt.name, "schedule": ", ".join(sorted(schedules)), "components": rows,
           "total_ms": sum(r["total_ms"] for r in rows.values())}
    result.npu = npu
    return npu


def format_npu_table(npu: dict) -> str:
    """The modelled NPU times as a small table (per invocation, invocations, total), like Table 7."""
    lines = [f"modelled NPU time on {npu['target']} (edgefc cost model, {npu['schedule']} schedule; Table 7 layout)",
             f"  {'component':<14}{'precision':<15}{'per run (ms)':>13}{'runs':>6}{'total (ms)':>12}"]
    for component, r in npu["components"].items():
        lines.append(f"  {LABELS[component]:<14}{r['precision']:<15}{r['per_run_ms']:>13.1f}{r['runs']:>6}"
                     f"{r['total_ms']:>12.1f}")
    lines.append(f"  {'total':<14}{'':<15}{'':>13}{'':>6}{npu['total_ms']:>12.1f}")
    one = sum(r["per_run_ms"] for r in npu["components"].values())
    unet = npu["components"]["unet"]
    lines.append(f"  (Table 7 counts each component once: {one:.1f} ms; this image ran the U-Net "
                 f"{unet['runs']} x {unet['per_run_ms']:.1f} ms)")
    return "\n".join(lines)
