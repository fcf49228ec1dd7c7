"""Image/caption data for training and curation: a folder of pairs or a webdataset-style shard.

* A folder holds pairs ``NAME.jpg|jpeg|png|webp`` + ``NAME.txt`` (the caption), searched
  recursively; images without a caption file are skipped (and counted).
* A ``.tar`` shard holds webdataset samples: members ``KEY.jpg`` + ``KEY.txt`` grouped by key
  (the member path up to the first dot of its base name, as webdataset does).

:func:`list_samples` needs only PIL (curation uses it without torch);
:class:`ImageCaptionDataset` and :class:`StepBatchSampler` are the torch side for training.
The sampler makes the data order a pure function of ``(seed, step)``, so a resumed run sees
exactly the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

import io
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgefc.models.train.errors import DataError


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")
CAPTION_EXTS = (".txt", ".caption", ".text")


@dataclass
class Sample:
    """One image/caption pair; ``source`` is a file path or ``shard.tar:member``."""

    key: str
    source: str
    caption: str
    _tar: Path | None = field(default=None, repr=False)
    _member: str | None = field(default=None, repr=False)
    _path: Path | None = field(default=None, repr=False)

    def read_bytes(self) -> bytes:
        if self._path is not None:
            return self._path.read_bytes()
        with tarfile.open(self._tar) as tf:
            f = tf.extractfile(self._member)
            if f is None:
                raise DataError(f"cannot read {self.source} from the shard.")
            return f.read()

    def open_image(self):
        """The image as an RGB PIL image (a DataError naming the file if it cannot be decoded)."""
        from PIL import Image, UnidentifiedImageError

        try:
            img = Image.open(io.BytesIO(self.read_bytes()))
            img.load()
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise DataError(f"cannot decode image {self.source}: {_first_line(e)}") from None
        return img.convert("RGB")


@dataclass
class SampleList:
    samples: list[Sample]
    skipped_no_caption: list[str]


def _wds_key(member: str) -> tuple[str, str]:
    """webdataset's split of a member path into (key, extension): the base name's first dot."""
    head, _, base = member.rpartition("/")
    stem, dot, ext = base.partition(".")
    key = f"{head}/{stem}" if head else stem
    return key, (dot + ext).lower()


def list_samples(path: str | Path) -> SampleList:
    """The image/caption pairs of a folder or a ``.tar`` shard (DataError if missing or empty)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data path {path} does not exist.")
    samples: list[Sample] = []
    skipped: list[str] = []
    if path.is_dir():
        for img in sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file()):
            cap = next((img.with_suffix(e) for e in CAPTION_EXTS if img.with_suffix(e).is_file()), None)
            key = str(img.relative_to(path).with_suffix(""))
            if cap is None:
                skipped.append(str(img))
                continue
            text = cap.read_text(encoding="utf-8", errors="replace").strip()
            samples.append(Sample(key, str(img), text, _path=img))
    elif path.suffix.lower() == ".tar" and path.is_file():
        try:
            with tarfile.open(path) as tf:
                groups: dict[str, dict[str, tarfile.TarInfo]] = {}
                for m in tf.getmembers():
                    if m.isfile():
                        key, ext = _wds_key(m.name)
                        groups.setdefault(key, {})[ext] = m
                for key in sorted(groups):
                    members = groups[key]
                    img = next((members[e] for e in members if e in IMAGE_EXTS), None)
                    cap = next((members[e] for e in members if e in CAPTION_EXTS), None)
                    if img is None:
                        continue
                    if cap is None:
                        skipped.append(f"{path}:{img.name}")
                        continue
                    text = tf.extractfile(cap).read().decode("utf-8", errors="replace").strip()
                    samples.append(Sample(key, f"{path}:{img.name}", text, _tar=path, _member=img.name))
        except tarfile.TarError as e:
            raise DataError(f"{path} is not a readable tar shard ({_first_line(e)}).") from None
    else:
        raise DataError(f"data path {path} is neither a folder nor a .tar shard.")
    if not samples:
        raise DataError(
            f"no image/caption pairs found in {path} (expected NAME.jpg/.png with NAME.txt beside it"
            + (f"; {len(skipped)} images had no caption file" if skipped else "")
            + ")."
        )
    return SampleList(samples, skipped)


def center_square(img, resolution: int):
    """Resize the short side to ``resolution`` (bicubic) and take the centred square."""
    from PIL import Image

    w, h = img.size
    scale = resolution / min(w, h)
    nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    img = img.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - resolution) // 2, (nh - resolution) // 2
    return img.crop((left, top, left + resolution, top + resolution))


class ImageCaptionDataset:
    """torch-style dataset: ``{"pixel_values": f32 [3,R,R] in [-1,1], "input_ids": int64 [77], "index": i}``."""

    def __init__(self, samples: list[Sample], resolution: int, tokenizer):
        self.samples = samples
        self.resolution = resolution
        self.tokenizer = tokenizer

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        import torch

        s = self.samples[i]
        img = center_square(s.open_image(), self.resolution)
        arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
        ids = self.tokenizer.encode([s.caption])[0]
        return {"pixel_values": torch.from_numpy(arr.transpose(2, 0, 1).copy()), "input_ids": torch.from_numpy(ids),
                "index": i}


class StepBatchSampler:
    """Batches of indices as a pure function of (seed, global batch number).

    Epoch ``e`` visits the items in the order ``default_rng([seed, e]).permutation(n)``; the
    batches are consecutive slices of that endless stream. Step ``s`` uses global batches
    ``s*P .. s*P+P-1`` (P = number of processes; accelerate hands batch ``s*P+r`` to process r).
    With ``fixed`` every step uses the first batch (for overfitting checks).
    """

    def __init__(self, n: int, batch_size: int, seed: int, start_step: int, end_step: int,
                 num_processes: int = 1, fixed: bool = False):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.start, self.end, self.procs, self.fixed = start_step, end_step, num_processes, fixed
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.n)}
        return self._perms[epoch]

    def batch(self, g: int) -> list[int]:
        if self.fixed:
            g = 0
        pos = range(g * self.batch_size, (g + 1) * self.batch_size)
        return [int(self._perm(p // self.n)[p % self.n]) for p in pos]

    def __iter__(self):
        for step in range(self.start, self.end):
            for r in range(self.procs):
                yield self.batch(step * self.procs + r)

    def __len__(self):
        return max(0, self.end - self.start) * self.procs
