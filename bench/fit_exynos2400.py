"""One bounded fit of the "fitted" fields of targets/exynos2400.toml to two independent sources
of measurements of the same chip (PERFORMANCE.md section 4):

* the EdgeFusion paper: Table 6 both columns (the shares of the untiled 64x64 self-attention of
  the BK-SDM-Tiny U-Net at W8A16, the six remaining shares and the 27 % total with MLT), Table 7
  all rows: text encoder (FP16; the same CLIP model in all three rows: 52.5, 51.9, 52.2 ms, fitted
  as their mean), VAE decoder (FP16; 483.4, 484.7, 486.1 ms, their mean), the EdgeFusion U-Net
  untiled (454.3 ms) and tiled (200.2 ms), the SD-v1.5 U-Net untiled (1350.3 ms), all W8A16;
* MLPerf Mobile v4.0 (INT8, ``--precision w8a8``): MobileNetEdgeTPU 0.2262 ms, MobileBERT
  3.149 ms, EDSR 6.394 ms (p50).

Each free field stays within a stated physical bound (FREE). A time's residual is its log error
in units of its acceptance tolerance (15 % Table 7, 25 % SD-v1.5, 35 % MLPerf), a share's its
difference in units of 1.5 points (2 for the MLT total). The loss is robust (Cauchy, scale one
tolerance): a figure that no parameter vector within the bounds can reach together with the
others (PERFORMANCE.md names them and by how much) pulls the fit only weakly instead of
distorting every field. After the fit, leave-one-out: each figure in turn is dropped, the fit
redone from the full fit, and the dropped figure predicted; fields nothing else constrains are
named (their left-out prediction only repeats the full fit).

    python bench/fit_exynos2400.py             # fit, leave-one-out, residuals; TOML untouched
    python bench/fit_exynos2400.py --write     # also write the fitted values and the validation
    python bench/fit_exynos2400.py --check     # no fit: the figures of the current TOML
    python bench/fit_exynos2400.py --no-loo    # skip leave-one-out

Inputs: full-size exports (``edgefc export``) in --models (default /work/cache/silicon, else
/tmp/edgefc-models): text-encoder-bk-sdm-tiny.onnx, unet-bk-sdm-tiny.onnx,
vae-decoder-bk-sdm-tiny.onnx, unet-sd-v1.5.onnx; the MLPerf networks are built there
(bench/mlperf_networks.py) when absent. Lowered Programs are cached beside them (they depend
only on the graph and the target's geometry, not on the fitted fields).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import pickle
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from edgefc.attention import Tiling, row_granularity  # noqa: E402
from edgefc.precision import RATE_KEYS  # noqa: E402
from edgefc.targets import TARGET_DIR  # noqa: E402
from edgefc.targets.description import VECTOR_CLASSES  # noqa: E402
from edgefc.targets.program import ATTENTION_ROLES  # noqa: E402
from edgefc.targets.schedule import FITTED  # noqa: E402  (the schedule the measurements are reproduced under)

# field, lower bound, upper bound, why the bounds
FREE = [
    ("tensor.efficiency", 0.3, 1.0,
     "sustained fraction of the padded MAC rate: >= 30 % (a pipelined array stalls less than 70 %)"),
    ("tensor.output_elements_per_cycle", 32.0, 1024.0,
     "write-back: at least one 32-element vector per cycle, at most 1024 (the output lanes)"),
    ("tensor.rate.int8xint16", 0.25, 0.5,
     "INT8xINT16 from two (0.5) .. four (0.25) INT8 partial products per MAC"),
    ("tensor.rate.int16xint16", 0.0625, 0.25,
     "INT16xINT16 from four INT8 partial products (0.25) .. sixteen (1/16)"),
    ("tensor.rate.fp16", 0.125, 0.5,
     "FP16: half the INT8 density on the Exynos 2200 (0.5) .. a quarter of that"),
    ("vector.cycles_per_element.exp", 1.0, 16.0, "one to sixteen lane-cycles per exponential"),
    ("vector.cycles_per_element.divide", 1.0, 16.0, "one to sixteen lane-cycles per division"),
    ("dma.efficiency", 0.1, 0.9, "sustained fraction of the 68.3 GB/s LPDDR5X peak: 10 .. 90 %"),
    ("dispatch.cycles", 120.0, 2800.0,
     "0.1 .. 2.3 us per op: MobileNetEdgeTPU runs its 97 ops in 0.226 ms in all"),
    ("handoff.cycles", 100.0, 50_000.0, "0.1 .. 42 us per engine-to-engine synchronisation of a tile"),
]

TABLE6 = {"load_qk": (0.6, 0.6), "qk_matmul": (6.9, 7.2), "store_s_in": (19.1, None), "load_s_in": (18.2, None),
          "softmax": (11.0, 11.6), "store_s_out": (18.5, None), "load_s_out_v": (19.5, 0.8),
          "sv_matmul": (5.4, 5.7), "store_out": (0.7, 0.7)}
# latency figures: name -> (measured ms, tolerance, source)
TIMES = {
    "text-encoder": (52.2, 0.15, "Table 7, mean of 52.5 / 51.9 / 52.2 (FP16)"),
    "vae-decoder": (484.7, 0.15, "Table 7, mean of 483.4 / 484.7 / 486.1 (FP16)"),
    "unet": (454.3, 0.15, "Table 7, EdgeFusion U-Net untiled (W8A16)"),
    "unet-tiled": (200.2, 0.15, "Table 7, EdgeFusion U-Net with MLT (W8A16)"),
    "sd15-unet": (1350.3, 0.25, "Table 7, SD-v1.5 U-Net untiled (W8A16)"),
    "mobilenet-edgetpu": (0.2262, 0.35, "MLPerf Mobile v4.0 p50 (INT8)"),
    "mobilebert": (3.149, 0.35, "MLPerf Mobile v4.0 p50 (INT8)"),
    "edsr": (6.394, 0.35, "MLPerf Mobile v4.0 p50 (INT8)"),
}
# component -> (export file, precision)
MODELS = {"text-encoder": ("text-encoder-bk-sdm-tiny.onnx", "fp16"),
          "vae-decoder": ("vae-decoder-bk-sdm-tiny.onnx", "fp16"),
          "unet": ("unet-bk-sdm-tiny.onnx", "w8a16"),
          "sd15-unet": ("unet-sd-v1.5.onnx", "w8a16"),
          "mobilenet-edgetpu": ("mobilenet-edgetpu.onnx", "w8a8"),
          "mobilebert": ("mobilebert.onnx", "w8a8"),
          "edsr": ("edsr.onnx", "w8a8")}
MLPERF = ("mobilenet-edgetpu", "mobilebert", "edsr")
LOSS = os.environ.get("EDGEFC_FIT_LOSS", "cauchy")


def table6_block():
    """Table 6's block: the 64x64 self-attention of the BK-SDM-Tiny U-Net, 8 heads of 40, INT16."""
    from edgefc.attention import AttentionSpec

    return AttentionSpec("down_blocks.0 attn1", 1, 8, 4096, 4096, 40, 40, "int16")


def _tile_solver():
    from edgefc import tile_solver

    return tile_solver


# --- a Program as sums the formulas are linear in (fast re-pricing) -----------------------------

class Features:
    """A Program as per-command arrays, so a parameter vector prices it in microseconds (exact:
    the same formulas and the same overlapped schedule as edgefc.targets.cost_model)."""

    def __init__(self, program):
        from edgefc.targets.cost_model import is_chain, op_groups

        cmds = program.commands
        n = len(cmds)
        self.op = np.zeros(n, int)
        groups = op_groups(program)
        self.n_ops = len(groups)
        self.dispatch_per_op = np.zeros(self.n_ops)
        self.chain = np.zeros(self.n_ops, bool)
        for k, (first, end) in enumerate(groups):
            self.op[first:end] = k
            self.dispatch_per_op[k] = sum(c.dispatches for c in cmds[first:end])
            self.chain[k] = is_chain(cmds[first:end])
        kind = np.array([c.kind for c in cmds])
        self.repeat = np.array([c.repeat for c in cmds], float)
        self.is_dma = np.isin(kind, ("load", "store")) & (np.array([c.bytes for c in cmds]) > 0)
        self.bytes = np.array([c.bytes for c in cmds], float)
        self.run = np.array([(c.run_bytes if c.run_bytes > 0 else c.bytes) or 1 for c in cmds], float)
        self.macs = {prec: np.array([c.padded_macs if c.kind == "tensor" and c.precision == prec else 0
                                     for c in cmds], float) for prec in RATE_KEYS}
        self.out = np.array([c.out_elements if c.kind == "tensor" else 0 for c in cmds], float)
        self.handoffs = np.array([c.handoffs for c in cmds], float)
        self.vector = {cls: np.array([c.elements * sum(k for x, k in c.passes if x == cls)
                                      if c.kind == "vector" and c.elem_bytes != 1 else 0 for c in cmds], float)
                       for cls in VECTOR_CLASSES}
        self.vector8 = {cls: np.array([c.elements * sum(k for x, k in c.passes if x == cls)
                                       if c.kind == "vector" and c.elem_bytes == 1 else 0 for c in cmds], float)
                        for cls in VECTOR_CLASSES}
        self.is_host = kind == "host"
        self.host_elements = np.array([c.elements if c.kind == "host" else 0 for c in cmds], float)

    def parts(self, a):
        """(compute cycles, DMA cycles) per command, all instances, for the architecture ``a``."""
        t, v = a.tensor, a.vector
        run = np.minimum(self.run, self.bytes)
        bus = self.bytes * a.dma.burst_bytes / np.minimum(np.maximum(run, 1.0), a.dma.burst_bytes)
        dma = np.where(self.is_dma, bus / a.dma.bytes_per_cycle + a.dma.latency_cycles, 0.0) * self.repeat
        comp = np.zeros_like(self.bytes)
        for prec, m in self.macs.items():
            if m.any():
                comp = comp + m / (t.macs_per_cycle * t.rate[prec] * t.efficiency)
        comp = comp + self.out / t.output_elements_per_cycle + self.handoffs * a.handoff.cycles
        comp = comp + sum(e * v.cycles_per_element[c] for c, e in self.vector.items()) / v.lanes
        comp = comp + (sum(e * v.int8_cycles_per_element[c] for c, e in self.vector8.items())
                       / (v.lanes * v.int8_elements_per_lane))
        comp = comp + np.where(self.is_host, a.host.sync_cycles + self.host_elements * a.host.cycles_per_element, 0.0)
        return comp * self.repeat, dma

    def cycles(self, a) -> float:
        comp, dma = self.parts(a)
        n = self.n_ops
        c_op = np.bincount(self.op, weights=comp, minlength=n)
        d_op = np.bincount(self.op, weights=dma, minlength=n)
        has_dma = np.bincount(self.op, weights=self.is_dma.astype(float), minlength=n) > 0
        work = np.where(self.chain, c_op + d_op, np.maximum(c_op + has_dma * a.dma.latency_cycles, d_op))
        return float(np.sum(np.maximum(work, self.dispatch_per_op * a.dispatch_cycles)))


# --- loading ---------------------------------------------------------------------------------

def geometry_key(target) -> str:
    """A hash of the target numbers the lowering reads (layout, granularity, SRAM, pass counts),
    none of which the fit changes."""
    a = target.arch
    g = (a.sram, a.resident_weights, a.cascade, a.tensor.channel_granularity, a.tensor.row_granularity,
         a.tensor.dtypes, dict(a.vector.passes), a.handoff.per_matmul, a.handoff.per_softmax)
    return hashlib.sha1(repr(g).encode()).hexdigest()[:10]


def lowered(comp: str, path: Path, precision: str, target, cache: Path):
    """(Features, attention specs with counts) of one model, cached per graph file and geometry."""
    from edgefc.targets.cost_model import SCHEDULES, command_cycles

    src = Path(__file__).resolve().parents[1]
    # every module of the core and the targets (a hand-kept list went stale when lowering was split)
    code = hashlib.sha1(b"".join(f.read_bytes() for d in ("edgefc", "targets")
                                 for f in sorted((src / d).glob("*.py")))).hexdigest()[:8]
    stamp = int((path / "model.onnx" if path.is_dir() else path).stat().st_mtime)
    key = f"{comp}-{precision}-{geometry_key(target)}-{code}-{stamp}"
    f = cache / f"fit-{key}.pkl"
    if f.is_file():
        with open(f, "rb") as fh:
            return pickle.load(fh)
    from edgefc.build_folder import load_for_profile

    t0 = time.perf_counter()
    graph = load_for_profile(path)
    prog = target.lower(graph, precision)
    del graph
    feats = Features(prog)
    a = target.arch
    full = SCHEDULES["overlap"]().run(prog, [command_cycles(a, c) for c in prog.commands], a).total
    assert math.isclose(full, feats.cycles(a), rel_tol=1e-9), (comp, full, feats.cycles(a))
    blocks = defaultdict(int)
    for o in prog.ops:
        if o.attention is not None:
            blocks[o.attention[0]] += 1
    out = (feats, list(blocks.items()))
    try:
        with open(f, "wb") as fh:
            pickle.dump(out, fh)
    except OSError:
        pass
    print(f"  lowered {comp} ({precision}) from {path} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return out


class Model:
    """The figures of one parameter vector: lowered Programs are fixed, prices are not."""

    def __init__(self, base, models_dir: Path, cache: Path, only=None):
        from mlperf_networks import build

        self.base = base
        self.features, self.attention = {}, {}
        for comp, (fname, prec) in MODELS.items():
            if only and comp not in only:
                continue
            path = models_dir / fname
            fused = models_dir / f"fused-{Path(fname).stem}"
            if comp in MLPERF:
                build(comp, path)
            elif (fused / "model.onnx").is_file():   # edgefc compile --passes canonicalize,fuse (faster)
                path = fused
            if not path.exists():
                sys.exit(f"{path}: missing; export it (edgefc export ... -o {path})")
            self.features[comp], self.attention[comp] = lowered(comp, path, prec, base, cache)

    def target(self, x):
        return self.base.with_fields({f: float(v) for (f, *_), v in zip(FREE, x)})

    def figures(self, x) -> dict:
        from edgefc.targets.profile import role_cycles

        tile_solver = _tile_solver()
        t = self.target(x)
        a = t.arch
        ms = {c: f.cycles(a) / a.clock_hz * 1e3 for c, f in self.features.items()}
        budget = tile_solver.default_budget(t)
        gran = row_granularity(t)
        saved, tilings = 0.0, {}
        for spec, count in self.attention.get("unet", []):
            one = Tiling(1, 1)
            if t.attention_sram_bytes(spec, one) <= budget:
                continue
            sol = tile_solver.solve(spec, t, budget, gran, FITTED)
            tilings[spec] = sol.tiling
            saved += count * (t.attention_cycles(spec, one) - sol.cycles)
        if "unet" in ms:
            ms["unet-tiled"] = ms["unet"] - saved / a.clock_hz * 1e3
        block = table6_block()
        untiled = role_cycles(a, block, Tiling(1, 1))
        total = sum(untiled.values())
        tiling = tile_solver.solve(block, t, budget, gran, FITTED).tiling
        tiled = role_cycles(a, block, tiling)
        return {"ms": ms, "rows": {k: 100 * v / total for k, v in untiled.items()},
                "rows_mlt": {k: 100 * v / total for k, v in tiled.items()}, "tiling": tiling,
                "block_ms": total / a.clock_hz * 1e3, "tilings": tilings}

    def residual_dict(self, x) -> dict:
        """Every figure's residual in tolerance units (the least-squares terms)."""
        f = self.figures(x)
        r = {}
        for k, (wo, w) in TABLE6.items():
            r[f"T6 {k}"] = (f["rows"][k] - wo) / 1.5
            if w is not None:
                r[f"T6 MLT {k}"] = (f["rows_mlt"][k] - w) / 1.5
        r["T6 MLT total"] = (sum(f["rows_mlt"].values()) - 27.0) / 2.0
        for name, (want, tol, _) in TIMES.items():
            if name in f["ms"]:
                r[name] = math.log(f["ms"][name] / want) / math.log(1 + tol)
        return r


def fit(model: Model, x0: np.ndarray, starts: int, seed: int, drop=(), quiet=False):
    from scipy.optimize import least_squares

    lo = np.log([b[1] for b in FREE])
    hi = np.log([b[2] for b in FREE])
    rng = np.random.default_rng(seed)
    inits = [np.clip(np.log(x0), lo + 1e-9, hi - 1e-9)] + [lo + (hi - lo) * rng.random(len(FREE))
                                                          for _ in range(starts)]

    def res(z):
        d = model.residual_dict(np.exp(z))
        return np.array([v for k, v in d.items() if not any(k == g or k.startswith(g + " ") for g in drop)])

    best = None
    for i, z0 in enumerate(inits):
        out = least_squares(res, z0, bounds=(lo, hi), x_scale=1.0, diff_step=1e-4, max_nfev=300, loss=LOSS, f_scale=1.0)
        cost = float(np.sum(out.fun ** 2))
        if not quiet:
            print(f"  start {i}: cost {cost:.4f} ({out.nfev} evaluations)", file=sys.stderr)
        if best is None or cost < best[1]:
            best = (np.exp(out.x), cost)
    return best


def rounded(x: np.ndarray) -> np.ndarray:
    return np.array([float(f"{v:.4g}") for v in x])


def validation(f: dict) -> dict:
    """The validation figures the profile states: errors of the measured latencies."""
    errs = {n: 100 * (f["ms"][n] - TIMES[n][0]) / TIMES[n][0] for n in TIMES if n in f["ms"]}
    worst_row = max(abs(f["rows"][k] - wo) for k, (wo, _) in TABLE6.items())
    absd = sorted(abs(e) for e in errs.values())
    worst = max(errs, key=lambda n: abs(errs[n]))
    return {"figures": len(errs), "median_abs_error_pct": round(float(np.median(absd)), 1),
            "worst_abs_error_pct": round(abs(errs[worst]), 1), "worst_figure": worst,
            "errors_pct": {n: round(e, 1) for n, e in errs.items()},
            "table6_worst_row_pp": round(worst_row, 2),
            "mlt_block_total_pct": round(sum(f["rows_mlt"].values()), 1)}


def report(model: Model, x: np.ndarray, title: str) -> dict:
    f = model.figures(x)
    print(f"\n== {title}")
    print(f"{'field':<36} {'value':>12}   bounds")
    for (name, lo, hi, why), v in zip(FREE, x):
        at = "  (at bound)" if math.isclose(v, lo, rel_tol=2e-3) or math.isclose(v, hi, rel_tol=2e-3) else ""
        print(f"{name:<36} {v:>12.4g}   [{lo:g}, {hi:g}] {why}{at}")
    print(f"\nTable 6 (64x64 self-attention, W8A16; block {f['block_ms']:.2f} ms untiled; MLT tiling "
          f"{f['tiling'].row_tiles} row x {f['tiling'].head_tiles} head tiles)")
    print(f"{'row':<14} {'w/o model':>9} {'paper':>6} {'diff':>6}   {'w/ model':>8} {'paper':>6} {'diff':>6}")
    for k in ATTENTION_ROLES:
        wo, w = TABLE6[k]
        a, b = f["rows"][k], f["rows_mlt"][k]
        wtxt = f"{w:>6.1f} {b - w:>+6.2f}" if w is not None else f"{'-':>6} {'':>6}"
        print(f"{k:<14} {a:>9.2f} {wo:>6.1f} {a - wo:>+6.2f}   {b:>8.2f} {wtxt}")
    tot = sum(f["rows_mlt"].values())
    print(f"{'total':<14} {sum(f['rows'].values()):>9.2f} {100:>6.1f} {'':>6}   {tot:>8.2f} {27.0:>6.1f} "
          f"{tot - 27:>+6.2f}")
    print(f"\n{'latency (ms)':<20} {'model':>9} {'measured':>9} {'error':>8}   source")
    for name, (want, tol, src) in TIMES.items():
        if name in f["ms"]:
            got = f["ms"][name]
            flag = "" if abs(got - want) / want <= tol else f"  OFF (goal +-{tol:.0%})"
            print(f"{name:<20} {got:>9.4g} {want:>9.4g} {100 * (got - want) / want:>+7.1f} %   {src}{flag}")
    if "unet" in f["ms"]:
        r = f["ms"]["unet"] / f["ms"]["unet-tiled"]
        print(f"{'untiled/tiled':<20} {r:>9.2f} {454.3 / 200.2:>9.2f}")
    shapes = {(s.heads, s.q_len, s.kv_len, s.head_dim): t for s, t in f["tilings"].items()}
    for (h, q, kv, d), t in shapes.items():
        print(f"  mlt tiling of {h} heads x {q} x {kv} (dk {d}): {t.row_tiles} row x {t.head_tiles} head tiles")
    res = model.residual_dict(x)
    arr = np.array(list(res.values()))
    print(f"\nleast-squares cost (tolerance units squared): {float(np.sum(arr ** 2)):.4f}; "
          f"RMS residual {float(np.sqrt(np.mean(arr ** 2))):.3f}")
    v = validation(f)
    print(f"validation: {v['figures']} measured latencies, median |error| {v['median_abs_error_pct']} %, "
          f"worst {v['worst_abs_error_pct']} % ({v['worst_figure']}); Table 6 worst row "
          f"{v['table6_worst_row_pp']} pp; MLT block total {v['mlt_block_total_pct']} %")
    return f


def leave_one_out(model: Model, x: np.ndarray) -> dict:
    """Refit without each figure in turn (Table 6 counts as one figure: its 16 terms come from one
    measurement) and print how well the refit predicts the dropped one."""
    print("\n== leave-one-out (refit without the figure, from the full fit; then predict it)")
    print(f"{'dropped figure':<20} {'predicted':>10} {'measured':>9} {'error':>8}   {'refit cost':>10}")
    groups = [n for n in TIMES if n in model.features or n == "unet-tiled"] + ["T6"]
    errors = {}
    for g in groups:
        xg, cost = fit(model, x, 0, 0, drop=(g,), quiet=True)
        f = model.figures(xg)
        free = unconstrained(model, xg, g)
        note = f"   (without it, nothing constrains: {', '.join(free)})" if free else ""
        if g == "T6":
            worst = max(abs(f["rows"][k] - wo) for k, (wo, _) in TABLE6.items())
            print(f"{'Table 6 (w/o MLT)':<20} {'worst row':>10} {'':>9} {worst:>6.2f} pp   {cost:>10.3f}{note}")
            continue
        want = TIMES[g][0]
        got = f["ms"][g]
        errors[g] = round(100 * (got - want) / want, 1)
        print(f"{g:<20} {got:>10.4g} {want:>9.4g} {100 * (got - want) / want:>+7.1f} %   {cost:>10.3f}{note}")
    absd = [abs(e) for e in errors.values()]
    print(f"leave-one-out: median |error| {np.median(absd):.1f} %, worst {max(absd):.1f} %")
    return errors


def unconstrained(model: Model, x: np.ndarray, drop: str) -> list[str]:
    """Fields the figures other than ``drop`` do not constrain at ``x``: moving one by 5 % changes
    no remaining residual by more than 0.01 tolerance units (its left-out prediction then only
    repeats the full fit's value)."""
    base = {k: v for k, v in model.residual_dict(x).items() if not (k == drop or k.startswith(drop + " "))}
    out = []
    for i, (name, *_rest) in enumerate(FREE):
        y = x.copy()
        y[i] *= 1.05
        moved = model.residual_dict(y)
        if max(abs(moved[k] - v) for k, v in base.items()) < 0.01:
            out.append(name)
    return out


def write_toml(path: Path, x: np.ndarray) -> None:
    """Replace the values of the FREE fields in place, keeping every comment."""
    lines = path.read_text().splitlines(keepends=True)
    values = {f: v for (f, *_), v in zip(FREE, x)}
    section, done = "", set()
    for i, line in enumerate(lines):
        m = re.match(r"\s*\[([^\]]+)\]", line)
        if m:
            section = m.group(1).strip()
            continue
        m = re.match(r"(\s*)([A-Za-z0-9_]+)(\s*=\s*)([^#\n]+?)(\s*#.*)?$", line.rstrip("\n"))
        if m and f"{section}.{m.group(2)}" in values:
            key = f"{section}.{m.group(2)}"
            v = values[key]
            txt = repr(float(f"{v:.4g}"))
            if "e" in txt:
                txt = f"{float(txt):.1f}"
            lines[i] = f"{m.group(1)}{m.group(2)}{m.group(3)}{txt}{m.group(5) or ''}\n"
            done.add(key)
    missing = set(values) - done
    if missing:
        sys.exit(f"could not find {sorted(missing)} in {path}")
    path.write_text("".join(lines))


def write_validation(path: Path, val: dict, command: str) -> Path:
    """The validation figures beside the target file (``exynos2400.validation.json``), which the
    profile's header and profile.json state; generated, never typed by hand."""
    out = path.with_suffix(".validation.json")
    doc = {"target": path.name, "made_by": command, "date": time.strftime("%Y-%m-%d"),
           "what": "latencies predicted by the fitted target vs measured (EdgeFusion Table 7, MLPerf Mobile v4.0)",
           **val}
    out.write_text(json.dumps(doc, indent=1) + "\n")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_dir = "/work/cache/silicon" if Path("/work/cache/silicon").is_dir() else "/tmp/edgefc-models"
    ap.add_argument("--models", default=os.environ.get("EDGEFC_FIT_MODELS", default_dir),
                    help="folder with the full-size exports (and the MLPerf networks)")
    ap.add_argument("--target", default=str(TARGET_DIR / "exynos2400.toml"))
    ap.add_argument("--starts", type=int, default=4, help="random restarts besides the current values")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--check", action="store_true", help="report the current values, no fit")
    ap.add_argument("--no-loo", action="store_true", help="skip leave-one-out")
    ap.add_argument("--write", action="store_true", help="write the fitted values into the target file")
    ap.add_argument("--write-validation", action="store_true",
                    help="with --check: write the validation figures of the current values")
    ap.add_argument("--only", help="comma-separated subset of the models (quick looks)")
    args = ap.parse_args(argv)
    from edgefc.targets.npu import NpuTarget

    base = NpuTarget.from_toml(args.target)
    models = Path(args.models)
    t0 = time.perf_counter()
    model = Model(base, models, models, only=set(args.only.split(",")) if args.only else None)
    print(f"lowered in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    x0 = np.array([float(base.arch.value(f)) for f, *_ in FREE])
    if args.check:
        f = report(model, x0, f"current values of {args.target}")
        if args.write_validation:
            out = write_validation(Path(args.target), validation(f),
                                   "python bench/fit_exynos2400.py --check --write-validation")
            print(f"wrote {out}")
        return
    t0 = time.perf_counter()
    x, _cost = fit(model, x0, args.starts, args.seed)
    print(f"fitted in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    x = rounded(x)
    f = report(model, x, "fitted values (4 significant digits, as written)")
    loo = None if args.no_loo else leave_one_out(model, x)
    if args.write:
        write_toml(Path(args.target), x)
        val = validation(model.figures(x))
        if loo:
            absd = [abs(e) for e in loo.values()]
            val.update(loo_errors_pct=loo, loo_median_abs_error_pct=round(float(np.median(absd)), 1),
                       loo_worst_abs_error_pct=round(max(absd), 1))
        out = write_validation(Path(args.target), val, "python bench/fit_exynos2400.py --write")
        print(f"\nwrote {args.target} and {out}")


if __name__ == "__main__":
    main()
