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
    if n == 1:
        t = _TEMPLATES_ONE[int(rng.integers(len(_TEMPLATES_ONE)))]
        caption = t.format(obj=_object_words(objs[0]), pos=objs[0].position, bg=bg)
    else:
        t = _TEMPLATES_TWO[int(rng.integers(len(_TEMPLATES_TWO)))]
        caption = t.format(obj0=_object_words(objs[0]), pos0=objs[0].position,
                           obj1=_object_words(objs[1]), pos1=objs[1].position, bg=bg)
    return Scene(bg, tuple(objs), caption)


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


# --- writing a data set ------------------------------------------------------------------------

def _write_png(path: Path, image: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(image, "RGB").save(path, format="PNG")


def synthesize(output: str | os.PathLike, count: int, size: int = 64, seed: int = 0, level: int = 1,
               progress=None) -> dict:
    """Write ``count`` pairs ``NNNNNN.png`` + ``NNNNNN.txt``, ``manifest.json`` and ``tokenizer/`` (a
    CLIP tokenizer with one token per caption word, :func:`caption_words`) into ``output``.

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
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SynthError(f"output {out} exists and is not an empty folder.")
    if not out.parent.is_dir():
        raise SynthError(f"the folder {out.parent} does not exist.")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        items = []
        for i in range(count):
            scene, image = make(i, seed, size, level)
            name = f"{i:06d}"
            _write_png(tmp / f"{name}.png", image)
            (tmp / f"{name}.txt").write_text(scene.caption + "\n", encoding="utf-8")
            items.append({"name": name, "caption": scene.caption, "background": scene.background,
                          "objects": [asdict(o) for o in scene.objects]})
            if progress is not None:
                progress(i + 1)
        manifest = {"generator": "edgefc data synth", "seed": seed, "size": size, "level": level,
                    "count": count, "attributes": list(ATTRIBUTES[level]), "shapes": list(SHAPES),
                    "colours": list(COLOURS), "backgrounds": list(BACKGROUNDS),
                    "positions": list(POSITIONS), "tokenizer": "tokenizer", "items": items}
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
