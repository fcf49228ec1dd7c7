"""A deterministic verifier for the synthetic scenes (``edgefc eval``): our CLIP-score and FID analogues.

The paper scores text-image alignment with CLIP and image quality with FID (Tables 2/3/11). Here
no learned model is needed: the scenes of :mod:`edgefc.models.synth` are simple enough to read
back with classic image analysis, so the score cannot be gamed by a model and is the same on
every machine.

Reading an image (:func:`read_image`):

* background: the median colour of the 2-pixel border, named by the nearest background colour;
* foreground mask: pixels farther than ``FG_DISTANCE`` (RGB, 0-255) from that median;
* objects: one per image quadrant whose mask covers at least ``MIN_AREA`` of it (the scenes put
  at most one object in a quadrant), its position is that quadrant;
* per object: colour = median of its mask's pixels, nearest object colour; shape = the nearest
  of three templates (circle, square, apex-up triangle rendered into the mask's bounding box,
  compared on a 16 x 16 grid); size = bounding-box side over image side, "small" below
  ``SIZE_SPLIT`` (halfway between the two sizes the data draws).

Scoring (:func:`score`): each prompt is parsed (:func:`edgefc.models.synth.parse_caption`); every
object it asks for is matched to the object read at its position (position correct) or, if
there is none, to the largest object read elsewhere (position wrong); then shape, colour and
size are compared, and the background. Per-attribute accuracy is the fraction of asked
attributes that were read back; ``alignment`` is the mean over all asked attributes.

Training captions (:func:`agreement`, :func:`caption_agreement`): how well a caption describes its
image, counting every attribute the image has (left out or stated otherwise is wrong) and whether
the caption contradicts the reading; :func:`describe` writes a caption from a reading (the
re-captioner of ``edgefc data curate --recaption``).

Fréchet distance (:func:`frechet_distance`): the Fréchet distance between Gaussians fitted to a
16-number feature vector per image (background and foreground mean colours, mask centroid,
area, bounding box, fill ratio, top third's share of the top and bottom thirds, colour spread) of two image sets, as
FID does with Inception features.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgefc.errors import EdgefcError
from edgefc.models.synth import (
    ATTRIBUTES,
    BACKGROUNDS,
    COLOURS,
    POSITIONS,
    RADIUS,
    SHAPES,
    parse_caption,
    parse_partial,
    shape_mask,
)

#: RGB distance (0-255 scale) above which a pixel is foreground.
FG_DISTANCE = 60.0
#: Smallest object, as a fraction of a quadrant's pixels.
MIN_AREA = 0.03
#: Bounding-box side / image side separating "small" from "large".
SIZE_SPLIT = RADIUS["small"] + RADIUS["large"]
_GRID = 16


class EvalError(EdgefcError):
    """Bad ``edgefc eval`` input (missing folder, no pairs, unreadable prompts)."""


def _nearest(rgb: np.ndarray, table: dict) -> str:
    names = list(table)
    d = [float(np.sum((rgb - np.asarray(table[n], np.float64)) ** 2)) for n in names]
    return names[int(np.argmin(d))]


def _templates() -> dict[str, np.ndarray]:
    r = _GRID / 2
    return {s: shape_mask(s, r, r, r, _GRID) for s in SHAPES}


_TEMPLATES = _templates()


@dataclass
class ReadObject:
    position: str
    shape: str
    colour: str
    size: str
    area: float  # fraction of the image


@dataclass
class Reading:
    background: str
    objects: list[ReadObject]
    features: np.ndarray = field(repr=False)


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1


def _shape_of(mask: np.ndarray) -> str:
    from PIL import Image

    y0, y1, x0, x1 = _bbox(mask)
    crop = Image.fromarray((mask[y0:y1, x0:x1] * 255).astype(np.uint8))
    grid = np.asarray(crop.resize((_GRID, _GRID), Image.Resampling.BILINEAR), np.float64) / 255
    d = {s: float(np.mean((grid - t) ** 2)) for s, t in _TEMPLATES.items()}
    return min(d, key=d.get)


def read_image(image: np.ndarray) -> Reading:
    """The scene attributes read back from a uint8 [H, W, 3] image (see the module docstring)."""
    img = np.asarray(image, np.float64)
    h, w = img.shape[:2]
    border = np.concatenate([img[:2].reshape(-1, 3), img[-2:].reshape(-1, 3),
                             img[:, :2].reshape(-1, 3), img[:, -2:].reshape(-1, 3)])
    bg_rgb = np.median(border, axis=0)
    dist = np.sqrt(np.sum((img - bg_rgb) ** 2, axis=-1))
    mask = dist > FG_DISTANCE
    objects = []
    for pos in POSITIONS:
        ys = slice(h // 2, h) if "bottom" in pos else slice(0, h // 2)
        xs = slice(w // 2, w) if "right" in pos else slice(0, w // 2)
        q = np.zeros_like(mask)
        q[ys, xs] = mask[ys, xs]
        area = q.sum() / (h * w)
        if area < MIN_AREA / 4:
            continue
        y0, y1, x0, x1 = _bbox(q)
        side = ((y1 - y0) + (x1 - x0)) / 2 / max(h, w)
        colour = _nearest(np.median(img[q], axis=0), COLOURS)
        objects.append(ReadObject(pos, _shape_of(q), colour, "small" if side < SIZE_SPLIT else "large", float(area)))
    return Reading(_nearest(bg_rgb, BACKGROUNDS), objects, _features(img, bg_rgb, mask))


def _features(img: np.ndarray, bg_rgb: np.ndarray, mask: np.ndarray) -> np.ndarray:
    h, w = mask.shape
    f = np.zeros(16)
    f[0:3] = bg_rgb / 255
    if mask.any():
        ys, xs = np.nonzero(mask)
        y0, y1, x0, x1 = _bbox(mask)
        bw, bh = (x1 - x0) / w, (y1 - y0) / h
        top = mask[y0:y0 + max(1, (y1 - y0) // 3)].sum()
        bottom = mask[y1 - max(1, (y1 - y0) // 3):y1].sum()
        f[3:6] = img[mask].mean(axis=0) / 255
        f[6], f[7] = xs.mean() / w, ys.mean() / h
        f[8] = mask.mean()
        f[9], f[10] = bw, bh
        f[11] = mask.sum() / max(1, (y1 - y0) * (x1 - x0))
        f[12] = top / max(1.0, top + bottom)  # apex-up triangle ~0.1, square / circle ~0.5
        f[13:16] = img[mask].std(axis=0) / 255
    return f


def _read_png(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError) as e:
        raise EvalError(f"cannot read image {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def check_prompt(prompt: str) -> dict:
    """The parsed prompt, or an EvalError saying that the verifier cannot score it."""
    want = parse_caption(prompt)
    if want is None:
        raise EvalError(f"cannot read the attributes of the prompt {prompt!r} (expected e.g. "
                        "'a red circle in the top left on a grey background').")
    return want


def judge(reading: Reading, want: dict) -> dict[str, list[bool]]:
    """Attribute -> correctness of every asked instance (see :func:`score`)."""
    got: dict[str, list[bool]] = {"background": [reading.background == want["background"]]}
    by_pos = {o.position: o for o in reading.objects}
    used = set()
    for o in want["objects"]:
        r = by_pos.get(o["position"])
        got.setdefault("position", []).append(r is not None)
        if r is None:
            rest = [x for x in reading.objects if x.position not in used
                    and x.position not in {w["position"] for w in want["objects"]}]
            r = max(rest, key=lambda x: x.area) if rest else None
        if r is not None:
            used.add(r.position)
        for attr in ("shape", "colour") + (("size",) if o.get("size") else ()):
            got.setdefault(attr, []).append(r is not None and getattr(r, attr) == o[attr])
    return got


def score(images: list[np.ndarray], prompts: list[str]) -> dict:
    """Per-attribute accuracy and mean alignment of ``images`` against ``prompts``.

    Returns ``{"count", "alignment", "per_attribute": {attr: accuracy}, "per_image": [mean, ...]}``.
    """
    if len(images) != len(prompts):
        raise EvalError(f"{len(images)} images but {len(prompts)} prompts.")
    if not images:
        raise EvalError("nothing to score.")
    totals: dict[str, list[bool]] = {}
    per_image = []
    for img, prompt in zip(images, prompts):
        got = judge(read_image(img), check_prompt(prompt))
        flat = [v for vs in got.values() for v in vs]
        per_image.append(float(np.mean(flat)))
        for k, v in got.items():
            totals.setdefault(k, []).extend(v)
    flat = [v for vs in totals.values() for v in vs]
    return {"count": len(images), "alignment": float(np.mean(flat)),
            "per_attribute": {k: float(np.mean(v)) for k, v in totals.items()}, "per_image": per_image}


def _match(reading: Reading, claimed: list[dict]) -> list[ReadObject | None]:
    """The read object each claimed object refers to: the one at its stated position, else (no
    position, or nothing there) the unused one sharing most of its shape and colour (ties: the
    larger); None when the image has no object left for it."""
    by_pos = {o.position: o for o in reading.objects}
    match: list[ReadObject | None] = [None] * len(claimed)
    used: set[str] = set()
    for i, c in enumerate(claimed):
        r = by_pos.get(c["position"]) if c["position"] else None
        if r is not None and r.position not in used:
            match[i] = r
            used.add(r.position)
    for i, c in enumerate(claimed):
        if match[i] is not None:
            continue
        rest = [o for o in reading.objects if o.position not in used]
        if rest:
            r = max(rest, key=lambda o: (sum(c[a] == getattr(o, a) for a in ("shape", "colour")), o.area))
            match[i] = r
            used.add(r.position)
    return match


def agreement(reading: Reading, caption: str, attributes=ATTRIBUTES[1]) -> tuple[dict[str, list[bool]], bool]:
    """How well a training caption describes its image: (attribute -> [stated correctly?], contradicted).

    Unlike :func:`judge` (which scores what a prompt asks for), every attribute the *image* has
    counts (its background, and ``attributes`` of every object the verifier reads): stated with the
    value read back is right; left out or stated otherwise is not. An object the caption claims
    but the image lacks counts each stated attribute as wrong. ``contradicted``: the caption states
    something the reading disagrees with (a different value, or an object that is not there);
    leaving attributes out is no contradiction. Parsing: :func:`edgefc.models.synth.parse_partial`.
    """
    claims = parse_partial(caption)
    obj_attrs = [a for a in ("shape", "colour", "position", "size") if a in attributes]
    got: dict[str, list[bool]] = {"background": [claims["background"] == reading.background]}
    contradicted = claims["background"] is not None and claims["background"] != reading.background
    match = _match(reading, claims["objects"])
    matched = {id(r): c for c, r in zip(claims["objects"], match) if r is not None}
    for r in reading.objects:
        c = matched.get(id(r))
        for a in obj_attrs:
            got.setdefault(a, []).append(c is not None and c[a] == getattr(r, a))
            if c is not None and c[a] is not None and c[a] != getattr(r, a):
                contradicted = True
    for c, r in zip(claims["objects"], match):
        if r is None:  # claimed, not there
            contradicted = True
            for a in obj_attrs:
                if c[a] is not None:
                    got.setdefault(a, []).append(False)
    return got, contradicted


def describe(reading: Reading, rng: np.random.Generator, level: int = 1) -> str:
    """A caption written from what the verifier read (the re-captioner of ``edgefc data curate
    --recaption``): every object read, with its size from ``level`` 2 on, in a phrasing of
    :func:`edgefc.models.synth.write_caption` drawn from ``rng``; "a BG background" when no object
    was read. At most two objects (the scenes' maximum), the largest."""
    from edgefc.models.synth import Obj, write_caption

    objs = sorted(reading.objects, key=lambda o: -o.area)[:2]
    objs = sorted(objs, key=lambda o: POSITIONS.index(o.position))
    if not objs:
        return f"a {reading.background} background"
    return write_caption(reading.background, [Obj(o.shape, o.colour, o.position, o.size if level >= 2 else None)
                                              for o in objs], rng)


def caption_agreement(images: list[np.ndarray], captions: list[str], attributes=ATTRIBUTES[1]) -> dict:
    """The verifier's measure of a training set's own captions (:func:`agreement` per pair).

    Returns ``{"count", "agreement" (mean over every attribute slot), "per_attribute",
    "contradicted" (fraction of pairs), "per_image": [mean, ...], "contradicted_items": [bool, ...]}``.
    """
    if len(images) != len(captions):
        raise EvalError(f"{len(images)} images but {len(captions)} captions.")
    if not images:
        raise EvalError("nothing to score.")
    totals: dict[str, list[bool]] = {}
    per_image, contra = [], []
    for img, cap in zip(images, captions):
        got, c = agreement(read_image(img), cap, attributes)
        flat = [v for vs in got.values() for v in vs]
        per_image.append(float(np.mean(flat)))
        contra.append(c)
        for k, v in got.items():
            totals.setdefault(k, []).extend(v)
    flat = [v for vs in totals.values() for v in vs]
    return {"count": len(images), "agreement": float(np.mean(flat)),
            "per_attribute": {k: float(np.mean(v)) for k, v in totals.items()},
            "contradicted": float(np.mean(contra)), "per_image": per_image, "contradicted_items": contra}


def features(images: list[np.ndarray]) -> np.ndarray:
    """[N, 16] feature vectors (see the module docstring)."""
    return np.stack([read_image(i).features for i in images])


def _sqrtm_psd(a: np.ndarray) -> np.ndarray:
    vals, vecs = np.linalg.eigh((a + a.T) / 2)
    return (vecs * np.sqrt(np.clip(vals, 0, None))) @ vecs.T


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2), as FID (x100 for readability)."""
    if len(feats_a) < 2 or len(feats_b) < 2:
        raise EvalError("the Fréchet distance needs at least two images on each side.")
    mu_a, mu_b = feats_a.mean(0), feats_b.mean(0)
    s_a, s_b = np.cov(feats_a, rowvar=False), np.cov(feats_b, rowvar=False)
    ra = _sqrtm_psd(s_a)
    cross = _sqrtm_psd(ra @ s_b @ ra)
    d = float(np.sum((mu_a - mu_b) ** 2) + np.trace(s_a) + np.trace(s_b) - 2 * np.trace(cross))
    return 100.0 * max(d, 0.0)


def load_pairs(folder: str | Path) -> tuple[list[str], list[np.ndarray], list[str]]:
    """(names, images, prompts) of a folder of ``NAME.png`` + ``NAME.txt`` pairs, sorted by name."""
    root = Path(folder)
    if not root.is_dir():
        raise EvalError(f"{root} is not a folder.")
    names, images, prompts = [], [], []
    for png in sorted(root.glob("*.png")):
        txt = png.with_suffix(".txt")
        if not txt.is_file():
            continue
        names.append(png.stem)
        images.append(_read_png(png))
        prompts.append(txt.read_text(encoding="utf-8").strip())
    if not names:
        raise EvalError(f"no NAME.png + NAME.txt pairs in {root}.")
    return names, images, prompts


def evaluate_folder(folder: str | Path, reference: str | Path | None = None) -> dict:
    """Score a folder of generated images against their prompts; with ``reference`` (a folder of real
    images) also the Fréchet distance between the two sets' features."""
    names, images, prompts = load_pairs(folder)
    for name, p in zip(names, prompts):
        if parse_caption(p) is None:
            raise EvalError(f"{name}.txt: cannot read the attributes of the prompt {p!r}.")
    result = score(images, prompts)
    result["names"] = names
    if reference is not None:
        _, ref_images, _ = load_pairs(reference)
        result["fid"] = frechet_distance(features(images), features(ref_images))
    return result


def format_result(result: dict) -> str:
    attrs = ", ".join(f"{k} {v:.3f}" for k, v in result["per_attribute"].items())
    line = f"{result['count']} images: alignment {result['alignment']:.3f} ({attrs})"
    if "fid" in result:
        line += f"; Fréchet distance {result['fid']:.2f}"
    return line


def to_json(result: dict) -> str:
    return json.dumps(result, indent=1)
