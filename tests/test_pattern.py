"""The pattern-rewrite helper (edgefc.pattern) on small hand-built graphs."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
import pytest

from edgefc import ort
from edgefc.errors import PassError
from edgefc.pattern import Pattern, is_scalar, scalar
from edgefc.rewriter import RewriteLog, Rewriter, rewrite_all


def _v(name, shape=(2, 3)):
    return gs.Variable(name, np.float32, list(shape))


def silu_graph(swap=False, extra_consumer=False, sigmoid_is_output=False):
    """y = x * Sigmoid(x) (Mul inputs swapped with ``swap``), optionally with the Sigmoid's
    output also read by a Relu, or being a graph output."""
    x, s, y = _v("x"), _v("s"), _v("y")
    nodes = [gs.Node("Sigmoid", "sig", inputs=[x], outputs=[s]),
             gs.Node("Mul", "mul", inputs=[s, x] if swap else [x, s], outputs=[y])]
    outputs = [y]
    if extra_consumer:
        r = _v("r")
        nodes.append(gs.Node("Relu", "relu", inputs=[s], outputs=[r]))
        outputs.append(r)
    if sigmoid_is_output:
        outputs.append(s)
    return gs.Graph(nodes=nodes, inputs=[x], outputs=outputs, opset=23)


def silu_pattern():
    p = Pattern("silu")
    x = p.input("x")
    p.op("Mul", x, p.op("Sigmoid", x, name="sig"), name="mul")
    return p


def test_match_either_input_order_from_any_anchor():
    p = silu_pattern()
    for swap in (False, True):
        g = silu_graph(swap)
        mul, sig = g.nodes[1], g.nodes[0]
        for node, anchor in ((mul, None), (sig, "sig"), (mul, "mul")):
            m = p.match(node, anchor)
            assert m, m
            assert m["x"] is g.inputs[0] and m["sig"] is sig and m["mul"] is mul
            assert m.outputs == [g.outputs[0]]


def test_rewrite_replaces_and_keeps_numerics():
    g = silu_graph(swap=True)
    feeds = ort.random_inputs(g, 1)
    before = ort.run(g, feeds)
    log = RewriteLog()
    n = rewrite_all(g, silu_pattern(), lambda m: [gs.Node("HardSwish", inputs=[m["x"]], outputs=m.outputs)],
                    kind="silu", log=log)
    assert n == 1 and log.counts["silu"] == 1
    assert [node.op for node in g.nodes] == ["HardSwish"]
    assert g.outputs[0].inputs[0].op == "HardSwish"
    # and a replacement that is exact: Sigmoid*x rebuilt as Mul(Sigmoid) with fresh tensors
    g = silu_graph()
    rewrite_all(g, silu_pattern(), lambda m: [gs.Node("Sigmoid", inputs=[m["x"]], outputs=[t := _v("t2")]),
                                              gs.Node("Mul", inputs=[t, m["x"]], outputs=m.outputs)])
    ort.check(before, ort.run(g, feeds), 1e-6)
    assert rewrite_all(g, silu_pattern(), lambda m: []) == 1  # the rebuilt chain matches again


def test_internal_tensor_with_outside_consumer_is_a_miss_with_reason():
    g = silu_graph(extra_consumer=True)
    m = silu_pattern().match(g.nodes[0], "sig")
    assert not m
    assert "also used by Relu 'relu'" in m.reason


def test_internal_graph_output_is_a_miss():
    g = silu_graph(sigmoid_is_output=True)
    rw = Rewriter(g)
    m = rw.match(silu_pattern(), g.nodes[0], "sig")
    assert not m and "graph output" in m.reason


def test_same_placeholder_must_bind_the_same_tensor():
    x, z, s, y = _v("x"), _v("z"), _v("s"), _v("y")
    g = gs.Graph(nodes=[gs.Node("Sigmoid", "sig", inputs=[z], outputs=[s]),
                        gs.Node("Mul", "mul", inputs=[x, s], outputs=[y])], inputs=[x, z], outputs=[y])
    m = silu_pattern().match(g.nodes[1])
    assert not m and m.reason == "Sigmoid 'sig' input 0: tensor 'z' should be 'x', which is 'x'"


def test_constant_checks_and_reasons():
    p = Pattern("half")
    x = p.input("x")
    p.op("Mul", x, p.const("c", is_scalar(0.5)), name="mul")
    for value, ok in ((0.5, True), (0.25, False)):
        y = _v("y")
        g = gs.Graph(nodes=[gs.Node("Mul", "mul", inputs=[_v("x"), gs.Constant("c", np.array(value, np.float32))],
                                    outputs=[y])], outputs=[y])
        m = p.match(g.nodes[0])
        assert bool(m) == ok
        if not ok:
            assert "constant is 0.25, want 0.5" in m.reason
    y = _v("y")
    g = gs.Graph(nodes=[gs.Node("Mul", "mul", inputs=[_v("x"), _v("c")], outputs=[y])], outputs=[y])
    assert "is not a constant" in p.match(g.nodes[0]).reason
    assert scalar(gs.Constant("big", np.zeros((4, 4), np.float32))) is None


def test_attribute_constraints_and_where():
    p = Pattern("softmax-last", where=lambda m: m["sm"].outputs[0].shape[-1] == 3 or "rows too short")
    p.op("Softmax", p.input("x"), name="sm", attrs={"axis": -1})
    for axis, cols, want in ((-1, 3, None), (0, 3, "attribute axis=0, want -1"), (-1, 4, "rows too short")):
        y = _v("y", (2, cols))
        g = gs.Graph(nodes=[gs.Node("Softmax", "sm", attrs={"axis": axis}, inputs=[_v("x", (2, cols))], outputs=[y])],
                     outputs=[y])
        m = p.match(g.nodes[0])
        if want is None:
            assert m
        else:
            assert not m and want in m.reason


def test_multi_output_and_extra_inputs():
    x, a, b, y = _v("x", (2, 4)), _v("a", (2, 2)), _v("b", (2, 2)), _v("y", (2, 2))
    split = gs.Node("Split", "split", attrs={"axis": -1}, inputs=[x, gs.Constant("sz", np.array([2, 2]))], outputs=[a, b])
    g = gs.Graph(nodes=[split, gs.Node("Mul", "mul", inputs=[a, b], outputs=[y])], inputs=[x], outputs=[y])
    p = Pattern("split-mul")
    h1, h2 = p.op("Split", p.input("X"), name="split", outputs=2, extra_inputs=True)
    p.op("Mul", h1, h2, name="mul")
    m = p.match(g.nodes[1])
    assert m and m["X"] is x
    strict = Pattern("split-strict")
    h1, h2 = strict.op("Split", strict.input("X"), name="split", outputs=2)
    strict.op("Mul", h1, h2, name="mul")
    miss = strict.match(g.nodes[1])
    assert not miss and "has 2 inputs, pattern node 'split' has 1" in miss.reason


def test_consumer_choice_backtracks():
    """x feeds a Relu and a Sigmoid; anchored at x's producer the matcher must pick the Sigmoid."""
    a, x, r, s, y = _v("a"), _v("x"), _v("r"), _v("s"), _v("y")
    g = gs.Graph(nodes=[gs.Node("Neg", "neg", inputs=[a], outputs=[x]),
                        gs.Node("Relu", "relu", inputs=[x], outputs=[r]),
                        gs.Node("Sigmoid", "sig", inputs=[x], outputs=[s]),
                        gs.Node("Mul", "mul", inputs=[x, s], outputs=[y])], inputs=[a], outputs=[r, y])
    p = Pattern("neg-silu")
    x_ = p.op("Neg", p.input("a"), name="neg")
    p.output(x_)  # x keeps its Relu consumer
    p.op("Mul", x_, p.op("Sigmoid", x_, name="sig"), name="mul")
    m = p.match(g.nodes[0])
    assert m and m["sig"].name == "sig"


def test_from_graphsurgeon_pattern():
    gp = gs.GraphPattern()
    x = gp.variable()
    c = gp.add("conv", "Conv", inputs=[x, gp.constant("w")], check_func=lambda n: n.attrs.get("group", 1) == 1)
    r = gp.add("relu", "Relu", inputs=[c])
    gp.set_output_tensors([r])
    p = Pattern.from_graphsurgeon(gp, "conv-relu")
    xin, cy, ry = _v("x", (1, 2, 4, 4)), _v("c", (1, 2, 4, 4)), _v("r", (1, 2, 4, 4))
    w = gs.Constant("w", np.ones((2, 2, 1, 1), np.float32))
    for group, ok in ((1, True), (2, False)):
        g = gs.Graph(nodes=[gs.Node("Conv", "conv", attrs={"group": group}, inputs=[xin, w], outputs=[cy]),
                            gs.Node("Relu", "relu", inputs=[cy], outputs=[ry])], inputs=[xin], outputs=[ry])
        m = p.match(g.nodes[1])
        assert bool(m) == ok, m
        if ok:
            assert m["input0"] is xin and m["w"] is w and m.outputs == [ry]
        cy.inputs.clear(), ry.inputs.clear()
    nested = gs.GraphPattern()
    v = nested.variable()
    nested.add("sub", gp, inputs=[v])
    with pytest.raises(PassError, match="nested pattern"):
        Pattern.from_graphsurgeon(nested)


def test_pattern_definition_errors():
    p = Pattern("dup")
    p.input("x")
    with pytest.raises(PassError, match="used twice"):
        p.input("x")
    q = Pattern("disconnected")
    q.op("Relu", q.input("a"), name="r1")
    q.op("Relu", q.input("b"), name="r2")
    a, b, ra, rb = _v("a"), _v("b"), _v("ra"), _v("rb")
    g = gs.Graph(nodes=[gs.Node("Relu", "r1", inputs=[a], outputs=[ra]), gs.Node("Relu", "r2", inputs=[b], outputs=[rb])],
                 inputs=[a, b], outputs=[ra, rb])
    with pytest.raises(PassError, match="not connected"):
        q.match(g.nodes[0], "r1")


def test_rewriter_skips_replaced_nodes_and_restores_order():
    """Two overlapping candidates: the second sees its node already rewritten; commit toposorts."""
    x = _v("x")
    s1, m1, s2, m2 = _v("s1"), _v("m1"), _v("s2"), _v("m2")
    g = gs.Graph(nodes=[gs.Node("Sigmoid", "sig1", inputs=[x], outputs=[s1]),
                        gs.Node("Mul", "mul1", inputs=[x, s1], outputs=[m1]),
                        gs.Node("Sigmoid", "sig2", inputs=[m1], outputs=[s2]),
                        gs.Node("Mul", "mul2", inputs=[m1, s2], outputs=[m2])], inputs=[x], outputs=[m2])
    log = RewriteLog()
    n = rewrite_all(g, silu_pattern(), lambda m: [gs.Node("Swish", inputs=[m["x"]], outputs=m.outputs)],
                    anchor="sig", kind="silu", log=log)
    assert n == 2 and [node.op for node in g.nodes] == ["Swish", "Swish"]
    assert g.nodes[0].inputs[0] is x and g.nodes[1].inputs[0] is g.nodes[0].outputs[0]
    assert log.as_dict() == {"silu": 2, "misses": {}}


def test_rewrite_all_logs_misses_and_declines():
    g = silu_graph(extra_consumer=True)
    log = RewriteLog()
    assert rewrite_all(g, silu_pattern(), lambda m: [], anchor="sig", kind="silu", log=log) == 0
    [miss] = log.as_dict()["misses"]["silu"]
    assert miss["node"] == "sig" and "also used by" in miss["reason"]
    g = silu_graph()
    log = RewriteLog()
    assert rewrite_all(g, silu_pattern(), lambda m: None, kind="silu", log=log) == 0
    assert log.misses["silu"]["mul"] == "the replacement declined this match"


def test_docs_custom_pass_example_runs(tmp_path):
    """The plugin in docs/passes.md works as written: compile --plugin it, --verify the result."""
    import json
    import re
    from pathlib import Path

    import onnx
    from onnx import TensorProto, helper

    from tests.test_core import run_cli

    doc = (Path(__file__).resolve().parents[1] / "docs" / "passes.md").read_text()
    plugin = tmp_path / "hardswish.py"
    plugin.write_text(re.search(r"```python\n(# hardswish.py.*?)```", doc, re.DOTALL).group(1))
    model = helper.make_model(helper.make_graph(
        [helper.make_node("HardSigmoid", ["x"], ["s"], name="hs", alpha=1 / 6, beta=0.5),
         helper.make_node("Mul", ["x", "s"], ["y"], name="mul"),
         helper.make_node("HardSigmoid", ["y"], ["s2"], name="hs2", alpha=0.2, beta=0.5),
         helper.make_node("Mul", ["s2", "y"], ["z"], name="mul2")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 8])]), opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, tmp_path / "hs.onnx")
    rc, out = run_cli("compile", str(tmp_path / "hs.onnx"), "--plugin", str(plugin), "--passes",
                      "canonicalize,fuse,fuse-hardswish", "--verify", "-o", str(tmp_path / "build"))
    assert rc == 0, out
    ops = [n.op_type for n in onnx.load(tmp_path / "build" / "model.onnx").graph.node]
    fusion = json.loads((tmp_path / "build" / "report.json").read_text())["fusion"]
    assert ops.count("HardSwish") == 1 and fusion["hardswish"] == 1
    assert "alpha" in fusion["misses"]["hardswish"][0]["reason"] and fusion["misses"]["hardswish"][0]["node"] == "hs2"
