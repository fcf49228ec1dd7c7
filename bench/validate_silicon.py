"""Predicted vs measured latency on silicon (PERFORMANCE.md "Validation").

Builds the MLPerf Mobile v4.0 networks from their public definitions (bench/mlperf_networks.py:
timm MobileNetEdgeTPU, transformers MobileBERT, EDSR f32b5 x2), prices each with ``edgefc
profile`` at every precision, and prints the prediction next to the Exynos 2400 measurement
(MLPerf ran them INT8: ``w8a8``; the other precisions are what-if predictions without a
measurement). With ``--sd`` it also prices the Stable Diffusion components of Table 7 from
full-size exports (--models), at their deployed precisions.

    python bench/validate_silicon.py                         # the MLPerf networks on exynos2400
    python bench/validate_silicon.py --sd                    # + Table 7 components
    python bench/validate_silicon.py --target exynos2200     # another chip (no measurements)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from mlperf_networks import MEASURED, build  # noqa: E402

from edgefc.targets.schedule import FITTED  # noqa: E402  (the measurements were taken under it)

PRECISIONS = ("w8a8", "w8a16", "fp16")
# Table 7 (EdgeFusion paper, Exynos 2400), deployed precisions
SD = {"text-encoder": ("text-encoder-bk-sdm-tiny.onnx", "fp16", 52.2, "mean of 52.5 / 51.9 / 52.2"),
      "vae-decoder": ("vae-decoder-bk-sdm-tiny.onnx", "fp16", 484.7, "mean of 483.4 / 484.7 / 486.1"),
      "unet (BK-SDM-Tiny, untiled)": ("unet-bk-sdm-tiny.onnx", "w8a16", 454.3, "EdgeFusion, MLT no"),
      "unet (SD-v1.5, untiled)": ("unet-sd-v1.5.onnx", "w8a16", 1350.3, "SD-v1.5, MLT no")}
TOLERANCE = 0.35
# Public Exynos 2200 figures held out of its target file (nothing there is fitted to them):
# ISSCC 2022 / JSSC 2023 (Park et al.): "MobileNetEdgeTPU reaches 3433 inference/s" (a throughput).
HELD_OUT = {"exynos2200": {"mobilenet-edgetpu": (1e3 / 3433, "ISSCC 2022: 3,433 inferences/s (throughput)")}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_dir = "/work/cache/silicon" if Path("/work/cache/silicon").is_dir() else "/tmp/edgefc-models"
    ap.add_argument("--models", default=os.environ.get("EDGEFC_FIT_MODELS", default_dir),
                    help="folder for the built networks (and the SD exports for --sd)")
    ap.add_argument("--target", default="exynos2400", help="target name or .toml")
    ap.add_argument("--sd", action="store_true", help="also the Stable Diffusion components of Table 7")
    args = ap.parse_args(argv)

    from edgefc.build_folder import load_for_profile
    from edgefc.target import get_target

    tgt = get_target(args.target)
    measured_chip = tgt.name == "exynos2400"
    models = Path(args.models)
    print(f"target {tgt.name}  ({tgt.arch.source})")
    v = tgt.validation
    if v:
        print(f"stored validation: {v['figures']} latencies, median |error| {v['median_abs_error_pct']} %, "
              f"worst {v['worst_abs_error_pct']} % ({v['worst_figure']}); made by: {v.get('made_by')}")
    print(f"\n{'network':<30} {'precision':<9} {'ops':>5} {'predicted ms':>13} {'measured ms':>12} {'error':>8}")
    rows, ok = [], True
    for name, (shape, p50, _mean) in MEASURED.items():
        t0 = time.perf_counter()
        path = build(name, models / f"{name}.onnx")
        graph = load_for_profile(path)
        for prec in PRECISIONS:
            prof = tgt.profile(graph, precision=prec, schedule=FITTED, model=path.name)
            held = HELD_OUT.get(tgt.name, {}).get(name)
            meas = p50 if (prec == "w8a8" and measured_chip) else None
            if held and prec == "w8a8":
                err = (prof.total_ms - held[0]) / held[0]
                print(f"{name + ' ' + shape:<30} {prec:<9} {len(prof.ops):>5} {prof.total_ms:>13.4g} "
                      f"{held[0]:>12.4g} {100 * err:+7.1f} %   held out: {held[1]}")
                continue
            err = (prof.total_ms - meas) / meas if meas else None
            if err is not None:
                ok &= abs(err) <= TOLERANCE
                rows.append(abs(err))
            etxt = f"{100 * err:+7.1f} %" if err is not None else f"{'-':>8}"
            mtxt = f"{meas:>12.4g}" if meas else f"{'-':>12}"
            print(f"{name + ' ' + shape:<30} {prec:<9} {len(prof.ops):>5} {prof.total_ms:>13.4g} {mtxt} {etxt}")
        print(f"  ({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    if args.sd:
        for name, (fname, prec, meas, src) in SD.items():
            path = models / fname
            if not path.is_file():
                print(f"{name:<30} {prec:<9} (no export at {path})")
                continue
            graph = load_for_profile(path)
            prof = tgt.profile(graph, precision=prec, schedule=FITTED, model=path.name)
            del graph
            meas = meas if measured_chip else None
            err = (prof.total_ms - meas) / meas if meas else None
            if err is not None:
                rows.append(abs(err))
            etxt = f"{100 * err:+7.1f} %" if err is not None else f"{'-':>8}"
            mtxt = f"{meas:>12.4g}" if meas else f"{'-':>12}"
            print(f"{name:<30} {prec:<9} {len(prof.ops):>5} {prof.total_ms:>13.4g} {mtxt} {etxt}   {src if meas else ''}")
    if rows:
        rows.sort()
        med = rows[len(rows) // 2] if len(rows) % 2 else (rows[len(rows) // 2 - 1] + rows[len(rows) // 2]) / 2
        print(f"\n{len(rows)} measured figures: median |error| {100 * med:.1f} %, worst {100 * rows[-1]:.1f} %; "
              f"MLPerf networks within +-{TOLERANCE:.0%}: {'yes' if ok else 'NO'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
