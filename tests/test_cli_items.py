"""Issue 18 items 3, 8 and the smaller ones of 8: every command's outputs checked before any work,
``edgefc run --random-inputs``, the help lists every train recipe, ``compile`` without a model,
all dynamic inputs in one error, a ``--shape`` that does not fit blames the node, ``--verify`` on
the console, one cache for the demo U-Net, the README's sample summary, generate's PNG mode."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgefc.cli import main
from tests.synthetic import mlp_model

ROOT = Path(__file__).resolve().parents[1]


def _cli(args, capsys):
    """``edgefc ARGS`` in-process: (exit status, stdout, stderr)."""
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def _one_error(code, out, err, *needles):
    lines = [ln for ln in (out + err).splitlines() if ln.strip() and not ln.startswith("  ")]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, out + err
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.fixture
def mlp(tmp_path) -> Path:
    path = tmp_path / "mlp.onnx"
    onnx.save(mlp_model(), str(path))
    return path


# --- every command checks its outputs first -------------------------------------------------------

def test_every_command_checks_its_output_before_any_work(tmp_path, capsys, mlp):
    (tmp_path / "afile").write_text("")
    (tmp_path / "src").mkdir()
    cases = [
        (["export", "unet", "--scale", "tiny", "-o", "/proc/edgefc/u.onnx"], "cannot write"),
        (["export", "unet", "--scale", "tiny", "-o", tmp_path / "afile" / "u.onnx"], "is a file"),
        (["generate", "--prompt", "a cat", "--scale", "tiny", "-o", "/proc/edgefc.png"], "cannot write"),
        (["generate", "--prompt", "a cat", "--scale", "tiny", "-o", tmp_path / "no" / "c.png"], "does not exist"),
        (["train", "vae", "--teacher-arch", "mini", "--data", tmp_path / "src", "-o", "/proc/edgefc-train"],
         "cannot write"),
        (["train", "kd", "--teacher-arch", "tiny", "--data", tmp_path / "src", "-o", tmp_path / "afile" / "x"],
         "is a file"),
        (["data", "synth", "-o", "/proc/edgefc-synth", "--count", "2"], "cannot write"),
        (["data", "curate", tmp_path / "src", "-o", tmp_path / "afile" / "x"], "is a file"),
        (["run", tmp_path / "b", "--random-inputs", "-o", "/proc/edgefc.npz"], "cannot write"),
        (["compile", mlp, "--json-result", "/proc/r.json"], "cannot write"),
    ]
    for args, needle in cases:
        code, out, err = _cli(args, capsys)
        _one_error(code, out, err, needle)
    assert not list(Path("/proc").glob("edgefc*"))


# --- edgefc run --random-inputs ------------------------------------------------------------------

@pytest.fixture(scope="module")
def tvm_build(tmp_path_factory):
    pytest.importorskip("tvm")
    import edgefc

    root = tmp_path_factory.mktemp("run")
    src = root / "mlp.onnx"
    onnx.save(mlp_model(), str(src))
    edgefc.compile(src, "exynos2400", output=root / "b", options={"emit": ("tvm",), "precision": "fp32"})
    return root


def test_run_random_inputs_are_seeded_and_checked(tvm_build, capsys):
    b = tvm_build / "b"
    code, out, err = _cli(["run", b, "--random-inputs", "--seed", "3", "--check", "-o", tvm_build / "o3.npz",
                           "--save-inputs", tvm_build / "in3.npz"], capsys)
    assert code == 0, err
    assert "random inputs (seed 3): x [2, 8] float32" in err and "y: shape [2, 16] float32" in out and " ok" in out
    code, _, err = _cli(["run", b, "--inputs", tvm_build / "in3.npz", "-o", tvm_build / "again.npz"], capsys)
    assert code == 0, err
    with np.load(tvm_build / "o3.npz") as a, np.load(tvm_build / "again.npz") as c:
        assert np.array_equal(a["y"], c["y"])
    code, _, err = _cli(["run", b, "--random-inputs", "--seed", "4", "-o", tvm_build / "o4.npz"], capsys)
    with np.load(tvm_build / "o3.npz") as a, np.load(tvm_build / "o4.npz") as c:
        assert not np.array_equal(a["y"], c["y"])


def test_run_needs_one_source_of_inputs(tvm_build, capsys):
    for args in ([], ["--inputs", tvm_build / "in3.npz", "--random-inputs"]):
        code, out, err = _cli(["run", tvm_build / "b", *args], capsys)
        _one_error(code, out, err, "--inputs FILE.npz or --random-inputs")


# --- help, usage errors ---------------------------------------------------------------------------

def test_help_lists_every_train_recipe(capsys):
    from edgefc.cli.train import train_group

    code, out, _ = _cli(["--help"], capsys)
    assert code == 0
    text = " ".join(out.split())
    line = text[text.index(" train "):][:300]
    for name in train_group.commands:
        assert f"({name})" in line, (name, line)


def test_compile_without_a_model_is_one_error_line(capsys):
    code, out, err = _cli(["compile"], capsys)
    _one_error(code, out, err, "give either MODEL or --demo", "edgefc compile --help")
    code, out, err = _cli(["compile", "--no-such-flag"], capsys)
    _one_error(code, out, err, "No such option")


# --- shapes ----------------------------------------------------------------------------------------

def _two_dynamic(tmp_path) -> Path:
    w = numpy_helper.from_array(np.ones((16, 4), np.float32), "w")
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"),
                           helper.make_node("Add", ["y", "z"], ["o"], name="add")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 16]),
                           helper.make_tensor_value_info("z", TensorProto.FLOAT, ["b", "n"])],
                          [helper.make_tensor_value_info("o", TensorProto.FLOAT, ["b", 4])], [w])
    path = tmp_path / "dyn2.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_all_dynamic_inputs_in_one_error(tmp_path, capsys):
    code, out, err = _cli(["compile", _two_dynamic(tmp_path), "-o", tmp_path / "b"], capsys)
    _one_error(code, out, err, "'x' [?x16]", "'z' [?x?]", "--shape x=D1xD2x... --shape z=D1xD2x...")


def test_shape_that_does_not_fit_blames_the_node(tmp_path, capsys):
    code, out, err = _cli(["compile", _two_dynamic(tmp_path), "--shape", "x=2x17", "--shape", "z=2x4",
                           "-o", tmp_path / "b"], capsys)
    _one_error(code, out, err, "MatMul node 'mm'", "Incompatible dimensions", "x [2, 17]", "w [16, 4]")


def test_repeated_shape_is_an_error(tmp_path, capsys):
    code, out, err = _cli(["compile", _two_dynamic(tmp_path), "--shape", "x=2x16", "--shape", "x=4x16",
                           "-o", tmp_path / "b"], capsys)
    _one_error(code, out, err, "--shape x is given twice (2x16 and 4x16)")


def test_verify_says_what_it_checked(mlp, tmp_path, capsys):
    code, out, err = _cli(["compile", mlp, "--verify", "--passes", "canonicalize,fuse", "-o", tmp_path / "b"], capsys)
    assert code == 0, err
    line = next(ln for ln in out.splitlines() if ln.startswith("verify:"))
    assert "9 passes checked against onnxruntime on seeded random inputs" in line and "largest max rel error" in line
    assert "  canonicalize" in out and "verified: max rel error" in out


# --- one demo cache, README --------------------------------------------------------------------------

def test_demo_shares_the_export_cache_of_generate(tmp_path, monkeypatch):
    from edgefc.cli import compile as cc
    from edgefc.models.export_cache import export_dir

    monkeypatch.setenv("EDGEFC_CACHE", str(tmp_path / "cache"))
    assert cc.demo_model_path() == export_dir("bk-sdm-tiny", "full", 512, 512) / "unet.onnx"
    old = tmp_path / "old-demo" / "unet-bk-sdm-tiny-512.onnx"
    old.parent.mkdir()
    old.write_bytes(b"an older edgefc's demo export")
    monkeypatch.setattr(cc, "OLD_DEMO_FILE", old)
    path = cc._demo_model(quiet=True)  # moved into the shared cache, not exported again or copied
    assert path == cc.demo_model_path() and path.read_bytes() == b"an older edgefc's demo export"
    assert not old.exists()


def test_generated_png_is_0644_under_umask_022(tmp_path):
    from edgefc.models.pipeline import write_png

    old = os.umask(0o022)
    try:
        write_png(np.zeros((4, 4, 3), np.uint8), tmp_path / "x.png")
    finally:
        os.umask(old)
    assert (tmp_path / "x.png").stat().st_mode & 0o777 == 0o644


def test_compile_of_a_folder_is_one_error_line(tmp_path, capsys):
    code, out, err = _cli(["compile", tmp_path], capsys)
    _one_error(code, out, err, "is a directory")
def test_readme_sample_summary_is_the_demo_build():
    text = (ROOT / "README.md").read_text()
    block = text[text.index("fusion:    "):]
    caption = block[block.index("```"):][:300]
    assert "tiny test U-Net" not in caption
    ms = float(re.search(r"target:    exynos2400: ([\d.]+) ms", block).group(1))
    assert ms > 20  # full-size figures (the tiny U-Net is under 2 ms)
    assert "edgefc compile --demo" in caption


