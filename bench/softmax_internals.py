"""What the precision of an attention's softmax internals does to its output, on real Q, K, V.

A W8A8 attention's S_out = Softmax(Q K^T * scale) is either INT16 (S_out x V priced at
``int8xint16``, a quarter of the INT8 rate; computed in float by onnxruntime's ``Attention``) or,
where the cost model prices it faster, the UINT8 exp(S - row max) of the deferred normalisation
(``passes/quant_policy.py``, ``attention-scores``; ``TiledAttention`` with
``deferred_normalization``, whose ONNX body emulates it). This bench measures the three choices
per attention, in numpy, on the Q, K, V that the FP32 model computes for recorded inputs:

* ``INT16 S_out``: one scale over [0, 1] (step 1/32767);
* ``INT8 S_out``: one scale over [0, 1] (step 1/255): what the deferral avoids;
* ``INT8 exp, sum after``: exp(S - row max) in (0, 1] at step 1/255, the row sum taken over the
  quantized values and applied after S x V (the deferred normalisation, as W8A8 builds compute
  it: ``edgefc.attention.reference(deferred=True)``), so a row's probabilities are not all below
  the grid.

For each attention with at least ``--min-keys`` keys it prints the SQNR of the attention output
against the float one per input, the median row maximum of S_out and the share of probabilities
under half an INT8 step (1/510). ``--model`` is the FP32 U-Net ONNX, ``--eval`` an ``edgefc
calibrate`` ``.npz`` (one array per input, ``[N, *shape]``).

    python bench/softmax_internals.py --model unet.onnx --eval CALIB/unet.eval.npz --inputs 2
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from edgefc.attention import deferred_probabilities
from edgefc.metrics import sqnr_db


def grid(x: np.ndarray, step: float, levels: int) -> np.ndarray:
    return np.clip(np.round(x / step), 0, levels) * step


def encodings(q: np.ndarray, k: np.ndarray, v: np.ndarray, heads: int, scale: float) -> tuple[dict, dict]:
    """The float attention output against each encoding of its internals; q, k, v: ``[B, S, H*d]``."""
    b, _, c = q.shape
    d = c // heads
    qh, kh, vh = (x.reshape(b, -1, heads, d).transpose(0, 2, 1, 3).astype(np.float64) for x in (q, k, v))
    s = qh @ kh.transpose(0, 1, 3, 2) * scale
    e = np.exp(s - s.max(-1, keepdims=True))
    p = e / e.sum(-1, keepdims=True)
    ref = p @ vh
    eq = deferred_probabilities(e.astype(np.float32)).astype(np.float64)   # what a W8A8 build computes
    out = {"INT16 S_out": sqnr_db(ref, grid(p, 1 / 32767, 32767) @ vh),
           "INT8 S_out": sqnr_db(ref, grid(p, 1 / 255, 255) @ vh),
           "INT8 exp, sum after": sqnr_db(ref, (eq @ vh) / np.maximum(eq.sum(-1, keepdims=True), 1 / 255))}
    return out, {"median row max": float(np.median(p.max(-1))), "share < 1/510": float((p < 1 / 510).mean())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="the FP32 ONNX model (a U-Net export)")
    ap.add_argument("--eval", required=True, help="recorded inputs: an `edgefc calibrate` .npz")
    ap.add_argument("--inputs", type=int, default=2, help="how many of its inputs (default 2)")
    ap.add_argument("--min-keys", type=int, default=4096, help="attentions with at least this many keys (default 4096)")
    args = ap.parse_args(argv)

    import edgefc
    from edgefc import ir, ort
    from edgefc.pass_base import PassContext

    g = edgefc.PassManager(["canonicalize", "fuse-attention"]).run(ir.load(args.model), PassContext())
    att = {n.name: ([t.name for t in n.inputs[:3]], int(n.attrs["q_num_heads"]), float(n.attrs["scale"]))
           for n in g.nodes if n.op == "Attention" and n.inputs[1].shape and n.inputs[1].shape[1] >= args.min_keys}
    if not att:
        sys.exit(f"no attention with at least {args.min_keys} keys in {args.model}")
    wanted = {t for names, _, _ in att.values() for t in names}
    tensors = g.tensors()
    g.outputs = [tensors[t] for t in sorted(wanted)]
    for t in g.outputs:
        t.dtype = np.float32
    g.cleanup()
    sess = ort.session(g)
    z = np.load(args.eval)
    feeds = [i.name for i in sess.get_inputs()]
    names = [o.name for o in sess.get_outputs()]
    count = min(args.inputs, len(z[feeds[0]]))
    rows: dict[tuple[str, str], list[float]] = {}
    for i in range(count):
        vals = dict(zip(names, sess.run(None, {f: z[f][i] for f in feeds})))
        for name, (tn, heads, scale) in att.items():
            db, stats = encodings(*(vals[t] for t in tn), heads, scale)
            for key, value in {**db, **stats}.items():
                rows.setdefault((name, key), []).append(value)
    print(f"{args.model}: {len(att)} attentions with >= {args.min_keys} keys, inputs 0..{count - 1} "
          f"of {args.eval}")
    for (name, key), values in rows.items():
        unit = " dB" if key.startswith("INT") else ""
        print(f"  {name:72s} {key:22s} " + "  ".join(f"{v:8.4g}{unit}" for v in values))
    return 0


if __name__ == "__main__":
    sys.exit(main())
