"""Evidence per mechanism of the cost model (PERFORMANCE.md section 5): each mechanism switched off
in turn (its target field set to the value that disables it), and the figures it moves.

    python bench/mechanisms.py            # MLPerf networks (built if absent) and, when exported,
                                          # the Table 7 components in --models

Prints, per mechanism, the predicted latency of every figure with the shipped target and with
that mechanism off, next to the measurement.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from mlperf_networks import MEASURED, build  # noqa: E402

# mechanism -> (target fields that switch it off, schedule)
OFF = {
    "overlap (DMA beside compute)": ({}, "sequential"),
    "cascades (row stripes keep maps on chip)": ({"sram.cascade": False}, "overlap"),
    "resident weights": ({"sram.resident_weights": False}, "overlap"),
    "channel granularity 32 (64 instead)": ({"tensor.channel_granularity": 64}, "overlap"),
    "INT8 vector path (16-bit path instead)": ({"vector.int8.elements_per_lane": 1, "vector.int8.exp": "exp",
                                                "vector.int8.divide": "divide"}, "overlap"),
    "dispatch in us (the old 401,600-cycle floor)": ({"dispatch.cycles": 401_600.0}, "overlap"),
}
SD = {"text-encoder": ("text-encoder-bk-sdm-tiny.onnx", "fp16", 52.2),
      "vae-decoder": ("vae-decoder-bk-sdm-tiny.onnx", "fp16", 484.7),
      "unet": ("unet-bk-sdm-tiny.onnx", "w8a16", 454.3),
      "sd15-unet": ("unet-sd-v1.5.onnx", "w8a16", 1350.3)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_dir = "/work/cache/silicon" if Path("/work/cache/silicon").is_dir() else "/tmp/edgefc-models"
    ap.add_argument("--models", default=os.environ.get("EDGEFC_FIT_MODELS", default_dir))
    ap.add_argument("--no-sd", action="store_true", help="only the MLPerf networks")
    args = ap.parse_args(argv)
    from edgefc.build_folder import load_for_profile
    from edgefc.target import get_target

    base = get_target("exynos2400")
    models = Path(args.models)
    figures = [(n, build(n, models / f"{n}.onnx"), "w8a8", m[1]) for n, m in MEASURED.items()]
    if not args.no_sd:
        for n, (f, prec, ms) in SD.items():
            fused = models / f"fused-{Path(f).stem}"
            path = fused if (fused / "model.onnx").is_file() else models / f
            if path.exists():
                figures.append((n, path, prec, ms))
    names = [n for n, *_ in figures]
    print(f"{'mechanism off':<46}" + "".join(f"{n[:12]:>13}" for n in names))
    print(f"{'measured (ms)':<46}" + "".join(f"{m:>13.4g}" for *_, m in figures))
    rows = {"shipped target": ({}, "overlap")} | OFF
    results = {k: [] for k in rows}
    for n, path, prec, _ in figures:
        graph = load_for_profile(path)
        for k, (fields, schedule) in rows.items():
            fields = {f: (base.arch.vector.cycles_per_element[v] if isinstance(v, str) else v) for f, v in fields.items()}
            t = base.with_fields(fields) if fields else base
            results[k].append(t.profile(graph, precision=prec, schedule=schedule).total_ms)
        del graph
    for k, vals in results.items():
        print(f"{k:<46}" + "".join(f"{v:>13.4g}" for v in vals))


if __name__ == "__main__":
    main()
