"""bench/softmax_internals.py: the encodings of an attention's softmax internals it compares."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx

from tests.synthetic import attention_blocks

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("softmax_internals", ROOT / "bench" / "softmax_internals.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_uniform_rows_vanish_at_one_int8_scale_and_are_exact_deferred():
    rng = np.random.default_rng(0)
    q = np.zeros((1, 4096, 64), np.float32)             # every score 0: P = 1/4096 everywhere
    k, v = rng.standard_normal((2, 1, 4096, 64)).astype(np.float32)
    db, stats = bench.encodings(q, k, v, heads=2, scale=0.125)
    assert db["INT8 S_out"] == 0.0                        # every probability rounds to 0
    assert db["INT8 exp, sum after"] == float("inf")      # exp(s - max) = 1: exact
    assert 40 < db["INT16 S_out"] < float("inf")        # 1/4096 on a grid of 1/32767: close, not exact
    assert stats["share < 1/510"] == 1.0 and abs(stats["median row max"] - 1 / 4096) < 1e-9


def test_cli_prints_every_encoding_per_attention(tmp_path):
    model = tmp_path / "att.onnx"
    onnx.save(attention_blocks(1, seq=256, channels=64), str(model))
    m = onnx.load(str(model))
    x = m.graph.input[0]
    shape = [d.dim_value for d in x.type.tensor_type.shape.dim]
    np.savez(tmp_path / "eval.npz", **{x.name: np.random.default_rng(1).standard_normal([2, *shape]).astype(np.float32)})
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "softmax_internals.py"), "--model", str(model),
                           "--eval", str(tmp_path / "eval.npz"), "--min-keys", "256"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for key in ("INT16 S_out", "INT8 S_out", "INT8 exp, sum after", "median row max", "share < 1/510"):
        assert key in proc.stdout
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "softmax_internals.py"), "--model", str(model),
                           "--eval", str(tmp_path / "eval.npz"), "--min-keys", "100000"], capture_output=True, text=True)
    assert proc.returncode != 0 and "no attention with at least 100000 keys" in proc.stderr
