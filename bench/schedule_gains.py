"""What each schedule and each compiler mechanism gains (PERFORMANCE.md "Schedules"), and how far
every figure stays from its roofline.

For the full-size BK-SDM-Tiny U-Net (W8A16, MLT), text encoder and VAE decoder (FP16) and the
MLPerf Mobile networks (W8A8, built from their public definitions by bench/mlperf_networks.py),
prints the modelled latency under each schedule -- ``sequential``, ``overlap`` (the schedule the
target was fitted under), ``overlap`` with one mechanism switched on at a time, and ``best``
(every mechanism, the compiler's default) -- with its ratio to the model's roofline (every engine
at its peak, perfectly overlapped). MLT tiles every attention under the schedule it is priced with
(the solver's choice changes with the pipelined schedule), so each schedule has its own tiling.
With ``--gaps N`` it also lists, under ``best``, the N blocks of each model furthest from their
roofline (modelled - roofline ms), and what their time is made of.

    python bench/schedule_gains.py                       # exports from --models, MLPerf built there
    python bench/schedule_gains.py --only unet --gaps 5  # one model, with its largest gaps

Inputs: full-size exports (``edgefc export``) in --models (default /work/cache/full, else
/tmp/edgefc-models): unet-bk-sdm-tiny.onnx, text-encoder-bk-sdm-tiny.onnx,
vae-decoder-bk-sdm-tiny.onnx; a ``fused-<name>`` build folder beside an export
(``edgefc compile X.onnx --passes canonicalize,fuse``) is used instead when present, and the
MLPerf networks are written into --work (default: --models when writable, else /tmp).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from mlperf_networks import MEASURED, build  # noqa: E402

# model -> (export file, precision it is deployed at, measured ms or None)
MODELS = {"unet": ("unet-bk-sdm-tiny.onnx", "w8a16"),
          "text-encoder": ("text-encoder-bk-sdm-tiny.onnx", "fp16"),
          "vae-decoder": ("vae-decoder-bk-sdm-tiny.onnx", "fp16"),
          **{n: (f"{n}.onnx", "w8a8") for n in MEASURED}}


def schedules():
    """The rows: the bases, each mechanism alone on top of overlap, and best."""
    from edgefc.targets.schedule import MECHANISMS

    return ["sequential", "overlap", *(f"overlap+{m}" for m in MECHANISMS), "best"]


def tiled(graph_path: Path, target, precision: str, schedule: str):
    """The model with its attentions tiled by MLT under ``schedule`` (the solver prices tilings
    with it), priced at ``precision``: a fresh graph per call (mlt rewrites it)."""
    import edgefc
    from edgefc.build_folder import load_for_profile

    graph = load_for_profile(graph_path)
    res = edgefc.compile(graph, target, passes=["mlt"], options={"precision": precision, "schedule": schedule})
    return res.graph, res.report["tiling"]


def price(name: str, path: Path, precision: str, target, rows: list[str], gaps: int) -> dict:
    """``{schedule: (ms, roofline ms, tiles, profile)}`` of one model."""
    out = {}
    by_variants: dict[tuple, object] = {}
    for sched in rows:
        t0 = time.perf_counter()
        key = tuple(target.attention_variants(sched))
        if key not in by_variants:   # tiled under the schedule's ways of running a tiled block
            by_variants.clear()      # (one graph in memory at a time)
            by_variants[key] = tiled(path, target, precision, sched)[0]
        graph = by_variants[key]
        prof = target.profile(graph, precision=precision, schedule=sched, model=path.name)
        tiles = sum(b["row_tiles"] * b["head_tiles"] for b in prof.attention_blocks() if b["row_tiles"] * b["head_tiles"] > 1)
        out[sched] = (prof.total_ms, prof.roofline_ms, tiles, prof if sched == "best" and gaps else None)
        print(f"  {name:<18} {sched:<24} {prof.total_ms:10.3f} ms  roofline {prof.roofline_ms:9.3f} ms "
              f"[{time.perf_counter() - t0:.1f} s]", file=sys.stderr)
    return out


def gap_lines(prof, n: int) -> list[str]:
    """The ``n`` blocks furthest from their roofline, with what their modelled time is made of."""
    roof = prof.roofline()["blocks"]
    lines = []
    for block, b in list(roof.items())[:n]:
        ops = [r for r in prof.ops if r.block == block]
        names = [r.name for r in ops]
        eng = prof.roofline_engines(names)
        bound = max(eng, key=eng.get)
        exp_dma = sum(r.exposed_dma_ms for r in ops)
        busy = {e: 0.0 for e in ("tensor", "vector", "dma", "host")}
        for c, cyc in zip(prof.program.commands, prof.cycles):
            if c.op in set(names):
                busy[c.engine] += prof.ms(cyc)
        worst = sorted(ops, key=lambda r: -(r.ms - r.roofline_ms))[:3]
        lines.append(f"  {block:<40} {b['ms']:8.3f} ms vs roofline {b['roofline_ms']:8.3f} ms (x{b['ratio']:.2f}, "
                     f"gap {b['gap_ms']:.3f} ms; roofline bound by {bound}); busy "
                     + ", ".join(f"{e} {v:.2f}" for e, v in busy.items() if v > 0)
                     + f" ms; exposed DMA {exp_dma:.2f} ms; largest op gaps: "
                     + ", ".join(f"{r.op_type} {r.name.rsplit('/', 2)[-2] if '/' in r.name else r.name} "
                                 f"{r.ms - r.roofline_ms:.2f}" for r in worst))
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_dir = "/work/cache/full" if Path("/work/cache/full").is_dir() else "/tmp/edgefc-models"
    ap.add_argument("--models", default=os.environ.get("EDGEFC_FULL_MODELS", default_dir),
                    help="folder with the full-size exports (and fused-<name> builds)")
    ap.add_argument("--work", default=None, help="folder for the MLPerf networks (default: --models if writable)")
    ap.add_argument("--target", default="exynos2400")
    ap.add_argument("--only", help="comma-separated subset of the models: " + ", ".join(MODELS))
    ap.add_argument("--gaps", type=int, default=0, help="list the N blocks of each model furthest from their roofline")
    ap.add_argument("--json", type=Path, help="also write the table as JSON")
    args = ap.parse_args(argv)

    import edgefc

    target = edgefc.get_target(args.target)
    models = Path(args.models)
    work = Path(args.work) if args.work else (models if os.access(models, os.W_OK) else Path("/tmp/edgefc-models"))
    only = set(args.only.split(",")) if args.only else set(MODELS)
    rows = schedules()
    results, gaps = {}, {}
    for name, (fname, precision) in MODELS.items():
        if name not in only:
            continue
        if name in MEASURED:
            path = build(name, work / fname)
        else:
            path = models / fname
            fused = path.parent / f"fused-{path.stem}"
            if (fused / "model.onnx").is_file():
                path = fused
            if not path.exists():
                print(f"{name}: no export at {path} (edgefc export ... -o {path}); skipped", file=sys.stderr)
                continue
        results[name] = price(name, path, precision, target, rows, args.gaps)
        prof = results[name].get("best", (None,) * 4)[3]
        if prof is not None:
            gaps[name] = gap_lines(prof, args.gaps)
    names = list(results)
    if not names:
        print("no model to price", file=sys.stderr)
        return 1
    width = max(len(r) for r in rows)
    print(f"modelled ms (x roofline) on {target.name}; roofline = every engine at its peak, perfectly overlapped")
    print(f"{'schedule':<{width}} " + " ".join(f"{n[:17]:>19}" for n in names))
    print(f"{'(precision)':<{width}} " + " ".join(f"{MODELS[n][1]:>19}" for n in names))
    for r in rows:
        cells = []
        for n in names:
            ms, roof, _, _ = results[n][r]
            cells.append(f"{ms:>10.4g} (x{ms / roof:4.2f})" if roof > 0 else f"{ms:>10.4g}")
        print(f"{r:<{width}} " + " ".join(f"{c:>19}" for c in cells))
    print(f"{'roofline ms':<{width}} " + " ".join(f"{results[n]['best'][1]:>19.4g}" for n in names))
    if "unet" in results:
        tiles = {r: results["unet"][r][2] for r in rows}
        print("U-Net attention tiles per schedule: " + ", ".join(f"{r} {t}" for r, t in tiles.items()))
    for n, lines in gaps.items():
        print(f"\n{n}: the {len(lines)} blocks furthest from their roofline under best")
        print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps({n: {r: {"ms": v[0], "roofline_ms": v[1]} for r, v in res.items()}
                                         for n, res in results.items()}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
