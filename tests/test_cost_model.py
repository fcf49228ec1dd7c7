"""Cost model (issue 4): first-principles cycle counts from the target file, shared parameters,
residency, precision and QDQ pricing, the attention block the MLT solver prices, target errors."""

from __future__ import annotations

import math
import tomllib

import numpy as np
import onnx_graphsurgeon as gs
import pytest

import edgefc
from edgefc.attention import AttentionSpec, Tiling
from edgefc.errors import TargetError
from edgefc.targets import TARGET_DIR
from edgefc.targets.cost_model import Schedule, Timeline, command_cycles, dma_cycles, op_cycles
from edgefc.targets.npu import NpuTarget
from edgefc.targets.program import ATTENTION_ROLES
from edgefc.targets.table6 import role_cycles
from tests import npu_graphs

TOML = tomllib.loads((TARGET_DIR / "exynos2400.toml").read_text())


def num(dotted: str) -> float:
    node = TOML
    for part in dotted.split("."):
        node = node[part]
    return float(node)


def graph_of(model) -> gs.Graph:
    return edgefc.infer_shapes(gs.import_onnx(model))


@pytest.fixture(scope="module")
def target() -> NpuTarget:
    """The shipped target with weights streamed per op: these tests check each op's own traffic
    (a tiny model's weights would otherwise stay resident; see test_weights_that_fit_stay_resident)."""
    return edgefc.get_target("exynos2400").with_fields({"sram.resident_weights": False})


def rup(n, g):
    return math.ceil(n / g) * g


def dma_by_hand(nbytes, run=0):
    burst = num("dma.burst_bytes")
    bus = nbytes * burst / min(run or nbytes, burst)
    return num("dma.latency_cycles") + bus / (num("dma.bandwidth_bytes_per_s") * num("dma.efficiency") / num("clock.hz"))


# --- first principles: one matmul, one DMA, one softmax ----------------------------------------

def test_one_matmul_matches_hand_computed_cycles(target):
    m, k, n = 77, 40, 100  # every dimension needs padding
    prog = target.lower(graph_of(npu_graphs.matmul_model(m, k, n, np.float16)), "as-built")
    (mm,) = [c for c in prog.commands if c.kind == "tensor"]
    g, rg = num("tensor.channel_granularity"), num("tensor.row_granularity")
    padded = rup(m, rg) * rup(k, g) * rup(n, g)
    assert mm.macs == m * k * n and mm.padded_macs == padded and mm.precision == "fp16"
    by_hand = (padded / (num("tensor.macs_per_cycle") * num("tensor.rate.fp16") * num("tensor.efficiency"))
               + m * n / num("tensor.output_elements_per_cycle"))
    assert command_cycles(target.arch, mm) == pytest.approx(by_hand, rel=1e-12)
    # its DMA: x in, weights in, y out, at fp16
    loads = {c.tensor: c.bytes for c in prog.commands if c.kind == "load"}
    assert loads == {"x": m * k * 2, "mm:weights": k * n * 2}
    assert [c.bytes for c in prog.commands if c.kind == "store"] == [m * n * 2]
    # the op: its commands back to back, at least one dispatch
    work = by_hand + dma_by_hand(m * k * 2) + dma_by_hand(k * n * 2) + dma_by_hand(m * n * 2)
    assert op_cycles(target.arch, prog.commands) == pytest.approx(max(work, num("dispatch.cycles")), rel=1e-12)


@pytest.mark.parametrize("nbytes,run", [(1 << 20, 0), (3_000_000, 0), (1 << 20, 80), (4096, 4096)])
def test_one_dma_matches_hand_computed_cycles(target, nbytes, run):
    assert dma_cycles(target.arch, nbytes, run) == pytest.approx(dma_by_hand(nbytes, run), rel=1e-12)


def test_dma_of_a_graph_input_is_its_bytes(target):
    prog = target.lower(graph_of(npu_graphs.softmax_model(64, 1000)), "fp16")
    (load,) = [c for c in prog.commands if c.kind == "load"]
    assert load.bytes == 64 * 1000 * 2
    assert command_cycles(target.arch, load) == pytest.approx(dma_by_hand(64 * 1000 * 2))


def test_one_softmax_matches_hand_computed_cycles(target):
    rows, cols = 64, 1000
    prog = target.lower(graph_of(npu_graphs.softmax_model(rows, cols)), "fp16")
    (sm,) = [c for c in prog.commands if c.kind == "vector"]
    per_elem = sum(num(f"vector.cycles_per_element.{c}") for c in ("max", "arith", "exp", "reduce", "divide"))
    by_hand = rows * cols * per_elem / num("vector.lanes")
    assert sm.elements == rows * cols
    assert command_cycles(target.arch, sm) == pytest.approx(by_hand, rel=1e-12)


def test_channel_padding_to_the_engine_granularity(target):
    def padded(cout):
        prog = target.lower(graph_of(npu_graphs.conv_model(32, cout, 16)), "w8a16")
        return next(c for c in prog.commands if c.kind == "tensor")

    g = int(num("tensor.channel_granularity"))
    c3, cg, cg1 = padded(3), padded(g), padded(g + 1)
    assert c3.padded_macs == cg.padded_macs          # 3 output channels cost a whole channel block
    assert cg1.padded_macs == 2 * cg.padded_macs
    assert c3.macs * g == cg.macs * 3
    assert c3.precision == "int8xint16"


def test_small_input_channels_fold_the_taps_and_depthwise_uses_the_taps():
    """A first layer (3 channels, 3x3) pads 27 -> 32 taps x channels, not 3 -> 32 per tap; a
    depthwise convolution puts its channels on the output lanes and its taps on the contraction."""
    from edgefc.targets.geometry import contraction, pad

    assert contraction(3, 9, 32) == 32 and contraction(32, 9, 32) == 288 and contraction(40, 9, 32) == 576
    t = edgefc.get_target("exynos2400")
    g, rg = int(num("tensor.channel_granularity")), int(num("tensor.row_granularity"))
    from onnx import TensorProto, helper, numpy_helper

    c, hw = 48, 14
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((c, 1, 3, 3)).astype(np.float32), "w")
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="dw", group=c, pads=[1, 1, 1, 1])
    model = helper.make_model(helper.make_graph(
        [node], "dw", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, hw, hw])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, c, hw, hw])], [w]),
        opset_imports=[helper.make_opsetid("", 17)])
    (cmd,) = [x for x in t.lower(graph_of(model), "w8a8").commands if x.kind == "tensor"]
    assert cmd.macs == c * hw * hw * 9
    assert cmd.padded_macs == pad(hw * hw, rg) * pad(9, g) * pad(c, g)
    assert cmd.precision == "int8xint8"


# --- shared parameters ---------------------------------------------------------------------------

BLOCK = AttentionSpec("blk", 1, 8, 4096, 4096, 40, 40, "int16")   # Table 6's block: spills untiled
DMA_ROWS = ("load_qk", "store_s_in", "load_s_in", "store_s_out", "load_s_out_v", "store_out")


def test_dram_bandwidth_moves_every_dma_row_together(target):
    base = target.with_fields({"dma.latency_cycles": 0.0})
    fast = base.with_fields({"dma.bandwidth_bytes_per_s": 2 * num("dma.bandwidth_bytes_per_s")})
    a, b = role_cycles(base.arch, BLOCK, Tiling(1, 1)), role_cycles(fast.arch, BLOCK, Tiling(1, 1))
    for row in DMA_ROWS:
        assert b[row] == pytest.approx(a[row] / 2, rel=1e-12), row
    for row in ("qk_matmul", "softmax", "sv_matmul"):
        assert b[row] == a[row], row


def test_mac_rate_moves_both_matmul_rows_together(target):
    base = target.with_fields({"tensor.output_elements_per_cycle": 1e30, "handoff.cycles": 0.0, "dispatch.cycles": 0.0})
    fast = base.with_fields({"tensor.macs_per_cycle": 3 * num("tensor.macs_per_cycle")})
    a, b = role_cycles(base.arch, BLOCK, Tiling(1, 1)), role_cycles(fast.arch, BLOCK, Tiling(1, 1))
    for row in ("qk_matmul", "sv_matmul"):
        assert b[row] == pytest.approx(a[row] / 3, rel=1e-9), row
    for row in DMA_ROWS + ("softmax",):
        assert b[row] == a[row], row


def test_breakdown_rows_sum_to_100_untiled_and_less_tiled(target):
    untiled = role_cycles(target.arch, BLOCK, Tiling(1, 1))
    total = sum(untiled.values())
    assert set(untiled) == set(ATTENTION_ROLES)
    assert all(untiled[r] > 0 for r in ATTENTION_ROLES)          # it spills: every row is there
    tiled = role_cycles(target.arch, BLOCK, Tiling(16, 8))
    assert tiled["store_s_in"] == tiled["load_s_in"] == tiled["store_s_out"] == 0.0
    assert sum(tiled.values()) < 0.5 * total
    # per-tile hand-offs: the compute rows grow with the tiles, the shared bytes do not
    assert tiled["qk_matmul"] > untiled["qk_matmul"] and tiled["softmax"] > untiled["softmax"]


def test_v_and_out_transfers_cost_more_per_byte_than_q_and_k(target):
    """Q/K move as contiguous head blocks, V (read transposed) and A (head-interleaved) in runs of
    one padded head row: the same bytes, more bus time (the remark under Table 6)."""
    cmds = target.attention_commands(BLOCK, Tiling(1, 1))
    by = {c.tensor.split(":")[1]: c for c in cmds if c.kind in ("load", "store")}
    assert by["Q"].bytes == by["K"].bytes == by["V"].bytes == by["A"].bytes == 8 * 4096 * 64 * 2
    a = target.arch
    assert dma_cycles(a, by["V"].bytes, by["V"].run_bytes) > 1.5 * dma_cycles(a, by["Q"].bytes, by["Q"].run_bytes)


# --- the attention block, as the MLT solver sees it and as the profile reports it -------------

@pytest.mark.parametrize("schedule, variant", [("overlap", "sequential"), ("overlap+pipelined-mlt", "pipelined"),
                                               ("best", "pipelined+packed-operands")])
@pytest.mark.parametrize("tiling", [None, (4, 2), (2, 4)])
def test_attention_cycles_equal_what_the_profile_reports(target, tiling, schedule, variant):
    """What the MLT solver is told a block costs (under the variant the schedule runs it as) is what
    the profile reports for it."""
    model = npu_graphs.attention_model(seq=1024, heads=4, head_dim=40, dtype=np.float16, tiling=tiling)
    prof = target.profile(graph_of(model), "as-built", schedule=schedule)
    row = next(r for r in prof.ops if r.name == "attn")
    spec = AttentionSpec("attn", 1, 4, 1024, 1024, 40, 40, "fp16")
    assert row.precision == "fp16"
    t = Tiling(*(tiling or (1, 1)))
    assert row.cycles == pytest.approx(target.attention_cycles(spec, t, variant), rel=1e-12)
    assert prof.attention_breakdown["block"] == "attn"
    assert prof.to_dict()["attention_blocks"][0]["pipelined"] == (variant.startswith("pipelined") and t.tiles > 1)


def test_attention_with_a_mask_input_is_priced_with_the_mask_read(target):
    prof = target.profile(graph_of(npu_graphs.attention_model(seq=256, heads=4, head_dim=40, mask=True)), "fp16",
                          schedule="overlap")
    row = next(r for r in prof.ops if r.name == "attn")
    spec = AttentionSpec("attn", 1, 4, 256, 256, 40, 40, "fp16")
    mask_load = next(c for c in prof.program.commands if c.op == "attn" and c.tensor == "mask")
    assert mask_load.bytes == 256 * 256 * 2
    block = sum(command_cycles(target.arch, c) for c in target.attention_commands(spec, Tiling(1, 1)))
    mask = dma_cycles(target.arch, 256 * 256 * 2)
    # the mask is made on the NPU (a vector op), so the block stores it to DRAM and reads it back
    stores = [c for c in prof.program.commands if c.op == "attn" and c.tensor == "mask" and c.kind == "store"]
    assert len(stores) == 1
    assert row.cycles == pytest.approx(max(block + 2 * mask, num("dispatch.cycles")))


def test_attention_spills_exactly_when_the_tile_does_not_fit(target):
    spec = AttentionSpec("a", 1, 8, 1024, 1024, 40, 40, "int16")
    big = target.attention_sram_bytes(spec, Tiling(1, 1))
    small = target.attention_sram_bytes(spec, Tiling(8, 8))
    assert small < target.sram.total < big
    spills = lambda t: any(c.role in ("store_s_in", "store_s_out") for c in target.attention_commands(spec, t))
    assert spills(Tiling(1, 1)) and not spills(Tiling(8, 8))
    roomy = target.with_fields({"sram.bytes": big})
    assert not any(c.role == "store_s_in" for c in roomy.attention_commands(spec, Tiling(1, 1)))


def test_attention_working_set_shrinks_with_tiles(target):
    spec = AttentionSpec("a", 1, 8, 4096, 4096, 40, 40, "int16")
    for h in (1, 2, 4, 8):
        sizes = [target.attention_sram_bytes(spec, Tiling(r, h)) for r in (1, 2, 4, 8, 16, 32, 64, 128, 256)]
        assert sizes == sorted(sizes, reverse=True)


def test_mlt_solver_uses_this_cost_model(target):
    from edgefc import tile_solver

    budget = tile_solver.default_budget(target)
    sol = tile_solver.solve(BLOCK, target, budget, target.row_granularity, "overlap")
    assert sol.variant == "sequential" and target.attention_sram_bytes(BLOCK, sol.tiling) <= budget
    assert sol.cycles == target.attention_cycles(BLOCK, sol.tiling)
    assert sol.cycles < 0.5 * target.attention_cycles(BLOCK, Tiling(1, 1))
    # under the best schedule the tiles run pipelined, double-buffered: more row tiles, less time
    best = tile_solver.solve(BLOCK, target, budget, target.row_granularity, "overlap+pipelined-mlt")
    assert best.variant == "pipelined" and best.tiling.tiles > sol.tiling.tiles
    assert target.attention_sram_bytes(BLOCK, best.tiling, "pipelined") <= budget
    assert best.cycles == target.attention_cycles(BLOCK, best.tiling, "pipelined") < 0.7 * sol.cycles


# --- residency, precision, quantization --------------------------------------------------------

def test_tensor_that_does_not_fit_spills_to_dram_and_back(target):
    elements = 1 << 19                                          # 1 MiB per tensor at fp16
    graph = graph_of(npu_graphs.chain_model(elements, length=3))
    roomy = target.lower(graph, "fp16")
    assert not [c for c in roomy.commands if c.spill]
    assert roomy.residency["r0"] == "sram"
    tight = target.with_fields({"sram.bytes": 5 << 19, "sram.weight_buffer_bytes": 0}).lower(graph, "fp16")
    spilled = [(c.kind, c.tensor) for c in tight.commands if c.spill]
    assert ("store", "r0") in spilled and ("load", "r0") in spilled
    assert tight.residency["r0"] == "dram" and "evicted for" in tight.reasons["r0"]
    assert tight.dma_bytes() - roomy.dma_bytes() == 2 * elements * 2


def test_a_spilled_tensor_streams_to_its_only_consumer(target):
    """Producer -> next-op consumer that reads row by row: the tensor passes through a stripe
    buffer, no DRAM round trip; a normalisation (needs whole-tensor statistics) cannot."""
    elements = 1 << 22                                          # 8 MiB at fp16: never fits
    relu = target.lower(graph_of(npu_graphs.chain_model(elements, 3, skip=False)), "fp16")
    moved = [(c.kind, c.tensor) for c in relu.commands if c.kind in ("load", "store")]
    assert moved == [("load", "x"), ("store", "y")]
    assert relu.residency["r0"] == "stream" and "row stripes from op0 to op1" in relu.reasons["r0"]
    norm = target.lower(graph_of(npu_graphs.chain_model(elements, 3, skip=False, last="LayerNormalization")), "fp16")
    moved = [(c.kind, c.tensor) for c in norm.commands if c.kind in ("load", "store")]
    assert ("store", "r1") in moved and ("load", "r1") in moved and ("store", "r0") not in moved
    # two uses inside an unbroken row-wise chain (a residual): the cascade keeps it on chip
    skip = target.lower(graph_of(npu_graphs.chain_model(elements, 3, skip=True)), "fp16")
    assert [(c.kind, c.tensor) for c in skip.commands if c.kind in ("load", "store")] == [("load", "x"), ("store", "y")]
    assert skip.residency["r0"] == "stream" and "to add" in skip.reasons["r0"]
    # ... but not across a normalisation (whole-tensor statistics break the cascade)
    broken = target.lower(graph_of(npu_graphs.chain_model(elements, 3, skip=True, last="LayerNormalization")), "fp16")
    assert ("store", "r0") in [(c.kind, c.tensor) for c in broken.commands]


def test_w8a16_and_fp16_dma_bytes_differ_as_expected(target):
    cin, cout, hw, k = 64, 128, 32, 3
    graph = graph_of(npu_graphs.conv_model(cin, cout, hw, k))
    w8 = target.lower(graph, "w8a16")
    f16 = target.lower(graph, "fp16")
    f32 = target.lower(graph, "fp32")
    weights = lambda p: next(c.bytes for c in p.commands if c.tensor.endswith(":weights"))
    acts = lambda p: sum(c.bytes for c in p.commands if c.kind in ("load", "store") and not c.tensor.endswith(":weights"))
    nw = cout * cin * k * k
    assert weights(w8) == nw * 1 + cout * 4          # INT8 weights, INT32 bias
    assert weights(f16) == nw * 2 + cout * 2
    assert weights(f32) == 2 * weights(f16)
    act_elems = (cin + cout) * hw * hw
    assert acts(w8) == acts(f16) == act_elems * 2    # INT16 and FP16 activations: same bytes
    assert acts(f32) == act_elems * 4
    conv = lambda p: next(c for c in p.commands if c.kind == "tensor")
    assert conv(w8).precision == "int8xint16" and conv(f16).precision == "fp16" and conv(f32).precision == "fp32"


def test_qdq_graph_is_priced_at_its_quantized_types(target):
    """A tensor passing through QuantizeLinear/DequantizeLinear is priced at its quantized type,
    and the Q/DQ nodes are no NPU work: as-built QDQ == the w8a16 what-if of the float graph."""
    q = target.lower(graph_of(npu_graphs.conv_model(64, 128, 32, qdq=True)), "as-built")
    f = target.lower(graph_of(npu_graphs.conv_model(64, 128, 32)), "w8a16")
    assert [op.op_type for op in q.ops] == ["Conv"]
    strip = lambda p: [(c.kind, c.bytes, c.padded_macs, c.precision) for c in p.commands]
    # (the QDQ graph keeps its bias in fp32: 4 bytes, as the INT32 bias of the what-if)
    assert strip(q) == strip(f)
    assert next(c.bytes for c in q.commands if c.tensor.endswith(":weights")) == 64 * 128 * 9 + 128 * 4


def test_precision_changes_throughput(target):
    g = graph_of(npu_graphs.matmul_model(256, 256, 256))
    cyc = {p: target.profile(g, p).by_command_engine()["tensor"] for p in ("fp32", "fp16", "w8a16", "w8a8")}
    assert cyc["fp32"] > cyc["fp16"] and cyc["w8a16"] > cyc["w8a8"]
    # the MAC term scales with 1 / rate (the write-back term is the same in both)
    out = 256 * 256 / num("tensor.output_elements_per_cycle")
    ratio = (cyc["w8a16"] - out) / (cyc["fp16"] - out)
    assert ratio == pytest.approx(num("tensor.rate.fp16") / num("tensor.rate.int8xint16"), rel=1e-9)


@pytest.mark.parametrize("name", ["exynos2400", "exynos2200"])
def test_rates_never_rise_with_precision(name):
    """A wider operand never runs faster: INT8 >= INT8xINT16 >= INT16xINT16, FP16 >= FP32."""
    r = edgefc.get_target(name)
    rate = dict(r.arch.tensor.rate)
    assert rate["int8xint8"] >= rate["int8xint16"] >= rate["int16xint16"] and rate["fp16"] >= rate["fp32"]


def test_unknown_precision_is_a_user_error(target):
    with pytest.raises(edgefc.EdgefcError, match="precision 'int4'"):
        target.lower(graph_of(npu_graphs.softmax_model(4, 4)), "int4")


# --- schedule ------------------------------------------------------------------------------------

def test_dispatch_is_a_floor_per_op(target):
    """The command processor prepares the next op while one runs: a short op lasts one dispatch,
    a long op hides it."""
    d = num("dispatch.cycles")
    for schedule in ("sequential", "overlap"):
        tiny = target.profile(graph_of(npu_graphs.softmax_model(2, 8)), "fp16", schedule=schedule)
        assert tiny.total_cycles == pytest.approx(d) and tiny.ops[0].cycles == pytest.approx(d)
        assert sum(tiny.idle) > 0
    tiny = target.profile(graph_of(npu_graphs.softmax_model(2, 8)), "fp16", schedule="sequential")
    assert sum(tiny.idle) == pytest.approx(d - sum(tiny.cycles))
    big = target.profile(graph_of(npu_graphs.softmax_model(512, 4096)), "fp16", schedule="sequential")
    assert big.total_cycles == pytest.approx(sum(big.cycles)) and sum(big.idle) == 0


def test_overlap_takes_the_max_of_compute_and_transfers_plus_the_exposed_latency(target):
    """The default schedule: an op's DMA (weights, streamed activations) runs beside its compute
    (double buffering): max(first latency + compute, transfers), not their sum (Vela)."""
    a = target.arch
    for cout in (64, 1024):       # compute-bound and transfer-bound convolutions
        g = graph_of(npu_graphs.conv_model(256, cout, 8 if cout > 64 else 64, 3))
        ov = target.profile(g, "w8a16", schedule="overlap")
        sq = target.profile(g, "w8a16", schedule="sequential")
        assert ov.schedule == "overlap" and ov.total_cycles < sq.total_cycles
        conv = [c for c in ov.program.commands if c.op == "conv"]
        compute = sum(command_cycles(a, c) for c in conv if c.kind == "tensor")
        dma = sum(command_cycles(a, c) for c in conv if c.kind in ("load", "store"))
        want = max(num("dma.latency_cycles") + compute, dma)
        row = next(r for r in ov.ops if r.name == "conv")
        assert row.cycles == pytest.approx(max(want, num("dispatch.cycles")), rel=1e-12)
        assert sum(r.cycles for r in ov.ops) == pytest.approx(ov.total_cycles, rel=1e-12)


@pytest.mark.parametrize("schedule", ["overlap", "best"])
def test_attention_steps_are_a_chain_in_every_schedule(target, schedule):
    """Each step of an untiled attention block consumes the previous one's result: the overlapped
    schedule prices it as the sum of its commands (what the tile solver and Table 6 use), with the
    schedule's operand layout."""
    prof = target.profile(graph_of(npu_graphs.attention_model(seq=1024, heads=8, head_dim=40)), "w8a16",
                          schedule=schedule)
    row = next(r for r in prof.ops if r.name == "attn")
    spec = AttentionSpec("attn", 1, 8, 1024, 1024, 40, 40, "int16")
    variant = target.attention_variants(schedule)[-1]
    assert row.cycles == pytest.approx(target.attention_cycles(spec, Tiling(1, 1), variant), rel=1e-12)


def test_weights_that_fit_stay_resident():
    """With sram.resident_weights, a model whose weights fit beside its activations loads no
    weights per op (they stay in SRAM across inferences); one whose weights do not streams them."""
    t = edgefc.get_target("exynos2400")
    assert t.arch.resident_weights is True
    small = t.lower(graph_of(npu_graphs.conv_model(64, 128, 32, 3)), "w8a8")
    assert not [c for c in small.commands if c.tensor.endswith(":weights")]
    assert small.resident_weight_bytes == small.weight_bytes == 64 * 128 * 9 + 128 * 4
    big = t.lower(graph_of(npu_graphs.matmul_model(16, 4096, 2048)), "w8a8")   # 8 MiB of weights
    assert big.resident_weight_bytes == 0 and [c for c in big.commands if c.tensor.endswith(":weights")]


def test_schedule_is_pluggable(target):
    from edgefc.targets import cost_model
    from edgefc.targets.profile import build_profile

    class AllAtOnce(Schedule):
        name = "all-at-once"

        def run(self, program, cycles, params):
            return Timeline([0.0] * len(cycles), [0.0] * len(cycles), max(cycles))

    cost_model.SCHEDULES["all-at-once"] = AllAtOnce
    try:
        g = graph_of(npu_graphs.chain_model(1 << 18))
        seq = build_profile(target, g, "fp16", schedule="sequential")
        par = build_profile(target, g, "fp16", schedule="all-at-once")
        assert seq.total_cycles == pytest.approx(sum(seq.cycles) + sum(seq.idle))
        assert par.total_cycles == pytest.approx(max(seq.cycles)) and par.total_cycles < seq.total_cycles
    finally:
        del cost_model.SCHEDULES["all-at-once"]


# --- the target file ---------------------------------------------------------------------------

def _write(tmp_path, text):
    p = tmp_path / "npu.toml"
    p.write_text(text)
    return p


def test_target_file_missing_field_is_named(tmp_path):
    text = (TARGET_DIR / "exynos2400.toml").read_text().replace("burst_bytes = ", "# burst_bytes = ")
    with pytest.raises(TargetError, match="no field 'dma.burst_bytes'"):
        NpuTarget.from_toml(_write(tmp_path, text))


def test_target_file_mistyped_field_is_named(tmp_path):
    text = (TARGET_DIR / "exynos2400.toml").read_text().replace("lanes = 128", 'lanes = "wide"')
    with pytest.raises(TargetError, match="'vector.lanes' must be"):
        NpuTarget.from_toml(_write(tmp_path, text))


def test_target_file_negative_field_is_named(tmp_path):
    text = (TARGET_DIR / "exynos2400.toml").read_text().replace("efficiency = 0", "efficiency = -0", 1)
    with pytest.raises(TargetError, match="'tensor.efficiency' must be positive"):
        NpuTarget.from_toml(_write(tmp_path, text))


def test_weight_buffer_that_leaves_no_activation_sram_is_an_error(tmp_path):
    text = (TARGET_DIR / "exynos2400.toml").read_text().replace("weight_buffer_bytes = 524_288",
                                                                "weight_buffer_bytes = 6_291_456")
    with pytest.raises(TargetError, match="weight_buffer_bytes must be smaller"):
        NpuTarget.from_toml(_write(tmp_path, text))


@pytest.mark.parametrize("name", ["exynos2400", "exynos2200"])
def test_every_number_in_the_target_file_says_where_it_comes_from(name):
    """Each value carries a comment on its line or in the comment block right above it."""
    covered = False   # a comment block covers the value lines right below it
    for line in (TARGET_DIR / f"{name}.toml").read_text().splitlines():
        s = line.strip()
        if s.startswith("#"):
            covered = True
        elif not s or s.startswith("["):
            covered = False
        elif s.split("=")[0].strip() not in ("name", "kind"):
            assert "#" in s or covered, f"no source comment: {line}"


def test_target_file_unknown_field_is_named(tmp_path):
    text = (TARGET_DIR / "exynos2400.toml").read_text().replace("reserve_bytes = ", "reserve_byte = ")
    with pytest.raises(TargetError, match="unknown field 'sram.reserve_byte'"):
        NpuTarget.from_toml(_write(tmp_path, text))
    text = (TARGET_DIR / "exynos2400.toml").read_text() + "\n[tensor.rate2]\nint4 = 2.0  # no such table\n"
    with pytest.raises(TargetError, match="unknown field 'tensor.rate2'"):
        NpuTarget.from_toml(_write(tmp_path, text))


def test_target_file_mistyped_reserve_is_an_error_not_ignored(tmp_path):
    text = (TARGET_DIR / "exynos2400.toml").read_text().replace("reserve_bytes = 393_216", 'reserve_bytes = "384KiB"')
    with pytest.raises(TargetError, match="'sram.reserve_bytes' must be int"):
        NpuTarget.from_toml(_write(tmp_path, text))
    text = (TARGET_DIR / "exynos2400.toml").read_text().replace("reserve_bytes = 393_216", "reserve_bytes = 6_291_456")
    with pytest.raises(TargetError, match="'sram.reserve_bytes' must be less than sram.bytes"):
        NpuTarget.from_toml(_write(tmp_path, text))


def test_target_file_bad_pass_table_is_named(tmp_path):
    text = (TARGET_DIR / "exynos2400.toml").read_text().replace("clip = { max = 2 }", "clip = { maxx = 2 }")
    with pytest.raises(TargetError, match="'vector.passes.clip' must be a table of whole pass counts"):
        NpuTarget.from_toml(_write(tmp_path, text))


def test_optional_fields_take_their_documented_defaults(tmp_path):
    text = (TARGET_DIR / "exynos2400.toml").read_text()
    for line in ("reserve_bytes = 393_216", "per_matmul = 1", "per_softmax = 2"):
        assert line in text
        text = text.replace(line, "")
    t = NpuTarget.from_toml(_write(tmp_path, text))
    assert t.sram.reserve == 0 and t.arch.handoff.per_matmul == 1 and t.arch.handoff.per_softmax == 2
    assert t.arch.tensor.dtypes == ("fp32", "fp16", "int16", "int8")


def test_the_reserve_and_granularity_come_from_the_target_file(target):
    from edgefc import tile_solver

    assert target.sram.reserve == int(TOML["sram"]["reserve_bytes"])
    assert tile_solver.default_budget(target) == TOML["sram"]["bytes"] - TOML["sram"]["reserve_bytes"]
    assert edgefc.attention.row_granularity(target) == TOML["tensor"]["row_granularity"]
    bigger = target.with_fields({"sram.reserve_bytes": 1 << 20, "tensor.row_granularity": 32})
    assert tile_solver.default_budget(bigger) == TOML["sram"]["bytes"] - (1 << 20)
    assert edgefc.attention.row_granularity(bigger) == 32


def test_vector_passes_and_handoffs_come_from_the_target_file(target):
    spec = AttentionSpec("a", 1, 2, 64, 64, 40, 40, "fp16")
    cmds = target.attention_commands(spec, Tiling(1, 1))
    (sm,) = [c for c in cmds if c.role == "softmax"]
    assert dict(sm.passes) == TOML["vector"]["passes"]["softmax"] and sm.handoffs == TOML["handoff"]["per_softmax"]
    changed = target.with_fields({"vector.passes.softmax": {"exp": 3}, "handoff.per_matmul": 5})
    cmds = changed.attention_commands(spec, Tiling(1, 1))
    assert [dict(c.passes) for c in cmds if c.role == "softmax"] == [{"exp": 3}]
    assert [c.handoffs for c in cmds if c.kind == "tensor"] == [5, 5]


@pytest.mark.parametrize("dtype, key", [("fp16", "fp16"), ("fp32", "fp32"), ("int16", "int16xint16"),
                                        ("int8", "int8xint8")])
def test_attention_is_priced_at_the_rate_key_of_its_dtype(target, dtype, key):
    spec = AttentionSpec("a", 1, 2, 64, 64, 40, 40, dtype)
    mm = [c for c in target.attention_commands(spec, Tiling(1, 1)) if c.kind == "tensor"]
    assert [c.precision for c in mm] == [key, key]
    # the rate of that key, and no other, moves the matmuls' cycles
    slower = target.with_fields({f"tensor.rate.{key}": TOML["tensor"]["rate"][key] / 2})
    others = target.with_fields({f"tensor.rate.{k}": v / 2 for k, v in TOML["tensor"]["rate"].items() if k != key})
    base = [command_cycles(target.arch, c) for c in mm]
    assert [command_cycles(slower.arch, c) for c in mm] != base
    assert [command_cycles(others.arch, c) for c in mm] == base


def test_fp16_and_int16_attention_differ_only_in_rate(target):
    """Same bytes, same SRAM, different [tensor.rate] key (the VAE decoder's FP16 attention used to
    be priced as INT16 x INT16)."""
    f, i = (AttentionSpec("a", 1, 8, 1024, 1024, 40, 40, d) for d in ("fp16", "int16"))
    assert target.attention_sram_bytes(f, Tiling(1, 1)) == target.attention_sram_bytes(i, Tiling(1, 1))
    cf, ci = target.attention_commands(f, Tiling(1, 1)), target.attention_commands(i, Tiling(1, 1))
    assert [c.bytes for c in cf] == [c.bytes for c in ci]
    rate = TOML["tensor"]["rate"]
    assert (target.attention_cycles(f, Tiling(1, 1)) < target.attention_cycles(i, Tiling(1, 1))) == (rate["fp16"] > rate["int16xint16"])


# Table 6 as this target file prices it (PERFORMANCE.md "The fit"): a change to the formulas, the
# lowering of the block or the fitted numbers that moves any share shows up here first.
TABLE6_PINNED = {
    "rows": {"load_qk": 0.585, "qk_matmul": 6.866, "store_s_in": 18.724, "load_s_in": 18.724, "softmax": 10.981,
             "store_s_out": 18.724, "load_s_out_v": 19.309, "sv_matmul": 5.503, "store_out": 0.585},
    "rows_mlt": {"load_qk": 0.594, "qk_matmul": 7.284, "store_s_in": 0.0, "load_s_in": 0.0, "softmax": 11.816,
                 "store_s_out": 0.0, "load_s_out_v": 0.586, "sv_matmul": 5.92, "store_out": 0.594},
}
TABLE6_PAPER = {"load_qk": (0.6, 0.6), "qk_matmul": (6.9, 7.2), "store_s_in": (19.1, None),
                "load_s_in": (18.2, None), "softmax": (11.0, 11.6), "store_s_out": (18.5, None),
                "load_s_out_v": (19.5, 0.8), "sv_matmul": (5.4, 5.7), "store_out": (0.7, 0.7)}


def test_table6_is_pinned_and_within_the_paper(target):
    from edgefc import tile_solver

    sol = tile_solver.solve(BLOCK, target, tile_solver.default_budget(target), target.row_granularity, "overlap")
    assert sol.tiling == Tiling(16, 8)
    untiled = role_cycles(target.arch, BLOCK, Tiling(1, 1))
    total = sum(untiled.values())
    rows = {k: 100 * v / total for k, v in untiled.items()}
    rows_mlt = {k: 100 * v / total for k, v in role_cycles(target.arch, BLOCK, sol.tiling).items()}
    assert rows == pytest.approx(TABLE6_PINNED["rows"], abs=5e-4)
    assert rows_mlt == pytest.approx(TABLE6_PINNED["rows_mlt"], abs=5e-4)
    for k, (wo, w) in TABLE6_PAPER.items():
        assert abs(rows[k] - wo) <= 1.5, k
        assert w is None or abs(rows_mlt[k] - w) <= 1.5, k
    assert abs(sum(rows_mlt.values()) - 27.0) <= 2.0
