"""`edgefc profile` (issue 4): JSON keys, the Chrome trace, CSV, PNG, the attention breakdown,
compile's profile.json, and every user-error path (exit 2, one line)."""

from __future__ import annotations

import csv
import itertools
import json
import tomllib
from pathlib import Path

import numpy as np
import onnx
import pytest

from edgefc.targets import TARGET_DIR
from edgefc.targets.program import ATTENTION_ROLES
from tests import npu_graphs
from tests.cli import assert_user_error, run_cli

OP_KEYS = {"name", "op_type", "engine", "macs", "dma_bytes", "cycles", "ms"}






@pytest.fixture(scope="module")
def attn_model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("attn") / "attn.onnx"
    onnx.save_model(npu_graphs.attention_model(seq=1024, heads=8, head_dim=40), str(path))
    return path


@pytest.fixture(scope="module")
def profiled(attn_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    rc, text = run_cli("profile", str(attn_model), "--precision", "w8a16", "--attention-breakdown",
                       "--json", str(out / "p.json"), "--csv", str(out / "p.csv"), "--trace", str(out / "t.json"),
                       "--plot", str(out / "p.png"), "--top", "5")
    assert rc == 0, text
    return out, text


def test_json_has_the_documented_keys(profiled):
    out, _ = profiled
    p = json.loads((out / "p.json").read_text())
    assert isinstance(p["total_ms"], float) and p["total_ms"] > 0
    assert p["precision"] == "w8a16" and p["target"] == "exynos2400"
    assert [o["name"] for o in p["ops"]] == ["to_q", "to_k", "to_v", "attn", "to_out"]
    for o in p["ops"]:
        assert OP_KEYS <= set(o)
    assert {o["name"]: o["engine"] for o in p["ops"]}["attn"] == "tensor"
    assert sum(o["ms"] for o in p["ops"]) == pytest.approx(p["total_ms"], rel=1e-6)
    res = p["residency"]
    assert {"sram", "dram", "stream", "tensors"} <= set(res)
    assert res["tensors"] and all(t["reason"] for t in res["tensors"])   # every tensor off SRAM says why
    assert {t["name"] for t in res["tensors"] if "attention operand" in t["reason"]} >= {"q", "k", "v"}
    (blk,) = p["attention_blocks"]
    assert blk["name"] == "attn" and blk["row_tiles"] == 1
    bd = p["attention_breakdown"]
    assert bd["block"] == "attn"
    assert set(bd["rows"]) == set(ATTENTION_ROLES)
    assert sum(bd["rows"].values()) == pytest.approx(100.0, abs=0.01)
    assert set(bd["rows_mlt"]) == set(ATTENTION_ROLES)
    assert sum(bd["rows_mlt"].values()) < 100.0


def test_terminal_table_shows_ops_blocks_and_breakdown(profiled):
    _, text = profiled
    assert "SRAM peak" in text and "attn" in text and "DMA bytes" in text
    assert "attention breakdown (Table 6)" in text and "load_s_out_v" in text


def test_trace_is_valid_chrome_trace_json(profiled):
    out, _ = profiled
    trace = json.loads((out / "t.json").read_text())
    events = trace["traceEvents"]
    tracks = {e["args"]["name"] for e in events if e.get("name") == "thread_name"}
    assert {"DMA (DRAM <-> SRAM)", "tensor engines", "vector engines"} <= tracks
    spans = [e for e in events if e["ph"] == "X"]
    assert spans and all({"ts", "dur", "pid", "tid", "name"} <= set(e) for e in spans)
    assert all(e["dur"] >= 0 for e in spans)
    # on each track (engine) spans do not overlap and are in time order; the DMA track runs
    # beside the engines (overlap schedule)
    for tid in {e["tid"] for e in spans}:
        ends = [(e["ts"], e["ts"] + e["dur"]) for e in spans if e["tid"] == tid]
        assert all(b[0] >= a[1] - 1e-3 for a, b in itertools.pairwise(ends))
    roles = {e["name"] for e in spans}
    assert {"qk_matmul", "softmax", "sv_matmul", "load_qk"} <= roles


def test_trace_expands_tiles(tmp_path):
    path = tmp_path / "tiled.onnx"
    onnx.save_model(npu_graphs.attention_model(seq=1024, heads=8, head_dim=40, tiling=(4, 2)), str(path))
    rc, out = run_cli("profile", str(path), "--trace", str(tmp_path / "t.json"))
    assert rc == 0, out
    spans = [e for e in json.loads((tmp_path / "t.json").read_text())["traceEvents"] if e["ph"] == "X"]
    softmax = [e for e in spans if e["name"] == "softmax"]
    assert sorted(e["args"]["tile"] for e in softmax) == list(range(8))
    # tile by tile: QK^T, softmax, S x V of a tile come before the next tile's QK^T
    order = [e["name"] for e in spans if e["name"] in ("qk_matmul", "softmax", "sv_matmul")]
    assert order[:6] == ["qk_matmul", "softmax", "sv_matmul"] * 2


def test_csv_and_png_are_written(profiled):
    out, _ = profiled
    rows = list(csv.DictReader((out / "p.csv").open()))
    assert {r["name"] for r in rows} == {"to_q", "to_k", "to_v", "attn", "to_out"}
    assert OP_KEYS <= set(rows[0])
    assert (out / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compile_writes_profile_json(tmp_path):
    src = tmp_path / "m.onnx"
    onnx.save_model(npu_graphs.matmul_model(128, 64, 64), str(src))
    rc, out = run_cli("compile", str(src), "--target", "exynos2400", "--passes", "canonicalize", "-o", str(tmp_path / "b"))
    assert rc == 0, out
    prof = json.loads((tmp_path / "b" / "profile.json").read_text())
    report = json.loads((tmp_path / "b" / "report.json").read_text())
    assert prof["total_ms"] > 0 and prof["precision"] == "as-built"
    assert report["profile"]["total_ms"] == pytest.approx(prof["total_ms"], rel=1e-3)
    # the build folder profiles the same
    rc, out = run_cli("profile", str(tmp_path / "b"), "--json", str(tmp_path / "again.json"))
    assert rc == 0, out
    assert json.loads((tmp_path / "again.json").read_text())["total_ms"] == pytest.approx(prof["total_ms"])


def test_precision_what_if_changes_dma(attn_model, tmp_path):
    totals = {}
    for p in ("fp32", "fp16", "w8a16"):
        rc, out = run_cli("profile", str(attn_model), "--precision", p, "--json", str(tmp_path / f"{p}.json"))
        assert rc == 0, out
        totals[p] = json.loads((tmp_path / f"{p}.json").read_text())["dma_bytes"]
    assert totals["fp32"] == 2 * totals["fp16"] > totals["w8a16"]


def test_tiny_unet_profile_has_the_attention_breakdown(tiny_models, tmp_path):
    rc, out = run_cli("profile", str(tiny_models["unet"]), "--precision", "w8a16", "--attention-breakdown",
                      "--json", str(tmp_path / "u.json"))
    assert rc == 0, out
    bd = json.loads((tmp_path / "u.json").read_text())["attention_breakdown"]
    assert bd and set(bd["rows"]) == set(ATTENTION_ROLES) and bd["block"]


@pytest.mark.parametrize("component", ["text-encoder", "unet", "vae-decoder"])
def test_tiny_exports_profile(tiny_models, tmp_path, component):
    rc, out = run_cli("profile", str(tiny_models[component]), "--precision", "fp16", "--json", str(tmp_path / "p.json"))
    assert rc == 0, out
    p = json.loads((tmp_path / "p.json").read_text())
    assert p["component"] == component and p["total_ms"] > 0 and p["macs"] > 0
    engines = {o["engine"] for o in p["ops"]}
    assert {"tensor", "vector"} <= engines
    # every tensor op names the [tensor.rate] key it was priced at; at --precision fp16 that is fp16
    tensor_ops = [o for o in p["ops"] if o["engine"] == "tensor"]
    assert tensor_ops and {o["precision"] for o in tensor_ops} == {"fp16"}
    assert {o["precision"] for o in p["ops"] if o["engine"] != "tensor"} == {None}
    # the residency never plans more than the SRAM holds
    target = tomllib.loads((TARGET_DIR / "exynos2400.toml").read_text())
    assert 0 < p["sram_peak_bytes"] <= target["sram"]["bytes"]


# --- user errors: exit 2, one line, nothing written ------------------------------------------------

def test_missing_build_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    assert_user_error(*run_cli("profile", str(tmp_path / "empty")), "not a build folder")


def test_missing_model(tmp_path):
    assert_user_error(*run_cli("profile", str(tmp_path / "nope.onnx")), "no such model")


def test_not_onnx(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00garbage" * 10)
    assert_user_error(*run_cli("profile", str(bad)), "bad.onnx")


def test_bad_precision(attn_model, tmp_path):
    rc, out = run_cli("profile", str(attn_model), "--precision", "int4", "--json", str(tmp_path / "p.json"))
    assert_user_error(rc, out, "precision 'int4'")
    assert not (tmp_path / "p.json").exists()


def test_unknown_target(attn_model):
    assert_user_error(*run_cli("profile", str(attn_model), "--target", "exynos9999"), "unknown target 'exynos9999'")


def test_target_file_with_missing_field(attn_model, tmp_path):
    toml = tmp_path / "npu.toml"
    toml.write_text((TARGET_DIR / "exynos2400.toml").read_text().replace("latency_cycles =", "# latency_cycles ="))
    assert_user_error(*run_cli("profile", str(attn_model), "--target", str(toml)), "dma.latency_cycles")


def test_target_file_with_mistyped_field(attn_model, tmp_path):
    toml = tmp_path / "npu.toml"
    toml.write_text((TARGET_DIR / "exynos2400.toml").read_text().replace("macs_per_cycle = 17_408",
                                                                        'macs_per_cycle = "many"'))
    assert_user_error(*run_cli("profile", str(attn_model), "--target", str(toml)), "tensor.macs_per_cycle")


def test_target_file_can_change_the_numbers(attn_model, tmp_path):
    toml = tmp_path / "npu.toml"
    text = (TARGET_DIR / "exynos2400.toml").read_text()
    toml.write_text(text.replace("bandwidth_bytes_per_s = 68_300_000_000", "bandwidth_bytes_per_s = 136_600_000_000"))
    for name, tgt in (("a", "exynos2400"), ("b", str(toml))):
        rc, out = run_cli("profile", str(attn_model), "--target", tgt, "--json", str(tmp_path / f"{name}.json"))
        assert rc == 0, out
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in "ab")
    assert b["engines_ms"]["dma"] < a["engines_ms"]["dma"]
    assert b["engines_ms"]["tensor"] == pytest.approx(a["engines_ms"]["tensor"])


def test_sram_budget_needs_explain_tiling(attn_model):
    assert_user_error(*run_cli("profile", str(attn_model), "--sram-budget", "1MiB"), "--explain-tiling")


def test_negative_top(attn_model):
    assert_user_error(*run_cli("profile", str(attn_model), "--top", "-1"), "--top")


def test_fp16_model_is_priced_at_fp16_as_built(tmp_path):
    path = tmp_path / "h.onnx"
    onnx.save_model(npu_graphs.matmul_model(64, 64, 64, np.float16), str(path))
    rc, out = run_cli("profile", str(path), "--json", str(tmp_path / "p.json"))
    assert rc == 0, out
    p = json.loads((tmp_path / "p.json").read_text())
    # x in and y out at fp16; the fp16 weights fit in SRAM and stay resident across inferences
    assert p["dma_bytes"] == (64 * 64 * 2) * 2 and p["resident_weight_bytes"] == p["weight_bytes"] == 64 * 64 * 2
