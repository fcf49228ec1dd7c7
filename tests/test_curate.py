"""``edgefc data curate``: size filter, exact/near deduplication by DCT pHash, crop choice (issue 8)."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from edgefc.models.train.curate import (
    CROP_SCORERS,
    choose_crop,
    curate,
    hamming,
    phash,
    register_crop_scorer,
)


def synth(seed: int, w: int = 400, h: int = 320) -> Image.Image:
    """A distinct synthetic photo: coloured background with a few discs and boxes."""
    r = np.random.default_rng(seed)
    img = Image.new("RGB", (w, h), tuple(int(x) for x in r.integers(0, 255, 3)))
    d = ImageDraw.Draw(img)
    for _ in range(6):
        x, y = int(r.integers(0, w - 60)), int(r.integers(0, h - 60))
        s = int(r.integers(30, 150))
        fill = tuple(int(v) for v in r.integers(0, 255, 3))
        (d.ellipse if r.random() < 0.5 else d.rectangle)([x, y, x + s, y + s], fill=fill)
    return img


def near_copy(img: Image.Image) -> Image.Image:
    """Slightly resized and JPEG-recompressed copy."""
    small = img.resize((round(img.width * 0.95), round(img.height * 0.95)), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    small.save(buf, "JPEG", quality=80)
    buf.seek(0)
    return Image.open(buf).convert("RGB")


@pytest.fixture
def src(tmp_path) -> Path:
    folder = tmp_path / "src"
    folder.mkdir()

    def put(name, img, caption, fmt="png"):
        img.save(folder / f"{name}.{fmt}", quality=92) if fmt == "jpg" else img.save(folder / f"{name}.{fmt}")
        (folder / f"{name}.txt").write_text(caption)

    for i in range(6):
        put(f"photo{i}", synth(i, 400 + 20 * i, 320), f"photo {i}")
    shutil.copy(folder / "photo1.png", folder / "photo1_copy.png")  # exact (same bytes)
    (folder / "photo1_copy.txt").write_text("the same photo")
    put("reencoded_2", synth(2, 440, 320), "same pixels, another file", fmt="png")  # exact pixels, new file
    put("near_3", near_copy(synth(3, 460, 320)), "resized jpeg copy of photo 3", fmt="jpg")
    put("small", synth(10, 250, 400), "short side 250")
    synth(11).save(folder / "uncaptioned.png")
    return folder


def test_curate_drops_small_and_duplicates(src, tmp_path):
    dst = tmp_path / "dst"
    m = curate(src, dst, progress=False)
    kept = {r["key"] for r in m["kept"]}
    assert kept == {f"photo{i}" for i in range(6)}
    reasons = {r["key"]: r for r in m["dropped"]}
    assert reasons["small"]["reason"] == "too-small"
    assert reasons["photo1_copy"]["reason"] == "exact-duplicate" and reasons["photo1_copy"]["of"] == "photo1"
    # same pixels but a different image file of the same size; ties keep the first key in sorted order
    dup2 = reasons.get("reencoded_2") or reasons.get("photo2")
    assert dup2["reason"] == "exact-duplicate"
    assert reasons["near_3"]["reason"] == "near-duplicate" and reasons["near_3"]["of"] == "photo3"
    assert 0 <= reasons["near_3"]["distance"] <= 10
    assert reasons["uncaptioned"]["reason"] == "no-caption"
    assert m["counts"] == {"input": 11, "kept": 6, "too-small": 1, "exact-duplicate": 2, "near-duplicate": 1,
                           "no-caption": 1}
    # outputs: square crops of the short side, captions beside them, the manifest on disk
    for row in m["kept"]:
        out = dst / row["output"]
        with Image.open(out) as im:
            assert im.size == (320, 320)
        assert out.with_suffix(".txt").read_text().strip() == f"photo {row['key'][-1]}"
        assert row["crop"] in ("center", "left", "right")
    assert json.loads((dst / "manifest.json").read_text())["counts"] == m["counts"]
    assert not list(tmp_path.glob(".*tmp"))


def test_threshold_zero_keeps_the_near_copy_and_larger_threshold_merges(src, tmp_path):
    m0 = curate(src, tmp_path / "t0", threshold=0, progress=False)
    assert "near_3" in {r["key"] for r in m0["kept"]} or any(
        r["key"] == "near_3" and r["distance"] == 0 for r in m0["dropped"])
    m_all = curate(src, tmp_path / "t64", threshold=64, progress=False)
    assert m_all["counts"]["kept"] == 1  # every hash is within 64 bits of every other


def test_phash_separates_distinct_images_and_matches_near_copies():
    hashes = [phash(synth(i)) for i in range(12)]
    distinct = [hamming(a, b) for i, a in enumerate(hashes) for b in hashes[i + 1:]]
    assert min(distinct) > 10, min(distinct)
    for i in range(4):
        assert hamming(hashes[i], phash(near_copy(synth(i)))) <= 4
    assert phash(synth(0)) == hashes[0]  # deterministic


def _salient_end(w, h, where):
    a = np.full((h, w, 3), 128, np.uint8)
    rng = np.random.default_rng(0)
    if where == "right":
        a[:, w - 220:] = rng.integers(0, 255, (h, 220, 3))
    elif where == "left":
        a[:, :220] = rng.integers(0, 255, (h, 220, 3))
    elif where == "top":
        a[:220] = rng.integers(0, 255, (220, w, 3))
    return Image.fromarray(a)


@pytest.mark.parametrize("where,size", [("right", (900, 300)), ("left", (900, 300)), ("top", (300, 900))])
@pytest.mark.parametrize("scorer", ["saliency", "gradient"])
def test_crop_follows_the_salient_end(where, size, scorer):
    name, box, scores = choose_crop(_salient_end(*size, where), scorer)
    assert name == where, scores
    assert box[2] - box[0] == box[3] - box[1] == 300


def test_center_scorer_and_custom_scorers():
    img = _salient_end(900, 300, "right")
    assert choose_crop(img, "center")[0] == "center"

    def prefer_left(im):
        m = np.zeros((10, 30))
        m[:, :5] = 1
        return m

    assert choose_crop(img, prefer_left)[0] == "left"
    register_crop_scorer("test-left-only")(prefer_left)
    try:
        assert choose_crop(img, "test-left-only")[0] == "left"
        with pytest.raises(ValueError):
            register_crop_scorer("test-left-only")(prefer_left)
    finally:
        CROP_SCORERS.pop("test-left-only")
    square = Image.new("RGB", (320, 320))
    assert choose_crop(square)[1] == (0, 0, 320, 320)


def test_curate_reads_a_webdataset_shard(src, tmp_path):
    shard = tmp_path / "data-000.tar"
    with tarfile.open(shard, "w") as tf:
        for p in sorted(src.iterdir()):
            tf.add(p, arcname=p.name)
    m = curate(shard, tmp_path / "from_tar", progress=False)
    assert m["counts"]["kept"] == 6 and m["counts"]["near-duplicate"] == 1


def _cli_error(capsys, argv):
    from edgefc.cli import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_cli_curate_and_its_errors(src, tmp_path, capsys):
    from edgefc.cli import main

    dst = tmp_path / "cli"
    with pytest.raises(SystemExit) as e:
        main(["data", "curate", str(src), "-o", str(dst), "--min-size", "300", "--dedup-threshold", "10",
              "--crop", "center", "--quiet"])
    assert e.value.code == 0
    assert "kept 6 of 11" in capsys.readouterr().out
    kept = json.loads((dst / "manifest.json").read_text())["kept"]
    assert len(kept) == 6 and {r["crop"] for r in kept} == {"center"}

    assert "already exists" in _cli_error(capsys, ["data", "curate", str(src), "-o", str(dst), "--quiet"])
    out = tmp_path / "never"
    assert "does not exist" in _cli_error(capsys, ["data", "curate", str(tmp_path / "missing"), "-o", str(out)])
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no image/caption pairs" in _cli_error(capsys, ["data", "curate", str(empty), "-o", str(out)])
    bad_tar = tmp_path / "bad.tar"
    bad_tar.write_bytes(b"not a tar file at all" * 10)
    assert "tar" in _cli_error(capsys, ["data", "curate", str(bad_tar), "-o", str(out)])
    assert "between 0 and 64" in _cli_error(capsys, ["data", "curate", str(src), "-o", str(out),
                                                     "--dedup-threshold", "65"])
    assert not out.exists() and not list(tmp_path.glob(".*tmp"))
