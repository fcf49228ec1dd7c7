"""Issue 18 item 1 and issue 22 item 1: a build is loaded the way its users load it before it is
handed over (onnx.checker with full_check, onnxruntime with its default session options and with
optimisations off, in a child process); a build that fails is an internal error with exit status
3 naming the last pass, and nothing is written; node names are unique after every pass."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

import edgefc
from edgefc import handover, ort
from tests.cli import assert_user_error, run_cli
from tests.synthetic import mlp_model

# A child process that creates a session with onnxruntime's default options (what a user's
# ``onnxruntime.InferenceSession(path)`` does: all graph optimisations) and runs it on the seeded
# inputs edgefc's checks use; the outputs come back as an .npz. An abort must not end the test run.
_LOAD_DEFAULT = """
import sys, numpy as np, onnxruntime as ort
sess = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
feeds = dict(np.load(sys.argv[2]))
np.savez(sys.argv[3], *sess.run(None, feeds))
"""


def run_with_default_options(model: Path, feeds: dict, tmp_path: Path) -> list[np.ndarray]:
    np.savez(tmp_path / "feeds.npz", **feeds)
    proc = subprocess.run([sys.executable, "-c", _LOAD_DEFAULT, str(model), str(tmp_path / "feeds.npz"),
                           str(tmp_path / "out.npz")], capture_output=True, text=True, timeout=600, check=False)
    last = (proc.stderr.strip().splitlines() or [""])[-1]
    assert proc.returncode == 0, f"onnxruntime with default options: exit status {proc.returncode}: {last}"
    with np.load(tmp_path / "out.npz") as z:
        return [z[k] for k in z.files]


def test_tiny_tiled_w8a16_unet_loads_with_default_session_options(tiny_models, tmp_path):
    """The README's reproduction of issue 18 item 1: the tiny U-Net, W8A16, three attentions tiled
    under a 64 KiB budget; its build.loads and runs under onnxruntime's default session options
    (all graph optimisations) as close to FP32 as with optimisations off."""
    out = tmp_path / "b"
    rc, text = run_cli("compile", str(tiny_models["unet"]), "--sram-budget", "64KiB", "-o", str(out),
                       "--eval-samples", "0")
    assert rc == 0, text
    report = json.loads((out / "report.json").read_text())
    assert report["quantization"]["precision"] == "w8a16" and report["tiling"]["tiled"] >= 1
    (check,) = report["handover"]
    assert check["file"] == "model.onnx" and check["onnx_checker"] == "full_check"
    assert [s.split(" ")[0] for s in check["sessions"]] == ["default", "graph"]
    feeds = ort.random_inputs(onnx.load(str(out / "model.onnx"), load_external_data=False), seed=3)
    (optimised,) = run_with_default_options(out / "model.onnx", feeds, tmp_path)
    unoptimised = ort.run(str(out / "model.onnx"), feeds)["out_sample"]
    fp32 = ort.run(str(tiny_models["unet"]), feeds)["out_sample"]
    from edgefc.metrics import sqnr_db

    assert optimised.shape == fp32.shape and np.isfinite(optimised).all()
    # onnxruntime's QDQ fusions round differently; the optimised model is as close to FP32 (+-1 dB)
    assert abs(sqnr_db(fp32, optimised) - sqnr_db(fp32, unoptimised)) < 1.0, (sqnr_db(fp32, optimised),
                                                                               sqnr_db(fp32, unoptimised))


# --- a build that does not load is an internal error ------------------------------------------------

_BAD_LOOP_PASS = '''
import onnx.parser
import onnx_graphsurgeon as gs
import edgefc

TEXT = """
<ir_version: 10, opset_import: ["" : 21]>
g (float[4,4] x) => (float[2,4,4] y) {
  s = Constant <value = float {0.5}> ()
  z = Constant <value = int8 {0}> ()
  q = QuantizeLinear (x, s, z)
  d = DequantizeLinear (q, s, z)
  t = Transpose <perm = [1, 0]> (d)
  n = Constant <value = int64 {2}> ()
  c = Constant <value = bool {1}> ()
  y = Loop (n, c) <body = b (int64 i, bool ci) => (bool co, float[4,4] yt) {
     co = Identity (ci)
     yt = Relu (t)
  }>
}
"""


@edgefc.register_pass("bad-loop")
class BadLoop(edgefc.Pass):
    """Replaces the graph with DQ -> Transpose -> a Loop body reading the result as an outer-scope
    value: what aborted onnxruntime 1.32 under its default options (issue 18 item 1)."""

    def run(self, graph, ctx):
        return gs.import_onnx(onnx.parser.parse_model(TEXT))


@edgefc.register_pass("bad-op")
class BadOp(edgefc.Pass):
    """Adds a node of an op that does not exist (the ONNX checker refuses the model)."""

    def run(self, graph, ctx):
        out = graph.outputs[0]
        y = gs.Variable("frobbed", dtype=out.dtype, shape=out.shape)
        graph.nodes.append(gs.Node("Frobnicate", name="frob", inputs=[out], outputs=[y]))
        graph.outputs[0] = y
        return graph


@edgefc.register_pass("twin-names")
class TwinNames(edgefc.Pass):
    """Gives every node the same name (as ONNX's version converter does to converted nodes)."""

    def run(self, graph, ctx):
        for node in graph.nodes:
            node.name = "twin"
        return graph
'''


@pytest.fixture(scope="module")
def plugin(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("plugin") / "bad_passes.py"
    path.write_text(_BAD_LOOP_PASS)
    return path


@pytest.fixture(scope="module")
def loaded_plugin(plugin) -> Path:
    """The plugin registered in this process (once: registering a pass id twice is an error)."""
    edgefc.load_plugin(str(plugin))
    return plugin


@pytest.fixture
def mlp(tmp_path) -> Path:
    path = tmp_path / "mlp.onnx"
    onnx.save(mlp_model(), str(path))
    return path


def _nothing_left(tmp_path: Path, out: Path) -> bool:
    return not out.exists() and not list(tmp_path.glob(f".{out.name}*"))


def test_build_that_aborts_onnxruntime_is_an_internal_error_with_exit_status_3(tmp_path, plugin, mlp):
    out = tmp_path / "build"
    rc, text = run_cli("compile", str(mlp), "--plugin", str(plugin), "--passes", "canonicalize,bad-loop",
                       "-o", str(out))
    assert_user_error(rc, text, "internal error", "after pass 'bad-loop'", "SIGABRT", "default session options",
                      status=handover.EXIT_STATUS)
    assert _nothing_left(tmp_path, out)


def test_build_that_fails_the_onnx_checker_is_an_internal_error(tmp_path, plugin, mlp):
    out = tmp_path / "build"
    rc, text = run_cli("compile", str(mlp), "--plugin", str(plugin), "--passes", "canonicalize,bad-op", "-o", str(out))
    assert_user_error(rc, text, "internal error", "after pass 'bad-op'", "onnx.checker", "Frobnicate",
                      status=handover.EXIT_STATUS)
    assert _nothing_left(tmp_path, out)


def test_handover_error_from_the_python_api(tmp_path, loaded_plugin, mlp):
    with pytest.raises(handover.HandoverError, match="after pass 'bad-op'") as e:
        edgefc.compile(mlp, None, passes=["canonicalize", "bad-op"], output=tmp_path / "build")
    assert e.value.exit_status == 3 and _nothing_left(tmp_path, tmp_path / "build")
    # without an output folder nothing is handed over, so nothing is checked
    assert edgefc.compile(mlp, None, passes=["canonicalize", "bad-op"]).graph.nodes[-1].op == "Frobnicate"


def test_handover_check_names_the_session_that_failed(tmp_path):
    """A model onnxruntime refuses (not an abort) is reported with onnxruntime's own message."""
    from onnx import TensorProto, helper

    node = helper.make_node("Relu", ["x"], ["y"], name="r")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("x.unknown", 1)])
    model.graph.node.append(helper.make_node("Mystery", ["y"], ["z"], name="m", domain="x.unknown"))
    model.graph.output[0].name = "z"
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    with pytest.raises(handover.HandoverError) as e:
        handover.check_model_file(path, "my-pass")
    text = str(e.value)
    assert "after pass 'my-pass'" in text and "Mystery" in text and "\n" not in text


# --- unique node names after every pass -------------------------------------------------------------

def test_node_names_are_unique_after_every_pass(tmp_path, loaded_plugin, mlp):
    out = tmp_path / "build"
    result = edgefc.compile(mlp, None, passes=["canonicalize", "twin-names"], output=out)
    names = [n.name for n in onnx.load(str(out / "model.onnx")).graph.node]
    assert len(names) == len(set(names)) and names[0] == "twin"
    assert result.report["passes"][-1]["renamed_nodes"] == len(names) - 1


def test_unique_node_names_reaches_subgraphs():
    import onnx_graphsurgeon as gs

    body = gs.Graph(nodes=[gs.Node("Identity", name="a", inputs=[gs.Variable("i")], outputs=[gs.Variable("o")])])
    graph = gs.Graph(nodes=[gs.Node("Identity", name="a", inputs=[gs.Variable("x")], outputs=[gs.Variable("y")]),
                            gs.Node("If", name="a_2", attrs={"then_branch": body})])
    assert handover.unique_node_names(graph) == 1
    assert sorted([graph.nodes[0].name, graph.nodes[1].name, body.nodes[0].name]) == ["a", "a_2", "a_3"]


ONNX_LIGHT = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"


@pytest.mark.skipif(not (ONNX_LIGHT / "light_squeezenet.onnx").is_file(), reason="onnx's light models not installed")
def test_version_converted_model_loads_in_onnxruntime(tmp_path):
    """SqueezeNet (opset 9, IR version 3) from the onnx package: the version converter names every
    converted ConstantOfShape alike, and the IR version must follow the opset; the build loads with
    onnxruntime's default options and gives the original's output (issue 22)."""
    out = tmp_path / "sq"
    src = ONNX_LIGHT / "light_squeezenet.onnx"
    rc, text = run_cli("compile", str(src), "-o", str(out), "--quiet")
    assert rc == 0, text
    model = onnx.load(str(out / "model.onnx"))
    names = [n.name for n in model.graph.node if n.name]
    assert len(names) == len(set(names)) and model.ir_version >= 10
    feeds = ort.random_inputs(onnx.load(str(src)), seed=0)
    (y,) = run_with_default_options(out / "model.onnx", feeds, tmp_path)
    ref = next(iter(ort.run(str(src), feeds).values()))
    assert np.abs(y - ref).max() <= 1e-4 * max(1.0, float(np.abs(ref).max()))


def test_exit_status_3_is_documented():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert "exit status 3" in readme and "handover" in readme.lower()
    assert os.environ.get("EDGEFC_NO_SUCH") is None  # (no environment switch turns the check off)


def test_the_loading_child_survives_for_the_next_build_and_is_restarted_after_an_abort(tmp_path, mlp):
    """One child process loads the models of many builds (a long-lived process: the test suite);
    when onnxruntime aborts in it, the failure names the signal and the next check starts a new one."""
    import onnx.parser

    bad = tmp_path / "bad.onnx"
    onnx.save_model(onnx.parser.parse_model(_BAD_LOOP_PASS.split('TEXT = """')[1].split('"""')[0]), str(bad))
    good = mlp
    handover.check_model_file(good, "p")
    first = handover._worker.proc.pid
    handover.check_model_file(good, "p")
    assert handover._worker.proc.pid == first  # the same child
    with pytest.raises(handover.HandoverError, match="SIGABRT"):
        handover.check_model_file(bad, "p")
    assert handover.check_model_file(good, "p")["file"] == "mlp.onnx"
    assert handover._worker.proc.pid != first
