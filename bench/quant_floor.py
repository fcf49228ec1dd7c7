"""The quality floor (``--min-sqnr``): verifier alignment against the U-Net's SQNR on trained weights.

An SQNR floor is only worth having if it says where images stop being right. This bench measures
that on the trained miniature EdgeFusion (``bench/mini_edgefusion.py --out MINI``): it records real
U-Net inputs with ``edgefc calibrate`` (32 training captions for calibration, 16 others for
evaluation, 2 LCM steps), compiles U-Net builds whose quality spans the SQNR axis, and for each
build generates the held-out prompts (``edgefc generate --build``, 2 steps, the default FP16 text
encoder and VAE decoder builds) and scores them with the verifier (``edgefc eval``: alignment and
the Fréchet distance to the held-out real scenes). The builds:

* ``fp16``, ``w8a16`` (the defaults, what ``--precision`` offers);
* W8A16 with **coarser activation ranges**: every range widened by ``headroom`` = 2^k (the INT16
  step grows by 2^k: k of the 16 bits lost, rounding noise everywhere);
* W8A16 with **clipped ranges**: ``percentile`` calibration at 99.9 .. 90 % (clipping error on the
  largest activations: a different failure than rounding).

Each build's SQNR and conditioning ratio are the compile's own ``report.json`` figures, measured
on the ``.eval.npz`` inputs (``eval_source`` "eval"); FP32 is the exported ONNX run by
``edgefc generate --weights``. Writes ``OUT/floor.json``, ``OUT/floor.md`` (the table) and
``OUT/floor.png`` (alignment and Fréchet distance against SQNR), and prints the floor it reads off
the curve: the lowest measured SQNR from which on every build keeps alignment within 0.02 of
FP32's and the Fréchet distance within 10 % of FP32's (the acceptance tolerances), rounded up to
5 dB - no extrapolation into an unmeasured gap.

    python bench/quant_floor.py --mini /work/cache/mini --out /tmp/floor
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STEPS = 2
CALIB_PROMPTS, EVAL_PROMPTS = 32, 16
ALIGN_TOL, FID_TOL = 0.02, 0.10
#: the degraded builds: name -> compile options beside --calib/--eval (min_sqnr -inf: measured, not refused)
BUILDS = {
    "fp16": {"precision": "fp16"},
    "w8a16": {"precision": "w8a16"},
    **{f"w8a16 headroom 2^{k:g}": {"precision": "w8a16", "quant_policy": {"activation_headroom": float(2 ** k)}}
       for k in (6, 8, 9, 10, 10.5, 10.75, 11, 12, 13)},
    **{f"w8a16 percentile {p:g}": {"precision": "w8a16", "calib_method": "percentile", "calib_percentile": p}
       for p in (99.9, 99.0, 97.0, 93.0)},
}


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def captions(folder: Path) -> list[str]:
    return [p.read_text(encoding="utf-8").splitlines()[0].strip() for p in sorted(folder.glob("*.txt"))]


def score(folder: Path, reference: Path) -> dict:
    from edgefc.models.verifier import evaluate_folder

    r = evaluate_folder(folder, reference)
    return {"alignment": round(float(r["alignment"]), 4), "fid": round(float(r["fid"]), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mini", type=Path, required=True, help="the output folder of bench/mini_edgefusion.py")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    import numpy as np

    import edgefc
    from edgefc.models import pipeline
    from edgefc.models.recording import calibrate

    mini, out = args.mini, args.out
    out.mkdir(parents=True, exist_ok=True)
    weights, held = mini / "lcm", mini / "data" / "heldout"
    train = captions(mini / "data" / "train")[:CALIB_PROMPTS + EVAL_PROMPTS]
    (out / "calib.txt").write_text("\n".join(train[:CALIB_PROMPTS]) + "\n")
    (out / "eval.txt").write_text("\n".join(train[CALIB_PROMPTS:]) + "\n")
    held_prompts = captions(held)
    cal = out / "calib"
    if not (cal / "unet.eval.npz").is_file():
        say("recording real U-Net inputs (edgefc calibrate)")
        calibrate(out / "calib.txt", cal, eval_prompts_file=out / "eval.txt", weights=weights, steps=STEPS,
                  progress=False)
    onnx_dir = mini / "onnx"
    if not all((onnx_dir / f"{c}.onnx").is_file() for c in ("text-encoder", "unet", "vae-decoder")):
        from edgefc.models.export import export_component

        onnx_dir = out / "onnx"  # the mini bench has not exported yet: export the LCM pipeline here
        for comp in ("text-encoder", "unet", "vae-decoder"):
            if not (onnx_dir / f"{comp}.onnx").is_file():
                say(f"exporting {comp}")
                export_component(comp, "bk-sdm-tiny", onnx_dir / f"{comp}.onnx", weights=weights,
                                 height=pipeline.default_size("full", weights), width=pipeline.default_size("full", weights),
                                 progress=False)
    builds = out / "builds"
    for comp in ("text-encoder", "vae-decoder"):
        if not (builds / "common" / comp / "report.json").is_file():
            edgefc.compile(onnx_dir / f"{comp}.onnx", "exynos2400", output=builds / "common" / comp,
                           options={"progress": False})
    (out / "img").mkdir(exist_ok=True)
    results_file = out / "floor.json"
    rows = json.loads(results_file.read_text())["rows"] if results_file.is_file() else []
    done = {r["build"] for r in rows}
    if "fp32" not in done:
        say("generating: fp32")
        pipeline.generate_folder(held_prompts, out / "img" / "fp32", steps=STEPS, weights=weights, progress=False)
        rows.append({"build": "fp32", "sqnr_db": None, "conditioning": None, **score(out / "img" / "fp32", held)})
    for name, options in BUILDS.items():
        if name in done:
            continue
        slug = name.replace(" ", "-").replace("^", "")
        b = builds / slug
        say(f"compiling: {name}")
        t = time.perf_counter()
        edgefc.compile(onnx_dir / "unet.onnx", "exynos2400", output=b / "unet",
                       options={**options, "calib": str(cal / "unet.npz"), "eval_file": str(cal / "unet.eval.npz"),
                                "min_sqnr": -math.inf, "progress": False})
        for comp in ("text-encoder", "vae-decoder"):
            link = b / comp
            if not link.exists():
                link.symlink_to((builds / "common" / comp).resolve(), target_is_directory=True)
        q = json.loads((b / "unet" / "report.json").read_text())["quantization"]
        assert q["eval_source"] == "eval", q["eval_source"]
        say(f"generating: {name} (SQNR {q['sqnr_db']} dB)")
        pipeline.generate_folder(held_prompts, out / "img" / slug, steps=STEPS, weights=weights, build=b,
                                 progress=False)
        rows.append({"build": name, "sqnr_db": q["sqnr_db"], "conditioning": q.get("conditioning"),
                     "worst_input_db": q.get("sqnr_db_worst_input"), **score(out / "img" / slug, held),
                     "compile_s": round(time.perf_counter() - t, 1)})
        results_file.write_text(json.dumps({"rows": rows}, indent=1))
    ref = next(r for r in rows if r["build"] == "fp32")
    for r in rows:
        r["ok"] = bool(r["alignment"] >= ref["alignment"] - ALIGN_TOL and r["fid"] <= (1 + FID_TOL) * ref["fid"])
    measured = sorted((r for r in rows if r["sqnr_db"] is not None), key=lambda r: r["sqnr_db"])
    failing = [r["sqnr_db"] for r in measured if not r["ok"]]
    worst_fail = max(failing) if failing else None
    # the floor: the lowest measured SQNR from which on every build met the tolerances (no
    # extrapolation into the unmeasured gap below it), rounded up to 5 dB
    safe = [r["sqnr_db"] for r in measured if worst_fail is None or r["sqnr_db"] > worst_fail]
    lowest_safe = min(safe) if safe else None
    floor = None if lowest_safe is None else 5 * math.ceil(lowest_safe / 5 - 1e-9)
    results = {"rows": rows, "fp32": ref, "tolerances": {"alignment": ALIGN_TOL, "fid_relative": FID_TOL},
               "highest_failing_sqnr_db": worst_fail, "lowest_sqnr_all_above_pass_db": lowest_safe,
               "floor_db": floor, "steps": STEPS, "heldout_prompts": len(held_prompts)}
    results_file.write_text(json.dumps(results, indent=1))
    lines = ["| U-Net build | SQNR on eval inputs (dB) | conditioning | alignment | Δ vs FP32 | Fréchet | within tolerance |",
             "|---|---|---|---|---|---|---|"]
    for r in [ref] + sorted((r for r in rows if r is not ref), key=lambda r: -r["sqnr_db"]):
        s = "-" if r["sqnr_db"] is None else f"{r['sqnr_db']:.1f}"
        c = "-" if r.get("conditioning") is None else f"{r['conditioning']:.3f}"
        lines.append(f"| {r['build']} | {s} | {c} | {r['alignment']:.3f} | {r['alignment'] - ref['alignment']:+.3f} | "
                     f"{r['fid']:.2f} | {'yes' if r['ok'] else 'no'} |")
    (out / "floor.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"highest SQNR that fails: {worst_fail} dB; every build from {lowest_safe} dB on passes -> floor {floor} dB")
    plot(rows, ref, floor, out / "floor.png")
    del np


def plot(rows, ref, floor, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = sorted((r for r in rows if r["sqnr_db"] is not None), key=lambda r: r["sqnr_db"])
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key, label, tol in ((a1, "alignment", "verifier alignment", ref["alignment"] - ALIGN_TOL),
                                (a2, "fid", "Fréchet distance to held-out scenes", ref["fid"] * (1 + FID_TOL))):
        for kind, marker in (("headroom", "o"), ("percentile", "s"), ("", "D")):
            sel = [r for r in pts if (kind and kind in r["build"]) or (not kind and r["build"] in ("fp16", "w8a16"))]
            ax.plot([r["sqnr_db"] for r in sel], [r[key] for r in sel], marker, label={
                "headroom": "W8A16, coarser ranges", "percentile": "W8A16, clipped ranges", "": "fp16 / w8a16"}[kind])
        ax.axhline(ref[key], color="k", lw=1, label="FP32")
        ax.axhline(tol, color="k", lw=1, ls=":", label="tolerance")
        if floor is not None:
            ax.axvline(floor, color="r", lw=1, ls="--", label=f"floor {floor} dB")
        ax.set_xlabel("U-Net SQNR on held-out real inputs (dB)")
        ax.set_ylabel(label)
    a1.legend(fontsize=7)
    fig.suptitle("Trained miniature EdgeFusion, 64 held-out prompts, 2 LCM steps", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
