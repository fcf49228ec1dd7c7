"""Pass ``mlt``: TiledAttention numerics (numpy tile by tile, onnxruntime), the pass's decisions and
report, its flags and error paths, and the differential check on the tiny U-Net."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import onnx
import onnx.inliner
import onnx_graphsurgeon as gs
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

import edgefc
from edgefc import functions, ir, ort, tile_solver
from edgefc.attention import AttentionSpec, Tiling, tile_rows
from edgefc.errors import PassError
from edgefc.metrics import sqnr_db
from edgefc.pass_base import PassContext
from edgefc.passes import mlt, tiled_attention
from edgefc.tiled_attention_function import function_proto
from tests.cli import run_cli
from tests.mlt_fake_target import FakeNpu

ROOT = Path(__file__).resolve().parents[1]


# --- models ------------------------------------------------------------------------------------

def attention_node_model(b, sq, skv, heads, dk, dv, *, causal=0, scale=0.3, tiling=None, dtype=TensorProto.FLOAT,
                         granularity=None):
    """One Attention-23 (or TiledAttention with ``tiling`` cut at ``granularity``) node with Q, K, V
    as graph inputs."""
    attrs = {"q_num_heads": heads, "kv_num_heads": heads, "scale": scale, "is_causal": causal}
    if tiling is None:
        node = helper.make_node("Attention", ["Q", "K", "V"], ["Y"], **attrs)
        functions = []
    else:
        attrs["row_granularity"] = 1 if granularity is None else granularity
        node = helper.make_node("TiledAttention", ["Q", "K", "V"], ["Y"], domain="edgefc", name="attn",
                                row_tiles=tiling.row_tiles, head_tiles=tiling.head_tiles, **attrs)
        functions = [function_proto(23)]
    graph = helper.make_graph([node], "attention",
                              [helper.make_tensor_value_info("Q", dtype, [b, sq, heads * dk]),
                               helper.make_tensor_value_info("K", dtype, [b, skv, heads * dk]),
                               helper.make_tensor_value_info("V", dtype, [b, skv, heads * dv])],
                              [helper.make_tensor_value_info("Y", dtype, [b, sq, heads * dv])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23), helper.make_opsetid("edgefc", 1)],
                              functions=functions)
    model.ir_version = 10
    return model


def transformer_model(seq=256, ctx_len=77, channels=64, heads=4, ctx_channels=32, causal=0) -> onnx.ModelProto:
    """x -> self-attention (+x) -> cross-attention on ctx (+) -> y, with projections as MatMuls."""
    rng = np.random.default_rng(0)

    def w(name, shape):
        return numpy_helper.from_array((rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32), name)

    inits = [w("wq", (channels, channels)), w("wk", (channels, channels)), w("wv", (channels, channels)),
             w("wo", (channels, channels)), w("wq2", (channels, channels)), w("wk2", (ctx_channels, channels)),
             w("wv2", (ctx_channels, channels)), w("wo2", (channels, channels))]
    scale = float(1 / np.sqrt(channels // heads))
    mm = lambda a, b, y: helper.make_node("MatMul", [a, b], [y])
    nodes = [mm("x", "wq", "q"), mm("x", "wk", "k"), mm("x", "wv", "v"),
             helper.make_node("Attention", ["q", "k", "v"], ["a"], name="self_attn", q_num_heads=heads,
                              kv_num_heads=heads, scale=scale, is_causal=causal),
             mm("a", "wo", "o"), helper.make_node("Add", ["o", "x"], ["h"]),
             mm("h", "wq2", "q2"), mm("ctx", "wk2", "k2"), mm("ctx", "wv2", "v2"),
             helper.make_node("Attention", ["q2", "k2", "v2"], ["a2"], name="cross_attn", q_num_heads=heads,
                              kv_num_heads=heads, scale=scale),
             mm("a2", "wo2", "o2"), helper.make_node("Add", ["o2", "h"], ["y"])]
    graph = helper.make_graph(nodes, "transformer",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, seq, channels]),
                               helper.make_tensor_value_info("ctx", TensorProto.FLOAT, [1, ctx_len, ctx_channels])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, seq, channels])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])


@pytest.fixture
def transformer(tmp_path) -> Path:
    path = tmp_path / "transformer.onnx"
    onnx.save_model(transformer_model(), str(path))
    return path


def qkv(rng, b, sq, skv, heads, dk, dv, dtype=np.float32):
    return (rng.standard_normal((b, sq, heads * dk)).astype(dtype), rng.standard_normal((b, skv, heads * dk)).astype(dtype),
            rng.standard_normal((b, skv, heads * dv)).astype(dtype))


def run_model(model, feeds):
    out = ort.run(model, feeds)
    return out[next(iter(out))] if isinstance(out, dict) else out[0]


# Shapes x tilings: uneven rows (not a multiple of the granularity or of the row tiles), causal,
# batch 2, one head, many tiles.
CASES = [
    # b, sq, skv, heads, dk, dv, causal, granularity, tiling
    (1, 64, 64, 4, 8, 8, 0, 16, Tiling(4, 2)),
    (1, 77, 77, 3, 16, 16, 1, 16, Tiling(5, 3)),
    (2, 70, 33, 4, 8, 12, 0, 8, Tiling(3, 4)),
    (1, 64, 64, 2, 8, 8, 1, 16, Tiling(4, 1)),
    (1, 50, 70, 2, 8, 8, 1, 16, Tiling(2, 2)),
    (1, 256, 77, 8, 5, 5, 0, 16, Tiling(16, 8)),
    (1, 100, 100, 1, 32, 32, 0, 4, Tiling(25, 1)),
    (1, 256, 256, 8, 40, 40, 0, 16, Tiling(1, 1)),
]


# --- numerics ----------------------------------------------------------------------------------

@pytest.mark.parametrize("b,sq,skv,heads,dk,dv,causal,g,tiling", CASES)
def test_numpy_tile_by_tile_equals_untiled(b, sq, skv, heads, dk, dv, causal, g, tiling):
    rng = np.random.default_rng(1)
    q, k, v = qkv(rng, b, sq, skv, heads, dk, dv)
    seen = []
    spec = AttentionSpec("t", b, heads, sq, skv, dk, dv, "fp32", bool(causal))
    y = tiled_attention.tiled_attention_numpy(q, k, v, heads, 0.3, bool(causal), tiling, g,
                                  on_tile=lambda t, rows, hp, s: seen.append((t, s.shape)))
    ref = edgefc.attention.reference(q, k, v, 0.3, "TopLeft" if causal else None, heads=heads)
    assert np.abs(y - ref).max() <= 1e-5
    rows = tile_rows(spec, tiling, g)
    assert [t for t, _ in seen] == list(range(tiling.tiles))
    assert all(shape == (b, heads // tiling.head_tiles, rows, skv) for _, shape in seen)  # S_in of one tile


@pytest.mark.parametrize("b,sq,skv,heads,dk,dv,causal,g,tiling", CASES)
def test_onnxruntime_tiled_attention_equals_attention(b, sq, skv, heads, dk, dv, causal, g, tiling):
    rng = np.random.default_rng(2)
    q, k, v = qkv(rng, b, sq, skv, heads, dk, dv)
    feeds = {"Q": q, "K": k, "V": v}
    tiled = attention_node_model(b, sq, skv, heads, dk, dv, causal=causal, tiling=tiling)
    onnx.checker.check_model(tiled, full_check=True)
    y_ref = run_model(attention_node_model(b, sq, skv, heads, dk, dv, causal=causal), feeds)
    y = run_model(tiled, feeds)
    assert y.shape == y_ref.shape and np.abs(y - y_ref).max() <= 1e-5
    assert np.abs(y - edgefc.attention.reference(q, k, v, 0.3, "TopLeft" if causal else None, heads=heads)).max() <= 1e-5
    # The body is plain ONNX: inlining the function gives the same graph onnxruntime ran.
    inlined = onnx.inliner.inline_local_functions(tiled)
    assert not inlined.functions and "TiledAttention" not in {n.op_type for n in inlined.graph.node}
    assert np.abs(run_model(inlined, feeds) - y).max() == 0


@pytest.mark.parametrize("b,sq,skv,heads,dk,dv,causal,g,tiling", CASES + [(1, 64, 64, 4, 8, 8, 0, 1, Tiling(3, 2)),
                                                                    (1, 77, 77, 2, 8, 8, 1, 8, Tiling(3, 1))])
def test_onnx_body_builds_the_tiles_the_cost_model_prices(b, sq, skv, heads, dk, dv, causal, g, tiling):
    """The tiles onnxruntime runs (the Loop of the TiledAttention body), the tiles edgefc.attention
    defines and the tiles the Program prices are the same: count, rows, heads, real MACs."""
    from edgefc.attention import tile_grid

    rng = np.random.default_rng(4)
    q, k, v = qkv(rng, b, sq, skv, heads, dk, dv)
    model = attention_node_model(b, sq, skv, heads, dk, dv, causal=causal, tiling=tiling, granularity=g)
    grid = tile_grid(sq, heads, tiling, g)
    inlined = onnx.inliner.inline_local_functions(model)
    (loop,) = [n for n in inlined.graph.node if n.op_type == "Loop"]
    inlined.graph.output.append(helper.make_tensor_value_info(loop.output[-1], TensorProto.FLOAT, None))  # the scan output
    out = ort.run(inlined, {"Q": q, "K": k, "V": v})
    assert out[loop.output[-1]].shape == (grid.tiles, b, grid.heads, grid.rows, dv)
    assert np.abs(out["Y"] - edgefc.attention.reference(q, k, v, 0.3, "TopLeft" if causal else None, heads=heads)).max() <= 1e-5
    # the Program prices those tiles (rows padded to the target's granularity, real MACs exact)
    target = edgefc.get_target("exynos2400")
    prog = target.lower(edgefc.infer_shapes(gs.import_onnx(model)))
    qk = [c for c in prog.commands if c.role == "qk_matmul"]
    assert sum(c.repeat for c in qk) == b * grid.tiles
    # a causal row tile reads only the keys its rows can see (as the TVM build runs it)
    keys = [min(r1, skv) if causal and grid.row_tiles > 1 else skv for _, r1 in grid.row_bounds()]
    real = [r1 - r0 for r0, r1 in grid.row_bounds()]
    assert sum(c.total_macs for c in qk) == b * heads * dk * sum(r * k for r, k in zip(real, keys))
    rg, cg = target.row_granularity, target.arch.tensor.channel_granularity
    pad = lambda n, m: -(-n // m) * m
    assert {c.padded_macs for c in qk} == {grid.heads * pad(grid.rows, rg) * pad(k, cg) * pad(dk, cg) for k in keys}


def test_tile_grid_is_the_one_tiling():
    from edgefc.attention import tile_grid

    assert tile_grid(4096, 8, Tiling(8, 1), 16).row_bounds() == [(i * 512, (i + 1) * 512) for i in range(8)]
    g = tile_grid(77, 8, Tiling(2, 4), 8)    # 77 rows -> 10 granules -> 2 tiles of 40 rows, the last holds 37
    assert (g.rows, g.padded_rows, g.heads) == (40, 80, 2) and g.row_bounds() == [(0, 40), (40, 77)]
    assert g.row_sizes() == [(40, 1), (37, 1)] and g.head_bounds() == [(0, 2), (2, 4), (4, 6), (6, 8)]
    g = tile_grid(64, 4, Tiling(3, 1), 1)    # not a divisor: 3 tiles of 22 rows, padded to 66
    assert (g.rows, g.padded_rows) == (22, 66) and g.row_sizes() == [(22, 2), (20, 1)]
    with pytest.raises(ValueError, match="leave a tile without"):
        tile_grid(64, 4, Tiling(3, 1), 16)   # 4 granules in 3 tiles of 2: the third would be empty
    with pytest.raises(ValueError, match="do not divide 4 heads"):
        tile_grid(64, 4, Tiling(1, 3), 16)
    assert tile_grid(77, 8, Tiling(1, 1), 16).row_sizes() == [(77, 1)]


def test_onnxruntime_tiled_attention_fp16():
    rng = np.random.default_rng(3)
    q, k, v = qkv(rng, 1, 64, 64, 4, 8, 8, np.float16)
    feeds = {"Q": q, "K": k, "V": v}
    y_ref = run_model(attention_node_model(1, 64, 64, 4, 8, 8, causal=1, dtype=TensorProto.FLOAT16), feeds)
    y = run_model(attention_node_model(1, 64, 64, 4, 8, 8, causal=1, tiling=Tiling(4, 2), dtype=TensorProto.FLOAT16), feeds)
    assert y.dtype == np.float16 and np.abs(y.astype(np.float32) - y_ref.astype(np.float32)).max() <= 4e-3


# --- the pass ------------------------------------------------------------------------------------

def compile_fake(model, target=None, **options):
    return edgefc.compile(model, target or FakeNpu(sram_bytes=256 << 10), passes=["canonicalize", "mlt"],
                          options=options)


def test_pass_tiles_what_does_not_fit_and_matches_onnxruntime(transformer):
    tgt = FakeNpu(sram_bytes=256 << 10)
    res = edgefc.compile(transformer, tgt, passes=["canonicalize", "mlt"], verify=True)
    tiled = {n.name: n for n in res.graph.nodes if n.op == "TiledAttention"}
    assert set(tiled) == {"self_attn", "cross_attn"} and not any(n.op == "Attention" for n in res.graph.nodes)
    rep = res.report["tiling"]
    assert rep["tiled"] == 2 and rep["left_alone"] == 0
    assert rep["budget_bytes"] == tile_solver.default_budget(tgt) and rep["row_granularity"] == 16
    for block in rep["blocks"]:
        node = tiled[block["name"]]
        spec = edgefc.attention.spec_from_node(node)
        sol = tile_solver.brute_force(spec, tgt, rep["budget_bytes"])
        assert (node.attrs["row_tiles"], node.attrs["head_tiles"]) == (sol.tiling.row_tiles, sol.tiling.head_tiles)
        assert block["tiling"]["row_tiles"] == sol.tiling.row_tiles and block["sram_bytes"] == sol.sram_bytes
        assert block["sram_bytes"] <= rep["budget_bytes"] < block["untiled_sram_bytes"]
        assert block["predicted_cycles"] == sol.cycles and block["candidates"] == sol.candidates
        assert block["predicted_ms"] == pytest.approx(sol.cycles / tgt.clock_hz * 1e3)
        assert block["solver_ms"] >= 0 and "fastest tiling that fits" in block["reason"]
    assert res.records[-1].verify_rel_error <= 1e-5
    feeds = ort.random_inputs(res.graph, seed=5)
    ref = ort.run(ir.to_model(edgefc.load(transformer)), feeds)
    out = ort.run(ir.to_model(res.graph), feeds)
    assert max(float(np.abs(ref[k] - out[k]).max()) for k in ref) <= 1e-5


def test_pass_leaves_attentions_that_fit_alone(transformer):
    res = compile_fake(transformer, FakeNpu(sram_bytes=64 << 20))
    assert [n.op for n in res.graph.nodes].count("Attention") == 2
    rep = res.report["tiling"]
    assert rep["tiled"] == 0 and rep["left_alone"] == 2
    assert rep["blocks"] and all(b["tiling"] is None and b["reason"].startswith("fits") for b in rep["blocks"])
    assert not res.graph.functions


def test_pass_with_explicit_budget(transformer):
    budget = 200 << 10
    res = compile_fake(transformer, FakeNpu(sram_bytes=6 << 20), sram_budget="200KiB")
    rep = res.report["tiling"]
    assert rep["budget_bytes"] == budget and rep["budget_source"] == "--sram-budget"
    assert rep["tiled"] == 2 and all(b["sram_bytes"] <= budget for b in rep["blocks"])


def test_explicit_infeasible_budget_is_an_error(transformer):
    with pytest.raises(tile_solver.InfeasibleBudgetError) as e:
        compile_fake(transformer, FakeNpu(), sram_budget=1024)
    assert "--sram-budget" in str(e.value) and "\n" not in str(e.value)


def test_default_budget_that_nothing_fits_leaves_the_attention_untiled(transformer):
    res = compile_fake(transformer, FakeNpu(sram_bytes=16 << 10))
    rep = res.report["tiling"]
    assert rep["tiled"] == 0 and all("no tiling fits" in b["reason"] and b["min_budget_bytes"] > rep["budget_bytes"]
                                     for b in rep["blocks"])


def test_budget_above_the_target_sram_is_an_error(transformer):
    with pytest.raises(PassError, match="exceeds the SRAM"):
        compile_fake(transformer, FakeNpu(sram_bytes=1 << 20), sram_budget="2MiB")


def test_no_mlt_and_targets_without_cost_model(transformer):
    res = compile_fake(transformer, no_mlt=True)
    assert res.report["tiling"]["skipped"] == "disabled by --no-mlt"
    assert not any(n.op == "TiledAttention" for n in res.graph.nodes)
    class Cpu(edgefc.Target):
        name = "cpu"

    cpu = Cpu()
    assert edgefc.compile(transformer, None, passes=["mlt"]).report["tiling"]["skipped"] == "no NPU target"
    assert edgefc.compile(transformer, cpu, passes=["mlt"]).report["tiling"]["skipped"] == "no NPU target"
    bare = FakeNpu()
    bare.has_cost_model = False
    assert "no attention cost model" in compile_fake(transformer, bare).report["tiling"]["skipped"]


def test_default_pipeline_has_mlt_for_npu_targets_unless_no_mlt():
    npu = FakeNpu()
    assert edgefc.default_pipeline(npu, {})[-1] == "mlt"
    assert "mlt" not in edgefc.default_pipeline(npu, {"no_mlt": True})
    assert "mlt" not in edgefc.default_pipeline(None, {})


def test_pass_is_idempotent_and_survives_canonicalize(transformer):
    res = compile_fake(transformer)
    again = edgefc.compile(res.graph, FakeNpu(sram_bytes=256 << 10), passes=["mlt", "canonicalize"])
    assert again.report["tiling"]["blocks"]
    assert all(b["reason"] == "already tiled" for b in again.report["tiling"]["blocks"])
    assert [n.op for n in again.graph.nodes] == [n.op for n in res.graph.nodes]
    feeds = ort.random_inputs(res.graph, seed=1)
    a, b = ort.run(ir.to_model(res.graph), feeds), ort.run(ir.to_model(again.graph), feeds)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_build_folder_keeps_the_tiled_model(transformer, tmp_path):
    res = edgefc.compile(transformer, FakeNpu(sram_bytes=256 << 10), passes=["canonicalize", "mlt"],
                         output=tmp_path / "build")
    model = onnx.load(str(tmp_path / "build" / "model.onnx"))
    onnx.checker.check_model(model, full_check=True)
    assert [f.name for f in model.functions] == ["TiledAttention"]
    assert {(o.domain, o.version) for o in model.opset_import} >= {("edgefc", 1), ("", 23)}
    report = json.loads((tmp_path / "build" / "report.json").read_text())
    assert report["tiling"]["tiled"] == 2
    g = edgefc.load(tmp_path / "build" / "model.onnx")
    assert all(ir.static_shape(t) is not None for t in g.tensors().values() if t.name)
    assert [n.attrs["row_tiles"] for n in g.nodes if n.op == "TiledAttention"] == \
        [b["tiling"]["row_tiles"] for b in res.report["tiling"]["blocks"]]


def test_deployed_activation_dtype():
    import onnx_graphsurgeon as gs

    from edgefc import precision
    from edgefc.deployed_types import DeployedTypes

    x16 = gs.Variable("x16", dtype=np.int16, shape=[1])
    dq_out = gs.Variable("dq", dtype=np.float32, shape=[1])
    h = gs.Variable("h", dtype=np.float16, shape=[1])
    f32 = gs.Variable("f", dtype=np.float32, shape=[1])
    # A float tensor quantized by a consumer QuantizeLinear, seen through a Reshape.
    mm, r, q = (gs.Variable("mm", dtype=np.float32, shape=[1, 4]), gs.Variable("r", dtype=np.float32, shape=[4]),
                gs.Variable("q", dtype=np.int16, shape=[4]))
    nodes = [gs.Node("DequantizeLinear", inputs=[x16, gs.Constant("s", np.ones(1, np.float32))], outputs=[dq_out]),
             gs.Node("Reshape", inputs=[mm, gs.Constant("shp", np.array([4], np.int64))], outputs=[r]),
             gs.Node("QuantizeLinear", inputs=[r, gs.Constant("s2", np.ones(1, np.float32))], outputs=[q])]
    g = gs.Graph(nodes=nodes, inputs=[x16, h, f32, mm], outputs=[dq_out, q])
    built = DeployedTypes(g)
    assert built.of(dq_out) == "int16" and built.of(h) == "fp16" and built.of(f32) == "fp32" and built.of(mm) == "int16"
    assert DeployedTypes(g, "w8a16").of(f32) == "int16" and DeployedTypes(g, "fp16").of(f32) == "fp16"
    # mlt sizes an attention by its recorded precision when quantize recorded one, else by Q's stored type
    q3, k3, v3, o3 = (gs.Variable(n, dtype=np.float32, shape=[1, 8, 16]) for n in "qkvo")
    att = gs.Node("Attention", inputs=[q3, k3, v3], outputs=[o3], attrs={"q_num_heads": 2, "kv_num_heads": 2})
    ga = gs.Graph(nodes=[att], inputs=[q3, k3, v3], outputs=[o3])
    assert mlt.attention_types(ga).attention_act_type(att) == "fp32"
    assert mlt.attention_types(ga, "w8a8").attention_act_type(att) == "int8"   # what-if: nothing recorded
    precision.set_op_precision(att, "fp16")
    assert mlt.attention_types(ga, "w8a16").attention_act_type(att) == "fp16"  # the record wins


def test_tiled_attention_keeps_the_precision_record(transformer):
    """A TiledAttention carries the precision quantize recorded on the Attention it replaces, and
    the solver sizes it at that precision (FP16 here, though the graph's tensors are FP32)."""
    from edgefc import precision
    from edgefc.pass_base import PassContext

    g = edgefc.compile(transformer, None, passes=["canonicalize"]).graph
    for n in g.nodes:
        if n.op == "Attention":
            precision.set_op_precision(n, "fp16")
    ctx = PassContext(target=FakeNpu(sram_bytes=256 << 10))
    out = edgefc.get_pass("mlt")(g, ctx)
    tiled = [n for n in out.nodes if n.op == "TiledAttention"]
    assert tiled and all(precision.op_precision(n) == "fp16" for n in tiled)
    assert {b["spec"]["act_dtype"] for b in ctx.report["tiling"]["blocks"]} == {"fp16"}


def test_explain_tiling_tables(transformer):
    res = compile_fake(transformer)
    tables = mlt.explain_tiling(res.graph, FakeNpu(sram_bytes=256 << 10))
    assert [t["block"] for t in tables] == ["self_attn", "cross_attn"]
    for t in tables:
        assert t["op"] == "TiledAttention" and t["choice"]["row_tiles"] == t["built_tiling"]["row_tiles"]


# --- command line ----------------------------------------------------------------------------------

def _plugin(tmp_path: Path, sram: int) -> Path:
    """A plugin registering the synthetic NPU as target 'fake-npu' (so the real CLI can use it)."""
    p = tmp_path / "fake_npu_plugin.py"
    p.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        from edgefc.target import register_target, _TARGETS
        from tests.mlt_fake_target import FakeNpu
        if "fake-npu" not in _TARGETS:
            register_target("fake-npu", lambda: FakeNpu(sram_bytes={sram}))
    """))
    return p




def one_line_error(rc, out, *needles):
    assert rc == 2 and "Traceback" not in out, out
    lines = [line for line in out.splitlines()  # progress lines (indented) may come first
             if line.strip() and not line.startswith("compiling") and not line.startswith("  ")]
    assert len(lines) == 1 and lines[0].startswith("error:"), out
    for n in needles:
        assert n in lines[0], lines[0]


def test_cli_sram_budget_and_no_mlt(transformer, tmp_path):
    plugin = _plugin(tmp_path, 6 << 20)
    rc, out = run_cli("compile", str(transformer), "--plugin", str(plugin), "--target", "fake-npu", "--passes",
                      "canonicalize,mlt", "--sram-budget", "192KiB", "-o", str(tmp_path / "b1"))
    assert rc == 0, out
    rep = json.loads((tmp_path / "b1" / "report.json").read_text())["tiling"]
    assert rep["budget_bytes"] == 192 << 10 and rep["tiled"] == 2
    rc, out = run_cli("compile", str(transformer), "--plugin", str(plugin), "--target", "fake-npu", "--passes",
                      "canonicalize,mlt", "--no-mlt", "-o", str(tmp_path / "b2"))
    assert rc == 0, out
    assert json.loads((tmp_path / "b2" / "report.json").read_text())["tiling"]["skipped"] == "disabled by --no-mlt"


@pytest.mark.parametrize("value,needles", [("4MB", ("binary units", "4MiB")), ("abc", ("bad SRAM budget",)),
                                           ("0", ("positive",))])
def test_cli_bad_sram_budget_is_one_line(transformer, tmp_path, value, needles):
    one_line_error(*run_cli("compile", str(transformer), "--sram-budget", value, "-o", str(tmp_path / "b")), *needles)
    assert not (tmp_path / "b").exists()


def test_cli_infeasible_and_too_large_budgets_are_one_line(transformer, tmp_path):
    plugin = _plugin(tmp_path, 1 << 20)
    base = ("compile", str(transformer), "--plugin", str(plugin), "--target", "fake-npu", "--passes", "canonicalize,mlt")
    one_line_error(*run_cli(*base, "--sram-budget", "1KiB", "-o", str(tmp_path / "b")), "too small", "--sram-budget")
    one_line_error(*run_cli(*base, "--sram-budget", "2MiB", "-o", str(tmp_path / "b")), "exceeds the SRAM")
    assert not (tmp_path / "b").exists()


def test_cli_help_lists_the_flags():
    from edgefc.cli import cli

    out = CliRunner().invoke(cli, ["compile", "--help"]).output
    assert "--no-mlt" in out and "--sram-budget" in out


# --- the tiny U-Net, fused then tiled, against the unfused model -----------------------------------

def test_tiny_unet_tiled_matches_onnxruntime(tiny_models):
    fused = edgefc.compile(tiny_models["unet"], None, passes=["canonicalize", "fuse"]).graph
    n_attn = sum(n.op == "Attention" for n in fused.nodes)
    assert n_attn > 0
    # The budget: the smallest at which every attention has a tiling that fits, so every one
    # that does not fit untiled is tiled, and none is left spilling.
    tgt = FakeNpu(sram_bytes=1 << 20, row_granularity=1, channel_granularity=8)
    specs = [edgefc.attention.spec_from_node(n) for n in fused.nodes if n.op == "Attention"]
    need = []
    for spec in specs:
        with pytest.raises(tile_solver.InfeasibleBudgetError) as e:
            tile_solver.solve(spec, tgt, 1)
        need.append(e.value.min_budget)
    budget = max(need)
    must_tile = sum(tgt.attention_sram_bytes(s, Tiling(1, 1)) > budget for s in specs)
    assert must_tile >= n_attn // 2
    ctx = PassContext(target=tgt, options={"sram_budget": budget})
    tiled = mlt.ModelLevelTiling().run(fused, ctx)
    rep = ctx.report["tiling"]
    assert rep["tiled"] == must_tile == sum(n.op == "TiledAttention" for n in tiled.nodes)
    assert rep["tiled"] + rep["left_alone"] == n_attn
    untiled = [b for b in rep["blocks"] if not b["tiling"]]
    assert len(untiled) == n_attn - must_tile and all(b["reason"].startswith("fits") for b in untiled)
    assert any(b["tiling"]["row_tiles"] > 1 for b in rep["blocks"] if b["tiling"])
    assert any(b["tiling"]["head_tiles"] > 1 for b in rep["blocks"] if b["tiling"])
    src = edgefc.load(tiny_models["unet"])
    feeds = ort.random_inputs(src, seed=3)
    ref = ort.run(ir.to_model(src), feeds)
    out = ort.run(ir.to_model(tiled), feeds)
    for k in ref:
        assert np.abs(ref[k] - out[k]).max() <= 1e-4 * max(1.0, float(np.abs(ref[k]).max()))


def test_cli_profile_explain_tiling(tmp_path):
    import edgefc.cli as cli_mod

    assert edgefc.get_target("exynos2400").has_cost_model
    path = tmp_path / "t.onnx"
    onnx.save_model(transformer_model(seq=1024, channels=320, heads=8, ctx_channels=768), str(path))
    res = CliRunner().invoke(cli_mod.cli, ["profile", str(path), "--explain-tiling", "--precision", "w8a16", "--top", "3"])
    assert res.exit_code == 0, res.output
    assert "self_attn: 8 heads x 1024 x 1024" in res.output and "<- chosen" in res.output
    res = CliRunner().invoke(cli_mod.cli, ["profile", str(path), "--explain-tiling", "--sram-budget", "1KiB"])
    assert res.exit_code == 0 and "no tiling fits" in res.output and "--sram-budget" in res.output


# --- full size (slow) ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def full_unet(tmp_path_factory) -> Path:
    """The full-size BK-SDM-Tiny U-Net (512x512, seed 0), exported for this module."""
    from edgefc.models.export import export_component

    return export_component("unet", "bk-sdm-tiny", tmp_path_factory.mktemp("full") / "unet.onnx", progress=False)


@pytest.mark.slow
def test_full_size_self_attention_tile_by_tile():
    """The 64x64 self-attention of the BK-SDM-Tiny U-Net (8 heads x 4096 x 4096, head dim 40) at the
    real target's tiling: numpy tile by tile and onnxruntime's TiledAttention vs the untiled op."""
    tgt = edgefc.get_target("exynos2400")
    assert tgt.has_cost_model
    spec = AttentionSpec("self64", 1, 8, 4096, 4096, 40, 40, "int16")
    sol = tile_solver.solve(spec, tgt, tile_solver.default_budget(tgt))
    assert sol.tiling.tiles > 1
    rng = np.random.default_rng(0)
    q, k, v = qkv(rng, 1, 4096, 4096, 8, 40, 40)
    scale = 40 ** -0.5
    ref = run_model(attention_node_model(1, 4096, 4096, 8, 40, 40, scale=scale), {"Q": q, "K": k, "V": v})
    y = tiled_attention.tiled_attention_numpy(q, k, v, 8, scale, False, sol.tiling, edgefc.attention.row_granularity(tgt))
    assert np.abs(y - ref).max() <= 1e-5
    y = run_model(attention_node_model(1, 4096, 4096, 8, 40, 40, scale=scale, tiling=sol.tiling), {"Q": q, "K": k, "V": v})
    assert np.abs(y - ref).max() <= 1e-5


@pytest.mark.slow
def test_full_size_unet_tiled_matches_onnxruntime(full_unet):
    """Full-size BK-SDM-Tiny U-Net: canonicalize + fuse + mlt (tiled for the deployed INT16
    activations) against onnxruntime on the unoptimised export."""
    res = edgefc.compile(full_unet, "exynos2400", passes=["canonicalize", "fuse", "mlt"],
                         options={"precision": "w8a16"})
    assert res.report["tiling"]["tiled"] >= 6
    feeds = ort.random_inputs(res.graph, seed=0)
    out = ort.run(ir.to_model(res.graph), feeds)
    del res
    ref = ort.run(full_unet, feeds)
    for k in ref:
        assert np.abs(ref[k] - out[k]).max() <= 1e-4 * float(np.abs(ref[k]).max())


# --- loading as users do: onnxruntime's default session options --------------------------------

_LOAD_AND_RUN = """
import sys, numpy as np, onnxruntime as ort
path = sys.argv[1]
feeds = dict(np.load(sys.argv[2]))
outs = {}
for level in (ort.GraphOptimizationLevel.ORT_ENABLE_ALL, ort.GraphOptimizationLevel.ORT_DISABLE_ALL):
    opts = ort.SessionOptions()          # the defaults a user gets (ORT_ENABLE_ALL), then none
    opts.graph_optimization_level = level
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    outs[str(level)] = sess.run(None, feeds)[0]
a, b = outs.values()
print(float(np.abs(a - b).max()))
"""


def load_with_default_options(model_path, feeds, tmp_path) -> float:
    """Create onnxruntime sessions of ``model_path`` in a child process (an abort must not end the
    test run) with the default session options (all graph optimisations) and with none; both run
    ``feeds``. Returns the max abs difference of their first outputs; fails naming the child's
    exit status and last stderr line."""
    import subprocess
    import sys

    np.savez(tmp_path / "feeds.npz", **feeds)
    proc = subprocess.run([sys.executable, "-c", _LOAD_AND_RUN, str(model_path), str(tmp_path / "feeds.npz")],
                          capture_output=True, text=True, timeout=600, check=False)
    last = (proc.stderr.strip().splitlines() or [""])[-1]
    assert proc.returncode == 0, f"onnxruntime exit status {proc.returncode}: {last}"
    return float(proc.stdout.split()[-1])


def dq_tiled_attention_model(b, sq, skv, heads, d, tiling) -> onnx.ModelProto:
    """Q, K, V arrive as int16 and pass a DequantizeLinear each before a TiledAttention, as in a
    W8A16 build: the pattern onnxruntime's QDQ propagation meets after inlining the function."""
    attrs = {"q_num_heads": heads, "kv_num_heads": heads, "scale": 0.3, "is_causal": 0, "row_granularity": 1,
             "row_tiles": tiling.row_tiles, "head_tiles": tiling.head_tiles}
    nodes = [helper.make_node("DequantizeLinear", [f"{x}16", "s", "z"], [x], name=f"dq_{x}") for x in "QKV"]
    nodes.append(helper.make_node("TiledAttention", ["Q", "K", "V"], ["Y"], domain="edgefc", name="attn", **attrs))
    inits = [numpy_helper.from_array(np.float32(0.01), "s"), numpy_helper.from_array(np.int16(0), "z")]
    graph = helper.make_graph(nodes, "dq_attention",
                              [helper.make_tensor_value_info("Q16", TensorProto.INT16, [b, sq, heads * d]),
                               helper.make_tensor_value_info("K16", TensorProto.INT16, [b, skv, heads * d]),
                               helper.make_tensor_value_info("V16", TensorProto.INT16, [b, skv, heads * d])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [b, sq, heads * d])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23), helper.make_opsetid("edgefc", 1)],
                              functions=[function_proto(23)])
    model.ir_version = 10
    return model


@pytest.mark.parametrize("tiling", [Tiling(2, 1), Tiling(2, 2), Tiling(1, 2)])
def test_tiled_attention_behind_dequantize_loads_with_default_session_options(tmp_path, tiling):
    """onnxruntime 1.32's QDQ propagation (a level-1 optimizer, on by default) moves a
    DequantizeLinear forward through Reshape/Transpose; when such a tensor was read by the Loop
    body as an outer-scope (implicit) value, it rewired an input index that does not exist and
    aborted the process (issue 18 item 1). The body now hands the Loop its operands explicitly."""
    model = dq_tiled_attention_model(1, 32, 16, 4, 8, tiling)
    onnx.checker.check_model(model, full_check=True)
    path = tmp_path / "m.onnx"
    onnx.save_model(model, str(path))
    rng = np.random.default_rng(0)
    feeds = {f"{x}16": rng.integers(-3000, 3000, (1, 32 if x == "Q" else 16, 32)).astype(np.int16) for x in "QKV"}
    assert load_with_default_options(path, feeds, tmp_path) <= 1e-5
    q, k, v = (feeds[f"{x}16"].astype(np.float32) * 0.01 for x in "QKV")
    y = run_model(model, feeds)
    assert np.abs(y - edgefc.attention.reference(q, k, v, 0.3, heads=4)).max() <= 1e-4


# --- the deferred normalisation of a W8A8 attention ----------------------------------------------

@pytest.mark.parametrize("causal", [0, 1])
@pytest.mark.parametrize("tiling", [Tiling(1, 1), Tiling(3, 2)])
def test_deferred_body_is_the_numpy_reference(causal, tiling):
    """The ``deferred`` overload of TiledAttention (UINT8 exp(S - max), divided after S x V) computes
    what ``edgefc.attention.reference(deferred=True)`` and the tile-by-tile numpy compute, under
    onnxruntime's default optimisations and with them off; it differs from the softmax."""
    b, sq, skv, heads, dk, dv = 2, 70, 50, 4, 8, 6
    model = attention_node_model(b, sq, skv, heads, dk, dv, causal=causal, tiling=tiling, granularity=4)
    node = model.graph.node[0]
    node.attribute.append(helper.make_attribute("deferred_normalization", 1))
    model = functions.attach_functions(model)
    assert node.overload == "deferred" and [f.overload for f in model.functions] == ["deferred"]
    onnx.checker.check_model(model, full_check=True)
    q, k, v = (x * 3 for x in qkv(np.random.default_rng(0), b, sq, skv, heads, dk, dv))
    mask = "TopLeft" if causal else None
    want = edgefc.attention.reference(q, k, v, 0.3, mask, heads=heads, deferred=True)
    np.testing.assert_allclose(tiled_attention.tiled_attention_numpy(q, k, v, heads, 0.3, bool(causal), tiling, 4,
                                                                     deferred=True), want, atol=1e-5)
    for optimize in (True, False):
        y = ort.session(model, optimize=optimize).run(None, {"Q": q, "K": k, "V": v})[0]
        assert y.dtype == np.float32 and y.shape == want.shape
        np.testing.assert_allclose(y, want, atol=1e-5)
    softmax = edgefc.attention.reference(q, k, v, 0.3, mask, heads=heads)
    assert np.abs(softmax - want).max() > 1e-3


def test_w8a8_compile_defers_the_normalisation_where_it_pays(tmp_path):
    """``--precision w8a8`` on an NPU target: the attentions over 1024 query rows are priced faster
    with their normalisation deferred and become TiledAttention with ``deferred_normalization``
    (tiled by MLT like any attention, S_out x V at int8xint8); the build loads and runs (the
    compile's handover) and stays close to FP32. Over 64 rows the extra hand-offs cost more than
    the narrower S_out saves: those attentions keep INT16 softmax internals."""
    def build(seq: int):
        src = tmp_path / f"t{seq}.onnx"
        onnx.save_model(transformer_model(seq=seq), str(src))
        out = tmp_path / f"b{seq}"
        rc, text = run_cli("compile", str(src), "--target", "exynos2400", "--precision", "w8a8", "-o", str(out))
        assert rc == 0, text
        rows = {o["name"]: o for o in json.loads((out / "profile.json").read_text())["ops"]}
        nodes = {n.name: n for n in edgefc.ir.load(out / "model.onnx").nodes}
        return src, out, json.loads((out / "report.json").read_text())["quantization"], nodes, rows

    src, out, report, nodes, rows = build(1024)
    assert report["deferred_normalization"] == 2
    for name in ("self_attn", "cross_attn"):
        assert nodes[name].op == "TiledAttention" and nodes[name].attrs["deferred_normalization"] == 1
        assert rows[name]["precision"] == "int8xint8"
    assert nodes["self_attn"].attrs["row_tiles"] * nodes["self_attn"].attrs["head_tiles"] > 1
    feeds = {"x": np.random.default_rng(1).standard_normal((1, 1024, 64)).astype(np.float32),
             "ctx": np.random.default_rng(2).standard_normal((1, 77, 32)).astype(np.float32)}
    want, got = run_model(onnx.load(str(src)), feeds), run_model(str(out / "model.onnx"), feeds)
    assert got.dtype == want.dtype and got.shape == want.shape and sqnr_db(want, got) > 20

    _, _, report, nodes, rows = build(64)
    assert "deferred_normalization" not in report
    assert nodes["self_attn"].op == "Attention" and rows["self_attn"]["precision"] == "int8xint8+int8xint16"
