"""Fusion benchmark: edgefc (canonicalize + fuse) vs onnxruntime's transformers optimizer.

Both run on the same exported model files, each in a fresh child process after the file has
been read once (so both see a warm page cache), one after the other. For every component it
prints one row per side: wall time (load + optimise, in memory, no save), peak RSS, node
count before and after, fused ops by kind, and the Softmax / InstanceNormalization / Erf nodes
left outside fused ops.

onnxruntime side: ``onnxruntime.transformers.optimizer.optimize_model(path, model_type=
unet|clip|vae, use_gpu=False, opt_level=0)``: its Python fusions only, as onnxruntime's own
Stable Diffusion recipe (``models/stable_diffusion/optimize_pipeline.py``) calls it.
``--ort-opt-level 1`` (the optimize_model default for these model types) first runs
onnxruntime's basic CPU graph optimisations in an InferenceSession, which costs far more time
and memory (52 s and 7.5 GB peak for the full-size BK-SDM-Tiny U-Net, 2 busy cores).

    python bench/fusion_vs_ort.py                      # the full-size exports in /tmp/edgefc-models
    python bench/fusion_vs_ort.py --tiny               # the tiny ones (seconds)
    python bench/fusion_vs_ort.py --only unet-bk-sdm-tiny --json out.json
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

# (row name, file stem, onnxruntime model_type)
COMPONENTS = (
    ("unet-bk-sdm-tiny", "unet-bk-sdm-tiny", "unet"),
    ("unet-sd-v1.5", "unet-sd-v1.5", "unet"),
    ("text-encoder", "text-encoder-bk-sdm-tiny", "clip"),
    ("vae-decoder", "vae-decoder-bk-sdm-tiny", "vae"),
)
# fused-op kinds, by op type (both tools' names)
KINDS = {
    "attention": lambda op: "attention" in op.lower(),
    "groupnorm": lambda op: "groupnorm" in op.lower(),
    "layernorm": lambda op: "layernorm" in op.lower(),
    "gelu": lambda op: op in ("Gelu", "FastGelu", "BiasGelu", "QuickGelu"),
    "geglu": lambda op: op in ("GeGLU", "BiasSplitGelu"),
    "matmul": lambda op: op in ("FusedMatMul", "BiasAdd", "Gemm"),
    "conv": lambda op: op in ("FusedConv", "NhwcConv"),
}
LEFT = ("Softmax", "InstanceNormalization", "Erf")


def _counts(ops: collections.Counter, original: set[str]) -> dict:
    """Fused ops by kind (op types the tool introduced) and the ops of interest left over."""
    new = {op: n for op, n in ops.items() if op not in original}
    kinds = {k: sum(n for op, n in new.items() if f(op)) for k, f in KINDS.items()}
    return {"kinds": kinds, "left": {op: ops.get(op, 0) for op in LEFT}, "new_ops": dict(sorted(new.items()))}


def _child(side: str, path: str, model_type: str, ort_opt_level: str = "0") -> dict:
    import onnx

    original = onnx.load(path, load_external_data=False)
    before = len(original.graph.node)
    orig_ops = {n.op_type for n in original.graph.node}
    del original
    if side == "ort":
        import logging

        from onnxruntime.transformers.optimizer import optimize_model

        logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)
        start = time.perf_counter()
        model = optimize_model(path, model_type=model_type, use_gpu=False, opt_level=int(ort_opt_level))
        seconds = time.perf_counter() - start
        ops = collections.Counter(n.op_type for n in model.model.graph.node)
        stages = {}
    else:
        import edgefc
        from edgefc.pass_base import PassContext

        start = time.perf_counter()
        graph = edgefc.load(path)
        loaded = time.perf_counter()
        pm = edgefc.PassManager(["canonicalize", "fuse"])
        graph = pm.run(graph, PassContext())
        seconds = time.perf_counter() - start
        ops = collections.Counter(n.op for n in graph.nodes)
        stages = {"load": round(loaded - start, 2), **{r.name: round(r.seconds, 2) for r in pm.records}}
    result = {"seconds": round(seconds, 2), "nodes_before": before, "nodes_after": sum(ops.values()),
              "stages": stages, "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}
    result.update(_counts(ops, orig_ops))
    return result


def _warm(path: Path) -> None:
    """Read the model (and its external data) once so both sides start from a warm page cache."""
    for f in [path] + sorted(path.parent.glob(path.name + ".data")) + sorted(path.parent.glob(path.stem + "*.data")):
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass


def _run(side: str, path: Path, model_type: str, ort_opt_level: int) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", side, str(path), model_type, str(ort_opt_level)],
                          capture_output=True, text=True, check=False, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if proc.returncode:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
        return {"error": tail[0][:200]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _row(name: str, side: str, r: dict) -> str:
    if "error" in r:
        return f"{name:<17} {side:<7} failed: {r['error']}"
    k, left = r["kinds"], r["left"]
    kinds = " ".join(f"{k[x]:>4}" for x in KINDS)
    return (f"{name:<17} {side:<7} {r['seconds']:>7.2f} {r['peak_rss_gb']:>6.2f} {r['nodes_before']:>6} -> "
            f"{r['nodes_after']:<6} {kinds}   {left['Softmax']:>3} {left['InstanceNormalization']:>3} {left['Erf']:>3}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", type=Path, default=Path("/tmp/edgefc-models"), help="folder of the exports")
    ap.add_argument("--tiny", action="store_true", help="use the *-tiny.onnx exports")
    ap.add_argument("--only", action="append", help="component row name (repeatable)")
    ap.add_argument("--json", type=Path, help="also write the results as JSON")
    ap.add_argument("--ort-opt-level", type=int, default=0, choices=(0, 1, 2, 99),
                    help="opt_level passed to onnxruntime's optimize_model (default 0, its SD recipe)")
    ap.add_argument("--tools", default="ort,edgefc",
                    help="comma-separated sides to run (onnxruntime's optimizer needs ~5.5x the model size in RAM)")
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(_child(*args.child)))
        return
    print(f"{'component':<17} {'tool':<7} {'wall s':>7} {'RSS GB':>6} {'nodes':>6}    {'':<6} "
          + " ".join(f"{k[:4]:>4}" for k in KINDS) + "   softmax/instnorm/erf left")
    results = {}
    for name, stem, model_type in COMPONENTS:
        if args.only and name not in args.only:
            continue
        path = args.models / f"{stem}{'-tiny' if args.tiny else ''}.onnx"
        if not path.is_file():
            print(f"{name:<17} skipped: {path} not found")
            continue
        _warm(path)
        sides = [t for t in ("ort", "edgefc") if t in args.tools.split(",")]
        results[name] = {}
        for side in sides:
            results[name][side] = _run(side, path, model_type, args.ort_opt_level)
            print(_row(name, side, results[name][side]), flush=True)
    for name, r in results.items():
        if all(side in r and "error" not in r[side] for side in ("ort", "edgefc")):
            print(f"{name}: edgefc {r['edgefc']['seconds']:.2f} s {r['edgefc']['stages']} vs onnxruntime "
                  f"{r['ort']['seconds']:.2f} s; new ops edgefc {r['edgefc']['new_ops']}, onnxruntime {r['ort']['new_ops']}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
