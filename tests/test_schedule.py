"""Schedules beyond the paper's (issue 21): the roofline of every profile, pipelined MLT, cross-op
prefetch, ``--schedule`` by name -- each priced by hand from the documented rules
(PERFORMANCE.md "Roofline", "Schedules")."""

from __future__ import annotations

import csv
import json

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper

import edgefc
from edgefc import tile_solver
from edgefc.attention import AttentionSpec, Tiling
from edgefc.targets.cost_model import command_cycles, pipelined_block
from edgefc.targets.geometry import pad
from tests import npu_graphs
from tests.cli import assert_user_error, run_cli


def graph_of(model) -> gs.Graph:
    return edgefc.infer_shapes(gs.import_onnx(model))


@pytest.fixture(scope="module")
def target():
    """Weights streamed per op (a tiny model's would stay resident, and prefetch moves loads)."""
    return edgefc.get_target("exynos2400").with_fields({"sram.resident_weights": False})


def two_matmuls(m=256, k=512, n=512) -> onnx.ModelProto:
    """x[1,m,k] @ w1 -> Softmax -> @ w2 -> y: two weighted tensor ops with a vector op between
    that moves nothing (its input and output stay in SRAM)."""
    rng = np.random.default_rng(0)
    t = TensorProto.FLOAT
    inits = [numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal((n, n)).astype(np.float32), "w2")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
             helper.make_node("Softmax", ["h"], ["s"], name="sm", axis=-1),
             helper.make_node("MatMul", ["s", "w2"], ["y"], name="mm2")]
    return helper.make_model(helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", t, [1, m, k])],
                                               [helper.make_tensor_value_info("y", t, [1, m, n])], inits),
                             opset_imports=[helper.make_opsetid("", 23)])


# --- roofline ----------------------------------------------------------------------------------

def test_roofline_of_one_matmul_by_hand(target, tmp_path):
    """Tensor: padded MACs at the rate of the op's precision (no efficiency, no write-back); DMA:
    bytes at the peak bandwidth; the op's roofline is the larger, the model's the largest engine sum."""
    a = target.arch
    prof = target.profile(graph_of(npu_graphs.matmul_model(77, 40, 100, np.float16)), "as-built", schedule="overlap")
    (mm,) = [c for c in prof.program.commands if c.kind == "tensor"]
    tensor = mm.padded_macs / (a.tensor.macs_per_cycle * a.tensor.rate["fp16"])
    dma = sum(c.bytes for c in prof.program.commands if c.kind in ("load", "store")) / (a.dma.bandwidth_bytes_per_s / a.clock_hz)
    row = next(r for r in prof.ops if r.name == "mm")
    assert row.roofline_ms == pytest.approx(max(tensor, dma) / a.clock_hz * 1e3, rel=1e-12)
    assert prof.roofline_ms == pytest.approx(max(tensor, dma) / a.clock_hz * 1e3, rel=1e-12)
    assert prof.roofline_ms < prof.total_ms
    d = prof.to_dict()
    assert d["roofline_ms"] == pytest.approx(prof.roofline_ms, abs=1e-6)
    assert d["roofline"]["ratio"] == pytest.approx(prof.total_ms / prof.roofline_ms, rel=1e-3)
    assert [o["roofline_ms"] for o in d["ops"]] == [pytest.approx(row.roofline_ms, abs=1e-6)]


def test_vector_roofline_is_the_element_passes_over_the_lanes(target):
    """Every pass at its class's cycles per element over the lanes, without hand-offs or dispatch."""
    a = target.arch
    prof = target.profile(graph_of(npu_graphs.softmax_model(512, 1024)), "fp16", schedule="overlap")
    per = sum(n * a.vector.cycles_per_element[c] for c, n in a.vector.passes["softmax"])
    vector = 512 * 1024 * per / a.vector.lanes
    assert prof.roofline_engines()["vector"] == pytest.approx(vector, rel=1e-12)


@pytest.mark.parametrize("schedule", ["sequential", "overlap", "best"])
def test_the_roofline_bounds_every_schedule(target, schedule):
    """No schedule beats the roofline: the model's (the largest engine sum) is at most the modelled
    time, and so is every block's."""
    for model, prec in ((npu_graphs.attention_model(seq=1024, heads=8, head_dim=40, tiling=(4, 8)), "w8a16"),
                        (two_matmuls(), "w8a8"), (npu_graphs.conv_model(64, 128, 32), "w8a16")):
        prof = target.profile(graph_of(model), prec, schedule=schedule)
        assert 0 < prof.roofline_ms <= prof.total_ms * (1 + 1e-9)
        for b in prof.roofline()["blocks"].values():
            assert b["roofline_ms"] <= b["ms"] * (1 + 1e-9)


def test_the_roofline_is_in_every_view(target, tmp_path):
    prof = target.profile(graph_of(two_matmuls()), "w8a8", schedule="best")
    prof.write_csv(tmp_path / "p.csv")
    rows = list(csv.DictReader(open(tmp_path / "p.csv")))
    assert {"roofline_ms", "exposed_dma_ms"} <= set(rows[0]) and float(rows[0]["roofline_ms"]) > 0
    events = prof.trace_events()
    names = {e["args"]["name"] for e in events if e.get("name") == "thread_name"}
    assert {"ops (modelled)", "ops at the roofline"} <= names
    ops = [e for e in events if e.get("cat") == "op"]
    assert [e["name"] for e in ops] == [r.name for r in prof.ops] and all("roofline_ms" in e["args"] for e in ops)
    table = prof.table()
    assert "roofline" in table and "x roof" in table
    prof.write_plot(tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 0


# --- pipelined MLT ----------------------------------------------------------------------------------

SPEC = AttentionSpec("a", 1, 2, 256, 256, 40, 40, "int16")


def test_pipelined_sram_check_holds_the_second_buffer(target):
    """Per-tile buffers (Q, S_in, S_out, output) twice, K and V of the head group once."""
    a = target.arch
    g, rg = a.tensor.channel_granularity, a.tensor.row_granularity
    for tiling in (Tiling(4, 1), Tiling(2, 2), Tiling(16, 2)):
        single = target.attention_sram_bytes(SPEC, tiling, "sequential")
        double = target.attention_sram_bytes(SPEC, tiling, "pipelined")
        hg = SPEC.heads // tiling.head_tiles
        kv = hg * pad(SPEC.kv_len, rg) * (pad(40, g) + pad(40, g)) * SPEC.act_bytes
        assert double - single == single - kv > 0
    assert target.attention_sram_bytes(SPEC, Tiling(1, 1), "pipelined") == target.attention_sram_bytes(SPEC, Tiling(1, 1))


def test_pipelined_block_is_the_stage_formula(target):
    """One head group, four equal tiles: QK^T(k) and S x V(k-2) on the tensor engine against
    softmax(k-1) on the vector engine, stage by stage; the first K and Q before, the last store
    after; at least all the block's transfers."""
    a = target.arch
    cmds = target.attention_commands(SPEC, Tiling(4, 1), "pipelined")
    assert all(c.pipelined for c in cmds)
    one = {(c.role, c.tensor.rsplit(":", 1)[1] if c.tensor else ""): command_cycles(a, c) / c.repeat for c in cmds}
    qk, sm, sv = one[("qk_matmul", "")], one[("softmax", "")], one[("sv_matmul", "")]
    k_load, q_load, a_store = one[("load_qk", "K")], one[("load_qk", "Q")], one[("store_out", "A")]
    stages = [qk, max(qk, sm), max(qk + sv, sm), max(qk + sv, sm), max(sv, sm), sv]
    transfers = sum(command_cycles(a, c) for c in cmds if c.kind in ("load", "store"))
    want = max(k_load + q_load + sum(stages) + a_store, transfers)
    work, path, _ = pipelined_block(a, cmds, [command_cycles(a, c) for c in cmds])
    assert work == pytest.approx(want, rel=1e-12) and path == pytest.approx(sum(stages), rel=1e-12)
    assert target.attention_cycles(SPEC, Tiling(4, 1), "pipelined") == pytest.approx(max(want, a.dispatch_cycles))
    sequential = target.attention_cycles(SPEC, Tiling(4, 1), "sequential")
    assert work < sequential


def test_pipelined_never_slower_and_a_new_head_group_waits_for_its_k_and_v(target):
    for tiling in (Tiling(2, 2), Tiling(4, 2), Tiling(8, 1), Tiling(16, 2)):
        assert target.attention_cycles(SPEC, tiling, "pipelined") <= target.attention_cycles(SPEC, tiling, "sequential")
    a = target.arch
    cmds = target.attention_commands(SPEC, Tiling(2, 2), "pipelined")
    _, path, rel = pipelined_block(a, cmds, [command_cycles(a, c) for c in cmds])
    (kl,) = [i for i, c in enumerate(cmds) if c.tensor.endswith(":K")]
    (qk,) = [i for i, c in enumerate(cmds) if c.role == "qk_matmul"]
    k_cyc = command_cycles(a, cmds[kl]) / cmds[kl].repeat
    # the second group's K loads after the first group's last QK^T, and its first QK^T waits for it
    assert rel[qk][2] - rel[kl][1] == pytest.approx(k_cyc)


def test_solver_falls_back_to_sequential_tiles_when_no_double_buffer_fits(target):
    spec = AttentionSpec("big", 1, 8, 4096, 4096, 40, 40, "int16")
    with pytest.raises(tile_solver.InfeasibleBudgetError) as e:
        tile_solver.solve(spec, target, 1, schedule="overlap")
    smallest_single = e.value.min_budget
    sol = tile_solver.solve(spec, target, smallest_single, schedule="overlap+pipelined-mlt")
    assert sol.variant == "sequential"
    roomy = tile_solver.solve(spec, target, tile_solver.default_budget(target), schedule="best")
    assert roomy.variant == "pipelined+packed-operands"
    assert roomy.cycles == tile_solver.brute_force(spec, target, tile_solver.default_budget(target), schedule="best").cycles


def test_profile_reports_the_pipelined_block_and_the_trace_overlaps_its_engines(target):
    model = npu_graphs.attention_model(seq=1024, heads=8, head_dim=40, tiling=(8, 8))
    prof = target.profile(graph_of(model), "w8a16", schedule="best")
    assert prof.program.schedule == "best"
    assert prof.to_dict()["attention_blocks"][0]["pipelined"] is True
    ev = [e for e in prof.trace_events() if e.get("args", {}).get("op") == "attn" and e.get("cat") in ("tensor", "vector")]
    sm = next(e for e in ev if e["name"] == "softmax" and e["args"]["tile"] == 3)
    qk = next(e for e in ev if e["name"] == "qk_matmul" and e["args"]["tile"] == 4)
    assert qk["ts"] < sm["ts"] + sm["dur"] and sm["ts"] < qk["ts"] + qk["dur"]   # tile 3's softmax beside tile 4's QK^T
    overlap = target.profile(graph_of(model), "w8a16", schedule="overlap")
    row = lambda p: next(r for r in p.ops if r.name == "attn")
    assert row(prof).ms < row(overlap).ms


# --- prefetch ------------------------------------------------------------------------------------

def test_prefetch_loads_the_next_weights_during_the_previous_op(target):
    """mm2's weights fit the weight buffer (the softmax before it holds none): they move while the
    softmax runs, on the DMA engine's own clock, so mm2 waits only for what is left of them; the
    first op has nothing before it to hide behind."""
    a = target.arch
    g = graph_of(two_matmuls())
    base = target.profile(g, "w8a8", schedule="overlap")
    pre = target.profile(g, "w8a8", schedule="overlap+prefetch")
    w = {c.op: c for c in pre.program.commands if c.tensor.endswith(":weights")}
    assert w["mm1"].ahead == 0 and w["mm2"].ahead == w["mm2"].bytes == 512 * 512
    lat, floor = a.dma.latency_cycles, a.dispatch_cycles
    cyc = {id(c): x for c, x in zip(pre.program.commands, pre.cycles)}
    own = lambda op, kinds: sum(cyc[id(c)] for c in pre.program.commands if c.op == op and c.kind in kinds)
    end1 = max(lat + own("mm1", ("tensor",)), own("mm1", ("load", "store")), floor)
    r1 = own("mm1", ("load", "store"))
    s_sm = end1
    end_sm = s_sm + max(own("sm", ("vector",)), floor)
    a2 = cyc[id(w["mm2"])]
    a_start = max(r1, s_sm)                   # after the DMA is done with mm1's own, once the softmax runs
    a_end = a_start + a2
    s2 = end_sm
    c_start2 = s2 if a_end <= s2 else max(s2, a_start + lat)
    rest2 = own("mm2", ("load", "store")) - a2
    end2 = max(c_start2 + own("mm2", ("tensor",)), max(a_end, s2) + rest2, a_end, s2 + floor)
    assert pre.total_cycles == pytest.approx(end2, rel=1e-12)
    assert pre.total_cycles < base.total_cycles
    assert pre.exposed_dma["mm2"] < base.exposed_dma["mm2"]
    assert {r.name: r.exposed_dma_ms for r in pre.ops}["mm2"] == pytest.approx(pre.ms(pre.exposed_dma["mm2"]))


def test_prefetch_keeps_activations_within_the_sram(target):
    """An input loaded ahead takes SRAM beside the previous op's working set: the plan never
    exceeds the activation SRAM."""
    for model, prec in ((npu_graphs.chain_model(1 << 19, length=3), "fp16"), (two_matmuls(), "w8a8"),
                        (npu_graphs.conv_model(64, 128, 32), "w8a16")):
        prof = target.profile(graph_of(model), prec, schedule="best")
        assert prof.program.sram_peak_bytes <= target.sram.activations + target.sram.weight_buffer


def test_schedules_leave_dma_bytes_and_macs_alone(target):
    g = graph_of(two_matmuls())
    a, b = target.profile(g, "w8a8", schedule="overlap"), target.profile(g, "w8a8", schedule="best")
    assert a.program.dma_bytes() == b.program.dma_bytes() and a.program.macs() == b.program.macs()
    assert sum(r.cycles for r in b.ops) == pytest.approx(b.total_cycles, rel=1e-12)


# --- names -----------------------------------------------------------------------------------------

def test_schedule_names():
    from edgefc.targets.schedule import parse

    assert parse(None).name == parse("best").name == "best"
    assert parse("overlap+prefetch").mechanisms == frozenset({"prefetch"})
    assert parse("overlap+prefetch+pipelined-mlt").name == "overlap+pipelined-mlt+prefetch"
    from edgefc.targets.schedule import MECHANISMS

    assert parse("overlap+" + "+".join(reversed(MECHANISMS))).name == "best"
    for bad, needle in (("parallel", "unknown schedule 'parallel'"), ("overlap+warp", "mechanism 'warp'"),
                        ("sequential+prefetch", "on top of 'overlap' only")):
        with pytest.raises(edgefc.TargetError, match=needle):
            parse(bad)


@pytest.mark.parametrize("command", ["compile", "profile"])
def test_unknown_schedule_is_one_line(tmp_path, command):
    path = tmp_path / "m.onnx"
    onnx.save_model(npu_graphs.matmul_model(16, 16, 16), str(path))
    out = tmp_path / "b"
    extra = ["-o", str(out)] if command == "compile" else []
    assert_user_error(*run_cli(command, str(path), "--schedule", "overlap+warp", *extra), "mechanism 'warp'")
    assert not out.exists()


def test_compile_schedule_decides_the_tiling_and_prices_the_build(tmp_path):
    path = tmp_path / "a.onnx"
    onnx.save_model(npu_graphs.attention_model(seq=1024, heads=8, head_dim=40), str(path))
    builds = {}
    for sched in ("overlap", None):
        out = tmp_path / (sched or "default")
        args = ["compile", str(path), "--passes", "canonicalize,fuse,mlt", "--sram-budget", "1MiB", "-o", str(out)]
        rc, log = run_cli(*args, *(["--schedule", sched] if sched else []))
        assert rc == 0, log
        report = json.loads((out / "report.json").read_text())
        prof = json.loads((out / "profile.json").read_text())
        builds[sched] = (report["tiling"]["blocks"][0], prof)
        assert prof["schedule"] == (sched or "best") and report["profile"]["schedule"] == prof["schedule"]
        assert prof["roofline_ms"] > 0 and all("roofline_ms" in o and "exposed_dma_ms" in o for o in prof["ops"])
    (blk_o, prof_o), (blk_b, prof_b) = builds["overlap"], builds[None]
    assert blk_o["variant"] == "sequential" and blk_b["variant"] == "pipelined+packed-operands"
    assert blk_b["tiling"]["tiles"] >= blk_o["tiling"]["tiles"]
    assert prof_b["total_ms"] < prof_o["total_ms"]
    # a build is profiled under its own schedule unless --schedule says otherwise
    for args, want in (((), prof_o), (("--schedule", "overlap"), prof_o), (("--schedule", "best"), None)):
        rc, log = run_cli("profile", str(tmp_path / "overlap"), *args, "--json", str(tmp_path / "p.json"))
        assert rc == 0, log
        p = json.loads((tmp_path / "p.json").read_text())
        if want is not None:
            assert p["total_ms"] == want["total_ms"] and p["schedule"] == "overlap"
        else:
            assert p["schedule"] == "best" and p["total_ms"] <= prof_o["total_ms"]


def test_help_names_the_fitted_schedule():
    for command in ("compile", "profile"):
        rc, out = run_cli(command, "--help")
        assert rc == 0 and "--schedule" in out and "overlap" in out and "fitted" in out


# --- the mechanisms the profile's gaps called for -------------------------------------------------

def test_packed_operands_move_the_real_bytes_at_the_same_bus_cost_for_v_and_a(target):
    """Without the head-dim padding in DRAM, Q and K move 40/64 of the bytes; V and A move in
    80-byte runs instead of 128-byte ones, which costs the same bus time (a 256-byte granule)."""
    from edgefc.targets.attention_block import attention_io_bytes
    from edgefc.targets.cost_model import dma_cycles

    a = target.arch
    spec = AttentionSpec("a", 1, 8, 4096, 4096, 40, 40, "int16")
    padded, packed = attention_io_bytes(spec, a), attention_io_bytes(spec, a, packed=True)
    assert packed["q"][0] * 64 == padded["q"][0] * 40 and packed["k"][0] * 64 == padded["k"][0] * 40
    assert packed["v"][1] == 80 and padded["v"][1] == 128
    for key in ("v", "out"):
        assert dma_cycles(a, *packed[key]) == pytest.approx(dma_cycles(a, *padded[key]), rel=1e-12)
    p = target.attention_cycles(spec, Tiling(32, 8), "pipelined+packed-operands")
    assert p < target.attention_cycles(spec, Tiling(32, 8), "pipelined")
    assert (target.attention_sram_bytes(spec, Tiling(32, 8), "pipelined+packed-operands")
            == target.attention_sram_bytes(spec, Tiling(32, 8), "pipelined"))   # SRAM tiles stay padded
    assert target.attention_variants("overlap+packed-operands") == ("sequential+packed-operands",)


def concat_model(c=320, hw=64) -> onnx.ModelProto:
    """Two 3x3 convolutions of x, concatenated on the channels, then a 1x1 convolution: the
    concatenation (2 x c channels at hw x hw) does not fit the SRAM beside its operands."""
    rng = np.random.default_rng(0)
    t = TensorProto.FLOAT
    inits = [numpy_helper.from_array(rng.standard_normal((c, c, 3, 3)).astype(np.float32) * 0.01, n) for n in ("w1", "w2")]
    inits.append(numpy_helper.from_array(rng.standard_normal((c, 2 * c, 1, 1)).astype(np.float32) * 0.01, "w3"))
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], name="c1", pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["x", "w2"], ["b"], name="c2", pads=[1, 1, 1, 1]),
             helper.make_node("Concat", ["a", "b"], ["ab"], name="cat", axis=1),
             helper.make_node("Conv", ["ab", "w3"], ["y"], name="c3")]
    return helper.make_model(helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", t, [1, c, hw, hw])],
                                               [helper.make_tensor_value_info("y", t, [1, c, hw, hw])], inits),
                             opset_imports=[helper.make_opsetid("", 23)])


def test_concat_in_place_stores_its_operands_into_their_slices(target):
    """The Concat copies nothing: each operand still in SRAM is stored into its slice of the output
    in DRAM (its consumer reads the output from there as before); the op keeps its engine."""
    g = graph_of(concat_model())
    base = target.profile(g, "w8a16", schedule="overlap")
    view = target.profile(g, "w8a16", schedule="overlap+concat-in-place")
    cat = lambda p: [c for c in p.program.commands if c.op == "cat"]
    assert [c.kind for c in cat(base)].count("vector") == 1
    moved = [(c.kind, c.tensor) for c in cat(view) if c.kind != "vector"]
    assert set(moved) <= {("store", "a"), ("store", "b")} and moved
    assert [(c.elements, c.dispatches) for c in cat(view) if c.kind == "vector"] == [(0, 0)]
    assert view.program.placement["cat"] == base.program.placement["cat"] == "vector"
    assert view.program.residency["ab"] == "dram" and view.program.dma_bytes() < base.program.dma_bytes()
    assert view.total_cycles < base.total_cycles


def ff_model(tokens=8192, c=512, hidden=2048) -> onnx.ModelProto:
    """x @ w1 -> Gelu -> @ w2: the hidden activation (tokens x hidden, INT16) is too big for the
    SRAM, so the three ops run as one cascade in row stripes."""
    rng = np.random.default_rng(0)
    t = TensorProto.FLOAT
    inits = [numpy_helper.from_array(rng.standard_normal((c, hidden)).astype(np.float32) * 0.01, "w1"),
             numpy_helper.from_array(rng.standard_normal((hidden, c)).astype(np.float32) * 0.01, "w2")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="up"),
             helper.make_node("Gelu", ["h"], ["g"], name="act"),
             helper.make_node("MatMul", ["g", "w2"], ["y"], name="down")]
    return helper.make_model(helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", t, [1, tokens, c])],
                                               [helper.make_tensor_value_info("y", t, [1, tokens, c])], inits),
                             opset_imports=[helper.make_opsetid("", 23)])


def test_pipelined_cascade_is_the_stripe_stage_formula(target):
    """A cascade of tensor -> vector -> tensor ops over S stripes: in stage k op j works on stripe
    k - j; each engine's stripes of a stage back to back, a stage as long as its busiest engine;
    one hand-off on each side of each engine change per stripe."""
    from edgefc.targets.cost_model import pipelined_cascade

    a = target.arch
    g = graph_of(ff_model())
    base = target.profile(g, "w8a16", schedule="overlap")
    prof = target.profile(g, "w8a16", schedule="overlap+pipelined-cascades")
    cmds = [c for c in prof.program.commands if c.cascade >= 0]
    assert {c.op for c in cmds} == {"up", "act", "down"} and len({c.cascade for c in cmds}) == 1
    S = max(c.stripes for c in cmds)
    both = base.program.tensor_bytes["h"] + base.program.tensor_bytes["g"]   # the Gelu's stripes hold both
    assert S == 2 * -(-both // target.sram.activations)                        # double-buffered stripe buffers
    cyc = {id(c): x for c, x in zip(prof.program.commands, prof.cycles)}
    comp = [sum(cyc[id(c)] for c in cmds if c.op == op and c.kind not in ("load", "store")) for op in ("up", "act", "down")]
    comp[0] += S * a.handoff.cycles
    comp[1] += 2 * S * a.handoff.cycles
    comp[2] += S * a.handoff.cycles
    eng = ["tensor", "vector", "tensor"]
    want = 0.0
    for k in range(S + 2):
        load = {}
        for j in range(3):
            if 0 <= k - j < S:
                load[eng[j]] = load.get(eng[j], 0.0) + comp[j] / S
        want += max(load.values())
    path, shares = pipelined_cascade(a, cmds, [cyc[id(c)] for c in cmds])
    assert path == pytest.approx(want, rel=1e-12) and sum(shares.values()) == pytest.approx(1.0)
    assert prof.total_cycles < base.total_cycles
    assert sum(r.cycles for r in prof.ops) == pytest.approx(prof.total_cycles, rel=1e-12)


def test_a_cascade_stays_unpipelined_where_its_weights_would_cost_more(target):
    """Doubling the stripes re-fetches weights beyond the weight buffer once more per stripe; the
    lowering prices a cascade both ways and keeps it unpipelined where that is cheaper."""
    heavy = graph_of(ff_model(tokens=4096, c=1280, hidden=10240))   # 13 MB of INT8 weights per matmul
    base = target.profile(heavy, "w8a16", schedule="overlap")
    prof = target.profile(heavy, "w8a16", schedule="overlap+pipelined-cascades")
    assert not any(c.cascade >= 0 for c in prof.program.commands)
    assert prof.total_cycles == pytest.approx(base.total_cycles, rel=1e-12)
