"""The README's "Writing your own pass" examples, run as written (extracted from README.md, so they
cannot drift): the plugins, the commands, the Python snippets and the errors they document."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from edgefc import ort
from tests.cli import run_cli

README = Path(__file__).resolve().parents[1] / "README.md"


def section_blocks() -> list[tuple[str, str]]:
    """(language, code) of every fenced block of the section "Writing your own pass"."""
    text = README.read_text()
    section = text[text.index("## Writing your own pass"):text.index("## Layout")]
    return re.findall(r"```(\w+)\n(.*?)```", section, re.DOTALL)


def block(lang: str, starts: str) -> str:
    """The one block of ``lang`` whose code starts with ``starts``."""
    found = [code for lg, code in section_blocks() if lg == lang and code.lstrip().startswith(starts)]
    assert len(found) == 1, (lang, starts, len(found))
    return found[0]


def checked_errors(code: str) -> str:
    """``stmt   # PassError: message`` lines become a check that ``stmt`` raises exactly that."""
    out = []
    for line in code.splitlines():
        m = re.match(r"^(\S.*?)\s+# PassError: (.+)$", line)
        if m:
            out += ["try:", f"    {m.group(1)}", "except edgefc.PassError as e:",
                    f"    assert str(e) == {m.group(2)!r}, str(e)", "else:",
                    f"    raise AssertionError('no PassError from ' + {m.group(1)!r})"]
        else:
            out.append(line)
    return "\n".join(out) + "\n"


def python(code: str, cwd: Path) -> str:
    """Run ``code`` in a fresh interpreter (a clean pass registry) in ``cwd``; its stdout."""
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def command(code: str, cwd: Path) -> tuple[int, str]:
    """Run a README ``edgefc ...`` command line."""
    argv = shlex.split(code.strip())
    assert argv[0] == "edgefc", code
    return run_cli(*argv[1:], cwd=cwd)


@pytest.fixture
def models(tmp_path) -> Path:
    """``model.onnx`` (= ``m.onnx``): x * HardSigmoid(x; 1/6, 0.5), then a HardSigmoid without
    attributes (the ONNX defaults alpha 0.2, beta 0.5: not a HardSwish) times its input, a Relu."""
    graph = helper.make_graph(
        [helper.make_node("HardSigmoid", ["x"], ["s"], name="hs", alpha=1 / 6, beta=0.5),
         helper.make_node("Mul", ["x", "s"], ["y"], name="mul"),
         helper.make_node("HardSigmoid", ["y"], ["s2"], name="hs2"),
         helper.make_node("Mul", ["s2", "y"], ["z"], name="mul2"),
         helper.make_node("Relu", ["z"], ["r"], name="relu")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("r", TensorProto.FLOAT, [1, 8])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    for name in ("model.onnx", "m.onnx"):
        onnx.save(model, tmp_path / name)
    return tmp_path


def test_readme_custom_pass_and_options(models):
    """my_pass.py through the CLI (--verify) and the PassManager; the options example's errors."""
    (models / "my_pass.py").write_text(block("python", "# my_pass.py"))
    rc, out = command(block("bash", "edgefc compile m.onnx --plugin my_pass.py"), models)
    assert rc == 0, out
    report = json.loads((models / "build" / "m" / "report.json").read_text())
    assert report["my-pass"] == {"relus": 1} and [p["name"] for p in report["passes"]] == ["canonicalize", "my-pass"]
    out = python("import edgefc\nedgefc.load_plugin('my_pass.py')\n" + block("python", "import edgefc\ngraph = "), models)
    assert "('my-pass'," in out and (models / "out.onnx").is_file()
    python("import edgefc\n" + checked_errors(block("python", "from dataclasses import dataclass")), models)


def test_readme_fusion_pass_inserted_into_the_npu_pipeline(models):
    """hardswish.py, inserted after `fuse` into the npu pipeline the exynos2400 target runs: one
    HardSwish, the default-alpha HardSigmoid a miss with its reason, the build (quantized as the
    npu pipeline decides) computing what the source does."""
    (models / "hardswish.py").write_text(block("python", "# hardswish.py"))
    rc, out = command(block("bash", "edgefc compile model.onnx --plugin hardswish.py"), models)
    assert rc == 0, out
    build = models / "build" / "model"
    report = json.loads((build / "report.json").read_text())
    names = [p["name"] for p in report["passes"]]
    npu = ["canonicalize", "fuse-identity", "fuse-layernorm", "fuse-gelu", "fuse-geglu", "fuse-groupnorm",
           "fuse-attention", "fuse-matmul-bias", "fuse-epilogue"]
    assert names[:len(npu) + 1] == npu + ["fuse-hardswish"] and "quantize" in names[len(npu) + 1:], names
    assert report["fusion"]["hardswish"] == 1
    [miss] = report["fusion"]["misses"]["hardswish"]
    assert miss["node"] == "hs2" and "alpha is 0.2, want 0.166667" in miss["reason"], miss
    built = onnx.load(build / "model.onnx")
    assert [n.op_type for n in built.graph.node].count("HardSwish") == 1
    feeds = {"x": np.linspace(-4, 4, 8, dtype=np.float32).reshape(1, 8)}
    # exact up to the deployed precision (auto: W8A16 on an NPU target for a model of unknown kind)
    tolerance = 1e-6 if report["quantization"]["precision"] == "fp32" else 1e-3
    ort.check(ort.run(onnx.load(models / "model.onnx"), feeds), ort.run(built, feeds), tolerance)
    out = python(block("python", "import edgefc\nedgefc.load_plugin"), models)
    assert out.startswith("1 [{'node': 'hs2'"), out


def test_insert_errors_are_one_line(models):
    """An anchor not in the pipeline, an unknown pass to insert, a malformed value: exit 2, one line."""
    from tests.cli import assert_user_error

    (models / "hardswish.py").write_text(block("python", "# hardswish.py"))
    base = ["compile", "model.onnx", "--plugin", "hardswish.py", "-o", "build/x"]
    rc, out = run_cli(*base, "--insert-after", "fuse-nothing=fuse-hardswish", cwd=models)
    assert_user_error(rc, out, "cannot insert after 'fuse-nothing'", "canonicalize, fuse-identity")
    rc, out = run_cli(*base, "--passes", "canonicalize", "--insert-before", "quantize=fuse-hardswish", cwd=models)
    assert_user_error(rc, out, "cannot insert before 'quantize'", "(canonicalize)")
    rc, out = run_cli(*base, "--insert-after", "fuse=fuse-hardswsh", cwd=models)
    assert_user_error(rc, out, "unknown pass 'fuse-hardswsh'")
    rc, out = run_cli(*base, "--insert-after", "fuse-hardswish", cwd=models)
    assert_user_error(rc, out, "--insert-after fuse-hardswish: expected ANCHOR=PASS")
    assert not (models / "build").exists()
