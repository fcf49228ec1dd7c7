"""The few lines ``edgefc compile`` ends with (and the data of ``--json-result``): what the build
is, drawn from its report and profile. A view of the CLI (it lives under ``edgefc/cli``).

Everything here is read back from the build folder's ``report.json`` (what each pass decided) and
``profile.json`` (the cost model's pricing of the build as built), so the summary says nothing
the files do not: fusions made and missed (paper Sec. 3), the deployed precision and its SQNR
against FP32 (Sec. 2.3 / 4.2), the attentions tiled by MLT (Sec. 2.3), the modelled time on the
target and its most expensive block, and where the build is.
"""

from __future__ import annotations

import json
from pathlib import Path


def summary_lines(report: dict, profile: dict | None, build: Path | None = None) -> list[str]:
    """The summary of a compile, one line per topic (topics whose stage did not run are left out)."""
    lines = []
    canon = report.get("canonicalize")
    if isinstance(canon, dict):
        lines += [f"warning:   {w}" for w in canon.get("warnings", [])]
    sub = report.get("subgraphs")
    if isinstance(sub, dict) and sub.get("nodes"):
        nodes = sub["nodes"]
        lines.append(f"note:      the bodies of {len(nodes)} control-flow node{'s' if len(nodes) != 1 else ''} "
                     f"({', '.join(nodes[:3])}{', ...' if len(nodes) > 3 else ''}) are compiled as they are: "
                     f"{len(sub.get('left_as_they_are_by', []))} passes rewrite the main graph only "
                     f"(report.json subgraphs)")
    fusion = report.get("fusion")
    if isinstance(fusion, dict):
        lines.append("fusion:    " + _fusion(fusion))
    quant = report.get("quantization")
    if isinstance(quant, dict):
        lines.append("precision: " + _precision(quant))
        if isinstance(quant.get("search"), dict):
            lines.append("search:    " + _search(quant["search"]))
        if isinstance(quant.get("rescue"), dict):
            lines.append("rescue:    " + _rescue(quant["rescue"]))
    tiling = report.get("tiling")
    if isinstance(tiling, dict):
        lines.append("tiling:    " + _tiling(tiling))
    checked = [r for r in report.get("passes") or [] if r.get("verify_rel_error") is not None]
    if checked:
        lines.append("verify:    " + _verify(checked))
    if profile is not None:
        lines.append("target:    " + _target(profile))
    if build is not None:
        lines.append(f"build:     {build}  ({', '.join(_files(Path(build)))})")
    return lines


def _files(build: Path) -> list[str]:
    """The files of the build (its marker's list; the marker itself not shown)."""
    from edgefc.staging import MARKER, build_files

    files = build_files(build) or sorted(p.name for p in build.iterdir() if p.is_file())
    return sorted(f for f in files if f != MARKER)


def summary_data(build: Path) -> dict:
    """The figures of the summary as data (``edgefc compile --json-result``): the build folder and
    its files, the passes with their times, the fusions, the precision and SQNR, the tiling, the
    modelled time, the handover check; each read from ``report.json`` / ``profile.json``."""
    build = Path(build)
    report = json.loads((build / "report.json").read_text())
    profile_file = build / "profile.json"
    profile = json.loads(profile_file.read_text()) if profile_file.is_file() else None
    out: dict = {"build": str(build), "files": _files(build), "target": report.get("target"),
                 "source": report.get("source"), "seconds": report.get("seconds"), "passes": report.get("passes", [])}
    fusion = report.get("fusion")
    if isinstance(fusion, dict):
        counts = {k: int(v) for k, v in fusion.items() if isinstance(v, int)}
        out["fusion"] = {"fused": sum(counts.values()), "by_kind": counts,
                         "missed": sum(len(v) for v in (fusion.get("misses") or {}).values()),
                         "skipped": fusion.get("skipped", [])}
    quant = report.get("quantization")
    if isinstance(quant, dict):
        out["precision"] = {k: quant.get(k) for k in ("precision", "component", "sqnr_db", "sqnr_db_worst_input",
                                                       "cosine") if k in quant}
    tiling = report.get("tiling")
    if isinstance(tiling, dict):
        blocks = tiling.get("blocks") or []
        out["tiling"] = {"attentions": len(blocks), "tiled": sum(1 for b in blocks if b.get("tiling")),
                         "budget_bytes": tiling.get("budget_bytes"), "skipped": tiling.get("skipped")}
    if profile is not None:
        out["profile"] = {"total_ms": profile.get("total_ms"), "precision": profile.get("precision"),
                          "sram_peak_bytes": profile.get("sram_peak_bytes")}
    out["handover"] = report.get("handover")
    return out


def build_summary(build: Path) -> list[str]:
    """:func:`summary_lines` of a build folder (its ``report.json`` and, if written, ``profile.json``)."""
    build = Path(build)
    report = json.loads((build / "report.json").read_text())
    profile_file = build / "profile.json"
    profile = json.loads(profile_file.read_text()) if profile_file.is_file() else None
    return summary_lines(report, profile, build)


def _fusion(f: dict) -> str:
    counts = {k: int(v) for k, v in f.items() if k not in ("misses", "skipped") and isinstance(v, int)}
    done = sum(counts.values())
    kinds = ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if v)
    misses = f.get("misses") or {}
    missed = sum(len(v) for v in misses.values())
    out = f"{done} fused" + (f" ({kinds})" if kinds else "")
    if missed:
        first = next(iter(misses.items()))
        kind, miss = first[0], first[1][0]
        by_kind = ", ".join(f"{k} {len(v)}" for k, v in misses.items())
        out += f"; {missed} missed ({by_kind}; e.g. {kind} at {miss['node']}: {miss['reason']})"
    else:
        out += "; none missed"
    if f.get("skipped"):
        out += f"; skipped by --no-fuse: {', '.join(f['skipped'])}"
    return out


#: how the summary names each evaluation source (report.json ``quantization.eval_source``).
EVAL_SOURCE_WORDS = {
    "eval": "held-out real input{s} from --eval",
    "calib-heldout": "real input{s} held out of --calib",
    "generated": "generated input{s}",
}


def _precision(q: dict) -> str:
    out = str(q.get("precision"))
    if q.get("component"):
        out += f" ({q['component']})"
    if q.get("precision") == "fp32":
        return out + (f": {q['reason']}" if q.get("reason") else "")
    sqnr = q.get("sqnr_db")
    if sqnr is None:
        return out + f"; SQNR not measured ({q.get('reason_no_sqnr', 'no held-out inputs')})"
    n = len(q.get("sqnr_db_per_input") or [])
    source = q.get("eval_source")
    words = EVAL_SOURCE_WORDS.get(source, "held-out input{s}").format(s="s" if n != 1 else "")
    out += f"; SQNR {sqnr:.1f} dB vs FP32 on {n} {words}"
    if q.get("sqnr_db_worst_input") is not None:
        out += f" (worst input {q['sqnr_db_worst_input']:.1f} dB)"
    if q.get("cosine") is not None:
        out += f", cosine {q['cosine']:.6f}"
    if q.get("conditioning") is not None:
        out += f", conditioning {q['conditioning']:.3f} of FP32's"
    if q.get("min_sqnr_db") is not None:
        out += f"; floor {q['min_sqnr_db']:g} dB"
    if source == "generated":
        out += ("; NOTE: generated inputs, not a measurement on real data - record real ones with "
                "`edgefc calibrate` (or your own .npz) and compile with --calib/--eval")
    return out


def _point(p: dict) -> str:
    sqnr = p.get("sqnr_db")
    plan = sorted(set((p.get("plan") or {}).values()))
    return f"{p['ms']:.2f} ms / {'-' if sqnr is None else f'{sqnr:.1f}'} dB ({'+'.join(plan) or '-'})"


def _search(s: dict) -> str:
    """The chosen point of ``--precision search`` and its neighbours on the Pareto front."""
    points, j = s.get("points") or [], s.get("chosen")
    if not points or j is None:
        return "no points"
    out = f"{len(points)} points on the Pareto front (modelled time / SQNR); chosen {_point(points[j])}"
    if j > 0:
        out += f"; next faster {_point(points[j - 1])}"
    if j + 1 < len(points):
        out += f"; next slower {_point(points[j + 1])}"
    return out + " (report.json quantization.search, precision.png)"


def _rescue(r: dict) -> str:
    layers = r.get("layers") or []
    out = (f"{len(layers)} layer{'s' if len(layers) != 1 else ''} kept one precision higher to reach the "
           f"{r.get('floor_db'):g} dB floor" + ("" if r.get("met_floor") else " (not reached)"))
    if layers:
        out += "; e.g. " + ", ".join(f"{x['layer']} {x['from']} -> {x['to']}" for x in layers[:2])
    return out + " (report.json quantization.rescue)"


def _tiling(t: dict) -> str:
    if t.get("skipped"):
        return f"not run ({t['skipped']})"
    blocks = t.get("blocks") or []
    tiled = [b for b in blocks if b.get("tiling")]
    out = f"{len(tiled)} of {len(blocks)} attention{'s' if len(blocks) != 1 else ''} tiled"
    if tiled:
        tiles = sorted({int(b["tiling"]["tiles"]) for b in tiled})
        out += f" ({'/'.join(map(str, tiles))} tiles)"
    spilled = [b for b in blocks if b.get("min_budget_bytes")]
    if spilled:
        out += f", {len(spilled)} spill S_in/S_out to DRAM (no tiling fits)"
    if "budget_bytes" in t:
        out += f"; SRAM budget {_mib(t['budget_bytes'])}"
    return out


def _verify(checked: list[dict]) -> str:
    worst = max(checked, key=lambda r: r["verify_rel_error"])
    return (f"{len(checked)} pass{'es' if len(checked) != 1 else ''} checked against onnxruntime on seeded random "
            f"inputs (--verify), each within its tolerance; largest max rel error {worst['verify_rel_error']:.3g} "
            f"({worst['name']})")


def _target(p: dict) -> str:
    total = float(p["total_ms"])
    priced = "as built" if p.get("precision") == "as-built" else f"priced at {p.get('precision')}"
    if p.get("schedule"):
        priced += f", {p['schedule']} schedule"
    out = f"{p.get('target')}: {total:.3f} ms modelled by the cost model ({priced})"
    roof = p.get("roofline_ms")
    if roof:
        out += f"; roofline {float(roof):.3f} ms (x{total / float(roof):.2f})"
    blocks = p.get("blocks_ms") or {}
    if blocks:
        name, ms = max(blocks.items(), key=lambda kv: kv[1])
        share = ms / total if total > 0 else 0.0
        out += f"; top block {name} {ms:.3f} ms ({share:.1%})"
    out += f"; SRAM peak {_mib(p['sram_peak_bytes'])}"
    return out


def _mib(n) -> str:
    return f"{int(n) / 2**20:.2f} MiB"
