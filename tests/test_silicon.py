"""Cost model vs silicon (issue 14): --precision w8a8, the second chip (exynos2200), the stated
validation of a target, cascades with weight re-fetch per stripe, and the fit's bookkeeping."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper

import edgefc
from edgefc.targets import TARGET_DIR
from tests import npu_graphs
from tests.cli import assert_user_error, run_cli

ROOT = Path(__file__).resolve().parents[1]


def graph_of(model) -> gs.Graph:
    return edgefc.infer_shapes(gs.import_onnx(model))


def conv_chain(c: int, hw: int, n: int = 2) -> onnx.ModelProto:
    """x -> Conv -> Conv ... (n 3x3 convolutions, c channels, residual Add of the first) -> y."""
    rng = np.random.default_rng(0)
    nodes, inits, prev = [], [], "x"
    for i in range(n):
        inits.append(numpy_helper.from_array(rng.standard_normal((c, c, 3, 3)).astype(np.float32) * 0.01, f"w{i}"))
        nodes.append(helper.make_node("Conv", [prev, f"w{i}"], [f"c{i}"], name=f"conv{i}", pads=[1, 1, 1, 1]))
        prev = f"c{i}"
    nodes.append(helper.make_node("Add", ["c0", prev], ["y"], name="add"))
    vi = [helper.make_tensor_value_info(n_, TensorProto.FLOAT, [1, c, hw, hw]) for n_ in ("x", "y")]
    return helper.make_model(helper.make_graph(nodes, "chain", [vi[0]], [vi[1]], inits),
                             opset_imports=[helper.make_opsetid("", 17)])


def test_w8a8_prices_int8_everywhere():
    t = edgefc.get_target("exynos2400").with_fields({"sram.resident_weights": False})
    g = graph_of(npu_graphs.conv_model(64, 128, 32, 3))
    p8, p16 = t.lower(g, "w8a8"), t.lower(g, "w8a16")
    (c8,) = [c for c in p8.commands if c.kind == "tensor"]
    assert c8.precision == "int8xint8"
    acts = lambda p: sum(c.bytes for c in p.commands if c.kind in ("load", "store") and ":weights" not in c.tensor)
    assert acts(p16) == 2 * acts(p8)                 # activations INT8 vs INT16
    w = lambda p: next(c.bytes for c in p.commands if c.tensor.endswith(":weights"))
    assert w(p8) == w(p16) == 64 * 128 * 9 + 128 * 4  # INT8 weights, INT32 bias in both
    assert t.profile(g, "w8a8").total_cycles < t.profile(g, "w8a16").total_cycles


def test_int8_vector_path_is_cheaper_per_element():
    t = edgefc.get_target("exynos2400")
    g = graph_of(npu_graphs.softmax_model(512, 1024))
    v8 = t.profile(g, "w8a8").by_command_engine()["vector"]
    v16 = t.profile(g, "w8a16").by_command_engine()["vector"]
    v = t.arch.vector
    per8 = (1 + 1 + v.int8_cycles_per_element["exp"] + 1 + v.int8_cycles_per_element["divide"]) / v.int8_elements_per_lane
    per16 = 1 + 1 + v.cycles_per_element["exp"] + 1 + v.cycles_per_element["divide"]
    assert v8 / v16 == pytest.approx(per8 / per16, rel=1e-9) and v8 < v16


def test_cascade_refetches_weights_per_stripe_when_they_do_not_stay():
    """Two 3x3 convolutions of 256 channels on 128x128 (8 MiB maps at INT16) and a residual: the
    maps stay on chip in row stripes; each conv's 590 KB of weights exceed the 512 KiB weight
    buffer, so they are fetched once per stripe."""
    t = edgefc.get_target("exynos2400").with_fields({"sram.resident_weights": False})
    prog = t.lower(graph_of(conv_chain(256, 128)), "w8a16")
    moved = [(c.kind, c.tensor) for c in prog.commands if c.kind in ("load", "store") and ":weights" not in c.tensor]
    assert moved == [("load", "x"), ("store", "y")]
    assert prog.residency["c0"] == "stream"
    wl = [c for c in prog.commands if c.tensor.endswith(":weights")]
    budget = t.sram.activations
    act = 256 * 128 * 128 * 2
    assert [c.repeat for c in wl] == [-(-act // budget), -(-2 * act // budget)]
    # small weights stay in the weight buffer across stripes
    small = t.lower(graph_of(conv_chain(32, 512)), "w8a16")
    assert all(c.repeat == 1 for c in small.commands if c.tensor.endswith(":weights"))
    # without cascades the maps make DRAM round trips
    off = t.with_fields({"sram.cascade": False}).lower(graph_of(conv_chain(256, 128)), "w8a16")
    assert ("store", "c0") in [(c.kind, c.tensor) for c in off.commands]


def test_exynos2200_is_a_target_from_public_facts():
    t2, t4 = edgefc.get_target("exynos2200"), edgefc.get_target("exynos2400")
    assert t2.arch.tensor.macs_per_cycle == 8192 and t2.sram.total == 2 << 20
    assert t2.arch.tensor.rate["fp16"] == 0.5 and t2.arch.dma.bandwidth_bytes_per_s == 51.2e9
    assert t2.validation is None                    # nothing fitted to, or validated on, the 2200
    g = graph_of(npu_graphs.conv_model(64, 128, 64, 3))
    assert t2.profile(g, "w8a8").total_ms > t4.profile(g, "w8a8").total_ms


def test_exynos2200_profiles_every_tiny_model(tiny_models, tmp_path):
    for comp, path in tiny_models.items():
        rc, out = run_cli("profile", str(path), "--target", "exynos2200", "--json", str(tmp_path / f"{comp}.json"))
        assert rc == 0, out
        p = json.loads((tmp_path / f"{comp}.json").read_text())
        assert p["target"] == "exynos2200" and p["total_ms"] > 0 and p["validation"] is None
        assert "not validated" in out


def test_profile_states_the_targets_validation(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save_model(npu_graphs.matmul_model(64, 64, 64), str(path))
    rc, out = run_cli("profile", str(path), "--precision", "w8a8", "--json", str(tmp_path / "p.json"))
    assert rc == 0, out
    v = json.loads((TARGET_DIR / "exynos2400.validation.json").read_text())
    assert "bench/fit_exynos2400.py" in v["made_by"]
    line = (f"target validated on {v['figures']} measured latencies: median |error| "
            f"{v['median_abs_error_pct']:g} %, worst {v['worst_abs_error_pct']:g} % ({v['worst_figure']}); "
            f"each left out of the fit: median {v['loo_median_abs_error_pct']:g} %, "
            f"worst {v['loo_worst_abs_error_pct']:g} %")
    assert line in out
    p = json.loads((tmp_path / "p.json").read_text())
    assert p["validation"] == v and p["validation_summary"] == line
    assert v["figures"] == len(v["errors_pct"]) >= 8
    errs = sorted(abs(e) for e in v["errors_pct"].values())
    assert v["worst_abs_error_pct"] == pytest.approx(errs[-1], abs=0.051)


def test_unknown_schedule_is_a_user_error(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save_model(npu_graphs.matmul_model(16, 16, 16), str(path))
    assert_user_error(*run_cli("profile", str(path), "--schedule", "parallel"), "schedule 'parallel'")


def test_fit_features_price_exactly_as_the_cost_model():
    """The fit re-prices Programs from per-command arrays; they must equal the overlap schedule."""
    sys.path.insert(0, str(ROOT / "bench"))
    from fit_exynos2400 import Features

    from edgefc.targets.cost_model import SCHEDULES, command_cycles

    t = edgefc.get_target("exynos2400").with_fields({"sram.resident_weights": False})
    for model, prec in ((npu_graphs.attention_model(seq=1024, heads=8, head_dim=40), "w8a16"),
                        (conv_chain(256, 128), "w8a8"), (npu_graphs.softmax_model(2, 8), "w8a8")):
        prog = t.lower(graph_of(model), prec)
        a = t.arch
        want = SCHEDULES["overlap"]().run(prog, [command_cycles(a, c) for c in prog.commands], a).total
        assert Features(prog).cycles(a) == pytest.approx(want, rel=1e-12)
