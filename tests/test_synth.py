"""``edgefc data synth`` and ``edgefc eval``: the synthetic scenes and the deterministic verifier (issue 13)."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from edgefc.models import synth, verifier
from tests import needs
from tests.cli import assert_user_error, run_cli


def _digest(folder) -> str:
    h = hashlib.sha256()
    for p in sorted(q for q in folder.rglob("*") if q.is_file()):
        h.update(str(p.relative_to(folder)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()


@pytest.mark.parametrize("level", [1, 2, 3])
def test_verifier_reads_the_data_back(level):
    """The verifier reads every attribute of the data's own captions back (>= 0.95 required; it is 1)."""
    images, prompts = [], []
    for i in range(60):
        scene, image = synth.make(i, seed=7, size=64, level=level)
        images.append(image)
        prompts.append(scene.caption)
    r = verifier.score(images, prompts)
    assert r["alignment"] >= 0.95
    assert set(r["per_attribute"]) == set(synth.ATTRIBUTES[level])
    assert min(r["per_attribute"].values()) >= 0.95


def test_verifier_rejects_wrong_prompts():
    """A wrong prompt scores low: every attribute changed gives 0, one changed gives 3/4."""
    scene, image = synth.make(0, seed=3)
    o = scene.objects[0]
    other = {k: next(v for v in vals if v != cur) for k, vals, cur in (
        ("shape", synth.SHAPES, o.shape), ("colour", list(synth.COLOURS), o.colour),
        ("position", synth.POSITIONS, o.position), ("bg", list(synth.BACKGROUNDS), scene.background))}
    all_wrong = f"a {other['colour']} {other['shape']} in the {other['position']} on a {other['bg']} background"
    one_wrong = f"a {o.colour} {other['shape']} in the {o.position} on a {scene.background} background"
    assert verifier.score([image], [all_wrong])["alignment"] == 0.0
    assert verifier.score([image], [one_wrong])["alignment"] == 0.75
    blank = np.full_like(image, 128)
    assert verifier.score([blank], [scene.caption])["per_attribute"]["shape"] == 0.0


def test_parse_caption_reads_every_phrasing():
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(200):
        s = synth.sample_scene(rng, level=3 if len(seen) % 2 else 1)
        got = synth.parse_caption(s.caption)
        assert got is not None, s.caption
        assert got["background"] == s.background
        assert [(x["shape"], x["colour"], x["position"]) for x in got["objects"]] == \
            [(x.shape, x.colour, x.position) for x in s.objects]
        seen.add(s.caption.split()[0])
    assert synth.parse_caption("a cute cat") is None


def test_frechet_distance_orders_sets():
    real = [synth.make(i, 1)[1] for i in range(40)]
    more_real = [synth.make(i, 2)[1] for i in range(40)]
    noise = [np.random.default_rng(i).integers(0, 256, (64, 64, 3), dtype=np.uint8) for i in range(40)]
    f_real, f_more, f_noise = (verifier.features(x) for x in (real, more_real, noise))
    assert verifier.frechet_distance(f_real, f_real) == pytest.approx(0.0, abs=1e-6)
    assert verifier.frechet_distance(f_real, f_more) < verifier.frechet_distance(f_real, f_noise)


def test_synth_cli_is_deterministic_and_eval_reads_it(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for out, seed in ((a, 5), (b, 5), (c, 6)):
        rc, text = run_cli("data", "synth", "-o", str(out), "--count", "12", "--seed", str(seed), "--quiet")
        assert rc == 0, text
    assert _digest(a) == _digest(b)  # same seed: the same bytes
    assert _digest(a) != _digest(c)
    manifest = json.loads((a / "manifest.json").read_text())
    assert manifest["count"] == 12 and len(manifest["items"]) == 12
    assert (a / "000000.txt").read_text().strip() == manifest["items"][0]["caption"]
    rc, text = run_cli("eval", str(a), "--reference", str(c), "--json")
    assert rc == 0, text
    r = json.loads(text)
    assert r["alignment"] == 1.0 and r["count"] == 12 and r["fid"] > 0


@needs.transformers
def test_synth_tokenizer_is_a_clip_tokenizer(tmp_path):
    """DIR/tokenizer loads as transformers' CLIPTokenizer and makes each caption word one token."""
    from edgefc.models.tokenizer import load_tokenizer

    rc, text = run_cli("data", "synth", "-o", str(tmp_path / "a"), "--count", "2", "--seed", "5", "--quiet")
    assert rc == 0, text
    caption = json.loads((tmp_path / "a" / "manifest.json").read_text())["items"][0]["caption"]
    tok = load_tokenizer(tmp_path / "a" / "tokenizer")
    assert tok.kind == "clip" and int((tok.encode(caption)[0] != 49407).sum()) <= 16


def test_synth_and_eval_user_errors(tmp_path):
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    assert_user_error(*run_cli("data", "synth", "-o", str(full), "--count", "2"), "not an empty folder")
    assert_user_error(*run_cli("data", "synth", "-o", str(tmp_path / "n"), "--count", "0"), "--count")
    assert_user_error(*run_cli("data", "synth", "-o", str(tmp_path / "s"), "--size", "60"), "--size")
    assert not (tmp_path / "n").exists() and not (tmp_path / "s").exists()
    assert_user_error(*run_cli("eval", str(tmp_path / "missing")), "not a folder")
    assert_user_error(*run_cli("eval", str(full)), "no NAME.png")
    rc, _ = run_cli("data", "synth", "-o", str(tmp_path / "d"), "--count", "2", "--quiet")
    assert rc == 0
    (tmp_path / "d" / "000001.txt").write_text("a cute cat\n")
    assert_user_error(*run_cli("eval", str(tmp_path / "d")), "000001.txt", "cannot read the attributes")
