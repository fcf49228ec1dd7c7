"""Local TVM build vs onnxruntime CPU on the same compiled model: latency and build time.

For each component the script compiles the export with ``edgefc compile --emit tvm`` (default
pipeline for the exynos2400 target), then runs on seeded inputs

* the local TVM build: host code in TVM's Relax VM (``host_local.so``), every NPU partition in
  the edgefc NPU runtime (``npu_programs.json``, numpy: the functional model of the NPU, not a
  fast kernel library), and
* onnxruntime (CPU execution provider, default graph optimisations) on the same ``model.onnx``,

and prints the median latency of ``--runs`` runs after one warm-up, the build times (passes,
TVM import/partition/codegen, local build, aarch64 cross build), the NPU MAC share and the
difference between the two outputs.

    python bench/tvm_vs_ort.py                     # tiny exports (64x64 image), all components
    python bench/tvm_vs_ort.py --full --component unet --runs 3
    python bench/tvm_vs_ort.py --precision fp32    # what is passed to compile as --precision

Models: /tmp/edgefc-models/<component>-bk-sdm-tiny[-tiny].onnx (the shared cache), else the tiny
ones are exported into ~/.cache/edgefc/bench (needs the models extra). ``--model`` takes any file.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import edgefc
from edgefc import ort

COMPONENTS = ("text-encoder", "unet", "vae-decoder")
SHARED = Path("/tmp/edgefc-models")
CACHE = Path.home() / ".cache" / "edgefc" / "bench"


def model_path(component: str, full: bool) -> Path:
    name = f"{component}-bk-sdm-tiny{'' if full else '-tiny'}.onnx"
    if (SHARED / name).is_file():
        return SHARED / name
    if full:
        sys.exit(f"no full-size export {SHARED / name}: run `edgefc export {component} --arch bk-sdm-tiny -o {SHARED / name}`")
    path = CACHE / name
    if not path.is_file():
        from edgefc.models.export import export_component

        export_component(component, "bk-sdm-tiny", path, scale="tiny", progress=False)
    return path


def median_ms(fn, runs: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def bench(model: Path, runs: int, options: dict, workdir: Path) -> dict:
    from edgefc.targets.tvm_runtime import load_build

    out = workdir / model.stem
    t0 = time.perf_counter()
    result = edgefc.compile(model, "exynos2400", output=out, options={**options, "emit": ("tvm",)})
    compile_s = time.perf_counter() - t0
    tvm_s = result.report["tvm"]["seconds"]
    feeds = ort.random_inputs(edgefc.ir.load_model_proto(model, check=False), seed=0)
    runner = load_build(out)
    sess = ort.session(out / "model.onnx", optimize=True)
    names = [o.name for o in sess.get_outputs()]
    tvm_ms = median_ms(lambda: runner.run(feeds), runs)
    ort_ms = median_ms(lambda: sess.run(names, feeds), runs)
    diff = ort.compare(dict(zip(names, sess.run(names, feeds))), runner.run(feeds))
    return {
        "model": model.name, "compile_s": compile_s, "passes_s": result.report["seconds"],
        "import_s": tvm_s.get("import", 0.0), "partition_s": tvm_s.get("partition", 0.0) + tvm_s.get("codegen", 0.0),
        "build_local_s": tvm_s.get("build_local", 0.0), "build_aarch64_s": tvm_s.get("build_aarch64", 0.0),
        "tvm_ms": tvm_ms, "ort_ms": ort_ms, "share": result.report["partition"]["npu_mac_share"],
        "rel_err": diff.rel_error,
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="full-size exports (512x512) instead of the tiny ones")
    ap.add_argument("--component", choices=[*COMPONENTS, "all"], default="all")
    ap.add_argument("--model", type=Path, help="an ONNX file to benchmark instead of the exports")
    ap.add_argument("--runs", type=int, default=5, help="timed runs per engine (median reported); default 5")
    ap.add_argument("--precision", help="--precision passed to compile (when the quantize pass is installed)")
    ap.add_argument("--no-mlt", action="store_true", help="compile without model-level tiling")
    args = ap.parse_args(argv)
    options = {}
    if args.precision:
        options["precision"] = args.precision
    if args.no_mlt:
        options["no_mlt"] = True
    if args.model:
        models = [args.model]
    else:
        comps = COMPONENTS if args.component == "all" else (args.component,)
        models = [model_path(c, args.full) for c in comps]
    rows = []
    with tempfile.TemporaryDirectory(prefix="edgefc-bench-tvm-") as tmp:
        for m in models:
            print(f"benchmarking {m} ...", file=sys.stderr, flush=True)
            rows.append(bench(m, args.runs, options, Path(tmp)))
    head = (f"{'model':<36} {'passes s':>8} {'import s':>8} {'part+cg s':>9} {'local s':>8} {'aarch64 s':>9} "
            f"{'TVM ms':>10} {'ORT ms':>9} {'TVM/ORT':>8} {'NPU MACs':>8} {'rel err':>8}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['model']:<36} {r['passes_s']:8.2f} {r['import_s']:8.2f} {r['partition_s']:9.2f} {r['build_local_s']:8.2f} "
              f"{r['build_aarch64_s']:9.2f} {r['tvm_ms']:10.1f} {r['ort_ms']:9.1f} {r['tvm_ms'] / r['ort_ms']:8.1f} "
              f"{100 * r['share']:7.1f}% {r['rel_err']:8.1e}")
    print(f"median of {args.runs} runs after one warm-up; TVM = Relax VM host code + numpy NPU runtime; "
          f"ORT = onnxruntime {__import__('onnxruntime').__version__} CPU, default optimisations, same model.onnx")


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
