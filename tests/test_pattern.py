"""The rewrite engine (edgefc.pattern, edgefc.matcher, edgefc.rewriter) on small hand-built graphs."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
import pytest

from edgefc import ort
from edgefc.errors import PassError
from edgefc.matcher import Miss, match
from edgefc.pattern import Pattern, close_to, is_scalar, scalar
from edgefc.rewriter import Fusion, RewriteLog, Rewriter, apply_fusions


def rewrite(g, pattern, replace, anchor="mul", kind="silu", log=None, misses=True) -> int:
    """Apply one fusion of ``pattern`` with ``replace(match)``; the number of rewrites."""
    log = log if log is not None else RewriteLog()
    before = sum(log.counts.values())
    apply_fusions(g, [Fusion(kind, [pattern], anchor=anchor, replacement=lambda m, rw: replace(m), misses=misses)], log)
    return sum(log.counts.values()) - before


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
            m = match(p, node, anchor)
            assert m, m
            assert m["x"] is g.inputs[0] and m["sig"] is sig and m["mul"] is mul
            assert m.outputs == [g.outputs[0]]


def test_rewrite_replaces_and_keeps_numerics():
    g = silu_graph(swap=True)
    feeds = ort.random_inputs(g, 1)
    before = ort.run(g, feeds)
    log = RewriteLog()
    n = rewrite(g, silu_pattern(), lambda m: [gs.Node("HardSwish", inputs=[m["x"]], outputs=m.outputs)],
            kind="silu", log=log)
    assert n == 1 and log.counts["silu"] == 1
    assert [node.op for node in g.nodes] == ["HardSwish"]
    assert g.outputs[0].inputs[0].op == "HardSwish"
    # and a replacement that is exact: Sigmoid*x rebuilt as Mul(Sigmoid) with fresh tensors
    g = silu_graph()
    rewrite(g, silu_pattern(), lambda m: [gs.Node("Sigmoid", inputs=[m["x"]], outputs=[t := _v("t2")]),
                                          gs.Node("Mul", inputs=[t, m["x"]], outputs=m.outputs)])
    ort.check(before, ort.run(g, feeds), 1e-6)
    assert rewrite(g, silu_pattern(), lambda m: []) == 1  # the rebuilt chain matches again


def test_internal_tensor_with_outside_consumer_is_a_miss_with_reason():
    g = silu_graph(extra_consumer=True)
    m = match(silu_pattern(), g.nodes[0], "sig")
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
    m = match(silu_pattern(), g.nodes[1])
    assert not m and m.reason == "Sigmoid 'sig' input 0: tensor 'z' should be 'x', which is 'x'"


def test_constant_checks_and_reasons():
    p = Pattern("half")
    x = p.input("x")
    p.op("Mul", x, p.const("c", is_scalar(0.5)), name="mul")
    for value, ok in ((0.5, True), (0.25, False)):
        y = _v("y")
        g = gs.Graph(nodes=[gs.Node("Mul", "mul", inputs=[_v("x"), gs.Constant("c", np.array(value, np.float32))],
                                    outputs=[y])], outputs=[y])
        m = match(p, g.nodes[0])
        assert bool(m) == ok
        if not ok:
            assert "constant is 0.25, want 0.5" in m.reason
    y = _v("y")
    g = gs.Graph(nodes=[gs.Node("Mul", "mul", inputs=[_v("x"), _v("c")], outputs=[y])], outputs=[y])
    assert "is not a constant" in match(p, g.nodes[0]).reason
    assert scalar(gs.Constant("big", np.zeros((4, 4), np.float32))) is None


def test_attribute_constraints_and_where():
    p = Pattern("softmax-last", where=lambda m: m["sm"].outputs[0].shape[-1] == 3 or "rows too short")
    p.op("Softmax", p.input("x"), name="sm", attrs={"axis": -1})
    for axis, cols, want in ((-1, 3, None), (0, 3, "attribute axis=0, want -1"), (-1, 4, "rows too short")):
        y = _v("y", (2, cols))
        g = gs.Graph(nodes=[gs.Node("Softmax", "sm", attrs={"axis": axis}, inputs=[_v("x", (2, cols))], outputs=[y])],
                     outputs=[y])
        m = match(p, g.nodes[0])
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
    m = match(p, g.nodes[1])
    assert m and m["X"] is x
    strict = Pattern("split-strict")
    h1, h2 = strict.op("Split", strict.input("X"), name="split", outputs=2)
    strict.op("Mul", h1, h2, name="mul")
    miss = match(strict, g.nodes[1])
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
    m = match(p, g.nodes[0])
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
        m = match(p, g.nodes[1])
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
        match(q, g.nodes[0], "r1")


def test_rewriter_skips_replaced_nodes_and_restores_order():
    """Two overlapping candidates: the second sees its node already rewritten; commit toposorts."""
    x = _v("x")
    s1, m1, s2, m2 = _v("s1"), _v("m1"), _v("s2"), _v("m2")
    g = gs.Graph(nodes=[gs.Node("Sigmoid", "sig1", inputs=[x], outputs=[s1]),
                        gs.Node("Mul", "mul1", inputs=[x, s1], outputs=[m1]),
                        gs.Node("Sigmoid", "sig2", inputs=[m1], outputs=[s2]),
                        gs.Node("Mul", "mul2", inputs=[m1, s2], outputs=[m2])], inputs=[x], outputs=[m2])
    log = RewriteLog()
    n = rewrite(g, silu_pattern(), lambda m: [gs.Node("Swish", inputs=[m["x"]], outputs=m.outputs)],
            anchor="sig", kind="silu", log=log)
    assert n == 2 and [node.op for node in g.nodes] == ["Swish", "Swish"]
    assert g.nodes[0].inputs[0] is x and g.nodes[1].inputs[0] is g.nodes[0].outputs[0]
    assert log.as_dict() == {"silu": 2, "misses": {}}


def test_fusion_logs_misses_and_declines():
    g = silu_graph(extra_consumer=True)
    log = RewriteLog()
    assert rewrite(g, silu_pattern(), lambda m: [], anchor="sig", kind="silu", log=log) == 0
    [miss] = log.as_dict()["misses"]["silu"]
    assert miss["node"] == "sig" and "also used by" in miss["reason"]
    g = silu_graph()
    log = RewriteLog()
    assert rewrite(g, silu_pattern(), lambda m: None, kind="silu", log=log) == 0
    assert log.misses["silu"]["mul"] == "the replacement declined this match"


def test_attribute_checks_see_defaults_and_name_the_attribute():
    """close_to: an absent attribute has the ONNX default it is given; a miss names the attribute."""
    p = Pattern("hardswish")
    x = p.input("x")
    p.op("Mul", x, p.op("HardSigmoid", x, name="hs", attrs={"alpha": close_to(1 / 6, default=0.2)}), name="mul")
    for attrs, want in (({"alpha": 1 / 6}, None), ({}, "HardSigmoid 'hs': attribute alpha is 0.2, want 0.166667"),
                        ({"alpha": "x"}, "attribute alpha is 'x', not a number")):
        s, y = _v("s"), _v("y")
        g = gs.Graph(nodes=[gs.Node("HardSigmoid", "hs", attrs=attrs, inputs=[xin := _v("x")], outputs=[s]),
                            gs.Node("Mul", "mul", inputs=[xin, s], outputs=[y])], inputs=[xin], outputs=[y])
        m = match(p, g.nodes[0], "hs")
        assert bool(m) == (want is None) and (want is None or want in m.reason), m
    strict = close_to(0.5)
    assert strict(None) == "is absent (want 0.5)" and strict(0.5) is True


def test_a_check_that_raises_is_an_internal_error_naming_it():
    """A check answers, it does not raise: one that does is reported naming the pattern, the check
    and the node (the README's old alpha check raised a TypeError on a HardSigmoid without alpha)."""
    from edgefc.errors import InternalError

    p = Pattern("hardswish")
    x = p.input("x")
    p.op("Mul", x, p.op("HardSigmoid", x, name="hs", attrs={"alpha": lambda a: abs(a - 1 / 6) < 1e-6}), name="mul")
    s, y, xin = _v("s"), _v("y"), _v("x")
    g = gs.Graph(nodes=[gs.Node("HardSigmoid", "hs2", inputs=[xin], outputs=[s]),
                        gs.Node("Mul", "mul", inputs=[xin, s], outputs=[y])], inputs=[xin], outputs=[y])
    with pytest.raises(InternalError, match=r"pattern 'hardswish': the check of attribute 'alpha' of pattern node "
                                            r"'hs' raised TypeError: .* \(at HardSigmoid 'hs2'\)"):
        match(p, g.nodes[0], "hs")


def test_fusion_declarations_are_checked():
    p = silu_pattern()
    with pytest.raises(PassError, match="pattern 'silu' has 0 of the anchor nodes relu"):
        Fusion("silu", [p], anchor="relu", replacement=lambda m, rw: [])
    with pytest.raises(PassError, match="needs patterns or a matcher"):
        Fusion("x", [], anchor="a", ops=("Relu",), replacement=lambda m, rw: [])
    f = Fusion("silu", [p], anchor="sig", replacement=lambda m, rw: [])
    assert f.ops == ("Sigmoid",) and f.anchor_of(p) == "sig"


def test_a_custom_matcher_and_a_replacement_that_declines_with_a_reason():
    """Fusion(matcher=...) replaces the patterns; a replacement returning a Miss is a miss with its reason."""
    g = silu_graph()
    log = RewriteLog()
    found = Fusion("silu", [], anchor="sig", ops=("Sigmoid",),
                   matcher=lambda node, rw: rw.match(silu_pattern(), node, "sig"),
                   replacement=lambda m, rw: Miss("not today"))
    apply_fusions(g, [found], log)
    assert log.misses["silu"] == {"sig": "not today"} and len(g.nodes) == 2


def test_rewrite_engine_modules_import_one_way():
    """pattern <- matcher <- rewriter: the description imports neither, the binding not the driver."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "edgefc"
    order = ["pattern", "matcher", "rewriter"]
    for i, name in enumerate(order):
        tree = ast.parse((root / f"{name}.py").read_text())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module} | \
                   {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        later = {f"edgefc.{m}" for m in order[i + 1:]}
        assert not imported & later, (name, imported & later)


def test_a_fusion_pass_reports_what_its_declared_fusions_did():
    """FusionPass: fusions as data (or from declare(graph, ctx)); counts and misses in report["fusion"]."""
    from edgefc.pass_base import PassContext
    from edgefc.rewriter import FusionPass

    swish = Fusion("swish", [silu_pattern()], anchor="sig",
                   replacement=lambda m, rw: [gs.Node("Swish", name="swish", inputs=[m["x"]], outputs=m.outputs)])

    class Static(FusionPass):
        name = "static"
        fusions = (swish,)

    class Declared(FusionPass):
        name = "declared"

        def declare(self, graph, ctx):
            return [swish]

    for cls in (Static, Declared):
        g, ctx = silu_graph(), PassContext()
        cls()(g, ctx)
        assert [n.op for n in g.nodes] == ["Swish"] and ctx.report["fusion"] == {"swish": 1, "misses": {}}, cls
    g, ctx = silu_graph(extra_consumer=True), PassContext()
    Static()(g, ctx)
    assert ctx.report["fusion"]["swish"] == 0 and ctx.report["fusion"]["misses"]["swish"][0]["node"] == "sig"
