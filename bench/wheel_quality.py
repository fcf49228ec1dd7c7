"""Public trained ONNX models from PyPI wheels through the default NPU compile: reported vs measured quality.

Material edgefc did not write: the OCR models rapidocr-onnxruntime ships (PP-OCRv4 text detector
and recogniser, the mobile direction classifier), the nudenet detector (YOLOv8n, 320x320) and the
silero-vad voice detector (STFT magnitude, convolutions, LSTM). The wheels are fetched at run
time with ``pip download --no-deps`` into ``--cache`` (never into the repository). Each model gets
inputs shaped and scaled as its package feeds it (rendered text lines and pages normalised to
[-1, 1] as rapidocr does; [0, 1] RGB images for the detector; a synthetic voiced/unvoiced audio
stream in 576-sample chunks for the VAD, its LSTM state carried from chunk to chunk), split into
calibration and held-out evaluation sets, and is compiled twice at W8A16 (what ``--precision auto``
builds on an NPU target for any model that is not a Stable Diffusion component, without real
inputs; with them ``auto`` searches, so the bench names W8A16):

* ``generated``: no ``--calib`` (what a user gets by default): the report says ``eval_source``
  "generated";
* ``real``: ``--calib CALIB.npz --eval EVAL.npz``: ``eval_source`` "eval".

For each build the bench measures the SQNR itself on the held-out realistic inputs (10 log10 of
sum ref^2 / sum err^2 over all inputs pooled, first output, as the acceptance check does) and
prints it beside the report's figure. ``--min-sqnr -inf`` is passed so every build is written and
measured; the floor's verdict is printed from the report (``would pass the default floor``).

    python bench/wheel_quality.py --cache /tmp/wheels --out /tmp/wheel-builds
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WHEELS = {"rapidocr-onnxruntime": "1.4.4", "nudenet": "3.4.2", "silero-vad": "6.2.3"}
MODELS = {  # name -> (wheel, path inside it, --shape, input maker)
    "ocr-det": ("rapidocr-onnxruntime", "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx", "x=1x3x320x320", "page"),
    "ocr-rec": ("rapidocr-onnxruntime", "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx", "x=1x3x48x320", "line"),
    "ocr-cls": ("rapidocr-onnxruntime", "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
                "x=1x3x48x192", "line192"),
    "nudenet-yolov8n": ("nudenet", "nudenet/320n.onnx", "images=1x3x320x320", "photo"),
    "silero-vad": ("silero-vad", "silero_vad/data/silero_vad_openvino_16k.onnx", None, "audio"),
}
CALIB, EVAL = 8, 8


def fetch(cache: Path) -> dict[str, Path]:
    """model name -> extracted .onnx (downloading the wheels once)."""
    cache.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, (wheel, inner, _, _) in MODELS.items():
        dest = cache / "models" / inner
        if not dest.is_file():
            found = sorted(cache.glob(f"{wheel.replace('-', '_')}-{WHEELS[wheel]}-*.whl"))
            if not found:
                subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(cache),
                                f"{wheel}=={WHEELS[wheel]}"], check=True)
                found = sorted(cache.glob(f"{wheel.replace('-', '_')}-{WHEELS[wheel]}-*.whl"))
            with zipfile.ZipFile(found[0]) as z:
                z.extract(inner, cache / "models")
        out[name] = dest
    return out


# --- realistic inputs ---------------------------------------------------------------------------

WORDS = ("invoice total amount due date paid receipt order number customer address street city phone "
         "price quantity item description tax subtotal discount shipping account balance").split()


def _text_image(rng, h, w, lines, dark_bg=False):
    from PIL import Image, ImageDraw, ImageFont

    bg = int(rng.integers(20, 60)) if dark_bg else int(rng.integers(200, 256))
    img = Image.new("RGB", (w, h), (bg, bg + int(rng.integers(-10, 10)) if bg < 245 else bg, bg))
    d = ImageDraw.Draw(img)
    for _ in range(lines):
        size = int(rng.integers(max(10, h // 12), max(12, h // 4))) if lines > 1 else int(h * 0.6)
        font = ImageFont.load_default(size=size)
        text = " ".join(rng.choice(WORDS, size=int(rng.integers(1, 4))))
        ink = tuple(int(v) for v in (rng.integers(180, 256, 3) if dark_bg else rng.integers(0, 90, 3)))
        x = int(rng.integers(0, max(1, w // 3)))
        y = int(rng.integers(0, max(1, h - size))) if lines > 1 else int((h - size) * 0.3)
        d.text((x, y), text, fill=ink, font=font)
    a = np.asarray(img, np.float32)
    a = a + rng.normal(0, 3.0, a.shape)  # sensor noise
    return np.clip(a, 0, 255)


def _ocr_norm(a):  # rapidocr: (x / 255 - 0.5) / 0.5, HWC -> CHW
    return ((a / 255.0 - 0.5) / 0.5).transpose(2, 0, 1)[None].astype(np.float32)


def _photo(rng, n=320):
    """A smooth RGB scene in [0, 1]: a low-frequency background and a few soft-edged blobs."""
    yy, xx = np.mgrid[0:n, 0:n] / n
    img = np.zeros((n, n, 3))
    for c in range(3):
        f = rng.uniform(0.5, 3, 2)
        img[..., c] = 0.5 + 0.25 * np.sin(2 * np.pi * (f[0] * xx + rng.uniform())) * np.cos(2 * np.pi * (f[1] * yy))
    for _ in range(int(rng.integers(2, 6))):
        cx, cy, r = rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.9), rng.uniform(0.05, 0.3)
        m = 1 / (1 + np.exp(np.minimum(((xx - cx) ** 2 + (yy - cy) ** 2 - r * r) / (0.1 * r * r), 50.0)))
        img = img * (1 - m[..., None]) + m[..., None] * rng.uniform(0, 1, 3)
    img = np.clip(img + rng.normal(0, 0.02, img.shape), 0, 1)
    return img.transpose(2, 0, 1)[None].astype(np.float32)


def _audio(rng, seconds=6.0, sr=16000):
    """Voiced segments (harmonics of a gliding pitch, syllable envelopes), pauses, background noise."""
    t = np.arange(int(seconds * sr)) / sr
    x = rng.normal(0, 0.003, t.size)
    pos = 0.3
    while pos < seconds - 0.5:
        dur = rng.uniform(0.4, 1.2)
        seg = (t >= pos) & (t < pos + dur)
        f0 = rng.uniform(100, 220) * (1 + 0.1 * np.sin(2 * np.pi * 3 * (t[seg] - pos)))
        phase = 2 * np.pi * np.cumsum(f0) / sr
        voice = sum(np.sin(k * phase) / k for k in range(1, 12))
        env = np.abs(np.sin(np.pi * 4 * (t[seg] - pos) / dur)) ** 0.5
        x[seg] += rng.uniform(0.05, 0.3) * env * voice
        pos += dur + rng.uniform(0.2, 0.8)
    return x.astype(np.float32)


def make_inputs(kind: str, sess, rng, n: int) -> dict[str, np.ndarray]:
    if kind == "page":
        xs = [_ocr_norm(_text_image(rng, 320, 320, int(rng.integers(3, 9)), dark_bg=bool(rng.random() < 0.2)))
              for _ in range(n)]
        return {"x": np.stack(xs)}
    if kind in ("line", "line192"):
        w = 320 if kind == "line" else 192
        return {"x": np.stack([_ocr_norm(_text_image(rng, 48, w, 1)) for _ in range(n)])}
    if kind == "photo":
        return {"images": np.stack([_photo(rng) for _ in range(n)])}
    if kind == "audio":  # 576 = 64 samples of context + 512 new, the state carried along the stream
        audio = _audio(rng)
        state = np.zeros((2, 1, 128), np.float32)
        chunks, states = [], []
        for k in range(0, audio.size - 576, 512):
            chunk = audio[k:k + 576][None]
            chunks.append(chunk)
            states.append(state)
            out = sess.run(None, {"input": chunk, "state": state})
            state = out[1]
        pick = np.linspace(len(chunks) // 4, len(chunks) - 1, n).astype(int)  # after the state has warmed up
        return {"input": np.stack([chunks[i] for i in pick]), "state": np.stack([states[i] for i in pick])}
    raise ValueError(kind)


def measured_sqnr(original: Path, build: Path, data: dict[str, np.ndarray], shapes) -> float:
    import onnxruntime as ort

    ref = ort.InferenceSession(str(original), providers=["CPUExecutionProvider"])
    dep = ort.InferenceSession(str(build / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [i.name for i in dep.get_inputs()]
    s = e = 0.0
    for k in range(len(data[names[0]])):
        feed = {m: data[m][k] for m in names}
        a = ref.run(None, feed)[0].astype(np.float64)
        b = dep.run(None, feed)[0].astype(np.float64)
        s += float((a * a).sum())
        e += float(((a - b) ** 2).sum())
    return 10 * math.log10(s / max(e, 1e-30))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache", type=Path, required=True, help="where the wheels and their models go")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--only", nargs="*", default=None, help="model names (default: all)")
    args = ap.parse_args()
    import onnxruntime as ort

    import edgefc
    from edgefc.errors import EdgefcError
    from edgefc.passes.quant_eval import DEFAULT_MIN_SQNR_DB

    models = fetch(args.cache)
    rows = []
    for name, path in models.items():
        if args.only and name not in args.only:
            continue
        _, _, shape, kind = MODELS[name]
        rng = np.random.default_rng(0)
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        data = make_inputs(kind, sess, rng, CALIB + EVAL)
        calib = {k: v[:CALIB] for k, v in data.items()}
        held = {k: v[CALIB:] for k, v in data.items()}
        folder = args.out / name
        folder.mkdir(parents=True, exist_ok=True)
        np.savez(folder / "calib.npz", **calib)
        np.savez(folder / "eval.npz", **held)
        shapes = {}
        if shape:
            k, v = shape.split("=")
            shapes[k] = tuple(int(d) for d in v.split("x"))
        for mode in ("generated", "real"):
            # W8A16 by name: with real inputs `auto` would search (issue 20 part 7)
            opts = {"precision": "w8a16", "min_sqnr": -math.inf, "progress": False}
            if mode == "real":
                opts.update(calib=str(folder / "calib.npz"), eval_file=str(folder / "eval.npz"))
            build = folder / mode
            try:
                edgefc.compile(path, "exynos2400", output=build, shapes=shapes, options=opts)
            except EdgefcError as e:
                rows.append({"model": name, "calibration": mode, "error": str(e)[:200]})
                print(f"{name:<16} {mode:<9} refused: {str(e)[:160]}", flush=True)
                continue
            q = json.loads((build / "report.json").read_text())["quantization"]
            ms = measured_sqnr(path, build, held, shapes)
            worst = min((v for v in (q.get("sqnr_db_per_output") or {}).values() if v is not None), default=None)
            row = {"model": name, "calibration": mode, "precision": q.get("precision"), "eval_source": q.get("eval_source"),
                   "report_sqnr_db": q.get("sqnr_db"), "measured_sqnr_db": round(ms, 2),
                   "worst_output_db": worst, "passes_default_floor": worst is not None and worst >= DEFAULT_MIN_SQNR_DB,
                   "worst_layers": [w["layer"] for w in (q.get("worst_layers") or [])[:3]]}
            rows.append(row)
            print(f"{name:<16} {mode:<9} {row['precision']:<6} report {row['report_sqnr_db']} dB on {row['eval_source']}, "
                  f"measured on held-out realistic inputs {ms:.1f} dB; default floor "
                  f"{'passes' if row['passes_default_floor'] else 'REFUSES'}", flush=True)
    (args.out / "wheel_models.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
