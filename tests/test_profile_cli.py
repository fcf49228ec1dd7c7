"""Issue 18 items 3, 5, 6 and 8 on ``edgefc profile``: a build tiled for another target's SRAM is
not priced silently (warning, ``profile.json`` ``warnings``, ``--retile``); op-table rows never
read the same and names are not cut mid-word; the VAE-like attention breakdown says why "w/ MLT"
is empty; every output path is checked before the table is printed; ``--shape`` on a build folder
is an error and a repeated ``--shape`` too; profile.json says how it was made."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest

import edgefc
from edgefc.targets.profile_views import short_names
from tests import npu_graphs
from tests.cli import assert_user_error, run_cli


@pytest.fixture(scope="module")
def tiled_for_2400(tmp_path_factory) -> Path:
    """An attention whose tiles under the 2400's SRAM budget do not fit the 2200's SRAM."""
    folder = tmp_path_factory.mktemp("tiled")
    src = folder / "attn.onnx"
    onnx.save_model(npu_graphs.attention_model(seq=1024, heads=8, head_dim=8), str(src))
    edgefc.compile(src, "exynos2400", output=folder / "build", options={"precision": "fp32"})
    return folder / "build"


def test_profile_on_a_smaller_sram_warns_and_retile_prices_it_retiled(tiled_for_2400, tmp_path):
    report = json.loads((tiled_for_2400 / "report.json").read_text())
    assert report["tiling"]["tiled"] == 1
    rc, text = run_cli("profile", str(tiled_for_2400), "--target", "exynos2200", "--json", str(tmp_path / "p.json"))
    assert rc == 0, text
    warning = next(line for line in text.splitlines() if line.startswith("warning: "))
    assert "tiled for exynos2400" in warning and "exynos2200's 2.00 MiB" in warning and "--retile" in warning
    p = json.loads((tmp_path / "p.json").read_text())
    assert p["warnings"] == [warning.removeprefix("warning: ")]
    rc, text = run_cli("profile", str(tiled_for_2400), "--target", "exynos2200", "--retile",
                       "--json", str(tmp_path / "r.json"))
    assert rc == 0 and "warning:" not in text, text
    r = json.loads((tmp_path / "r.json").read_text())
    assert "re-tiled for exynos2200" in r["warnings"][0]
    assert r["total_ms"] < p["total_ms"] and r["dma_bytes"] < p["dma_bytes"]
    (blk,) = r["attention_blocks"]
    assert not blk["s_spills_to_dram"]
    # on the target it was built for: no warning
    rc, text = run_cli("profile", str(tiled_for_2400))
    assert rc == 0 and "warning:" not in text


def test_profile_json_says_how_it_was_made(tiled_for_2400, tmp_path):
    built = json.loads((tiled_for_2400 / "profile.json").read_text())
    rep = json.loads((tiled_for_2400 / "report.json").read_text())["reproducibility"]
    assert built["reproducibility"] == rep
    assert {"edgefc", "python", "onnx", "onnxruntime", "target", "target_sha256", "options"} <= set(rep)
    import hashlib

    toml = Path(rep["target_file"])
    assert rep["target_sha256"] == hashlib.sha256(toml.read_bytes()).hexdigest()
    rc, _ = run_cli("profile", str(tiled_for_2400), "--json", str(tmp_path / "p.json"), "--schedule", "sequential")
    prof = json.loads((tmp_path / "p.json").read_text())["reproducibility"]
    assert prof["command"].startswith("edgefc profile ") and "--schedule" in prof["argv"]
    assert prof["options"]["schedule"] == "sequential"


def test_op_table_rows_never_read_the_same():
    names = ["/unet/down_blocks.0/attentions.0/transformer_blocks.0/attn1/Attention",
             "/unet/up_blocks.2/attentions.0/transformer_blocks.0/attn1/Attention",
             "/unet/up_blocks.2/attentions.1/transformer_blocks.0/attn1/Attention",
             "/unet/up_blocks.2/attentions.1/transformer_blocks.0/attn2/Attention", "conv_in"]
    short = short_names(names, 40)
    assert len(set(short)) == len(names) and all(len(s) <= 40 for s in short)
    assert short[-1] == "conv_in"
    for full, s in zip(names, short):  # whole path components only, in their order
        parts, kept = full.split("/"), [c for c in s.split("/") if c != "..."]
        it = iter(parts)
        assert all(any(c == p for p in it) for c in kept), (full, s)


def test_unet_table_names_are_distinct(tiny_models):
    rc, text = run_cli("profile", str(tiny_models["unet"]), "--top", "0")
    assert rc == 0, text
    from edgefc.targets.profile_views import NAME_WIDTH

    table = text.split("\n\n")[1].splitlines()
    assert table[0].startswith("op (names under /unet/)")
    names = [r[:NAME_WIDTH].rstrip() for r in table[1:] if r and not r.startswith("(")]
    assert len(names) == len(set(names)) > 100
    assert not any("~" in n for n in names)  # told apart by their own components


def test_breakdown_says_why_w_mlt_is_empty(tmp_path):
    """The VAE decoder's one-head 4096 x 4096 attention: no tiling fits the default budget."""
    path = tmp_path / "vae_attn.onnx"
    onnx.save_model(npu_graphs.attention_model(seq=4096, heads=1, head_dim=512), str(path))
    rc, text = run_cli("profile", str(path), "--attention-breakdown", "--precision", "fp16",
                       "--json", str(tmp_path / "p.json"))
    assert rc == 0, text
    assert "(w/ MLT empty: no tiling fits exynos2400's default SRAM budget of 5.62 MiB" in text, text
    bd = json.loads((tmp_path / "p.json").read_text())["attention_breakdown"]
    assert bd["rows_mlt"] is None and "no tiling fits" in bd["rows_mlt_reason"]


# --- output paths and --shape --------------------------------------------------------------------

@pytest.mark.parametrize("option", ["--json", "--csv", "--trace", "--plot"])
def test_unwritable_outputs_fail_before_the_table(tiled_for_2400, tmp_path, option):
    for bad, needle in (("/proc/edgefc.out", "cannot write"), (str(tmp_path / "no" / "x.out"), "does not exist")):
        rc, text = run_cli("profile", str(tiled_for_2400), option, bad)
        assert_user_error(rc, text, option, needle)
        assert "total" not in text  # nothing printed before the error


def test_outputs_never_overwrite_the_input_or_each_other(tiled_for_2400, tmp_path):
    rc, text = run_cli("profile", str(tiled_for_2400), "--json", str(tiled_for_2400 / "model.onnx"))
    assert_user_error(rc, text, "input of this command")
    rc, text = run_cli("profile", str(tiled_for_2400), "--json", str(tmp_path / "a"), "--csv", str(tmp_path / "a"))
    assert_user_error(rc, text, "--json and --csv name the same file")


def test_shape_on_a_build_folder_and_repeated_shape(tiled_for_2400, tmp_path):
    rc, text = run_cli("profile", str(tiled_for_2400), "--shape", "x=1x1024x64")
    assert_user_error(rc, text, "--shape applies to an ONNX file")
    src = tiled_for_2400.parent / "attn.onnx"
    rc, text = run_cli("profile", str(src), "--shape", "x=1x1024x64", "--shape", "x=1x512x64")
    assert_user_error(rc, text, "--shape x is given twice")
