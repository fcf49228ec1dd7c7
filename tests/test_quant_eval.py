"""Quality figures measured on the inputs they name (passes/quant_eval.py, issue 20 parts 1, 2, 6).

The report's SQNR is what an outside script measures on the same evaluation inputs (pooled over
every input, first output); evaluation inputs never calibrate; a build under the floor is not
written; the conditioning ratio compares how much the conditioning input moves the output.
"""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

import edgefc
from edgefc import ort
from edgefc.errors import QualityFloorError, QuantizationError
from edgefc.pass_base import PassContext
from edgefc.passes import calibration as cal
from edgefc.passes import quant_eval
from tests.cli import run_cli
from tests.synthetic import layer_chain
from tests.test_quantize import assert_user_error

#: a chain of MatMuls longer than the rescue's rounds can raise to FP32 (1 + 2 + ... + 32 layers,
#: each one step), so a floor of 90 dB stays out of reach at ~1 s a build instead of the tiny U-Net's
#: rounds; every layer is probed, so a floor failure has layers to name.
CHAIN_LAYERS = 64


@pytest.fixture(scope="module")
def unet(tiny_models):
    g = edgefc.PassManager(["canonicalize", "fuse"]).run(edgefc.load(tiny_models["unet"]), PassContext())
    return g


@pytest.fixture(scope="module")
def chain():
    return edgefc.PassManager(["canonicalize"]).run(gs.import_onnx(layer_chain(CHAIN_LAYERS)), PassContext())


@pytest.fixture(scope="module")
def chain_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("chain") / "chain.onnx"
    onnx.save(layer_chain(CHAIN_LAYERS), str(path))
    return path


def _save(path, samples, **extra):
    np.savez(path, **{k: np.stack([s[k] for s in samples]) for k in samples[0]}, **extra)
    return path


def quantize(graph, **options):
    options.setdefault("progress", False)
    ctx = PassContext(options=options)
    out = edgefc.PassManager(["quantize"]).run(graph.copy(), ctx)
    return out, ctx.report["quantization"]


def outside_sqnr(reference: gs.Graph, built: gs.Graph, samples: list[dict], optimize: bool = True) -> float:
    """The acceptance check's definition: 10 log10(sum ref^2 / sum err^2) over all samples pooled,
    first output of each model, each run as a user runs it (onnxruntime's default session:
    optimisations on), or as written (``optimize=False``)."""
    rs, bs = ort.session(reference), ort.session(built, optimize=optimize)
    s = e = 0.0
    for feeds in samples:
        a = np.asarray(rs.run(None, feeds)[0], np.float64)
        b = np.asarray(bs.run(None, feeds)[0], np.float64)
        s += float((a * a).sum())
        e += float(((a - b) ** 2).sum())
    return 10 * math.log10(s / e)


def test_report_sqnr_is_measured_on_the_eval_file_as_an_outside_script_would(unet, tmp_path):
    calib, _ = cal.generate(unet, "unet", 4, seed=1)
    held, _ = cal.generate(unet, "unet", 3, seed=2)
    for s in held:  # inputs unlike the calibration ones: the figure must follow them
        s["sample"] = s["sample"] * 1.5
    empty = held[0]["encoder_hidden_states"] * 0.0 + 0.1
    cp = _save(tmp_path / "c.npz", calib)
    ep = _save(tmp_path / "e.npz", held, **{"unconditional:encoder_hidden_states": empty})
    q, r = quantize(unet, precision="w8a16", calib=str(cp), eval_file=str(ep))
    assert r["eval_source"] == "eval" and r["eval_inputs"]["samples"] == 3
    assert r["calibration"]["samples"] == 4 and "held_out_for_eval" not in r["calibration"]
    assert r["sqnr_db"] == pytest.approx(outside_sqnr(unet, q, held), abs=1e-3)
    assert r["sqnr_db_as_written"] == pytest.approx(outside_sqnr(unet, q, held, optimize=False), abs=1e-3)
    assert list(r["sqnr_db_per_output"]) == ["out_sample"] and r["sqnr_db_per_output"]["out_sample"] == r["sqnr_db"]
    assert r["min_sqnr_db"] == quant_eval.DEFAULT_MIN_SQNR_DB
    # conditioning: recomputed here from the four runs
    rs, qs = ort.session(unet), ort.session(q)
    num = den = 0.0
    for feeds in held:
        u = {**feeds, "encoder_hidden_states": empty[None] if empty.ndim == 2 else empty}
        num += float(np.sum((qs.run(None, feeds)[0].astype(np.float64) - qs.run(None, u)[0]) ** 2))
        den += float(np.sum((rs.run(None, feeds)[0].astype(np.float64) - rs.run(None, u)[0]) ** 2))
    assert r["conditioning"] == pytest.approx(math.sqrt(num / den), abs=1e-3)
    assert 0.9 < r["conditioning"] < 1.1 and len(r["conditioning_per_input"]) == 3
    json.dumps(r)


def test_eval_file_must_match_the_model(unet, tmp_path):
    held, _ = cal.generate(unet, "unet", 2, seed=2)
    bad = tmp_path / "bad.npz"
    np.savez(bad, sample=np.stack([s["sample"] for s in held]))
    with pytest.raises(QuantizationError, match="missing timestep, encoder_hidden_states"):
        quantize(unet, precision="w8a16", eval_file=str(bad))
    wrong = _save(tmp_path / "u.npz", held, **{"unconditional:encoder_hidden_states": np.zeros((3, 3), np.float32)})
    with pytest.raises(QuantizationError, match="unconditional:encoder_hidden_states' has shape"):
        quantize(unet, precision="w8a16", eval_file=str(wrong))
    unknown = _save(tmp_path / "k.npz", held, **{"unconditional:nope": np.zeros((3,), np.float32)})
    with pytest.raises(QuantizationError, match="unknown unconditional:nope"):
        quantize(unet, precision="w8a16", eval_file=str(unknown))


def test_floor_failure_names_the_worst_layers(chain):
    with pytest.raises(QualityFloorError) as e:   # after the rescue's rounds
        quantize(chain, precision="w8a16", calib_samples=2, eval_samples=2, min_sqnr=90)
    msg = str(e.value)
    assert "\n" not in msg and "on generated inputs (not real data" in msg and "under the --min-sqnr floor of 90 dB" in msg
    assert msg.count(" dB), ") == quant_eval.FLOOR_LAYERS - 1  # three layers named, with their figures
    _, r = quantize(chain, precision="w8a16", calib_samples=2, eval_samples=2, min_sqnr=-math.inf)
    assert r["min_sqnr_db"] is None and r["sqnr_db"] < 90


def test_every_float_output_is_measured_and_the_floor_holds_the_worst():
    x = gs.Variable("x", dtype=np.float32, shape=[1, 16])
    a = gs.Variable("a", dtype=np.float32, shape=[1, 16])
    b = gs.Variable("b", dtype=np.float32, shape=[1, 16])
    w = np.random.default_rng(0).standard_normal((16, 16)).astype(np.float32)
    nodes = [gs.Node("MatMul", name="mm", inputs=[x, gs.Constant("w", w)], outputs=[a]),
             gs.Node("Relu", name="relu", inputs=[a], outputs=[b])]
    g = gs.Graph(nodes=nodes, inputs=[x], outputs=[a, b], opset=23)
    _, r = quantize(g, precision="fp16", eval_samples=3)
    assert set(r["sqnr_db_per_output"]) == {"a", "b"} and r["sqnr_db"] == r["sqnr_db_per_output"]["a"]
    inputs = quant_eval.EvalInputs([{}], "calib-heldout")
    m = quant_eval.Measurement(40.0, {"boxes": 40.0, "scores": 12.0}, [40.0], 0.99, None, [],
                               [quant_eval.LayerLoss("/head/Concat", "Concat", 11.0)], 1, inputs)
    assert m.worst_output == ("scores", 12.0)
    quant_eval.check_floor(m, 12.0)
    with pytest.raises(QualityFloorError, match=r"12.0 dB SQNR output 'scores' on the held-out part of --calib.*"
                                                r"/head/Concat \(Concat, 11.0 dB\)"):
        quant_eval.check_floor(m, 25.0, "w8a16")


def test_compile_under_the_floor_exits_2_and_writes_nothing(chain_file, tmp_path):
    """The CLI's floor failure (auto is W8A16 for any model on the NPU target; the rescue cannot reach
    95 dB on the chain): exit 2, one line naming the worst layers, nothing written beside the model."""
    out = tmp_path / "build"
    rc, text = run_cli("compile", str(chain_file), "-o", str(out), "--calib-samples", "1",
                       "--eval-samples", "1", "--min-sqnr", "95", "--no-mlt")
    assert_user_error(rc, text, "under the --min-sqnr floor of 95 dB", "worst layers: /net/layers.")
    assert not out.exists() and not any(tmp_path.iterdir())
    rc, text = run_cli("compile", str(chain_file), "-o", str(out), "--eval", str(tmp_path / "none.npz"))
    assert_user_error(rc, text, "evaluation file not found")
    rc, text = run_cli("compile", str(chain_file), "-o", str(out), "--min-sqnr", "nan")
    assert rc == 2 and "Traceback" not in text and "not a floor" in text
    assert not any(tmp_path.iterdir()) and sorted(p.name for p in chain_file.parent.iterdir()) == ["chain.onnx"]


# --- --precision auto on any model (issue 20 part 7) ------------------------------------------------

def _tiny(nodes, inputs, outputs):
    return gs.Graph(nodes=nodes, inputs=inputs, outputs=outputs, opset=23)


def test_auto_quantizes_other_models_on_npu_targets_only(tmp_path):
    x = gs.Variable("x", dtype=np.float32, shape=[1, 8, 6, 6])
    y = gs.Variable("y", dtype=np.float32, shape=[1, 4, 6, 6])
    w = np.random.default_rng(0).standard_normal((4, 8, 3, 3)).astype(np.float32)
    g = _tiny([gs.Node("Conv", name="conv", inputs=[x, gs.Constant("w", w)], outputs=[y], attrs={"pads": [1, 1, 1, 1]})],
              [x], [y])
    path = tmp_path / "conv.onnx"
    edgefc.save(g, path)
    npu = edgefc.compile(path, "exynos2400", options={"progress": False, "no_mlt": True})
    q = npu.report["quantization"]
    assert q["precision"] == "w8a16" and q["eval_source"] == "generated" and "auto: not a text encoder" in q["reason"]
    assert q["sqnr_db"] > 30 and any(n.op == "DequantizeLinear" for n in npu.graph.nodes)
    host = edgefc.compile(path, None, passes=["canonicalize", "quantize"], options={"progress": False})
    assert host.report["quantization"]["precision"] == "fp32" and "no NPU target" in host.report["quantization"]["reason"]


def test_auto_is_sane_on_operator_graphs():
    """Constant-valued tensors and Pow exponents stay exact; integer-only outputs are compared for
    agreement; NaN that FP32 itself produces is left out, not blamed on the build."""
    x = gs.Variable("x", dtype=np.float32, shape=[2, 8])
    three = gs.Variable("three", dtype=np.float32, shape=[])
    cube = gs.Variable("cube", dtype=np.float32, shape=[2, 8])
    g = _tiny([gs.Node("CastLike", name="cl", inputs=[gs.Constant("c3", np.array(3.0, np.float32)), x], outputs=[three]),
               gs.Node("Pow", name="pow", inputs=[x, three], outputs=[cube])], [x], [cube])
    q, r = quantize(g, precision="w8a16", eval_samples=4)  # a rounded 3 would make x^3 NaN for x < 0
    assert r["sqnr_db"] > 30 and r["kept_higher_precision"]["constant-values"]["count"] == 1
    idx = gs.Variable("idx", dtype=np.int64, shape=[2])
    g = _tiny([gs.Node("ArgMax", name="am", inputs=[x], outputs=[idx], attrs={"axis": 1, "keepdims": 0})], [x], [idx])
    _, r = quantize(g, precision="w8a16", eval_samples=4)
    assert r["sqnr_db"] is None and r["reason_no_sqnr"] == "the model has no float output"
    assert 0.5 <= r["agreement_per_output"]["idx"] <= 1.0
    e = gs.Variable("e", dtype=np.float32, shape=[2, 8])
    z = gs.Variable("z", dtype=np.float32, shape=[2, 8])
    g = _tiny([gs.Node("Pow", name="pow", inputs=[x, e], outputs=[z])], [x, e], [z])  # NaN for x < 0 in FP32 too
    _, r = quantize(g, precision="w8a16", eval_samples=4, min_sqnr=-math.inf)
    assert r["nonfinite_in_fp32"]["z"] > 0 and r["sqnr_db"] is not None
