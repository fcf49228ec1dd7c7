"""Training-data curation: ``edgefc data curate`` (the EdgeFusion paper's data preparation).

Three steps over a folder of image/caption pairs or a webdataset ``.tar`` shard, with numpy and
PIL only (no torch):

1. **Size filter** -- images whose short side is under ``min_size`` (300 px) are dropped.
2. **Deduplication** (unless ``dedup=False``) -- exact duplicates (identical decoded pixels) and near duplicates
   (perceptual hashes within ``threshold`` bits of Hamming distance) are dropped, keeping the
   largest image of each group (ties: the first key in sorted order). The perceptual hash is
   the DCT pHash: grey-scale, resize to 32x32, 2-D DCT-II, the 8x8 lowest frequencies, one
   bit per coefficient above their median (64 bits); ``hash_bits=256`` takes the 16x16 lowest of a
   64x64 image (finer: for simple synthetic images whose distinct renders the 64-bit hash merges).
3. **Crop choice** -- each kept image is cropped to a square chosen among the centre and the
   two ends of its long side (left/right or top/bottom) by a pluggable score: a scorer maps the
   image to a non-negative 2-D map, and the square holding the most of it wins (ties go to the
   centre). Built in: ``saliency`` (default; spectral-residual saliency, Hou & Zhang, CVPR 2007),
   ``gradient`` (gradient energy) and ``center`` (a flat map: always the centre). Add your own
   with :func:`register_crop_scorer` or pass a callable to :func:`curate`.

Two more steps use the verifier of the synthetic scenes (:mod:`edgefc.models.verifier`, our
stand-in for CLIP and for the paper's captioner and human curators; EdgeFusion Sec. 2.2):

* ``crop="alignment"`` -- the candidate square whose verifier reading agrees most with the pair's
  caption (:func:`edgefc.models.verifier.agreement`), saliency breaking ties: a caption-aware
  three-crop choice. An image-only score cannot tell a subject moved to another quadrant by a
  crop from one that was there, so in scenes whose captions state positions this is what picks the
  crop the caption describes.
4. **Drop contradicted** (``drop_contradicted``, the paper's manual curation, synt-cur) -- pairs
   whose caption states something the verifier reads otherwise from the cropped image (another
   value, or an object that is not there) are dropped (``contradicted``); captions that only leave
   attributes out are kept.
5. **Re-caption** (``recaption``, the paper's L-pps) -- every kept caption is replaced by one the
   verifier's attribute reader writes from the cropped image (:func:`edgefc.models.verifier.describe`;
   sizes only from ``level`` 2 on, as ``edgefc data synth --level``); the old caption stays in the
   manifest.

:func:`data_agreement` measures a set with the same verifier (``edgefc data agreement``): how well
its captions describe its images as the training loader sees them.

The output folder receives the cropped pairs (same relative names; PNG stays PNG, everything
else is written as JPEG quality 95) and ``manifest.json``: every kept sample with its crop, and
every dropped one with the reason (``too-small``, ``exact-duplicate``, ``near-duplicate`` with
the kept key it duplicates and the distance, ``unreadable``). It is written to a temporary
folder and renamed into place when complete.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from edgefc.models.train.data import center_square, list_samples
from edgefc.models.train.errors import DataError

#: Hash lengths: ``bits`` -> (side of the low-frequency block, side of the grey image it is taken from).
HASH_BITS = {64: (8, 32), 256: (16, 64)}
DEFAULT_THRESHOLD = 10
DEFAULT_MIN_SIZE = 300


def _dct_matrix(n: int) -> np.ndarray:
    """Orthonormal DCT-II matrix C (C @ x is the DCT of x)."""
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    c = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    c[0] /= np.sqrt(2.0)
    return c


_DCT = {n: _dct_matrix(n) for _, n in HASH_BITS.values()}


def phash(img, bits: int = 64) -> int:
    """DCT perceptual hash of a PIL image (see module docstring) as an int of ``bits`` bits.

    64 (the classic pHash): the 8x8 lowest frequencies of a 32x32 grey image. 256: the 16x16 lowest
    of a 64x64 one, which also sees shifts of a few pixels -- for simple images (the synthetic
    scenes), where renders of the same description differ only by such shifts and the 64-bit hash
    calls them duplicates of each other.
    """
    from PIL import Image

    side, n = HASH_BITS[bits]
    g = np.asarray(img.convert("L").resize((n, n), Image.Resampling.LANCZOS), dtype=np.float64)
    d = _DCT[n] @ g @ _DCT[n].T
    low = d[:side, :side].ravel()
    out = 0
    for b in low > np.median(low):
        out = (out << 1) | int(b)
    return out


def _words(h: int, bits: int) -> np.ndarray:
    return np.array([(h >> (64 * i)) & 0xFFFFFFFFFFFFFFFF for i in range(bits // 64)], dtype=np.uint64)


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


# ----------------------------------------------------------------------------- crop scorers

CROP_SCORERS: dict[str, Callable] = {}


def register_crop_scorer(name: str):
    """Decorator: register ``fn(image: PIL.Image) -> 2-D non-negative array`` under ``name``."""

    def deco(fn):
        if name in CROP_SCORERS:
            raise ValueError(f"crop scorer {name!r} is already registered")
        CROP_SCORERS[name] = fn
        return fn

    return deco


def _small_gray(img, long_side: int = 64) -> np.ndarray:
    from PIL import Image

    w, h = img.size
    s = long_side / max(w, h)
    small = img.convert("L").resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.BILINEAR)
    return np.asarray(small, dtype=np.float64) / 255.0


def _smooth(a: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Separable 'same' convolution with edge padding."""
    r = len(kernel) // 2
    p = np.pad(a, r, mode="edge")
    p = np.apply_along_axis(lambda v: np.convolve(v, kernel, mode="valid"), 0, p)
    return np.apply_along_axis(lambda v: np.convolve(v, kernel, mode="valid"), 1, p)


def _gaussian(sigma: float) -> np.ndarray:
    r = max(1, int(3 * sigma))
    x = np.arange(-r, r + 1)
    k = np.exp(-(x**2) / (2 * sigma**2))
    return k / k.sum()


@register_crop_scorer("saliency")
def spectral_residual_saliency(img) -> np.ndarray:
    """Spectral-residual saliency (Hou & Zhang 2007) on a 64-px-long grey version of the image."""
    g = _small_gray(img)
    f = np.fft.fft2(g)
    log_amp = np.log(np.abs(f) + 1e-9)
    phase = np.angle(f)
    residual = log_amp - _smooth(log_amp, np.ones(3) / 3.0)
    sal = np.abs(np.fft.ifft2(np.exp(residual + 1j * phase))) ** 2
    return _smooth(sal, _gaussian(2.5))


@register_crop_scorer("gradient")
def gradient_energy(img) -> np.ndarray:
    """Squared gradient magnitude of a 64-px-long grey version of the image."""
    g = _small_gray(img)
    gy, gx = np.gradient(g)
    return gx**2 + gy**2


@register_crop_scorer("center")
def flat(img) -> np.ndarray:
    """A flat map: every candidate scores the same, so the centre crop is chosen."""
    return np.ones((1, 1))


def candidate_crops(w: int, h: int) -> list[tuple[str, tuple[int, int, int, int]]]:
    """Square boxes (left, top, right, bottom): centre first, then the two ends of the long side."""
    s = min(w, h)
    if w == h:
        return [("center", (0, 0, w, h))]
    if w > h:
        return [("center", ((w - s) // 2, 0, (w - s) // 2 + s, s)), ("left", (0, 0, s, s)), ("right", (w - s, 0, w, s))]
    return [("center", (0, (h - s) // 2, s, (h - s) // 2 + s)), ("top", (0, 0, s, s)), ("bottom", (0, h - s, s, h))]


#: Crop choices that read the caption (not maps; see :func:`choose_crop`).
CAPTION_CROPS = ("alignment",)


def _alignment_crop(img, caption: str, level: int):
    from edgefc.models.synth import ATTRIBUTES
    from edgefc.models.verifier import agreement, read_image

    w, h = img.size
    cands = candidate_crops(w, h)
    _, _, sal = choose_crop(img, "saliency")
    scores = {}
    for name, box in cands:
        got, _ = agreement(read_image(np.asarray(img.crop(box))), caption, ATTRIBUTES[level])
        flat = [v for vs in got.values() for v in vs]
        scores[name] = float(np.mean(flat))
    best = cands[0]
    for name, b in cands[1:]:
        key, bkey = (round(scores[name], 9), sal[name]), (round(scores[best[0]], 9), sal[best[0]])
        if key[0] > bkey[0] or (key[0] == bkey[0] and key[1] > bkey[1] * (1 + 1e-6) + 1e-12):
            best = (name, b)
    return best[0], best[1], scores


def choose_crop(img, scorer: str | Callable = "saliency", caption: str | None = None,
                level: int = 1) -> tuple[str, tuple[int, int, int, int], dict]:
    """The best candidate square of ``img`` under ``scorer``; returns (name, box, scores).

    ``scorer="alignment"`` needs the pair's ``caption`` (the verifier's agreement per candidate,
    ``level``'s attributes; saliency breaks ties); the map scorers ignore it.
    """
    if scorer in CAPTION_CROPS:
        if caption is None:
            raise DataError(f"the {scorer!r} crop choice needs the caption.")
        if len(candidate_crops(*img.size)) == 1:
            return "center", (0, 0, img.size[0], img.size[1]), {"center": 1.0}
        return _alignment_crop(img, caption, level)
    fn = CROP_SCORERS[scorer] if isinstance(scorer, str) else scorer
    w, h = img.size
    cands = candidate_crops(w, h)
    if len(cands) == 1:
        return cands[0][0], cands[0][1], {cands[0][0]: 1.0}
    m = np.asarray(fn(img), dtype=np.float64)
    if m.ndim != 2 or not np.all(np.isfinite(m)):
        raise DataError("a crop scorer must return a finite 2-D map.")
    mh, mw = m.shape
    # integral image for box sums; boxes mapped to map coordinates
    ii = np.zeros((mh + 1, mw + 1))
    ii[1:, 1:] = m.cumsum(0).cumsum(1)

    def box_sum(b):
        l, t, r, btm = b
        x0, x1 = l * mw / w, r * mw / w
        y0, y1 = t * mh / h, btm * mh / h
        # fractional box: interpolate the integral image bilinearly
        def at(y, x):
            y, x = min(max(y, 0.0), mh), min(max(x, 0.0), mw)
            yi, xi = min(int(y), mh - 1), min(int(x), mw - 1)
            fy, fx = y - yi, x - xi
            return ((1 - fy) * (1 - fx) * ii[yi, xi] + (1 - fy) * fx * ii[yi, xi + 1]
                    + fy * (1 - fx) * ii[yi + 1, xi] + fy * fx * ii[yi + 1, xi + 1])

        return at(y1, x1) - at(y0, x1) - at(y1, x0) + at(y0, x0)

    total = box_sum((0, 0, w, h)) or 1.0
    scores = {name: float(box_sum(b) / total) for name, b in cands}
    best = cands[0]
    for name, b in cands[1:]:
        if scores[name] > scores[best[0]] * (1 + 1e-6) + 1e-12:
            best = (name, b)
    return best[0], best[1], scores


# ----------------------------------------------------------------------------- caption agreement

def data_agreement(data: str | Path, resolution: int | None = 64, level: int | None = None) -> dict:
    """:func:`edgefc.models.verifier.caption_agreement` of a training set (a folder of pairs or a .tar shard) as the training
    loader sees it: each image resized and centre-cropped to ``resolution`` (None: as stored).

    ``level`` picks the attributes scored (:data:`edgefc.models.synth.ATTRIBUTES`); default: the
    ``level`` of the set's ``manifest.json`` (``edgefc data synth`` writes it), else 1.
    """
    from edgefc.models.synth import ATTRIBUTES
    from edgefc.models.verifier import caption_agreement

    root = Path(data)
    if level is None:
        level = 1
        mf = root / "manifest.json"
        if root.is_dir() and mf.is_file():
            try:
                level = int(json.loads(mf.read_text()).get("level", 1))
            except (ValueError, TypeError, AttributeError):
                level = 1
        level = level if level in ATTRIBUTES else 1
    listing = list_samples(root)
    images, captions = [], []
    for smp in listing.samples:
        img = smp.open_image()
        if resolution is not None:
            img = center_square(img, resolution)
        images.append(np.asarray(img))
        captions.append(smp.caption)
    result = caption_agreement(images, captions, ATTRIBUTES[level])
    result["names"] = [smp.key for smp in listing.samples]
    result["level"], result["resolution"] = level, resolution
    return result


# ----------------------------------------------------------------------------- curation

def _recaption_rng(key: str) -> np.random.Generator:
    return np.random.default_rng(int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little"))


def curate(src: str | Path, dst: str | Path, *, min_size: int = DEFAULT_MIN_SIZE,
           threshold: int = DEFAULT_THRESHOLD, crop: str | Callable = "saliency", progress: bool = True,
           drop_contradicted: bool = False, recaption: bool = False, level: int = 1, dedup: bool = True,
           hash_bits: int = 64) -> dict:
    """Curate ``src`` into ``dst`` (see the module docstring); returns the manifest."""
    from tqdm.auto import tqdm

    src, dst = Path(src), Path(dst)
    if isinstance(crop, str) and crop not in CROP_SCORERS and crop not in CAPTION_CROPS:
        raise DataError(f"unknown crop scorer {crop!r}; choose one of "
                        f"{', '.join(sorted((*CROP_SCORERS, *CAPTION_CROPS)))}.")
    if level not in (1, 2, 3):
        raise DataError(f"--level {level} is not one of 1, 2, 3.")
    if min_size < 1:
        raise DataError("--min-size must be at least 1.")
    if hash_bits not in HASH_BITS:
        raise DataError(f"--hash-bits must be one of {', '.join(map(str, HASH_BITS))}.")
    if not 0 <= threshold <= hash_bits:
        raise DataError(f"--dedup-threshold must be between 0 and {hash_bits} (bits of a {hash_bits}-bit hash).")
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise DataError(f"output {dst} already exists and is not an empty folder.")
    listing = list_samples(src)
    dropped: list[dict] = [{"key": Path(s).stem, "source": s, "reason": "no-caption"}
                           for s in listing.skipped_no_caption]
    info = []
    for s in tqdm(listing.samples, desc="hash", unit="img", file=sys.stderr, disable=not progress):
        try:
            img = s.open_image()
        except DataError as e:
            dropped.append({"key": s.key, "source": s.source, "reason": "unreadable", "detail": str(e)})
            continue
        w, h = img.size
        if min(w, h) < min_size:
            dropped.append({"key": s.key, "source": s.source, "reason": "too-small", "size": [w, h]})
            continue
        digest = hashlib.sha256(f"{w}x{h}".encode() + img.tobytes()).hexdigest()
        info.append({"sample": s, "size": (w, h), "sha": digest, "phash": phash(img, hash_bits)})

    # largest first, then key order: the kept member of a duplicate group is the largest image
    info.sort(key=lambda d: (-d["size"][0] * d["size"][1], d["sample"].key))
    kept: list[dict] = []
    by_sha: dict[str, dict] = {}
    hashes = np.zeros((len(info), hash_bits // 64), dtype=np.uint64)
    for d in info:
        s = d["sample"]
        if not dedup:
            kept.append(d)
            continue
        if d["sha"] in by_sha:
            dropped.append({"key": s.key, "source": s.source, "reason": "exact-duplicate",
                            "of": by_sha[d["sha"]]["sample"].key})
            continue
        if kept:
            dist = np.bitwise_count(hashes[: len(kept)] ^ _words(d["phash"], hash_bits)).sum(axis=1)
            j = int(np.argmin(dist))
            if int(dist[j]) <= threshold:
                dropped.append({"key": s.key, "source": s.source, "reason": "near-duplicate",
                                "of": kept[j]["sample"].key, "distance": int(dist[j])})
                continue
        hashes[len(kept)] = _words(d["phash"], hash_bits)
        kept.append(d)
        by_sha[d["sha"]] = d

    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    kept_rows = []
    try:
        kept.sort(key=lambda d: d["sample"].key)
        if drop_contradicted or recaption:
            from edgefc.models.synth import ATTRIBUTES
            from edgefc.models.verifier import agreement, describe, read_image
        for d in tqdm(kept, desc="crop", unit="img", file=sys.stderr, disable=not progress):
            s = d["sample"]
            img = s.open_image()
            name, box, scores = choose_crop(img, crop, caption=s.caption, level=level)
            out_img = img.crop(box)
            caption, extra = s.caption, {}
            if drop_contradicted or recaption:
                reading = read_image(np.asarray(out_img))
                if drop_contradicted and agreement(reading, s.caption, ATTRIBUTES[level])[1]:
                    dropped.append({"key": s.key, "source": s.source, "reason": "contradicted",
                                    "caption": s.caption, "crop": name})
                    continue
                if recaption:
                    caption = describe(reading, _recaption_rng(s.key), level)
                    extra = {"caption_before": s.caption}
            ext = ".png" if s.source.lower().endswith(".png") else ".jpg"
            out = tmp / f"{s.key}{ext}"
            out.parent.mkdir(parents=True, exist_ok=True)
            if ext == ".png":
                out_img.save(out)
            else:
                out_img.save(out, quality=95)
            out.with_suffix(".txt").write_text(caption + "\n", encoding="utf-8")
            kept_rows.append({"key": s.key, "source": s.source, "output": str(out.relative_to(tmp)),
                              "size": list(d["size"]), "crop": name, "box": list(box),
                              "scores": {k: round(v, 6) for k, v in scores.items()},
                              "phash": f"{d['phash']:0{hash_bits // 4}x}", **({"caption": caption, **extra} if recaption else {})})
        counts = {"input": len(listing.samples) + len(listing.skipped_no_caption), "kept": len(kept_rows)}
        for row in dropped:
            counts[row["reason"]] = counts.get(row["reason"], 0) + 1
        manifest = {
            "source": str(src),
            "settings": {"min_size": min_size, "dedup_threshold": threshold if dedup else None,
                         "crop": crop if isinstance(crop, str) else getattr(crop, "__name__", "custom"),
                         "hash": f"DCT pHash {hash_bits} bits",
                         **({"drop_contradicted": True} if drop_contradicted else {}),
                         **({"recaption": True, "level": level} if recaption else {})},
            "counts": counts,
            "kept": kept_rows,
            "dropped": sorted(dropped, key=lambda r: r["key"]),
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        if dst.exists():
            dst.rmdir()  # empty (checked above)
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest
