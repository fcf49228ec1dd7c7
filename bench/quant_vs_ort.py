"""edgefc W8A16 vs onnxruntime's ``quantize_static`` on the same model and calibration data.

Both quantizers get the same calibration inputs (edgefc's generator, written to one ``.npz``
that edgefc reads with ``--calib`` and onnxruntime reads through a CalibrationDataReader) and are
judged on the same held-out inputs (edgefc's generator with another seed; for the U-Net,
timesteps evenly spanning 0..999) against the FP32 export in onnxruntime. onnxruntime runs with
what the issue asks for: QDQ format, QInt8 per-channel weights, QInt16 activations, MinMax
calibration, everything else at its defaults.

Every step runs in its own subprocess, which reports its wall time and peak RSS:

* ``ours``: ``edgefc.compile`` with canonicalize, fuse, quantize (W8A16, ``--calib``, no
  held-out check of its own) - the time includes canonicalize and fuse;
* ``ort``: ``onnxruntime.quantization.quantize_static`` on the raw export;
* ``eval``: FP32 reference, then each quantized model, one session at a time.

    python bench/quant_vs_ort.py /tmp/edgefc-models/unet-bk-sdm-tiny-tiny.onnx
    python bench/quant_vs_ort.py /tmp/edgefc-models/unet-bk-sdm-tiny.onnx --json quant.json
    python bench/quant_vs_ort.py MODEL --skip-ort           # ours only (onnxruntime's peaks near 17 GB at full size)

``--ort-low-memory`` reorders onnxruntime's calibration graph so each ReduceMin/ReduceMax runs as
soon as its tensor exists (onnxruntime's default execution order otherwise keeps every activation
of the model alive at once: the ranges are the same, the peak is not; at full size onnxruntime
still peaked at 8.7 GB with it, 16.9 GB without per the issue). ``--max-rss-gb X`` kills a step
that grows beyond X GB (polled every 0.2 s, so a short spike can pass). Figures measured on the
full-size U-Net: docs/quantization.md.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _light_graph(model_path: str):
    """A graph of the model without its weights' bytes (inputs, shapes, node structure)."""
    import onnx
    import onnx_graphsurgeon as gs

    return gs.import_onnx(onnx.load(model_path, load_external_data=False))


def _samples(model_path: str, component: str | None, n: int, seed: int, evenly: bool):
    from edgefc.components import detect_component
    from edgefc.passes import calibration as cal

    g = _light_graph(model_path)
    component = component or detect_component(t.name for t in g.inputs)
    return cal.generate(g, component, n, seed, evenly=evenly)


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _dir_size(paths) -> int:
    return sum(p.stat().st_size for p in paths if p.is_file())


# --- steps (each runs in its own process) -------------------------------------------------------

def step_ours(model: str, calib: str, out: str, component: str | None) -> dict:
    import shutil

    import edgefc

    shutil.rmtree(out, ignore_errors=True)

    start = time.perf_counter()
    options = {"precision": "w8a16", "calib": calib, "eval_samples": 0, "progress": False}
    if component:
        options["component"] = component
    res = edgefc.compile(model, None, output=out, passes=["canonicalize", "fuse", "quantize"], options=options)
    seconds = time.perf_counter() - start
    q = res.report["quantization"]
    files = [Path(out) / "model.onnx", Path(out) / "model.onnx.data"]
    return {"seconds": seconds, "peak_mb": _peak_mb(), "bytes": _dir_size(files), "model": str(Path(out) / "model.onnx"),
            "calibration_seconds": q["calibration"].get("seconds")}


def _low_memory_calibration() -> None:
    """Place onnxruntime's calibration reductions so its reverse-DFS schedule runs them early
    (the same ordering edgefc's own probes use: edgefc.passes.disk_model.order_probes)."""
    import onnx
    from onnxruntime.quantization import calibrate

    original = calibrate.MinMaxCalibrater.augment_graph

    def augment_graph(self):
        real_save = onnx.save

        def save(model, *args, **kwargs):
            outputs = {o.name for o in model.graph.output}
            consumed = {x for n in model.graph.node for x in n.input}
            leaves = [n for n in model.graph.node if n.output and all(o in outputs and o not in consumed for o in n.output)
                      and n.op_type == "Reshape" and n.output[0].endswith(("_ReduceMin", "_ReduceMax"))]
            keep = [n for n in model.graph.node if n not in leaves]
            del model.graph.node[:]
            model.graph.node.extend(keep + leaves[::-1])
            return real_save(model, *args, **kwargs)

        onnx.save = save
        try:
            return original(self)
        finally:
            onnx.save = real_save

    calibrate.MinMaxCalibrater.augment_graph = augment_graph


def step_ort(model: str, calib: str, out: str, max_intermediate: int | None, low_memory: bool = False) -> dict:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    if low_memory:
        _low_memory_calibration()

    arrays = dict(np.load(calib))
    n = next(iter(arrays.values())).shape[0]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.i = 0

        def get_next(self):
            if self.i >= n:
                return None
            self.i += 1
            return {k: v[self.i - 1] for k, v in arrays.items()}

        def __len__(self):
            return n

        def set_range(self, start_index, end_index):  # used by CalibStridedMinMax only
            self.i = start_index

    import shutil

    shutil.rmtree(out, ignore_errors=True)
    extra = {}
    if max_intermediate:
        extra["CalibMaxIntermediateOutputs"] = max_intermediate
    start = time.perf_counter()
    Path(out).mkdir(parents=True, exist_ok=True)
    dest = Path(out) / "model.onnx"
    quantize_static(model, str(dest), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    weight_type=QuantType.QInt8, activation_type=QuantType.QInt16,
                    calibrate_method=CalibrationMethod.MinMax, use_external_data_format=True, extra_options=extra)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_mb": _peak_mb(), "bytes": _dir_size(Path(out).iterdir()), "model": str(dest)}


def step_eval(reference: str, models: dict, heldout: str) -> dict:
    from edgefc import ort
    from edgefc.metrics import cosine, sqnr_db

    data = dict(np.load(heldout))
    n = next(iter(data.values())).shape[0]
    feeds = [{k: v[i] for k, v in data.items()} for i in range(n)]
    sess = ort.session(reference, arena=False)
    names = [o.name for o in sess.get_outputs()]
    refs = [sess.run(names, f) for f in feeds]
    del sess
    out = {}
    for label, path in models.items():
        sess = ort.session(path, arena=False)
        sq, cos, secs = [], [], []
        for f, r in zip(feeds, refs):
            t = time.perf_counter()
            got = sess.run(names, f)
            secs.append(time.perf_counter() - t)
            rv = np.concatenate([np.asarray(a, np.float64).ravel() for a in r])
            gv = np.concatenate([np.asarray(a, np.float64).ravel() for a in got])
            sq.append(sqnr_db(rv, gv))
            cos.append(cosine(rv, gv))
        del sess
        out[label] = {"sqnr_db_per_input": [round(x, 3) for x in sq], "sqnr_db": round(float(np.mean(sq)), 3),
                      "sqnr_db_worst": round(float(np.min(sq)), 3), "cosine": round(float(np.mean(cos)), 7),
                      "run_seconds": round(float(np.mean(secs)), 3)}
    out["peak_mb"] = _peak_mb()
    return out


def _run_step(args: list[str], max_rss_gb: float | None = None) -> dict:
    proc = subprocess.Popen([sys.executable, __file__, "--step", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    killed = None
    if max_rss_gb:
        import threading

        import psutil

        def watch():
            nonlocal killed
            p = psutil.Process(proc.pid)
            while proc.poll() is None:
                try:
                    rss = p.memory_info().rss
                except psutil.NoSuchProcess:
                    return
                if rss > max_rss_gb * 1e9:
                    killed = rss / 1e9
                    proc.kill()
                    return
                time.sleep(0.2)
        threading.Thread(target=watch, daemon=True).start()
    stdout, stderr = proc.communicate()
    if killed:
        return {"killed_at_gb": round(killed, 2)}
    if proc.returncode != 0:
        raise SystemExit(f"step {args[0]} failed:\n{stderr[-3000:]}")
    return json.loads(stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?")
    p.add_argument("--component", choices=["text-encoder", "unet", "vae-decoder"])
    p.add_argument("--calib-samples", type=int, default=8)
    p.add_argument("--eval-samples", type=int, default=8)
    p.add_argument("--skip-ort", action="store_true")
    p.add_argument("--ort-max-intermediate", type=int, default=None)
    p.add_argument("--ort-low-memory", action="store_true")
    p.add_argument("--max-rss-gb", type=float, default=None)
    p.add_argument("--work", help="keep the quantized models in this folder (default: a temporary one)")
    p.add_argument("--json", help="also write the results as JSON")
    p.add_argument("--step", nargs="+", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.step:
        kind, *rest = a.step
        if kind == "ours":
            res = step_ours(rest[0], rest[1], rest[2], rest[3] or None)
        elif kind == "ort":
            res = step_ort(rest[0], rest[1], rest[2], int(rest[3]) or None, rest[4] == "1")
        else:
            res = step_eval(rest[0], json.loads(rest[1]), rest[2])
        print(json.dumps(res))
        return 0
    if not a.model:
        p.error("give an ONNX model")
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="quant-vs-ort-"))
    work.mkdir(parents=True, exist_ok=True)
    calib, heldout = work / "calib.npz", work / "heldout.npz"
    samples, info = _samples(a.model, a.component, a.calib_samples, seed=1234, evenly=False)
    np.savez(calib, **{k: np.stack([s[k] for s in samples]) for k in samples[0]})
    held, hinfo = _samples(a.model, a.component, a.eval_samples, seed=98765, evenly=True)
    np.savez(heldout, **{k: np.stack([s[k] for s in held]) for k in held[0]})
    print(f"model {a.model}\ncalibration: {a.calib_samples} inputs {info.get('timesteps', '')}; "
          f"held-out: {a.eval_samples} inputs {hinfo.get('timesteps', '')}", flush=True)
    results = {"model": a.model, "calibration": info, "heldout": hinfo}
    results["ours"] = _run_step(["ours", a.model, str(calib), str(work / "ours"), a.component or ""], a.max_rss_gb)
    if "killed_at_gb" in results["ours"]:
        raise SystemExit(f"edgefc was stopped at {results['ours']['killed_at_gb']} GB (--max-rss-gb)")
    print(f"edgefc quantize: {results['ours']['seconds']:.1f} s, peak {results['ours']['peak_mb']:.0f} MB", flush=True)
    models = {"edgefc": results["ours"]["model"]}
    if not a.skip_ort:
        results["ort"] = _run_step(["ort", a.model, str(calib), str(work / "ort"), str(a.ort_max_intermediate or 0),
                                    "1" if a.ort_low_memory else "0"], a.max_rss_gb)
        if "killed_at_gb" in results["ort"]:
            print(f"onnxruntime quantize_static: stopped at {results['ort']['killed_at_gb']} GB (--max-rss-gb)", flush=True)
            results.pop("ort")
        else:
            print(f"onnxruntime quantize_static: {results['ort']['seconds']:.1f} s, peak {results['ort']['peak_mb']:.0f} MB",
                  flush=True)
            models["onnxruntime"] = results["ort"]["model"]
    results["eval"] = _run_step(["eval", a.model, json.dumps(models), str(heldout)], a.max_rss_gb)
    fp32_bytes = _dir_size([Path(a.model), Path(a.model + ".data")])
    print(f"\n{'':<22}{'edgefc':>14}{'onnxruntime':>14}")
    rows = [("SQNR mean (dB)", "sqnr_db"), ("SQNR worst (dB)", "sqnr_db_worst"), ("cosine", "cosine"),
            ("run time / input (s)", "run_seconds")]
    ev = results["eval"]
    for label, key in rows:
        vals = [ev.get(m, {}).get(key) for m in ("edgefc", "onnxruntime")]
        print(f"{label:<22}" + "".join(f"{v:>14}" if v is not None else f"{'-':>14}" for v in vals))
    for label, key, scale in (("quantize time (s)", "seconds", 1), ("peak RSS (MB)", "peak_mb", 1), ("file size (MB)", "bytes", 1e-6)):
        vals = [results.get(m, {}).get(key) for m in ("ours", "ort")]
        print(f"{label:<22}" + "".join(f"{v * scale:>14.1f}" if v is not None else f"{'-':>14}" for v in vals))
    print(f"{'FP32 file size (MB)':<22}{fp32_bytes / 1e6:>14.1f}")
    steps = hinfo.get("timesteps") or list(range(a.eval_samples))
    print(f"\nSQNR per held-out input (dB){'  timestep' if hinfo.get('timesteps') else ''}:")
    for i, t in enumerate(steps):
        ours = ev["edgefc"]["sqnr_db_per_input"][i]
        theirs = ev.get("onnxruntime", {}).get("sqnr_db_per_input", [None] * len(steps))[i]
        print(f"  {t:>6}  edgefc {ours:8.3f}   onnxruntime {theirs if theirs is None else f'{theirs:8.3f}'}")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
