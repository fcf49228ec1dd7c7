"""TVM lowering (targets/tvm_*.py, edgefc run): import, NPU partitions, numerics, artifacts, errors.

Differential tests: every TVM build is run (Relax VM + the numpy NPU runtime) and compared with
onnxruntime on the unoptimised model (fp32: 1e-4 relative) or on the quantized model (QDQ, fp16).
Synthetic graphs carry the contract's fused ops as edgefc local functions with exact bodies, so
onnxruntime runs them and the converters are checked against those bodies.
"""

from __future__ import annotations

import collections
import json
import shutil
import struct

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto as TP
from onnx import helper as h
from onnx import numpy_helper as nh

import edgefc
from edgefc import composites, functions, ort
from edgefc.errors import BuildError
from edgefc.passes import fuse_epilogue, fuse_geglu, fuse_groupnorm, fuse_matmul
from edgefc.targets import tvm_build, tvm_lowering, tvm_patterns, tvm_runtime

OPSET = [h.make_opsetid("", 23), h.make_opsetid("edgefc", 1)]


# --- synthetic graphs with the contract's fused ops ------------------------------------------------

def _ref(name, typ):
    a = onnx.AttributeProto()
    a.name, a.ref_attr_name, a.type = name, name, typ
    return a


def _node(op, ins, outs, refs=(), domain="", **attrs):
    n = h.make_node(op, ins, outs, domain=domain, **attrs)
    n.attribute.extend(refs)
    return n


def _act(x, y, act):
    if act == "silu":
        return [_node("Sigmoid", [x], [x + "_s"]), _node("Mul", [x, x + "_s"], [y])]
    if act == "gelu":
        return [_node("Gelu", [x], [y])]
    return [_node("Identity", [x], [y])]


def _overload(act, residual):
    return f"{act}_residual" if residual else act


def _with_overload_doc(fn):
    # edgefc.functions keeps a function's overload in its doc string (graphsurgeon drops the field)
    fn.doc_string = f"[overload: {fn.overload}] {fn.name}"
    return fn


def _fused_conv_fn(act, residual):
    A = onnx.AttributeProto
    body = [_node("Conv", ["X", "W", "B"], ["z"], refs=[_ref("pads", A.INTS), _ref("strides", A.INTS),
                                                        _ref("dilations", A.INTS), _ref("group", A.INT)])]
    body += _act("z", "a" if residual else "Y", act)
    if residual:
        body.append(_node("Add", ["a", "residual"], ["Y"]))
    return _with_overload_doc(h.make_function(
        "edgefc", "FusedConv", ["X", "W", "B"] + (["residual"] if residual else []), ["Y"], body, OPSET[:1],
        attributes=["pads", "strides", "dilations", "group", "activation"], overload=_overload(act, residual)))


def _fused_matmul_fn(act, residual):
    body = [_node("MatMul", ["A", "B"], ["m"]), _node("Add", ["m", "bias"], ["z"])]
    body += _act("z", "a" if residual else "Y", act)
    if residual:
        body.append(_node("Add", ["a", "residual"], ["Y"]))
    return _with_overload_doc(h.make_function(
        "edgefc", "FusedMatMul", ["A", "B", "bias"] + (["residual"] if residual else []), ["Y"], body, OPSET[:1],
        attributes=["activation"], overload=_overload(act, residual)))


def _gn_silu_fn():
    A = onnx.AttributeProto
    body = [_node("GroupNormalization", ["X", "scale", "bias"], ["g"],
                  refs=[_ref("num_groups", A.INT), _ref("epsilon", A.FLOAT)]),
            _node("Sigmoid", ["g"], ["s"]), _node("Mul", ["g", "s"], ["Y"])]
    return h.make_function("edgefc", "GroupNormSiLU", ["X", "scale", "bias"], ["Y"], body, OPSET[:1],
                           attributes=["num_groups", "epsilon"])


def _geglu_fn():
    body = [_node("Split", ["X"], ["a", "b"], axis=-1, num_outputs=2), _node("Gelu", ["b"], ["g"]),
            _node("Mul", ["a", "g"], ["Y"])]
    return h.make_function("edgefc", "GeGLU", ["X"], ["Y"], body, OPSET[:1])


def _tiled_attention_fn():
    # The same result as Attention-23 (the converter, not this body, decides the tiles).
    A = onnx.AttributeProto
    body = [_node("Attention", ["Q", "K", "V"], ["Y"], refs=[_ref("q_num_heads", A.INT), _ref("kv_num_heads", A.INT),
                                                            _ref("scale", A.FLOAT), _ref("is_causal", A.INT)])]
    return h.make_function("edgefc", "TiledAttention", ["Q", "K", "V"], ["Y"], body, OPSET[:1],
                           attributes=["q_num_heads", "kv_num_heads", "scale", "is_causal", "row_tiles", "head_tiles"])


def block_model(seed=0, causal=0, row_tiles=3, head_tiles=2) -> onnx.ModelProto:
    """A ResNet + transformer block written with every fused op of the contract: FusedConv
    (silu / residual / stride 2), GroupNormSiLU, GroupNormalization-21, LayerNormalization,
    cross-attention (Attention-23, 3D), self-attention (TiledAttention), FusedMatMul (residual,
    gelu), GeGLU."""
    rng = np.random.default_rng(seed)
    C, H, W, T, D, heads = 32, 8, 8, 7, 24, 4
    inits = []

    def w(name, *shape, scale=None):
        scale = scale or 1.0 / np.sqrt(shape[0] if len(shape) == 2 else np.prod(shape[1:]))
        inits.append(nh.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name))
        return name

    def c(name, arr):
        inits.append(nh.from_array(np.asarray(arr), name))
        return name

    def fused(op, ins, out, act, **attrs):
        return _node(op, ins, [out], domain="edgefc", overload=_overload(act, len(ins) > 3), activation=act, **attrs)

    conv = {"pads": [1, 1, 1, 1], "dilations": [1, 1], "group": 1}
    sc = float((C // heads) ** -0.5)
    nodes = [
        fused("FusedConv", ["x", w("W1", C, C, 3, 3), w("B1", C, scale=0.1)], "h1", "silu", strides=[1, 1], **conv),
        _node("GroupNormSiLU", ["h1", w("gs", C, scale=1.0), w("gb", C, scale=0.1)], ["h2"], domain="edgefc",
              num_groups=8, epsilon=1e-5),
        fused("FusedConv", ["h2", w("W2", C, C, 3, 3), w("B2", C, scale=0.1), "x"], "h3", "none", strides=[1, 1], **conv),
        _node("GroupNormalization", ["h3", w("g2s", C, scale=1.0), w("g2b", C, scale=0.1)], ["h4"], num_groups=8,
              epsilon=1e-6),
        _node("Reshape", ["h4", c("s_tok", np.array([1, C, H * W], np.int64))], ["h5"]),
        _node("Transpose", ["h5"], ["t"], perm=[0, 2, 1]),
        _node("LayerNormalization", ["t", w("lns", C, scale=1.0), w("lnb", C, scale=0.1)], ["ln"], axis=-1),
        _node("MatMul", ["ln", w("Wq", C, C)], ["q"]),
        _node("MatMul", ["ctx", w("Wk", D, C)], ["k"]),
        _node("MatMul", ["ctx", w("Wv", D, C)], ["v"]),
        _node("Attention", ["q", "k", "v"], ["a"], q_num_heads=heads, kv_num_heads=heads, scale=sc),
        fused("FusedMatMul", ["a", w("Wo", C, C), w("bo", C, scale=0.1), "t"], "r1", "none"),
        _node("MatMul", ["r1", w("Wq2", C, C)], ["q2"]),
        _node("MatMul", ["r1", w("Wk2", C, C)], ["k2"]),
        _node("MatMul", ["r1", w("Wv2", C, C)], ["v2"]),
        _node("TiledAttention", ["q2", "k2", "v2"], ["a2"], domain="edgefc", q_num_heads=heads, kv_num_heads=heads,
              scale=sc, is_causal=causal, row_tiles=row_tiles, head_tiles=head_tiles),
        fused("FusedMatMul", ["a2", w("Wo2", C, C), w("bo2", C, scale=0.1), "r1"], "r2", "none"),
        fused("FusedMatMul", ["r2", w("Wf1", C, 4 * C), w("bf1", 4 * C, scale=0.1)], "f1", "none"),
        _node("GeGLU", ["f1"], ["f2"], domain="edgefc"),
        fused("FusedMatMul", ["f2", w("Wf2", 2 * C, C), w("bf2", C, scale=0.1), "r2"], "f3", "gelu"),
        _node("Transpose", ["f3"], ["f4"], perm=[0, 2, 1]),
        _node("Reshape", ["f4", c("s_img", np.array([1, C, H, W], np.int64))], ["f5"]),
        fused("FusedConv", ["f5", w("W3", C, C, 3, 3), w("B3", C, scale=0.1)], "y", "none", strides=[2, 2], **conv),
    ]
    graph = h.make_graph(nodes, "block", [h.make_tensor_value_info("x", TP.FLOAT, [1, C, H, W]),
                                          h.make_tensor_value_info("ctx", TP.FLOAT, [1, T, D])],
                         [h.make_tensor_value_info("y", TP.FLOAT, [1, C, 4, 4])], inits)
    funcs = [_fused_conv_fn("silu", False), _fused_conv_fn("none", True), _fused_conv_fn("none", False),
             _fused_matmul_fn("none", True), _fused_matmul_fn("none", False), _fused_matmul_fn("gelu", True),
             _gn_silu_fn(), _geglu_fn(), _tiled_attention_fn()]
    model = h.make_model(graph, opset_imports=OPSET, functions=funcs, ir_version=10)
    onnx.checker.check_model(model)
    return model


def to_w8a16(model: onnx.ModelProto, act_scale: float = 1.0 / 1024) -> onnx.ModelProto:
    """The contract's W8A16 QDQ form: int8 per-output-channel weights behind DequantizeLinear(axis),
    an int16 QuantizeLinear -> DequantizeLinear pair on every activation."""
    m = onnx.ModelProto.FromString(model.SerializeToString())
    g = m.graph
    inits = {t.name: t for t in g.initializer}
    axes = {n.input[1]: (0 if n.op_type == "FusedConv" else 1) for n in g.node
            if n.op_type in ("FusedConv", "FusedMatMul", "MatMul") and n.input[1] in inits}
    head = []
    extra = [nh.from_array(np.array(act_scale, np.float32), "act_scale"), nh.from_array(np.array(0, np.int16), "act_zp")]
    for name, axis in axes.items():
        wt = nh.to_array(inits[name])
        scale = (np.abs(wt).max(axis=tuple(i for i in range(wt.ndim) if i != axis)) / 127.0).astype(np.float32)
        shape = [1] * wt.ndim
        shape[axis] = -1
        q = np.clip(np.rint(wt / scale.reshape(shape)), -127, 127).astype(np.int8)
        g.initializer.remove(inits[name])
        extra += [nh.from_array(q, name + "_q"), nh.from_array(scale, name + "_scale"),
                  nh.from_array(np.zeros_like(scale, dtype=np.int8), name + "_zp")]
        head.append(h.make_node("DequantizeLinear", [name + "_q", name + "_scale", name + "_zp"], [name], axis=axis))

    def qdq(t):
        return [h.make_node("QuantizeLinear", [t, "act_scale", "act_zp"], [t + "_q16"]),
                h.make_node("DequantizeLinear", [t + "_q16", "act_scale", "act_zp"], [t + "_dq16"])]

    acts, body = set(), []
    for i in g.input:
        body += qdq(i.name)
        acts.add(i.name)
    for n in g.node:
        for k, name in enumerate(n.input):
            if name in acts:
                n.input[k] = name + "_dq16"
        body.append(n)
        for o in n.output:
            if o not in {x.name for x in g.output}:
                body += qdq(o)
                acts.add(o)
    del g.node[:]
    g.node.extend(head + body)
    g.initializer.extend(extra)
    return m


def to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """FP16 weights and activations, fp32 model inputs/outputs (Casts at the edges)."""
    m = onnx.ModelProto.FromString(model.SerializeToString())
    g = m.graph
    for t in g.initializer:
        if t.data_type == TP.FLOAT:
            t.CopyFrom(nh.from_array(nh.to_array(t).astype(np.float16), t.name))
    ins = [i.name for i in g.input if i.type.tensor_type.elem_type == TP.FLOAT]
    outs = [o.name for o in g.output]
    nodes = [h.make_node("Cast", [i], [i + "_h"], to=TP.FLOAT16) for i in ins]
    for n in g.node:
        n.input[:] = [x + "_h" if x in ins else x for x in n.input]
        n.output[:] = [x + "_h" if x in outs else x for x in n.output]
    nodes += list(g.node) + [h.make_node("Cast", [o + "_h"], [o], to=TP.FLOAT) for o in outs]
    del g.node[:]
    g.node.extend(nodes)
    return m


# --- helpers -----------------------------------------------------------------------------------------

def program_of(model: onnx.ModelProto):
    """The Program of ``model`` for exynos2400 (what the profile prices and the TVM build follows)."""
    from tvm import relax

    from edgefc.targets import tvm_import

    # every node's output shape and type as TVM's import infers them (through the edgefc ops)
    prepared = tvm_import.prepare_model(model)
    types = {}
    for block in tvm_import.import_model(prepared)["main"].body.blocks:
        for b in block.bindings:
            m = tvm_import.NODE_VAR.match(b.var.name)
            if m and isinstance(b.var.ty, relax.TensorType):
                types[prepared.graph.node[int(m.group(1))].output[0]] = b.var.ty
    typed = onnx.ModelProto()
    typed.CopyFrom(model)
    for name, ty in types.items():
        elem = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(str(ty.dtype)))
        typed.graph.value_info.append(h.make_tensor_value_info(name, elem, [int(d) for d in ty.shape]))
    return edgefc.get_target("exynos2400").lower(edgefc.infer_shapes(gs.import_onnx(typed)))


def _build(model: onnx.ModelProto, folder):
    """Lower (by the model's Program) + local build (no aarch64) into ``folder``; returns
    (runner, lowering)."""
    lowering = tvm_lowering.lower(model, program_of(model))
    folder.mkdir(parents=True, exist_ok=True)
    tvm_build.write_tvm_files(lowering, folder, aarch64=False)
    return tvm_runtime.load_build(folder), lowering


def _rel(ref: dict, out: dict) -> float:
    diff = ort.compare(ref, out)
    assert not diff.reason, diff.reason
    return diff.rel_error


def _sqnr(ref, out) -> float:
    from edgefc.cli.run import sqnr_db

    return sqnr_db(ref, out)


def _cli(argv, capsys):
    from edgefc.cli import main

    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in argv])
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


def _macs(op: dict) -> int:
    """MACs of one serialised NPU op, from its operand shapes (counted here, independently of the
    Program): conv2d, matmul and attention; 0 for the rest."""
    shapes, out = op.get("arg_shapes") or [], op.get("shape")
    if op["op"] == "relax.nn.conv2d":
        w = shapes[1]
        return int(np.prod(out)) * w[1] * w[2] * w[3]
    if op["op"] == "relax.matmul":
        return int(np.prod(out)) * shapes[0][-1]
    if op["op"] == "relax.nn.attention":
        (b, sq, h, d), skv, dv = shapes[0], shapes[1][1], shapes[2][3]
        return b * h * sq * skv * (d + dv)
    return 0


def _attention_commands(programs) -> int:
    return sum(1 for p in programs for c in p["commands"] for o in c["ops"] if o["op"] == "relax.nn.attention")


# --- the compiled tiny U-Net (default pipeline, tiled attention forced by a small SRAM budget) -------

@pytest.fixture(scope="session")
def unet_build(tiny_models, tmp_path_factory):
    """``edgefc compile --emit tvm`` of the tiny U-Net; the SRAM budget is made small enough that
    MLT tiles attention, so TiledAttention goes through TVM too."""
    from edgefc.errors import PassError

    root = tmp_path_factory.mktemp("tvm-unet")
    for budget in (65536, 131072, 262144, None):
        opts = {"emit": ("tvm",)}
        if budget:
            opts["sram_budget"] = budget
        try:
            edgefc.compile(tiny_models["unet"], "exynos2400", output=root / "build", options=opts)
            break
        except PassError:
            continue
    feeds = ort.random_inputs(ir_model(tiny_models["unet"]), seed=0)
    np.savez(root / "in.npz", **feeds)
    return root


def ir_model(path):
    from edgefc import ir

    return ir.load_model_proto(path)


def test_unet_build_runs_and_checks(unet_build, capsys):
    code, out, err = _cli(["run", unet_build / "build", "--inputs", unet_build / "in.npz", "--check",
                           "-o", unet_build / "out.npz"], capsys)
    assert code == 0, err
    assert "out_sample: shape [1, 4, 8, 8]" in out
    assert "FAIL" not in out and " ok" in out
    with np.load(unet_build / "out.npz") as res:
        assert res["out_sample"].shape == (1, 4, 8, 8)


def test_unet_artifacts_and_mac_share(unet_build):
    d = unet_build / "build"
    head = (d / "host_aarch64.so").read_bytes()[:20]
    assert head[:4] == b"\x7fELF" and struct.unpack("<H", head[18:20])[0] == 183  # EM_AARCH64
    assert (d / "host_local.so").read_bytes()[:4] == b"\x7fELF"
    report = json.loads((d / "report.json").read_text())
    part = report["partition"]
    assert part["npu_mac_share"] >= 0.95
    assert part["total_macs"] > 0 and part["npu_macs"] <= part["total_macs"]
    for op in part["ops"]:
        assert set(op) >= {"name", "op_type", "where", "macs", "reason"}
        assert op["where"] in ("npu", "host", "split")
        assert (op["reason"] is None) == (op["where"] == "npu")
    assert sum(part["fallbacks"].values()) >= sum(1 for o in part["ops"] if o["where"] != "npu")
    assert {"host_local.so", "host_aarch64.so", "npu_programs.json", "tvm.json"} <= set(report["tvm"]["files"])
    # tiles included: one attention command per tile of every TiledAttention (+1 per plain Attention)
    model = onnx.load(str(d / "model.onnx"), load_external_data=False)
    expected = 0
    for n in model.graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        if n.op_type == "TiledAttention":
            expected += attrs["row_tiles"] * attrs["head_tiles"]
        elif n.op_type == "Attention":
            expected += 1
    assert any(n.op_type == "TiledAttention" for n in model.graph.node)
    programs = tvm_runtime.load_programs(d / "npu_programs.json")
    assert _attention_commands(programs) == expected


def _assert_partition_is_the_program(program, partition, programs) -> None:
    """Every op the Program prices sits where the Program put it, with the Program's MACs and
    precision, and the NPU programs execute exactly those MACs (counted from their op shapes)."""
    part = {o["name"]: o for o in partition["ops"]}
    built = collections.Counter()
    for p in programs:
        for c in p["commands"]:
            for o in c["ops"]:
                built[o.get("node")] += _macs(o)
    macs = collections.Counter()
    for c in program.commands:
        if c.kind == "tensor":
            macs[c.op] += c.total_macs
    assert program.ops and partition["disagreements"] == []
    for op in program.ops:
        q = part[op.name]
        assert q["engine"] == op.engine, (op.name, q)
        assert q["where"] == ("host" if op.engine == "host" else "npu"), (op.name, q)
        assert q["macs"] == macs[op.name], (op.name, q)
        if op.engine != "host":
            assert built[op.name] == macs[op.name], (op.name, built[op.name], macs[op.name])
        if op.engine == "tensor":
            assert q["precision"] and q["precision"] == next(c.precision for c in program.commands
                                                             if c.op == op.name and c.kind == "tensor")


def test_partition_agrees_with_the_program(unet_build):
    """The tiny U-Net, W8A16, attention tiled: profile.json (the Program, priced) and the TVM
    partition report agree op by op on engine, side, MACs and precision; the NPU programs carry
    the Program's commands of the nodes they run."""
    d = unet_build / "build"
    prof = json.loads((d / "profile.json").read_text())
    partition = json.loads((d / "report.json").read_text())["partition"]
    part = {o["name"]: o for o in partition["ops"]}
    assert prof["ops"] and any(o["op_type"] == "TiledAttention" for o in prof["ops"])
    for o in prof["ops"]:
        q = part[o["name"]]
        assert (q["engine"], q["macs"], q["precision"]) == (o["engine"], o["macs"], o["precision"]), (o, q)
        assert q["where"] == ("host" if o["engine"] == "host" else "npu"), (o, q)
    assert {o["precision"] for o in prof["ops"] if o["op_type"] in ("Conv", "FusedConv")} == {"int8xint16"}
    programs = tvm_runtime.load_programs(d / "npu_programs.json")
    carried = {n for p in programs for n in p["program"]}
    assert {o["name"] for o in prof["ops"] if o["engine"] != "host"} <= carried
    priced = {o["name"] for o in prof["ops"]}
    for p in programs:
        for n, cmds in p["program"].items():   # a free node (reshape, Q/DQ) has no commands
            assert all(c["op"] == n for c in cmds) and bool(cmds) == (n in priced), n


@pytest.mark.parametrize("component", ["unet", "text-encoder", "vae-decoder"])
def test_fp32_components_match_onnxruntime(tiny_models, tmp_path, component):
    """--precision fp32 --no-mlt build of each tiny component vs onnxruntime on the original model;
    the partition is the Program's op by op."""
    src = tiny_models[component]
    graph = edgefc.compile(src, "exynos2400", options={"precision": "fp32", "no_mlt": True}).graph
    program = edgefc.get_target("exynos2400").lower(graph)
    lowering = tvm_lowering.lower(edgefc.ir.to_model(graph), program)
    _assert_partition_is_the_program(program, lowering.partition, lowering.programs)
    (tmp_path / component).mkdir()
    tvm_build.write_tvm_files(lowering, tmp_path / component, aarch64=False)
    runner = tvm_runtime.load_build(tmp_path / component)
    feeds = ort.random_inputs(ir_model(src), seed=1)
    assert _rel(ort.run(str(src), feeds), runner.run(feeds)) <= 1e-4
    assert lowering.partition["npu_mac_share"] >= 0.95


@pytest.mark.parametrize("component", ["text-encoder", "vae-decoder"])
def test_fp16_components_partition_is_the_program(tiny_models, component):
    """The FP16 (default) text encoder and VAE decoder: the partition is the Program's op by op,
    and the attention is priced at fp16."""
    graph = edgefc.compile(tiny_models[component], "exynos2400").graph
    program = edgefc.get_target("exynos2400").lower(graph)
    lowering = tvm_lowering.lower(edgefc.ir.to_model(graph), program)
    _assert_partition_is_the_program(program, lowering.partition, lowering.programs)
    att = [o for o in lowering.partition["ops"] if o["op_type"] in ("Attention", "TiledAttention")]
    assert att and {o["precision"] for o in att} == {"fp16"}


# --- synthetic graphs: every fused op, tiles, QDQ, fp16 ---------------------------------------------

@pytest.mark.parametrize("causal,row_tiles,head_tiles", [(0, 3, 2), (1, 3, 2), (1, 5, 4), (0, 1, 1)])
def test_fused_ops_match_onnxruntime(tmp_path, causal, row_tiles, head_tiles):
    model = block_model(causal=causal, row_tiles=row_tiles, head_tiles=head_tiles)
    runner, lowering = _build(model, tmp_path)
    for seed in (0, 1):
        feeds = ort.random_inputs(model, seed=seed)
        assert _rel(ort.run(model, feeds), runner.run(feeds)) <= 1e-5
    part = lowering.partition
    assert part["npu_mac_share"] == 1.0 and part["counts"]["host"] == 0 and part["counts"]["split"] == 0
    assert _attention_commands(lowering.programs) == 1 + row_tiles * head_tiles
    kinds = collections.Counter(c["composite"] for p in lowering.programs for c in p["commands"])
    for k in ("conv2d_bias_silu", "conv2d_bias_residual", "group_norm_silu", "geglu", "matmul_bias_gelu_residual",
              "nn_group_norm", "nn_layer_norm"):
        assert kinds[tvm_patterns.PREFIX + k] >= 1, k
    by_type = {o["op_type"]: o for o in part["ops"]}
    full = 4 * 64 * 64 * (8 + 8)  # heads * Sq * Skv * (dk + dv)
    built = sum(_macs(o) for p in lowering.programs for c in p["commands"] for o in c["ops"]
                if o.get("node") == by_type["TiledAttention"]["name"])
    # the MACs the NPU program executes are the ones the Program priced (and reported)
    assert by_type["TiledAttention"]["macs"] == built
    if causal and row_tiles > 1:  # a causal row tile reads only the key prefix it can see
        assert built < full
    else:
        assert built == full


def test_w8a16_and_fp16_graphs(tmp_path):
    base = block_model(causal=1, row_tiles=3, head_tiles=2)
    feeds = ort.random_inputs(base, seed=2)
    ref = ort.run(base, feeds)["y"]
    q = to_w8a16(base)
    runner, lowering = _build(q, tmp_path / "q")
    out = runner.run(feeds)["y"]
    q_ort = ort.run(q, feeds)["y"]
    assert _sqnr(q_ort, out) >= 60.0                  # the lowering adds (almost) nothing to W8A16
    assert _sqnr(ref, out) >= _sqnr(ref, q_ort) - 0.5
    assert lowering.partition["npu_mac_share"] == 1.0
    # int8 weights and int16 activations reach the NPU as such
    dtypes = {i["dtype"] for p in lowering.programs for i in p["inputs"]}
    assert {"int8", "int16"} <= dtypes
    ops = collections.Counter(o["op"] for p in lowering.programs for c in p["commands"] for o in c["ops"])
    assert ops["relax.quantize"] > 0 and ops["relax.dequantize"] > ops["relax.quantize"]
    f16 = to_fp16(base)
    runner16, _ = _build(f16, tmp_path / "f16")
    out16 = runner16.run(feeds)["y"]
    s_ort = _sqnr(ref, ort.run(f16, feeds)["y"])
    assert _sqnr(ref, out16) >= s_ort - 6.02 and _sqnr(ref, out16) >= 50.0


def host_ops_model() -> onnx.ModelProto:
    """Atan (no NPU kernel) -> MatMul (NPU) and an embedding Gather (int64 indices) + Add."""
    x = h.make_tensor_value_info("x", TP.FLOAT, [1, 16])
    idx = h.make_tensor_value_info("i", TP.INT64, [1, 4])
    y = h.make_tensor_value_info("y", TP.FLOAT, [1, 4, 16])
    wt = nh.from_array(np.random.default_rng(0).standard_normal((16, 16)).astype(np.float32), "w")
    table = nh.from_array(np.random.default_rng(1).standard_normal((10, 16)).astype(np.float32), "table")
    nodes = [h.make_node("Atan", ["x"], ["s"], name="atan"), h.make_node("MatMul", ["s", "w"], ["m"], name="mm"),
             h.make_node("Gather", ["table", "i"], ["g"], name="gather"), h.make_node("Add", ["g", "m"], ["y"], name="add")]
    return h.make_model(h.make_graph(nodes, "g", [x, idx], [y], [wt, table]), opset_imports=OPSET[:1])


def test_host_fallback_has_reasons(tmp_path):
    """Ops the NPU does not run stay on the host, each with the reason, and the MACs still count."""
    model = host_ops_model()
    runner, lowering = _build(model, tmp_path)
    feeds = {"x": np.random.default_rng(2).standard_normal((1, 16)).astype(np.float32),
             "i": np.array([[1, 2, 3, 9]], np.int64)}
    assert _rel(ort.run(model, feeds), runner.run(feeds)) <= 1e-5
    ops = {o["name"]: o for o in lowering.partition["ops"]}
    # the Program placed them (and says why); the build put them there
    assert ops["atan"]["engine"] == ops["atan"]["where"] == "host" and ops["atan"]["reason"] == "no NPU kernel for Atan"
    assert ops["gather"]["engine"] == ops["gather"]["where"] == "host"
    assert ops["gather"]["reason"] == "no NPU kernel for Gather"
    assert ops["mm"]["engine"] == "tensor" and ops["mm"]["where"] == "npu"
    assert ops["mm"]["macs"] == 16 * 16 and ops["mm"]["reason"] is None and ops["mm"]["precision"] == "fp32"
    assert lowering.partition["npu_mac_share"] == 1.0
    assert lowering.partition["fallbacks"]["no NPU kernel for Atan"] == 1
    assert lowering.partition["disagreements"] == []


def test_exynos2400_target_tag():
    import edgefc

    target = tvm_build.phone_target(edgefc.get_target("exynos2400").arch)
    assert str(target.attrs["mtriple"]) == "aarch64-linux-gnu"
    assert str(target.attrs["mcpu"]) == "cortex-x4"
    assert int(target.attrs["num-cores"]) == 10


def test_unsupported_attention_form_is_one_sentence():
    q = h.make_tensor_value_info("q", TP.FLOAT, [1, 4, 8])
    mask = h.make_tensor_value_info("m", TP.FLOAT, [4, 4])
    y = h.make_tensor_value_info("y", TP.FLOAT, [1, 4, 8])
    node = h.make_node("Attention", ["q", "q", "q", "m"], ["y"], q_num_heads=2, kv_num_heads=2, name="att")
    model = h.make_model(h.make_graph([node], "g", [q, mask], [y]), opset_imports=OPSET[:1])
    with pytest.raises(BuildError, match="mask") as exc:
        tvm_lowering.lower(model, program_of(model))
    assert "\n" not in str(exc.value)


# --- user errors: one line, exit 2, nothing half-written ---------------------------------------------

def test_run_errors(unet_build, tmp_path, capsys):
    build = unet_build / "build"
    good = unet_build / "in.npz"
    cases = []
    cases.append((["run", tmp_path / "nope", "--inputs", good], "build folder not found"))
    plain = tmp_path / "plain"
    plain.mkdir()
    for f in ("model.onnx", "report.json"):
        shutil.copy(build / f, plain / f)
    cases.append((["run", plain, "--inputs", good], "no TVM build"))
    cases.append((["run", build, "--inputs", tmp_path / "missing.npz"], "inputs file not found"))
    (tmp_path / "bad.npz").write_text("not an npz")
    cases.append((["run", build, "--inputs", tmp_path / "bad.npz"], "not a readable .npz"))
    with np.load(good) as f:
        feeds = {k: f[k] for k in f.files}
    np.savez(tmp_path / "names.npz", **{("x" if k == "sample" else k): v for k, v in feeds.items()})
    cases.append((["run", build, "--inputs", tmp_path / "names.npz"], "missing sample"))
    np.savez(tmp_path / "shape.npz", **{k: (v[..., :4] if k == "sample" else v) for k, v in feeds.items()})
    cases.append((["run", build, "--inputs", tmp_path / "shape.npz"], "has shape"))
    nosrc = tmp_path / "nosrc"
    shutil.copytree(build, nosrc)
    rep = json.loads((nosrc / "report.json").read_text())
    rep["source"] = str(tmp_path / "gone.onnx")
    (nosrc / "report.json").write_text(json.dumps(rep))
    cases.append((["run", nosrc, "--inputs", good, "--check"], "not available"))
    noparams = tmp_path / "noparams"
    shutil.copytree(build, noparams)
    (noparams / "host_params.bin").unlink()
    cases.append((["run", noparams, "--inputs", good], "host_params.bin is missing"))
    for argv, msg in cases:
        code, _, err = _cli(argv, capsys)
        assert code == 2, (argv, err)
        assert msg in err and err.count("\n") == 1 and "Traceback" not in err, err


def test_emit_without_cross_linker_fails_cleanly(tmp_path, capsys, monkeypatch):
    model = tmp_path / "small.onnx"
    onnx.save(host_ops_model(), str(model))
    monkeypatch.setenv("EDGEFC_AARCH64_CC", str(tmp_path / "no-such-cc"))
    code, _, err = _cli(["compile", model, "--passes", "canonicalize", "--emit", "tvm", "-o", tmp_path / "b"], capsys)
    assert code == 2 and "aarch64 linker" in err and err.strip().splitlines()[-1].startswith("error: ")
    assert "Traceback" not in err
    assert not (tmp_path / "b").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".b.")]


@pytest.mark.parametrize("causal", [0, 1])
def test_attention_4d_form_and_default_scale(tmp_path, causal):
    """Attention-23 in the 4D form ([B, H, S, d]) with the default scale 1/sqrt(d)."""
    q = h.make_tensor_value_info("q", TP.FLOAT, [1, 2, 5, 8])
    k = h.make_tensor_value_info("k", TP.FLOAT, [1, 2, 6, 8])
    v = h.make_tensor_value_info("v", TP.FLOAT, [1, 2, 6, 4])
    y = h.make_tensor_value_info("y", TP.FLOAT, [1, 2, 5, 4])
    node = h.make_node("Attention", ["q", "k", "v"], ["y"], is_causal=causal, name="att")
    model = h.make_model(h.make_graph([node], "g", [q, k, v], [y]), opset_imports=OPSET[:1])
    runner, lowering = _build(model, tmp_path)
    feeds = ort.random_inputs(model, seed=3)
    assert _rel(ort.run(model, feeds), runner.run(feeds)) <= 1e-5
    assert lowering.partition["ops"][0]["macs"] == 2 * 5 * 6 * (8 + 4)


def test_unknown_edgefc_op_is_named():
    x = h.make_tensor_value_info("x", TP.FLOAT, [1, 4])
    model = h.make_model(h.make_graph([h.make_node("Frobnicate", ["x"], ["y"], domain="edgefc")], "g", [x],
                                      [h.make_tensor_value_info("y", TP.FLOAT, [1, 4])]), opset_imports=OPSET)
    with pytest.raises(BuildError, match="edgefc.Frobnicate"):
        tvm_lowering.lower(model, program_of(model))


def mask_model() -> onnx.ModelProto:
    """A boolean-mask chain as MobileBERT's attention masks and dynamo's softmax NaN guard make:
    Where(IsNaN(x) And m, 0, x) + x."""
    x = h.make_tensor_value_info("x", TP.FLOAT, [2, 64])
    m = h.make_tensor_value_info("m", TP.BOOL, [2, 64])
    y = h.make_tensor_value_info("y", TP.FLOAT, [2, 64])
    zero = nh.from_array(np.zeros((1,), np.float32), "zero")
    nodes = [h.make_node("IsNaN", ["x"], ["nan"], name="isnan"), h.make_node("And", ["nan", "m"], ["c"], name="and"),
             h.make_node("Where", ["c", "zero", "x"], ["w"], name="where"), h.make_node("Add", ["w", "x"], ["y"], name="add")]
    return h.make_model(h.make_graph(nodes, "g", [x, m], [y], [zero]), opset_imports=OPSET[:1])


def test_boolean_masks_run_on_the_npu(tmp_path):
    """IsNaN / And / Where are vector-engine ops in the Program (boolean masks are vector data),
    the TVM build runs them on the NPU, and the answer is the original's (NaNs masked included)."""
    model = mask_model()
    program = program_of(model)
    assert {o.name: o.engine for o in program.ops} == {"isnan": "vector", "and": "vector", "where": "vector",
                                                        "add": "vector"}
    runner, lowering = _build(model, tmp_path)
    assert {o["name"]: o["where"] for o in lowering.partition["ops"]} == dict.fromkeys(("isnan", "and", "where", "add"), "npu")
    x = np.random.default_rng(0).standard_normal((2, 64)).astype(np.float32)
    x[0, :5] = np.nan
    feeds = {"x": x, "m": np.random.default_rng(1).random((2, 64)) > 0.5}
    ref, out = ort.run(model, feeds)["y"], runner.run(feeds)["y"]
    assert np.array_equal(np.isnan(ref), np.isnan(out))
    assert np.allclose(ref[~np.isnan(ref)], out[~np.isnan(out)], rtol=0, atol=1e-6)


# --- one description of the composites (edgefc.composites) serves fusion and partitioning ---------

def _onnx_composites() -> set[str]:
    """The composites the ONNX side generates: the fusion patterns named after them, and what each
    variant of a fused edgefc op stands for."""
    names = {p.name for p in fuse_epilogue.variants({})}
    names |= {fuse_epilogue.BIAS_PATTERN.name, fuse_matmul.PATTERN.name}
    fused = composites.fused_op_composites()
    for op in functions.FUSED_OPS:   # every fused op the ONNX side emits is a composite
        names |= set(fused[op])
    for root in composites.TENSOR_ROOTS:   # one composite per overload of FusedConv / FusedMatMul
        names |= {composites.epilogue(root, act, res).name for act in functions.ACTIVATIONS for res in (False, True)}
    return names


def test_fusion_and_partition_composites_are_one_set():
    tvm_side = tvm_patterns.composite_names() - {name for name, _ in composites.ATTENTION_TILE.variants()}
    assert _onnx_composites() == tvm_side
    # each overload of a fused op is exactly one fusion pattern (the bias-only one: conv-bias / matmul-bias)
    fusion = fuse_epilogue.variants({})
    assert len({p.name for p in fusion}) == len(fusion)
    # every pattern anchors at both ONNX ops of its root
    assert all(p.node("producer").ops == fuse_epilogue.COMPOSITES[p.name].root.onnx_ops for p in fusion)
    assert len(fusion) + 2 == 2 * len(functions.ACTIVATIONS) * 2
    # the ONNX patterns of group norm + SiLU and of the GeGLU gate fold the description's activation
    assert all(composites.GROUP_NORM_SILU.activation.name in {n.name for n in p.nodes}
               for p in (fuse_groupnorm.PATTERNS[0], fuse_groupnorm.NATIVE_SILU))
    assert all(composites.GEGLU.activation.name in {n.name for n in p.nodes} for p in fuse_geglu.PATTERNS)


def test_composite_priority_is_the_description_order():
    """TVM applies the table lowest priority first; the fusion pass tries its patterns in order."""
    table = [name.removeprefix(tvm_patterns.PREFIX) for name, *_ in tvm_patterns.pattern_table(None)]
    epilogues = [e.name for e in composites.EPILOGUES]
    assert [n for n in table if n in set(epilogues)] == epilogues[::-1]
    patterns = fuse_epilogue.variants({})
    for op in fuse_epilogue.PRODUCERS:
        assert [p.name for p in patterns if op in p.node("producer").ops] == [
            e.name for e in composites.EPILOGUES if op in e.root.onnx_ops and (e.activation or e.residual)]


def test_deferred_attention_has_no_tvm_lowering_yet():
    """A W8A8 attention whose normalisation quantize deferred is refused by the TVM import with one
    line that names it (its arithmetic would otherwise become a float softmax there)."""
    from edgefc.targets import tvm_import
    from edgefc.tiled_attention_function import function_proto

    node = h.make_node("TiledAttention", ["Q", "K", "V"], ["Y"], domain="edgefc", name="attn", q_num_heads=2,
                       kv_num_heads=2, scale=0.25, is_causal=0, row_tiles=2, head_tiles=1, row_granularity=1,
                       deferred_normalization=1)
    node.overload = "deferred"
    graph = h.make_graph([node], "g", [h.make_tensor_value_info(n, TP.FLOAT, [1, 8, 16]) for n in "QKV"],
                         [h.make_tensor_value_info("Y", TP.FLOAT, [1, 8, 16])])
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 23), h.make_opsetid("edgefc", 1)],
                         functions=[function_proto(23, "deferred")], ir_version=10)
    with pytest.raises(BuildError, match="attn: a TiledAttention with its normalisation deferred"):
        tvm_import.import_model(tvm_import.prepare_model(model))
