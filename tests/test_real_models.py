"""Real trained models (issue 22): canonical folds, the NPU's op kinds as target data, the new
kernels priced and built, control flow priced by its bodies, ``--const``, shape conflicts.

Every model here is a small hand-built ONNX graph with the structure the trained models have
(``bench/wheel_models.py`` runs the trained ones)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper

import edgefc
from edgefc import ort

RNG = np.random.default_rng(0)


def _const(name, arr):
    return numpy_helper.from_array(np.asarray(arr), name)


def _model(nodes, inputs, outputs, inits=(), opset=17):
    graph = helper.make_graph(nodes, "m", inputs, outputs, list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _vi(name, shape, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


def _compile(tmp_path, model, options=None, **kw):
    """Compile ``model`` (fp32, no MLT unless ``options`` say otherwise); returns (result, source path)."""
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    opts = {"precision": "fp32", "no_mlt": True, **(options or {})}
    return edgefc.compile(path, "exynos2400", output=tmp_path / "build", options=opts, **kw), path


def _matches(tmp_path, path, feeds, tol=1e-5):
    ort.check(ort.run(str(path), feeds), ort.run(str(tmp_path / "build" / "model.onnx"), feeds), tol)


# --- canonicalize ---------------------------------------------------------------------------------

def test_inference_dropout_is_removed(tmp_path):
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Dropout", ["r"], ["d"]),
             helper.make_node("Dropout", ["d", "ratio"], ["y", "mask"])]
    model = _model(nodes, [_vi("x", [2, 3])], [_vi("y", [2, 3])], [_const("ratio", np.array(0.3, np.float32))])
    result, path = _compile(tmp_path, model)
    assert [n.op for n in result.graph.nodes] == ["Relu"]
    _matches(tmp_path, path, {"x": RNG.standard_normal((2, 3)).astype(np.float32)})


def _bn_consts(prefix, c):
    return [_const(f"{prefix}{k}", v.astype(np.float32)) for k, v in
            (("s", RNG.random(c) + 0.5), ("b", RNG.standard_normal(c)), ("m", RNG.standard_normal(c)), ("v", RNG.random(c) + 0.5))]


def _bn(x, y, prefix, **attrs):
    return helper.make_node("BatchNormalization", [x] + [f"{prefix}{k}" for k in "sbmv"], [y], **attrs)


def fold_model() -> onnx.ModelProto:
    """Conv -> BN -> Mul(per channel) -> Add(scalar) -> Sub -> Div, ConvTranspose (2 groups) -> BN,
    Gemm (transB) -> BN; a BN on the graph input; a conv read twice, a spatially varying Add, c - y."""
    f = np.float32
    inits = [_const("w", RNG.standard_normal((6, 3, 3, 3)).astype(f)), _const("wb", RNG.standard_normal(6).astype(f)),
             _const("wt", RNG.standard_normal((6, 3, 2, 2)).astype(f)), _const("fc", RNG.standard_normal((5, 24)).astype(f)),
             _const("fcb", RNG.standard_normal(5).astype(f)), _const("per", RNG.standard_normal((6, 1, 1)).astype(f)),
             _const("two", np.array(2.0, f)), _const("sub", RNG.standard_normal((1, 6, 1, 1)).astype(f)),
             _const("div", (RNG.random((6, 1, 1)) + 0.5).astype(f)), _const("spatial", RNG.standard_normal((1, 1, 6, 6)).astype(f)),
             _const("shape", np.array([1, 24], np.int64)), _const("w2", RNG.standard_normal((4, 6, 1, 1)).astype(f)),
             *_bn_consts("a", 6), *_bn_consts("t", 6), *_bn_consts("g", 5), *_bn_consts("i", 3)]
    nodes = [_bn("x", "xn", "i"),
             helper.make_node("Conv", ["xn", "w", "wb"], ["c"], pads=[1, 1, 1, 1]), _bn("c", "cn", "a"),
             helper.make_node("Mul", ["per", "cn"], ["m"]), helper.make_node("Add", ["m", "two"], ["a"]),
             helper.make_node("Sub", ["a", "sub"], ["s"]), helper.make_node("Div", ["s", "div"], ["d"]),
             helper.make_node("ConvTranspose", ["d", "wt"], ["ct"], strides=[2, 2], group=2), _bn("ct", "ctn", "t"),
             helper.make_node("Conv", ["d", "w2"], ["c2"]),           # read by two nodes: nothing folds into it
             helper.make_node("Add", ["c2", "two"], ["c2a"]), helper.make_node("Relu", ["c2"], ["c2r"]),
             helper.make_node("Conv", ["d", "w2"], ["c3"]), helper.make_node("Add", ["c3", "spatial"], ["c3a"]),
             helper.make_node("Conv", ["d", "w2"], ["c4"]), helper.make_node("Sub", ["two", "c4"], ["c4s"]),
             helper.make_node("GlobalAveragePool", ["d"], ["p"]), helper.make_node("Reshape", ["p", "shape"], ["fl"]),
             helper.make_node("Gemm", ["fl", "fc", "fcb"], ["g"], transB=1, beta=0.5), _bn("g", "y", "g")]
    outs = [_vi("ctn", [1, 6, 12, 12]), _vi("c2a", [1, 4, 6, 6]), _vi("c2r", [1, 4, 6, 6]), _vi("c3a", [1, 4, 6, 6]),
            _vi("c4s", [1, 4, 6, 6]), _vi("y", [1, 5])]
    inits[3] = _const("fc", RNG.standard_normal((5, 6)).astype(f))
    inits[10] = _const("shape", np.array([1, 6], np.int64))
    return _model(nodes, [_vi("x", [1, 3, 6, 6])], outs, inits)


def test_batchnorm_and_constant_scale_shift_fold_into_the_convolution(tmp_path):
    """The folds of :func:`fold_model` all happen, the graph input's BN becomes a Mul and an Add,
    and a conv read twice, a spatially varying Add and c - y do not fold."""
    result, path = _compile(tmp_path, fold_model())
    ops = [n.op for n in result.graph.nodes]
    assert "BatchNormalization" not in ops and "Div" not in ops and ops.count("Mul") == 1, ops
    assert result.report["canonicalize"]["folded"] == {"batchnorm_to_scale_shift": 1, "batchnorm_into_conv": 2,
                                                       "scale_shift_into_conv": 4, "batchnorm_into_gemm": 1}
    assert ops.count("Add") == 3 and ops.count("Sub") == 1   # BN shift, the read-twice and spatial Adds; c - y
    for seed in (0, 1):
        _matches(tmp_path, path, {"x": np.random.default_rng(seed).standard_normal((1, 3, 6, 6)).astype(np.float32)})


# --- the NPU's op kinds: placement, pricing, TVM build --------------------------------------------

def cnn_ops_model() -> onnx.ModelProto:
    """One node of every op kind trained CNNs use beyond the convolution, each output a graph
    output (each kernel is checked on its own); the ``host_*`` nodes sit outside their kernel's
    limits (the target file's [ops] entries)."""
    c = _const
    f32 = np.float32
    inits = [c("w", RNG.standard_normal((8, 4, 3, 3)).astype(f32)), c("wt", RNG.standard_normal((8, 2, 3, 3)).astype(f32)),
             c("wt1", RNG.standard_normal((6, 3, 4)).astype(f32)), c("w1", RNG.standard_normal((6, 4, 3)).astype(f32)),
             c("slope", RNG.random((8, 1, 1)).astype(f32)), c("lo", np.array(0, f32)), c("hi", np.array(6, f32)),
             c("pads", np.array([0, 0, 1, 2, 0, 0, 2, 1], np.int64)), c("pads1", np.array([0, 0, 2, 0, 0, 1], np.int64)),
             c("nine", np.array(9, f32)), c("neg", np.array([0, 0, -1, 0, 0, 0, 0, 0], np.int64)),
             c("up2", np.array([1, 1, 2, 2], f32)), c("size", np.array([1, 8, 13, 11], np.int64))]
    nodes = [helper.make_node("Conv", ["x", "w"], ["conv"], pads=[1, 1, 1, 1]),
             helper.make_node("Clip", ["conv", "lo", "hi"], ["relu6"]),
             helper.make_node("MaxPool", ["conv"], ["maxpool"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
             helper.make_node("AveragePool", ["conv"], ["avgpool"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("AveragePool", ["conv"], ["avgpool_incl"], kernel_shape=[3, 2], strides=[2, 2], pads=[1, 0, 1, 1],
                              count_include_pad=1),
             helper.make_node("HardSwish", ["conv"], ["hardswish"]),
             helper.make_node("HardSigmoid", ["conv"], ["hardsigmoid"], alpha=0.2),
             helper.make_node("LeakyRelu", ["conv"], ["leaky"], alpha=0.1),
             helper.make_node("PRelu", ["conv", "slope"], ["prelu"]),
             helper.make_node("Max", ["conv", "relu6", "slope"], ["max3"]),
             helper.make_node("Min", ["conv", "leaky"], ["min2"]),
             helper.make_node("Sum", ["conv", "relu6", "leaky"], ["sum3"]),
             helper.make_node("ConvTranspose", ["conv", "wt"], ["deconv"], strides=[2, 2], pads=[1, 1, 1, 1],
                              output_padding=[1, 0], group=2),
             helper.make_node("Pad", ["conv", "pads"], ["pad0"], mode="constant"),
             helper.make_node("Pad", ["conv", "pads"], ["padr"], mode="reflect"),
             helper.make_node("Pad", ["conv", "pads"], ["pade"], mode="edge"),
             helper.make_node("DepthToSpace", ["conv"], ["d2s_crd"], blocksize=2, mode="CRD"),
             helper.make_node("DepthToSpace", ["conv"], ["d2s_dcr"], blocksize=2, mode="DCR"),
             helper.make_node("Resize", ["conv", "", "up2"], ["bilinear"], mode="linear"),
             helper.make_node("Resize", ["conv", "", "", "size"], ["bilinear_ac"], mode="linear",
                              coordinate_transformation_mode="align_corners"),
             helper.make_node("Resize", ["conv", "", "", "size"], ["bilinear_pt"], mode="linear",
                              coordinate_transformation_mode="pytorch_half_pixel"),
             helper.make_node("Resize", ["conv", "", "up2"], ["nearest_asym"], mode="nearest",
                              coordinate_transformation_mode="asymmetric", nearest_mode="floor"),
             helper.make_node("GlobalMaxPool", ["conv"], ["gmp"]),
             helper.make_node("GlobalAveragePool", ["conv"], ["gap"]),
             helper.make_node("Conv", ["x1", "w1"], ["conv1d"], pads=[1, 1]),
             helper.make_node("MaxPool", ["conv1d"], ["maxpool1d"], kernel_shape=[2], strides=[2]),
             helper.make_node("AveragePool", ["conv1d"], ["avgpool1d"], kernel_shape=[3], pads=[1, 1]),
             helper.make_node("ConvTranspose", ["conv1d", "wt1"], ["deconv1d"], strides=[2], pads=[1, 1]),
             helper.make_node("Pad", ["conv1d", "pads1"], ["pad1d"], mode="reflect"),
             # outside the kernels' limits: the host runs them
             helper.make_node("MaxPool", ["conv"], ["host_ceil"], kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1),
             helper.make_node("Pad", ["conv", "pads", "nine"], ["host_pad9"], mode="constant"),
             helper.make_node("Pad", ["conv", "neg"], ["host_crop"], mode="constant"),
             helper.make_node("Clip", ["conv", "x_lo"], ["host_clip"]),
             helper.make_node("Resize", ["conv", "", "up2"], ["host_cubic"], mode="cubic")]
    for n in nodes:
        n.name = n.output[0]
    outs = [o for n in nodes for o in n.output]
    graph = helper.make_graph(nodes, "cnn_ops", [_vi("x", [1, 4, 9, 10]), _vi("x1", [1, 4, 12]), _vi("x_lo", [])],
                              [_vi("conv", [1, 8, 9, 10])], inits)
    model = onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))
    model.graph.value_info.append(model.graph.output[0])
    del model.graph.output[:]
    model.graph.output.extend(next(v for v in model.graph.value_info if v.name == o) for o in outs)
    onnx.checker.check_model(model, full_check=True)
    return model


HOST = {"host_ceil": "MaxPool ceil_mode=1", "host_pad9": "non-zero input 2", "host_crop": "negative input 1",
        "host_clip": "run-time input 1", "host_cubic": "Resize mode=cubic"}


def test_cnn_op_kinds_run_on_the_npu_priced_and_built(tmp_path):
    """Every op kind of :func:`cnn_ops_model` is placed where its [ops] entry says, priced by the
    shared vector formula (pooling per window tap), and the TVM build partitions the same way;
    every output matches onnxruntime (NPU kernels and host fallbacks)."""
    from edgefc.targets import tvm_build, tvm_lowering, tvm_runtime

    model = cnn_ops_model()
    result, path = _compile(tmp_path, model)
    target = edgefc.get_target("exynos2400")
    program = target.lower(result.graph)
    placed = {op.name: op.engine for op in program.ops}
    for name, why in HOST.items():
        assert placed[name] == "host" and why in program.host_reasons[name], (name, program.host_reasons.get(name))
    npu = {n for n, e in placed.items() if e != "host"}
    assert npu == set(placed) - set(HOST), sorted(set(placed) - npu)
    assert placed["deconv"] == placed["conv1d"] == placed["deconv1d"] == "tensor"
    # pooling: one pass of its class per window tap over the output (and the average's scale)
    vec = {c.op: c for c in program.commands if c.kind == "vector"}
    assert dict(vec["maxpool"].passes) == {"max": 9} and vec["maxpool"].elements == 8 * 5 * 5
    assert dict(vec["avgpool"].passes) == {"reduce": 9, "arith": 1}
    assert dict(vec["bilinear"].passes) == {"arith": 4} and dict(vec["nearest_asym"].passes) == {"arith": 1}
    assert dict(vec["max3"].passes) == {"max": 2} and dict(vec["relu6"].passes) == {"max": 2}
    # ConvTranspose MACs: every input position times its kernel taps, per group
    deconv = next(c for c in program.commands if c.op == "deconv" and c.kind == "tensor")
    assert deconv.macs == 9 * 10 * 2 * (4 * 9 * 2)
    # the TVM build: the same partition, and the same numbers as onnxruntime
    lowering = tvm_lowering.lower(edgefc.ir.to_model(result.graph), program)
    part = {o["name"]: o for o in lowering.partition["ops"]}
    assert lowering.partition["disagreements"] == []
    for name, engine in placed.items():
        assert part[name]["where"] == ("host" if engine == "host" else "npu"), part[name]
    (tmp_path / "tvm").mkdir()
    tvm_build.write_tvm_files(lowering, tmp_path / "tvm", aarch64=False)
    runner = tvm_runtime.load_build(tmp_path / "tvm")
    feeds = {"x": RNG.standard_normal((1, 4, 9, 10)).astype(np.float32), "x1": RNG.standard_normal((1, 4, 12)).astype(np.float32),
             "x_lo": np.array(-0.5, np.float32)}
    ref, got = ort.run(str(path), feeds), runner.run(feeds)
    for name in ref:
        assert np.allclose(got[name], ref[name], rtol=1e-4, atol=1e-4 * np.abs(ref[name]).max()), name
    _matches(tmp_path, path, feeds)


# --- the [ops] table of the target file -----------------------------------------------------------

def _target_text():
    from edgefc.targets import TARGET_DIR

    return (TARGET_DIR / "exynos2400.toml").read_text()


def _load(tmp_path, text):
    from edgefc.targets.npu import NpuTarget

    p = tmp_path / "npu.toml"
    p.write_text(text)
    return NpuTarget.from_toml(p)


def test_placement_reads_the_target_files_op_table(tmp_path):
    """Dropping MaxPool from [ops] puts it on the host ("no NPU kernel"); every entry has a source."""
    text = _target_text()
    target = _load(tmp_path, text)
    assert all(k.source for k in target.arch.ops.kinds.values()) and target.arch.ops.engine("MaxPool") == "vector"
    line = next(x for x in text.splitlines() if x.startswith("MaxPool = "))
    without = _load(tmp_path, text.replace(line + "\n", ""))
    model = _model([helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[2, 2], name="pool")],
                   [_vi("x", [1, 8, 8, 8])], [_vi("y", [1, 8, 4, 4])])
    onnx.save(model, str(tmp_path / "m.onnx"))
    graph = edgefc.compile(tmp_path / "m.onnx", target, options={"precision": "fp32"}).graph
    assert target.lower(graph).placement["pool"] == "vector"
    program = without.lower(graph)
    assert program.placement["pool"] == "host" and program.host_reasons["pool"] == "no NPU kernel for MaxPool"


def test_bad_op_table_entries_are_named(tmp_path):
    from edgefc.errors import TargetError

    text = _target_text()
    start = text.index("\n[ops]")
    with pytest.raises(TargetError, match="no table 'ops'"):
        _load(tmp_path, text[:start] + "\n")
    cases = {'Relu = { engine = "tensor", source = "x" }': "counts tensor-engine work only",
             'Relu = { engine = "gpu", source = "x" }': "engine must be one of",
             'Relu = { engine = "vector" }': "source must say where",
             'Relu = { engine = "vector", source = "x", kernels = 2 }': "unknown field 'ops.Relu.kernels'",
             'Relu = { engine = "vector", source = "x", spatial_ranks = [-1] }': "ops.Relu.spatial_ranks",
             'Relu = { engine = "vector", source = "x", attrs = { alpha = 1 } }': "attrs must be a table"}
    line = next(x for x in text.splitlines() if x.startswith("Relu = "))
    for bad, needle in cases.items():
        with pytest.raises(TargetError, match=needle):
            _load(tmp_path, text.replace(line, bad))


def test_profile_groups_host_ops_by_type_with_the_reason(tmp_path):
    """``edgefc profile`` prints, under its table, the host ops by op type with placement's reason
    and their share of the modelled time; profile.json has the same (``host_ops``)."""
    import json

    from tests.cli import run_cli

    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("MaxPool", ["c"], ["p"], kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1),
             helper.make_node("Atan", ["p"], ["a"]), helper.make_node("Atan", ["a"], ["y"])]
    model = _model(nodes, [_vi("x", [1, 4, 9, 9])], [_vi("y", [1, 8, 5, 5])],
                   [_const("w", RNG.standard_normal((8, 4, 3, 3)).astype(np.float32))])
    _compile(tmp_path, model)
    host = json.loads((tmp_path / "build" / "profile.json").read_text())["host_ops"]
    by = {g["op_type"]: g for g in host["by_op_type"]}
    assert host["count"] == 3 and set(by) == {"MaxPool", "Atan"}
    assert by["Atan"]["count"] == 2 and by["Atan"]["reasons"] == {"no NPU kernel for Atan": 2}
    assert list(by["MaxPool"]["reasons"]) == ["MaxPool ceil_mode=1 (the NPU's kernel takes 0)"]
    assert 0 < by["MaxPool"]["share"] < host["share"] <= 1 and host["share"] == pytest.approx(
        by["MaxPool"]["share"] + by["Atan"]["share"], abs=2e-4)
    rc, out = run_cli("profile", str(tmp_path / "build"))
    assert rc == 0, out
    lines = out.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("host ops: 3 ("))
    assert "of the modelled time" in lines[at]
    assert lines[at + 1].split()[:3] == ["Atan", "2", "ops"] and lines[at + 1].endswith("no NPU kernel for Atan")
    assert lines[at + 2].split()[:3] == ["MaxPool", "1", "op"] and "ceil_mode=1" in lines[at + 2]


# --- control flow, --const, shape conflicts --------------------------------------------------------

def _branch(name, scale):
    """A branch graph: y = Conv(x, w) * scale (x and w from the outer scope)."""
    mul = helper.make_node("Mul", [f"{name}_c", f"{name}_k"], [f"{name}_y"])
    conv = helper.make_node("Conv", ["x", "w"], [f"{name}_c"], pads=[1, 1, 1, 1])
    k = _const(f"{name}_k", np.array(scale, np.float32))
    return helper.make_graph([conv, mul], name, [], [_vi(f"{name}_y", [1, 4, 6, 6])], [k])


def if_model(cond_input: bool = True) -> onnx.ModelProto:
    """x -> If(sr == 16000: Conv(x) * 2, else Conv(x) * 3) -> Relu; ``sr`` an int64 scalar input
    (with ``cond_input`` False the condition is a graph input itself)."""
    w = _const("w", RNG.standard_normal((4, 3, 3, 3)).astype(np.float32))
    nodes = []
    if cond_input:
        nodes.append(helper.make_node("Equal", ["sr", "rate"], ["cond"]))
    nodes += [helper.make_node("If", ["cond"], ["b"], then_branch=_branch("then", 2.0), else_branch=_branch("else", 3.0)),
              helper.make_node("Relu", ["b"], ["y"])]
    inputs = [_vi("x", [1, 3, 6, 6]), _vi("sr", [], TensorProto.INT64) if cond_input else _vi("cond", [], TensorProto.BOOL)]
    return _model(nodes, inputs, [_vi("y", [1, 4, 6, 6])], [w, _const("rate", np.array(16000, np.int64))])


def test_const_fixes_an_input_and_canonicalize_folds_the_if(tmp_path):
    model = if_model()
    result, path = _compile(tmp_path, model, consts={"sr": "16000"})
    ops = [n.op for n in result.graph.nodes]
    assert "If" not in ops and "Equal" not in ops and "Conv" in ops, ops
    assert [t.name for t in result.graph.inputs] == ["x"] and result.report["constants"] == {"sr": [16000]}
    x = RNG.standard_normal((1, 3, 6, 6)).astype(np.float32)
    ref = ort.run(str(path), {"x": x, "sr": np.array(16000, np.int64)})
    ort.check(ref, ort.run(str(tmp_path / "build" / "model.onnx"), {"x": x}), 1e-5)


def test_const_user_errors_are_one_line(tmp_path):
    from tests.cli import assert_user_error, run_cli

    path = tmp_path / "m.onnx"
    onnx.save(if_model(), str(path))
    cases = {("--const", "rate=1"): "the model's inputs are: x, sr", ("--const", "sr=fast"): "not a number",
             ("--const", "sr=16000.5"): "give whole numbers", ("--const", "sr=1,2"): "2 values for an input of 1",
             ("--const", "sr"): "expected NAME=VALUE", ("--const", "sr=1", "--const", "sr=2"): "given twice"}
    for args, needle in cases.items():
        rc, out = run_cli("compile", str(path), *args, "--precision", "fp32", "-o", str(tmp_path / "o"))
        assert_user_error(rc, out, needle)
        assert not (tmp_path / "o").exists()


def test_declared_output_shape_that_the_graph_contradicts_is_a_warning(tmp_path):
    """The output is declared [1, ?] but computes [2, 3, 4] (onnxruntime only warns): the build
    uses the inferred shape, report.json and the summary say so."""
    from tests.cli import run_cli

    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Reshape", ["r", "shape"], ["y"])]
    model = _model(nodes, [_vi("x", [2, 12])], [_vi("y", [1, "seq"])], [_const("shape", np.array([2, 3, 4], np.int64))])
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    rc, out = run_cli("compile", str(path), "--precision", "fp32", "-o", str(tmp_path / "build"))
    assert rc == 0, out
    assert "warning:   output 'y' is declared [1, ?] but the graph computes [2, 3, 4]" in out
    import json

    report = json.loads((tmp_path / "build" / "report.json").read_text())
    assert report["canonicalize"]["warnings"][0].startswith("output 'y' is declared [1, ?]")
    assert report["outputs"][0]["shape"] == [2, 3, 4]
    x = RNG.standard_normal((2, 12)).astype(np.float32)
    assert ort.run(str(tmp_path / "build" / "model.onnx"), {"x": x})["y"].shape == (2, 3, 4)


def _dear_if_model() -> onnx.ModelProto:
    """If(cond input): then = Conv * 2, else = Conv -> Conv (twice the MACs)."""
    model = if_model(cond_input=False)
    node = model.graph.node[0]
    els = next(a.g for a in node.attribute if a.name == "else_branch")
    w2 = _const("w_else2", RNG.standard_normal((4, 4, 3, 3)).astype(np.float32))
    els.initializer.append(w2)
    els.node.append(helper.make_node("Conv", ["else_y", "w_else2"], ["else_z"], pads=[1, 1, 1, 1]))
    del els.output[:]
    els.output.append(_vi("else_z", [1, 4, 6, 6]))
    return model


def _loop_model(trips: int) -> onnx.ModelProto:
    """Loop(M = trips): v <- Relu(Conv(v, w)); a Scan over the 5 rows of s: acc <- acc + row * 2."""
    w = _const("w", RNG.standard_normal((4, 4, 3, 3)).astype(np.float32))
    body = helper.make_graph(
        [helper.make_node("Identity", ["c_in"], ["c_out"]), helper.make_node("Conv", ["v_in", "w"], ["vc"], pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["vc"], ["v_out"])], "body",
        [_vi("i", [], TensorProto.INT64), _vi("c_in", [], TensorProto.BOOL), _vi("v_in", [1, 4, 6, 6])],
        [_vi("c_out", [], TensorProto.BOOL), _vi("v_out", [1, 4, 6, 6])])
    scan = helper.make_graph(
        [helper.make_node("Mul", ["row", "two"], ["r2"]), helper.make_node("Add", ["acc_in", "r2"], ["acc_out"])], "scan",
        [_vi("acc_in", [8]), _vi("row", [8])], [_vi("acc_out", [8])], [_const("two", np.array(2.0, np.float32))])
    nodes = [helper.make_node("Loop", ["M", "keep", "x"], ["y"], body=body),
             helper.make_node("Scan", ["acc0", "s"], ["acc"], body=scan, num_scan_inputs=1)]
    return _model(nodes, [_vi("x", [1, 4, 6, 6]), _vi("s", [5, 8])], [_vi("y", [1, 4, 6, 6]), _vi("acc", [8])],
                  [w, _const("M", np.array(trips, np.int64)), _const("keep", np.array(True)),
                   _const("acc0", np.zeros(8, np.float32))])


def test_if_is_priced_by_its_dearer_branch_and_says_so(tmp_path):
    result, path = _compile(tmp_path, _dear_if_model())
    target = edgefc.get_target("exynos2400")
    prof = target.profile(result.graph)
    row = next(o for o in prof.ops if o.op_type == "If")
    assert row.engine == "host" and row.macs == 36 * 4 * 27 + 36 * 4 * 36   # the else branch's two Convs
    note = prof.program.host_reasons[row.name]
    assert note.startswith("If: priced by its dearer branch, else_branch (") and "known only at run time" in note
    assert row.cycles > target.arch.host.sync_cycles   # the decision and the branch's work
    x = RNG.standard_normal((1, 3, 6, 6)).astype(np.float32)
    for cond in (True, False):
        _matches(tmp_path, path, {"x": x, "cond": np.array(cond)})
    # a constant condition the graph still holds (canonicalize inlines it): the branch taken
    graph = result.graph
    graph.nodes[0].inputs[0] = gs.Constant("c_true", np.array(True))
    taken = target.lower(graph)
    assert "the branch it takes, then_branch" in taken.host_reasons[row.name]
    assert sum(c.macs for c in taken.commands if c.op == row.name) == 36 * 4 * 27


def test_loop_and_scan_are_priced_by_their_bodies(tmp_path):
    result, path = _compile(tmp_path, _loop_model(3))
    prof = edgefc.get_target("exynos2400").profile(result.graph)
    rows = {o.op_type: o for o in prof.ops}
    assert rows["Loop"].macs == 3 * 36 * 4 * 36
    notes = prof.program.host_reasons
    assert notes[rows["Loop"].name] == ("Loop: priced as 3 iterations of its body (the trip count is a constant); the "
                                        "host checks the body's condition every iteration")
    syncs = [c for c in prof.program.commands if c.op == rows["Loop"].name and c.kind == "host"]
    assert len(syncs) == 1 and syncs[0].repeat == 3
    assert notes[rows["Scan"].name] == "Scan: priced as 5 iterations of its body (the scan axis length)"
    scan_vec = [c for c in prof.program.commands if c.op == rows["Scan"].name and c.kind == "vector"]
    assert scan_vec and all(c.repeat == 5 for c in scan_vec)
    _matches(tmp_path, path, {"x": RNG.standard_normal((1, 4, 6, 6)).astype(np.float32),
                              "s": RNG.standard_normal((5, 8)).astype(np.float32)})


def test_quantize_leaves_a_branch_with_a_pad_intact_and_says_so(tmp_path):
    """W8A16 of a model whose If branch holds a Pad and reads an outer input: the branch is left
    as it is (it used to lose its outer input: 'onnxruntime cannot load the reference model'),
    and report.json names the passes that left it."""
    model = _dear_if_model()
    then = next(a.g for a in model.graph.node[0].attribute if a.name == "then_branch")
    conv, mul = onnx.NodeProto(), onnx.NodeProto()
    conv.CopyFrom(then.node[0])
    mul.CopyFrom(then.node[1])
    mul.input[0] = "then_cp"
    del then.node[:]
    then.node.extend([conv, helper.make_node("Pad", ["then_c", "then_pads"], ["then_cp"], mode="constant"), mul])
    then.initializer.append(_const("then_pads", np.zeros(8, np.int64)))
    result, path = _compile(tmp_path, model, {"precision": "w8a16", "eval_samples": 2})
    sub = result.report["subgraphs"]
    assert sub["nodes"] == [n.name for n in result.graph.nodes if n.op == "If"] and "quantize" in sub["left_as_they_are_by"]
    assert "canonicalize" not in sub["left_as_they_are_by"]
    x = RNG.standard_normal((1, 3, 6, 6)).astype(np.float32)
    ref = ort.run(str(path), {"x": x, "cond": np.array(True)})["y"]
    got = ort.run(str(tmp_path / "build" / "model.onnx"), {"x": x, "cond": np.array(True)})["y"]
    assert np.abs(got - ref).max() <= 1e-2 * np.abs(ref).max()


def test_emit_tvm_refuses_control_flow_in_one_line(tmp_path):
    from tests.cli import assert_user_error, run_cli

    path = tmp_path / "m.onnx"
    onnx.save(_dear_if_model(), str(path))
    rc, out = run_cli("compile", str(path), "--precision", "fp32", "--emit", "tvm", "-o", str(tmp_path / "o"))
    assert_user_error(rc, out, "the TVM lowering does not take control flow (If node")
    assert not (tmp_path / "o").exists()


def test_const_inlines_a_branch_with_computed_shapes(tmp_path):
    """A branch whose shapes are computed (a Reshape to Shape(x): symbolic while inside the If)
    gets static ones once --const inlines it."""
    then = helper.make_graph([helper.make_node("Shape", ["x"], ["t_s"]), helper.make_node("Reshape", ["x", "t_s"], ["t_r"]),
                              helper.make_node("Relu", ["t_r"], ["t_y"])], "then", [], [_vi("t_y", ["a", "b"])])
    other = helper.make_graph([helper.make_node("Neg", ["x"], ["e_y"])], "else", [], [_vi("e_y", ["a", "b"])])
    nodes = [helper.make_node("Equal", ["sr", "rate"], ["cond"]),
             helper.make_node("If", ["cond"], ["b"], then_branch=then, else_branch=other),
             helper.make_node("Sigmoid", ["b"], ["y"])]
    model = _model(nodes, [_vi("x", ["n", 5]), _vi("sr", [], TensorProto.INT64)], [_vi("y", ["a", "b"])],
                   [_const("rate", np.array(16000, np.int64))])
    result, path = _compile(tmp_path, model, shapes={"x": (2, 5)}, consts={"sr": 16000})
    assert [n.op for n in result.graph.nodes] == ["Relu", "Sigmoid"]
    x = RNG.standard_normal((2, 5)).astype(np.float32)
    ort.check(ort.run(str(path), {"x": x, "sr": np.array(16000, np.int64)}),
              ort.run(str(tmp_path / "build" / "model.onnx"), {"x": x}), 1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ppocr-det", "ppocr-cls", "layout-cdla", "ddddocr-ocr", "silero-vad"])
def test_trained_models_from_wheels(name, tmp_path):
    """bench/wheel_models.py's check of one trained model: the fp32 build matches onnxruntime, no
    host op in a CNN, the default pipeline compiles or refuses in one line (exit 2, never an
    internal error). The wheel is fetched (``pip download``) into $EDGEFC_WHEEL_CACHE, else the
    bench's default cache, unless it is there already."""
    import importlib.util
    import os
    import shutil
    from pathlib import Path

    cache = Path(os.environ.get("EDGEFC_WHEEL_CACHE") or Path.home() / ".cache" / "edgefc" / "wheels")
    spec = importlib.util.spec_from_file_location("wheel_models", Path(__file__).parents[1] / "bench" / "wheel_models.py")
    wm = importlib.util.module_from_spec(spec)
    import sys

    sys.modules.setdefault("wheel_models", wm)   # dataclasses look their module up
    spec.loader.exec_module(wm)
    model = {m.name: m for m in wm.MODELS}[name]
    row = wm.measure(model, cache, [shutil.which("edgefc") or "edgefc"])   # fetches the wheel when absent
    assert row["fp32"].get("matches"), row["fp32"]
    npu = row["npu"]
    assert not npu["internal_error"], npu
    assert npu["exit"] == 0 or (npu["exit"] == 2 and npu["message"].startswith("error: ")
                                and "\n" not in npu["message"]), npu
    if model.cnn:
        assert row["host_ops"] == 0 and row["host_share"] < 0.10, row


def test_clip_after_a_convolution_is_its_epilogue(tmp_path):
    """Conv -> Clip(0, 6) (ReLU6) and Gemm -> Clip(-1, 1) fold into FusedConv / FusedMatMul
    (activation "clip" with its bounds); a Clip with a run-time bound does not; the build and its
    TVM lowering (composite conv2d_bias_clip) match onnxruntime."""
    from edgefc.targets import tvm_build, tvm_lowering, tvm_runtime

    f = np.float32
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Clip", ["c", "zero", "six"], ["r6"]),
             helper.make_node("Conv", ["r6", "w2"], ["c2"]), helper.make_node("Clip", ["c2", "lo"], ["y2"]),
             helper.make_node("Flatten", ["r6"], ["fl"]), helper.make_node("Gemm", ["fl", "fc", "fb"], ["g"]),
             helper.make_node("Clip", ["g", "minus1", "one"], ["y"])]
    model = _model(nodes, [_vi("x", [1, 3, 4, 4]), _vi("lo", [])], [_vi("y", [1, 5]), _vi("y2", [1, 4, 4, 4])],
                   [_const("w", RNG.standard_normal((4, 3, 3, 3)).astype(f)), _const("b", RNG.standard_normal(4).astype(f)),
                    _const("w2", RNG.standard_normal((4, 4, 1, 1)).astype(f)), _const("fc", RNG.standard_normal((64, 5)).astype(f)),
                    _const("fb", RNG.standard_normal(5).astype(f)), _const("zero", np.array(0, f)), _const("six", np.array(6, f)),
                    _const("minus1", np.array(-1, f)), _const("one", np.array(1, f))])
    result, path = _compile(tmp_path, model)
    fused = {n.op: n for n in result.graph.nodes if n.op in ("FusedConv", "FusedMatMul")}
    assert fused["FusedConv"].attrs["activation"] == "clip" and (fused["FusedConv"].attrs["clip_min"],
                                                                  fused["FusedConv"].attrs["clip_max"]) == (0.0, 6.0)
    assert fused["FusedMatMul"].attrs["activation"] == "clip" and fused["FusedMatMul"].attrs["clip_min"] == -1.0
    assert [n.op for n in result.graph.nodes].count("Clip") == 1   # the run-time bound stays
    feeds = {"x": (3 * RNG.standard_normal((1, 3, 4, 4))).astype(f), "lo": np.array(0.5, f)}
    _matches(tmp_path, path, feeds)
    program = edgefc.get_target("exynos2400").lower(result.graph)
    lowering = tvm_lowering.lower(edgefc.ir.to_model(result.graph), program)
    assert lowering.partition["disagreements"] == []
    kinds = {c["composite"] for p in lowering.programs for c in p["commands"]}
    assert "edgefc_npu.conv2d_bias_clip" in kinds and "edgefc_npu.matmul_bias_clip" in kinds, kinds
    (tmp_path / "tvm").mkdir()
    tvm_build.write_tvm_files(lowering, tmp_path / "tvm", aarch64=False)
    ort.check(ort.run(str(path), feeds), tvm_runtime.load_build(tmp_path / "tvm").run(feeds), 1e-5)
