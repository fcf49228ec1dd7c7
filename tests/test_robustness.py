"""Any valid model compiles or is refused cleanly (issue 12, item 6): old opsets, data-dependent
shapes folded, sequences, a pass's unexpected exception as one line, SIGTERM and killed runs
leave nothing behind, build folders honour the umask."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import edgefc
from edgefc import ort
from tests.cli import assert_user_error, run_cli
from tests.synthetic import mlp_model


def _model(nodes, inputs, outputs, opset, initializers=()):
    graph = helper.make_graph(nodes, "m", inputs, outputs, list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _vi(name, shape, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


def _compile_matches(tmp_path, model, feeds, **kw):
    """Compile ``model`` (fp32, default NPU pipeline otherwise) and check it strictly against the original."""
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    result = edgefc.compile(path, "exynos2400", output=tmp_path / "build", options={"precision": "fp32", "no_mlt": True}, **kw)
    ort.check(ort.run(str(path), feeds), ort.run(str(tmp_path / "build" / "model.onnx"), feeds), 1e-5)
    return result


# --- opsets ------------------------------------------------------------------------------------

@pytest.mark.parametrize("opset", [7, 9, 11, 13])
def test_old_opsets_compile_and_match(tmp_path, opset):
    """A small CNN at an old opset: Conv, BatchNormalization, Relu, MaxPool, Reshape, Gemm."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    bn = [numpy_helper.from_array(v.astype(np.float32), n) for n, v in
          (("s", rng.random(4) + 0.5), ("b", rng.standard_normal(4)), ("m", rng.standard_normal(4)), ("v", rng.random(4) + 0.5))]
    fc = numpy_helper.from_array(rng.standard_normal((64, 5)).astype(np.float32), "fc")
    fb = numpy_helper.from_array(rng.standard_normal(5).astype(np.float32), "fb")
    shape = numpy_helper.from_array(np.array([1, 64], dtype=np.int64), "shape")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["n"]),
             helper.make_node("Relu", ["n"], ["r"]),
             helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Reshape", ["p", "shape"], ["f"]),
             helper.make_node("Gemm", ["f", "fc", "fb"], ["y"])]
    model = _model(nodes, [_vi("x", [1, 3, 8, 8])], [_vi("y", [1, 5])], opset, [w, *bn, fc, fb, shape])
    onnx.checker.check_model(model)
    result = _compile_matches(tmp_path, model, {"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)})
    assert result.graph.opset == 23


def test_ops_that_need_no_conversion_are_converted_op_by_op(tmp_path, monkeypatch):
    """Where ONNX's whole-model converter fails, each op is converted alone, and ops whose schema
    did not change are left as they are."""
    from onnx import version_converter

    real = version_converter.convert_version
    calls = []

    def picky(model, version):  # fails on any model with more than one node, like the real one on some models
        calls.append(len(model.graph.node))
        if len(model.graph.node) > 1:
            raise RuntimeError("Input x is undefined!")
        return real(model, version)

    monkeypatch.setattr(version_converter, "convert_version", picky)
    nodes = [helper.make_node("Greater", ["x", "zero"], ["g"]),  # changed at 13: converted alone
             helper.make_node("Not", ["g"], ["n"]),  # the same at 11 and 23: left as it is
             helper.make_node("Unsqueeze", ["n"], ["u"], axes=[0]),  # axes attribute -> input at 13
             helper.make_node("Cast", ["u"], ["y"], to=TensorProto.FLOAT)]
    zero = numpy_helper.from_array(np.array(0.0, np.float32), "zero")
    model = _model(nodes, [_vi("x", [3])], [_vi("y", [1, 3])], 11, [zero])
    feeds = {"x": np.array([-1.0, 4.0, 0.0], np.float32)}
    _compile_matches(tmp_path, model, feeds)
    assert calls == [4, 1, 1, 1]  # the whole model, then Greater, Unsqueeze and Cast alone (not Not)


def test_ir3_model_with_unnamed_nodes_converts_whole_and_loads(tmp_path):
    """An IR-3 model (initializers listed as graph inputs, unnamed nodes; the onnx package's classic
    CNNs) goes through the whole-model converter (IR 3 demands initializers be inputs, which the
    weight-free skeleton does not list) and its build loads in onnxruntime: node names unique,
    IR version the opset's."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    shape = numpy_helper.from_array(np.array([4], dtype=np.int64), "shape")
    nodes = [helper.make_node("ConstantOfShape", ["shape"], ["b"], value=numpy_helper.from_array(np.array([0.5], np.float32))),
             helper.make_node("Conv", ["x", "w", "b"], ["c"]),
             helper.make_node("Unsqueeze", ["c"], ["u"], axes=[0]),
             helper.make_node("Relu", ["u"], ["r"]),
             helper.make_node("Unsqueeze", ["r"], ["y"], axes=[0])]
    model = _model(nodes, [_vi("x", [1, 3, 5, 5]), _vi("w", [4, 3, 3, 3]), _vi("shape", [1], TensorProto.INT64)],
                   [_vi("y", [1, 1, 1, 4, 3, 3])], 9, [w, shape])
    model.ir_version = 3
    onnx.checker.check_model(model)
    result = _compile_matches(tmp_path, model, {"x": rng.standard_normal((1, 3, 5, 5)).astype(np.float32)})
    names = [n.name for n in result.graph.nodes if n.name]
    assert len(names) == len(set(names))
    built = onnx.load(str(tmp_path / "build" / "model.onnx"))
    assert built.ir_version >= 11
    onnx.checker.check_model(built, full_check=True)


def test_op_by_op_conversion_names_every_node_uniquely(tmp_path, monkeypatch):
    """Two unnamed nodes of one op type converted alone each get their own name (they used to both
    become '<Op>_opset23_<Op>', which onnxruntime refuses to load)."""
    from onnx import version_converter

    real = version_converter.convert_version

    def picky(model, version):
        if len(model.graph.node) > 1:
            raise RuntimeError("Input x is undefined!")
        return real(model, version)

    monkeypatch.setattr(version_converter, "convert_version", picky)
    nodes = [helper.make_node("Unsqueeze", ["x"], ["u"], axes=[0]),
             helper.make_node("Unsqueeze", ["u"], ["v"], axes=[0]),
             helper.make_node("Relu", ["v"], ["y"])]
    model = _model(nodes, [_vi("x", [3])], [_vi("y", [1, 1, 3])], 11)
    result = _compile_matches(tmp_path, model, {"x": np.array([-1.0, 4.0, 0.0], np.float32)})
    names = [n.name for n in result.graph.nodes]
    assert len(names) == len(set(names)), names


def test_function_op_with_a_defaulted_attribute_passes_the_full_check_after_conversion(tmp_path):
    """MeanVarianceNormalization (a function op) without its axes attribute, opset 13 -> 23: its
    body references @axes, which onnx's full check leaves unbound at opset 23 unless the default
    is written out (the build failed the handover check: exit 3)."""
    model = _model([helper.make_node("MeanVarianceNormalization", ["x"], ["y"])], [_vi("x", [3, 3, 3, 1])],
                   [_vi("y", [3, 3, 3, 1])], 13)
    result = _compile_matches(tmp_path, model, {"x": np.random.default_rng(0).standard_normal((3, 3, 3, 1)).astype(np.float32)})
    assert list(result.graph.nodes[0].attrs["axes"]) == [0, 2, 3]
    onnx.checker.check_model(onnx.load(str(tmp_path / "build" / "model.onnx")), full_check=True)


def test_newer_opsets_stay_as_they_are(tmp_path):
    model = _model([helper.make_node("Relu", ["x"], ["y"])], [_vi("x", [2])], [_vi("y", [2])], 24)
    result = _compile_matches(tmp_path, model, {"x": np.array([-1.0, 1.0], np.float32)})
    assert result.graph.opset == 24


# --- folding -----------------------------------------------------------------------------------

def test_shape_with_start_and_end_folds_to_the_right_value(tmp_path):
    """graphsurgeon's shape folding ignores Shape's start/end: a wrong answer (test_shape_start_1)."""
    nodes = [helper.make_node("Shape", ["x"], ["y"], start=1), helper.make_node("Shape", ["x"], ["z"], start=-2, end=-1)]
    model = _model(nodes, [_vi("x", [3, 4, 5])], [_vi("y", [2], TensorProto.INT64), _vi("z", [1], TensorProto.INT64)], 21)
    _compile_matches(tmp_path, model, {"x": np.zeros((3, 4, 5), np.float32)})
    out = ort.run(str(tmp_path / "build" / "model.onnx"), {"x": np.zeros((3, 4, 5), np.float32)})
    assert out["y"].tolist() == [4, 5] and out["z"].tolist() == [4]


def test_data_dependent_shapes_fold_to_static_intermediates(tmp_path):
    """Shape -> Gather -> Range -> Expand and an If on a shape test: all static once folded."""
    zero = numpy_helper.from_array(np.array(0, dtype=np.int64), "zero")
    one = numpy_helper.from_array(np.array(1, dtype=np.int64), "one")
    idx = numpy_helper.from_array(np.array(1, dtype=np.int64), "idx")
    then = helper.make_graph([helper.make_node("Neg", ["x"], ["t"])], "then", [], [_vi("t", [2, 3])])
    other = helper.make_graph([helper.make_node("Abs", ["x"], ["e"])], "else", [], [_vi("e", [2, 3])])
    nodes = [helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Gather", ["s", "idx"], ["n"]),
             helper.make_node("Range", ["zero", "n", "one"], ["r"]),
             helper.make_node("Cast", ["r"], ["rf"], to=TensorProto.FLOAT),
             helper.make_node("Expand", ["rf", "s"], ["b"]),
             helper.make_node("Greater", ["n", "one"], ["cond"]),
             helper.make_node("If", ["cond"], ["picked"], then_branch=then, else_branch=other),
             helper.make_node("Add", ["picked", "b"], ["y"])]
    model = _model(nodes, [_vi("x", [2, 3])], [_vi("y", [2, 3])], 17, [zero, one, idx])
    result = _compile_matches(tmp_path, model, {"x": np.arange(6, dtype=np.float32).reshape(2, 3)})
    ops = [n.op for n in result.graph.nodes]
    assert "If" not in ops and "Range" not in ops and "Shape" not in ops, ops
    assert all(edgefc.ir.static_shape(t) is not None for t in result.graph.tensors().values())


def test_sequence_values_are_not_folded_and_do_not_crash(tmp_path):
    c = numpy_helper.from_array(np.ones((2, 3), np.float32), "c")
    one = numpy_helper.from_array(np.array(1, dtype=np.int64), "one")
    nodes = [helper.make_node("SequenceConstruct", ["x", "c"], ["seq"]),
             helper.make_node("SequenceAt", ["seq", "one"], ["s1"]),
             helper.make_node("SequenceConstruct", ["c", "x"], ["const_first"]),
             helper.make_node("SequenceAt", ["const_first", "one"], ["s2"]),
             helper.make_node("SequenceConstruct", ["c", "c"], ["const_seq"]),  # all constant: folds through
             helper.make_node("SequenceAt", ["const_seq", "one"], ["at"]),
             helper.make_node("Sum", ["s1", "s2", "at"], ["y"])]
    model = _model(nodes, [_vi("x", [2, 3])], [_vi("y", [2, 3])], 17, [c, one])
    _compile_matches(tmp_path, model, {"x": np.arange(6, dtype=np.float32).reshape(2, 3)})


def test_unknown_sequence_shapes_are_refused_cleanly(tmp_path):
    nodes = [helper.make_node("SequenceConstruct", ["x", "x"], ["seq"]),
             helper.make_node("ConcatFromSequence", ["seq"], ["y"], axis=0)]
    model = _model(nodes, [_vi("x", [2, 3])], [_vi("y", ["n", 3])], 17)
    path = tmp_path / "seq.onnx"
    onnx.save(model, str(path))
    with pytest.raises(edgefc.ShapeError, match="shape inference cannot determine it .tensor 'y', output of ConcatFromSequence node"):
        edgefc.compile(path, "exynos2400", options={"precision": "fp32"})


def test_data_dependent_output_shape_is_refused_naming_the_input(tmp_path):
    model = _model([helper.make_node("NonZero", ["x"], ["y"])], [_vi("x", [4])], [_vi("y", [1, "n"], TensorProto.INT64)], 17)
    path = tmp_path / "nz.onnx"
    onnx.save(model, str(path))
    out = tmp_path / "build"
    rc, text = run_cli("compile", str(path), "--precision", "fp32", "-o", str(out))
    assert_user_error(rc, text, "no static shape: it depends on the values of input 'x' (tensor 'y', output of NonZero node")
    assert not out.exists() and not list(tmp_path.glob(".build*"))


# --- a pass's unexpected exception ---------------------------------------------------------------

_BROKEN_PASS = '''
import edgefc

@edgefc.register_pass("broken")
class Broken(edgefc.Pass):
    """Fails on its second node, as a bug would."""

    def run(self, graph, ctx):
        for node in graph.nodes:
            if node.op == "Relu":
                return 1 / 0
        return graph
'''


def test_unexpected_exception_in_a_pass_is_one_line_naming_pass_and_node(tmp_path):
    path = tmp_path / "mlp.onnx"
    onnx.save(mlp_model(), str(path))
    plugin = tmp_path / "broken.py"
    plugin.write_text(_BROKEN_PASS)
    out = tmp_path / "build"
    rc, text = run_cli("compile", str(path), "--plugin", str(plugin), "--passes", "canonicalize,broken", "-o", str(out))
    assert_user_error(rc, text, "pass 'broken' failed at node", "(Relu)", "ZeroDivisionError")
    assert not out.exists() and not list(tmp_path.glob(".build*"))
    import importlib.util

    spec = importlib.util.spec_from_file_location("broken_pass_plugin", plugin)
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
    with pytest.raises(edgefc.errors.InternalError, match="pass 'broken'"):
        edgefc.compile(path, None, passes=["canonicalize", "broken"])


# --- SIGTERM, killed runs, umask -------------------------------------------------------------------

_SLOW_PASS = '''
import time
from pathlib import Path
import edgefc

@edgefc.register_pass("slow")
class Slow(edgefc.Pass):
    """Waits (for the SIGTERM test)."""

    def run(self, graph, ctx):
        Path({marker!r}).touch()
        time.sleep(60)
        return graph
'''


def _start(args, env=None):
    return subprocess.Popen([sys.executable, "-c", "from edgefc.cli import main; main()", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _wait_for(predicate, proc, seconds=120):
    end = time.monotonic() + seconds
    while not predicate():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < end, "timed out"
        time.sleep(0.02)


def test_sigterm_during_a_pass_cleans_up_like_ctrl_c(tmp_path):
    path = tmp_path / "mlp.onnx"
    onnx.save(mlp_model(), str(path))
    marker = tmp_path / "running"
    plugin = tmp_path / "slow.py"
    plugin.write_text(_SLOW_PASS.format(marker=str(marker)))
    out = tmp_path / "build"
    proc = _start(["compile", str(path), "--plugin", str(plugin), "--passes", "canonicalize,slow", "-o", str(out)])
    _wait_for(marker.exists, proc)
    assert list(tmp_path.glob(".build.tmp-*"))  # the staging folder exists while it runs
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and "Traceback" not in err and err.strip() == "terminated", err
    assert not out.exists() and not list(tmp_path.glob(".build*"))


_SLOW_SAVE = '''
import sys, time
from pathlib import Path
import onnx
real = onnx.save_model
def save_model(model, f, *a, **k):
    real(model, f, *a, **k)
    if "edgefc-quant-" in str(f):
        Path({marker!r}).touch()
        time.sleep(60)
onnx.save_model = save_model
from edgefc.cli import main
main(sys.argv[1:])
'''


def test_sigterm_during_quantization_removes_its_temporary_folder(tmp_path):
    path = tmp_path / "mlp.onnx"
    onnx.save(mlp_model(), str(path))
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    marker = tmp_path / "quantizing"
    out = tmp_path / "build"
    env = dict(os.environ, TMPDIR=str(tmp))
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_SAVE.format(marker=str(marker)), "compile", str(path),
                             "--precision", "w8a16", "--calib-samples", "1", "--eval-samples", "1", "-o", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    _wait_for(marker.exists, proc)
    assert list(tmp.glob("edgefc-quant-*"))
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and "Traceback" not in err, err
    assert not list(tmp.glob("edgefc-*")), list(tmp.iterdir())
    assert not out.exists() and not list(tmp_path.glob(".build*"))


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_next_run_removes_stale_staging_folders_of_killed_runs(tmp_path):
    path = tmp_path / "mlp.onnx"
    onnx.save(mlp_model(), str(path))
    dead = _dead_pid()
    stale = [tmp_path / f".build.tmp-{dead}-abc123", tmp_path / f".build.old-{dead}"]
    live = tmp_path / f".build.tmp-{os.getppid()}-def456"  # a run that is still going: kept
    other = tmp_path / f".other.tmp-{dead}-ghi789"  # another output's: not ours to remove
    for p in [*stale, live, other]:
        (p / "sub").mkdir(parents=True)
    edgefc.compile(path, None, passes=["canonicalize"], output=tmp_path / "build")
    assert (tmp_path / "build" / "model.onnx").is_file()
    assert not any(p.exists() for p in stale) and live.exists() and other.exists()


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_build_folder_honours_the_umask(tmp_path, mask):
    path = tmp_path / "mlp.onnx"
    onnx.save(mlp_model(), str(path))
    old = os.umask(mask)
    try:
        edgefc.compile(path, None, passes=["canonicalize"], output=tmp_path / "build")
    finally:
        os.umask(old)
    assert (tmp_path / "build").stat().st_mode & 0o777 == 0o777 & ~mask


def test_cli_build_folder_is_readable_by_others(tmp_path):
    path = tmp_path / "mlp.onnx"
    onnx.save(mlp_model(), str(path))
    out = tmp_path / "build"
    rc, text = run_cli("compile", str(path), "--passes", "canonicalize", "-o", str(out))
    assert rc == 0, text
    mask = os.umask(0)
    os.umask(mask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~mask


# --- quantization leaves what it cannot quantize as it is -----------------------------------------

@pytest.mark.parametrize("precision", ["w8a16", "fp16"])
def test_model_without_fp32_tensors_is_left_as_it_is(tmp_path, precision):
    model = _model([helper.make_node("BitShift", ["x", "s"], ["y"], direction="LEFT")],
                   [_vi("x", [3], TensorProto.UINT32), _vi("s", [3], TensorProto.UINT32)], [_vi("y", [3], TensorProto.UINT32)], 17)
    path = tmp_path / "int.onnx"
    onnx.save(model, str(path))
    result = edgefc.compile(path, "exynos2400", output=tmp_path / "build", options={"precision": precision})
    assert "no FP32 tensors" in result.report["quantization"]["reason"]
    feeds = {"x": np.array([1, 2, 3], np.uint32), "s": np.array([1, 2, 3], np.uint32)}
    ort.check(ort.run(str(path), feeds), ort.run(str(tmp_path / "build" / "model.onnx"), feeds), 0.0)


def test_fp16_conversion_keeps_each_output_type(tmp_path):
    """An FP32 model with one FP16 output: after --precision fp16 that output is still FP16."""
    nodes = [helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Cast", ["y"], ["h"], to=TensorProto.FLOAT16)]
    model = _model(nodes, [_vi("x", [2, 3])], [_vi("y", [2, 3]), _vi("h", [2, 3], TensorProto.FLOAT16)], 17)
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    edgefc.compile(path, "exynos2400", output=tmp_path / "build", options={"precision": "fp16", "eval_samples": 0})
    feeds = {"x": np.linspace(-2, 2, 6, dtype=np.float32).reshape(2, 3)}
    ort.check(ort.run(str(path), feeds), ort.run(str(tmp_path / "build" / "model.onnx"), feeds), 1e-3)
