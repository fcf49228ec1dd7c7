"""The strict comparator (edgefc.ort.compare) and the one session factory: each failure mode."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from edgefc import ort


def _a(*values, dtype=np.float32):
    return np.array(values, dtype=dtype)


def test_equal_outputs_have_zero_error():
    ref = {"y": _a(1.0, -2.0, 4.0), "i": np.arange(3)}
    d = ort.compare(ref, {k: v.copy() for k, v in ref.items()})
    assert d.within(0.0) and d.rel_error == 0.0 and not d.reason


def test_error_is_relative_to_the_output_scale():
    d = ort.compare({"y": _a(1.0, -4.0)}, {"y": _a(1.0, -4.002)})
    assert d.output == "y" and math.isclose(d.abs_error, 0.002, rel_tol=1e-3) and math.isclose(d.rel_error, 0.0005, rel_tol=1e-3)
    assert d.within(1e-3) and not d.within(1e-4)


def test_worst_output_is_named():
    d = ort.compare({"a": _a(1.0), "b": _a(1.0)}, {"a": _a(1.0), "b": _a(1.5)})
    assert d.output == "b" and d.rel_error == 0.5


def test_missing_output_fails():
    d = ort.compare({"y": _a(1.0), "z": _a(2.0)}, {"y": _a(1.0)})
    assert not d.within(1.0) and "output 'z' is missing" in d.reason and d.rel_error == math.inf


def test_extra_output_fails():
    d = ort.compare({"y": _a(1.0)}, {"y": _a(1.0), "w": _a(0.0)})
    assert not d.within(1.0) and "'w' is not in the reference" in d.reason


def test_broadcastable_shape_change_fails():
    # [3] vs [1, 3] (and [1] vs [3]) broadcast in numpy: a loose comparator reports no error
    d = ort.compare({"y": _a(1.0, 2.0, 3.0)}, {"y": _a(1.0, 2.0, 3.0).reshape(1, 3)})
    assert "shape (1, 3), the reference (3,)" in d.reason
    assert "shape (3,), the reference (1,)" in ort.compare({"y": _a(2.0)}, {"y": _a(2.0, 2.0, 2.0)}).reason


def test_dtype_change_fails():
    d = ort.compare({"y": _a(1.0, 2.0)}, {"y": _a(1.0, 2.0, dtype=np.float64)})
    assert "dtype float64, the reference float32" in d.reason
    assert ort.compare({"i": np.arange(2)}, {"i": np.arange(2, dtype=np.int32)}).reason


def test_nan_where_the_reference_is_finite_fails():
    d = ort.compare({"y": _a(1.0, 2.0, 3.0)}, {"y": _a(1.0, np.nan, 3.0)})
    assert not d.within(math.inf) and "'y' is nan at position (1,) where the reference is 2.0" in d.reason


def test_finite_where_the_reference_is_nan_fails():
    d = ort.compare({"y": _a(np.nan, 1.0)}, {"y": _a(0.0, 1.0)})
    assert "is 0.0 at position (0,) where the reference is nan" in d.reason


def test_matching_nan_and_inf_pass_and_are_left_out_of_the_error():
    ref = {"y": _a(np.nan, np.inf, -np.inf, 2.0)}
    d = ort.compare(ref, {"y": _a(np.nan, np.inf, -np.inf, 2.0001)})
    assert not d.reason and d.within(1e-4) and d.rel_error < 1e-4


def test_inf_of_the_other_sign_fails():
    d = ort.compare({"y": _a(np.inf, 1.0)}, {"y": _a(-np.inf, 1.0)})
    assert "is -inf at position (0,) where the reference is inf" in d.reason
    assert ort.compare({"y": _a(np.inf)}, {"y": _a(3e38)}).reason


def test_position_is_multi_dimensional_and_scalars_are_named():
    ref = np.zeros((2, 3), np.float32)
    got = ref.copy()
    got[1, 2] = np.nan
    assert "position (1, 2)" in ort.compare({"y": ref}, {"y": got}).reason
    assert "the scalar" in ort.compare({"s": np.float32(1.0)}, {"s": np.float32(np.nan)}).reason


def test_integer_and_bool_outputs_compare_exactly_at_zero_tolerance():
    assert not ort.compare({"i": np.array([3, 4])}, {"i": np.array([4, 5])}).within(0.0)
    assert not ort.compare({"b": np.array([True, False])}, {"b": np.array([True, True])}).within(0.0)
    assert ort.compare({"b": np.array([True])}, {"b": np.array([True])}).within(0.0)


def test_strings_compare_by_equality():
    assert "differs at position (1,)" in ort.compare({"s": np.array(["a", "b"], object)}, {"s": np.array(["a", "c"], object)}).reason


def test_empty_and_all_zero_outputs():
    assert ort.compare({"y": np.zeros((0, 3), np.float32)}, {"y": np.zeros((0, 3), np.float32)}).within(0.0)
    d = ort.compare({"y": _a(0.0, 0.0)}, {"y": _a(0.0, 0.5)})
    assert d.rel_error == 0.5  # all-zero reference: the absolute error


def test_check_raises_with_the_reason():
    with pytest.raises(AssertionError, match="output 'y' is missing"):
        ort.check({"y": _a(1.0)}, {})
    with pytest.raises(AssertionError, match="max rel error 0.5"):
        ort.check({"y": _a(2.0)}, {"y": _a(3.0)}, 1e-3)


def test_session_factory_runs_protos_paths_and_graphs(tmp_path):
    import onnx_graphsurgeon as gs

    node = helper.make_node("Relu", ["x"], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, tmp_path / "m.onnx")
    feeds = {"x": _a(-1.0, 2.0)}
    for m in (model, tmp_path / "m.onnx", str(tmp_path / "m.onnx"), gs.import_onnx(model)):
        ort.check({"y": _a(0.0, 2.0)}, ort.run(m, feeds))
    sess = ort.session(model, threads=1, optimize=True, arena=False)
    assert ort.run(sess, feeds)["y"].tolist() == [0.0, 2.0]
