"""The summary ``edgefc compile`` ends with (edgefc.cli.summary): every figure is the report's or the profile's."""

from __future__ import annotations

import json
import re
import subprocess
import sys

from edgefc.cli.summary import summary_lines
from edgefc.passes.fusion import ORDER as FUSIONS

REPORT = {
    "fusion": {"attention": 16, "groupnorm": 22, "gelu": 0, "residual": 22,
               "misses": {"layernorm": [{"node": "/ln/Div", "reason": "epsilon is not a constant"},
                                        {"node": "/ln2/Div", "reason": "epsilon is not a constant"}],
                          "epilogue": [{"node": "/conv/Conv", "reason": "output feeds two consumers"}]},
               "skipped": ["geglu"]},
    "quantization": {"precision": "w8a16", "component": "unet", "sqnr_db": 41.234, "eval_source": "eval",
                     "sqnr_db_per_input": [40.1, 42.368], "sqnr_db_worst_input": 40.1, "cosine": 0.9999876,
                     "conditioning": 0.9812, "min_sqnr_db": 25.0},
    "tiling": {"blocks": [{"name": "a1", "tiling": {"tiles": 8}}, {"name": "a2", "tiling": {"tiles": 2}},
                          {"name": "a3", "tiling": None}, {"name": "a4", "tiling": None, "min_budget_bytes": 1 << 20}],
               "tiled": 2, "left_alone": 2, "budget_bytes": 6 << 20},
}
PROFILE = {"target": "exynos2400", "precision": "as-built", "total_ms": 200.0, "sram_peak_bytes": 3 << 20,
           "blocks_ms": {"down_blocks.0": 50.0, "mid_block": 80.0, "up_blocks.1": 70.0}}


def test_summary_lines_say_what_the_report_and_profile_hold():
    assert summary_lines(REPORT, PROFILE) == [
        "fusion:    60 fused (groupnorm 22, residual 22, attention 16); 3 missed (layernorm 2, epilogue 1; "
        "e.g. layernorm at /ln/Div: epsilon is not a constant); skipped by --no-fuse: geglu",
        "precision: w8a16 (unet); SQNR 41.2 dB vs FP32 on 2 held-out real inputs from --eval (worst input 40.1 dB), "
        "cosine 0.999988, conditioning 0.981 of FP32's; floor 25 dB",
        "tiling:    2 of 4 attentions tiled (2/8 tiles), 1 spill S_in/S_out to DRAM (no tiling fits); "
        "SRAM budget 6.00 MiB",
        "target:    exynos2400: 200.000 ms modelled by the cost model (as built); top block mid_block 80.000 ms "
        "(40.0%); SRAM peak 3.00 MiB",
    ]


def test_summary_lines_for_stages_that_did_little():
    report = {"fusion": {"attention": 0, "misses": {}},
              "quantization": {"precision": "fp32", "component": None, "reason": "auto: not a known component"},
              "tiling": {"blocks": [], "tiled": 0, "left_alone": 0, "skipped": "no NPU target"}}
    assert summary_lines(report, None) == [
        "fusion:    0 fused; none missed",
        "precision: fp32: auto: not a known component",
        "tiling:    not run (no NPU target)",
    ]
    report = {"quantization": {"precision": "fp16", "component": "vae-decoder", "sqnr_db": None,
                               "reason_no_sqnr": "--eval-samples 0"}}
    assert summary_lines(report, {**PROFILE, "precision": "w8a16", "blocks_ms": {}}) == [
        "precision: fp16 (vae-decoder); SQNR not measured (--eval-samples 0)",
        "target:    exynos2400: 200.000 ms modelled by the cost model (priced at w8a16); SRAM peak 3.00 MiB",
    ]
    assert summary_lines({}, None) == []


def test_compile_ends_with_the_summary_of_its_build(tiny_models, tmp_path):
    out = tmp_path / "unet-build"
    proc = subprocess.run([sys.executable, "-c", "from edgefc.cli import main; main()", "compile",
                           str(tiny_models["unet"]), "-o", str(out), "--calib-samples", "1", "--eval-samples", "1"],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # stdout: one line per pass, then the summary, and nothing else
    said = proc.stdout.splitlines()
    passes = ["canonicalize", *FUSIONS, "quantize", "mlt"]  # the fuse pipeline, one line per fusion pass
    assert [ln.split()[0] for ln in said[:len(passes)]] == passes, proc.stdout
    lines = said[len(passes):]
    assert [ln.split(":")[0] for ln in lines] == ["fusion", "precision", "tiling", "target", "build"], proc.stdout
    report = json.loads((out / "report.json").read_text())
    profile = json.loads((out / "profile.json").read_text())
    fusion, quant, tiling = report["fusion"], report["quantization"], report["tiling"]
    # fusion: the total and each kind are the report's counts
    done = sum(v for k, v in fusion.items() if k not in ("misses", "skipped"))
    assert done > 0
    m = re.match(r"fusion:    (\d+) fused \((.*?)\); (.*)$", lines[0])
    assert m and int(m.group(1)) == done, lines[0]
    assert dict((k, int(v)) for k, v in (p.rsplit(" ", 1) for p in m.group(2).split(", "))) == \
        {k: v for k, v in fusion.items() if k not in ("misses", "skipped") and v}
    missed = sum(len(v) for v in fusion["misses"].values())
    if missed:
        assert m.group(3).startswith(f"{missed} missed ("), lines[0]
    else:
        assert m.group(3) == "none missed", lines[0]
    # precision and SQNR: the quantization report's
    assert quant["precision"] == "w8a16" and quant["sqnr_db"] is not None
    assert quant["eval_source"] == "generated" and quant["min_sqnr_db"] is not None
    assert lines[1] == (f"precision: w8a16 (unet); SQNR {quant['sqnr_db']:.1f} dB vs FP32 on 1 generated input (worst "
                        f"input {quant['sqnr_db_worst_input']:.1f} dB), cosine {quant['cosine']:.6f}; floor "
                        f"{quant['min_sqnr_db']:g} dB; NOTE: generated inputs, not a measurement on real data - record "
                        "real ones with `edgefc calibrate` (or your own .npz) and compile with --calib/--eval"), lines[1]
    # tiling: the mlt report's blocks
    n_tiled = sum(1 for b in tiling["blocks"] if b.get("tiling"))
    assert n_tiled == tiling["tiled"]
    assert lines[2].startswith(f"tiling:    {n_tiled} of {len(tiling['blocks'])} attentions tiled"), lines[2]
    assert len(tiling["blocks"]) > 0
    # target: the profile's total and its most expensive block
    top = max(profile["blocks_ms"], key=profile["blocks_ms"].get)
    assert lines[3] == (f"target:    exynos2400: {profile['total_ms']:.3f} ms modelled by the cost model (as built, "
                        f"best schedule); roofline {profile['roofline_ms']:.3f} ms "
                        f"(x{profile['total_ms'] / profile['roofline_ms']:.2f}); top block {top} {profile['blocks_ms'][top]:.3f} ms "
                        f"({profile['blocks_ms'][top] / profile['total_ms']:.1%}); "
                        f"SRAM peak {profile['sram_peak_bytes'] / 2**20:.2f} MiB"), lines[3]
    assert profile["total_ms"] == report["profile"]["total_ms"]
    assert lines[4] == f"build:     {out}  (model.onnx, profile.json, report.json)", lines[4]


def test_summary_lines_of_a_search_and_a_rescue():
    q = {"precision": "mixed", "component": "unet", "sqnr_db": 30.04, "eval_source": "eval",
         "sqnr_db_per_input": [30.0], "min_sqnr_db": 25.0,
         "search": {"chosen": 1, "points": [{"ms": 70.0, "sqnr_db": 22.0, "plan": {"a": "w8a8"}},
                                            {"ms": 90.5, "sqnr_db": 30.04, "plan": {"a": "w8a8", "b": "w8a16"}},
                                            {"ms": 190.0, "sqnr_db": 40.0, "plan": {"a": "w8a16"}}]},
         "rescue": {"floor_db": 25.0, "met_floor": True, "layers": [
             {"layer": "/conv_out/Conv", "from": "w8a8", "to": "w8a16"}]}}
    lines = summary_lines({"quantization": q}, None)
    assert lines[1] == ("search:    3 points on the Pareto front (modelled time / SQNR); chosen 90.50 ms / 30.0 dB "
                        "(w8a16+w8a8); next faster 70.00 ms / 22.0 dB (w8a8); next slower 190.00 ms / 40.0 dB (w8a16) "
                        "(report.json quantization.search, precision.png)")
    assert lines[2] == ("rescue:    1 layer kept one precision higher to reach the 25 dB floor; e.g. /conv_out/Conv "
                        "w8a8 -> w8a16 (report.json quantization.rescue)")
