"""U-Net latency and the tiles MLT picks per attention, for SRAM sizes from 0.5 to 16 MiB.

For each SRAM size the target file is copied with ``sram.bytes`` replaced (a hypothetical NPU with
that scratchpad, its weight buffer scaled in proportion; everything else as in the target file), the fused U-Net is tiled by the ``mlt``
pass at that target's default budget (SRAM minus the reserve) and priced by the cost model
(``target.profile``), next to the same graph untiled. Prints a table (latency untiled / with MLT,
and per distinct attention shape the chosen ``row_tiles x head_tiles``: ``fits`` when the block is
left alone, ``spill`` when no tiling fits), the solver's time per block, and writes a PNG.

    python bench/sram_sweep.py                       # /tmp/edgefc-models/unet-bk-sdm-tiny.onnx
    python bench/sram_sweep.py MODEL.onnx --sizes 0.5,1,2,4,6,8,16 --png sweep.png --json sweep.json

MODEL may be a raw export (it is compiled with canonicalize,fuse first) or an already fused
model (``--fused``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import OrderedDict
from pathlib import Path

DEFAULT_MODEL = Path("/tmp/edgefc-models/unet-bk-sdm-tiny.onnx")
DEFAULT_SIZES = (0.5, 1, 1.5, 2, 3, 4, 6, 8, 12, 16)


def sized_target(base, sram_bytes: int):
    """``base`` with ``sram.bytes`` replaced (and the weight buffer scaled with it)."""
    # the weight buffer keeps its share of the scratchpad (512 KiB of 6 MiB on the 2400)
    wb = int(base.sram.weight_buffer * sram_bytes / base.sram.total)
    return base.with_fields({"sram.bytes": int(sram_bytes), "sram.weight_buffer_bytes": wb})


def shape_key(block: dict) -> str:
    s = block["spec"]
    kind = "self" if s["q_len"] == s["kv_len"] else "cross"
    return f"{kind} {s['q_len']}x{s['kv_len']}"


def tiles_label(block: dict) -> str:
    if block.get("tiling"):
        return f"{block['tiling']['row_tiles']}x{block['tiling']['head_tiles']}"
    return "spill" if "no tiling fits" in block.get("reason", "") else "fits"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--target", default="exynos2400")
    ap.add_argument("--precision", default="w8a16", help="deployed precision to price (profile --precision)")
    ap.add_argument("--sizes", default=",".join(str(s) for s in DEFAULT_SIZES), help="SRAM sizes in MiB")
    ap.add_argument("--fused", action="store_true", help="MODEL is already canonicalized and fused")
    ap.add_argument("--schedule", default="overlap",
                    help="schedule MLT tiles and prices under (default overlap, the fitted one: PERFORMANCE.md section 7)")
    ap.add_argument("--png", type=Path, default=Path("sram_sweep.png"))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    import edgefc
    from edgefc.pass_base import PassContext
    from edgefc.passes.mlt import ModelLevelTiling

    base = edgefc.get_target(args.target)
    sizes = [float(s) for s in args.sizes.split(",")]
    t0 = time.perf_counter()
    if args.fused:
        graph = edgefc.load(args.model)
    else:
        graph = edgefc.compile(args.model, None, passes=["canonicalize", "fuse"]).graph
    print(f"{args.model}: {sum(n.op == 'Attention' for n in graph.nodes)} attentions "
          f"(prepared in {time.perf_counter() - t0:.1f} s); pricing at {args.precision}", file=sys.stderr)

    rows, all_wall, all_cpu = [], [], []
    for mib in sizes:
        tgt = sized_target(base, int(mib * (1 << 20)))
        ctx = PassContext(target=tgt, options={"precision": args.precision, "schedule": args.schedule})
        tiled = ModelLevelTiling().run(graph.copy(), ctx)
        rep = ctx.report["tiling"]
        untiled_ms = tgt.profile(graph, precision=args.precision, schedule=args.schedule).total_ms
        tiled_ms = tgt.profile(tiled, precision=args.precision, schedule=args.schedule).total_ms
        per_shape: dict[str, set] = OrderedDict()
        for b in rep["blocks"]:
            if "spec" in b:
                per_shape.setdefault(shape_key(b), set()).add(tiles_label(b))
        solver_ms = [b["solver_ms"] for b in rep["blocks"] if "solver_ms" in b]
        all_wall += solver_ms
        all_cpu += [b["solver_cpu_ms"] for b in rep["blocks"] if "solver_cpu_ms" in b]
        rows.append({"sram_mib": mib, "budget_bytes": rep.get("budget_bytes"), "untiled_ms": untiled_ms,
                     "mlt_ms": tiled_ms, "tiled_blocks": rep["tiled"],
                     "tiles": {k: "/".join(sorted(v)) for k, v in per_shape.items()},
                     "solver_ms_max": max(solver_ms) if solver_ms else None,
                     "blocks": [{"name": b["name"], "tiles": tiles_label(b), "sram_bytes": b.get("sram_bytes"),
                                 "predicted_ms": b.get("predicted_ms")} for b in rep["blocks"]]})
        print(f"  {mib:5.1f} MiB: untiled {untiled_ms:7.1f} ms, MLT {tiled_ms:7.1f} ms", file=sys.stderr)

    shapes = list(rows[0]["tiles"]) if rows else []
    head = f"{'SRAM MiB':>8} {'untiled ms':>10} {'MLT ms':>8} {'speedup':>7} {'solver max':>10}  " + \
        "  ".join(f"{s:>13}" for s in shapes)
    print(f"\nBK-SDM-Tiny U-Net on {base.name} variants (precision {args.precision}); tiles = row_tiles x head_tiles")
    print(head)
    print("-" * len(head))
    for r in rows:
        smax = f"{r['solver_ms_max']:.2f}" if r["solver_ms_max"] is not None else "-"
        print(f"{r['sram_mib']:>8.1f} {r['untiled_ms']:>10.1f} {r['mlt_ms']:>8.1f} {r['untiled_ms'] / r['mlt_ms']:>7.2f} "
              f"{smax:>10}  " + "  ".join(f"{r['tiles'].get(s, ''):>13}" for s in shapes))

    if all_wall:
        import statistics

        print(f"\nsolver per block over {len(all_wall)} solves: wall median {statistics.median(all_wall):.3f} ms, "
              f"max {max(all_wall):.3f} ms; CPU median {statistics.median(all_cpu):.3f} ms, max {max(all_cpu):.3f} ms "
              f"(wall includes time the OS gave to other processes)")
    if args.json:
        args.json.write_text(json.dumps({"model": str(args.model), "target": base.name, "precision": args.precision,
                                         "rows": rows}, indent=2) + "\n")
    if args.png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 4.5))
        xs = [r["sram_mib"] for r in rows]
        ax.plot(xs, [r["untiled_ms"] for r in rows], "o-", label="untiled (--no-mlt)")
        ax.plot(xs, [r["mlt_ms"] for r in rows], "s-", label="with MLT")
        big = shapes[0] if shapes else None
        for r in rows:
            if big:
                ax.annotate(r["tiles"].get(big, ""), (r["sram_mib"], r["mlt_ms"]), textcoords="offset points",
                            xytext=(0, -14), ha="center", fontsize=7)
        ax.axvline(base.sram.total / (1 << 20), color="grey", ls=":", lw=1)
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [f"{x:g}" for x in xs])
        ax.set_xlabel("NPU SRAM (MiB)")
        ax.set_ylabel("U-Net latency, cost model (ms)")
        ax.set_title(f"U-Net latency vs SRAM ({base.name} variants, {args.precision}); labels: {big} tiles")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.png, dpi=120)
        print(f"wrote {args.png}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
