"""Procedurally rendered, attribute-controlled image-caption pairs (``edgefc data synth``).

EdgeFusion's data lesson (paper Sec. 2.2): fully synthetic image-text pairs whose attributes are
controlled beat crawled data. No pretrained diffusion weights can be downloaded here, so the
miniature EdgeFusion (bench/mini_edgefusion.py) trains on scenes drawn here, and
:mod:`edgefc.models.verifier` reads the same attributes back from any image.

A scene is a background colour and one object per occupied quadrant. Each object has a shape
class (circle, square, triangle), a colour and a position (the quadrant: top left, top right,
bottom left, bottom right); from difficulty level 2 on it also has a size (small, large) and
from level 3 on a scene holds two objects in different quadrants. The caption is written from
the attributes in one of several phrasings ("a red circle in the top left on a grey
background", "grey background, red circle at the top left", ...). :func:`parse_caption` reads
the attributes back from any of those phrasings (and from a user's prompt using the same
words), which is how the verifier scores an image against the prompt that drew it.

Rendering is pure numpy: 4x supersampled shapes averaged down (anti-aliased edges), a small
per-scene colour jitter and a small per-object position and size jitter. The scenes, captions
and PNG bytes are a pure function of ``(seed, index, size, level)``.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from edgefc.errors import EdgefcError

SHAPES = ("circle", "square", "triangle")
#: Object colours (RGB); chosen far apart from each other and from every background.
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}
BACKGROUNDS = {"grey": (128, 128, 128), "white": (240, 240, 240), "black": (20, 20, 20)}
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
SIZES = ("small", "large")
#: Object radius (half the bounding box side) as a fraction of the image side, per size word.
RADIUS = {"small": 0.13, "large": 0.19, None: 0.17}
LEVELS = (1, 2, 3)
#: Attributes scored per object at each level (the verifier's per-attribute accuracy).
ATTRIBUTES = {1: ("shape", "colour", "position", "background"),
              2: ("shape", "colour", "position", "size", "background"),
              3: ("shape", "colour", "position", "size", "background")}

_TEMPLATES_ONE = (
    "a {obj} in the {pos} on a {bg} background",
    "{bg} background, {obj} at the {pos}",
    "a {bg} background with a {obj} in the {pos}",
    "{obj}, {pos}, on {bg}",
    "there is a {obj} in the {pos} of a {bg} background",
)
_TEMPLATES_TWO = (
    "a {obj0} in the {pos0} and a {obj1} in the {pos1} on a {bg} background",
    "{bg} background, {obj0} at the {pos0}, {obj1} at the {pos1}",
)


class SynthError(EdgefcError):
    """Bad ``edgefc data synth`` arguments."""


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    position: str
    size: str | None = None  # only from level 2


@dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple[Obj, ...]
    caption: str


def caption_words() -> list[str]:
    """Every word a caption can contain (templates and attribute names), sorted: the vocabulary of
    the word-level tokenizer that ``edgefc data synth`` writes beside the data."""
    text = " ".join((*_TEMPLATES_ONE, *_TEMPLATES_TWO, *SHAPES, *COLOURS, *BACKGROUNDS, *POSITIONS, *SIZES))
    return sorted(set(re.findall(r"[a-z]+", re.sub(r"\{\w+\}", " ", text))))


def _centre(position: str) -> tuple[float, float]:
    """Quadrant centre as (x, y) fractions of the image side."""
    return (0.75 if "right" in position else 0.25), (0.75 if "bottom" in position else 0.25)


def _object_words(o: Obj) -> str:
    return " ".join(w for w in (o.size, o.colour, o.shape) if w)


def sample_scene(rng: np.random.Generator, level: int = 1) -> Scene:
    """One random scene and its caption (phrasing drawn from the templates)."""
    bg = str(rng.choice(list(BACKGROUNDS)))
    n = 2 if level >= 3 else 1
    positions = rng.choice(len(POSITIONS), size=n, replace=False)
    objs = []
    for p in positions:
        objs.append(Obj(shape=str(rng.choice(SHAPES)), colour=str(rng.choice(list(COLOURS))),
                        position=POSITIONS[int(p)], size=str(rng.choice(SIZES)) if level >= 2 else None))
    return Scene(bg, tuple(objs), write_caption(bg, objs, rng))


def write_caption(background: str, objects, rng: np.random.Generator) -> str:
    """A caption stating every attribute of ``objects`` (one or two) on ``background``, in a phrasing
    drawn from ``rng`` (the templates of :func:`sample_scene`)."""
    objs = list(objects)
    if len(objs) == 1:
        t = _TEMPLATES_ONE[int(rng.integers(len(_TEMPLATES_ONE)))]
        return t.format(obj=_object_words(objs[0]), pos=objs[0].position, bg=background)
    t = _TEMPLATES_TWO[int(rng.integers(len(_TEMPLATES_TWO)))]
    return t.format(obj0=_object_words(objs[0]), pos0=objs[0].position,
                    obj1=_object_words(objs[1]), pos1=objs[1].position, bg=background)


def shape_mask(shape: str, cx: float, cy: float, r: float, size: int, supersample: int = 4) -> np.ndarray:
    """Coverage in [0, 1] of ``shape`` (centre ``cx, cy``, half side ``r``, pixels) on a size x size grid."""
    s = supersample
    coords = (np.arange(size * s, dtype=np.float64) + 0.5) / s
    x, y = np.meshgrid(coords, coords)
    dx, dy = x - cx, y - cy
    if shape == "circle":
        inside = dx * dx + dy * dy <= r * r
    elif shape == "square":
        inside = (np.abs(dx) <= r) & (np.abs(dy) <= r)
    elif shape == "triangle":  # apex up, base at the bottom of the box
        inside = (dy <= r) & (dy >= -r) & (np.abs(dx) <= (dy + r) / 2)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return inside.reshape(size, s, size, s).mean(axis=(1, 3))


def render(scene: Scene, size: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 [size, size, 3] image of ``scene`` (small colour, position and size jitter from ``rng``)."""
    def jitter(rgb):
        return np.clip(np.asarray(rgb, np.float64) + rng.uniform(-12, 12, 3), 0, 255)

    img = np.broadcast_to(jitter(BACKGROUNDS[scene.background]), (size, size, 3)).copy()
    for o in scene.objects:
        fx, fy = _centre(o.position)
        r = RADIUS[o.size] * size * rng.uniform(0.92, 1.08)
        cx = fx * size + rng.uniform(-0.04, 0.04) * size
        cy = fy * size + rng.uniform(-0.04, 0.04) * size
        m = shape_mask(o.shape, cx, cy, r, size)[..., None]
        img = img * (1 - m) + jitter(COLOURS[o.colour]) * m
    return np.round(img).astype(np.uint8)


def make(index: int, seed: int, size: int = 64, level: int = 1) -> tuple[Scene, np.ndarray]:
    """Scene ``index`` of the data set ``seed``: a pure function of its arguments."""
    rng = np.random.default_rng([seed, level, index])
    scene = sample_scene(rng, level)
    return scene, render(scene, size, rng)


# --- crawl-like defects (issue 23) ------------------------------------------------------------

#: Captions with no attribute at all, as web alt-text often is ({n}: a number drawn per pair).
BOILERPLATE = ("image", "photo", "click to enlarge", "stock photo", "untitled", "thumbnail", "view full size",
               "free download", "img {n}", "dsc {n}", "new product", "see more", "picture {n} of {m}")
#: A "small" image is stored at this fraction of ``--size`` (and the training loader upscales it).
SMALL_FRACTION = 4
#: The long side of a "cut" canvas, as a multiple of its short side (``--size``).
CUT_ASPECT = 2.0
#: Each popular image of the near-duplicate pool is copied about this many times.
DUPLICATES_PER_SOURCE = 4
#: Near copies differ from their source by a colour offset drawn in +- this (0-255 scale).
DUPLICATE_SHIFT = 6.0


@dataclass(frozen=True)
class Defects:
    """Crawl-like defects of ``edgefc data synth``, each the fraction of pairs that gets it.

    Caption defects (at most one per pair; their rates add up to at most 1):

    * ``wrong_caption`` -- the caption of another scene (alt-text of the wrong picture);
    * ``wrong_attribute`` -- one attribute of the caption changed (background, or one object's
      shape, colour, position or size): what a text-to-image generator that missed part of its
      prompt leaves behind (the paper's synthetic data);
    * ``missing_attributes`` -- the caption leaves out some of position, background, colour and
      shape ("a red circle", "a square in the top left on a grey background");
    * ``boilerplate`` -- a caption that states nothing ("click to enlarge", "img 4821").

    Image defects (independent of each other and of the caption's):

    * ``near_duplicates`` -- the pair is a near copy (colour offset within +-``DUPLICATE_SHIFT``) of
      one of a small pool of "popular" images of the same set (each copied about
      ``DUPLICATES_PER_SOURCE`` times), with its own phrasing of that image's caption;
    * ``cut_crop`` -- a non-square canvas (``CUT_ASPECT`` : 1, wide or tall) with the scene at one
      end and the background continued over the rest: the training loader's centre square cuts
      the subject or moves it to another quadrant (the paper's three-crop choice picks the end);
    * ``small`` -- the image is stored at 1/``SMALL_FRACTION`` of its side, so training upscales
      a blurred version (the paper's small-image removal drops it).
    """

    wrong_caption: float = 0.0
    wrong_attribute: float = 0.0
    missing_attributes: float = 0.0
    boilerplate: float = 0.0
    near_duplicates: float = 0.0
    cut_crop: float = 0.0
    small: float = 0.0

    CAPTION = ("boilerplate", "wrong_caption", "wrong_attribute", "missing_attributes")
    IMAGE = ("near_duplicates", "cut_crop", "small")

    def rates(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in (*self.CAPTION, *self.IMAGE)}

    def active(self) -> bool:
        return any(v > 0 for v in self.rates().values())

    def check(self) -> None:
        for k, v in self.rates().items():
            if not 0.0 <= v <= 1.0:
                raise SynthError(f"--{k.replace('_', '-')} {v} must be a rate between 0 and 1.")
        total = sum(getattr(self, k) for k in self.CAPTION)
        if total > 1.0 + 1e-9:
            raise SynthError(f"the caption defect rates add up to {total:g}; a pair gets at most one, so their "
                             "sum must be at most 1.")


def _other(rng: np.random.Generator, values, current):
    rest = [v for v in values if v != current]
    return rest[int(rng.integers(len(rest)))]


def _wrong_attribute(scene: Scene, rng: np.random.Generator) -> tuple[str, tuple[Obj, ...]]:
    """The scene's background and objects with exactly one attribute changed."""
    slots = [("background", None)] + [(a, i) for i, o in enumerate(scene.objects)
                                       for a in ("shape", "colour", "position", "size") if getattr(o, a) is not None]
    attr, i = slots[int(rng.integers(len(slots)))]
    if attr == "background":
        return _other(rng, list(BACKGROUNDS), scene.background), scene.objects
    o = scene.objects[i]
    if attr == "position":
        taken = {x.position for x in scene.objects}
        value = [p for p in POSITIONS if p not in taken][int(rng.integers(len(POSITIONS) - len(taken)))]
    else:
        value = _other(rng, {"shape": SHAPES, "colour": list(COLOURS), "size": SIZES}[attr], getattr(o, attr))
    objs = list(scene.objects)
    objs[i] = Obj(**{**asdict(o), attr: value})
    return scene.background, tuple(objs)


def _partial_caption(scene: Scene, rng: np.random.Generator) -> str:
    """A caption with some of position, background, colour, shape left out (never all of an object)."""
    while True:
        drop = {a for a in ("position", "background", "colour", "shape") if rng.random() < 0.5}
        if drop and not {"colour", "shape"} <= drop:
            break
    parts = []
    for o in scene.objects:
        words = " ".join(w for w in (o.size, None if "colour" in drop else o.colour,
                                     "shape" if "shape" in drop else o.shape) if w)
        parts.append(f"a {words}" + ("" if "position" in drop else f" in the {o.position}"))
    return " and ".join(parts) + ("" if "background" in drop else f" on a {scene.background} background")


def _boilerplate(rng: np.random.Generator) -> str:
    t = BOILERPLATE[int(rng.integers(len(BOILERPLATE)))]
    return t.format(n=int(rng.integers(1, 10000)), m=int(rng.integers(10, 100)))


def _cut_canvas(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """The scene at one end of a CUT_ASPECT:1 canvas, the background continued over the rest."""
    size = image.shape[0]
    long = int(round(size * CUT_ASPECT))
    wide, at_start = bool(rng.integers(2)), bool(rng.integers(2))
    shape = (size, long, 3) if wide else (long, size, 3)
    canvas = np.broadcast_to(image[0, 0], shape).copy()  # a corner pixel: the scene's background colour
    off = 0 if at_start else long - size
    if wide:
        canvas[:, off:off + size] = image
    else:
        canvas[off:off + size, :] = image
    return canvas, ("left" if wide else "top") if at_start else ("right" if wide else "bottom")


def _shrink(image: np.ndarray) -> np.ndarray:
    from PIL import Image

    h, w = image.shape[:2]
    small = Image.fromarray(image).resize((max(1, w // SMALL_FRACTION), max(1, h // SMALL_FRACTION)),
                                          Image.Resampling.BOX)
    return np.asarray(small)


def duplicate_sources(count: int, defects: Defects) -> int:
    """How many "popular" images (the first ones of the set) the near duplicates copy."""
    if defects.near_duplicates <= 0:
        return 0
    return max(1, int(round(count * defects.near_duplicates / DUPLICATES_PER_SOURCE)))


def make_crawl(index: int, seed: int, size: int, level: int, defects: Defects, sources: int,
               pool: dict[int, tuple[Scene, np.ndarray]]) -> tuple[Scene, np.ndarray, str, list[str]]:
    """Pair ``index`` of a crawl-like set: (the image's true scene, image, caption, defects applied).

    The clean scene is :func:`make`'s; the defects are drawn from their own stream
    (``default_rng([seed, level, index, 23])``), so a rate of 0 leaves a pair exactly as ``make`` draws it.
    Pairs ``0 .. sources-1`` are the near duplicates' sources (never copies themselves); ``pool``
    collects their final (scene, image) as they are made, so pairs must be made in index order.
    """
    scene, image = make(index, seed, size, level)
    rng = np.random.default_rng([seed, level, index, 23])
    u_caption, u_dup, u_cut, u_small = rng.random(4)
    applied: list[str] = []
    caption = scene.caption
    if u_dup < defects.near_duplicates and index >= sources > 0:
        j = int(rng.integers(sources))
        scene, src = pool[j]
        shift = rng.uniform(-DUPLICATE_SHIFT, DUPLICATE_SHIFT, 3)
        image = np.clip(np.round(src.astype(np.float64) + shift), 0, 255).astype(np.uint8)
        caption = write_caption(scene.background, scene.objects, rng)
        applied.append(f"near-duplicate of {j:06d}")
    else:
        if u_cut < defects.cut_crop:
            image, end = _cut_canvas(image, rng)
            applied.append(f"cut-crop (scene at the {end})")
        if u_small < defects.small:
            image = _shrink(image)
            applied.append("small")
        if index < sources:
            pool[index] = (scene, image)
    edges = np.cumsum([getattr(defects, k) for k in Defects.CAPTION])
    kind = next((k for k, e in zip(Defects.CAPTION, edges) if u_caption < e), None)
    if kind == "boilerplate":
        caption = _boilerplate(rng)
    elif kind == "wrong_caption":
        while True:
            other = sample_scene(rng, level)
            if (other.background, other.objects) != (scene.background, scene.objects):
                break
        caption = other.caption
    elif kind == "wrong_attribute":
        bg, objs = _wrong_attribute(scene, rng)
        caption = write_caption(bg, objs, rng)
    elif kind == "missing_attributes":
        caption = _partial_caption(scene, rng)
    if kind is not None:
        applied.append(kind.replace("_", "-"))
    return scene, image, caption, applied


# --- captions back to attributes ---------------------------------------------------------------

_COLOUR_RE = "|".join(COLOURS)
_BG_RE = "|".join(BACKGROUNDS)
_OBJ_RE = re.compile(rf"\b(?:(small|large)\s+)?({_COLOUR_RE})\s+({'|'.join(SHAPES)})\b")
_POS_RE = re.compile(r"\b(top|bottom)\s+(left|right)\b")
_BGWORD_RE = re.compile(rf"\b(?:({_BG_RE})\s+background|background\s+is\s+({_BG_RE})|on\s+({_BG_RE})\s*$)")


def parse_caption(text: str) -> dict | None:
    """The attributes a caption asks for, ``{"background", "objects": [{shape, colour, position, size}]}``.

    Objects are read in order ("[size] colour shape"); the n-th position phrase belongs to the n-th
    object. None when the text names no object or no background, or their counts disagree.
    """
    t = " ".join(text.lower().split())
    objs = _OBJ_RE.findall(t)
    pos = [f"{a} {b}" for a, b in _POS_RE.findall(t)]
    bgm = _BGWORD_RE.search(t)
    if not objs or bgm is None or len(pos) != len(objs):
        return None
    bg = next(g for g in bgm.groups() if g)
    return {"background": bg, "objects": [{"shape": s, "colour": c, "position": p, "size": z or None}
                                          for (z, c, s), p in zip(objs, pos)]}


_PARTIAL_OBJ_RE = re.compile(rf"\b(?:(small|large)\s+)?(?:({_COLOUR_RE})\s+)?({'|'.join(SHAPES)}|shape|object)\b")


def parse_partial(text: str) -> dict:
    """What a caption states, attribute by attribute (None where it says nothing), for any caption.

    ``{"background": name or None, "objects": [{"shape", "colour", "position", "size"}]}``: objects
    are "[size] [colour] shape" phrases, where "shape" or "object" stands for an unnamed shape (a
    bare colour word names no object); the n-th position phrase belongs to the n-th object. A
    caption that states nothing (boilerplate) gives no background and no objects. On the captions
    :func:`parse_caption` reads, both agree.
    """
    t = " ".join(text.lower().split())
    objs = [m for m in _PARTIAL_OBJ_RE.findall(t) if m[1] or m[2] in SHAPES]
    pos = [f"{a} {b}" for a, b in _POS_RE.findall(t)]
    bgm = _BGWORD_RE.search(t)
    bg = next(g for g in bgm.groups() if g) if bgm else None
    out = []
    for i, (z, c, sh) in enumerate(objs):
        out.append({"shape": sh if sh in SHAPES else None, "colour": c or None,
                    "position": pos[i] if i < len(pos) else None, "size": z or None})
    return {"background": bg, "objects": out}


# --- writing a data set ------------------------------------------------------------------------

def _write_png(path: Path, image: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(image, "RGB").save(path, format="PNG")


def synthesize(output: str | os.PathLike, count: int, size: int = 64, seed: int = 0, level: int = 1,
               progress=None, defects: Defects | None = None) -> dict:
    """Write ``count`` pairs ``NNNNNN.png`` + ``NNNNNN.txt``, ``manifest.json`` and ``tokenizer/`` (a
    CLIP tokenizer with one token per caption word, :func:`caption_words`) into ``output``.

    ``defects`` (:class:`Defects`) makes a crawl-like set: each item of the manifest then also lists
    the defects it got and its image size, and the manifest the rates. Without (or with all rates
    0) the bytes are those of the clean set.

    The folder must not exist or be empty; everything is written into a temporary folder beside it
    and renamed into place, so a failed run leaves nothing half-written. Returns the manifest.
    """
    out = Path(output)
    if count < 1:
        raise SynthError("--count must be at least 1.")
    if size < 32 or size % 8:
        raise SynthError(f"--size {size} must be a multiple of 8 and at least 32.")
    if level not in LEVELS:
        raise SynthError(f"--level {level} is not one of {', '.join(map(str, LEVELS))}.")
    defects = defects if defects is not None and defects.active() else None
    if defects is not None:
        defects.check()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SynthError(f"output {out} exists and is not an empty folder.")
    if not out.parent.is_dir():
        raise SynthError(f"the folder {out.parent} does not exist.")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        items = []
        sources = duplicate_sources(count, defects) if defects is not None else 0
        pool: dict[int, tuple[Scene, np.ndarray]] = {}
        for i in range(count):
            if defects is None:
                scene, image = make(i, seed, size, level)
                caption, applied = scene.caption, None
            else:
                scene, image, caption, applied = make_crawl(i, seed, size, level, defects, sources, pool)
            name = f"{i:06d}"
            _write_png(tmp / f"{name}.png", image)
            (tmp / f"{name}.txt").write_text(caption + "\n", encoding="utf-8")
            item = {"name": name, "caption": caption, "background": scene.background,
                    "objects": [asdict(o) for o in scene.objects]}
            if applied is not None:
                item.update(defects=applied, image_size=[int(image.shape[1]), int(image.shape[0])])
            items.append(item)
            if progress is not None:
                progress(i + 1)
        manifest = {"generator": "edgefc data synth", "seed": seed, "size": size, "level": level,
                    "count": count, "attributes": list(ATTRIBUTES[level]), "shapes": list(SHAPES),
                    "colours": list(COLOURS), "backgrounds": list(BACKGROUNDS),
                    "positions": list(POSITIONS), "tokenizer": "tokenizer", "items": items}
        if defects is not None:
            counts: dict[str, int] = {}
            for it in items:
                for d in it["defects"]:
                    k = d.split(" ")[0]
                    counts[k] = counts.get(k, 0) + 1
            manifest["defects"] = {"rates": defects.rates(), "counts": counts}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        from edgefc.models.tokenizer import write_word_tokenizer

        write_word_tokenizer(tmp / "tokenizer", caption_words())
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest
